"""Leash configured to log humans in at a test IdP (API §13), for the login and console tests."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from conftest import AGENT_ID, Leash, keygen
from idp_fixtures import DEFAULT_AUDIENCE, Idp, login_over_http

from leash_agent import SigningKey

SECRET_ENV = "LEASH_TEST_OIDC_SECRET"

MakeLeash = Callable[..., Leash]


def oidc_section(issuer: str, extra: str = "") -> str:
    """An `[oidc]` table for the IdP at `issuer` (the config's last table but the routes')."""
    return (
        f'[oidc]\nissuer = "{issuer}"\nclient_id = "leash"\n'
        f'client_secret_env = "{SECRET_ENV}"\nscopes = ["openid", "email", "profile"]\n'
        f'admin_groups = ["leash-admins"]\naudience = "{DEFAULT_AUDIENCE}"\n{extra}\n'
    )


def leash_for(make_leash: MakeLeash, idp: Idp, top: str = "", oidc: str = "") -> Leash:
    """A Leash that logs humans in at `idp`, whose callback the IdP now accepts."""
    leash = make_leash(f"{top}\n{oidc_section(idp.issuer, oidc)}", {SECRET_ENV: idp.client_secret})
    idp.set_redirect_uri(f"{leash.url}/auth/callback")
    return leash


def agent_for(leash: Leash, directory: Path) -> tuple[str, Path]:
    """An agent the admin registered: its id and its key file."""
    key_file = keygen(directory)
    agent_id = f"{AGENT_ID}-{time.monotonic_ns()}"
    public = SigningKey.from_jwk(json.loads(key_file.read_text())).public_jwk()
    leash.register_agent(agent_id, public)
    return agent_id, key_file


def browser(leash: Leash) -> httpx.Client:
    """A fresh cookie jar: one person's browser."""
    return httpx.Client(base_url=leash.url, timeout=10)


def start(client: httpx.Client, return_to: str | None = None) -> str:
    """`GET /login`: the IdP's authorization URL."""
    params = {"return_to": return_to} if return_to else None
    answer = client.get("/login", params=params)
    assert answer.status_code == 302, answer.text
    assert "leash_login=" in answer.headers["set-cookie"]
    location: str = answer.headers["location"]
    return location


def log_in(leash: Leash, idp: Idp, username: str) -> httpx.Client:
    """A browser in which `username` logged in through the IdP."""
    client = browser(leash)
    back = login_over_http(client, start(client), username, idp.password(username))
    done = client.get(back.headers["location"])
    assert done.status_code == 303, done.text
    return client


def me(client: httpx.Client) -> httpx.Response:
    return client.get("/v1/me")


def origin(leash: Leash) -> dict[str, str]:
    return {"Origin": leash.url}


def session_cookie(client: httpx.Client) -> str | None:
    return client.cookies.get("leash_session")
