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
    jar.store_response_cookies(cookies, url);
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

/// The `Cookie` the upstream gets for `url`: each of the human's vaulted cookies (`vaulted`, a
/// `Cookie` value), unless the upstream set one of that name since (a rotated session), then
/// the jar's other cookies. Also returns the human's session as it now stands, the vaulted
/// cookies with their current values, which an answer must never echo.
pub(crate) fn cookie_header(
    vaulted: Option<&str>,
    jar: &CookieStore,
    url: &Url,
) -> (Option<String>, Option<String>) {
    let from_jar: Vec<(&str, &str)> = jar.get_request_values(url).collect();
    let mut sent = Vec::new();
    let mut session = Vec::new();
    for pair in vaulted.into_iter().flat_map(|v| v.split(';')) {
        let pair = pair.trim();
        if pair.is_empty() {
            continue;
        }
        let name = pair.split_once('=').map_or(pair, |(name, _)| name).trim();
        let current = match from_jar.iter().find(|(n, _)| *n == name) {
            Some((n, v)) => format!("{n}={v}"),
            None => pair.to_owned(),
        };
        session.push(current.clone());
        sent.push(current);
    }
    for (name, value) in &from_jar {
        let vaulted_name = session
            .iter()
            .any(|pair| pair.split_once('=').is_some_and(|(n, _)| n == *name));
        if !vaulted_name {
            sent.push(format!("{name}={value}"));
        }
    }
    let join = |pairs: Vec<String>| (!pairs.is_empty()).then(|| pairs.join("; "));
    (join(sent), join(session))
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
        let (sent, session) = cookie_header(Some("sid=OLD; lang=en"), &jar, &url);
        let sent = sent.unwrap();
        assert!(sent.contains("sid=NEW") && !sent.contains("OLD"), "{sent}");
        assert!(
            sent.contains("lang=en") && sent.contains("theme=dark"),
            "{sent}"
        );
        assert_eq!(session.as_deref(), Some("sid=NEW; lang=en"));
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
        let values = |url: &str| {
            let (sent, _) = cookie_header(None, &jar, &Url::parse(url).unwrap());
            sent.unwrap_or_default()
        };
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
    fn a_jar_round_trips_through_its_stored_form_with_session_cookies() {
        let jar = jar_with("https://portal.example/", &["sid=S; Path=/; HttpOnly"]);
        let mut json = Vec::new();
        cookie_store::serde::json::save_incl_expired_and_nonpersistent(&jar, &mut json).unwrap();
        let back = cookie_store::serde::json::load_all(json.as_slice()).unwrap();
        let url = Url::parse("https://portal.example/x").unwrap();
        assert_eq!(cookie_header(None, &back, &url).0.as_deref(), Some("sid=S"));
    }
}
