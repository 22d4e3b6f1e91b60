//! Limits (issue #8): per-caller rates answered with 429 and `Retry-After`, request heads and
//! gateway bodies over their limits, slow and idle clients, the connection cap, and the tables
//! that must stay bounded under a flood of unique `jti`s.

use std::time::Duration;

use futures::StreamExt as _;
use leash_core::client::AgentKey;
use leash_core::jws::Alg;
use leash_testkit::{ADMIN_KEY, AGENT, Leash, Scenario, form, now, read};
use reqwest::Method;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::bin;
use super::gateway::{Gw, grant, metric, scrape, setup, setup_with};

/// The `Retry-After` of a 429, checked to be whole seconds.
fn retry_after(headers: &reqwest::header::HeaderMap) -> u64 {
    let value = headers
        .get("retry-after")
        .expect("a 429 carries Retry-After")
        .to_str()
        .unwrap();
    let seconds: u64 = value.parse().expect("Retry-After is delay-seconds");
    assert!((1..=60).contains(&seconds), "Retry-After {seconds}");
    seconds
}

#[tokio::test]
async fn the_token_endpoint_limits_each_agent_and_forged_requests_use_none_of_its_allowance() {
    let leash = Leash::start(bin(), "[limits]\ntoken_rate = 1\ntoken_burst = 2\n").await;
    let s = Scenario::new(&leash).await;

    // Assertions signed with a key that is not the agent's name it all the same.
    let thief = AgentKey::generate(Alg::EdDsa);
    for _ in 0..4 {
        let mut form = s.exchange_form(&leash);
        form[4].1 = thief.client_assertion(AGENT, &leash.token_url(), now());
        let proof = thief.dpop_proof("POST", &leash.token_url(), None, None, now());
        let (status, _, body) = s.exchange_raw(&leash, &form, Some(proof)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("invalid_client"))
        );
    }

    for _ in 0..2 {
        s.token(&leash).await;
    }
    let dpop = AgentKey::generate(Alg::EdDsa);
    let proof = dpop.dpop_proof("POST", &leash.token_url(), None, None, now());
    let (status, headers, body) = s
        .exchange_raw(&leash, &s.exchange_form(&leash), Some(proof))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("rate_limited"))
    );
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("retry")
    );
    let wait = retry_after(&headers);

    // Another agent has its own allowance.
    let other = "spiffe://example.org/agent/other";
    let other_key = AgentKey::generate(Alg::EdDsa);
    leash.register_agent(other, &other_key).await;
    let other_grant = leash
        .create_grant(
            &s.user_key,
            json!({"agent": other, "purpose": "Other task", "upstreams": ["mail"],
                   "actions": ["mail:read"], "ttl_seconds": 600}),
        )
        .await;
    let assertion = other_key.client_assertion(other, &leash.token_url(), now());
    let body = form(&[
        ("grant_type", leash_core::token::TOKEN_EXCHANGE),
        ("subject_token", other_grant["handle"].as_str().unwrap()),
        ("subject_token_type", leash_core::token::GRANT_TOKEN_TYPE),
        ("client_assertion_type", leash_core::assertion::JWT_BEARER),
        ("client_assertion", &assertion),
    ]);
    let proof = other_key.dpop_proof("POST", &leash.token_url(), None, None, now());
    let (status, _, answer) = leash
        .post_form("/oauth2/token", body, &[("DPoP", proof)])
        .await;
    assert_eq!(status, 200, "{answer}");

    tokio::time::sleep(Duration::from_secs(wait)).await;
    s.token(&leash).await;
    assert_eq!(
        leash
            .metric("leash_rate_limited_total{endpoint=\"token\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn the_gateway_limits_each_caller_audits_the_refusal_and_forwards_nothing() {
    let gw = setup(
        "[limits]\ngateway_rate = 1\ngateway_burst = 3\n",
        grant(&["mail:read"], &["mail"], json!({})),
    )
    .await;
    for _ in 0..3 {
        let (status, _, body) = gw.call(Method::GET, "/gw/mail/messages/1", &[]).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, headers, body) = gw.call(Method::GET, "/gw/mail/messages/1", &[]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("rate_limited"))
    );
    let wait = retry_after(&headers);
    assert_eq!(
        gw.upstream.count(),
        3,
        "a limited request reached the upstream"
    );

    // A request that does not authenticate is refused for that, not counted against the agent.
    let url = format!("{}/gw/mail/messages/1", gw.leash.url);
    let (status, _, body) = read(
        gw.leash
            .http()
            .get(&url)
            .header("Authorization", "DPoP forged.token.here")
            .header("DPoP", gw.dpop.dpop_proof("GET", &url, None, None, now()))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_token"))
    );

    let (status, events) = super::audit::audit(&gw.leash, ADMIN_KEY, "?limit=100").await;
    assert_eq!(status, 200);
    let limited = events
        .iter()
        .filter(|e| e["reason"] == "rate_limited")
        .collect::<Vec<_>>();
    assert_eq!(limited.len(), 1, "{events:?}");
    assert_eq!(limited[0]["actor"], AGENT);
    assert_eq!(limited[0]["decision"], "deny");

    tokio::time::sleep(Duration::from_secs(wait)).await;
    let (status, _, body) = gw.call(Method::GET, "/gw/mail/messages/1", &[]).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn request_heads_over_the_limits_are_refused_and_the_server_keeps_serving() {
    let leash = Leash::start(bin(), "").await;
    let url = format!("{}/v1/users", leash.url);

    let mut many = leash.http().get(&url);
    for i in 0..70 {
        many = many.header(format!("x-filler-{i}"), "1");
    }
    let (status, _, body) = read(many.send().await.unwrap()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (431, Some("invalid_request"))
    );
    assert!(body["error_description"].as_str().unwrap().contains("64"));
    // Refused before its body was read, a request with a body ends its connection (a client
    // would otherwise send its next request into a connection hyper is closing); one without
    // a body keeps it.
    let mut many_with_body = leash.http().post(&url).body("{}");
    for i in 0..70 {
        many_with_body = many_with_body.header(format!("x-filler-{i}"), "1");
    }
    let (status, headers, _) = read(many_with_body.send().await.unwrap()).await;
    assert_eq!(status, 431);
    assert_eq!(
        headers.get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    let mut many_without_body = leash.http().get(&url);
    for i in 0..70 {
        many_without_body = many_without_body.header(format!("x-filler-{i}"), "1");
    }
    let (status, headers, _) = read(many_without_body.send().await.unwrap()).await;
    assert_eq!(status, 431);
    assert!(headers.get("connection").is_none(), "{headers:?}");

    let big = "a".repeat(20 * 1024);
    let (status, _, body) = read(
        leash
            .http()
            .get(&url)
            .header("x-filler", &big)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (431, Some("invalid_request"))
    );

    // Far over the limit, the connection's own parser refuses before buffering it all.
    let huge = "a".repeat(200 * 1024);
    let response = reqwest::Client::new()
        .get(&url)
        .header("x-filler", &huge)
        .send()
        .await;
    if let Ok(response) = response {
        assert_eq!(response.status().as_u16(), 431);
    }

    assert_eq!(health(&leash).await, 200);
}

/// The status of `GET /healthz` over a new request.
async fn health(leash: &Leash) -> u16 {
    let response = leash
        .http()
        .get(format!("{}/healthz", leash.url))
        .send()
        .await
        .unwrap();
    read(response).await.0
}

/// Reads until the server closes the connection; `None` if it stayed open for `wait`.
async fn until_closed(stream: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    tokio::time::timeout(wait, stream.read_to_end(&mut got))
        .await
        .ok()
        .map(|_| got)
}

#[tokio::test]
async fn a_slow_client_and_an_idle_connection_are_closed_after_the_header_timeout() {
    let leash = Leash::start(bin(), "[limits]\nheader_read_timeout = 1\n").await;
    let addr = leash.url.trim_start_matches("http://").to_owned();

    let mut slow = TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let got = until_closed(&mut slow, Duration::from_secs(10))
        .await
        .expect("a client that never finishes its head is cut off");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(!String::from_utf8_lossy(&got).contains("200 OK"));

    let mut idle = TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = until_closed(&mut idle, Duration::from_secs(10))
        .await
        .expect("an idle kept-alive connection is closed");
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));

    // One that sends nothing at all (hyper would wait for ever to tell HTTP/1 from HTTP/2).
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    let started = std::time::Instant::now();
    let got = until_closed(&mut silent, Duration::from_secs(10))
        .await
        .expect("a connection that sends nothing is closed");
    assert!(got.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[tokio::test]
async fn connections_over_the_cap_wait_until_one_closes() {
    let leash = Leash::start(
        bin(),
        "[limits]\nmax_connections = 2\nmax_connections_per_address = 2\n",
    )
    .await;
    let addr = leash.url.trim_start_matches("http://").to_owned();
    let first = TcpStream::connect(&addr).await.unwrap();
    let _second = TcpStream::connect(&addr).await.unwrap();
    let health = format!("{}/healthz", leash.url);

    let waiting = reqwest::Client::new()
        .get(&health)
        .timeout(Duration::from_millis(800))
        .send()
        .await;
    assert!(
        waiting.is_err(),
        "a third connection was served beside two open ones"
    );

    drop(first);
    let response = reqwest::Client::new()
        .get(&health)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("served once a connection closed");
    assert_eq!(response.status().as_u16(), 200);
}

/// A burst of connects while the server accepts none (here: at `max_connections`) waits in the
/// kernel's accept queue. With the standard library's queue of 128, the SYNs past it were
/// dropped, and a client sends a dropped SYN again only after a second (seen in the load bench
/// as thousands of connects refused in a burst of reconnects).
#[tokio::test]
async fn a_burst_of_connections_over_the_cap_waits_in_the_backlog_instead_of_being_dropped() {
    const BURST: usize = 400;
    let leash = Leash::start(bin(), "[limits]\nmax_connections = 1\n").await;
    let addr = leash.url.trim_start_matches("http://").to_owned();
    let _served = TcpStream::connect(&addr).await.unwrap();

    let connects: Vec<_> = (0..BURST)
        .map(|_| {
            let addr = addr.clone();
            // Past the client's SYN retries at 1 s and 3 s: a dropped SYN finds the queue as
            // full as before, so only the queue's length decides.
            tokio::spawn(tokio::time::timeout(
                Duration::from_millis(3500),
                TcpStream::connect(addr),
            ))
        })
        .collect();
    let mut queued = Vec::new();
    for connect in connects {
        if let Ok(Ok(stream)) = connect.await.unwrap() {
            queued.push(stream);
        }
    }
    assert_eq!(
        queued.len(),
        BURST,
        "connects past the accept queue were dropped"
    );
}

#[tokio::test]
async fn gateway_bodies_over_the_limit_are_413_and_never_reach_the_upstream_whole() {
    let gw = setup(
        "[limits]\ngateway_body_bytes = 1024\ntoken_rate = 0\ngateway_rate = 0\n",
        grant(&["mail:draft"], &["mail"], json!({})),
    )
    .await;
    let send = |body: reqwest::Body| gw.request(Method::POST, "/gw/mail/drafts").body(body);

    let (status, _, body) = read(send(vec![b'x'; 2000].into()).send().await.unwrap()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (413, Some("invalid_request"))
    );
    assert_eq!(gw.upstream.count(), 0);

    let (status, _, body) = read(send(vec![b'x'; 1000].into()).send().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(gw.upstream.count(), 1);

    // Without a declared length the body streams until the limit, where the gateway stops: the
    // upstream may have seen the request begin, never the whole body.
    let chunks = futures::stream::iter((0..8).map(|_| Ok::<_, std::io::Error>(vec![b'y'; 512])));
    let (status, _, body) = read(
        send(reqwest::Body::wrap_stream(chunks))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (413, Some("invalid_request"))
    );
    for seen in gw.upstream.requests().iter().skip(1) {
        assert!(
            seen.body.len() <= 1024,
            "the upstream received {} bytes of a body over the limit",
            seen.body.len()
        );
    }
}

/// `rounds` requests, 8 at a time: valid calls with fresh proofs, forged tokens, and token
/// requests from agents nobody registered, each with a `jti` never seen before.
async fn flood(gw: &Gw, rounds: usize) {
    let url = &format!("{}/gw/mail/messages/1", gw.leash.url);
    futures::future::join_all((0..8).map(|_| async move {
        for i in 0..rounds / 8 {
            match i % 3 {
                0 => {
                    let (status, _, _) = gw.call(Method::GET, "/gw/mail/messages/1", &[]).await;
                    assert_eq!(status, 200);
                }
                1 => {
                    let proof = gw.dpop.dpop_proof("GET", url, None, None, now());
                    let response = gw
                        .leash
                        .http()
                        .get(url)
                        .header("Authorization", format!("DPoP forged.{i}.token"))
                        .header("DPoP", proof)
                        .send()
                        .await
                        .unwrap();
                    // 429 once the address is over `unauthenticated_rate` (not audited).
                    let status = response.status().as_u16();
                    assert!(matches!(status, 401 | 429), "{status}");
                }
                _ => {
                    let stranger = format!("spiffe://example.org/agent/stranger-{i}");
                    let key = AgentKey::generate(Alg::EdDsa);
                    let assertion = key.client_assertion(&stranger, &gw.leash.token_url(), now());
                    let body = form(&[
                        ("grant_type", leash_core::token::TOKEN_EXCHANGE),
                        ("subject_token", gw.s.handle()),
                        ("subject_token_type", leash_core::token::GRANT_TOKEN_TYPE),
                        ("client_assertion_type", leash_core::assertion::JWT_BEARER),
                        ("client_assertion", &assertion),
                    ]);
                    let proof = key.dpop_proof("POST", &gw.leash.token_url(), None, None, now());
                    let (status, _, _) = gw
                        .leash
                        .post_form("/oauth2/token", body, &[("DPoP", proof)])
                        .await;
                    assert_eq!(status, 401);
                }
            }
        }
    }))
    .await;
}

/// ATTACKS 22: a flood of unique `jti`s (valid proofs, forged tokens, forged assertions naming
/// unknown agents) leaves the server's memory and its rate tables bounded.
#[tokio::test]
async fn a_flood_of_unique_jtis_leaves_memory_and_rate_tables_bounded() {
    let gw = setup(
        "[limits]\ntoken_rate = 1000000\ngateway_rate = 1000000\n",
        grant(&["mail:read"], &["mail"], json!({})),
    )
    .await;
    flood(&gw, 1_200).await;
    let warm = gw.leash.rss_kib();
    flood(&gw, 9_000).await;
    let after = gw.leash.rss_kib();
    assert!(
        after.saturating_sub(warm) < 24 * 1024,
        "memory grew from {warm} KiB to {after} KiB under the flood"
    );
    for endpoint in ["token", "gateway"] {
        let tracked = gw
            .leash
            .metric(&format!(
                "leash_rate_limit_callers{{endpoint=\"{endpoint}\"}}"
            ))
            .await;
        assert!(tracked <= 1.0, "{endpoint}: {tracked} callers tracked");
    }
}

/// An upstream on loopback that reads each request's head, writes `start` (nothing, or the
/// start of an answer) and then holds the connection open, silent. Returns its URL and its task.
async fn stalling_upstream(start: &'static [u8]) -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((mut connection, _)) = listener.accept().await {
            let mut head = [0u8; 4096];
            let _ = connection.read(&mut head).await;
            let _ = connection.write_all(start).await;
            connections.push(connection);
        }
    });
    (url, held)
}

/// An upstream that takes the connection and never answers: the agent gets `504` once
/// `upstream_timeout` has passed instead of waiting as long as the upstream does.
#[tokio::test]
async fn an_upstream_that_never_answers_is_a_504_after_the_timeout() {
    let (url, held) = stalling_upstream(b"").await;
    let gw = setup_with(
        "[limits]\nupstream_timeout = 1\n",
        grant(&["mail:read"], &["mail"], json!({})),
        Some(&url),
    )
    .await;
    let (status, _, body) = gw.call(Method::GET, "/gw/mail/messages/1", &[]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (504, Some("gateway_timeout")),
        "{body}"
    );
    // The warning names the request, as its audit event does.
    let (_, events) = super::audit::audit(&gw.leash, leash_testkit::ADMIN_KEY, "").await;
    let request_id = events
        .iter()
        .rev()
        .find(|e| e["kind"] == "gateway.request")
        .and_then(|e| e["request_id"].as_str())
        .expect("the request's event")
        .to_owned();
    let logs = gw.leash.logs();
    let warning = logs
        .lines()
        .find(|line| line.contains("did not answer in time"))
        .unwrap_or_else(|| panic!("no warning in {logs}"));
    assert!(warning.contains(&request_id), "{warning}");
    held.abort();
}

/// An upstream that starts its answer and then stalls: the answer is cut off once
/// `upstream_timeout` passes without a part of it, instead of holding the agent's connection as
/// long as the upstream does; what came before reaches the agent.
#[tokio::test]
async fn an_answer_that_stalls_midway_is_cut_off_after_the_timeout() {
    let (url, held) = stalling_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\
          Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await;
    let gw = setup_with(
        "[limits]\nupstream_timeout = 1\n",
        grant(&["mail:read"], &["mail"], json!({})),
        Some(&url),
    )
    .await;
    // Without a credential to guard, every part passes as it comes (with one, the last bytes
    // before a cut-off may be held back: `reflection::GuardedBody`).
    let (status, _) = gw
        .leash
        .call(Method::DELETE, "/v1/vault/mail", &gw.s.user_key, None)
        .await;
    assert_eq!(status, 204);
    let mut response = gw.send(Method::GET, "/gw/mail/messages/1", &[]).await;
    assert_eq!(response.status(), 200);
    let mut received = Vec::new();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            match response.chunk().await {
                Ok(Some(part)) => received.extend_from_slice(&part),
                Ok(None) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the stalled answer was held past the timeout");
    assert!(ended.is_err(), "a cut-off answer must not read as complete");
    assert_eq!(received, b"hello");
    let logs = gw.leash.logs();
    assert!(logs.contains("upstream answer cut off"), "{logs}");
    held.abort();
}

/// A client that sends a head announcing a body and then stops (slowloris) is answered `408`
/// once `header_read_timeout` passes without a part of the body, and its connection closes:
/// at `max_connections = 1` the next client is served.
#[tokio::test]
async fn a_client_that_stops_sending_its_body_gets_408_and_frees_its_connection() {
    let leash = Leash::start(
        bin(),
        "[limits]\nheader_read_timeout = 1\nmax_connections = 1\n",
    )
    .await;
    let addr = leash.url.trim_start_matches("http://").to_owned();
    for head in [
        "POST /oauth2/token HTTP/1.1\r\nHost: x\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\ngrant",
        &format!(
            "POST /v1/users HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"na"
        ),
    ] {
        let mut stalled = TcpStream::connect(&addr).await.unwrap();
        stalled.write_all(head.as_bytes()).await.unwrap();
        let started = std::time::Instant::now();
        let got = until_closed(&mut stalled, Duration::from_secs(10))
            .await
            .expect("a stalled body is cut off and its connection closed");
        assert!(started.elapsed() >= Duration::from_millis(900));
        let answer = String::from_utf8_lossy(&got);
        assert!(answer.starts_with("HTTP/1.1 408"), "{head}: {answer}");
        assert!(answer.contains("invalid_request"), "{answer}");
        assert_eq!(
            health(&leash).await,
            200,
            "the only connection slot is free again"
        );
    }
}

/// At the gateway the agent's body streams to the upstream: a body that stops midway is cut
/// off after `header_read_timeout` (the agent gets `408`; the upstream never gets the whole
/// request and its connection is dropped), while a body that takes longer than that in all, but
/// never that long between two parts, goes through whole.
#[tokio::test]
async fn a_gateway_body_that_stalls_midway_is_cut_off_and_a_slow_one_is_not() {
    let gw = setup(
        "[limits]\nheader_read_timeout = 1\ntoken_rate = 0\ngateway_rate = 0\n",
        grant(&["mail:draft"], &["mail"], json!({})),
    )
    .await;
    let url = format!("{}/gw/mail/drafts", gw.leash.url);
    let proof = gw
        .dpop
        .dpop_proof("POST", &url, Some(&gw.token), None, now());
    let addr = gw.leash.url.trim_start_matches("http://").to_owned();
    let mut stalled = TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /gw/mail/drafts HTTP/1.1\r\nHost: {addr}\r\nAuthorization: DPoP {}\r\n\
         DPoP: {proof}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: 100\r\n\r\nhello",
        gw.token
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    let got = until_closed(&mut stalled, Duration::from_secs(10))
        .await
        .expect("a stalled gateway body is cut off");
    let answer = String::from_utf8_lossy(&got);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // The upstream saw the request begin, then its connection dropped: its read of the body
    // failed (the recorder keeps an empty body then) instead of waiting on.
    for _ in 0..50 {
        if gw.upstream.count() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let requests = gw.upstream.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0].body, b"",
        "the upstream got more than a broken body"
    );

    // Three parts, each 600 ms after the one before: 1.8 s in all, never 1 s without a part.
    let parts = futures::stream::iter([b"one ", b"two ", b"six!"]).then(|part| async move {
        tokio::time::sleep(Duration::from_millis(600)).await;
        Ok::<_, std::io::Error>(part.to_vec())
    });
    let (status, _, body) = read(
        gw.request(Method::POST, "/gw/mail/drafts")
            .body(reqwest::Body::wrap_stream(parts))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let requests = gw.upstream.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[1].body, b"one two six!");
}

/// A connection to the server from `source`, one of the loopback range's addresses.
async fn connect_from(source: &str, addr: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(addr.parse().unwrap()).await.unwrap()
}

/// `GET /healthz` over a new connection from `source`; the answer's status line, if any.
async fn health_from(source: &str, addr: &str) -> Option<String> {
    let mut stream = connect_from(source, addr).await;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let got = until_closed(&mut stream, Duration::from_secs(5)).await?;
    String::from_utf8_lossy(&got)
        .lines()
        .next()
        .map(str::to_owned)
}

/// ATTACKS.md 47: bodies dripped in a byte at a time never stall, so only a total deadline
/// ends them. Outside the gateway the whole body must arrive within `body_read_timeout`, and
/// clients from one address hold at most their share of the connections: with
/// `max_connections = 4` and four drippers, `/healthz` stays reachable.
#[tokio::test]
async fn slow_drip_bodies_are_cut_off_and_one_address_cannot_hold_every_connection() {
    let leash = Leash::start(
        bin(),
        "[limits]\nheader_read_timeout = 3\nbody_read_timeout = 2\nmax_connections = 4\n",
    )
    .await;
    let addr = leash.url.trim_start_matches("http://").to_owned();
    let drip = |source: &'static str, path: &'static str| {
        let addr = addr.clone();
        tokio::spawn(async move {
            let mut stream = connect_from(source, &addr).await;
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await.unwrap();
            let started = std::time::Instant::now();
            let mut answer = Vec::new();
            let mut byte = [0u8; 1];
            // One byte every 500 ms: never a stall of header_read_timeout, 50 s for the body.
            for _ in 0..100 {
                if stream.write_all(b"a").await.is_err() {
                    break;
                }
                match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut byte)).await
                {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(_)) => {
                        answer.push(byte[0]);
                        let _ = stream.read_to_end(&mut answer).await;
                        break;
                    }
                    Err(_) => {}
                }
            }
            (
                started.elapsed(),
                String::from_utf8_lossy(&answer).into_owned(),
            )
        })
    };
    // Four drippers from one address: two take its share, two are closed at once.
    let drippers: Vec<_> = (0..4).map(|_| drip("127.0.0.2", "/oauth2/token")).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        health_from("127.0.0.3", &addr).await.as_deref(),
        Some("HTTP/1.1 200 OK"),
        "another address is served while one drips"
    );
    let mut cut_off = 0;
    for dripper in drippers {
        let (took, answer) = dripper.await.unwrap();
        assert!(took < Duration::from_secs(8), "held for {took:?}: {answer}");
        if answer.starts_with("HTTP/1.1 408") {
            assert!(took >= Duration::from_millis(1500), "{took:?}");
            cut_off += 1;
        } else {
            assert_eq!(answer, "", "a connection over the share was answered");
        }
    }
    assert_eq!(cut_off, 2, "each address holds half of max_connections");
    assert_eq!(health(&leash).await, 200);
}

/// ATTACKS.md 50: unidentified garbage at the gateway is audited one event per refusal only
/// within `unauthenticated_rate` per source address; beyond it, 429 and one summary event.
#[tokio::test]
async fn unauthenticated_garbage_cannot_flood_the_audit_log() {
    let gw = setup(
        "[limits]\ntoken_rate = 0\ngateway_rate = 0\nunauthenticated_rate = 2\nunauthenticated_burst = 5\n",
        grant(&["mail:read"], &["mail"], json!({})),
    )
    .await;
    let events = |body: &str| {
        body.lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .collect::<Vec<_>>()
    };
    let audit = |leash: &Leash| {
        let url = format!("{}/v1/audit?limit=10000", leash.url);
        let http = leash.http().clone();
        async move {
            http.get(url)
                .bearer_auth(ADMIN_KEY)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let before = events(&audit(&gw.leash).await).len();
    let url = format!("{}/gw/mail/messages/1", gw.leash.url);
    let started = std::time::Instant::now();
    let (mut refused, mut limited) = (0u32, 0u32);
    for i in 0..200 {
        let request = gw.leash.http().get(&url);
        // No credential, a forged token, a path trick: nobody is identified.
        let request = match i % 3 {
            0 => request,
            1 => request.header("Authorization", "DPoP eyJhbGciOiJFZERTQSJ9.e30.AAAA"),
            _ => gw
                .leash
                .http()
                .get(format!("{}/gw/mail/a/../b", gw.leash.url)),
        };
        let status = request.send().await.unwrap().status().as_u16();
        match status {
            429 => limited += 1,
            400 | 401 => refused += 1,
            other => panic!("unexpected {other}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert!(limited > 150, "{limited} of 200 rate-limited");
    assert!(
        f64::from(refused) <= 5.0 + 2.0 * elapsed + 1.0,
        "{refused} audited in {elapsed:.1} s"
    );
    // A genuine agent is not affected, and a genuine token's refusal is always audited.
    let (status, _, body) = gw.call(Method::GET, "/gw/mail/messages/1", &[]).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, _) = gw.call(Method::GET, "/gw/mail/export", &[]).await;
    assert_eq!(status, 403);
    // Each 429 is counted in `/metrics`.
    let metrics = scrape(&gw.leash).await;
    let series = "leash_rate_limited_total{endpoint=\"unidentified\"}";
    assert_eq!(metric(&metrics, series), f64::from(limited));

    let mut leash = gw.leash;
    assert!(leash.terminate().await.success());
    leash.restart().await;
    let all = events(&audit(&leash).await);
    let new = &all[before..];
    let individual = new
        .iter()
        .filter(|e| e["kind"] == "gateway.request" && e["actor"].is_null())
        .count();
    assert_eq!(
        individual, refused as usize,
        "each admitted refusal has its event"
    );
    let summaries: Vec<_> = new
        .iter()
        .filter(|e| e["kind"] == "gateway.refusals_summary")
        .collect();
    assert_eq!(summaries.len(), 1, "{summaries:?}");
    let reason = summaries[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("{limited} unidentified requests from 1 source")),
        "{reason}"
    );
    assert!(
        new.iter()
            .any(|e| e["kind"] == "gateway.request" && e["reason"] == "insufficient_scope"),
        "the genuine token's refusal was audited"
    );
}

/// Found by an outside test: an upstream that answers `101 Switching Protocols` unasked would
/// hand the agent a connection in the upstream's protocol; the gateway answers 502 instead.
#[tokio::test]
async fn an_unasked_for_protocol_switch_from_the_upstream_is_502() {
    let (url, held) = stalling_upstream(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nraw",
    )
    .await;
    let gw = setup_with("", grant(&["mail:read"], &["mail"], json!({})), Some(&url)).await;
    let (status, headers, body) = gw.call(Method::GET, "/gw/mail/messages/1", &[]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("bad_gateway")),
        "{body}"
    );
    assert_eq!(headers["leash-decision"], "bad_gateway");
    held.abort();
}
