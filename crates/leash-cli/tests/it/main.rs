//! Integration tests: the real `leash` binary on a random loopback port, temp SQLite, real
//! HTTP and real signatures.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests abort loudly on failure"
)]

mod approvals;
mod audit;
mod authorize;
mod cli;
mod cluster;
mod demo;
mod durability;
mod exchange;
mod gateway;
mod gateway_input;
mod input;
mod jose_python;
mod limits;
mod nginx;
mod openapi;
mod operations;
mod ownership;
mod proofs;
mod proxy;
mod proxy_socket;
mod proxy_tunnel;
mod resource;
mod secrets;
mod single_use;
mod startup;

use std::path::Path;

use base64::Engine as _;
use leash_testkit::Leash;
use serde_json::Value;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_leash"))
}

async fn leash() -> Leash {
    Leash::start(bin(), "").await
}

/// Decodes one segment of a compact JWS, without checking anything.
fn segment(jwt: &str, index: usize) -> Value {
    let part = jwt.split('.').nth(index).expect("segment");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("b64");
    serde_json::from_slice(&bytes).expect("json")
}

fn b64(bytes: impl AsRef<[u8]>) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
