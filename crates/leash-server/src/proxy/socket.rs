//! A WebSocket through the forward proxy, on a route that allows one (`websocket = true`; API
//! §16 refuses every other upgrade). The handshake is one request of the route's action,
//! judged and audited like any other in the tunnel; the socket it opens is then relayed message
//! by message:
//! - every message of the upstream (and the reason of its close) is checked for an echo of a
//!   credential Leash sent (the vaulted one, the jar's cookies), across message boundaries
//!   too; one that carries it closes
//!   the socket (`1008`) and is audited as `credential_reflected`, the message never reaching
//!   the browser. No extension is negotiated, so nothing is compressed past the check;
//! - the holder's credential is checked live on every message of the browser and every second:
//!   a revoked grant or a completed task closes the socket (`1008`), as it refuses the next
//!   request of a tunnel;
//! - messages are at most `limits.gateway_body_bytes`, as request bodies are.
//!
//! The messages themselves are not judged by the policy one by one: what the route's action
//! permits is the socket.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use leash_core::audit::Outcome;
use tokio::sync::OwnedSemaphorePermit;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};

use super::front::holder_of;
use super::page;
use super::tunnel::Tunnel;
use crate::audit::Trail;
use crate::gateway::{CREDENTIAL_REFLECTED, UpstreamSocket};
use crate::reflection::Echoes;

/// How often an idle socket looks whether its grant is still live (besides on each message of
/// the browser): within the second tokens die in.
const LIVENESS: Duration = Duration::from_secs(1);

/// How long closing a socket may take before it is dropped.
const CLOSING: Duration = Duration::from_secs(5);

/// A socket both sides agreed to, ready to relay once both connections are handed over.
pub(crate) struct Socket {
    pub(crate) tunnel: Tunnel,
    pub(crate) browser: OnUpgrade,
    pub(crate) upstream: UpstreamSocket,
    /// Counted with the tunnels, within `[limits] max_connections`.
    pub(crate) permit: OwnedSemaphorePermit,
    /// The handshake's trail, for the event recorded if a message echoes a credential.
    pub(crate) trail: Trail,
    pub(crate) request_id: String,
}

type Side = WebSocketStream<TokioIo<Upgraded>>;

/// Why the relay stopped.
enum End {
    /// One side closed (its close frame passed on to the other).
    Closed {
        by_browser: bool,
        frame: Option<CloseFrame>,
    },
    /// One side's connection failed or ended without a close.
    Gone,
    /// The grant or the credential is no longer live.
    Ended,
    /// The upstream echoed a credential.
    Reflected,
}

/// Relays the socket until either side closes it, its grant ends, or the upstream echoes a
/// credential.
pub(crate) async fn relay(socket: Socket) {
    let Socket {
        tunnel,
        browser,
        upstream,
        permit,
        trail,
        request_id,
    } = socket;
    let _counted = permit;
    let (browser, upstream_io) = match tokio::join!(browser, upstream.upgrade) {
        (Ok(browser), Ok(upstream)) => (browser, upstream),
        (browser, upstream) => {
            tracing::debug!(
                browser = browser.is_ok(),
                upstream = upstream.is_ok(),
                request_id = %request_id,
                "a WebSocket was not handed over"
            );
            return;
        }
    };
    let state = &tunnel.proxy.state;
    let limit = state.config.limits.gateway_body_bytes;
    let config = WebSocketConfig::default()
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit));
    let mut browser =
        WebSocketStream::from_raw_socket(TokioIo::new(browser), Role::Server, Some(config)).await;
    let mut upstream_side =
        WebSocketStream::from_raw_socket(TokioIo::new(upstream_io), Role::Client, Some(config))
            .await;
    let mut echoes = Echoes::new(upstream.secrets);
    let end = relayed(&tunnel, &mut browser, &mut upstream_side, &mut echoes).await;
    let policy = |reason: &'static str| {
        Some(CloseFrame {
            code: CloseCode::Policy,
            reason: reason.into(),
        })
    };
    let (to_browser, to_upstream) = match end {
        End::Closed {
            by_browser: true,
            frame,
        } => (None, frame),
        End::Closed {
            by_browser: false,
            frame,
        } => (frame, None),
        End::Gone => (None, None),
        End::Ended => {
            tracing::info!(request_id = %request_id, "a WebSocket closed: its grant ended");
            let why = policy("the task ended or was revoked");
            (why.clone(), why)
        }
        End::Reflected => {
            tracing::warn!(request_id = %request_id, "an upstream's WebSocket message carries a credential Leash sent; closed");
            let event = trail.event(
                page::EVENT,
                state.clock.now(),
                &request_id,
                Outcome::Deny,
                Some(CREDENTIAL_REFLECTED.into()),
            );
            // Recorded before the socket is closed: whoever sees it closed finds it audited.
            if crate::audit::record(state, event).await.is_err() {
                tracing::error!(request_id = %request_id, "a reflected credential's refusal is not in the audit trail");
            }
            (
                policy("refused: the upstream's message carried a credential"),
                policy("refused"),
            )
        }
    };
    let _ = tokio::time::timeout(CLOSING, async {
        tokio::join!(browser.close(to_browser), upstream_side.close(to_upstream))
    })
    .await;
}

/// Passes messages both ways until one side closes or fails, the grant ends or the upstream
/// echoes a credential. Pings are answered on each side by itself, not passed on.
async fn relayed(
    tunnel: &Tunnel,
    browser: &mut Side,
    upstream: &mut Side,
    echoes: &mut Echoes,
) -> End {
    let mut liveness = tokio::time::interval(LIVENESS);
    liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            message = browser.next() => {
                let Some(Ok(message)) = message else { return End::Gone };
                if !live(tunnel).await {
                    return End::Ended;
                }
                match message {
                    Message::Close(frame) => return End::Closed { by_browser: true, frame },
                    Message::Text(_) | Message::Binary(_) => {
                        if upstream.send(message).await.is_err() {
                            return End::Gone;
                        }
                    }
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                }
            }
            message = upstream.next() => {
                let Some(Ok(message)) = message else { return End::Gone };
                match message {
                    Message::Close(Some(ref frame)) if echoes.found_in(frame.reason.as_bytes()) => {
                        return End::Reflected;
                    }
                    Message::Close(frame) => return End::Closed { by_browser: false, frame },
                    Message::Text(ref text) if echoes.found_in(text.as_bytes()) => return End::Reflected,
                    Message::Binary(ref data) if echoes.found_in(data) => return End::Reflected,
                    Message::Text(_) | Message::Binary(_) => {
                        if browser.send(message).await.is_err() {
                            return End::Gone;
                        }
                    }
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                }
            }
            _ = liveness.tick() => {
                if !live(tunnel).await {
                    return End::Ended;
                }
            }
        }
    }
}

/// Whether the tunnel's holder is still live (a failure to tell counts as not).
async fn live(tunnel: &Tunnel) -> bool {
    let mut trail = Trail::default();
    holder_of(&tunnel.proxy.state, Arc::clone(&tunnel.claims), &mut trail)
        .await
        .is_ok()
}
