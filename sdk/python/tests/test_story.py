"""The whole story of a task, through httpx (sync and async) and requests: exchange, read, scope
refusal, an approval waited for and answered by the human, single use, completion, the end."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import pytest
import requests
from conftest import Leash, Setup, set_up

from leash_agent import (
    Agent,
    ApprovalDenied,
    ApprovalTimeout,
    LeashError,
    PendingApproval,
    Task,
    TaskEnded,
)


class Human:
    """Decides each approval the SDK announces, from another thread, as a person at a console
    would: only after the agent has started waiting."""

    def __init__(self, setup: Setup, decision: str = "approve") -> None:
        self.setup = setup
        self.decision = decision
        self.seen: list[PendingApproval] = []
        self.threads: list[threading.Thread] = []

    def __call__(self, pending: PendingApproval) -> None:
        self.seen.append(pending)
        thread = threading.Thread(
            target=self.setup.leash.decide,
            args=(self.setup.user_key, pending.id, self.decision),
        )
        thread.start()
        self.threads.append(thread)


def agent_of(setup: Setup) -> Agent:
    return Agent.from_jwk_file(setup.leash.url, setup.agent_id, setup.key_file)


def test_the_whole_story_with_httpx(setup: Setup) -> None:
    leash = setup.leash
    human = Human(setup)
    with agent_of(setup) as agent, httpx.Client() as client:
        task = agent.task(setup.handle, ["mail:read", "mail:send"], on_approval=human)
        assert leash.exchanges(setup.grant_id) == 0, "nothing is sent before the first request"

        read = client.get(task.url("mail", "/messages/1?fields=subject"), auth=task.auth)
        assert read.status_code == 200, read.text
        assert read.json() == {"method": "GET", "path": "/messages/1?fields=subject"}
        forwarded = leash.upstream.seen()[-1]
        assert forwarded.headers["leash-actor"] == setup.agent_id
        assert forwarded.headers["leash-grant"] == setup.grant_id
        assert "authorization" not in forwarded.headers
        assert "dpop" not in forwarded.headers
        assert task.grant_id == setup.grant_id
        assert task.scope == ["mail:read", "mail:send"]

        # Outside the token's scope: Leash's refusal comes back as the answer it is.
        draft = client.post(task.url("mail", "/drafts"), content=b"hi", auth=task.auth)
        assert draft.status_code == 403
        assert draft.headers["Leash-Decision"] == "insufficient_scope"
        # Not a route at all.
        assert client.get(task.url("mail", "/nowhere"), auth=task.auth).status_code == 403

        # A high-risk send waits for Alice, then goes through once with her approval.
        before = len(leash.upstream.seen())
        sent = client.post(task.url("mail", "/messages/1/send"), content=b"hello", auth=task.auth)
        assert sent.status_code == 200, sent.text
        assert len(human.seen) == 1
        pending = human.seen[0]
        assert (pending.action, pending.method) == ("mail:send", "POST")
        assert str(pending.path).endswith("/messages/1/send")
        sends = [r for r in leash.upstream.seen()[before:] if r.path == "/messages/1/send"]
        assert [r.body for r in sends] == [b"hello"], "forwarded exactly once"

        # The approval was for that one request: the next send needs a new one, denied.
        human.decision = "deny"
        with pytest.raises(ApprovalDenied) as denied:
            client.post(task.url("mail", "/messages/1/send"), content=b"again", auth=task.auth)
        assert denied.value.approval_id != pending.id
        assert denied.value.code == "approval_denied"

        task.complete()
        assert leash.grant_status(setup.user_key, setup.grant_id) == "completed"
        task.complete()  # a second time: nothing
        with pytest.raises(TaskEnded):
            client.get(task.url("mail", "/messages/1"), auth=task.auth)
    # Another process holding the same handle cannot start the task again.
    with agent_of(setup) as agent:
        again = agent.task(setup.handle)
        with pytest.raises(TaskEnded) as ended:
            httpx.get(again.url("mail", "/messages/1"), auth=again.auth)
    assert ended.value.code == "invalid_grant"
    assert ended.value.status == 400


def test_the_whole_story_with_an_async_client(setup: Setup) -> None:
    leash = setup.leash
    human = Human(setup)

    async def story(task: Task) -> None:
        async with httpx.AsyncClient(auth=task.auth) as client:
            read = await client.get(task.url("mail", "/messages/2"))
            assert read.status_code == 200, read.text
            refused = await client.get(task.url("mail", "/export"))
            assert refused.headers["Leash-Decision"] == "insufficient_scope"
            # The event loop keeps running while the SDK waits for the human.
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.05)
                    ticks += 1

            ticker = asyncio.create_task(tick())
            sent = await client.post(task.url("mail", "/messages/2/send"), content=b"hi")
            ticker.cancel()
            assert sent.status_code == 200, sent.text
            assert ticks >= 3, "the wait blocked the event loop"
            await task.acomplete()
            with pytest.raises(TaskEnded):
                await client.get(task.url("mail", "/messages/2"))

    with agent_of(setup) as agent:
        asyncio.run(story(agent.task(setup.handle, on_approval=human)))
    assert len(human.seen) == 1
    assert leash.grant_status(setup.user_key, setup.grant_id) == "completed"


def test_the_whole_story_with_requests(setup: Setup) -> None:
    leash = setup.leash
    human = Human(setup)
    with agent_of(setup) as agent, requests.Session() as session:
        task = agent.task(setup.handle, on_approval=human)
        session.auth = task.requests_auth()
        read = session.get(task.url("mail", "/messages/3"))
        assert read.status_code == 200, read.text
        assert session.get(task.url("mail", "/export")).status_code == 403
        sent = session.post(task.url("mail", "/messages/3/send"), data=b"from requests")
        assert sent.status_code == 200, sent.text
        assert [r.status_code for r in sent.history] == [403]
        assert leash.upstream.seen()[-1].body == b"from requests"
        task.complete()
        with pytest.raises(TaskEnded):
            session.get(task.url("mail", "/messages/3"))
    assert len(human.seen) == 1


def test_a_single_use_action_is_exchanged_for_again_each_time(leash: Leash, tmp_path: Path) -> None:
    single = set_up(leash, tmp_path, single_use=["mail:draft"], approval_required=[])
    with agent_of(single) as agent, httpx.Client() as client:
        task = agent.task(single.handle)
        for n in range(3):
            draft = client.post(task.url("mail", "/drafts"), content=f"draft {n}", auth=task.auth)
            assert draft.status_code == 200, draft.text
        # The first token, then one more for each use after the first.
        assert leash.exchanges(single.grant_id) == 3
        drafts = [r.body for r in leash.upstream.seen() if r.path == "/drafts"]
        assert drafts[-3:] == [b"draft 0", b"draft 1", b"draft 2"]


def test_a_scope_outside_the_grant_is_refused_at_the_exchange(setup: Setup) -> None:
    with agent_of(setup) as agent:
        task = agent.task(setup.handle, ["mail:read", "mail:delete"])
        with pytest.raises(LeashError) as refused:
            httpx.get(task.url("mail", "/messages/1"), auth=task.auth)
    assert (refused.value.code, refused.value.status) == ("invalid_scope", 400)
    assert not isinstance(refused.value, TaskEnded)


def test_a_revoked_task_ends_the_next_request(setup: Setup) -> None:
    with agent_of(setup) as agent:
        task = agent.task(setup.handle)
        assert httpx.get(task.url("mail", "/messages/1"), auth=task.auth).status_code == 200
        revoked = setup.leash.call(
            "POST", f"/v1/grants/{setup.grant_id}/revoke", setup.user_key, {"reason": "done"}
        )
        assert revoked.status_code == 200, revoked.text
        with pytest.raises(TaskEnded) as ended:
            httpx.get(task.url("mail", "/messages/1"), auth=task.auth)
        assert "revoked" in ended.value.description
        # Known locally from then on: no further call to Leash.
        with pytest.raises(TaskEnded):
            task.complete()


def test_an_approval_not_given_in_time_times_out(setup: Setup) -> None:
    seen: list[PendingApproval] = []
    with agent_of(setup) as agent:
        task = agent.task(setup.handle, approval_timeout=1.5, on_approval=seen.append)
        with pytest.raises(ApprovalTimeout) as timeout:
            httpx.post(task.url("mail", "/messages/1/send"), content=b"x", auth=task.auth)
    assert [p.id for p in seen] == [timeout.value.approval_id]
    approval = setup.leash.call("GET", f"/v1/approvals/{seen[0].id}", setup.user_key).json()
    assert approval["status"] == "pending", "the wait ends; the approval stays the human's"
