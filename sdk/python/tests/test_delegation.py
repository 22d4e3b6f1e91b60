"""Delegation tokens (API §17, `[upstream.inject] kind = "leash_token"`): for an upstream that
verifies JWTs, Leash injects a token it signs per request, with a key of its own, instead of
any stored human secret. Checked with PyJWT against Leash's delegation JWKS, as an upstream
would; and ATTACKS 60: the agent's own token fails that check, a token for one upstream is
refused by another (its `aud`)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from conftest import Leash, Upstream, leash_bin, set_up

from leash_agent import Agent

BOOKS = "https://books.example"
LEDGER = "https://ledger.example"


def delegated_upstreams(url: str) -> str:
    return f"""
[[upstream]]
name = "books"
url = "{url}"
inject = {{ kind = "leash_token", audience = "{BOOKS}" }}
route = [{{ method = "GET", path = "/books/**", action = "books:read" }}]

[[upstream]]
name = "ledger"
url = "{url}"
inject = {{ kind = "leash_token", audience = "{LEDGER}" }}
route = [{{ method = "GET", path = "/ledger/**", action = "ledger:read" }}]
"""


@pytest.fixture
def books(make_leash: Callable[..., Leash], upstream: Upstream) -> Leash:
    return make_leash(delegated_upstreams(upstream.url))


def delegation_keys(leash: Leash) -> jwt.PyJWKSet:
    jwks = leash.http.get("/.well-known/leash-delegation-jwks.json")
    assert jwks.status_code == 200
    return jwt.PyJWKSet.from_dict(jwks.json())


def check(token: str, keys: jwt.PyJWKSet, audience: str, **options: Any) -> dict[str, Any]:
    """What an upstream does: the key by `kid` from the delegation JWKS, EdDSA only, `aud`."""
    header = jwt.get_unverified_header(token)
    key = next((k for k in keys.keys if k.key_id == header.get("kid")), None)
    if key is None:
        raise jwt.InvalidKeyError("no delegation key has this kid")
    claims: dict[str, Any] = jwt.decode(
        token, key=key, algorithms=["EdDSA"], audience=audience, **options
    )
    return claims


def fetched_token(leash: Leash, path: str) -> tuple[str, Any]:
    """The Bearer token the upstream got with the request for `path`."""
    for seen in reversed(leash.upstream.seen()):
        if seen.path == path:
            authorization = seen.headers["authorization"]
            assert authorization.startswith("Bearer ")
            return authorization.removeprefix("Bearer "), seen
    raise AssertionError(f"{path} was not forwarded")


def test_the_upstream_gets_a_delegation_token_that_verifies_with_the_right_claims(
    books: Leash, tmp_path: Path
) -> None:
    setup = set_up(
        books, tmp_path, upstreams=["books"], actions=["books:read"], approval_required=[]
    )
    # A vaulted secret for the upstream is not what it gets: the token replaces it.
    books.call("PUT", "/v1/vault/books", setup.user_key, {"kind": "bearer", "secret": "VAULTED"})
    path = f"/books/{time.monotonic_ns()}"
    with Agent.from_jwk_file(books.url, setup.agent_id, setup.key_file) as agent:
        task = agent.task(setup.handle)
        answer = httpx.get(task.url("books", path), auth=task.auth)
        own_token = task._token.value if task._token else ""
    assert answer.status_code == 200, answer.text
    token, seen = fetched_token(books, path)
    assert "VAULTED" not in json.dumps(seen.headers)
    assert "dpop" not in seen.headers
    assert token not in answer.text

    header = jwt.get_unverified_header(token)
    assert header["typ"] == "at+jwt"
    assert header["alg"] == "EdDSA"
    claims = check(token, delegation_keys(books), BOOKS)
    me = books.call("GET", "/v1/me", setup.user_key).json()
    assert claims["iss"] == books.url
    assert claims["sub"] == me["id"]
    assert claims["act"] == {"sub": setup.agent_id}
    assert claims["client_id"] == setup.agent_id
    assert claims["grant_id"] == setup.grant_id
    assert claims["scope"] == "books:read"
    assert claims["aud"] == BOOKS
    assert 0 < claims["exp"] - claims["iat"] <= 60
    assert "cnf" not in claims
    assert claims["jti"]
    # Minted per request.
    with Agent.from_jwk_file(books.url, setup.agent_id, setup.key_file) as agent:
        task = agent.task(setup.handle)
        httpx.get(task.url("books", path), auth=task.auth)
    again, _ = fetched_token(books, path)
    assert again != token

    # Once expired, the upstream refuses it (checked 61 s on, as PyJWT's clock allows).
    with pytest.raises(jwt.ExpiredSignatureError):
        check(
            token,
            delegation_keys(books),
            BOOKS,
            leeway=timedelta(seconds=-61),
            options={"verify_iat": False},
        )

    # ATTACKS 60: the agent's own access token is no delegation token (another key set) ...
    assert own_token
    with pytest.raises(jwt.PyJWTError):
        check(own_token, delegation_keys(books), BOOKS)
    access_jwks = books.http.get("/.well-known/jwks.json").json()
    delegation_jwks = books.http.get("/.well-known/leash-delegation-jwks.json").json()
    assert {k["kid"] for k in access_jwks["keys"]}.isdisjoint(
        {k["kid"] for k in delegation_jwks["keys"]}
    )
    # ... and a token for one upstream is refused by another.
    with pytest.raises(jwt.InvalidAudienceError):
        check(token, delegation_keys(books), LEDGER)


def test_audiences_must_be_unique_and_not_leashs_own(tmp_path: Path) -> None:
    def serve_check(config: str, issuer: str | None = None) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "leash.toml"
        path.write_text(config)
        args = [str(leash_bin()), "serve", "--check", "--config", str(path)]
        env = {"LEASH_ISSUER": issuer} if issuer else {}
        return subprocess.run(
            args, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **env}
        )

    twice = delegated_upstreams("http://127.0.0.1:9").replace(LEDGER, BOOKS)
    refused = serve_check(twice)
    assert refused.returncode != 0
    assert "unique" in refused.stderr
    unknown = delegated_upstreams("http://127.0.0.1:9").replace("leash_token", "magic")
    assert serve_check(unknown).returncode != 0
    ok = serve_check(delegated_upstreams("http://127.0.0.1:9"))
    assert ok.returncode == 0, ok.stderr
    # An audience that is Leash's own issuer: the server refuses to start.
    config = tmp_path / "leash.toml"
    config.write_text(delegated_upstreams("http://127.0.0.1:9"))
    started = subprocess.run(
        [
            str(leash_bin()),
            "serve",
            "--config",
            str(config),
            "--data-dir",
            str(tmp_path / "data"),
            "--listen",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "LEASH_ISSUER": BOOKS},
    )
    assert started.returncode != 0
    assert "must differ from Leash's issuer" in started.stderr
