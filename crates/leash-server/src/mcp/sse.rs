//! An MCP server's event stream (`text/event-stream`), relayed event by event: each event's data
//! is one JSON-RPC message; a `tools/list` answer is filtered to the token's tools, a request the
//! server makes of the client is noted (the client's answer must match one), and
//! `elicitation/create` (meant for the human, API §14) is put to the human (`elicitation`)
//! instead of reaching the agent. Events pass as they arrive, so progress notifications and long results
//! stream.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::Response;
use http_body_util::BodyExt as _;
use hyper::body::Frame;
use leash_core::mcp::{Message, parse_message};
use serde_json::Value;

use super::Answerer;
use crate::state::AppState;

/// Longest event Leash buffers; a longer one cuts the stream off.
const EVENT_LIMIT: usize = 16 << 20;

/// What the relay does with the events of one stream.
pub(crate) struct Relay {
    pub(crate) state: Arc<AppState>,
    pub(crate) upstream: String,
    /// Where the server's requests are noted.
    pub(crate) session: String,
    /// Set for the answer to `tools/list`: the tools to keep.
    pub(crate) filter_tools: Option<super::ToolFilter>,
    /// Whether the server may ask the agent's model to sample.
    pub(crate) sampling: bool,
    pub(crate) answerer: Answerer,
    /// How many elicitations of this stream were put to the human so far.
    pub(crate) elicited: std::sync::atomic::AtomicUsize,
}

/// How often a quiet stream checks that its task is still live.
const LIVENESS_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Relays `response`'s event stream through `relay`; it ends when its task does.
pub(crate) fn relay(response: Response, relay: Relay) -> Response {
    let (mut parts, mut body) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Bytes, axum::Error>>(16);
    tokio::spawn(async move {
        let mut buffer: Vec<u8> = Vec::new();
        let mut tick = tokio::time::interval(LIVENESS_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let frame = tokio::select! {
                frame = body.frame() => frame,
                _ = tick.tick() => {
                    if super::grant_is_live(&relay.state, &relay.answerer.grant).await {
                        continue;
                    }
                    // The task ended (revoked, completed, expired): so does its stream, even
                    // one that waits (an elicitation before the human, a long tool).
                    return;
                }
            };
            match frame {
                None => {
                    if !buffer.is_empty() {
                        let _ = sender.send(Ok(Bytes::from(buffer))).await;
                    }
                    return;
                }
                Some(Err(e)) => {
                    let _ = sender.send(Err(axum::Error::new(e))).await;
                    return;
                }
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    buffer.extend_from_slice(&data);
                    if !super::grant_is_live(&relay.state, &relay.answerer.grant).await {
                        return;
                    }
                    while let Some(end) = event_end(&buffer) {
                        let event: Vec<u8> = buffer.drain(..end).collect();
                        if let Some(out) = relay.event(&event)
                            && sender.send(Ok(out)).await.is_err()
                        {
                            // The agent went away: so does the stream from the server.
                            return;
                        }
                    }
                    if buffer.len() > EVENT_LIMIT {
                        tracing::warn!(upstream = %relay.upstream, "an MCP event over the limit; stream cut off");
                        let _ = sender
                            .send(Err(axum::Error::new(std::io::Error::other(
                                "event too large",
                            ))))
                            .await;
                        return;
                    }
                }
            }
        }
    });
    Response::from_parts(parts, Body::new(ChannelBody { receiver }))
}

/// Where the first complete event in `buffer` ends (after its blank line).
fn event_end(buffer: &[u8]) -> Option<usize> {
    let lf = memchr::memmem::find(buffer, b"\n\n").map(|i| i + 2);
    let crlf = memchr::memmem::find(buffer, b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl Relay {
    /// The event as the agent gets it, or `None` to hold it back.
    fn event(&self, event: &[u8]) -> Option<Bytes> {
        let Ok(text) = std::str::from_utf8(event) else {
            return Some(Bytes::copy_from_slice(event));
        };
        let mut data = Vec::new();
        let mut other = Vec::new();
        for line in text.lines() {
            if let Some(value) = line.strip_prefix("data:") {
                data.push(value.strip_prefix(' ').unwrap_or(value));
            } else if !line.is_empty() {
                other.push(line);
            }
        }
        if data.is_empty() {
            return Some(Bytes::copy_from_slice(event));
        }
        let data = data.join("\n");
        let message = parse_message(data.as_bytes()).or_else(|_| lenient(&data).ok_or(()));
        match message {
            Ok(Message::Request { id, method, params }) if method == super::elicitation::METHOD => {
                super::elicitation::ask(&self.state, &self.answerer, id, params, &self.elicited);
                None
            }
            Ok(Message::Request { id, method, .. })
                if method == "sampling/createMessage" && !self.sampling =>
            {
                tracing::info!(upstream = %self.upstream, "a sampling request refused");
                self.answerer.refuse(
                    &self.state,
                    &id,
                    "the agent's token or policy does not permit sampling for this server",
                );
                None
            }
            Ok(Message::Request { id, .. }) => {
                self.state.mcp_sessions.expect_answer(&self.session, id);
                Some(Bytes::copy_from_slice(event))
            }
            Ok(Message::Response { .. }) if self.filter_tools.is_some() => {
                let allowed = self.filter_tools.as_ref()?;
                let mut answer: Value = serde_json::from_str(&data).ok()?;
                super::filter_tools(&mut answer, allowed);
                let mut out = String::new();
                for line in other {
                    out.push_str(line);
                    out.push('\n');
                }
                out.push_str("data: ");
                out.push_str(&answer.to_string());
                out.push_str("\n\n");
                Some(Bytes::from(out))
            }
            _ => Some(Bytes::copy_from_slice(event)),
        }
    }
}

/// A response body fed by the relay's task.
struct ChannelBody {
    receiver: tokio::sync::mpsc::Receiver<Result<Bytes, axum::Error>>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        self.receiver
            .poll_recv(cx)
            .map(|next| next.map(|item| item.map(Frame::data)))
    }
}

/// A server message the strict parser refused (say, with a member JSON-RPC does not define),
/// read leniently: Leash does not judge what the server says, but an elicitation must still be
/// recognised as the human's to answer, whatever else its message carries.
fn lenient(data: &str) -> Option<Message> {
    let value: Value = serde_json::from_str(data).ok()?;
    let method = value.get("method")?.as_str()?.to_owned();
    let id = match value.get("id")? {
        Value::String(id) => leash_core::mcp::RequestId::String(id.clone()),
        Value::Number(n) => leash_core::mcp::RequestId::Number(n.as_i64()?),
        _ => return None,
    };
    Some(Message::Request {
        id,
        method,
        params: None,
    })
}
