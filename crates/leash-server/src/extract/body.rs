//! Request bodies: strict JSON and `application/x-www-form-urlencoded` bodies read whole within
//! a per-endpoint limit, and the one answer to a body that could not be read.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, header};
use serde::de::DeserializeOwned;

use crate::error::{ApiError, ApiResult};

/// Largest JSON body of the management API.
pub const JSON_LIMIT: usize = 64 * 1024;
/// Largest form body of the OAuth endpoints.
pub const FORM_LIMIT: usize = 64 * 1024;

async fn read_body(body: Body, limit: usize) -> ApiResult<axum::body::Bytes> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|e| body_error(&e, limit))
}

/// What a request body that could not be read whole (under `limit`) is answered with, the
/// client's error in every case: over the limit → 413, stalled or too slow → 408, malformed
/// (bad chunking) or ended early → 400.
pub fn body_error(error: &(dyn std::error::Error + 'static), limit: usize) -> ApiError {
    use crate::error::caused_by;
    if caused_by::<http_body_util::LengthLimitError>(error) {
        ApiError::TooLarge(limit)
    } else if caused_by::<crate::listener::BodyStalled>(error) {
        ApiError::RequestTimeout
    } else {
        ApiError::InvalidRequest(
            "the request body is malformed (bad chunked encoding?) or ended early".into(),
        )
    }
}

fn content_type_is(headers: &HeaderMap, expected: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(expected))
}

/// A JSON body, parsed strictly into `T`.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> ApiResult<Self> {
        if !content_type_is(req.headers(), "application/json") {
            return Err(ApiError::UnsupportedMediaType("application/json"));
        }
        let bytes = read_body(req.into_body(), JSON_LIMIT).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// A JSON body that may be left out, read once the caller is known: an empty body is
/// `T::default()`; any other is parsed strictly, as [`JsonBody`].
pub async fn optional_json<T: DeserializeOwned + Default>(req: Request) -> ApiResult<T> {
    let json = content_type_is(req.headers(), "application/json");
    let bytes = read_body(req.into_body(), JSON_LIMIT).await?;
    if bytes.is_empty() {
        return Ok(T::default());
    }
    if !json {
        return Err(ApiError::UnsupportedMediaType("application/json"));
    }
    parse_json(&bytes)
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    // Every body of the API is an object: serde would also fill a struct from an array, in
    // field order, which no client means.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::InvalidRequest(
            "request body must be a JSON object".into(),
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        // serde's messages can quote the offending value; never echo values back.
        let message = e.to_string();
        let detail = if message.contains('"') && !message.contains('`') {
            format!("line {} column {}", e.line(), e.column())
        } else {
            message
        };
        ApiError::InvalidRequest(format!("request body is not the expected JSON: {detail}"))
    })
}

/// An `application/x-www-form-urlencoded` body (RFC 6749 §3.2): UTF-8 after percent-decoding,
/// each parameter at most once.
#[derive(Debug)]
pub struct Form(pub HashMap<String, String>);

impl Form {
    /// Parses a form body strictly.
    pub fn parse(body: &[u8]) -> ApiResult<Self> {
        let text = std::str::from_utf8(body)
            .map_err(|_| ApiError::InvalidRequest("form body is not UTF-8".into()))?;
        let mut params = HashMap::new();
        for pair in text.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                let plus = s.replace('+', " ");
                percent_encoding::percent_decode_str(&plus)
                    .decode_utf8()
                    .map(|c| c.into_owned())
                    .map_err(|_| ApiError::InvalidRequest("form parameter is not UTF-8".into()))
            };
            let name = decode(name)?;
            if name.is_empty() {
                return Err(ApiError::InvalidRequest(
                    "a form parameter has no name".into(),
                ));
            }
            if params.contains_key(&name) {
                return Err(ApiError::InvalidRequest(format!(
                    "parameter `{}` is repeated",
                    name.chars().take(64).collect::<String>()
                )));
            }
            params.insert(name, decode(value)?);
        }
        Ok(Self(params))
    }

    /// A parameter, `None` if absent or empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// A required, non-empty parameter.
    pub fn require(&self, name: &str) -> ApiResult<&str> {
        self.get(name)
            .ok_or_else(|| ApiError::InvalidRequest(format!("parameter `{name}` is required")))
    }
}

impl<S: Send + Sync> FromRequest<S> for Form {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> ApiResult<Self> {
        if !content_type_is(req.headers(), "application/x-www-form-urlencoded") {
            return Err(ApiError::UnsupportedMediaType(
                "application/x-www-form-urlencoded",
            ));
        }
        let bytes = read_body(req.into_body(), FORM_LIMIT).await?;
        Self::parse(&bytes)
    }
}
