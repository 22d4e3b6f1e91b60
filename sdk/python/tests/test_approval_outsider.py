"""An outsider's attacks on step-up approvals (brief: attack-preview; API §7, ATTACKS 41 and 53):
approvals bind the forwarded request headers, and the human can read the pending request's body
at `GET /v1/approvals/{id}/body`.

Every test runs against the real `leash` binary over loopback, as a malicious agent (raw DPoP
requests, so that the retry can differ from what was approved) or as another human. A test that
passes is an attack that was refused. The two that first succeeded (an invented `x-b3-*` header
and a tracing header carrying a payload, both unbound) are fixed: only B3's own ids, Envoy's
`x-request-id` and W3C `traceparent` of an id's exact shape go unbound.
"""

from __future__ import annotations

import secrets
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import Leash, Setup, Upstream, set_up

from leash_agent import Agent

Headers = list[tuple[str, str | bytes]]


class Raw:
    """The agent of a grant, sending exactly the requests the test writes (raw DPoP)."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.agent = Agent.from_jwk_file(setup.leash.url, setup.agent_id, setup.key_file)
        self.task = self.agent.task(setup.handle)

    def auth(self, method: str, url: str) -> Headers:
        token = self.task._usable_token().value
        proof = self.task._dpop_key.dpop_proof(method, url, self.agent._now(), token)
        return [("Authorization", f"DPoP {token}"), ("DPoP", proof)]

    def token(self) -> str:
        return self.task._usable_token().value

    def send(
        self,
        path: str,
        headers: Headers,
        body: bytes = b"{}",
        approval: str | None = None,
        method: str = "POST",
    ) -> httpx.Response:
        url = self.task.url("mail", path)
        sent: Headers = [*self.auth(method, url), *headers]
        if approval:
            sent.append(("Leash-Approval", approval))
        return self.setup.leash.http.request(method, url, headers=as_bytes(sent), content=body)

    def close(self) -> None:
        self.agent.close()


def as_bytes(headers: Headers) -> list[tuple[bytes, bytes]]:
    """Header lines as bytes, so that a non-UTF-8 value goes out as it is."""
    return [(n.encode(), v if isinstance(v, bytes) else v.encode()) for n, v in headers]


def unique_path() -> str:
    return f"/messages/{secrets.token_hex(6)}/send"


def ask(raw: Raw, path: str, headers: Headers, body: bytes = b"{}") -> str:
    """Sends a high-risk request; returns the approval it asks for."""
    answer = raw.send(path, headers, body)
    assert answer.status_code == 403, answer.text
    assert answer.json()["error"] == "approval_required", answer.text
    approval: str = answer.json()["approval_id"]
    return approval


def shown(view: dict[str, Any]) -> list[tuple[str, str]]:
    """The headers an approval shows the human, as (name, value)."""
    return [(h["name"], h["value"]) for h in view["headers"]]


def reached(upstream: Upstream, path: str) -> list[Any]:
    return [r for r in upstream.seen() if r.path.split("?", 1)[0] == path]


@pytest.fixture
def raw(setup: Setup) -> Any:
    agent = Raw(setup)
    yield agent
    agent.close()


# ---- 1. The header binding ----------------------------------------------------------------------


def test_the_human_sees_the_headers_and_a_changed_value_is_a_mismatch(
    raw: Raw, setup: Setup, upstream: Upstream
) -> None:
    """Held: the headers are shown; a retry with another value is approval_mismatch."""
    path = unique_path()
    approval = ask(raw, path, [("X-Amount", "10")])
    view = setup.leash.call("GET", f"/v1/approvals/{approval}", setup.user_key).json()
    assert ("x-amount", "10") in shown(view), view
    setup.leash.decide(setup.user_key, approval, "approve")
    answer = raw.send(path, [("X-Amount", "1000000")], approval=approval)
    assert answer.status_code == 403
    assert answer.json()["error"] == "approval_mismatch"
    assert not reached(upstream, path)
    # Whether or not the mismatch spent the approval, the identical retry forwards only "10".
    ok = raw.send(path, [("X-Amount", "10")], approval=approval)
    assert ok.status_code in (200, 403), ok.text
    if ok.status_code == 200:
        assert reached(upstream, path)[-1].headers["x-amount"] == "10"


@pytest.mark.parametrize(
    ("asked", "retried"),
    [
        ([("X-Mode", "safe")], [("X-Mode", "SAFE")]),  # value case
        ([("X-Mode", "safe")], [("X-Mode", "safe,")]),  # an empty list member
        ([("X-Tag", "a")], [("X-Tag", "a"), ("X-Tag", "a")]),  # duplicated
        ([("X-Tag", "a"), ("X-Tag", "b")], [("X-Tag", "b"), ("X-Tag", "a")]),  # reordered
        ([("X-Tag", "a"), ("X-Tag", "b")], [("X-Tag", "a, b")]),  # joined
        ([("X-Tag", "a")], [("X-Tag", "a"), ("X-Extra", "1")]),  # added
        ([("X-Tag", "a"), ("X-Extra", "1")], [("X-Tag", "a")]),  # removed
        ([("X-Tag", "a")], [("X-Tag", "a"), ("Content-Encoding", "gzip")]),  # encoding added
        ([("Prefer", "return=minimal")], [("Prefer", "return=representation")]),
        ([("Idempotency-Key", "k1")], [("Idempotency-Key", "k2")]),
        ([], [("Content-Type", "application/x-www-form-urlencoded")]),
        ([], [("X-B3-Sampled", "1"), ("X-Amount", "99")]),
    ],
)
def test_a_retry_with_other_headers_is_a_mismatch(
    raw: Raw, setup: Setup, upstream: Upstream, asked: Headers, retried: Headers
) -> None:
    """Held: case of values, duplicates, reordered or joined lines, added or removed fields."""
    path = unique_path()
    approval = ask(raw, path, asked)
    setup.leash.decide(setup.user_key, approval, "approve")
    answer = raw.send(path, retried, approval=approval)
    assert answer.status_code in (400, 403), answer.text
    assert answer.json()["error"] in ("approval_mismatch", "invalid_request")
    assert not reached(upstream, path)


def test_name_case_and_field_order_do_not_count(raw: Raw, setup: Setup, upstream: Upstream) -> None:
    """Held (the documented leniency): names are case-insensitive and different fields may be
    reordered; the upstream gets the same fields either way."""
    path = unique_path()
    approval = ask(raw, path, [("X-A", "1"), ("X-B", "2")])
    setup.leash.decide(setup.user_key, approval, "approve")
    answer = raw.send(path, [("x-b", "2"), ("X-a", "1")], approval=approval)
    assert answer.status_code == 200, answer.text
    seen = reached(upstream, path)[-1].headers
    assert seen["x-a"] == "1"
    assert seen["x-b"] == "2"


def test_a_connection_listed_header_cannot_be_slipped_in_on_the_retry(
    raw: Raw, setup: Setup, upstream: Upstream
) -> None:
    """Held: a header hidden as hop-by-hop while asking (`Connection: x-amount`) is neither
    shown nor forwarded; sending it plainly on the retry is a mismatch."""
    path = unique_path()
    approval = ask(raw, path, [("Connection", "x-amount"), ("X-Amount", "1000000")])
    view = setup.leash.call("GET", f"/v1/approvals/{approval}", setup.user_key).json()
    assert all(name != "x-amount" for name, _ in shown(view)), view
    setup.leash.decide(setup.user_key, approval, "approve")
    answer = raw.send(path, [("X-Amount", "1000000")], approval=approval)
    assert answer.status_code == 403
    assert answer.json()["error"] == "approval_mismatch"
    assert not reached(upstream, path)


def test_non_utf8_values_are_bound_by_their_bytes(
    raw: Raw, setup: Setup, upstream: Upstream
) -> None:
    """Held: two values the human sees alike (both shown with U+FFFD) do not match."""
    path = unique_path()
    approval = ask(raw, path, [("X-Note", b"pay \xff")])
    view = setup.leash.call("GET", f"/v1/approvals/{approval}", setup.user_key)
    assert view.status_code == 200, view.text
    assert ("x-note", "pay \ufffd") in shown(view.json())
    setup.leash.decide(setup.user_key, approval, "approve")
    answer = raw.send(path, [("X-Note", b"pay \xfe")], approval=approval)
    assert answer.status_code == 403
    assert answer.json()["error"] == "approval_mismatch"
    assert not reached(upstream, path)


def raw_request(leash: Leash, head: bytes, body: bytes) -> bytes:
    """Sends bytes as they are (no client normalises them); returns the answer's bytes."""
    target = urlsplit(leash.url)
    with socket.create_connection((target.hostname or "", target.port or 80), timeout=5) as s:
        s.sendall(head + body)
        answer = b""
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            answer += chunk
            if b"\r\n\r\n" in answer:
                break
        return answer


def test_an_obs_folded_header_is_not_forwarded_past_the_binding(
    raw: Raw, setup: Setup, upstream: Upstream
) -> None:
    """Held: an obs-fold line (`X-Amount: 10\\r\\n 000`) is refused or never reaches the app."""
    path = unique_path()
    url = raw.task.url("mail", path)
    auth = raw.auth("POST", url)
    lines = [f"POST /gw/mail{path} HTTP/1.1", f"Host: {urlsplit(url).netloc}"]
    lines += [f"{n}: {v!s}" for n, v in auth]
    head = ("\r\n".join(lines) + "\r\nX-Amount: 10\r\n 000\r\nContent-Length: 2\r\n").encode()
    answer = raw_request(setup.leash, head + b"Connection: close\r\n\r\n", b"{}")
    status = int(answer.split(b" ", 2)[1])
    assert status in (400, 403), answer[:300]
    assert status != 500
    assert not reached(upstream, path)


def test_tracing_ids_are_forwarded_unbound_but_only_the_known_names(
    raw: Raw, setup: Setup, upstream: Upstream
) -> None:
    """Held: the unbound tracing ids are the documented ones: a header that merely looks
    like one (`x-request-ids`, `traceparent-x`, `x-amzn-trace-id2`) is bound."""
    for extra in ("X-Request-Ids", "Traceparent-X", "X-Amzn-Trace-Id2", "X-Trace-Id"):
        path = unique_path()
        approval = ask(raw, path, [])
        setup.leash.decide(setup.user_key, approval, "approve")
        answer = raw.send(path, [(extra, "1")], approval=approval)
        assert answer.status_code == 403, (extra, answer.text)
        assert not reached(upstream, path)


def test_an_invented_x_b3_header_is_bound(raw: Raw, setup: Setup, upstream: Upstream) -> None:
    path = unique_path()
    approval = ask(raw, path, [])
    setup.leash.decide(setup.user_key, approval, "approve")
    answer = raw.send(path, [("X-B3-Transfer-To", "mallory")], approval=approval)
    assert answer.status_code == 403, "forwarded: " + str(reached(upstream, path)[-1].headers)


def test_a_tracing_header_cannot_carry_an_unseen_payload(
    raw: Raw, setup: Setup, upstream: Upstream
) -> None:
    path = unique_path()
    approval = ask(raw, path, [("X-Request-Id", "req-1")])
    view = setup.leash.call("GET", f"/v1/approvals/{approval}", setup.user_key).json()
    assert all(name != "x-request-id" for name, _ in shown(view))  # not shown either
    setup.leash.decide(setup.user_key, approval, "approve")
    payload = "to=mallory;amount=1000000"
    answer = raw.send(
        path,
        [("X-Request-Id", payload), ("Tracestate", f"evil={payload}"), ("Traceparent", payload)],
        approval=approval,
    )
    assert answer.status_code == 403, "forwarded: " + str(reached(upstream, path)[-1].headers)


def test_the_upstream_gets_leash_request_id_of_its_own(
    raw: Raw, setup: Setup, upstream: Upstream
) -> None:
    """Held: the agent cannot set Leash-Request-Id (or any Leash-*) for the upstream."""
    path = unique_path()
    approval = ask(raw, path, [])
    setup.leash.decide(setup.user_key, approval, "approve")
    answer = raw.send(
        path,
        [("Leash-Request-Id", "forged"), ("Leash-Subject", "bob")],
        approval=approval,
    )
    assert answer.status_code == 200, answer.text
    seen = reached(upstream, path)[-1].headers
    assert seen["leash-request-id"] != "forged"
    assert seen["leash-subject"] != "bob"


# ---- 2. The body preview ------------------------------------------------------------------------

MARKER = "preview-secret-" + secrets.token_hex(8)


def body_of(leash: Leash, approval: str, key: str) -> httpx.Response:
    return leash.call("GET", f"/v1/approvals/{approval}/body", key)


def test_the_grant_s_human_reads_an_inert_body(raw: Raw, setup: Setup) -> None:
    """Held: the human gets the exact bytes, as an attachment nothing renders."""
    html = f"<html><script>alert('{MARKER}')</script></html>".encode()
    approval = ask(raw, unique_path(), [("Content-Type", "text/html")], html)
    answer = body_of(setup.leash, approval, setup.user_key)
    assert answer.status_code == 200, answer.text
    assert answer.content == html
    assert answer.headers["content-type"] == "application/octet-stream"
    assert answer.headers["content-disposition"].startswith("attachment")
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["content-security-policy"] == "sandbox"
    # A HEAD or a browser's Accept does not change any of it.
    head = setup.leash.http.head(
        f"/v1/approvals/{approval}/body",
        headers={"Authorization": f"Bearer {setup.user_key}", "Accept": "text/html"},
    )
    assert head.status_code in (200, 405)
    if head.status_code == 200:
        assert head.headers["content-type"] == "application/octet-stream"
    assert setup.leash.call("GET", f"/v1/approvals/{approval}", setup.leash.admin_key).is_success
    assert body_of(setup.leash, approval, setup.leash.admin_key).content == html


def test_another_human_cannot_read_the_body(raw: Raw, setup: Setup) -> None:
    """Held: 404 for a human of another grant, even one with approvals of their own."""
    approval = ask(raw, unique_path(), [], MARKER.encode())
    mallory = setup.leash.add_user(f"mallory-{secrets.token_hex(4)}")
    answer = body_of(setup.leash, approval, mallory)
    assert answer.status_code in (403, 404), answer.text
    assert MARKER not in answer.text
    listed = setup.leash.call("GET", "/v1/approvals?status=pending", mallory)
    assert MARKER not in listed.text
    assert approval not in listed.text


def test_the_agent_cannot_read_the_body(raw: Raw, setup: Setup) -> None:
    """Held: the agent's token, as DPoP (any case of the scheme), as Bearer, or with a proof
    for the body's URL, is refused."""
    approval = ask(raw, unique_path(), [], MARKER.encode())
    url = f"{setup.leash.url}/v1/approvals/{approval}/body"
    token = raw.token()
    attempts: list[Headers] = [
        raw.auth("GET", url),
        [("Authorization", f"dpop {token}"), raw.auth("GET", url)[1]],
        [("Authorization", f"DPOP {token}"), raw.auth("GET", url)[1]],
        [("Authorization", f"Bearer {token}")],
        [("Authorization", f"Bearer {setup.handle}")],
        [("Authorization", f"Bearer {token}"), raw.auth("GET", url)[1]],
    ]
    for headers in attempts:
        answer = setup.leash.http.get(url, headers=as_bytes(headers))
        assert answer.status_code in (400, 401, 403, 404), (headers[0], answer.text)
        assert MARKER not in answer.text


@pytest.mark.parametrize("decision", ["approve", "deny"])
def test_the_body_is_gone_once_decided(raw: Raw, setup: Setup, decision: str) -> None:
    """Held: after a decision the body is not served (and not after the approval is used)."""
    path = unique_path()
    approval = ask(raw, path, [], MARKER.encode())
    setup.leash.decide(setup.user_key, approval, decision)
    for key in (setup.user_key, setup.leash.admin_key):
        answer = body_of(setup.leash, approval, key)
        assert answer.status_code == 404, answer.text
        assert MARKER not in answer.text


def test_the_body_is_gone_once_expired(make_leash: Any, tmp_path: Path) -> None:
    """Held: an expired approval's body is not served."""
    # Expiry is in whole seconds: a TTL of 3 lives between 2 and 3 seconds.
    leash = make_leash("approval_ttl = 3")
    setup = set_up(leash, tmp_path)
    agent = Raw(setup)
    try:
        approval = ask(agent, unique_path(), [], MARKER.encode())
        assert body_of(leash, approval, setup.user_key).status_code == 200
        time.sleep(3.2)
        answer = body_of(leash, approval, setup.user_key)
        assert answer.status_code == 404, answer.text
        assert MARKER not in answer.text
    finally:
        agent.close()


@pytest.mark.parametrize("encoding", ["gzip", "GZIP", "identity", "br, gzip"])
def test_an_encoded_body_is_not_previewed(raw: Raw, setup: Setup, encoding: str) -> None:
    """Held: a body with a Content-Encoding is marked not previewed and not served."""
    approval = ask(
        raw,
        unique_path(),
        [("Content-Type", "application/json"), ("Content-Encoding", encoding)],
        MARKER.encode(),
    )
    view = setup.leash.call("GET", f"/v1/approvals/{approval}", setup.user_key).json()
    assert view.get("body_previewed") is False, view
    answer = body_of(setup.leash, approval, setup.user_key)
    assert answer.status_code == 404, answer.text


def test_a_body_over_the_limit_is_not_previewed(raw: Raw, setup: Setup) -> None:
    approval = ask(raw, unique_path(), [], b"x" * (64 * 1024 + 1))
    view = setup.leash.call("GET", f"/v1/approvals/{approval}", setup.user_key).json()
    assert view.get("body_previewed") is False, view
    assert body_of(setup.leash, approval, setup.user_key).status_code == 404
    at_limit = ask(raw, unique_path(), [], b"y" * (64 * 1024))
    assert body_of(setup.leash, at_limit, setup.user_key).content == b"y" * (64 * 1024)


def test_the_body_reaches_no_log_and_no_audit_event(raw: Raw, setup: Setup) -> None:
    """Held: the previewed body is in no audit event, no approval view and no log line."""
    marker = "body-marker-" + secrets.token_hex(8)
    path = unique_path()
    approval = ask(raw, path, [("X-Kind", "preview")], marker.encode())
    assert body_of(setup.leash, approval, setup.user_key).status_code == 200
    setup.leash.decide(setup.user_key, approval, "approve")
    assert raw.send(path, [("X-Kind", "preview")], marker.encode(), approval).status_code == 200
    events = setup.leash.call("GET", f"/v1/audit?grant_id={setup.grant_id}", setup.user_key)
    admin_events = setup.leash.audit(setup.grant_id)
    assert admin_events
    assert marker not in events.text
    assert marker not in str(admin_events)
    view = setup.leash.call("GET", f"/v1/approvals/{approval}", setup.user_key)
    assert marker not in view.text
    listed = setup.leash.call("GET", "/v1/approvals", setup.leash.admin_key)
    assert marker not in listed.text
    assert marker not in "".join(setup.leash.output)


@pytest.mark.parametrize(
    "approval",
    [
        "apr_" + "a" * 5000,
        "apr_%00",
        "apr_%ff%fe",
        "..%2f..%2fv1%2fusers",
        "apr_\u00e9",
        "%20",
    ],
)
def test_odd_ids_are_not_a_5xx(setup: Setup, approval: str) -> None:
    """Held: no id makes Leash fail."""
    for key in (setup.user_key, setup.leash.admin_key, "lsk_nonsense"):
        answer = setup.leash.http.get(
            f"/v1/approvals/{approval}/body", headers={"Authorization": f"Bearer {key}"}
        )
        assert answer.status_code < 500, answer.text


def test_an_empty_body_and_a_query_only_request_preview_cleanly(raw: Raw, setup: Setup) -> None:
    """Held: an empty body is previewed as empty (200, no 5xx)."""
    approval = ask(raw, unique_path(), [], b"")
    answer = body_of(setup.leash, approval, setup.user_key)
    assert answer.status_code in (200, 404), answer.text
    if answer.status_code == 200:
        assert answer.content == b""
