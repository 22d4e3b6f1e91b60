"""Human login (API §13) over plain HTTP against a real IdP (npm oidc-provider) and a hostile one:
the code flow with PKCE, `state` and `nonce` bound to the browser's login cookie, sessions,
logout, the `Origin` guard, IdP access tokens as Bearer, admin by group, disabling a human; and
each refusal the contract and ATTACKS 54-55 name: wrong `state`, `nonce`, `iss` or `aud`, a
missing login cookie, a replayed code, a fixed session, an expired session, a cookie POST
without `Origin`, a session cookie at the gateway, another human's approval or grant, a
non-admin on admin calls."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Leash
from idp_fixtures import DEFAULT_AUDIENCE, Idp, login_over_http, redirect_query
from idp_hostile import HostileIdp
from login_helpers import (
    SECRET_ENV,
    MakeLeash,
    agent_for,
    browser,
    leash_for,
    log_in,
    me,
    oidc_section,
    origin,
    session_cookie,
    start,
)

from leash_agent import Agent


@pytest.fixture
def leash_idp(make_leash: MakeLeash, idp: Idp) -> Leash:
    return leash_for(make_leash, idp)


# --- the flow ---------------------------------------------------------------------------------


def test_a_login_creates_a_session_keyed_by_the_idps_subject(leash_idp: Leash, idp: Idp) -> None:
    client = browser(leash_idp)
    authorize = start(client, "/console#/tasks")
    query = dict(httpx.URL(authorize).params)
    assert query["code_challenge_method"] == "S256"
    assert query["response_type"] == "code"
    assert query["state"]
    assert query["nonce"]
    assert query["redirect_uri"] == f"{leash_idp.url}/auth/callback"
    back = login_over_http(client, authorize, "alice", idp.password("alice"))
    done = client.get(back.headers["location"])
    assert done.status_code == 303, done.text
    assert done.headers["location"] == "/console#/tasks"
    cookies = done.headers.get_list("set-cookie")
    session = next(c for c in cookies if c.startswith("leash_session="))
    for flag in ("HttpOnly", "SameSite=Lax", "Path=/"):
        assert flag in session, session
    # The login cookie is spent.
    assert any(c.startswith("leash_login=;") for c in cookies)
    who = me(client)
    assert who.status_code == 200, who.text
    alice = who.json()
    assert alice["name"] == "alice@example.com"
    assert alice["admin"] is False
    assert alice["id"].startswith("usr_")
    # The same person logging in again is the same human, in a new session.
    again = log_in(leash_idp, idp, "alice")
    assert me(again).json()["id"] == alice["id"]
    assert session_cookie(again) != session_cookie(client)
    # Humans created by OIDC need no API key; the admin sees them.
    users = leash_idp.call("GET", "/v1/users", leash_idp.admin_key).json()["users"]
    assert [u["name"] for u in users if u["id"] == alice["id"]] == ["alice@example.com"]
    # Logins are audit events.
    events = leash_idp.call("GET", "/v1/audit", leash_idp.admin_key).text
    assert events.count('"kind":"session.login"') == 2


def test_users_are_matched_by_subject_never_by_name(
    make_leash: MakeLeash, make_idp: Callable[..., Idp]
) -> None:
    from idp_fixtures import Account

    # Eve's IdP account claims Alice's email: she is another human all the same.
    idp = make_idp(accounts={"eve": Account("eve-pw", "sub-eve", "alice@example.com")})
    leash = leash_for(make_leash, idp)
    alice = me(log_in(leash, idp, "alice")).json()
    eve = me(log_in(leash, idp, "eve")).json()
    assert alice["id"] != eve["id"]
    assert eve["name"] != alice["name"], "display names stay unique"


def test_admin_comes_from_the_groups_claim(leash_idp: Leash, idp: Idp) -> None:
    root = log_in(leash_idp, idp, "root")
    assert me(root).json()["admin"] is True
    assert root.get("/v1/users").status_code == 200
    alice = log_in(leash_idp, idp, "alice")
    assert alice.get("/v1/users").status_code == 403
    assert alice.get("/v1/agents").status_code == 403
    assert alice.get("/v1/audit/checkpoints").status_code == 403


def test_allowed_groups_limit_who_may_log_in(make_leash: MakeLeash, idp: Idp) -> None:
    leash = leash_for(make_leash, idp, oidc='allowed_groups = ["staff", "leash-admins"]')
    client = browser(leash)
    back = login_over_http(client, start(client), "mallory", idp.password("mallory"))
    refused = client.get(back.headers["location"])
    assert refused.status_code == 403
    assert refused.json()["error"] == "access_denied"
    assert session_cookie(client) is None
    assert me(log_in(leash, idp, "bob")).status_code == 200


def test_return_to_goes_only_to_this_origin(leash_idp: Leash, idp: Idp) -> None:
    for target in ("https://evil.example/", "//evil.example/x", "/\\evil.example"):
        client = browser(leash_idp)
        back = login_over_http(client, start(client, target), "alice", idp.password("alice"))
        done = client.get(back.headers["location"])
        assert done.status_code == 303
        assert done.headers["location"] == "/console", target


def test_logout_ends_the_session_for_good(leash_idp: Leash, idp: Idp) -> None:
    client = log_in(leash_idp, idp, "alice")
    stolen = session_cookie(client)
    assert stolen
    out = client.post("/logout", headers=origin(leash_idp))
    assert out.status_code == 204
    assert me(client).status_code == 401
    # The old cookie value, replayed, is dead too.
    replay = browser(leash_idp)
    replay.cookies.set("leash_session", stolen)
    assert me(replay).status_code == 401
    events = leash_idp.call("GET", "/v1/audit", leash_idp.admin_key).text
    assert '"kind":"session.logout"' in events


def test_sessions_end_after_their_absolute_and_idle_lifetimes(
    make_leash: MakeLeash, idp: Idp
) -> None:
    absolute = leash_for(make_leash, idp, oidc="session_ttl = 2\nsession_idle = 60")
    client = log_in(absolute, idp, "alice")
    assert me(client).status_code == 200
    value = session_cookie(client)
    assert value
    time.sleep(2.2)
    # The browser drops the cookie at its Max-Age; the server refuses it even if kept.
    kept = browser(absolute)
    kept.cookies.set("leash_session", value)
    ended = me(kept)
    assert ended.status_code == 401
    assert "log in again" in ended.json()["error_description"]

    idle = leash_for(make_leash, idp, oidc="session_ttl = 3600\nsession_idle = 2")
    client = log_in(idle, idp, "alice")
    time.sleep(2.2)
    assert me(client).status_code == 401


def test_one_address_cannot_start_logins_without_end(make_leash: MakeLeash, idp: Idp) -> None:
    limits = "[limits]\ntoken_rate = 0\ngateway_rate = 0\nunauthenticated_rate = 1\n"
    leash = make_leash(
        oidc_section(idp.issuer),
        {SECRET_ENV: idp.client_secret},
        limits + "unauthenticated_burst = 3\n",
    )
    client = browser(leash)
    answers = [client.get("/login") for _ in range(8)]
    started = [a for a in answers if a.status_code == 302]
    refused = [a for a in answers if a.status_code == 429]
    assert 3 <= len(started) <= 4, [a.status_code for a in answers]
    assert len(started) + len(refused) == 8
    assert all("set-cookie" not in a.headers for a in refused)
    assert all(int(a.headers["retry-after"]) >= 1 for a in refused)
    assert refused[0].json()["error"] == "rate_limited"


# --- login refusals (ATTACKS 54) ---------------------------------------------------------------


def test_a_callback_without_the_login_cookie_is_refused(leash_idp: Leash, idp: Idp) -> None:
    victim = browser(leash_idp)
    back = login_over_http(victim, start(victim), "alice", idp.password("alice"))
    # The attacker's own login's callback URL, opened in another browser (login CSRF).
    other = browser(leash_idp)
    refused = other.get(back.headers["location"])
    assert refused.status_code == 400
    assert "login cookie" in refused.json()["error_description"]
    assert session_cookie(other) is None


def test_a_wrong_or_foreign_state_is_refused_and_ends_the_login(leash_idp: Leash, idp: Idp) -> None:
    client = browser(leash_idp)
    back = login_over_http(client, start(client), "alice", idp.password("alice"))
    query = redirect_query(back)
    # The state of another browser's login.
    other = browser(leash_idp)
    foreign = dict(httpx.URL(start(other)).params)["state"]
    refused = client.get("/auth/callback", params={**query, "state": foreign})
    assert refused.status_code == 400
    assert "state" in refused.json()["error_description"]
    assert session_cookie(client) is None
    # The login is over: even the right state no longer completes it.
    assert client.get(back.headers["location"]).status_code == 400
    assert session_cookie(client) is None


def test_a_replayed_callback_or_code_makes_no_session(leash_idp: Leash, idp: Idp) -> None:
    client = browser(leash_idp)
    back = login_over_http(client, start(client), "alice", idp.password("alice"))
    login_cookie = client.cookies.get("leash_login")
    assert client.get(back.headers["location"]).status_code == 303
    # The same callback again, with the same login cookie: that login was taken.
    replay = browser(leash_idp)
    assert login_cookie
    replay.cookies.set("leash_login", login_cookie)
    assert replay.get(back.headers["location"]).status_code == 400
    assert session_cookie(replay) is None
    # The used code in a fresh login of this browser, with that login's state: the IdP refuses
    # the code.
    fresh = browser(leash_idp)
    state = dict(httpx.URL(start(fresh)).params)["state"]
    code = redirect_query(back)["code"]
    refused = fresh.get("/auth/callback", params={"code": code, "state": state, "iss": idp.issuer})
    assert refused.status_code == 400
    assert "refused the code" in refused.json()["error_description"]
    assert session_cookie(fresh) is None


def test_an_answer_naming_another_issuer_is_refused(leash_idp: Leash, idp: Idp) -> None:
    client = browser(leash_idp)
    back = login_over_http(client, start(client), "alice", idp.password("alice"))
    query = redirect_query(back)
    assert query["iss"] == idp.issuer
    refused = client.get("/auth/callback", params={**query, "iss": "https://mix-up.example"})
    assert refused.status_code == 400
    assert "issuer" in refused.json()["error_description"]
    assert session_cookie(client) is None


def test_a_session_id_set_before_login_is_never_used(leash_idp: Leash, idp: Idp) -> None:
    client = browser(leash_idp)
    planted = "attacker-chosen-session-id"
    client.cookies.set("leash_session", planted, domain="127.0.0.1", path="/")
    back = login_over_http(client, start(client), "alice", idp.password("alice"))
    assert client.get(back.headers["location"]).status_code == 303
    assert session_cookie(client) not in (None, planted)
    assert me(client).status_code == 200
    attacker = browser(leash_idp)
    attacker.cookies.set("leash_session", planted)
    assert me(attacker).status_code == 401


@pytest.mark.parametrize(
    "mode",
    [
        "wrong_nonce",
        "missing_nonce",
        "wrong_iss",
        "wrong_aud",
        "expired",
        "other_key",
        "unknown_kid",
        "alg_none",
        "hs256_with_client_secret",
    ],
)
def test_an_id_token_that_fails_a_check_makes_no_session(
    make_leash: MakeLeash, hostile_idp: HostileIdp, mode: Any
) -> None:
    leash = make_leash(oidc_section(hostile_idp.issuer), {SECRET_ENV: hostile_idp.client_secret})
    client = browser(leash)
    # Good first: the hostile IdP's flow works when it plays fair.
    back = client.get(start(client))
    assert client.get(back.headers["location"]).status_code == 303
    assert me(client).status_code == 200
    hostile_idp.mode = mode
    client = browser(leash)
    back = client.get(start(client))
    refused = client.get(back.headers["location"])
    assert refused.status_code == 400, (mode, refused.text)
    assert refused.json()["error"] == "invalid_request"
    assert session_cookie(client) is None
    # PKCE was used: the token request carried the verifier of the challenge.
    assert all("code_verifier" in form for form in hostile_idp.token_requests)


# --- sessions, CSRF and CORS (ATTACKS 55) ------------------------------------------------------


def test_a_cookie_change_needs_leashs_own_origin(leash_idp: Leash, idp: Idp) -> None:
    client = log_in(leash_idp, idp, "alice")
    body = {"kind": "bearer", "secret": "s3cret-value"}
    for headers in ({}, {"Origin": "https://evil.example"}, {"Origin": "null"}):
        refused = client.put("/v1/vault/mail", json=body, headers=headers)
        assert refused.status_code == 403, headers
        assert refused.json()["error"] == "csrf"
    assert client.get("/v1/vault").json()["credentials"] == []
    saved = client.put("/v1/vault/mail", json=body, headers=origin(leash_idp))
    assert saved.status_code in (200, 201, 204), saved.text
    assert "s3cret-value" not in client.get("/v1/vault").text
    # Logout is a change too.
    assert client.post("/logout").status_code == 403
    assert me(client).status_code == 200


MCP_UPSTREAM = '[[upstream]]\nname = "crm"\nkind = "mcp"\nurl = "http://127.0.0.1:9/mcp"\n'


def test_a_session_cookie_is_no_credential_at_the_gateway_or_mcp(
    make_leash: MakeLeash, idp: Idp
) -> None:
    leash_idp = make_leash(
        f"{oidc_section(idp.issuer)}\n{MCP_UPSTREAM}", {SECRET_ENV: idp.client_secret}
    )
    idp.set_redirect_uri(f"{leash_idp.url}/auth/callback")
    client = log_in(leash_idp, idp, "alice")
    path = f"/messages/cookie-{time.monotonic_ns()}"
    gateway = client.get(f"/gw/mail{path}", headers=origin(leash_idp))
    assert gateway.status_code == 401
    assert [r for r in leash_idp.upstream.seen() if r.path == path] == []
    mcp = client.post(
        "/mcp/crm",
        json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
        headers=origin(leash_idp),
    )
    assert mcp.status_code == 401, mcp.text
    authorize = client.post("/v1/authorize", json={}, headers=origin(leash_idp))
    assert authorize.status_code in (400, 401, 403)
    assert "secret" not in authorize.text


def test_no_endpoint_grants_credentialed_cors(leash_idp: Leash, idp: Idp) -> None:
    client = log_in(leash_idp, idp, "alice")
    for method, path in (("GET", "/v1/me"), ("OPTIONS", "/v1/me"), ("GET", "/console")):
        answer = client.request(
            method,
            path,
            headers={
                "Origin": "https://evil.example",
                "Access-Control-Request-Method": "POST",
            },
        )
        assert "access-control-allow-origin" not in answer.headers
        assert "access-control-allow-credentials" not in answer.headers


def test_the_console_is_served_with_a_strict_policy(leash_idp: Leash) -> None:
    http = browser(leash_idp)
    for path in ("/console", "/console/", "/console/assets/app.js", "/console/assets/app.css"):
        page = http.get(path)
        assert page.status_code == 200, path
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert page.headers["x-content-type-options"] == "nosniff"
    index = http.get("/console").text
    assert "<script>" not in index.replace(" ", "")
    assert "onload=" not in index
    assert "onclick=" not in index
    code = [
        line
        for line in http.get("/console/assets/app.js").text.splitlines()
        if not line.lstrip().startswith(("//", "*", "/*"))
    ]
    sinks = re.compile(
        r"\.(innerHTML|outerHTML)\s*[+]?=|insertAdjacentHTML\(|document\.write"
        r"|\beval\(|new Function"
    )
    assert [line for line in code if sinks.search(line)] == []


# --- IdP tokens as Bearer ----------------------------------------------------------------------


def test_an_idp_access_token_for_leash_is_a_bearer_credential(leash_idp: Leash, idp: Idp) -> None:
    http = browser(leash_idp)
    token = idp.access_token("alice")
    answer = http.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200, answer.text
    by_session = me(log_in(leash_idp, idp, "alice")).json()
    assert answer.json()["id"] == by_session["id"]
    # A token is no session cookie: no Origin needed.
    saved = http.put(
        "/v1/vault/mail",
        json={"kind": "bearer", "secret": "x"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert saved.status_code in (200, 201, 204), saved.text
    admin = idp.access_token("root")
    assert http.get("/v1/users", headers={"Authorization": f"Bearer {admin}"}).status_code == 200


def test_id_tokens_and_tokens_for_others_are_refused_as_bearer(leash_idp: Leash, idp: Idp) -> None:
    http = browser(leash_idp)
    for token in (idp.id_token("alice"), idp.access_token("alice", "https://other.example")):
        answer = http.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 401, answer.text


def test_forged_and_expired_idp_tokens_are_refused(
    make_leash: MakeLeash, hostile_idp: HostileIdp
) -> None:
    leash = make_leash(oidc_section(hostile_idp.issuer), {SECRET_ENV: hostile_idp.client_secret})
    http = browser(leash)
    good = hostile_idp.mint_access_token("sub-z", DEFAULT_AUDIENCE)
    assert http.get("/v1/me", headers={"Authorization": f"Bearer {good}"}).status_code == 200
    bad = [
        hostile_idp.mint_access_token("sub-z", DEFAULT_AUDIENCE, key="other"),
        hostile_idp.mint_access_token("sub-z", DEFAULT_AUDIENCE, exp=int(time.time()) - 5),
        hostile_idp.mint_access_token("sub-z", "leash"),  # the client id: an ID token's aud
        hostile_idp.mint_access_token("sub-z", DEFAULT_AUDIENCE, extra={"nonce": "n"}),
        good[: good.rindex(".") + 1] + "AAAA",
    ]
    for token in bad:
        answer = http.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 401, answer.text
    # Another issuer's token is no IdP token at all (and no API key).
    foreign = hostile_idp.mint_access_token("sub-z", DEFAULT_AUDIENCE, iss="https://x.example")
    assert http.get("/v1/me", headers={"Authorization": f"Bearer {foreign}"}).status_code == 401


# --- humans see their own; the admin disables --------------------------------------------------


def grant_by_session(leash: Leash, client: httpx.Client, agent_id: str) -> dict[str, Any]:
    body = {
        "agent": agent_id,
        "purpose": "Send the weekly report",
        "upstreams": ["mail"],
        "actions": ["mail:read", "mail:send"],
        "approval_required": ["mail:send"],
        "ttl_seconds": 900,
    }
    created = client.post("/v1/grants", json=body, headers=origin(leash))
    assert created.status_code == 201, created.text
    grant: dict[str, Any] = created.json()
    return grant


@pytest.fixture
def waiting_send(
    leash_idp: Leash, idp: Idp, tmp_path: Path
) -> Iterator[tuple[httpx.Client, dict[str, Any], list[httpx.Response]]]:
    """Alice (by session) delegated a task; its agent's send waits for her approval."""
    alice = log_in(leash_idp, idp, "alice")
    agent_id, key_file = agent_for(leash_idp, tmp_path)
    grant = grant_by_session(leash_idp, alice, agent_id)
    answers: list[httpx.Response] = []
    # Its own path: the recording upstream is shared by the session's tests.
    path = f"/messages/s{time.monotonic_ns()}/send"

    def send() -> None:
        with Agent.from_jwk_file(leash_idp.url, agent_id, key_file) as agent:
            task = agent.task(grant["handle"], approval_timeout=20)
            with httpx.Client(timeout=30) as client:
                answers.append(client.post(task.url("mail", path), content=b"hi", auth=task.auth))

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    yield alice, grant, answers
    thread.join(timeout=30)


def pending_approvals(client: httpx.Client) -> list[dict[str, Any]]:
    for _ in range(100):
        listed = client.get("/v1/approvals", params={"status": "pending"})
        assert listed.status_code == 200, listed.text
        if approvals := listed.json()["approvals"]:
            return list(approvals)
        time.sleep(0.1)
    raise AssertionError("no approval appeared")


def test_a_human_approves_by_session_and_the_agent_proceeds_once(
    leash_idp: Leash,
    waiting_send: tuple[httpx.Client, dict[str, Any], list[httpx.Response]],
) -> None:
    alice, grant, answers = waiting_send
    [approval] = pending_approvals(alice)
    assert approval["grant_id"] == grant["id"]
    without_origin = alice.post(f"/v1/approvals/{approval['id']}/approve")
    assert without_origin.status_code == 403
    assert without_origin.json()["error"] == "csrf"
    approved = alice.post(f"/v1/approvals/{approval['id']}/approve", headers=origin(leash_idp))
    assert approved.status_code == 200, approved.text
    for _ in range(100):
        if answers:
            break
        time.sleep(0.1)
    assert [a.status_code for a in answers] == [200]
    sends = [r for r in leash_idp.upstream.seen() if r.path == approval["path"]]
    assert len(sends) == 1
    events = leash_idp.call("GET", f"/v1/audit?grant_id={grant['id']}", leash_idp.admin_key)
    assert f'"approver":"{approval_view_approver(alice, approval["id"])}"' in events.text


def approval_view_approver(client: httpx.Client, approval_id: str) -> str:
    me_id: str = me(client).json()["id"]
    return me_id


def test_another_humans_approval_and_grant_are_not_found(
    leash_idp: Leash,
    idp: Idp,
    waiting_send: tuple[httpx.Client, dict[str, Any], list[httpx.Response]],
) -> None:
    alice, grant, _ = waiting_send
    [approval] = pending_approvals(alice)
    bob = log_in(leash_idp, idp, "bob")
    assert bob.get(f"/v1/approvals/{approval['id']}").status_code == 404
    assert bob.get(f"/v1/approvals/{approval['id']}/body").status_code == 404
    refused = bob.post(f"/v1/approvals/{approval['id']}/approve", headers=origin(leash_idp))
    assert refused.status_code == 404
    assert bob.get(f"/v1/grants/{grant['id']}").status_code == 404
    revoke = bob.post(f"/v1/grants/{grant['id']}/revoke", headers=origin(leash_idp))
    assert revoke.status_code == 404
    assert bob.get("/v1/approvals", params={"status": "pending"}).json()["approvals"] == []
    assert all(g["id"] != grant["id"] for g in bob.get("/v1/grants").json()["grants"])
    alice.post(f"/v1/approvals/{approval['id']}/deny", headers=origin(leash_idp))


def test_disabling_a_human_ends_sessions_keys_and_grants(
    leash_idp: Leash, idp: Idp, tmp_path: Path
) -> None:
    alice = log_in(leash_idp, idp, "alice")
    alice_id = me(alice).json()["id"]
    agent_id, _ = agent_for(leash_idp, tmp_path)
    grant = grant_by_session(leash_idp, alice, agent_id)
    token = idp.access_token("alice")
    # Only the admin disables.
    bob = log_in(leash_idp, idp, "bob")
    assert bob.post(f"/v1/users/{alice_id}/disable", headers=origin(leash_idp)).status_code == 403
    root = log_in(leash_idp, idp, "root")
    disabled = root.post(f"/v1/users/{alice_id}/disable", headers=origin(leash_idp))
    assert disabled.status_code == 200, disabled.text
    assert disabled.json()["disabled"] is True
    assert me(alice).status_code == 401
    bearer = browser(leash_idp).get("/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert bearer.status_code == 403
    status = leash_idp.call("GET", f"/v1/grants/{grant['id']}", leash_idp.admin_key).json()
    assert status["status"] == "revoked"
    # She cannot log in again either.
    client = browser(leash_idp)
    back = login_over_http(client, start(client), "alice", idp.password("alice"))
    assert client.get(back.headers["location"]).status_code == 403
    assert session_cookie(client) is None
    # An API key of a disabled human is refused too.
    key = leash_idp.add_user("carol")
    users = leash_idp.call("GET", "/v1/users", leash_idp.admin_key).json()["users"]
    carol = next(u["id"] for u in users if u["name"] == "carol")
    leash_idp.call("POST", f"/v1/users/{carol}/disable", leash_idp.admin_key)
    assert leash_idp.call("GET", "/v1/me", key).status_code == 401
    assert (
        leash_idp.call("POST", "/v1/users/usr_nobody/disable", leash_idp.admin_key).status_code
        == 404
    )
