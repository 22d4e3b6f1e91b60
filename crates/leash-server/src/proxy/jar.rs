//! A grant's cookie jar (API §16): the cookies an upstream sets in answers to the forward
//! proxy. The browser never gets them (`Set-Cookie` is stripped, as at the gateway), so Leash
//! keeps them for the grant and sends them on, with the human's vaulted cookie, following RFC
//! 6265's domain, path, `Secure` and expiry rules (the `cookie_store` crate) for the URL Leash
//! actually requests: the upstream's configured one. A jar is sealed at rest under the master
//! key, one per grant and upstream, never written to the vault, and deleted with its grant.

use cookie_store::{CookieStore, RawCookie};
use url::Url;

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// The longest cookie kept, its name and value together (RFC 6265bis §5.6: a longer one is
/// ignored, as browsers do).
const MAX_COOKIE_BYTES: usize = 4096;
/// The most cookies a jar keeps (browsers keep 180 per domain at most; a grant reaches one
/// upstream): more are ignored until some expire or are replaced.
const MAX_JAR_COOKIES: usize = 50;
/// The most bytes of names and values a jar keeps: all of them go in every request's `Cookie`,
/// which an upstream limits (8 KiB is common) like any header.
const MAX_JAR_BYTES: usize = 8192;

/// What a jar is sealed with: it opens only as this grant's jar for this upstream.
pub fn context(grant_id: &str, upstream: &str) -> Vec<u8> {
    format!("leash cookie jar {grant_id} {upstream}").into_bytes()
}

/// The grant's jar for `upstream`, empty if it has none yet.
pub(crate) async fn load(
    state: &AppState,
    grant_id: &str,
    upstream: &str,
) -> ApiResult<CookieStore> {
    let Some(sealed) = state.store.cookie_jar(grant_id, upstream).await? else {
        return Ok(CookieStore::default());
    };
    let json = state
        .master
        .open(&sealed, &context(grant_id, upstream))
        .map_err(|_| {
            ApiError::Unavailable("a cookie jar does not open under the master key".into())
        })?;
    cookie_store::serde::json::load_all(json.as_slice())
        .map_err(|e| ApiError::Unavailable(format!("a cookie jar does not read back: {e}")))
}

/// Adds the cookies of an answer from `url` to the grant's jar for `upstream` and stores it.
/// The jar is read again first: another request of the grant may have changed it meanwhile.
pub(crate) async fn store_set_cookies(
    state: &AppState,
    grant_id: &str,
    upstream: &str,
    url: &Url,
    set_cookies: &[axum::http::HeaderValue],
) -> ApiResult<()> {
    let mut jar = load(state, grant_id, upstream).await?;
    let cookies = set_cookies
        .iter()
        .filter_map(|value| value.to_str().ok())
        .filter_map(|value| RawCookie::parse(value.to_owned()).ok());
    let ignored = keep_within_limits(&mut jar, cookies, url);
    if ignored > 0 {
        tracing::warn!(grant = %grant_id, upstream = %upstream, ignored, "cookies over the jar's limits were ignored");
    }
    let mut json = Vec::new();
    cookie_store::serde::json::save_incl_expired_and_nonpersistent(&jar, &mut json)
        .map_err(|e| ApiError::Unavailable(format!("a cookie jar does not write: {e}")))?;
    let sealed = state.master.seal(&json, &context(grant_id, upstream))?;
    let now = state.clock.now();
    if !state
        .store
        .put_cookie_jar(grant_id, upstream, &sealed, now)
        .await?
    {
        tracing::info!(grant = %grant_id, "the grant ended: its upstream's cookies are not kept");
    }
    Ok(())
}

/// Stores `cookies` set by an answer from `url` in `jar`, one by one, ignoring a cookie larger
/// than [`MAX_COOKIE_BYTES`] and one that leaves the jar over [`MAX_JAR_COOKIES`] or
/// [`MAX_JAR_BYTES`] (a cookie replacing one of the same name, domain and path always fits
/// unless it grows the jar past them). Returns how many were ignored.
fn keep_within_limits(
    jar: &mut CookieStore,
    cookies: impl Iterator<Item = RawCookie<'static>>,
    url: &Url,
) -> usize {
    let over = |jar: &CookieStore| {
        let (count, bytes) = jar.iter_unexpired().fold((0, 0), |(count, bytes), kept| {
            (count + 1, bytes + kept.name().len() + kept.value().len())
        });
        count > MAX_JAR_COOKIES || bytes > MAX_JAR_BYTES
    };
    let mut ignored = 0;
    for cookie in cookies {
        if cookie.name().len() + cookie.value().len() > MAX_COOKIE_BYTES {
            ignored += 1;
            continue;
        }
        let before = jar.clone();
        jar.store_response_cookies(std::iter::once(cookie), url);
        if over(jar) {
            *jar = before;
            ignored += 1;
        }
    }
    ignored
}

/// The `Cookie` the upstream gets for `url`: each of the human's vaulted cookies (`vaulted`, a
/// `Cookie` value), unless the upstream set one of that name since (a rotated session), then
/// the jar's other cookies.
pub(crate) fn cookie_header(vaulted: Option<&str>, jar: &CookieStore, url: &Url) -> Option<String> {
    let from_jar: Vec<(&str, &str)> = jar.get_request_values(url).collect();
    let mut sent: Vec<String> = Vec::new();
    let mut vaulted_names = Vec::new();
    for pair in vaulted.into_iter().flat_map(|v| v.split(';')) {
        let pair = pair.trim();
        if pair.is_empty() {
            continue;
        }
        let name = pair.split_once('=').map_or(pair, |(name, _)| name).trim();
        vaulted_names.push(name);
        match from_jar.iter().find(|(n, _)| *n == name) {
            Some((n, v)) => sent.push(format!("{n}={v}")),
            None => sent.push(pair.to_owned()),
        }
    }
    for (name, value) in &from_jar {
        if !vaulted_names.contains(name) {
            sent.push(format!("{name}={value}"));
        }
    }
    (!sent.is_empty()).then(|| sent.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jar_with(url: &str, set_cookies: &[&str]) -> CookieStore {
        let mut jar = CookieStore::default();
        let url = Url::parse(url).unwrap();
        let cookies = set_cookies
            .iter()
            .map(|c| RawCookie::parse((*c).to_owned()).unwrap());
        jar.store_response_cookies(cookies, &url);
        jar
    }

    #[test]
    fn a_rotated_session_replaces_the_vaulted_one_and_other_cookies_follow() {
        let url = Url::parse("https://portal.example/ledger/1").unwrap();
        let jar = jar_with(
            "https://portal.example/rotate",
            &["sid=NEW; Path=/; Secure; HttpOnly", "theme=dark; Path=/"],
        );
        let sent = cookie_header(Some("sid=OLD; lang=en"), &jar, &url).unwrap();
        assert!(sent.contains("sid=NEW") && !sent.contains("OLD"), "{sent}");
        assert!(
            sent.contains("lang=en") && sent.contains("theme=dark"),
            "{sent}"
        );
    }

    #[test]
    fn the_jar_follows_path_secure_domain_and_expiry_rules() {
        let jar = jar_with(
            "https://portal.example/app/",
            &[
                "scoped=1; Path=/app",
                "secure=1; Secure; Path=/",
                "gone=1; Path=/; Max-Age=0",
                "elsewhere=1; Domain=other.example; Path=/",
            ],
        );
        let values =
            |url: &str| cookie_header(None, &jar, &Url::parse(url).unwrap()).unwrap_or_default();
        let app = values("https://portal.example/app/x");
        assert!(
            app.contains("scoped=1") && app.contains("secure=1"),
            "{app}"
        );
        assert!(!app.contains("gone") && !app.contains("elsewhere"), "{app}");
        assert!(!values("https://portal.example/other").contains("scoped"));
        // A Secure cookie never goes over plain HTTP.
        assert!(!values("http://portal.example/app/x").contains("secure=1"));
        // Nor to another host.
        assert_eq!(values("https://evil.example/app/x"), "");
    }

    #[test]
    fn a_jar_keeps_to_its_limits_and_a_replacement_always_fits() {
        let url = Url::parse("https://portal.example/").unwrap();
        let mut jar = CookieStore::default();
        let parse = |text: String| RawCookie::parse(text).unwrap();
        let huge = parse(format!("big={}", "x".repeat(MAX_COOKIE_BYTES)));
        assert_eq!(keep_within_limits(&mut jar, std::iter::once(huge), &url), 1);
        let many = (0..MAX_JAR_COOKIES + 10).map(|i| parse(format!("c{i}=v")));
        assert_eq!(keep_within_limits(&mut jar, many, &url), 10);
        assert_eq!(jar.iter_unexpired().count(), MAX_JAR_COOKIES);
        // Full, a cookie of a name it holds still replaces it (a rotated session).
        let rotated = parse("c0=rotated".to_owned());
        assert_eq!(
            keep_within_limits(&mut jar, std::iter::once(rotated), &url),
            0
        );
        let sent = cookie_header(None, &jar, &url).unwrap();
        assert!(sent.contains("c0=rotated"), "{sent}");
        // Bytes: a few large cookies fill it before the count does.
        let mut jar = CookieStore::default();
        let large = (0..5).map(|i| parse(format!("l{i}={}", "y".repeat(3000))));
        assert_eq!(keep_within_limits(&mut jar, large, &url), 3);
    }

    #[test]
    fn a_jar_round_trips_through_its_stored_form_with_session_cookies() {
        let jar = jar_with("https://portal.example/", &["sid=S; Path=/; HttpOnly"]);
        let mut json = Vec::new();
        cookie_store::serde::json::save_incl_expired_and_nonpersistent(&jar, &mut json).unwrap();
        let back = cookie_store::serde::json::load_all(json.as_slice()).unwrap();
        let url = Url::parse("https://portal.example/x").unwrap();
        assert_eq!(cookie_header(None, &back, &url).as_deref(), Some("sid=S"));
    }
}
