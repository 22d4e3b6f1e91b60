"""Leash configured to log humans in at a test IdP (API §13), for the login and console tests."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from conftest import AGENT_ID, Leash, keygen
from idp_fixtures import DEFAULT_AUDIENCE, Idp

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
