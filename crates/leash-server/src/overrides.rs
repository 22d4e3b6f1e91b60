//! What a caller could use to make an upstream act on another method, URL or client address
//! than the one policy judged (API §6): override headers, which the gateway drops, and
//! `_method` parameters in the query or a form body, which it refuses.

use axum::http::{HeaderMap, HeaderName, Method, header};

use crate::error::{ApiError, ApiResult};

/// Caller headers that servers and frameworks take as the request's real method, URL or client
/// address (API §6). Never forwarded; a proxy calling `/v1/authorize` must drop them too.
pub const OVERRIDE_HEADERS: &[&str] = &[
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
    "x-original-method",
    "x-real-ip",
    "true-client-ip",
];

/// Whether `name` is one of [`OVERRIDE_HEADERS`] or of their families (`X-Original-*`,
/// `X-Rewrite-*`, `X-Envoy-Original-*`), which servers keep extending (nginx's
/// `X-Original-URI`, Envoy's `X-Envoy-Original-Path`).
pub fn is_override_header(name: &HeaderName) -> bool {
    let name = name.as_str();
    OVERRIDE_HEADERS.contains(&name)
        || name.starts_with("x-original-")
        || name.starts_with("x-rewrite-")
        || name.starts_with("x-envoy-original-")
}

fn method_parameter() -> ApiError {
    ApiError::InvalidRequest(
        "a _method parameter is not accepted: the request's method is the one it was sent with"
            .into(),
    )
}

/// Whether a parameter `name` (decoded) is `_method` to some framework. PHP drops leading
/// spaces and turns spaces, dots and `[` into `_` (` method`, `.method`); `_method[]` and
/// other cases of it are the same parameter to some. Matching a little more than needed is
/// the safe side.
fn names_method(name: &str) -> bool {
    let folds_to_method = |name: &str| {
        let folded: String = name
            .chars()
            .take("_method".len())
            .map(|c| match c {
                ' ' | '.' | '[' => '_',
                c => c.to_ascii_lowercase(),
            })
            .collect();
        folded == "_method"
    };
    folds_to_method(name) || folds_to_method(name.trim_start())
}

/// Refuses a query or `application/x-www-form-urlencoded` body with a `_method` parameter.
/// `;` separates parameters as `&` does for some parsers, and a name is also checked decoded
/// twice, for an upstream that decodes again.
pub fn refuse_method_parameter(encoded: &[u8]) -> ApiResult<()> {
    for pair in encoded.split(|b| matches!(b, b'&' | b';')) {
        let name = pair.split(|b| *b == b'=').next().unwrap_or_default();
        let Some((once, _)) = url::form_urlencoded::parse(name).next() else {
            continue;
        };
        let twice = percent_encoding::percent_decode_str(&once).decode_utf8_lossy();
        if names_method(&once) || names_method(&twice) {
            return Err(method_parameter());
        }
    }
    Ok(())
}

/// Refuses a `multipart/form-data` body with a part named `_method`. Instead of parsing with
/// one idea of the boundary, every line of every header block (from a line starting with `--`
/// to the next empty line) is searched, percent-decoded and in any case: parsers differ on
/// boundaries, quoting and escapes, and one that reads a superset cannot be out-parsed. RFC 2231
/// names (`name*=`, split as `name*0=`, `name*1=`) are refused outright.
fn refuse_multipart_method(body: &[u8]) -> ApiResult<()> {
    let mut in_headers = false;
    for line in body.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(|b| *b == b'\r') {
            in_headers = false;
            continue;
        }
        if line.starts_with(b"--") {
            in_headers = true;
            continue;
        }
        if !in_headers {
            continue;
        }
        let decoded = percent_encoding::percent_decode(line).collect::<Vec<u8>>();
        let decoded = String::from_utf8_lossy(&decoded).to_ascii_lowercase();
        if decoded.contains("_method") {
            return Err(method_parameter());
        }
        let extended_name = decoded.match_indices("name*").any(|(at, _)| {
            !decoded[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric())
        });
        if extended_name {
            return Err(ApiError::InvalidRequest(
                "form-data part names must not use RFC 2231 parameters (name*=)".into(),
            ));
        }
    }
    Ok(())
}

/// Which form a request body is, for the `_method` check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormBody {
    /// Neither: the body streams as it is.
    Other,
    /// `application/x-www-form-urlencoded`, or a `POST` without `Content-Type` (Rack parses
    /// that body as a form).
    UrlEncoded,
    /// `multipart/form-data`.
    Multipart,
}

/// Classifies the body of a `method` request by its `Content-Type`. More than one
/// `Content-Type`, or an encoded form (`Content-Encoding`), could be read differently upstream
/// than here: refused.
pub fn form_body(method: &Method, headers: &HeaderMap) -> ApiResult<FormBody> {
    let mut types = headers.get_all(header::CONTENT_TYPE).iter();
    let kind = match (types.next(), types.next()) {
        (None, _) if *method == Method::POST => FormBody::UrlEncoded,
        (None, _) => FormBody::Other,
        (Some(_), Some(_)) => {
            return Err(ApiError::InvalidRequest(
                "a request may carry one Content-Type".into(),
            ));
        }
        (Some(value), None) => {
            // Rack's media type: up to the first `;` or `,`; an empty one on a POST is a form.
            let media = value
                .as_bytes()
                .split(|b| matches!(b, b';' | b','))
                .next()
                .unwrap_or_default()
                .trim_ascii()
                .to_ascii_lowercase();
            match media.as_slice() {
                b"application/x-www-form-urlencoded" => FormBody::UrlEncoded,
                b"multipart/form-data" => FormBody::Multipart,
                b"" if *method == Method::POST => FormBody::UrlEncoded,
                _ => FormBody::Other,
            }
        }
    };
    let encoded = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"identity"));
    if kind != FormBody::Other && encoded {
        return Err(ApiError::InvalidRequest(
            "a form body must not be sent with a Content-Encoding".into(),
        ));
    }
    Ok(kind)
}

/// Refuses a form `body` of `kind` with a `_method` field.
pub fn refuse_method_field(kind: FormBody, body: &[u8]) -> ApiResult<()> {
    match kind {
        FormBody::Other => Ok(()),
        FormBody::UrlEncoded => refuse_method_parameter(body),
        FormBody::Multipart => refuse_multipart_method(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_parameters_are_found_in_every_spelling() {
        for bad in [
            &b"_method=DELETE"[..],
            b"a=1&_method=DELETE",
            b"a=1;_method=DELETE",
            b"%5Fmethod=DELETE",
            b"%5fMETHOD=PUT",
            b"_method",
            b"_method[]=DELETE",
            b"+method=DELETE",
            b".method=DELETE",
            b"%255fmethod=DELETE",
            b"_Method=x",
        ] {
            assert!(
                refuse_method_parameter(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        for good in [
            &b""[..],
            b"a=_method",
            b"method=DELETE",
            b"x_method=1",
            b"q=%5Fmethod",
        ] {
            assert!(
                refuse_method_parameter(good).is_ok(),
                "{}",
                String::from_utf8_lossy(good)
            );
        }
    }

    #[test]
    fn method_parts_are_found_in_multipart_bodies() {
        let part = |disposition: &str| {
            format!("--XyZ\r\nContent-Disposition: {disposition}\r\n\r\nDELETE\r\n--XyZ--\r\n")
        };
        for bad in [
            part("form-data; name=\"_method\""),
            part("form-data; name=_method"),
            part("form-data; NAME=\"_METHOD\""),
            part("form-data; name=\"%5Fmethod\""),
            part("form-data; name*=UTF-8''%5Fmethod"),
            part("form-data; name*0=\"_me\"; name*1=\"thod\""),
            // LF line ends, a folded header, a boundary other than the declared one.
            "--b\nContent-Disposition: form-data;\n name=\"_method\"\n\nDELETE\n--b--\n".into(),
            "--other\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nx\r\n".into(),
        ] {
            assert!(refuse_multipart_method(bad.as_bytes()).is_err(), "{bad}");
        }
        for good in [
            part("form-data; name=\"method\""),
            part("form-data; name=\"file\"; filename*=UTF-8''r%C3%A9sum%C3%A9.txt"),
            // `_method` in a part's content is data, not a field name.
            "--b\r\nContent-Disposition: form-data; name=\"code\"\r\n\r\nreq._method = 1\r\n--b--\r\n"
                .into(),
        ] {
            assert!(refuse_multipart_method(good.as_bytes()).is_ok(), "{good}");
        }
    }

    #[test]
    fn form_bodies_are_told_by_their_content_type() {
        let kind = |pairs: &[(&str, &str)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                headers.append(
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    value.parse().unwrap(),
                );
            }
            form_body(&Method::POST, &headers)
        };
        assert_eq!(kind(&[]).unwrap(), FormBody::UrlEncoded);
        assert_eq!(
            form_body(&Method::PUT, &HeaderMap::new()).unwrap(),
            FormBody::Other
        );
        assert_eq!(
            kind(&[(
                "content-type",
                "Application/X-WWW-Form-Urlencoded; charset=utf-8"
            )])
            .unwrap(),
            FormBody::UrlEncoded
        );
        assert_eq!(
            kind(&[("content-type", "multipart/form-data; boundary=x")]).unwrap(),
            FormBody::Multipart
        );
        // As Rack reads them: an empty type on a POST is a form, and a comma ends the media
        // type as a semicolon does.
        assert_eq!(kind(&[("content-type", "")]).unwrap(), FormBody::UrlEncoded);
        assert_eq!(
            kind(&[(
                "content-type",
                "application/x-www-form-urlencoded, text/plain"
            )])
            .unwrap(),
            FormBody::UrlEncoded
        );
        assert_eq!(
            kind(&[("content-type", "application/json")]).unwrap(),
            FormBody::Other
        );
        assert!(
            kind(&[
                ("content-type", "application/json"),
                ("content-type", "application/x-www-form-urlencoded")
            ])
            .is_err()
        );
        assert!(
            kind(&[
                ("content-type", "application/x-www-form-urlencoded"),
                ("content-encoding", "gzip")
            ])
            .is_err()
        );
        assert_eq!(
            kind(&[
                ("content-type", "application/json"),
                ("content-encoding", "gzip")
            ])
            .unwrap(),
            FormBody::Other
        );
    }
}
