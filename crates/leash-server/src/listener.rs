//! The HTTP listener: the listening socket, the accept loop with its connection limits
//! (connections in all and per source address, head size and header count, slow or idle
//! clients, stalled or slow request bodies), graceful shutdown, and the head check that answers
//! the configured head limits with Leash's JSON 431.

use std::collections::HashMap;
use std::future::Future as _;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceExt as _;

use crate::config::Limits;
use crate::error::ApiError;

/// How long a shutdown waits for requests in flight before closing their connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// hyper's own header-count limit when none is set; setting one moves its header parsing to
/// the heap on every request, so it is only raised when the configured limit needs it.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// The smallest read buffer hyper accepts.
const HYPER_MIN_BUF: usize = 8192;

/// Connections the kernel completes and queues for `accept` while the server is busy or at
/// `max_connections`. The queue must hold a burst of connects (a client pool refilling after a
/// pause): a SYN that finds it full is dropped, and the client sends it again only a second
/// later, so the standard library's (and tokio's) 128 is too short. Linux clamps this to
/// `net.core.somaxconn` (4096 by default).
const LISTEN_BACKLOG: u32 = 4096;

/// The server's listening socket on `addr`, with a backlog of [`LISTEN_BACKLOG`].
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restarted server can listen again at once.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// How connections are served under `limits`: HTTP/1.1 or HTTP/2, the head limits at twice
/// the configured ones (see [`serve`]), `header_read_timeout` for each head and as HTTP/2's
/// keep-alive.
pub(crate) fn connection_builder(limits: &Limits) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    {
        let mut http1 = builder.http1();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            // hyper-util exposes no head-only limit; the read buffer bounds the head.
            .max_buf_size((limits.max_header_bytes * 2).max(HYPER_MIN_BUF));
        if limits.max_headers * 2 > HYPER_DEFAULT_MAX_HEADERS {
            http1.max_headers(limits.max_headers * 2);
        }
    }
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes * 2).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(limits.header_read_timeout))
        .keep_alive_timeout(limits.header_read_timeout);
    builder
}

/// Serves `router` on `listener` until `shutdown` resolves, under `limits`.
///
/// The configured head limits are answered by [`front_door`] with a JSON 431; hyper's own
/// limits are set at twice them, as the backstop that stops a client from making the server
/// buffer an unbounded head (hyper answers those with a bare 431 and closes the connection).
/// A client has `header_read_timeout` to send each request head, which also closes a
/// kept-alive connection idle for that long. At `max_connections`, new connections wait in the
/// listen backlog (see [`listen`]) until one closes.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let builder = Arc::new(connection_builder(limits));
    let stall_limit = limits.header_read_timeout;
    let body_limit = limits.body_read_timeout;
    let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let shares = AddressShares::new(limits.max_connections_per_address);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => permit,
            () = &mut shutdown => break,
        };
        let Ok(permit) = permit else { break };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(share) = shares.take(peer.ip()) else {
            // Closed at once: waiting would hold the place a client under its share needs.
            tracing::debug!(peer = %peer.ip(), "connection over the address's share closed");
            continue;
        };
        // Responses are small and latency matters more than packet count.
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone().map_request(
            move |request: hyper::Request<hyper::body::Incoming>| {
                // Gateway bodies may be large and slow; every other body is small and gets
                // a total deadline too.
                let total = (!request.uri().path().starts_with("/gw/")).then_some(body_limit);
                let mut request =
                    request.map(|body| StallTimed::new(body, stall_limit).with_total(total));
                request.extensions_mut().insert(Peer(peer));
                request
            },
        ));
        let (builder, watcher) = (Arc::clone(&builder), graceful.watcher());
        tokio::spawn(async move {
            // hyper's head timeout starts with the first byte: a client that connects and sends
            // nothing would otherwise hold its place (one of `max_connections`, and of its
            // address's share) for ever, waiting for the protocol to be told apart.
            // `peek`, not `readable`, which may wake without data.
            let mut first = [0u8; 1];
            if tokio::time::timeout(stall_limit, stream.peek(&mut first))
                .await
                .is_err()
            {
                tracing::debug!(peer = %peer.ip(), "a connection that sent nothing closed");
            } else {
                let connection = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .into_owned();
                if let Err(e) = watcher.watch(connection).await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            }
            drop(share);
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after the shutdown grace period; closing");
    }
}

/// A request body that is cut off when its client sends no part of it for `limit`. hyper times
/// out request heads only: without this, a client that sends a head announcing a body and then
/// nothing holds its connection (one of `max_connections`), and at the gateway the upstream's,
/// for as long as it likes, so such connections, unauthenticated, could take every one. Its
/// size and end are the inner body's, so a request without a body stays one and is never
/// timed.
pub struct StallTimed<B> {
    inner: B,
    limit: Duration,
    /// The time the whole body must have arrived by, if any (see [`StallTimed::with_total`]).
    total: Option<Duration>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Made at the first wait and then reset: a body that arrives whole needs none.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether the timer runs for the current wait.
    waiting: bool,
}

impl<B> StallTimed<B> {
    /// `inner`, cut off after `limit` without a part of it.
    pub fn new(inner: B, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            total: None,
            deadline: None,
            timer: None,
            waiting: false,
        }
    }

    /// Also cut off once `total` has passed since the body was first waited for, however
    /// steadily it arrives: a body dripped in a byte a second never stalls, yet would hold a
    /// connection for as long as its client likes.
    pub fn with_total(mut self, total: Option<Duration>) -> Self {
        self.total = total;
        self
    }
}

/// The error a [`StallTimed`] body ends with.
#[derive(Debug, thiserror::Error)]
pub enum BodyStalled {
    /// No part arrived for this long.
    #[error("the client sent no part of the request body for {0:?}")]
    Stalled(Duration),
    /// The whole body did not arrive within this long.
    #[error("the client did not send the whole request body within {0:?}")]
    TooSlow(Duration),
}

impl<B> hyper::body::Body for StallTimed<B>
where
    B: hyper::body::Body + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = B::Data;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.waiting = false;
            return Poll::Ready(frame.map(|part| part.map_err(Into::into)));
        }
        if let Some(total) = this.total {
            let deadline = this
                .deadline
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(total)));
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Some(Err(Box::new(BodyStalled::TooSlow(total)))));
            }
        }
        if !this.waiting {
            let deadline = tokio::time::Instant::now() + this.limit;
            match this.timer.as_mut() {
                Some(timer) => timer.as_mut().reset(deadline),
                None => this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            this.waiting = true;
        }
        match this.timer.as_mut().map(|timer| timer.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => {
                Poll::Ready(Some(Err(Box::new(BodyStalled::Stalled(this.limit)))))
            }
            _ => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The TCP peer of a request's connection, put in its extensions by [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub std::net::SocketAddr);

/// Connections held per source address, at most `share` each.
#[derive(Clone)]
struct AddressShares {
    share: usize,
    held: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
}

/// One connection's place in its address's share, given back when dropped.
struct SharePlace {
    shares: AddressShares,
    address: IpAddr,
}

impl AddressShares {
    fn new(share: usize) -> Self {
        Self {
            share,
            held: Arc::default(),
        }
    }

    fn take(&self, address: IpAddr) -> Option<SharePlace> {
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = held.entry(address).or_insert(0);
        if *count >= self.share {
            return None;
        }
        *count += 1;
        Some(SharePlace {
            shares: self.clone(),
            address,
        })
    }
}

impl Drop for SharePlace {
    fn drop(&mut self) {
        let mut held = self
            .shares
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = held.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.address);
            }
        }
    }
}

/// A failed accept: a client that gave up is nothing; anything else (out of file
/// descriptors, say) is logged and waited out so the loop does not spin.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if !matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        tracing::error!(error = %e, "accept failed");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A request body that says when it was read to its end.
struct TrackedBody {
    inner: axum::body::Body,
    finished: Arc<std::sync::atomic::AtomicBool>,
}

impl hyper::body::Body for TrackedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None)) || self.inner.is_end_stream() {
            self.finished
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// What every request passes before it is routed, in one layer (each `from_fn` layer boxes
/// the rest of the request's future and allocates its own state; this was three): the head
/// limits ([`head_refusal`]), the cross-site guard ([`crate::console::csrf_refusal`]), and
/// `Connection: close` on an HTTP/1 answer whose request body was left unread (a refusal before
/// the body, say): hyper cannot reuse such a connection and closes it after the answer, and
/// without the header a client would send its next request into that closing connection and
/// get no answer.
pub async fn front_door(
    State(state): State<Arc<crate::AppState>>,
    request: Request,
    next: Next,
) -> Response {
    use hyper::body::Body as _;
    let http1 = request.version() < axum::http::Version::HTTP_2;
    let refusal = |request: &Request| {
        head_refusal(&state.config.limits, request)
            .or_else(|| crate::console::csrf_refusal(&state, request))
    };
    if !http1 || request.body().is_end_stream() {
        return match refusal(&request) {
            Some(refused) => refused,
            None => next.run(request).await,
        };
    }
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tracked = Arc::clone(&finished);
    let mut response = match refusal(&request) {
        Some(refused) => refused,
        None => {
            let request = request.map(|inner| {
                axum::body::Body::new(TrackedBody {
                    inner,
                    finished: tracked,
                })
            });
            next.run(request).await
        }
    };
    if !finished.load(std::sync::atomic::Ordering::Relaxed) {
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    response
}

/// The configured head limits, answered with a JSON 431 before any handler runs.
fn head_refusal(limits: &Limits, request: &Request) -> Option<Response> {
    let headers = request.headers();
    if headers.len() > limits.max_headers {
        return Some(
            ApiError::HeadersTooLarge(format!(
                "a request may carry at most {} header fields",
                limits.max_headers
            ))
            .into_response(),
        );
    }
    // The size as it was on the wire, give or take the line endings' exact spelling.
    let target = request
        .uri()
        .path_and_query()
        .map_or(1, |target| target.as_str().len());
    let line = request.method().as_str().len() + target + 12;
    let size = headers.iter().fold(line, |sum, (name, value)| {
        sum + name.as_str().len() + value.len() + 4
    });
    (size > limits.max_header_bytes).then(|| {
        ApiError::HeadersTooLarge(format!(
            "the request head may be at most {} bytes",
            limits.max_header_bytes
        ))
        .into_response()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listens_on_ipv4_and_ipv6_addresses_alike() {
        // A machine without IPv6 on its loopback cannot run the second half.
        let ipv6 = std::net::TcpListener::bind("[::1]:0").is_ok();
        for (addr, wanted) in [("127.0.0.1:0", true), ("[::1]:0", ipv6)] {
            if !wanted {
                eprintln!("no IPv6 loopback here: {addr} not tried");
                continue;
            }
            let listener = listen(addr.parse().unwrap()).unwrap();
            let bound = listener.local_addr().unwrap();
            assert_eq!(bound.is_ipv6(), addr.starts_with('['), "{bound}");
            assert_ne!(bound.port(), 0);
            let (client, accepted) =
                tokio::join!(tokio::net::TcpStream::connect(bound), listener.accept());
            let (_, peer) = accepted.unwrap();
            assert_eq!(peer, client.unwrap().local_addr().unwrap());
        }
    }
}
