//! What the gateway's reflection guard (`reflection::GuardedBody`) costs an upstream answer that
//! passes it: the same body collected through the guard and bare, in one run, for a small JSON
//! answer (1 KiB, one part), a larger one (256 KiB in 16 KiB parts) and the gateway load bench's
//! answer (1 KiB of `x`, with its bearer credential). The guard searches each
//! part for the injected credential's pieces and holds back the longest piece's length. Also
//! measured: building the guard's automaton (once per credential) and taking it from the cache
//! (once per forwarded request with a credential).
//! Run: cargo bench -p leash-server --bench reflection

#![allow(
    clippy::expect_used,
    reason = "a benchmark with a broken setup should abort loudly"
)]

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Bytes;
use criterion::{BatchSize, Criterion, black_box, criterion_group, criterion_main};
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame};
use leash_server::reflection::{GuardedBody, Secrets, SecretsCache};

/// An upstream answer of ready parts.
struct Parts(VecDeque<Bytes>);

impl Body for Parts {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(|p| Ok(Frame::data(p))))
    }
}

fn answer(total: usize, part: usize) -> VecDeque<Bytes> {
    let text: Vec<u8> = br#"{"id":"m1","subject":"hello","body":"lorem ipsum dolor sit amet"}"#
        .iter()
        .copied()
        .cycle()
        .take(total)
        .collect();
    text.chunks(part).map(Bytes::copy_from_slice).collect()
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let cookie = b"session=4f1c9e2b7a6d8e3f0c5b1a9d7e2f4c6b";
    // Built once per forwarded request that carries a credential.
    c.bench_function("reflection/build", |b| {
        b.iter(|| black_box(Secrets::of(cookie)))
    });
    // What a request pays once the credential's guard is built: a digest and a cache hit.
    let cache = SecretsCache::default();
    c.bench_function("reflection/cached", |b| {
        b.iter(|| black_box(cache.of(cookie)))
    });
    // A session cookie of hex digits under JSON text, and the bearer token of the gateway load
    // bench under its upstream's answer (1 KiB of `x`): a search's speed depends on both.
    let bearer = Secrets::of(b"Bearer alice-mail-token");
    let cases = [
        ("1KiB", Secrets::of(cookie), answer(1024, 1024)),
        ("256KiB", Secrets::of(cookie), answer(256 * 1024, 16 * 1024)),
        (
            "1KiB-x-bearer",
            bearer,
            VecDeque::from([Bytes::from(vec![b'x'; 1024])]),
        ),
    ];
    for (name, secrets, parts) in cases {
        let mut group = c.benchmark_group(format!("reflection/{name}"));
        group.bench_function("bare", |b| {
            b.iter_batched(
                || Parts(parts.clone()),
                |body| runtime.block_on(async { black_box(body.collect().await) }),
                BatchSize::SmallInput,
            );
        });
        group.bench_function("guarded", |b| {
            b.iter_batched(
                || GuardedBody::new(Parts(parts.clone()), secrets.clone(), || {}),
                |body| runtime.block_on(async { black_box(body.collect().await.is_ok()) }),
                BatchSize::SmallInput,
            );
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
