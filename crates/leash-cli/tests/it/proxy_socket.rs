//! WebSockets through the forward proxy (API §16): refused unless the route allows one; where
//! it does, the socket is judged and audited as one request of the route's action, the
//! upstream gets the human's session and the browser never does, an upstream message echoing
//! the session closes the socket, and so does the end of the grant.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use reqwest::Method;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::audit::audit;
use super::proxy_tunnel::{SESSION, opened};

/// The portal with a live feed a WebSocket may be opened on, and a page that may not.
fn config(url: &str) -> String {
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
[[upstream]]
name = "portal"
url = "{url}"
hosts = ["portal.test"]
[[upstream.route]]
method = "GET"
path = "/live"
action = "portal:live"
websocket = true
[[upstream.route]]
method = "GET"
path = "/**"
action = "portal:read"
"#
    )
}

/// What the WebSocket upstream saw of a handshake.
#[derive(Clone, Debug)]
struct Handshake {
    cookie: String,
    extensions: Option<String>,
}

/// Every handshake the WebSocket upstream saw.
#[derive(Default, Clone)]
struct Seen(Arc<Mutex<Vec<Handshake>>>);

/// A WebSocket upstream: it sets a cookie in its `101`, answers `echo-cookie` with the cookie
/// it was sent and closes on `close-with-cookie` giving it as the reason (a hostile app), and
/// answers every other text with `upstream: <text>`.
async fn socket_upstream() -> (String, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Seen::default();
    let recorded = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let recorded = recorded.clone();
            tokio::spawn(async move {
                let cookie = Arc::new(Mutex::new(String::new()));
                let kept = Arc::clone(&cookie);
                #[allow(
                    clippy::result_large_err,
                    reason = "tungstenite's callback type: its error is an HTTP answer"
                )]
                let callback = move |request: &Request, mut response: Response| {
                    let header = |name: &str| {
                        request
                            .headers()
                            .get(name)
                            .map(|v| v.to_str().unwrap().to_owned())
                    };
                    let sent = header("cookie").unwrap_or_default();
                    *kept.lock().unwrap() = sent.clone();
                    recorded.0.lock().unwrap().push(Handshake {
                        cookie: sent,
                        extensions: header("sec-websocket-extensions"),
                    });
                    response.headers_mut().append(
                        "set-cookie",
                        "feed_session=upstream-set-0123456789; Path=/"
                            .parse()
                            .unwrap(),
                    );
                    Ok(response)
                };
                let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(stream, callback).await
                else {
                    return;
                };
                while let Some(Ok(message)) = socket.next().await {
                    let answer = match message {
                        Message::Text(text) if text.as_str() == "echo-cookie" => {
                            cookie.lock().unwrap().clone()
                        }
                        Message::Text(text) if text.as_str() == "close-with-cookie" => {
                            let reason = cookie.lock().unwrap().clone();
                            let frame = CloseFrame {
                                code: CloseCode::Normal,
                                reason: reason.into(),
                            };
                            let _ = socket.close(Some(frame)).await;
                            return;
                        }
                        Message::Text(text) => format!("upstream: {}", text.as_str()),
                        _ => continue,
                    };
                    if socket.send(Message::text(answer)).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, seen)
}

type Browser =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A browser's WebSocket to `https://portal.test{path}` through the proxy: `CONNECT` with the
/// credential, TLS trusting only the proxy CA (HTTP/1.1, as browsers open WebSockets), then the
/// handshake, offering compression. The handshake's answer if it was refused.
async fn open(
    proxy: &str,
    credential: &str,
    ca: &str,
    path: &str,
) -> Result<
    (
        Browser,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    u16,
> {
    use base64::Engine as _;
    let mut tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("leash:{credential}"));
    tcp.write_all(
        format!(
            "CONNECT portal.test:443 HTTP/1.1\r\nHost: portal.test:443\r\nProxy-Authorization: Basic {basic}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(tcp.read(&mut byte).await.unwrap(), 1, "the proxy hung up");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head[9..12].parse().unwrap());
    }
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect("portal.test".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let mut request = format!("wss://portal.test{path}")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "sec-websocket-extensions",
        "permessage-deflate; client_max_window_bits"
            .parse()
            .unwrap(),
    );
    request
        .headers_mut()
        .insert("cookie", "planted=by-the-page".parse().unwrap());
    match tokio_tungstenite::client_async(request, tls).await {
        Ok(opened) => Ok(opened),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("the handshake failed: {e}"),
    }
}

/// The next text the browser gets, or the close frame's code.
async fn next(browser: &mut Browser) -> Result<String, Option<CloseCode>> {
    let message = tokio::time::timeout(Duration::from_secs(5), browser.next())
        .await
        .expect("the socket answered within 5 s");
    match message {
        Some(Ok(Message::Text(text))) => Ok(text.as_str().to_owned()),
        Some(Ok(Message::Close(frame))) => Err(frame.map(|f| f.code)),
        other => panic!("unexpected: {other:?}"),
    }
}

#[tokio::test]
async fn a_websocket_opens_only_where_its_route_allows_and_never_carries_the_session_to_the_browser()
 {
    let (url, seen) = socket_upstream().await;
    let (gw, proxy, credential, ca) =
        opened(&config(&url), &url, &["portal:live", "portal:read"]).await;

    // A route without `websocket = true`: refused before the upstream hears of it.
    assert_eq!(
        open(&proxy, &credential, &ca, "/other").await.err(),
        Some(403)
    );
    assert!(seen.0.lock().unwrap().is_empty());

    let (mut browser, answer) = open(&proxy, &credential, &ca, "/live").await.unwrap();
    assert!(
        answer.headers().get("set-cookie").is_none(),
        "the upstream's cookie never reaches the browser"
    );
    assert!(answer.headers().get("sec-websocket-extensions").is_none());
    let handshakes = seen.0.lock().unwrap().clone();
    assert_eq!(handshakes.len(), 1);
    let Handshake { cookie, extensions } = &handshakes[0];
    assert_eq!(
        cookie, SESSION,
        "the human's session, not the page's cookie"
    );
    assert_eq!(
        extensions, &None,
        "no compression offered: every message can be checked"
    );

    browser.send(Message::text("hello")).await.unwrap();
    assert_eq!(next(&mut browser).await, Ok("upstream: hello".to_owned()));
    browser.send(Message::text("again")).await.unwrap();
    assert_eq!(next(&mut browser).await, Ok("upstream: again".to_owned()));

    // The upstream's cookie went to the jar: the next socket carries it to the upstream.
    let (mut second, _) = open(&proxy, &credential, &ca, "/live").await.unwrap();
    let cookie = seen.0.lock().unwrap()[1].cookie.clone();
    assert!(cookie.contains(SESSION), "{cookie}");
    assert!(
        cookie.contains("feed_session=upstream-set-0123456789"),
        "{cookie}"
    );

    // An upstream echoing the session: the message is not passed on, the socket is closed.
    second.send(Message::text("echo-cookie")).await.unwrap();
    assert_eq!(next(&mut second).await, Err(Some(CloseCode::Policy)));

    // Nor in the reason of the upstream's close.
    let (mut third, _) = open(&proxy, &credential, &ca, "/live").await.unwrap();
    third
        .send(Message::text("close-with-cookie"))
        .await
        .unwrap();
    assert_eq!(next(&mut third).await, Err(Some(CloseCode::Policy)));

    // Audited: three sockets opened as requests of the route's action, two echoes refused.
    let (_, events) = audit(&gw.leash, &gw.s.user_key, "").await;
    let of = |decision: &str| -> Vec<&Value> {
        events
            .iter()
            .filter(|e| e["kind"] == "gateway.request" && e["decision"] == decision)
            .collect()
    };
    let opened_events = of("allow");
    assert_eq!(opened_events.len(), 3, "{events:?}");
    for event in opened_events {
        assert_eq!(event["action"], "portal:live");
        assert_eq!(event["via"], "proxy");
        assert_eq!(event["path"], "/live");
    }
    let denied = of("deny");
    assert_eq!(
        denied
            .iter()
            .filter(|e| e["reason"] == "credential_reflected")
            .count(),
        2,
        "{denied:?}"
    );
    assert!(
        denied
            .iter()
            .any(|e| e["path"] == "/other" && e["action"] == "portal:read"),
        "the refused socket is audited: {denied:?}"
    );
    let text = serde_json::to_string(&events).unwrap();
    assert!(
        !text.contains("human-portal-session"),
        "no secret in the audit"
    );

    // The first socket still works; completing the task closes it without a message sent.
    browser.send(Message::text("still here")).await.unwrap();
    assert_eq!(
        next(&mut browser).await,
        Ok("upstream: still here".to_owned())
    );
    let (status, body) = gw
        .leash
        .call(
            Method::POST,
            &format!("/v1/grants/{}/complete", gw.s.grant_id()),
            &gw.s.user_key,
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let closed = tokio::time::Instant::now();
    assert_eq!(next(&mut browser).await, Err(Some(CloseCode::Policy)));
    assert!(
        closed.elapsed() < Duration::from_secs(3),
        "closed within the liveness check: {:?}",
        closed.elapsed()
    );
    assert_eq!(
        open(&proxy, &credential, &ca, "/live").await.err(),
        Some(407)
    );
}
