//! Placeholder of the MCP message parser while the strict one is written on branch `mcp-core`:
//! the same interface, none of its strictness. Replaced whole when that branch is merged.

use serde_json::Value;
use sha2::{Digest as _, Sha256};

/// A JSON-RPC id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RequestId {
    /// An integer id.
    Number(i64),
    /// A string id.
    String(String),
}

impl RequestId {
    /// The id as JSON.
    pub fn to_value(&self) -> Value {
        match self {
            Self::Number(n) => Value::from(*n),
            Self::String(s) => Value::from(s.clone()),
        }
    }
}

/// One JSON-RPC message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// A request.
    Request {
        /// Its id.
        id: RequestId,
        /// Its method.
        method: String,
        /// Its params.
        params: Option<Value>,
    },
    /// A notification.
    Notification {
        /// Its method.
        method: String,
        /// Its params.
        params: Option<Value>,
    },
    /// A response.
    Response {
        /// The id it answers.
        id: RequestId,
        /// `result`, or `error`.
        result: Result<Value, Value>,
    },
}

/// Why a message was refused.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// A batch.
    #[error("JSON-RPC batches are not accepted")]
    Batch,
    /// Not JSON-RPC 2.0.
    #[error("not a JSON-RPC 2.0 message: {0}")]
    NotJsonRpc(String),
}

fn id_of(value: &Value) -> Result<RequestId, ParseError> {
    match value {
        Value::String(s) => Ok(RequestId::String(s.clone())),
        Value::Number(n) => n
            .as_i64()
            .map(RequestId::Number)
            .ok_or_else(|| ParseError::NotJsonRpc("id must be an integer or a string".into())),
        _ => Err(ParseError::NotJsonRpc(
            "id must be an integer or a string".into(),
        )),
    }
}

/// Parses one message.
pub fn parse_message(bytes: &[u8]) -> Result<Message, ParseError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| ParseError::NotJsonRpc(e.to_string()))?;
    let Value::Object(map) = value else {
        return Err(if value.is_array() {
            ParseError::Batch
        } else {
            ParseError::NotJsonRpc("not an object".into())
        });
    };
    if map.get("jsonrpc") != Some(&Value::from("2.0")) {
        return Err(ParseError::NotJsonRpc("jsonrpc must be \"2.0\"".into()));
    }
    let params = map.get("params").cloned();
    match (map.get("method"), map.get("id")) {
        (Some(Value::String(method)), Some(id)) => Ok(Message::Request {
            id: id_of(id)?,
            method: method.clone(),
            params,
        }),
        (Some(Value::String(method)), None) => Ok(Message::Notification {
            method: method.clone(),
            params,
        }),
        (None, Some(id)) => Ok(Message::Response {
            id: id_of(id)?,
            result: match (map.get("result"), map.get("error")) {
                (Some(result), None) => Ok(result.clone()),
                (None, Some(error)) => Err(error.clone()),
                _ => return Err(ParseError::NotJsonRpc("result or error".into())),
            },
        }),
        _ => Err(ParseError::NotJsonRpc("method must be a string".into())),
    }
}

/// Hex SHA-256 of the JCS form of `{name, arguments}`.
pub fn call_digest(name: &str, arguments: &Value) -> String {
    let call = serde_json::json!({"name": name, "arguments": arguments});
    let mut out = Vec::new();
    let mut serializer =
        serde_json::Serializer::with_formatter(&mut out, canon_json::CanonicalFormatter::new());
    let _ = serde::Serialize::serialize(&call, &mut serializer);
    hex::encode(Sha256::digest(&out))
}
