"""OAuth connections (API §17, `[upstream.oauth]`): a human connects their account at the
upstream's OAuth server, Leash keeps the tokens sealed and fresh and injects the access token.

The upstream's OAuth server is the test IdP (npm `oidc-provider`, unmodified) with short access
tokens and refresh-token rotation, where a refresh token used twice kills the whole grant; the
upstream's API checks every token by introspection at it (`upstream_api.ResourceServer`). Leash
logs humans in at the same IdP (another use of its client `leash`). Covered: connect (the
consent step automated over HTTP), injection, expiry crossed with no failed request, 50
concurrent requests at expiry → one refresh, two cluster nodes (PostgreSQL) at expiry → one
refresh, a revoked refresh token → 502 `upstream_credential_expired`, an audit event, the
`reconnect` state and no retry storm, `DELETE` revoking at the server, and ATTACKS 59: a
callback without the starting session, with a reused `state`, or with another server's `iss`
is refused, and the refresh token appears in no answer, log line or event."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from conftest import Leash
from idp_fixtures import DEFAULT_AUDIENCE, Idp, login_over_http
from login_helpers import SECRET_ENV, agent_for, browser, leash_for, log_in, origin
from playwright.sync_api import Page, expect
from upstream_api import ResourceServer

from leash_agent import Agent

MakeLeash = Callable[..., Leash]

# oidc-provider's opaque tokens are 43 characters of base64url; the test checks this on a
# refresh token of its own before it relies on it.
TOKEN_SHAPE = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])")


def notes_upstream(api_url: str, issuer: str) -> str:
    return f"""
[[upstream]]
name = "notes"
url = "{api_url}"
route = [{{ method = "GET", path = "/notes/**", action = "notes:read" }}]

[upstream.oauth]
issuer = "{issuer}"
client_id = "leash"
client_secret_env = "{SECRET_ENV}"
scopes = ["notes.read"]
"""


def leash_with_notes(
    make_leash: MakeLeash,
    idp: Idp,
    api: ResourceServer,
    top: str = "",
    env: dict[str, str] | None = None,
) -> Leash:
    config = f"{top}\n{notes_upstream(api.url, idp.issuer)}"
    if env is None:
        leash = leash_for(make_leash, idp, top=config)
    else:
        from login_helpers import oidc_section

        leash = make_leash(
            f"{config}\n{oidc_section(idp.issuer)}", {SECRET_ENV: idp.client_secret, **env}
        )
    idp.set_redirect_uris(f"{leash.url}/auth/callback", f"{leash.url}/v1/vault/notes/callback")
    return leash


def start_connect(leash: Leash, client: httpx.Client) -> str:
    started = client.post("/v1/vault/notes/connect", headers=origin(leash))
    assert started.status_code == 200, started.text
    url: str = started.json()["authorization_url"]
    return url


def connect(leash: Leash, idp: Idp, client: httpx.Client, username: str = "alice") -> None:
    """The human's connection, in their browser: consent at the server, then the callback."""
    back = login_over_http(client, start_connect(leash, client), username, idp.password(username))
    done = client.get(back.headers["location"])
    assert done.status_code == 303, done.text
    assert done.headers["location"] == "/console#/vault"


def vault_entry(client: httpx.Client) -> dict[str, Any]:
    listed = client.get("/v1/vault")
    assert listed.status_code == 200, listed.text
    entry: dict[str, Any] = next(
        c for c in listed.json()["credentials"] if c["upstream"] == "notes"
    )
    return entry


def direct(leash: Leash, idp: Idp, username: str = "alice") -> httpx.Client:
    """The human calling the gateway directly with an IdP access token (API §6, direct mode)."""
    token = idp.access_token(username, DEFAULT_AUDIENCE)
    return httpx.Client(
        base_url=leash.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    )


@pytest.fixture
def notes_idp(make_idp: Callable[..., Idp]) -> Idp:
    return make_idp(
        audience=DEFAULT_AUDIENCE, access_token_ttl=6, refresh_tokens=True, scopes=["notes.read"]
    )


@pytest.fixture
def notes_api(
    notes_idp: Idp, make_resource_server: Callable[..., ResourceServer]
) -> ResourceServer:
    return make_resource_server(notes_idp)


@pytest.fixture
def notes_leash(make_leash: MakeLeash, notes_idp: Idp, notes_api: ResourceServer) -> Leash:
    return leash_with_notes(make_leash, notes_idp, notes_api)


def events(leash: Leash) -> list[dict[str, Any]]:
    """The whole audit trail (JSON lines)."""
    answer = leash.call("GET", "/v1/audit", leash.admin_key)
    assert answer.status_code == 200, answer.text
    return [json.loads(line) for line in answer.text.splitlines() if line]


def secrets_seen(leash: Leash, *texts: str) -> list[str]:
    """Every token-shaped string in Leash's log, its audit and the given texts."""
    audit = leash.call("GET", "/v1/audit", leash.admin_key)
    assert audit.status_code == 200
    return TOKEN_SHAPE.findall("".join(leash.output) + audit.text + "".join(texts))


def test_the_token_shape_check_recognises_this_servers_refresh_tokens(notes_idp: Idp) -> None:
    tokens = notes_idp.tokens("alice", scope="notes.read")
    assert TOKEN_SHAPE.fullmatch(tokens["refresh_token"]), "the leak check below would be blind"
    assert TOKEN_SHAPE.fullmatch(tokens["access_token"])


def test_an_agent_works_through_a_connection_across_expiry_with_no_failed_request(
    notes_leash: Leash, notes_idp: Idp, notes_api: ResourceServer, tmp_path: Path
) -> None:
    leash, idp = notes_leash, notes_idp
    alice = log_in(leash, idp, "alice")
    assert vault_entry_missing(alice)
    connect(leash, idp, alice)
    entry = vault_entry(alice)
    assert (entry["kind"], entry["status"]) == ("oauth", "active")
    upstreams = alice.get("/v1/upstreams").json()["upstreams"]
    assert next(u for u in upstreams if u["name"] == "notes")["credential"] == "oauth"

    agent_id, key_file = agent_for(leash, tmp_path)
    body = {
        "agent": agent_id,
        "purpose": "Summarise my notes",
        "upstreams": ["notes"],
        "actions": ["notes:read"],
        "ttl_seconds": 900,
    }
    grant = alice.post("/v1/grants", json=body, headers=origin(leash))
    assert grant.status_code == 201, grant.text
    answers: list[httpx.Response] = []
    with Agent.from_jwk_file(leash.url, agent_id, key_file) as agent:
        task = agent.task(grant.json()["handle"])
        with httpx.Client(timeout=30) as http:
            # 14 s against 6-s access tokens: two expiries crossed.
            ends = time.monotonic() + 14
            while time.monotonic() < ends:
                answers.append(
                    http.get(task.url("notes", f"/notes/{len(answers)}"), auth=task.auth)
                )
                time.sleep(0.25)
    assert [a.status_code for a in answers if a.status_code != 200] == [], answers[-1].text
    seen = answers[0].json()
    assert (seen["sub"], seen["client_id"]) == (idp.sub("alice"), "leash")
    assert "notes.read" in seen["scope"].split()
    tokens = {r.token_sha256 for r in notes_api.requests()}
    assert len(tokens) >= 3, "the access token was refreshed as it neared expiry"
    assert all(r.status == 200 for r in notes_api.requests())
    # The agent's own token and proof never reached the upstream.
    assert all("dpop" not in r.headers for r in notes_api.requests())
    stats = idp.stats()
    assert stats["refresh_token"] >= 2
    assert stats["refresh_token_failed"] == 0
    kinds = [e["kind"] for e in events(leash)]
    assert "credential.connected" in kinds
    assert kinds.count("credential.refreshed") >= 2
    # No token of the connection in any answer, log line or event.
    vault_text = alice.get("/v1/vault").text
    assert secrets_seen(leash, vault_text, *(a.text for a in answers)) == []


def vault_entry_missing(client: httpx.Client) -> bool:
    return all(c["upstream"] != "notes" for c in client.get("/v1/vault").json()["credentials"])


def wait_until_expired() -> None:
    # The connection's access token lives 6 s: past it, every request needs the refresh.
    time.sleep(6.5)


def test_fifty_concurrent_requests_at_expiry_cause_one_refresh(
    notes_leash: Leash, notes_idp: Idp, notes_api: ResourceServer
) -> None:
    leash, idp = notes_leash, notes_idp
    alice = log_in(leash, idp, "alice")
    connect(leash, idp, alice)
    wait_until_expired()
    before = idp.stats()["refresh_token"]
    gateway = direct(leash, idp)
    barrier = threading.Barrier(50)

    def call(i: int) -> int:
        barrier.wait()
        return gateway.get(f"/gw/notes/notes/c{i}").status_code

    with ThreadPoolExecutor(50) as pool:
        statuses = list(pool.map(call, range(50)))
    assert statuses == [200] * 50
    stats = idp.stats()
    # One refresh; a second with the same (rotated) token would have killed the grant.
    assert stats["refresh_token"] - before == 1
    assert stats["refresh_token_failed"] == 0
    assert len({r.token_sha256 for r in notes_api.requests()}) == 1


def test_a_revoked_refresh_token_gives_502_an_event_and_a_reconnect_state_but_no_retry_storm(
    notes_leash: Leash, notes_idp: Idp, notes_api: ResourceServer
) -> None:
    leash, idp = notes_leash, notes_idp
    alice = log_in(leash, idp, "alice")
    connect(leash, idp, alice)
    gateway = direct(leash, idp)
    assert gateway.get("/gw/notes/notes/before").status_code == 200
    assert idp.revoke_refresh_tokens("alice") >= 1
    wait_until_expired()
    gateway = direct(leash, idp)
    answers = [gateway.get(f"/gw/notes/notes/after{i}") for i in range(20)]
    assert {a.status_code for a in answers} == {502}, "".join(leash.output) + answers[0].text
    assert {a.json()["error"] for a in answers} == {"upstream_credential_expired"}
    stats = idp.stats()
    # One refused refresh, then no more calls to the server.
    assert stats["refresh_token_failed"] == 1, stats
    assert vault_entry(alice)["status"] == "reconnect"
    failed = [e for e in events(leash) if e["kind"] == "credential.refresh_failed"]
    assert [(e["upstream"], e["reason"]) for e in failed] == [("notes", "invalid_grant")]
    # Nothing reached the upstream after the revocation.
    assert [r.path for r in notes_api.requests()] == ["/notes/before"]
    # Connecting again mends it.
    connect(leash, idp, alice)
    assert vault_entry(alice)["status"] == "active"
    assert direct(leash, idp).get("/gw/notes/notes/again").status_code == 200


def test_a_failing_token_endpoint_is_not_retried_by_every_request(
    notes_leash: Leash, notes_idp: Idp
) -> None:
    leash, idp = notes_leash, notes_idp
    alice = log_in(leash, idp, "alice")
    connect(leash, idp, alice)
    wait_until_expired()
    gateway = direct(leash, idp)
    idp.fail_token_endpoint(503, 1000)
    answers = [gateway.get(f"/gw/notes/notes/down{i}").status_code for i in range(10)]
    assert set(answers) == {502}
    # One try, then the back-off: not one per request.
    assert idp.stats()["injected_failures"] == 1
    # A passing failure is no reason to make the human reconnect.
    assert vault_entry(alice)["status"] == "active"


def test_delete_revokes_the_connection_at_the_server(
    notes_leash: Leash, notes_idp: Idp, notes_api: ResourceServer
) -> None:
    leash, idp = notes_leash, notes_idp
    alice = log_in(leash, idp, "alice")
    connect(leash, idp, alice)
    gateway = direct(leash, idp)
    assert gateway.get("/gw/notes/notes/x").status_code == 200
    before = idp.stats()["revoked"]
    deleted = alice.delete("/v1/vault/notes", headers=origin(leash))
    assert deleted.status_code == 204, deleted.text
    # Revoked after the answer (the human never waits on the server), promptly.
    deadline = time.monotonic() + 8
    while idp.stats()["revoked"] - before < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert idp.stats()["revoked"] - before == 2, "refresh token and access token revoked"
    assert vault_entry_missing(alice)
    # The upstream gets no credential now: its own check refuses the request.
    assert gateway.get("/gw/notes/notes/y").status_code == 401


def test_a_static_secret_cannot_pose_as_a_connection(notes_leash: Leash, notes_idp: Idp) -> None:
    alice = log_in(notes_leash, notes_idp, "alice")
    put = alice.put(
        "/v1/vault/notes", json={"kind": "oauth", "secret": "x"}, headers=origin(notes_leash)
    )
    assert put.status_code == 400
    assert "connect" in put.json()["error_description"]
    # An upstream without [upstream.oauth] cannot be connected.
    started = alice.post("/v1/vault/mail/connect", headers=origin(notes_leash))
    assert started.status_code == 400
    assert started.json()["error"] == "invalid_request"


def test_the_console_connects_an_account_and_asks_to_reconnect_when_it_broke(
    notes_leash: Leash, notes_idp: Idp, browser_page: Page
) -> None:
    leash, idp, page = notes_leash, notes_idp, browser_page

    def sign_in_at_the_idp() -> None:
        page.fill("#username", "alice")
        page.fill("#password", idp.password("alice"))
        page.click("#submit")

    page.goto(f"{leash.url}/console")
    page.get_by_role("link", name="Log in").click()
    sign_in_at_the_idp()
    expect(page.locator("#who")).to_contain_text("alice@example.com")
    page.goto(f"{leash.url}/console#/vault")
    page.click('[data-connect="notes"]')
    # The server's consent page (its login), then back to the console's vault.
    sign_in_at_the_idp()
    row = page.locator('tr[data-upstream="notes"]')
    expect(row).to_contain_text("OAuth connection")
    expect(row).not_to_contain_text("reconnect")
    assert direct(leash, idp).get("/gw/notes/notes/console").status_code == 200
    # The human revoked Leash's access at the server: the next refresh is refused.
    idp.revoke_refresh_tokens("alice")
    wait_until_expired()
    assert direct(leash, idp).get("/gw/notes/notes/console2").status_code == 502
    page.reload()
    expect(row).to_contain_text("reconnect needed")
    row.locator('[data-connect="notes"]').click()
    sign_in_at_the_idp()
    expect(row).to_contain_text("OAuth connection")
    expect(row).not_to_contain_text("reconnect")
    assert direct(leash, idp).get("/gw/notes/notes/console3").status_code == 200


# --- ATTACKS 59: connect CSRF and mix-up ------------------------------------------------------


def consent(idp: Idp, authorization_url: str, username: str = "alice") -> str:
    """The server's redirect back (the callback URL with `code`, `state`, `iss`), not followed."""
    with httpx.Client(timeout=10) as elsewhere:
        back = login_over_http(elsewhere, authorization_url, username, idp.password(username))
    location: str = back.headers["location"]
    return location


def test_a_callback_without_the_starting_session_is_refused(
    notes_leash: Leash, notes_idp: Idp
) -> None:
    leash, idp = notes_leash, notes_idp
    alice = log_in(leash, idp, "alice")
    callback = consent(idp, start_connect(leash, alice))
    # No session at all: a browser that never logged in to Leash.
    with browser(leash) as stranger:
        refused = stranger.get(callback)
        assert refused.status_code == 400
        assert "not logged in" in refused.json()["error_description"]
    # The state was spent by that try: even Alice's own browser cannot use it now.
    assert alice.get(callback).status_code == 400
    assert vault_entry_missing(alice)


def test_another_humans_session_cannot_finish_a_connection(
    notes_leash: Leash, notes_idp: Idp
) -> None:
    """Mallory starts a connection and makes Bob's browser finish it: Bob's account at the
    upstream would land in Mallory's vault. Refused: Bob's session is not the one that started
    it. And a second session of Alice's own is not either."""
    leash, idp = notes_leash, notes_idp
    mallory = log_in(leash, idp, "mallory")
    bob = log_in(leash, idp, "bob")
    callback = consent(idp, start_connect(leash, mallory), "bob")
    refused = bob.get(callback)
    assert refused.status_code == 400
    assert "not the one that started" in refused.json()["error_description"]
    assert vault_entry_missing(mallory)
    assert vault_entry_missing(bob)
    alice = log_in(leash, idp, "alice")
    alice_elsewhere = log_in(leash, idp, "alice")
    callback = consent(idp, start_connect(leash, alice))
    assert alice_elsewhere.get(callback).status_code == 400
    assert vault_entry_missing(alice)


def test_a_connection_started_with_a_key_needs_a_session_of_the_same_human(
    notes_leash: Leash, notes_idp: Idp
) -> None:
    leash, idp = notes_leash, notes_idp
    alice = log_in(leash, idp, "alice")
    bob = log_in(leash, idp, "bob")
    token = idp.access_token("alice", DEFAULT_AUDIENCE)
    started = leash.http.post(
        "/v1/vault/notes/connect", headers={"Authorization": f"Bearer {token}"}
    )
    assert started.status_code == 200, started.text
    callback = consent(idp, started.json()["authorization_url"])
    assert bob.get(callback).status_code == 400
    started = leash.http.post(
        "/v1/vault/notes/connect", headers={"Authorization": f"Bearer {token}"}
    )
    callback = consent(idp, started.json()["authorization_url"])
    assert alice.get(callback).status_code == 303
    assert vault_entry(alice)["status"] == "active"


def test_a_reused_or_foreign_state_is_refused(notes_leash: Leash, notes_idp: Idp) -> None:
    leash, idp = notes_leash, notes_idp
    alice = log_in(leash, idp, "alice")
    callback = consent(idp, start_connect(leash, alice))
    assert alice.get(callback).status_code == 303
    # The same answer again (replay): its state is used.
    replay = alice.get(callback)
    assert replay.status_code == 400
    assert "used or expired" in replay.json()["error_description"]
    # A state Leash never made, or none.
    query = parse_qs(urlsplit(callback).query)
    forged = {**{k: v[0] for k, v in query.items()}, "state": secrets.token_urlsafe(32)}
    assert alice.get(f"/v1/vault/notes/callback?{urlencode(forged)}").status_code == 400
    del forged["state"]
    assert alice.get(f"/v1/vault/notes/callback?{urlencode(forged)}").status_code == 400


def test_another_servers_iss_or_none_is_refused(notes_leash: Leash, notes_idp: Idp) -> None:
    """RFC 9207 mix-up: the server says it always names itself, so an answer naming another
    issuer, or none, did not come from it."""
    leash, idp = notes_leash, notes_idp
    alice = log_in(leash, idp, "alice")
    for iss in ("https://evil.example", None):
        callback = consent(idp, start_connect(leash, alice))
        query = {k: v[0] for k, v in parse_qs(urlsplit(callback).query).items()}
        assert query["iss"] == idp.issuer
        if iss is None:
            del query["iss"]
        else:
            query["iss"] = iss
        refused = alice.get(f"/v1/vault/notes/callback?{urlencode(query)}")
        assert refused.status_code == 400
        assert "iss" in refused.json()["error_description"]
    assert vault_entry_missing(alice)


def test_an_answer_for_another_upstream_is_refused(
    make_leash: MakeLeash, notes_idp: Idp, notes_api: ResourceServer
) -> None:
    """Two upstreams at one server: a state made for one is refused at the other's callback."""
    idp = notes_idp
    second = (
        notes_upstream(notes_api.url, idp.issuer)
        .replace('"notes"', '"wiki"')
        .replace("notes:read", "wiki:read")
        .replace("/notes/**", "/wiki/**")
    )
    leash = leash_with_notes(make_leash, idp, notes_api, top=second)
    idp.set_redirect_uris(
        f"{leash.url}/auth/callback",
        f"{leash.url}/v1/vault/notes/callback",
        f"{leash.url}/v1/vault/wiki/callback",
    )
    alice = log_in(leash, idp, "alice")
    callback = consent(idp, start_connect(leash, alice))
    wrong = callback.replace("/v1/vault/notes/callback", "/v1/vault/wiki/callback")
    refused = alice.get(wrong)
    assert refused.status_code == 400
    assert "another upstream" in refused.json()["error_description"]


# --- two nodes of a cluster -------------------------------------------------------------------


@pytest.fixture
def postgres_database() -> Iterator[str]:
    """A fresh database on the test PostgreSQL server (`LEASH_TEST_POSTGRES`, as the Rust tests);
    no server is a failure, never a skip."""
    server = os.environ.get("LEASH_TEST_POSTGRES", "postgres://postgres@127.0.0.1:5432/postgres")
    name = f"leash_py_{secrets.token_hex(6)}"
    subprocess.run(["psql", server, "-qc", f"CREATE DATABASE {name}"], check=True)
    base = server.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    subprocess.run(["psql", server, "-qc", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"])


def test_two_cluster_nodes_at_expiry_refresh_once(
    make_leash: MakeLeash,
    notes_idp: Idp,
    notes_api: ResourceServer,
    postgres_database: str,
) -> None:
    idp = notes_idp
    shared = {"LEASH_MASTER_KEY": base64.b64encode(secrets.token_bytes(32)).decode()}
    top = f'database = "{postgres_database}"\n'
    a = leash_with_notes(make_leash, idp, notes_api, top=top, env=shared)
    b = leash_with_notes(make_leash, idp, notes_api, top=top, env=shared)
    idp.set_redirect_uris(f"{a.url}/auth/callback", f"{a.url}/v1/vault/notes/callback")
    alice = log_in(a, idp, "alice")
    connect(a, idp, alice)
    # Node B serves Alice's connection too (one store, one master key).
    assert direct(b, idp).get("/gw/notes/notes/b0").status_code == 200
    wait_until_expired()
    before = idp.stats()["refresh_token"]
    gateways = [direct(a, idp), direct(b, idp)]
    barrier = threading.Barrier(40)

    def call(i: int) -> int:
        barrier.wait()
        return gateways[i % 2].get(f"/gw/notes/notes/n{i}").status_code

    with ThreadPoolExecutor(40) as pool:
        statuses = list(pool.map(call, range(40)))
    assert statuses == [200] * 40
    stats = idp.stats()
    assert stats["refresh_token"] - before == 1, stats
    assert stats["refresh_token_failed"] == 0
    # Both nodes injected the one fresh token.
    fresh = {r.token_sha256 for r in notes_api.requests() if r.path.startswith("/notes/n")}
    assert len(fresh) == 1
