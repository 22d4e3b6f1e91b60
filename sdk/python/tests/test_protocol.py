"""The protocol around each request: key types, server nonces, clock skew, where tokens may
go, and that only Leash's own answers make the SDK act."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from conftest import Leash, Setup, keygen, set_up

from leash_agent import Agent, InvalidKey, LeashError, PendingApproval, SigningKey
from leash_agent._agent import GRANT_TOKEN_TYPE, JWT_BEARER, TOKEN_EXCHANGE


@pytest.mark.parametrize("alg", ["EdDSA", "Ed25519", "ES256"])
def test_every_identity_key_type_works(leash: Leash, tmp_path: Path, alg: str) -> None:
    setup = set_up(leash, tmp_path, alg, approval_required=[])
    with Agent.from_jwk_file(leash.url, setup.agent_id, setup.key_file) as agent:
        task = agent.task(setup.handle)
        answer = httpx.get(task.url("mail", "/messages/1"), auth=task.auth)
        assert answer.status_code == 200, answer.text
        # The task's proof key is of the same family as the identity's.
        assert task._dpop_key.alg == ("ES256" if alg == "ES256" else "EdDSA")


def test_a_server_that_requires_nonces(make_leash: Callable[[str], Leash], tmp_path: Path) -> None:
    leash = make_leash("dpop_nonce = true")
    setup = set_up(leash, tmp_path, approval_required=[])
    # Leash does refuse a proof without its nonce...
    key = SigningKey.from_jwk(json.loads(setup.key_file.read_text()))
    now, token_url = int(time.time()), f"{leash.url}/oauth2/token"
    form = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": setup.handle,
        "subject_token_type": GRANT_TOKEN_TYPE,
        "client_assertion_type": JWT_BEARER,
        "client_assertion": key.client_assertion(setup.agent_id, leash.url, now),
    }
    proof = SigningKey.generate().dpop_proof("POST", token_url, now)
    bare = httpx.post(token_url, data=form, headers={"DPoP": proof})
    assert bare.json()["error"] == "use_dpop_nonce"
    assert bare.headers["DPoP-Nonce"]
    # ...and the SDK takes it from the refusal, at the token endpoint and at the gateway.
    with Agent.from_jwk_file(leash.url, setup.agent_id, setup.key_file) as agent:
        task = agent.task(setup.handle)
        with httpx.Client(auth=task.auth) as client:
            for n in range(3):
                answer = client.get(task.url("mail", f"/messages/{n}"))
                assert answer.status_code == 200, answer.text
        task.complete()
    assert leash.exchanges(setup.grant_id) == 1


@pytest.mark.parametrize("skew", [-50, 50])
def test_a_clock_off_by_less_than_the_window_is_fine(setup: Setup, skew: int) -> None:
    clock = lambda: time.time() + skew  # noqa: E731
    with Agent.from_jwk_file(setup.leash.url, setup.agent_id, setup.key_file, clock=clock) as agent:
        task = agent.task(setup.handle)
        assert httpx.get(task.url("mail", "/messages/1"), auth=task.auth).status_code == 200


def test_a_clock_off_by_more_than_the_window_is_refused(setup: Setup) -> None:
    clock = lambda: time.time() + 600  # noqa: E731
    with Agent.from_jwk_file(setup.leash.url, setup.agent_id, setup.key_file, clock=clock) as agent:
        task = agent.task(setup.handle)
        with pytest.raises(LeashError) as refused:
            httpx.get(task.url("mail", "/messages/1"), auth=task.auth)
    assert refused.value.code in ("invalid_dpop_proof", "invalid_client")


def test_tokens_go_to_the_issuer_only(setup: Setup) -> None:
    leash = setup.leash
    before = len(leash.upstream.seen())
    with Agent.from_jwk_file(leash.url, setup.agent_id, setup.key_file) as agent:
        task = agent.task(setup.handle)
        host, port = leash.url.removeprefix("http://").split(":")
        for elsewhere in (
            f"{leash.upstream.url}/messages/1",  # the upstream itself, past the gateway
            f"https://{host}:{port}/gw/mail/messages/1",  # another scheme
            f"http://localhost:{port}/gw/mail/messages/1",  # another host name
        ):
            with pytest.raises(LeashError) as refused:
                httpx.get(elsewhere, auth=task.auth)
            assert refused.value.code == "invalid_request"
        assert leash.exchanges(setup.grant_id) == 0, "refused before any exchange"
    assert len(leash.upstream.seen()) == before, "nothing reached the upstream"


def test_an_upstream_cannot_fake_leash_refusals(setup: Setup) -> None:
    """The gateway strips `Leash-Decision` from upstream answers; the SDK acts only on answers
    that carry it, so an upstream cannot make it wait, re-exchange or take a nonce."""
    leash = setup.leash
    announced: list[PendingApproval] = []
    with Agent.from_jwk_file(leash.url, setup.agent_id, setup.key_file) as agent:
        task = agent.task(setup.handle, on_approval=announced.append)
        with httpx.Client(auth=task.auth) as client:
            assert client.get(task.url("mail", "/messages/1")).status_code == 200
            for fake, status in (("approval", 403), ("nonce", 401), ("expired", 401)):
                before = len(leash.upstream.seen())
                answer = client.get(task.url("mail", f"/fake/{fake}"))
                assert answer.status_code == status
                assert "Leash-Decision" not in answer.headers
                assert len(leash.upstream.seen()) == before + 1, f"{fake}: sent again"
            assert task._nonce is None, "took the upstream's nonce"
            assert client.get(task.url("mail", "/messages/1")).status_code == 200
    assert announced == []
    assert leash.exchanges(setup.grant_id) == 1


def test_key_files_that_are_not_private_keys_are_refused(tmp_path: Path) -> None:
    good = json.loads(keygen(tmp_path).read_text())
    other = json.loads(keygen(tmp_path).read_text())
    public_only = {k: v for k, v in good.items() if k != "d"}
    mismatched = {**good, "x": other["x"]}
    for bad in (public_only, mismatched, {**good, "kty": "RSA"}, {**good, "d": "AAAA"}):
        with pytest.raises(InvalidKey):
            SigningKey.from_jwk(bad)
    path = tmp_path / "not.jwk"
    path.write_text("not json")
    with pytest.raises(InvalidKey):
        Agent.from_jwk_file("http://127.0.0.1:1", "spiffe://x/y", path)
