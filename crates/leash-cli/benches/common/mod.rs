//! What the load benches share: how they start, and the server they start.

#![allow(dead_code, reason = "each bench uses a part")]

use std::path::PathBuf;

use leash_testkit::{Leash, Scenario};
use serde_json::json;

/// Runs `run` on a multi-threaded runtime when `cargo bench` asked for it: it passes `--bench`;
/// `cargo test --benches` does not, and then a bench only checks that it builds.
pub fn bench_main<F: Future<Output = ()>>(run: impl FnOnce() -> F) {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run());
}

/// The `leash` binary the benches run: this build's, or the one `LEASH_BENCH_BIN` names (to
/// measure an earlier build against a floor of this one, say).
pub fn leash_binary() -> PathBuf {
    std::env::var_os("LEASH_BENCH_BIN")
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_leash")), PathBuf::from)
}

/// A Leash on SQLite in front of `upstream`, with the scenario's grant (alice to the mailbot)
/// and alice's mail credential in the vault.
pub async fn start_with_mail_credential(upstream: &str) -> (Leash, Scenario) {
    let leash = Leash::start_quiet(&leash_binary(), "", upstream).await;
    let s = Scenario::new(&leash).await;
    s.vault(
        &leash,
        "mail",
        json!({"kind": "bearer", "secret": "alice-mail-token"}),
    )
    .await;
    (leash, s)
}

/// The key the audit benches sign their checkpoints with.
pub fn audit_signer() -> leash_core::token::SigningKey {
    leash_core::token::SigningKey::new(ed25519_dalek::SigningKey::from_bytes(&[5u8; 32]))
}
