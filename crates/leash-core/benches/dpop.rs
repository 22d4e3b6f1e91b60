//! DPoP proof verification against one bare signature verification of the same algorithm.
//! Target (issue: foundation): a full proof check costs ≤ 1.3× the bare verify.
//! Run: cargo bench -p leash-core --bench dpop

#![allow(
    clippy::expect_used,
    reason = "a benchmark with a broken setup should abort loudly"
)]

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use leash_core::client::AgentKey;
use leash_core::dpop::{AccessTokenHash, ProofContext, verify_proof};
use leash_core::jws::Alg;

fn bench(c: &mut Criterion) {
    let url = url::Url::parse("http://127.0.0.1:8470/gw/mail/messages/42").expect("url");
    let now = 1_800_000_000;
    let token = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ1c3JfMSJ9.c2lnbmF0dXJl";
    for alg in [Alg::EdDsa, Alg::Es256] {
        let key = AgentKey::generate(alg);
        let proof = key.dpop_proof("GET", url.as_str(), Some(token), None, now);
        let (input, sig) = proof.rsplit_once('.').expect("jws");
        let sig = leash_core::b64::decode(sig).expect("b64");
        let public = key.public();
        let mut group = c.benchmark_group(format!("dpop/{}", alg.name()));
        group.bench_function("bare_signature_verify", |b| {
            b.iter(|| {
                public
                    .verify(alg, black_box(input.as_bytes()), black_box(&sig))
                    .expect("verifies")
            })
        });
        if let leash_core::jwk::PublicJwk::Ed25519 { key, .. } = &public {
            // What `bare_signature_verify` would cost with ed25519-dalek's own strict check
            // (it also decompresses `R`; see `jwk::verify_ed25519_strict`).
            let signature = ed25519_dalek::Signature::from_slice(&sig).expect("64 bytes");
            group.bench_function("dalek_verify_strict", |b| {
                b.iter(|| {
                    key.verify_strict(black_box(input.as_bytes()), black_box(&signature))
                        .expect("verifies")
                })
            });
        }
        group.bench_function("full_proof_check", |b| {
            b.iter(|| {
                // The resource server hashes the token once per request, for `ath` among others.
                let token_hash = AccessTokenHash::of(black_box(token));
                let cx = ProofContext {
                    method: "GET",
                    url: url.as_str(),
                    access_token: Some(&token_hash),
                    now,
                    nonces: None,
                };
                verify_proof(black_box(&proof), &cx).expect("valid")
            })
        });
        let jwk = key.public().to_value();
        group.bench_function("parts/jws_parse", |b| {
            b.iter(|| leash_core::jws::Jws::parse(black_box(&proof)).expect("parses"))
        });
        group.bench_function("parts/jwk_from_value", |b| {
            b.iter(|| leash_core::jwk::PublicJwk::from_value(black_box(&jwk)).expect("key"))
        });
        group.bench_function("parts/thumbprint", |b| {
            b.iter(|| black_box(&public).thumbprint())
        });
        group.bench_function("parts/url_parse", |b| {
            b.iter(|| url::Url::parse(black_box(url.as_str())).expect("url"))
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
