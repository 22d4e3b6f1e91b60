//! The forward proxy's listener (API §16): a client configured with Leash as its proxy and
//! trusting the proxy CA, as a browser is (reqwest here; a real Chromium in the Python suite),
//! reaches the upstream as the human through `CONNECT` tunnels Leash terminates, and through
//! plain `http://` requests; every request runs the gateway's steps.

use leash_core::client::AgentKey;
use leash_core::jws::Alg;
use leash_testkit::{Leash, RecordingUpstream, now};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::audit::audit;
use super::gateway::{Gw, grant, metric, scrape, setup_with};

const PROXY_CREDENTIAL: &str = "urn:leash:params:oauth:token-type:proxy-credential";
pub(super) const SESSION: &str = "sid=human-portal-session-0123456789";

/// A portal reached by browsers at `portal.test`, with a high-risk form.
pub(super) fn portal_config(url: &str) -> String {
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
approval_wait = 10
[[upstream]]
name = "portal"
url = "{url}"
hosts = ["portal.test", "www.portal.test"]
[[upstream.route]]
method = "POST"
path = "/transfer"
action = "portal:transfer"
risk = "high"
[[upstream.route]]
method = "GET"
path = "/**"
action = "portal:read"
"#
    )
}

/// A running proxy with a grant of `actions` on the portal, the human's session vaulted, and
/// the agent's proxy credential.
struct Portal {
    gw: Gw,
    upstream: RecordingUpstream,
    proxy: String,
    credential: String,
    ca: String,
}

impl Portal {
    async fn start(actions: &[&str]) -> Self {
        let upstream = RecordingUpstream::start().await;
        let (gw, proxy, credential, ca) =
            opened(&portal_config(&upstream.url), &upstream.url, actions).await;
        Self {
            gw,
            upstream,
            proxy,
            credential,
            ca,
        }
    }

    fn leash(&self) -> &Leash {
        &self.gw.leash
    }

    /// A client with Leash as its proxy, presenting the credential and trusting the proxy CA
    /// only; HTTP/2 where ALPN agrees (as browsers do) unless `http1_only`.
    fn browser_with(&self, http1_only: bool) -> reqwest::Client {
        browser(&self.proxy, &self.credential, &self.ca, http1_only)
    }

    fn browser(&self) -> reqwest::Client {
        self.browser_with(false)
    }

    /// The head of the proxy's answer to a raw `CONNECT target`, with `auth` as the
    /// `Proxy-Authorization` value if any.
    async fn connect(&self, target: &str, auth: Option<&str>) -> String {
        let mut stream = tokio::net::TcpStream::connect(&self.proxy).await.unwrap();
        let auth = auth.map_or(String::new(), |a| format!("Proxy-Authorization: {a}\r\n"));
        let head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&answer).into_owned()
    }

    fn basic(&self) -> String {
        use base64::Engine as _;
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("leash:{}", self.credential));
        format!("Basic {encoded}")
    }
}

/// A running proxy configured with `config` (its upstream at `url`), a grant of `actions` on
/// the portal, the human's session vaulted: the gateway, the proxy's address, the agent's
/// proxy credential and the proxy CA.
pub(super) async fn opened(
    config: &str,
    url: &str,
    actions: &[&str],
) -> (Gw, String, String, String) {
    let gw = setup_with(config, grant(actions, &["portal"], json!({})), Some(url)).await;
    let (status, body) = gw
        .leash
        .call(
            Method::PUT,
            "/v1/vault/portal",
            &gw.s.user_key,
            Some(json!({"kind": "cookie", "secret": SESSION})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let credential = proxy_credential(&gw).await;
    let proxy = gw.leash.proxy_addr().await;
    let ca = gw
        .leash
        .http()
        .get(format!("{}/v1/proxy/ca", gw.leash.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    (gw, proxy, credential, ca)
}

/// A client with the proxy at `proxy` presenting `credential`, trusting the proxy CA `ca`
/// only; HTTP/2 where ALPN agrees (as browsers do) unless `http1_only`.
pub(super) fn browser(
    proxy: &str,
    credential: &str,
    ca: &str,
    http1_only: bool,
) -> reqwest::Client {
    let proxy = reqwest::Proxy::all(format!("http://{proxy}"))
        .unwrap()
        .basic_auth("leash", credential);
    let builder = reqwest::Client::builder()
        .proxy(proxy)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
        .tls_built_in_root_certs(false);
    let builder = if http1_only {
        builder.http1_only()
    } else {
        builder
    };
    builder.build().unwrap()
}

/// The agent's proxy credential for its grant.
async fn proxy_credential(gw: &Gw) -> String {
    scenario_proxy_credential(&gw.leash, &gw.s).await
}

/// The proxy credential of scenario `s`'s grant, exchanged at `leash`.
pub(super) async fn scenario_proxy_credential(
    leash: &Leash,
    s: &leash_testkit::Scenario,
) -> String {
    let mut form = s.exchange_form(leash);
    form.push(("requested_token_type".into(), PROXY_CREDENTIAL.into()));
    let dpop = AgentKey::generate(Alg::EdDsa);
    let proof = dpop.dpop_proof("POST", &leash.token_url(), None, None, now());
    let (status, _, body) = s.exchange_raw(leash, &form, Some(proof)).await;
    assert_eq!(status, 200, "{body}");
    body["access_token"].as_str().unwrap().to_owned()
}

fn cookie_of(recorded: &leash_testkit::Recorded) -> String {
    recorded
        .headers
        .get("cookie")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_tunnel_reaches_the_upstream_as_the_human_and_the_browser_never_holds_a_cookie() {
    let portal = Portal::start(&["portal:read"]).await;
    let browser = portal.browser();

    let response = browser
        .get("https://portal.test/ledger/1?month=11")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.version(),
        reqwest::Version::HTTP_2,
        "ALPN chose h2"
    );
    assert!(
        response.headers().get("set-cookie").is_none(),
        "the upstream's cookie never reaches the browser"
    );
    let first = &portal.upstream.requests()[0];
    assert_eq!(first.target, "/ledger/1?month=11");
    assert_eq!(cookie_of(first), SESSION, "the human's vaulted session");
    assert!(first.headers.get("proxy-authorization").is_none());
    assert_eq!(first.headers["leash-subject"], portal.gw.s.user_id.as_str());
    assert_eq!(
        first.headers["leash-grant"],
        portal.gw.s.grant_id(),
        "attributed to the grant"
    );

    // The upstream set a cookie: the grant's jar sends it on, with the session.
    let response = browser
        .get("https://www.portal.test/ledger/2")
        .header("cookie", "planted=by-the-page")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let second = cookie_of(&portal.upstream.requests()[1]);
    assert!(second.contains(SESSION), "{second}");
    assert!(second.contains("upstream_session=secret"), "{second}");
    assert!(
        !second.contains("planted"),
        "the browser's own Cookie is dropped: {second}"
    );

    // Kept sealed: the stored jar does not show the cookie.
    assert_eq!(portal.leash().count_rows("cookie_jars").await, 1);
    let stored = portal
        .leash()
        .query_bytes("SELECT sealed FROM cookie_jars")
        .await;
    assert!(!stored.is_empty());
    assert!(!String::from_utf8_lossy(&stored).contains("upstream_session"));

    // Plain http:// goes the same way, to the configured upstream; HTTP/1.1 too.
    let response = portal
        .browser_with(true)
        .get("http://portal.test/ledger/3")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(portal.upstream.requests()[2].target, "/ledger/3");

    // Audited as delegated, via the proxy.
    let (_, events) = audit(portal.leash(), &portal.gw.s.user_key, "").await;
    let forwarded: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "gateway.request" && e["decision"] == "allow")
        .collect();
    assert_eq!(forwarded.len(), 3, "{events:?}");
    for event in forwarded {
        assert_eq!(event["via"], "proxy");
        assert_eq!(event["mode"], "delegated");
        assert_eq!(event["upstream"], "portal");
        assert_eq!(event["action"], "portal:read");
    }

    // Counted in `/metrics` as the proxy's, not the gateway's.
    let metrics = scrape(portal.leash()).await;
    for (series, count) in [
        (
            "leash_requests_total{surface=\"proxy\",decision=\"allow\"}",
            3.0,
        ),
        (
            "leash_request_duration_seconds_count{surface=\"proxy\"}",
            3.0,
        ),
        (
            "leash_requests_total{surface=\"gateway\",decision=\"allow\"}",
            0.0,
        ),
    ] {
        assert_eq!(metric(&metrics, series), count, "{series}");
    }
}

#[tokio::test]
async fn the_proxy_refuses_every_destination_and_request_the_grant_does_not_cover() {
    let portal = Portal::start(&["portal:read"]).await;

    // No credential, or one that is not Leash's: the challenge.
    for auth in [None, Some("Basic bGVhc2g6bHB4X2EuYg==")] {
        let head = portal.connect("portal.test:443", auth).await;
        assert!(head.starts_with("HTTP/1.1 407"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("proxy-authenticate: basic realm=\"leash\""),
            "{head}"
        );
    }
    // Hosts outside the grant, and another port.
    for target in ["example.org:443", "127.0.0.1:443", "portal.test:8443"] {
        let head = portal.connect(target, Some(&portal.basic())).await;
        assert!(head.starts_with("HTTP/1.1 403"), "{target}: {head}");
    }
    assert!(
        portal
            .connect("portal.test:443", Some(&portal.basic()))
            .await
            .starts_with("HTTP/1.1 200"),
    );

    // Inside the tunnel: an action outside the grant, a path no route names.
    let browser = portal.browser();
    let response = browser
        .post("https://portal.test/transfer")
        .body("amount=5")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["leash-decision"], "insufficient_scope");
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let response = browser
        .get("https://portal.test/a/..%2f..%2fadmin")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(portal.upstream.count(), 0, "nothing reached the upstream");

    // A WebSocket upgrade (HTTP/1.1) is refused.
    let response = portal
        .browser_with(true)
        .get("https://portal.test/live")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
    assert_eq!(portal.upstream.count(), 0);

    // Completing the task kills the credential at once, in the open tunnel and for new ones.
    assert_eq!(
        browser
            .get("https://portal.test/ledger/1")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let (status, body) = portal
        .leash()
        .call(
            Method::POST,
            &format!("/v1/grants/{}/complete", portal.gw.s.grant_id()),
            &portal.gw.s.user_key,
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let response = browser
        .get("https://portal.test/ledger/1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 407);
    assert_eq!(response.headers()["leash-decision"], "invalid_token");
    assert!(
        portal
            .connect("portal.test:443", Some(&portal.basic()))
            .await
            .starts_with("HTTP/1.1 407")
    );
    assert_eq!(portal.upstream.count(), 1);
    assert_eq!(
        portal.leash().count_rows("cookie_jars").await,
        0,
        "the grant's jar went with it"
    );
}

/// The pending approval of the portal's grant, once there is one.
async fn pending_approval(portal: &Portal) -> String {
    for _ in 0..100 {
        let (status, body) = portal
            .leash()
            .call(
                Method::GET,
                "/v1/approvals?status=pending",
                &portal.gw.s.user_key,
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        if let Some(id) = body["approvals"][0]["id"].as_str() {
            return id.to_owned();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("no approval was asked for");
}

#[tokio::test]
async fn a_high_risk_submit_waits_for_the_human_and_goes_through_once_or_shows_the_denial() {
    let portal = Portal::start(&["portal:read", "portal:transfer"]).await;
    let browser = portal.browser();
    let submit = |amount: &'static str| {
        let browser = browser.clone();
        tokio::spawn(async move {
            browser
                .post("https://portal.test/transfer")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(format!("amount={amount}"))
                .send()
                .await
                .unwrap()
        })
    };

    let held = submit("5");
    let approval = pending_approval(&portal).await;
    assert_eq!(portal.upstream.count(), 0, "held, not sent");
    let (status, body) = portal
        .leash()
        .call(
            Method::POST,
            &format!("/v1/approvals/{approval}/approve"),
            &portal.gw.s.user_key,
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let response = held.await.unwrap();
    assert_eq!(response.status(), 200);
    let sent = portal.upstream.requests();
    assert_eq!(sent.len(), 1, "sent once");
    assert_eq!(sent[0].method, "POST");
    assert_eq!(sent[0].body, b"amount=5");
    let (_, events) = audit(portal.leash(), &portal.gw.s.user_key, "").await;
    let spent = events
        .iter()
        .find(|e| e["kind"] == "gateway.request" && e["decision"] == "allow")
        .unwrap();
    assert_eq!(spent["action"], "portal:transfer");
    assert_eq!(spent["via"], "proxy");
    assert_eq!(spent["approver"], portal.gw.s.user_id.as_str());

    let held = submit("500");
    let approval = pending_approval(&portal).await;
    let (status, body) = portal
        .leash()
        .call(
            Method::POST,
            &format!("/v1/approvals/{approval}/deny"),
            &portal.gw.s.user_key,
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let response = held.await.unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["leash-decision"], "approval_required");
    let page = response.text().await.unwrap();
    assert!(page.contains("denied"), "{page}");
    assert_eq!(
        portal.upstream.count(),
        1,
        "the denied submit was never sent"
    );
}
