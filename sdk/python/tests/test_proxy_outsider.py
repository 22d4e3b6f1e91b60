"""An outsider's attacks on the first part of the forward proxy (API §3, §16; ATTACKS 58), against
the real `leash` binary: the proxy CA at `GET /v1/proxy/ca`, the `lpx_` proxy credential from the
token exchange and its revocation, the `[proxy]` and `hosts` configuration, and the HTTP/1
`Connection: close` change for answers that leave the request body unread.

Each test is one attack and asserts the secure behaviour; the two that failed against the binary
reviewed were findings, fixed since and marked `# FIXED:`. The cluster test needs the test
PostgreSQL server
(`LEASH_TEST_POSTGRES`, default postgres://postgres@127.0.0.1:5432/postgres)."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import LIMITS, ROUTES, Leash, Setup, Upstream, cli, serve, set_up
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from proxy_fixtures import (
    GRANT_TYPE,
    JWT_BEARER,
    PROXY_CREDENTIAL,
    STATIC_STATUS,
    TOKEN_EXCHANGE,
    exchange_form,
    h2_frame,
    hpack_literal,
    huffman_digits,
    revoke,
)

from leash_agent import Agent, SigningKey

AUTHORIZE_KEY = "px-outsider-authorize-key-" + secrets.token_hex(16)
HOSTS = ["finance.example.com", "pay.finance-two.example"]


def finance(upstream_url: str, hosts: list[str] | None = None, proxy: bool = True) -> str:
    """`[proxy]` and a browser upstream `finance` (with `hosts`), plus an MCP upstream `crm`;
    the conftest's `mail` upstream (no hosts) follows."""
    table = '[proxy]\nlisten = "127.0.0.1:0"\napproval_wait = 5\n' if proxy else ""
    return f"""{table}
[[upstream]]
name = "finance"
url = "{upstream_url}"
hosts = {json.dumps(HOSTS if hosts is None else hosts)}
[[upstream.route]]
method = "GET"
path = "/ledger/**"
action = "fin:read"
[[upstream.route]]
method = "POST"
path = "/pay"
action = "fin:pay"

[[upstream]]
name = "crm"
url = "http://127.0.0.1:9/mcp"
kind = "mcp"
[[upstream.tool]]
name = "list_contacts"
action = "crm:list"
"""


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def px(upstream: Upstream) -> Iterator[Leash]:
    server = Leash(upstream, finance(upstream.url), env={"LEASH_AUTHORIZE_KEY": AUTHORIZE_KEY})
    yield server
    server.stop()


@dataclass
class Ctx:
    leash: Leash
    setup: Setup
    agent: Agent
    dpop: SigningKey

    @property
    def token_url(self) -> str:
        return self.agent.issuer + "/oauth2/token"


def ctx_of(leash: Leash, directory: Path, issuer: str | None = None, **grant: Any) -> Ctx:
    fields: dict[str, Any] = {
        "upstreams": ["finance", "mail", "crm"],
        "actions": ["fin:read", "fin:pay", "mail:read", "crm:list"],
        "approval_required": [],
        **grant,
    }
    setup = set_up(leash, directory, **fields)
    agent = Agent.from_jwk_file(issuer or leash.url, setup.agent_id, setup.key_file)
    return Ctx(leash, setup, agent, SigningKey.generate())


@pytest.fixture
def ctx(px: Leash, tmp_path: Path) -> Iterator[Ctx]:
    c = ctx_of(px, tmp_path)
    yield c
    c.agent.close()


def assertion(c: Ctx, now: int | None = None) -> str:
    return c.agent._key.client_assertion(c.agent.agent_id, c.agent.issuer, now or c.agent._now())


def exchange(
    c: Ctx,
    *,
    scope: str | None = None,
    token_type: str | None = PROXY_CREDENTIAL,
    proof: str | None = "",
    client_assertion: str | None = None,
    handle: str | None = None,
) -> httpx.Response:
    form = exchange_form(
        c.agent,
        handle or c.setup.handle,
        token_type=token_type,
        scope=scope,
        client_assertion=client_assertion or assertion(c),
    )
    if proof == "":
        proof = c.dpop.dpop_proof("POST", c.token_url, c.agent._now())
    headers = {"DPoP": proof} if proof is not None else {}
    return c.leash.http.post("/oauth2/token", data=form, headers=headers)


def credential(c: Ctx, **options: Any) -> str:
    answer = exchange(c, **options)
    assert answer.status_code == 200, answer.text
    value: str = answer.json()["access_token"]
    assert value.startswith("lpx_"), value[:8]
    return value


def access_token(c: Ctx) -> str:
    answer = exchange(c, token_type=None)
    assert answer.status_code == 200, answer.text
    value: str = answer.json()["access_token"]
    return value


def claims(cred: str) -> dict[str, Any]:
    """What the credential carries (it is `lpx_` + base64url(JSON) + `.` + a MAC)."""
    body = cred.removeprefix("lpx_").split(".")[0]
    parsed: dict[str, Any] = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return parsed


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def events(leash: Leash, kind: str) -> list[dict[str, Any]]:
    answer = leash.call("GET", "/v1/audit?limit=100000", leash.admin_key)
    assert answer.status_code == 200, answer.text
    return [e for e in map(json.loads, answer.text.splitlines()) if e["kind"] == kind]


def revoked(leash: Leash, cred: str) -> bool:
    jti = claims(cred)["jti"]
    return any(e["request_id"] == jti for e in events(leash, "token.revoked"))


def revoke_as_agent(c: Ctx, token: str, client_assertion: str | None = None) -> httpx.Response:
    form = {
        "token": token,
        "client_id": c.agent.agent_id,
        "client_assertion_type": JWT_BEARER,
        "client_assertion": client_assertion or assertion(c),
    }
    return c.leash.http.post("/oauth2/revoke", data=form)


def ca_pem(leash: Leash) -> str:
    answer = leash.http.get("/v1/proxy/ca")
    assert answer.status_code == 200, answer.text
    return answer.text


def dns_matches(name: str, constraint: str) -> bool:
    """RFC 5280 §4.2.1.10: a dNSName constraint is satisfied by the name itself and by any name
    made by adding labels on the left (a leading `.` is read as subdomains only, as OpenSSL,
    Go and BoringSSL do)."""
    name, constraint = name.lower(), constraint.lower()
    if constraint.startswith("."):
        return name.endswith(constraint)
    return name == constraint or name.endswith("." + constraint)


def ca_allows(cert: x509.Certificate, name: str) -> bool:
    nc = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    permitted = [s.value for s in nc.permitted_subtrees or [] if isinstance(s, x509.DNSName)]
    excluded = [s.value for s in nc.excluded_subtrees or [] if isinstance(s, x509.DNSName)]
    return any(dns_matches(name, c) for c in permitted) and not any(
        dns_matches(name, c) for c in excluded
    )


class Node(Leash):
    """`leash serve` on a data dir that outlives it, with its own config text."""

    def __init__(
        self,
        data: Path,
        upstream: Upstream,
        admin_key: str,
        config_text: str,
        database: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.upstream = upstream
        self.admin_key = admin_key
        self.data = data
        self.dir = data.parent
        config = data.parent / f"leash-{secrets.token_hex(3)}.toml"
        top = f'database = "{database}"\nissuer = "http://leash.test"\n' if database else ""
        config.write_text(top + config_text)
        self.process, self.output, self.url = serve(
            config, data, {"LEASH_ADMIN_TOKEN": admin_key, **(env or {})}
        )
        self.http = httpx.Client(base_url=self.url or "http://127.0.0.1:9", timeout=15)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.http.close()

    def log(self) -> str:
        return "".join(self.output)


# --- issuing the credential --------------------------------------------------------------------


def test_the_credential_is_bound_to_the_grant_and_never_outlives_an_access_token(
    px: Leash, tmp_path: Path
) -> None:
    for ttl, most in ((900, 300), (40, 40)):
        c = ctx_of(px, tmp_path, ttl_seconds=ttl)
        answer = exchange(c)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["issued_token_type"] == PROXY_CREDENTIAL
        assert body["token_type"] == "N_A"
        assert "refresh_token" not in body
        assert 0 < body["expires_in"] <= most, body
        cred = body["access_token"]
        assert cred.startswith("lpx_")
        assert cred.isascii()
        carried = claims(cred)
        assert carried["grant_id"] == c.setup.grant_id
        assert carried["client_id"] == c.setup.agent_id
        assert carried["exp"] - carried["iat"] <= most
        expires = datetime.datetime.fromisoformat(
            c.setup.grant["expires_at"].replace("Z", "+00:00")
        )
        assert carried["exp"] <= expires.timestamp() + 1
        # An access token of the same moment lives at least as long.
        token = exchange(c, token_type=None).json()
        assert token["expires_in"] >= body["expires_in"] - 2


def test_no_credential_without_a_valid_dpop_proof_or_with_a_replayed_proof(ctx: Ctx) -> None:
    assert exchange(ctx, proof=None).json()["error"] == "invalid_dpop_proof"
    now = ctx.agent._now()
    bad = {
        "wrong method": ctx.dpop.dpop_proof("GET", ctx.token_url, now),
        "wrong url": ctx.dpop.dpop_proof("POST", ctx.leash.url + "/oauth2/revoke", now),
        "stale": ctx.dpop.dpop_proof("POST", ctx.token_url, now - 600),
        "junk": "eyJ0eXAiOiJkcG9wK2p3dCJ9.e30.",
    }
    for why, proof in bad.items():
        answer = exchange(ctx, proof=proof)
        assert answer.status_code == 400, (why, answer.text)
        assert answer.json()["error"] == "invalid_dpop_proof", why
    proof = ctx.dpop.dpop_proof("POST", ctx.token_url, now)
    assert exchange(ctx, proof=proof).status_code == 200
    again = exchange(ctx, proof=proof)
    assert again.status_code == 400, again.text
    assert again.json()["error"] == "invalid_dpop_proof", again.text


def test_no_credential_with_a_replayed_or_foreign_client_assertion(ctx: Ctx) -> None:
    used = assertion(ctx)
    assert exchange(ctx, client_assertion=used).status_code == 200
    again = exchange(ctx, client_assertion=used)
    assert again.status_code == 401, again.text
    assert again.json()["error"] == "invalid_client", again.text
    stranger = SigningKey.generate().client_assertion(
        ctx.agent.agent_id, ctx.agent.issuer, ctx.agent._now()
    )
    answer = exchange(ctx, client_assertion=stranger)
    assert answer.status_code == 401, answer.text
    assert answer.json()["error"] == "invalid_client", answer.text
    unsigned = used.rsplit(".", 1)[0] + "."
    assert exchange(ctx, client_assertion=unsigned).status_code == 401


def test_no_credential_for_a_revoked_completed_expired_exhausted_or_foreign_grant(
    px: Leash, tmp_path: Path
) -> None:
    revoked_grant = ctx_of(px, tmp_path)
    answer = revoked_grant.leash.call(
        "POST", f"/v1/grants/{revoked_grant.setup.grant_id}/revoke", revoked_grant.setup.user_key
    )
    assert answer.status_code == 200, answer.text
    completed = ctx_of(px, tmp_path)
    answer = completed.leash.call(
        "POST", f"/v1/grants/{completed.setup.grant_id}/complete", completed.setup.user_key
    )
    assert answer.status_code == 200, answer.text
    exhausted = ctx_of(px, tmp_path, max_requests=1)
    task = exhausted.agent.task(exhausted.setup.handle)
    assert httpx.get(task.url("mail", "/messages/1"), auth=task.auth).status_code == 200
    expired = ctx_of(px, tmp_path, ttl_seconds=2)
    thief = ctx_of(px, tmp_path)
    time.sleep(2.5)
    for name, c, handle in (
        ("revoked", revoked_grant, None),
        ("completed", completed, None),
        ("exhausted", exhausted, None),
        ("expired", expired, None),
        ("another agent's", thief, revoked_grant.setup.handle),
        ("another live agent's", thief, completed.setup.handle),
        ("junk handle", thief, "lgh_" + secrets.token_urlsafe(24)),
    ):
        answer = exchange(c, handle=handle)
        assert answer.status_code == 400, (name, answer.text)
        assert answer.json()["error"] == "invalid_grant", (name, answer.text)
        assert "lpx_" not in answer.text
    other = ctx_of(px, tmp_path)
    answer = exchange(thief, handle=other.setup.handle)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "invalid_grant", answer.text


def test_no_credential_for_a_scope_outside_the_grant(px: Leash, tmp_path: Path) -> None:
    c = ctx_of(px, tmp_path, actions=["fin:read", "mail:read"])
    for scope in ("fin:pay", "fin:read fin:pay", "mail:send", "*", "fin:*", "crm:list", " "):
        answer = exchange(c, scope=scope)
        assert answer.status_code == 400, (scope, answer.text)
        assert answer.json()["error"] in ("invalid_scope", "invalid_request"), (scope, answer.text)
    narrow = credential(c, scope="fin:read")
    assert claims(narrow)["scope"] == "fin:read"


def test_an_unknown_or_repeated_requested_token_type_is_refused(ctx: Ctx) -> None:
    for token_type in (
        "urn:leash:params:oauth:token-type:proxy-credentials",
        "URN:LEASH:PARAMS:OAUTH:TOKEN-TYPE:PROXY-CREDENTIAL",
        "urn:ietf:params:oauth:token-type:refresh_token",
        "urn:ietf:params:oauth:token-type:id_token",
        PROXY_CREDENTIAL + "\u0000",
        "",
    ):
        answer = exchange(ctx, token_type=token_type)
        if token_type == "" and answer.status_code == 200:
            # An empty parameter read as absent: it must then be an ordinary access token.
            assert answer.json()["issued_token_type"].endswith(":access_token")
            continue
        assert answer.status_code == 400, (token_type, answer.text)
        assert "access_token" not in answer.json(), token_type
    # The parameter twice (RFC 6749 §3.2: parameters must not be repeated).
    for second in (PROXY_CREDENTIAL, "urn:ietf:params:oauth:token-type:access_token"):
        form = [
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", ctx.setup.handle),
            ("subject_token_type", GRANT_TYPE),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", assertion(ctx)),
            ("requested_token_type", PROXY_CREDENTIAL),
            ("requested_token_type", second),
        ]
        body = urllib.parse.urlencode(form)
        answer = ctx.leash.http.post(
            "/oauth2/token",
            content=body,
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "DPoP": ctx.dpop.dpop_proof("POST", ctx.token_url, ctx.agent._now()),
            },
        )
        assert answer.status_code == 400, (second, answer.text)


def test_no_credential_when_the_proxy_is_not_configured(
    make_leash: Callable[..., Leash], upstream: Upstream, tmp_path: Path
) -> None:
    for extra in ("", finance(upstream.url, proxy=False)):
        leash = make_leash(extra)
        actions = ["mail:read"] if not extra else ["fin:read", "mail:read"]
        upstreams = ["mail"] if not extra else ["finance", "mail"]
        c = ctx_of(leash, tmp_path, upstreams=upstreams, actions=actions)
        answer = exchange(c)
        assert answer.status_code == 400, answer.text
        assert "lpx_" not in answer.text
        assert leash.http.get("/v1/proxy/ca").status_code == 404
        # An ordinary exchange still works.
        assert exchange(c, token_type=None).status_code == 200


# --- the credential is not an access token -----------------------------------------------------


def test_the_credential_is_refused_at_the_gateway_in_every_header(ctx: Ctx) -> None:
    cred = credential(ctx)
    basic = "Basic " + base64.b64encode(f"leash:{cred}".encode()).decode()
    for upstream, path in (("mail", "/messages/px-gw"), ("finance", "/ledger/px-gw")):
        url = f"{ctx.leash.url}/gw/{upstream}{path}"
        proof = ctx.dpop.dpop_proof("GET", url, ctx.agent._now(), cred)
        for headers in (
            {"Authorization": f"DPoP {cred}", "DPoP": proof},
            {"Authorization": f"Bearer {cred}"},
            {"Authorization": basic},
            {"Proxy-Authorization": basic},
            {"Proxy-Authorization": f"Bearer {cred}"},
            {"Cookie": f"leash={cred}"},
        ):
            # A fresh proof for each (a replay would be refused for that reason alone).
            if "DPoP" in headers:
                headers["DPoP"] = ctx.dpop.dpop_proof("GET", url, ctx.agent._now(), cred)
            answer = httpx.get(url, headers=headers, timeout=10)
            assert answer.status_code == 401, (upstream, headers.keys(), answer.text)
    assert not [r for r in ctx.leash.upstream.seen() if r.path.endswith("/px-gw")]


def test_the_credential_is_refused_at_mcp(ctx: Ctx) -> None:
    cred = credential(ctx)
    url = f"{ctx.leash.url}/mcp/crm"
    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    for scheme in ("DPoP", "Bearer"):
        headers = {
            "Authorization": f"{scheme} {cred}",
            "DPoP": ctx.dpop.dpop_proof("POST", url, ctx.agent._now(), cred),
            "Accept": "application/json, text/event-stream",
        }
        answer = httpx.post(url, json=message, headers=headers, timeout=10)
        assert answer.status_code == 401, (scheme, answer.status_code, answer.text)


def test_the_credential_is_refused_at_authorize_even_from_a_configured_proxy(ctx: Ctx) -> None:
    secret = "px-vaulted-" + secrets.token_hex(12)
    answer = ctx.leash.call(
        "PUT", "/v1/vault/mail", ctx.setup.user_key, {"kind": "bearer", "secret": secret}
    )
    assert answer.status_code == 200, answer.text
    cred = credential(ctx)
    original = f"{ctx.leash.url}/gw/mail/messages/1"

    def authorize(scheme: str, token: str) -> httpx.Response:
        """`GET /gw/mail/messages/1` put to `/v1/authorize` by the configured proxy, with
        `token` under `scheme` and its proof."""
        return ctx.leash.http.post(
            "/v1/authorize",
            headers={
                "Leash-Proxy-Key": AUTHORIZE_KEY,
                "Leash-Original-Method": "GET",
                "Leash-Original-URI": "/gw/mail/messages/1",
                "Authorization": f"{scheme} {token}",
                "DPoP": ctx.dpop.dpop_proof("GET", original, ctx.agent._now(), token),
            },
        )

    for scheme in ("DPoP", "Bearer"):
        answer = authorize(scheme, cred)
        assert answer.status_code == 401, (scheme, answer.status_code, answer.text)
        assert secret not in answer.text
        assert secret not in str(answer.headers)
    # The same call with an access token is answered (so the refusal above is the credential's).
    answer = authorize("DPoP", access_token(ctx))
    assert answer.status_code == 200, answer.text


def test_the_credential_is_inactive_at_introspection_and_authenticates_nothing(
    ctx: Ctx,
) -> None:
    cred = credential(ctx)
    admin = {"Authorization": f"Bearer {ctx.leash.admin_key}"}
    answer = ctx.leash.http.post("/oauth2/introspect", data={"token": cred}, headers=admin)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"active": False}, answer.text
    for hint in ("access_token", "refresh_token", PROXY_CREDENTIAL):
        answer = ctx.leash.http.post(
            "/oauth2/introspect", data={"token": cred, "token_type_hint": hint}, headers=admin
        )
        assert answer.json() == {"active": False}, (hint, answer.text)
    token = access_token(ctx)
    as_cred = {"Authorization": f"Bearer {cred}"}
    answer = ctx.leash.http.post("/oauth2/introspect", data={"token": token}, headers=as_cred)
    assert answer.status_code == 401, answer.text


def test_the_credential_cannot_drive_the_grant_or_management_api(ctx: Ctx) -> None:
    cred = credential(ctx)
    grant = ctx.setup.grant_id
    calls = [
        ("POST", f"/v1/grants/{grant}/complete"),
        ("POST", f"/v1/grants/{grant}/revoke"),
        ("GET", f"/v1/grants/{grant}"),
        ("GET", "/v1/grants"),
        ("GET", "/v1/approvals"),
        ("GET", "/v1/audit"),
        ("GET", "/v1/users"),
        ("GET", "/v1/agents"),
        ("PUT", "/v1/vault/finance"),
        ("GET", "/v1/review"),
    ]
    for method, path in calls:
        url = ctx.leash.url + path
        for scheme in ("DPoP", "Bearer"):
            headers = {
                "Authorization": f"{scheme} {cred}",
                "DPoP": ctx.dpop.dpop_proof(method, url, ctx.agent._now(), cred),
                "Connection": "close",
            }
            body = {"kind": "bearer", "secret": "x"} if method == "PUT" else None
            answer = httpx.request(method, url, headers=headers, json=body, timeout=10)
            assert answer.status_code in (401, 403), (method, path, scheme, answer.text)
    assert ctx.leash.grant_status(ctx.setup.user_key, grant) == "active"


# --- revocation --------------------------------------------------------------------------------


def test_its_agent_its_human_and_the_admin_each_revoke_it(px: Leash, tmp_path: Path) -> None:
    c = ctx_of(px, tmp_path)
    by_agent, by_human, by_admin = credential(c), credential(c), credential(c)
    assert revoke_as_agent(c, by_agent).status_code == 200
    for cred, key in ((by_human, c.setup.user_key), (by_admin, px.admin_key)):
        answer = revoke(px, cred, key)
        assert answer.status_code == 200, answer.text
    for cred in (by_agent, by_human, by_admin):
        assert revoked(px, cred), claims(cred)["jti"]
    # The credential in no answer or audit event.
    audit = px.call("GET", "/v1/audit?limit=100000", px.admin_key).text
    for cred in (by_agent, by_human, by_admin):
        assert cred not in audit
        assert cred.split(".")[-1] not in audit


def test_strangers_cannot_revoke_it(px: Leash, tmp_path: Path) -> None:
    victim = ctx_of(px, tmp_path)
    cred = credential(victim)
    stranger = ctx_of(px, tmp_path)
    # Another agent, with a valid assertion of its own.
    answer = revoke_as_agent(stranger, cred)
    assert answer.status_code in (200, 400, 401, 403), answer.text
    # Another human, a junk key, nobody.
    for headers in (
        {"Authorization": f"Bearer {stranger.setup.user_key}"},
        {"Authorization": "Bearer lsk_" + secrets.token_hex(16)},
        {"Authorization": f"Bearer {credential(stranger)}"},
        {},
    ):
        answer = px.http.post("/oauth2/revoke", data={"token": cred}, headers=headers)
        assert answer.status_code in (200, 400, 401, 403), answer.text
    # Its own agent id with a bad, replayed or unsigned assertion.
    used = assertion(victim)
    assert exchange(victim, client_assertion=used).status_code == 200
    forged = SigningKey.generate().client_assertion(
        victim.agent.agent_id, victim.agent.issuer, victim.agent._now()
    )
    for bad in (used, forged, assertion(victim).rsplit(".", 1)[0] + "."):
        answer = revoke_as_agent(victim, cred, client_assertion=bad)
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"] == "invalid_client"
    assert not revoked(px, cred)


def forgeries(mine: str, victim_jti: str, victim_grant: str) -> dict[str, str]:
    body, mac = mine.removeprefix("lpx_").split(".")
    carried = claims(mine)

    def signed_as_mine(**changes: Any) -> str:
        return "lpx_" + b64(json.dumps({**carried, **changes}).encode()) + "." + mac

    raw_mac = base64.urlsafe_b64decode(mac + "=" * (-len(mac) % 4))
    return {
        "victim jti": signed_as_mine(jti=victim_jti),
        "victim grant": signed_as_mine(grant_id=victim_grant),
        "wider scope": signed_as_mine(scope="fin:read fin:pay mail:read crm:list mail:send"),
        "longer exp": signed_as_mine(exp=carried["exp"] + 86400),
        "other issuer": signed_as_mine(iss="https://evil.example"),
        "no mac": f"lpx_{body}",
        "empty mac": f"lpx_{body}.",
        "mac flipped": f"lpx_{body}." + b64(bytes([raw_mac[0] ^ 1]) + raw_mac[1:]),
        "mac truncated": f"lpx_{body}." + b64(raw_mac[:16]),
        "mac padded": f"lpx_{body}.{mac}==",
        "two macs": f"lpx_{body}.{mac}.{mac}",
        "truncated": mine[:-10],
        "trailing junk": mine + "A",
        "upper prefix": "LPX_" + mine[4:],
        "no prefix": mine[4:],
        "huge": "lpx_" + "A" * 1_000_000 + "." + mac,
        "non-ascii": "lpx_" + body + ".é" + mac,
        "nul": mine + "\u0000",
        "jwt alg none": "lpx_"
        + b64(b'{"alg":"none"}')
        + "."
        + b64(json.dumps({**carried, "jti": victim_jti}).encode())
        + ".",
    }


def test_forged_or_altered_credentials_revoke_nothing_and_never_5xx(
    px: Leash, tmp_path: Path
) -> None:
    victim = ctx_of(px, tmp_path)
    target = credential(victim)
    attacker = ctx_of(px, tmp_path)
    mine = credential(attacker)
    for why, forged in forgeries(mine, claims(target)["jti"], victim.setup.grant_id).items():
        for who in ("agent", "admin"):
            if who == "agent":
                answer = revoke_as_agent(attacker, forged)
            else:
                answer = revoke(px, forged, px.admin_key)
            assert answer.status_code in (200, 400, 413), (why, who, answer.status_code)
    assert not revoked(px, target), "a forged credential revoked another agent's"
    assert not revoked(px, mine), "an altered credential revoked the one it was made from"
    revoked_grants = {e["grant_id"] for e in events(px, "token.revoked")}
    assert victim.setup.grant_id not in revoked_grants


def test_a_credential_from_another_server_is_foreign(
    px: Leash, make_leash: Callable[..., Leash], upstream: Upstream, tmp_path: Path
) -> None:
    other = make_leash(finance(upstream.url))
    there = ctx_of(other, tmp_path)
    foreign = credential(there)
    # The same agent id and key registered here too.
    public = SigningKey.from_jwk(json.loads(there.setup.key_file.read_text())).public_jwk()
    px.register_agent(there.setup.agent_id, public)
    here = Ctx(
        px,
        there.setup,
        Agent.from_jwk_file(px.url, there.setup.agent_id, there.setup.key_file),
        there.dpop,
    )
    answer = revoke_as_agent(here, foreign)
    assert answer.status_code in (200, 400), answer.text
    jti = claims(foreign)["jti"]
    assert not any(e["request_id"] == jti for e in events(px, "token.revoked"))
    admin = {"Authorization": f"Bearer {px.admin_key}"}
    answer = px.http.post("/oauth2/introspect", data={"token": foreign}, headers=admin)
    assert answer.json() == {"active": False}


# --- the proxy CA ------------------------------------------------------------------------------


def test_the_ca_is_a_constrained_leaf_only_ca_without_a_private_key(px: Leash) -> None:
    answer = px.http.get("/v1/proxy/ca")
    assert answer.status_code == 200
    assert "set-cookie" not in answer.headers
    pem = answer.text
    assert pem.count("-----BEGIN CERTIFICATE-----") == 1
    assert "PRIVATE" not in pem.upper()
    assert "KEY-----" not in pem
    cert = x509.load_pem_x509_certificate(pem.encode())
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical
    assert basic.value.ca
    assert basic.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign
    assert not usage.value.digital_signature
    assert not usage.value.key_encipherment
    assert not usage.value.data_encipherment
    assert not usage.value.key_agreement
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    nc = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical
    permitted = nc.value.permitted_subtrees or []
    assert sorted(str(s.value) for s in permitted) == sorted(HOSTS)
    assert all(isinstance(s, x509.DNSName) for s in permitted)
    excluded = {s.value for s in nc.value.excluded_subtrees or [] if isinstance(s, x509.IPAddress)}
    assert ipaddress.ip_network("0.0.0.0/0") in excluded
    assert ipaddress.ip_network("::/0") in excluded
    now = datetime.datetime.now(datetime.timezone.utc)
    assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    # OpenSSL reads it the same way.
    text = subprocess.run(
        ["openssl", "x509", "-noout", "-text"], input=pem, capture_output=True, text=True
    )
    assert text.returncode == 0, text.stderr
    assert "CA:TRUE, pathlen:0" in text.stdout
    for host in HOSTS:
        assert f"DNS:{host}" in text.stdout


def test_the_ca_permits_no_name_beyond_the_configured_hosts(px: Leash) -> None:
    # FIXED: the CA's name constraints are `permitted: DNS:finance.example.com`; RFC 5280
    # §4.2.1.10 reads a dNSName constraint as a subtree ("any DNS name that can be constructed
    # by simply adding zero or more labels to the left-hand side"), so a leaf for
    # `evil.finance.example.com`, `*.finance.example.com` or `a.b.pay.finance-two.example`
    # is within the constraints: the CA is valid for every subdomain of each host, not for
    # "exactly the configured hosts". A host such as "com" (accepted by the config) makes
    # it valid for every .com site. Expected: each host's subdomains excluded (e.g. an
    # excluded subtree ".<host>", read as subdomains-only by OpenSSL, Go and BoringSSL), or
    # single-label hosts refused and the subtree semantics documented.
    cert = x509.load_pem_x509_certificate(ca_pem(px).encode())
    for host in HOSTS:
        assert ca_allows(cert, host), host
    for name in (
        "evil.finance.example.com",
        "a.b.pay.finance-two.example",
        "www.finance.example.com",
    ):
        assert not ca_allows(cert, name), f"the CA's name constraints allow {name}"
    for name in ("example.com", "finance.example.com.evil.example", "xfinance.example.com"):
        assert not ca_allows(cert, name), name


def test_the_cli_prints_the_served_ca_without_a_key(px: Leash) -> None:
    done = cli("proxy", "ca", "--server", px.url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ca_pem(px).strip()
    assert "PRIVATE" not in done.stdout + done.stderr
    # Writing methods on the public endpoint are refused.
    for method in ("POST", "PUT", "DELETE"):
        answer = px.http.request(method, "/v1/proxy/ca", headers={"Connection": "close"})
        assert answer.status_code in (401, 403, 404, 405), (method, answer.status_code)
    assert ca_pem(px) == px.http.get("/v1/proxy/ca").text


def test_the_ca_survives_restarts_and_master_key_rotation_and_follows_the_hosts(
    upstream: Upstream, tmp_path: Path
) -> None:
    data = tmp_path / "node" / "data"
    data.parent.mkdir()
    admin = "lsk_test_admin_" + secrets.token_hex(16)

    def start(hosts: list[str]) -> Node:
        config = f"{finance(upstream.url, hosts)}\n{ROUTES.format(upstream=upstream.url)}\n{LIMITS}"
        node = Node(data, upstream, admin, config)
        assert node.url, node.log()
        return node

    node = start(HOSTS)
    first = ca_pem(node)
    node.stop()
    node = start(HOSTS)
    assert ca_pem(node) == first, "a restart made a new CA"
    node.stop()
    new_key = tmp_path / "new.key"
    new_key.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
    new_key.chmod(0o600)
    config = data.parent / "rotate.toml"
    config.write_text(f"{finance(upstream.url)}\n{ROUTES.format(upstream=upstream.url)}\n")
    done = cli(
        "master-key",
        "rotate",
        "--new-key-file",
        str(new_key),
        "--data-dir",
        str(data),
        "--config",
        str(config),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    node = start(HOSTS)
    assert ca_pem(node) == first, "the master-key rotation lost the CA"
    node.stop()
    node = start(["books.example.org"])
    changed = ca_pem(node)
    assert changed != first, "a new host set kept serving the old CA"
    cert = x509.load_pem_x509_certificate(changed.encode())
    nc = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    assert [s.value for s in nc.permitted_subtrees or []] == ["books.example.org"]
    assert cert.public_key() != x509.load_pem_x509_certificate(first.encode()).public_key()
    node.stop()


@pytest.fixture
def database() -> Iterator[str]:
    server = os.environ.get("LEASH_TEST_POSTGRES", "postgres://postgres@127.0.0.1:5432/postgres")
    name = f"px_outsider_{secrets.token_hex(6)}"
    subprocess.run(["psql", server, "-qc", f"CREATE DATABASE {name}"], check=True)
    yield f"{server.rsplit('/', 1)[0]}/{name}"
    subprocess.run(["psql", server, "-qc", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"])


def test_nodes_started_at_once_on_a_new_store_serve_one_ca(
    upstream: Upstream, tmp_path: Path, database: str
) -> None:
    admin = "lsk_test_admin_" + secrets.token_hex(16)
    master = base64.b64encode(secrets.token_bytes(32)).decode()
    config = f"{finance(upstream.url)}\n{ROUTES.format(upstream=upstream.url)}\n{LIMITS}"
    started: list[Node] = []
    lock = threading.Lock()

    def start(name: str) -> None:
        data = tmp_path / name / "data"
        data.parent.mkdir()
        node = Node(data, upstream, admin, config, database, {"LEASH_MASTER_KEY": master})
        with lock:
            started.append(node)

    try:
        threads = [threading.Thread(target=start, args=(f"n{i}",)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(n.url for n in started), [n.log() for n in started]
        pems = {ca_pem(n) for n in started}
        assert len(pems) == 1, "nodes of one cluster serve different proxy CAs"
        # A credential issued by one node is revoked through another.
        c = ctx_of(started[0], tmp_path, issuer="http://leash.test")
        cred = credential(c)
        other = started[1]
        answer = revoke(other, cred, admin)
        assert answer.status_code == 200
        assert revoked(started[0], cred)
    finally:
        for n in started:
            n.stop()


# --- configuration -----------------------------------------------------------------------------


def try_config(upstream: Upstream, directory: Path, text: str) -> tuple[bool, str]:
    """Whether `leash serve` starts with `text` as its config, and what it printed."""
    data = directory / f"cfg-{secrets.token_hex(4)}" / "data"
    data.parent.mkdir()
    node = Node(data, upstream, "lsk_test_admin_" + secrets.token_hex(16), text)
    started = bool(node.url)
    node.stop()
    return started, node.log()


def with_hosts(upstream: Upstream, hosts: str) -> str:
    return f"""[proxy]
listen = "127.0.0.1:0"
[[upstream]]
name = "f"
url = "{upstream.url}"
hosts = {hosts}
[[upstream.route]]
method = "GET"
path = "/a"
action = "f:read"
"""


BAD_HOSTS = [
    "127.0.0.1",
    "::1",
    "[::1]",
    "2130706433",
    "0177.0.0.1",
    "127.1",
    "*.example.com",
    "FINANCE.example.com",
    "finance.example.com.",
    "bücher.example",
    "",
    "a.com:443",
    "a.com/x",
    "a..com",
    "-a.com",
    "a b.com",
    "a_b.com",
    "a.com\u0000",
]


def test_hosts_that_are_ips_wildcards_or_not_lower_case_dns_names_are_refused_at_start(
    upstream: Upstream, tmp_path: Path
) -> None:
    for host in BAD_HOSTS:
        started, log = try_config(upstream, tmp_path, with_hosts(upstream, json.dumps([host])))
        assert not started, f"started with hosts = [{host!r}]"
        assert "hosts" in log, (host, log)
        assert "must be a DNS name" in log, (host, log)
    started, log = try_config(upstream, tmp_path, with_hosts(upstream, '["xn--bcher-kva.example"]'))
    assert started, log


def test_hosts_a_browser_reads_as_an_ip_address_are_refused_at_start(
    upstream: Upstream, tmp_path: Path
) -> None:
    # FIXED: `hosts = ["0x7f000001"]` and `["0x7f.1"]` start the server (and the CA permits
    # DNS:0x7f000001), though a browser's URL parser (WHATWG, "ends in a number") reads both as
    # the IPv4 address 127.0.0.1; "a.123" and "foo.0x1" (not a valid browser host at all) are
    # accepted too. Decimal and octal forms ("2130706433", "0177.0.0.1", "127.1") are refused.
    # Expected: a host whose last label is a number (decimal, 0x-hex or octal) is refused like
    # the other IP forms.
    for host in ("0x7f000001", "0x7f.1", "a.123", "foo.0x1"):
        started, _log = try_config(upstream, tmp_path, with_hosts(upstream, json.dumps([host])))
        assert not started, f"started with hosts = [{host!r}], which a browser reads as an IP"


def test_hosts_shared_by_two_upstreams_or_on_an_mcp_upstream_are_refused(
    upstream: Upstream, tmp_path: Path
) -> None:
    shared = (
        with_hosts(upstream, '["a.example"]')
        + f"""
[[upstream]]
name = "g"
url = "{upstream.url}"
hosts = ["a.example"]
[[upstream.route]]
method = "GET"
path = "/b"
action = "g:read"
"""
    )
    started, log = try_config(upstream, tmp_path, shared)
    assert not started, log
    assert "another upstream" in log, log
    twice = with_hosts(upstream, '["a.example", "a.example"]')
    started, log = try_config(upstream, tmp_path, twice)
    assert not started or log.count("a.example") == 0, log
    mcp = """[proxy]
listen = "127.0.0.1:0"
[[upstream]]
name = "crm"
url = "http://127.0.0.1:9/mcp"
kind = "mcp"
hosts = ["crm.example"]
"""
    started, log = try_config(upstream, tmp_path, mcp)
    assert not started, log
    assert "MCP" in log, log
    for wait in ("-1", "0", '"soon"'):
        text = with_hosts(upstream, '["a.example"]').replace(
            'listen = "127.0.0.1:0"', f'listen = "127.0.0.1:0"\napproval_wait = {wait}'
        )
        started, log = try_config(upstream, tmp_path, text)
        assert not started, (wait, log)


def test_the_server_logs_hold_no_credential_or_private_key(
    upstream: Upstream, tmp_path: Path
) -> None:
    data = tmp_path / "trace" / "data"
    data.parent.mkdir()
    admin = "lsk_test_admin_" + secrets.token_hex(16)
    config = f"{finance(upstream.url)}\n{ROUTES.format(upstream=upstream.url)}\n{LIMITS}"
    node = Node(data, upstream, admin, config, env={"LEASH_LOG": "trace"})
    try:
        assert node.url, node.log()
        c = ctx_of(node, tmp_path)
        cred = credential(c)
        assert revoke_as_agent(c, cred).status_code == 200
        ca_pem(node)
        bad = revoke_as_agent(c, cred[:-4] + "AAAA")
        assert bad.status_code in (200, 400)
        time.sleep(0.3)
        log = node.log()
        assert cred not in log
        assert cred.split(".")[-1] not in log
        assert cred.removeprefix("lpx_").split(".")[0] not in log
        assert "PRIVATE KEY" not in log
        audit = node.call("GET", "/v1/audit?limit=100000", admin).text
        assert cred.split(".")[-1] not in audit
        assert "PRIVATE KEY" not in audit
    finally:
        node.stop()


# --- HTTP: answers that leave the body unread -------------------------------------------------


def refused_posts(leash: Leash, human: str) -> list[tuple[str, dict[str, str], bytes]]:
    big = json.dumps({"name": "x" * 200_000}).encode()
    return [
        ("/v1/users", {}, b'{"name": "n"}'),
        ("/v1/users", {"Authorization": f"Bearer {human}"}, b'{"name": "n"}'),
        ("/v1/keys/rotate", {"Authorization": f"Bearer {human}"}, b"{}"),
        ("/v1/users", {"Authorization": f"Bearer {human}"}, big),
        ("/oauth2/introspect", {}, b'{"token": "x"}'),
        ("/v1/grants", {"Authorization": "Bearer lsk_" + "0" * 32}, big),
    ]


def test_a_keep_alive_client_always_gets_an_answer_after_a_refused_post(px: Leash) -> None:
    human = px.add_user(f"h-{secrets.token_hex(3)}")
    posts = refused_posts(px, human)
    dropped: list[str] = []
    with httpx.Client(base_url=px.url, timeout=10) as http:
        for i in range(300):
            path, headers, body = posts[i % len(posts)]
            try:
                answer = http.post(
                    path, content=body, headers={**headers, "Content-Type": "application/json"}
                )
                assert answer.status_code in (401, 403, 413, 415), (path, answer.status_code)
                follow = http.get("/healthz")
                assert follow.status_code == 200
            except httpx.RemoteProtocolError as error:
                dropped.append(f"{path}: {error}")
    assert not dropped, f"{len(dropped)} of 300: {dropped[:3]}"


def raw_exchange(port: int, data: bytes, wait: float = 3) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        got = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            got += chunk
            if got.count(b"HTTP/1.1 ") >= 2 and got.endswith(b"}"):
                break
        return got


def test_a_pipelined_request_after_a_refused_post_is_answered_or_the_refusal_says_close(
    px: Leash,
) -> None:
    port = int(px.url.rsplit(":", 1)[1])
    body = b'{"name": "' + b"y" * 5000 + b'"}'
    bodies = {
        "length": b"Content-Length: %d\r\n\r\n" % len(body) + body,
        "chunked": b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(body)
        + body
        + b"\r\n0\r\n\r\n",
    }
    for name, framed in bodies.items():
        first = b"POST /v1/users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + framed
        second = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        got = raw_exchange(port, first + second)
        head = got.split(b"\r\n\r\n", 1)[0].lower()
        assert head.startswith(b"http/1.1 401"), (name, got[:200])
        if b"connection: close" not in head:
            assert got.count(b"HTTP/1.1 ") == 2, (name, "second request dropped", got[-300:])
            assert b"HTTP/1.1 200" in got, (name, got[-300:])


def h2_status(block: bytes) -> str:
    """The `:status` of a response header block (the first field, as servers send it)."""
    first = block[0]
    if first & 0x80:
        # An index into the static table, or into the dynamic one (not tracked here).
        return STATIC_STATUS.get(first & 0x7F, "indexed")
    # A literal with the name `:status` (static index 8).
    assert first & 0x0F == 8 or first & 0x3F == 8, block[:4]
    length, huffman = block[1] & 0x7F, bool(block[1] & 0x80)
    value = block[2 : 2 + length]
    return huffman_digits(value) if huffman else value.decode()


def h2c_requests(
    port: int, requests: list[tuple[str, str, dict[str, str], bytes]]
) -> dict[int, str]:
    """Sends `requests` (method, path, headers, body) on one h2c prior-knowledge connection, all
    at once; returns each stream's `:status` (streams 1, 3, 5, ...)."""
    out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0, b"")
    for i, (method, path, headers, body) in enumerate(requests):
        stream = 2 * i + 1
        block = b"".join(
            hpack_literal(k.encode(), v.encode())
            for k, v in (
                (":method", method),
                (":scheme", "http"),
                (":authority", f"127.0.0.1:{port}"),
                (":path", path),
                *headers.items(),
                *([("content-length", str(len(body)))] if body else []),
            )
        )
        out += h2_frame(1, 0x4 | (0 if body else 0x1), stream, block)
        chunks = [body[j : j + 16384] for j in range(0, len(body), 16384)]
        for j, chunk in enumerate(chunks):
            out += h2_frame(0, 0x1 if j == len(chunks) - 1 else 0, stream, chunk)
    statuses: dict[int, str] = {}
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(out)
        buffer = b""
        deadline = time.monotonic() + 5
        while len(statuses) < len(requests) and time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            buffer += chunk
            while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
                length = int.from_bytes(buffer[:3], "big")
                kind, flags = buffer[3], buffer[4]
                stream = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
                payload, buffer = buffer[9 : 9 + length], buffer[9 + length :]
                if kind == 4 and not flags & 1:
                    s.sendall(h2_frame(4, 1, 0, b""))
                if kind == 7:  # GOAWAY
                    statuses.setdefault(-1, f"GOAWAY {payload[4:8].hex()} {payload[8:]!r}")
                if kind == 1:
                    if flags & 0x8:  # padded
                        payload = payload[1 : len(payload) - payload[0]]
                    if flags & 0x20:  # priority
                        payload = payload[5:]
                    statuses[stream] = h2_status(payload)
    return statuses


def test_refusals_over_h2c_prior_knowledge_keep_the_connection(px: Leash) -> None:
    port = int(px.url.rsplit(":", 1)[1])
    human = px.add_user(f"h2-{secrets.token_hex(3)}")
    json_type = {"content-type": "application/json"}
    body = json.dumps({"name": "z" * 20_000}).encode()
    statuses = h2c_requests(
        port,
        [
            ("POST", "/v1/users", json_type, body),
            ("POST", "/v1/users", {**json_type, "authorization": f"Bearer {human}"}, body),
            ("GET", "/healthz", {}, b""),
            ("POST", "/v1/keys/rotate", {**json_type, "authorization": f"Bearer {human}"}, b"{}"),
            ("GET", "/healthz", {}, b""),
        ],
    )
    expected = {1: "401", 3: "403", 5: "200", 7: "403", 9: "200"}
    assert set(statuses) == set(expected), statuses
    for stream, status in statuses.items():
        assert status in (expected[stream], "indexed"), statuses
    assert statuses[1] == "401"


def test_a_successful_post_keeps_the_connection_alive(px: Leash, ctx: Ctx) -> None:
    ports: set[int] = set()
    with httpx.Client(base_url=px.url, timeout=10) as http:
        for i in range(5):
            answer = http.post(
                "/v1/users",
                json={"name": f"k-{secrets.token_hex(4)}-{i}"},
                headers={"Authorization": f"Bearer {px.admin_key}"},
            )
            assert answer.status_code == 201, answer.text
            assert answer.headers.get("connection", "").lower() != "close", i
            stream = answer.extensions["network_stream"]
            ports.add(stream.get_extra_info("client_addr")[1])
        form = exchange_form(ctx.agent, ctx.setup.handle, client_assertion=assertion(ctx))
        proof = ctx.dpop.dpop_proof("POST", ctx.token_url, ctx.agent._now())
        answer = http.post("/oauth2/token", data=form, headers={"DPoP": proof})
        assert answer.status_code == 200, answer.text
        assert answer.headers.get("connection", "").lower() != "close"
        ports.add(answer.extensions["network_stream"].get_extra_info("client_addr")[1])
    assert len(ports) == 1, f"successful POSTs used {len(ports)} connections"
