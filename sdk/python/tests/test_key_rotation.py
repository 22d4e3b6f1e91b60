"""Token-signing key rotation (API §3, `POST /v1/keys/rotate`) as a client library sees it:
tokens issued after a rotation carry the new `kid` and verify with PyJWT through the JWKS;
those issued before keep verifying while their key is published; after a compromise the old
key's tokens are refused and the SDK, refused with `invalid_token`, exchanges again by itself."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
from conftest import Leash, Setup, leash_bin, set_up

from leash_agent import Agent


def token_of(setup: Setup, directory: Path) -> str:
    """An access token from `leash agent token` (what a shell script would hold)."""
    out = directory / f"session-{time.monotonic_ns()}.json"
    subprocess.run(
        [
            str(leash_bin()),
            "agent",
            "token",
            "--id",
            setup.agent_id,
            "--key",
            str(setup.key_file),
            "--handle",
            setup.handle,
            "--out",
            str(out),
            "--server",
            setup.leash.url,
        ],
        check=True,
        capture_output=True,
    )
    session: dict[str, Any] = json.loads(out.read_text())
    token: str = session["access_token"]
    return token


def verify(leash: Leash, token: str) -> dict[str, Any]:
    """What a resource server using PyJWT does: the key by `kid` from the JWKS, EdDSA only."""
    keys = jwt.PyJWKSet.from_dict(leash.http.get("/.well-known/jwks.json").json())
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in keys.keys if k.key_id == kid)
    claims: dict[str, Any] = jwt.decode(
        token, key.key, algorithms=["EdDSA"], issuer=leash.url, options={"verify_aud": False}
    )
    return claims


def rotate(leash: Leash, compromised: bool) -> dict[str, Any]:
    answer = leash.call("POST", "/v1/keys/rotate", leash.admin_key, {"compromised": compromised})
    assert answer.status_code == 200, answer.text
    rotated: dict[str, Any] = answer.json()
    return rotated


def test_tokens_verify_through_the_jwks_across_rotations_and_the_sdk_rides_a_compromise(
    make_leash: Callable[..., Leash], tmp_path: Path
) -> None:
    leash = make_leash("jwks_max_age = 1\n")
    setup = set_up(leash, tmp_path)
    before = token_of(setup, tmp_path)
    first = jwt.get_unverified_header(before)["kid"]
    assert verify(leash, before)["sub"]

    rotated = rotate(leash, compromised=False)
    time.sleep(1.5)
    after = token_of(setup, tmp_path)
    assert jwt.get_unverified_header(after)["kid"] == rotated["kid"] != first
    assert verify(leash, after)["act"]["sub"] == setup.agent_id
    assert verify(leash, before)["sub"], "the old key is still published"

    with Agent.from_jwk_file(leash.url, setup.agent_id, setup.key_file) as agent:
        task = agent.task(setup.handle)
        with httpx.Client(timeout=10) as http:
            assert http.get(task.url("mail", "/fake/a"), auth=task.auth).status_code == 200
            rotate(leash, compromised=True)
            # The task's token was signed by a withdrawn key: refused, exchanged again, sent.
            again = http.get(task.url("mail", "/fake/b"), auth=task.auth)
            assert again.status_code == 200, again.text
    kids = [k["kid"] for k in leash.http.get("/.well-known/jwks.json").json()["keys"]]
    assert first not in kids
    assert rotated["kid"] not in kids
    assert leash.exchanges(setup.grant_id) >= 2
