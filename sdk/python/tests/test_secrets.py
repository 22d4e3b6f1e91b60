"""The SDK never logs, repr()s or raises with a token, a grant handle, a proof or a key."""

from __future__ import annotations

import json
import logging
import threading

import httpx
import pytest
from conftest import Setup

from leash_agent import Agent, ApprovalDenied, PendingApproval, TaskEnded


def test_no_secret_in_logs_reprs_or_errors(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    leash = setup.leash
    private_d = json.loads(setup.key_file.read_text())["d"]
    shown: list[str] = []

    def deny(pending: PendingApproval) -> None:
        shown.append(repr(pending))
        threading.Thread(target=leash.decide, args=(setup.user_key, pending.id, "deny")).start()

    with Agent.from_jwk_file(leash.url, setup.agent_id, setup.key_file) as agent:
        task = agent.task(setup.handle, on_approval=deny)
        with httpx.Client(auth=task.auth) as client:
            assert client.get(task.url("mail", "/messages/1")).status_code == 200
            token = task._token.value if task._token else ""
            assert token.count(".") == 2
            dpop_d = task._dpop_key._key.private_bytes_raw()  # type: ignore[union-attr]
            with pytest.raises(ApprovalDenied) as denied:
                client.post(task.url("mail", "/messages/1/send"), content=b"x")
            shown += [repr(agent), repr(task), repr(task.auth), repr(task.requests_auth())]
            shown += [repr(agent._key), repr(task._dpop_key), repr(task._token), str(denied.value)]
            task.complete()
            with pytest.raises(TaskEnded) as ended:
                client.get(task.url("mail", "/messages/1"))
            shown += [str(ended.value), repr(ended.value), repr(task)]
    assert "exchanged a token" in caplog.text, "the debug log was captured"
    everything = "\n".join(shown) + caplog.text
    for secret in (setup.handle, token, private_d, token.split(".")[2]):
        assert secret not in everything
    assert dpop_d.hex() not in everything
    assert setup.agent_id in repr(agent)
