//! The credential header fields, parsed strictly: `Authorization` (one, `scheme SP
//! credentials`, one credential) and `DPoP` (at most one), as visible ASCII.

use axum::http::{HeaderMap, HeaderValue, header};

use crate::error::{ApiError, ApiResult};

/// A header value as text if it is visible ASCII (or tab), as `HeaderValue::to_str` decides.
/// Written as one pass without an early exit, which the compiler vectorises: the gateway reads
/// two values of hundreds of bytes (token and proof) on every request, and `to_str` checks them
/// a byte at a time.
fn header_text(value: &HeaderValue) -> Option<&str> {
    let bytes = value.as_bytes();
    let visible = bytes.iter().fold(true, |ok, &b| {
        ok & ((b' '..=b'~').contains(&b) | (b == b'\t'))
    });
    if visible {
        std::str::from_utf8(bytes).ok()
    } else {
        None
    }
}

/// The scheme of an `Authorization` header, compared without regard to case (RFC 9110 §11.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthScheme {
    /// `Bearer`: an API key.
    Bearer,
    /// `DPoP`: a DPoP-bound access token.
    Dpop,
    /// Any other scheme.
    Other,
}

/// The `Authorization` header split into scheme and credentials; more than one header, or a
/// value that is not `scheme SP credentials`, is `invalid_request`.
pub fn authorization(headers: &HeaderMap) -> ApiResult<Option<(AuthScheme, &str)>> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::InvalidRequest(
            "more than one Authorization header".into(),
        ));
    }
    let text = header_text(value)
        .ok_or_else(|| ApiError::InvalidRequest("Authorization header is not ASCII".into()))?;
    let (scheme, credentials) = text.split_once(' ').ok_or_else(|| {
        ApiError::InvalidRequest("Authorization must be `scheme credentials`".into())
    })?;
    let credentials = credentials.trim();
    // memchr's vectorised search: a token is hundreds of bytes (`str::contains` with a set of
    // chars decodes each one).
    let separated = memchr::memchr2(b' ', b',', credentials.as_bytes()).is_some();
    if credentials.is_empty() || separated {
        return Err(ApiError::InvalidRequest(
            "Authorization carries more than one credential".into(),
        ));
    }
    let scheme = if scheme.eq_ignore_ascii_case("bearer") {
        AuthScheme::Bearer
    } else if scheme.eq_ignore_ascii_case("dpop") {
        AuthScheme::Dpop
    } else {
        AuthScheme::Other
    };
    Ok(Some((scheme, credentials)))
}

/// The one `DPoP` header of a request, if any. More than one, or a non-ASCII value, is a
/// problem the caller answers in its own terms (token endpoint or resource).
pub fn single_dpop_header(headers: &HeaderMap) -> Result<Option<&str>, DpopHeaderError> {
    let mut values = headers.get_all("dpop").iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(DpopHeaderError::Repeated);
    }
    header_text(first)
        .map(Some)
        .ok_or(DpopHeaderError::NotAscii)
}

/// What is wrong with a request's `DPoP` header field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DpopHeaderError {
    /// More than one `DPoP` header.
    #[error("more than one DPoP header")]
    Repeated,
    /// A value that is not visible ASCII.
    #[error("dpop proof is not ASCII")]
    NotAscii,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_text_accepts_exactly_what_to_str_accepts() {
        for byte in 0..=u8::MAX {
            for at in [0, 1, 40] {
                let mut bytes = b"DPoP eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ1c3JfMSJ9.c2ln".to_vec();
                bytes[at] = byte;
                let Ok(value) = HeaderValue::from_bytes(&bytes) else {
                    continue;
                };
                assert_eq!(
                    header_text(&value),
                    value.to_str().ok(),
                    "byte {byte} at {at}"
                );
            }
        }
    }

    #[test]
    fn authorization_splits_scheme_and_one_credential() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            authorization(&headers)
                .map(|found| found.map(|(scheme, credentials)| (scheme, credentials.to_owned())))
                .map_err(|e| e.to_string())
        };
        let found = |scheme, credentials: &str| Ok(Some((scheme, credentials.to_owned())));
        assert_eq!(with("DPoP abc.def"), found(AuthScheme::Dpop, "abc.def"));
        assert_eq!(with("bearer  lsk_1 "), found(AuthScheme::Bearer, "lsk_1"));
        assert_eq!(with("Basic dXNlcg=="), found(AuthScheme::Other, "dXNlcg=="));
        for bad in ["DPoP", "DPoP a b", "Bearer a,b", "Bearer  "] {
            assert!(with(bad).is_err(), "{bad}");
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_bytes(b"DPoP \xc3\xa9").unwrap(),
        );
        assert!(authorization(&headers).is_err());
        assert!(matches!(authorization(&HeaderMap::new()), Ok(None)));
    }
}
