//! One MCP JSON-RPC message, parsed strictly (API §14, ATTACKS 56): what Leash judges must be
//! exactly what the MCP server reads, so anything two parsers could read differently is refused.
//! Also the digest an approval of a `tools/call` is bound to.

use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

use crate::json::{self, StrictError};

/// The deepest nesting of arrays and objects a message may have (the message itself counts).
pub const MAX_DEPTH: usize = json::MAX_DEPTH;

/// A JSON-RPC id. MCP never allows `null`; integers must fit `i64`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RequestId {
    /// An integer id.
    Number(i64),
    /// A string id.
    String(String),
}

/// One JSON-RPC 2.0 message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// A call that expects an answer.
    Request {
        /// The id the answer will carry.
        id: RequestId,
        /// The method, e.g. `tools/call`.
        method: String,
        /// An object or an array, if sent.
        params: Option<Value>,
    },
    /// A call without an answer (no `id`).
    Notification {
        /// The method, e.g. `notifications/initialized`.
        method: String,
        /// An object or an array, if sent.
        params: Option<Value>,
    },
    /// The answer to a request.
    Response {
        /// The id of the request answered.
        id: RequestId,
        /// `Ok` the `result` member, `Err` the `error` member (an object with an integer `code`
        /// and a string `message`).
        result: Result<Value, Value>,
    },
}

/// Why a message was refused. The messages say what was wrong and what would be right, and
/// echo nothing of the message but (at most 64 characters of) a member name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A top-level array: JSON-RPC batches are not accepted.
    #[error("a JSON-RPC batch (top-level array) is not accepted: send one message per request")]
    Batch,
    /// Not exactly one JSON value.
    #[error("not JSON: {0}; send exactly one JSON object")]
    NotJson(String),
    /// JSON, but not I-JSON (RFC 7493): not UTF-8, duplicate member names, lone surrogates,
    /// numbers beyond a double.
    #[error("not I-JSON (RFC 7493): {0}")]
    NotIJson(String),
    /// Nested deeper than [`MAX_DEPTH`].
    #[error("nested deeper than {MAX_DEPTH} arrays and objects")]
    TooDeep,
    /// JSON, but not a JSON-RPC 2.0 message as MCP allows it.
    #[error("not a JSON-RPC 2.0 message: {0}")]
    NotJsonRpc(String),
}

impl From<StrictError> for ParseError {
    fn from(error: StrictError) -> Self {
        match error {
            StrictError::Syntax(message) => ParseError::NotJson(message),
            StrictError::TooDeep(_) => ParseError::TooDeep,
            StrictError::NotUtf8
            | StrictError::Duplicate(_)
            | StrictError::LoneSurrogate
            | StrictError::NumberOutOfRange => ParseError::NotIJson(error.to_string()),
        }
    }
}

fn not_rpc(message: &str) -> ParseError {
    ParseError::NotJsonRpc(message.to_owned())
}

/// The members a JSON-RPC 2.0 message may have. Anything else is refused rather than passed on:
/// an MCP server might read a member Leash did not judge.
const MEMBERS: [&str; 6] = ["jsonrpc", "id", "method", "params", "result", "error"];

/// Parses one message: UTF-8, exactly one JSON value that is I-JSON and nested at most
/// [`MAX_DEPTH`] deep, a JSON object (a top-level array is a batch: [`ParseError::Batch`]) with
/// `jsonrpc` exactly `"2.0"` and only the JSON-RPC members; a request or notification has a
/// string `method`, no `result`/`error` and `params` (if any) an object or an array; a response
/// has exactly one of `result` and `error`. Ids are strings or integers within `i64`.
pub fn parse_message(bytes: &[u8]) -> Result<Message, ParseError> {
    let first = bytes
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    if first == Some(&b'[') {
        return Err(ParseError::Batch);
    }
    let Value::Object(mut object) = json::parse_strict(bytes, MAX_DEPTH)? else {
        return Err(not_rpc("the message must be a JSON object"));
    };
    if let Some(name) = object.keys().find(|k| !MEMBERS.contains(&k.as_str())) {
        let name: String = name.chars().take(64).collect();
        return Err(ParseError::NotJsonRpc(format!(
            "unknown member {name:?}: a message has only jsonrpc, id, method, params, result and error"
        )));
    }
    if object.remove("jsonrpc") != Some(Value::String("2.0".into())) {
        return Err(not_rpc("jsonrpc must be the string \"2.0\""));
    }
    let id = object.remove("id").map(request_id).transpose()?;
    let result = object.remove("result");
    let error = object.remove("error");
    if let Some(method) = object.remove("method") {
        let Value::String(method) = method else {
            return Err(not_rpc("method must be a string"));
        };
        if method.is_empty() {
            return Err(not_rpc("method must not be empty"));
        }
        if result.is_some() || error.is_some() {
            return Err(not_rpc(
                "a message with method is a request or notification: it cannot carry result or error",
            ));
        }
        let params = object.remove("params");
        if params
            .as_ref()
            .is_some_and(|p| !(p.is_object() || p.is_array()))
        {
            return Err(not_rpc("params must be an object or an array"));
        }
        return Ok(match id {
            Some(id) => Message::Request { id, method, params },
            None => Message::Notification { method, params },
        });
    }
    if object.contains_key("params") {
        return Err(not_rpc(
            "params belongs to a request or notification, which needs method",
        ));
    }
    let result = match (result, error) {
        (Some(_), Some(_)) => return Err(not_rpc("a response has result or error, not both")),
        (None, None) => {
            return Err(not_rpc(
                "need method (a request or notification) or result or error (a response)",
            ));
        }
        (Some(result), None) => Ok(result),
        (None, Some(error)) => Err(error_object(error)?),
    };
    let Some(id) = id else {
        return Err(not_rpc("a response needs the id of the request it answers"));
    };
    Ok(Message::Response { id, result })
}

fn request_id(value: Value) -> Result<RequestId, ParseError> {
    match value {
        Value::String(s) => Ok(RequestId::String(s)),
        Value::Number(n) if n.is_i64() || n.is_u64() => n
            .as_i64()
            .map(RequestId::Number)
            .ok_or_else(|| not_rpc("id must be a string or an integer within i64")),
        _ => Err(not_rpc(
            "id must be a string or an integer within i64 (not null, fractional or a boolean)",
        )),
    }
}

/// A JSON-RPC error object: an integer `code`, a string `message`, an optional `data`.
fn error_object(error: Value) -> Result<Value, ParseError> {
    let well_formed = error.as_object().is_some_and(|e| {
        e.get("code").is_some_and(|c| c.is_i64())
            && e.get("message").is_some_and(Value::is_string)
            && e.keys()
                .all(|k| matches!(k.as_str(), "code" | "message" | "data"))
    });
    if well_formed {
        Ok(error)
    } else {
        Err(not_rpc(
            "error must be an object with an integer code, a string message and optionally data",
        ))
    }
}

impl RequestId {
    /// The id as JSON.
    pub fn to_value(&self) -> Value {
        match self {
            RequestId::Number(n) => Value::from(*n),
            RequestId::String(s) => Value::String(s.clone()),
        }
    }
}

impl Message {
    /// The message as JSON (members in JSON-RPC's order); parsing it gives the message back.
    pub fn to_value(&self) -> Value {
        let mut out = Map::new();
        out.insert("jsonrpc".into(), Value::String("2.0".into()));
        match self {
            Message::Request { id, method, params } => {
                out.insert("id".into(), id.to_value());
                out.insert("method".into(), Value::String(method.clone()));
                if let Some(params) = params {
                    out.insert("params".into(), params.clone());
                }
            }
            Message::Notification { method, params } => {
                out.insert("method".into(), Value::String(method.clone()));
                if let Some(params) = params {
                    out.insert("params".into(), params.clone());
                }
            }
            Message::Response { id, result } => {
                out.insert("id".into(), id.to_value());
                match result {
                    Ok(result) => out.insert("result".into(), result.clone()),
                    Err(error) => out.insert("error".into(), error.clone()),
                };
            }
        }
        Value::Object(out)
    }
}

/// What an approval of a `tools/call` is bound to (API §14): the lowercase hex SHA-256 of the
/// RFC 8785 form of `{"name": name, "arguments": arguments}`, so member order and whitespace do
/// not matter and any other change does.
pub fn call_digest(name: &str, arguments: &Value) -> String {
    #[derive(Serialize)]
    struct Call<'a> {
        name: &'a str,
        arguments: &'a Value,
    }
    // INVARIANT: canonicalisation fails only on a non-finite number, which a `serde_json::Value`
    // cannot hold, and on a non-string member name, which it has none of.
    #[expect(
        clippy::expect_used,
        reason = "a serde_json::Value always has a canonical form (see the invariant)"
    )]
    let form = json::canonical(&Call { name, arguments }).expect("a Value canonicalises");
    hex::encode(Sha256::digest(form))
}

#[cfg(test)]
mod tests;
