"""MCP through Leash (API §14): the official Python `mcp` client with the SDK's `task.auth`
(API §15) against a real FastMCP server (tests/mcp_servers/crm.py) behind `/mcp/crm`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Leash, Setup, leash_bin, set_up
from mcp_fixtures import CrmServer, EverythingServer, mcp_session, start_crm, ts_client

from leash_agent import Agent, Task, TaskEnded

CRM_TOOLS = """
[mcp]
approval_wait = {wait}

[[upstream]]
name = "crm"
url = "{url}"
kind = "mcp"
[[upstream.tool]]
name = "search_contacts"
action = "crm:search"
[[upstream.tool]]
name = "update_contact"
action = "crm:update"
[[upstream.tool]]
name = "delete_contact"
action = "crm:delete"
risk = "high"
[[upstream.tool]]
name = "pay"
action = "crm:pay"
[[upstream.tool]]
name = "long_report"
action = "crm:report"
[[upstream.tool]]
name = "ask_new_email"
action = "crm:ask"
"""

GRANTED = ["crm:search", "crm:delete", "crm:report", "crm:pay", "crm:ask"]

# What an MCP client sends with each message (Streamable HTTP).
HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


def contains(error: BaseException, kind: type[BaseException]) -> bool:
    """Whether `error`, or an exception in its group, is a `kind`."""
    if isinstance(error, kind):
        return True
    return any(contains(inner, kind) for inner in getattr(error, "exceptions", ()))


@pytest.fixture(scope="module")
def crm() -> Iterator[CrmServer]:
    with start_crm() as server:
        yield server


@pytest.fixture(scope="module")
def crm_leash(crm: CrmServer, upstream: Any) -> Iterator[Leash]:
    server = Leash(upstream, CRM_TOOLS.format(url=crm.url, wait=20))
    yield server
    server.stop()


def crm_task(leash: Leash, tmp_path: Path, **grant: Any) -> tuple[Setup, Agent, Task]:
    fields = {
        "upstreams": ["crm"],
        "actions": GRANTED,
        "approval_required": [],
        **grant,
    }
    setup = set_up(leash, tmp_path, **fields)
    agent = Agent.from_jwk_file(leash.url, setup.agent_id, setup.key_file)
    return setup, agent, agent.task(setup.handle)


def endpoint(leash: Leash) -> str:
    return f"{leash.url}/mcp/crm"


def text_of(result: Any) -> str:
    return " ".join(getattr(part, "text", "") for part in result.content)


def decide_when_asked(setup: Setup, decision: str) -> threading.Thread:
    """The human, deciding the first pending approval of the grant that appears."""

    def human() -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            pending = setup.leash.call("GET", "/v1/approvals?status=pending", setup.user_key)
            mine = [a for a in pending.json()["approvals"] if a["grant_id"] == setup.grant_id]
            if mine:
                setup.leash.decide(setup.user_key, mine[0]["id"], decision)
                return
            time.sleep(0.1)

    thread = threading.Thread(target=human)
    thread.start()
    return thread


def test_tools_are_listed_and_called_within_the_grant(
    crm_leash: Leash, crm: CrmServer, tmp_path: Path
) -> None:
    setup, agent, task = crm_task(crm_leash, tmp_path)

    async def session() -> None:
        async with mcp_session(endpoint(crm_leash), task.auth) as mcp:
            listed = await mcp.list_tools()
            # Granted and configured; update_contact is configured but not granted.
            assert sorted(t.name for t in listed.tools) == [
                "ask_new_email",
                "delete_contact",
                "long_report",
                "pay",
                "search_contacts",
            ]
            found = await mcp.call_tool("search_contacts", {"query": "ada"})
            assert not found.isError, text_of(found)
            assert "ada" in text_of(found).lower()
            refused = await mcp.call_tool("update_contact", {"id": 1, "email": "x@example.org"})
            assert refused.isError
            assert text_of(refused).startswith("Leash refused:")
            assert "scope" in text_of(refused)

    with agent:
        asyncio.run(session())
    assert crm.tools_called().count("update_contact") == 0, "a refused call reached the server"
    call = [c for c in crm.calls() if c["tool"] == "search_contacts"][-1]
    assert call["headers"]["leash-actor"] == setup.agent_id
    assert "authorization" not in call["headers"]
    assert "dpop" not in call["headers"]
    events = [e for e in crm_leash.audit(setup.grant_id) if e["kind"] == "mcp.call"]
    assert [(e["action"], e["decision"]) for e in events] == [
        ("crm:search", "allow"),
        ("crm:update", "deny"),
    ]
    assert events[0]["path"].startswith("/tools/search_contacts?arguments_sha256=")
    # "ada" is made of hex digits too: look for it as a value and for its key, not as a substring.
    audited = json.dumps(events)
    assert '"ada"' not in audited, "arguments are audited only as a hash"
    assert '"query"' not in audited
    review = crm_leash.call("GET", "/v1/review", setup.user_key).json()
    reviewed = next(g for g in review["grants"] if g["id"] == setup.grant_id)
    assert "crm:search" in json.dumps(reviewed["actions_used"])
    assert "crm:pay" in reviewed["actions_unused"], "granted tools never called are flagged"


def test_a_long_tool_result_streams(crm_leash: Leash, tmp_path: Path) -> None:
    _, agent, task = crm_task(crm_leash, tmp_path)
    seen: list[float] = []

    async def session() -> Any:
        async with mcp_session(endpoint(crm_leash), task.auth) as mcp:

            async def on_progress(
                progress: float, total: float | None, message: str | None
            ) -> None:
                seen.append(progress)

            return await mcp.call_tool(
                "long_report", {"sections": 3}, progress_callback=on_progress
            )

    with agent:
        result = asyncio.run(session())
    assert not result.isError, text_of(result)
    assert len(seen) == 3


@pytest.mark.parametrize("decision", ["approve", "deny"])
def test_a_destructive_call_waits_for_the_human(
    crm_leash: Leash, crm: CrmServer, tmp_path: Path, decision: str
) -> None:
    setup, agent, task = crm_task(crm_leash, tmp_path)
    before = crm.tools_called().count("delete_contact")

    async def session() -> tuple[Any, Any]:
        async with mcp_session(endpoint(crm_leash), task.auth) as mcp:
            human = decide_when_asked(setup, decision)
            first = await mcp.call_tool("delete_contact", {"id": 2})
            human.join()
            # The approval was for that call: another, with other arguments, waits anew (denied).
            human = decide_when_asked(setup, "deny")
            other = await mcp.call_tool("delete_contact", {"id": 3})
            human.join()
            return first, other

    with agent:
        first, other = asyncio.run(session())
    deleted = crm.tools_called().count("delete_contact") - before
    if decision == "approve":
        assert not first.isError, text_of(first)
        assert deleted == 1
    else:
        assert first.isError
        assert "denied" in text_of(first)
        assert deleted == 0
    assert other.isError
    assert [c["arguments"] for c in crm.calls() if c["tool"] == "delete_contact"].count(
        {"id": 3}
    ) == 0


def test_revoking_the_task_ends_a_held_call(
    crm_leash: Leash, crm: CrmServer, tmp_path: Path
) -> None:
    setup, agent, task = crm_task(crm_leash, tmp_path)

    def revoke_when_asked() -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            pending = setup.leash.call("GET", "/v1/approvals?status=pending", setup.user_key)
            if any(a["grant_id"] == setup.grant_id for a in pending.json()["approvals"]):
                setup.leash.call("POST", f"/v1/grants/{setup.grant_id}/revoke", setup.user_key)
                return
            time.sleep(0.1)

    async def session() -> None:
        async with mcp_session(endpoint(crm_leash), task.auth) as mcp:
            await mcp.call_tool("delete_contact", {"id": 4})

    revoker = threading.Thread(target=revoke_when_asked)
    revoker.start()
    started = time.monotonic()
    # Leash ends the held call with the task (401 invalid_token); the SDK's exchange then finds
    # the grant revoked, and says so.
    raised: BaseException | None = None
    with agent:
        try:
            asyncio.run(session())
        except Exception as error:  # TaskEnded, inside the client's task group
            raised = error
    revoker.join()
    assert time.monotonic() - started < 10, "the held call outlived its grant"
    assert raised is not None
    assert contains(raised, TaskEnded), raised
    assert 4 not in [c["arguments"].get("id") for c in crm.calls()]


def pending_elicitation(setup: Setup) -> dict[str, Any]:
    """The grant's first pending elicitation, as the human's inbox shows it."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        pending = setup.leash.call("GET", "/v1/approvals?status=pending", setup.user_key).json()
        mine: list[dict[str, Any]] = [
            a
            for a in pending["approvals"]
            if a["grant_id"] == setup.grant_id and a["method"] == "elicitation/create"
        ]
        if mine:
            return mine[0]
        time.sleep(0.05)
    raise AssertionError("no elicitation reached the human's inbox")


def ask_new_email(leash: Leash, task: Task, contact: int) -> tuple[Any, list[Any]]:
    """Calls `ask_new_email` (the server elicits an email address) with a client that would
    answer an elicitation itself, recording any it is asked."""
    asked: list[Any] = []

    async def session() -> Any:
        async def elicit(context: Any, params: Any) -> Any:
            asked.append(params)
            raise AssertionError("the agent was asked for the human's input")

        async with mcp_session(endpoint(leash), task.auth, elicitation_callback=elicit) as mcp:
            return await mcp.call_tool("ask_new_email", {"id": contact})

    return asyncio.run(session()), asked


def in_thread(work: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(work()))
    thread.start()
    return thread, out


def test_an_elicitation_goes_to_the_human_who_answers_it(
    crm_leash: Leash, crm: CrmServer, tmp_path: Path
) -> None:
    """The server's `elicitation/create` never reaches the agent: the grant's human sees the
    message and form in the approvals inbox and answers (API §14); the answer is checked against
    the form, and only the human's reaches the server."""
    setup, agent, task = crm_task(crm_leash, tmp_path)
    with agent:
        call, out = in_thread(lambda: ask_new_email(crm_leash, task, 1))
        inbox = pending_elicitation(setup)
        approval_id = inbox["id"]
        assert inbox["action"] == "crm:elicitation"
        assert inbox["elicitation"]["message"] == "New email address for contact 1?"
        assert "email" in inbox["elicitation"]["requested_schema"]["properties"]
        path = f"/v1/approvals/{approval_id}/approve"
        # An answer that does not fit the form is refused, and the elicitation still waits.
        for bad in ({"email": 7}, {"email": "a@b.c", "admin": True}, {}):
            refused = crm_leash.call("POST", path, setup.user_key, {"content": bad})
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"] == "invalid_request"
        refused = crm_leash.call("POST", path, setup.user_key, {"content": "a@b.c"})
        assert refused.status_code == 400
        # The agent may read the status of its grant's approval, never the human's words.
        seen_by_agent = task.client().get(f"{crm_leash.url}/v1/approvals/{approval_id}")
        assert seen_by_agent.status_code == 200, seen_by_agent.text
        assert seen_by_agent.json()["status"] == "pending"
        assert "elicitation" not in seen_by_agent.json()
        # The human's side on the command line: the form shown, the answer given.
        env = {**os.environ, "LEASH_URL": crm_leash.url, "LEASH_TOKEN": setup.user_key}
        cli = [str(leash_bin()), "approvals"]
        shown = subprocess.run(
            [*cli, "show", approval_id], env=env, capture_output=True, text=True, check=True
        )
        assert "the server asks the human: New email address for contact 1?" in shown.stdout
        answered = subprocess.run(
            [*cli, "approve", approval_id, "--content", '{"email": "ada@lovelace.example"}'],
            env=env,
            capture_output=True,
            text=True,
        )
        assert answered.returncode == 0, answered.stderr
        assert "approved" in answered.stdout
        again = crm_leash.call(
            "POST", path, setup.user_key, {"content": {"email": "mallory@evil.example"}}
        )
        assert again.status_code == 409, again.text
        call.join(30)
    result, asked = out[0]
    assert asked == []
    assert text_of(result) == "contact 1 now has ada@lovelace.example", text_of(result)
    answers = [
        json.loads(r["body"])
        for r in crm.requests()
        if r["method"] == "POST" and '"result"' in r["body"] and '"action"' in r["body"]
    ]
    assert {"action": "accept", "content": {"email": "ada@lovelace.example"}} in [
        a["result"] for a in answers
    ]
    assert "mallory" not in json.dumps(answers)
    events = crm_leash.audit(setup.grant_id)
    asked_events = [e for e in events if e["kind"] == "mcp.elicitation"]
    assert [(e["decision"], e["request_id"]) for e in asked_events] == [
        ("approval_required", approval_id)
    ]
    approved = [e for e in events if e["kind"] == "approval.approved"]
    assert approved
    assert approved[-1]["approver"] is not None
    assert "lovelace" not in json.dumps(events), "the human's answer is not audited"


def test_an_elicitation_the_human_denies_or_ignores_is_declined(
    crm: CrmServer, upstream: Any, tmp_path: Path
) -> None:
    leash = Leash(upstream, CRM_TOOLS.format(url=crm.url, wait=2))
    try:
        setup, agent, task = crm_task(leash, tmp_path)
        with agent:
            call, out = in_thread(lambda: ask_new_email(leash, task, 2))
            inbox = pending_elicitation(setup)
            leash.decide(setup.user_key, inbox["id"], "deny")
            call.join(30)
            denied, asked = out[0]
            # Nobody answers: declined once mcp.approval_wait (2 s) has passed.
            started = time.monotonic()
            ignored, asked_too = ask_new_email(leash, task, 2)
            waited = time.monotonic() - started
    finally:
        leash.stop()
    assert asked == []
    assert asked_too == []
    assert text_of(denied) == "no change (decline)", text_of(denied)
    assert text_of(ignored) == "no change (decline)", text_of(ignored)
    assert waited >= 1.5, "the elicitation was declined before the human's time was up"


def test_content_answers_only_an_elicitation(crm_leash: Leash, tmp_path: Path) -> None:
    """An approval of a request takes no `content`: it cannot smuggle data to the server."""
    setup, agent, task = crm_task(crm_leash, tmp_path)

    async def session() -> Any:
        async with mcp_session(endpoint(crm_leash), task.auth) as mcp:
            return await mcp.call_tool("delete_contact", {"id": 99})

    with agent:
        call, out = in_thread(lambda: asyncio.run(session()))
        deadline = time.monotonic() + 15
        mine: list[Any] = []
        while not mine and time.monotonic() < deadline:
            pending = crm_leash.call("GET", "/v1/approvals?status=pending", setup.user_key).json()
            mine = [a for a in pending["approvals"] if a["grant_id"] == setup.grant_id]
            time.sleep(0.05)
        assert mine, "the destructive call asked no approval"
        assert "elicitation" not in mine[0]
        path = f"/v1/approvals/{mine[0]['id']}/approve"
        refused = crm_leash.call("POST", path, setup.user_key, {"content": {"id": 1}})
        assert refused.status_code == 400, refused.text
        unknown = crm_leash.call("POST", path, setup.user_key, {"contents": {}})
        assert unknown.status_code == 400, unknown.text
        # Who calls is settled before the body is read: no key, or the agent's token → refused.
        garbage = {"Content-Type": "application/json"}
        anonymous = crm_leash.http.post(path, content=b"{not json", headers=garbage)
        assert anonymous.status_code == 401, anonymous.text
        by_agent = task.client().post(
            f"{crm_leash.url}{path}", content=b"{not json", headers=garbage
        )
        assert by_agent.status_code == 403, by_agent.text
        leash_deny = crm_leash.call("POST", f"/v1/approvals/{mine[0]['id']}/deny", setup.user_key)
        assert leash_deny.status_code == 200
        call.join(30)
    assert out[0].isError


def test_the_endpoint_names_leash_as_its_authorization_server(crm_leash: Leash) -> None:
    refused = httpx.post(endpoint(crm_leash), json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert refused.status_code == 401
    challenge = refused.headers["WWW-Authenticate"]
    metadata_url = f"{crm_leash.url}/.well-known/oauth-protected-resource/mcp/crm"
    assert f'resource_metadata="{metadata_url}"' in challenge
    metadata = httpx.get(metadata_url).json()
    assert metadata["resource"] == endpoint(crm_leash)
    assert metadata["authorization_servers"] == [crm_leash.url]
    assert (
        httpx.get(f"{crm_leash.url}/.well-known/oauth-protected-resource/mcp/mail").status_code
        == 404
    )


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'[{"jsonrpc": "2.0", "id": 1, "method": "ping"}]',
        b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "result": {}}',
        b'{"jsonrpc": "1.0", "id": 1, "method": "ping"}',
        b'{"jsonrpc": "2.0", "id": null, "method": "ping"}',
        b'{"jsonrpc": "2.0", "id": 7, "result": {}}',
        b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call",'
        b' "params": {"name": "pay", "name": "search_contacts"}}',
    ],
)
def test_garbage_is_refused_with_400_and_never_forwarded(
    crm_leash: Leash, crm: CrmServer, tmp_path: Path, body: bytes
) -> None:
    _, agent, task = crm_task(crm_leash, tmp_path)
    before = len(crm.requests())
    with agent:
        answer = httpx.post(
            endpoint(crm_leash),
            content=body,
            headers={
                "Content-Type": "application/json",
                "Accept": "application/json, text/event-stream",
            },
            auth=task.auth,
        )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "invalid_request"
    assert len(crm.requests()) == before


def test_a_session_belongs_to_the_agent_that_opened_it(
    crm_leash: Leash, crm: CrmServer, tmp_path: Path
) -> None:
    _, agent, task = crm_task(crm_leash, tmp_path)
    _, intruder, other = crm_task(crm_leash, tmp_path)
    headers = HEADERS
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "test", "version": "1"},
        },
    }
    with agent, intruder:
        opened = httpx.post(endpoint(crm_leash), json=init, headers=headers, auth=task.auth)
        assert opened.status_code == 200, opened.text
        session = opened.headers["Mcp-Session-Id"]
        ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
        stolen = httpx.post(
            endpoint(crm_leash),
            json=ping,
            headers={**headers, "Mcp-Session-Id": session},
            auth=other.auth,
        )
        assert stolen.status_code == 404
        own = httpx.post(
            endpoint(crm_leash),
            json=ping,
            headers={**headers, "Mcp-Session-Id": session},
            auth=task.auth,
        )
        assert own.status_code == 200, own.text


def test_unknown_methods_get_a_json_rpc_error(crm_leash: Leash, tmp_path: Path) -> None:
    _, agent, task = crm_task(crm_leash, tmp_path)
    headers = HEADERS
    with agent:
        answer = httpx.post(
            endpoint(crm_leash),
            json={"jsonrpc": "2.0", "id": 9, "method": "completion/complete", "params": {}},
            headers=headers,
            auth=task.auth,
        )
    assert answer.status_code == 200
    assert answer.json()["error"]["code"] == -32601


def test_the_official_typescript_client_works_through_leash(
    crm_leash: Leash, crm: CrmServer, tmp_path: Path
) -> None:
    """The official TypeScript client (`@modelcontextprotocol/sdk`) with a fetch wrapper that
    signs each request with DPoP, given a token the Python SDK exchanged for its proof key."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from leash_agent import SigningKey
    from leash_agent._jose import b64url

    private = ed25519.Ed25519PrivateKey.generate()
    jwk = {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": b64url(private.public_key().public_bytes_raw()),
        "d": b64url(private.private_bytes_raw()),
    }
    _, agent, task = crm_task(crm_leash, tmp_path)
    with agent:
        task._dpop_key = SigningKey.from_jwk(jwk)
        token = task._usable_token().value
        lines = ts_client(
            endpoint(crm_leash),
            "list",
            "call",
            "search_contacts",
            json.dumps({"query": "grace"}),
            "call",
            "update_contact",
            json.dumps({"id": 1, "email": "x@example.org"}),
            token=token,
            dpop_jwk=jwk,
        )
    listed, found, refused = (line["result"] for line in lines)
    assert "update_contact" not in [tool["name"] for tool in listed["tools"]]
    assert "search_contacts" in [tool["name"] for tool in listed["tools"]]
    assert not found.get("isError"), found
    assert refused["isError"], refused
    assert crm.tools_called().count("update_contact") == 0


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        ("/mcp/crm", 200),
        ("", 200),
        ("/gw/mail", 200),
        ("/mcp/mail", 400),
        ("https://evil.example/mcp", 400),
    ],
)
def test_the_token_endpoint_takes_only_leash_resources(
    crm_leash: Leash, tmp_path: Path, resource: str, expected: int
) -> None:
    """RFC 8707 `resource`: one of Leash's own resource URLs, else `invalid_target`."""
    from leash_agent import SigningKey
    from leash_agent._agent import GRANT_TOKEN_TYPE, JWT_BEARER, TOKEN_EXCHANGE

    setup, agent, _ = crm_task(crm_leash, tmp_path)
    agent.close()
    key = SigningKey.from_jwk(json.loads(setup.key_file.read_text()))
    now, token_url = int(time.time()), f"{crm_leash.url}/oauth2/token"
    form = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": setup.handle,
        "subject_token_type": GRANT_TOKEN_TYPE,
        "client_assertion_type": JWT_BEARER,
        "client_assertion": key.client_assertion(setup.agent_id, crm_leash.url, now),
        "resource": resource if resource.startswith("https:") else crm_leash.url + resource,
    }
    proof = SigningKey.generate().dpop_proof("POST", token_url, now)
    answer = httpx.post(token_url, data=form, headers={"DPoP": proof})
    assert answer.status_code == expected, answer.text
    if expected == 400:
        assert answer.json()["error"] == "invalid_target"


EVERYTHING_TOOLS = """
[[upstream]]
name = "everything"
url = "{url}"
kind = "mcp"
[[upstream.tool]]
name = "echo"
action = "everything:echo"
[[upstream.tool]]
name = "get-sum"
action = "everything:sum"
[[upstream.tool]]
name = "trigger-long-running-operation"
action = "everything:long"
"""


def test_the_reference_server_everything_works_behind_leash(
    everything_server: EverythingServer, upstream: Any, tmp_path: Path
) -> None:
    """npm `@modelcontextprotocol/server-everything`, unmodified, behind `/mcp/everything`."""
    leash = Leash(upstream, EVERYTHING_TOOLS.format(url=everything_server.url))
    try:
        setup = set_up(
            leash,
            tmp_path,
            upstreams=["everything"],
            actions=["everything:echo", "everything:long"],
            approval_required=[],
        )
        steps: list[float] = []

        async def session(task: Task) -> tuple[set[str], Any, Any, Any]:
            async with mcp_session(f"{leash.url}/mcp/everything", task.auth) as mcp:
                tools = {tool.name for tool in (await mcp.list_tools()).tools}
                echoed = await mcp.call_tool("echo", {"message": "through Leash"})
                summed = await mcp.call_tool("get-sum", {"a": 1, "b": 2})

                async def on_progress(
                    progress: float, total: float | None, message: str | None
                ) -> None:
                    steps.append(progress)

                # Whole seconds: a fraction is an argument policy cannot judge (API §14).
                long = await mcp.call_tool(
                    "trigger-long-running-operation",
                    {"duration": 1, "steps": 3},
                    progress_callback=on_progress,
                )
                return tools, echoed, summed, long

        with Agent.from_jwk_file(leash.url, setup.agent_id, setup.key_file) as agent:
            tools, echoed, summed, long = asyncio.run(session(agent.task(setup.handle)))
        assert tools == {"echo", "trigger-long-running-operation"}
        assert text_of(echoed) == "Echo: through Leash"
        assert summed.isError, "get-sum is configured but not granted"
        assert "Steps: 3" in text_of(long)
        assert steps == [1, 2, 3]
    finally:
        leash.stop()


def test_a_policy_decides_on_a_tool_argument(crm: CrmServer, upstream: Any, tmp_path: Path) -> None:
    """An operator's Cedar rule on `context.arguments` (API §14); an argument Cedar cannot hold
    exactly (here a fraction) denies the call rather than being dropped."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "pay.cedar").write_text(
        '@id("large-payments")\n'
        'forbid (principal, action == Leash::Action::"crm:pay", resource)\n'
        "when { context has arguments && context.arguments has amount"
        " && context.arguments.amount > 1000 };\n"
    )
    leash = Leash(upstream, f'policy_dir = "{policies}"\n' + CRM_TOOLS.format(url=crm.url, wait=5))
    try:
        _, agent, task = crm_task(leash, tmp_path)

        async def session() -> list[Any]:
            async with mcp_session(f"{leash.url}/mcp/crm", task.auth) as mcp:
                return [
                    await mcp.call_tool("pay", {"to": "ada", "amount": amount})
                    for amount in (1000, 1001, 10.5)
                ]

        with agent:
            allowed, large, fraction = asyncio.run(session())
        metrics = httpx.get(f"{leash.url}/metrics").text
    finally:
        leash.stop()
    # Decided tool calls are counted as the audit records them, the refused ones too though
    # they are answered in a 200; initialize and tools/list, passed on undecided, are not.
    for decision, count in (("allow", 1), ("deny", 2), ("approval_required", 0)):
        series = f'leash_requests_total{{surface="mcp",decision="{decision}"}} {count}\n'
        assert series in metrics, metrics
    assert 'leash_request_duration_seconds_count{surface="mcp"} 3\n' in metrics
    assert not allowed.isError, text_of(allowed)
    assert large.isError
    assert "large-payments" in text_of(large) or "policy" in text_of(large)
    assert fraction.isError
    assert "amount" in text_of(fraction)
    paid = [c["arguments"]["amount"] for c in crm.calls() if c["tool"] == "pay"]
    assert 1001 not in paid
    assert 10.5 not in paid


def test_a_single_use_tool_takes_a_token_per_call(
    crm_leash: Leash, crm: CrmServer, tmp_path: Path
) -> None:
    """A `single_use` tool (API §2) is called once per token: the second call's token is refused
    (401, single use spent) and the SDK exchanges a token for it alone, so both calls run."""
    setup, agent, task = crm_task(crm_leash, tmp_path, single_use=["crm:search"])
    queries = [f"single-{setup.grant_id}-{n}" for n in range(2)]

    async def session() -> list[Any]:
        async with mcp_session(endpoint(crm_leash), task.auth) as mcp:
            return [await mcp.call_tool("search_contacts", {"query": q}) for q in queries]

    with agent:
        results = asyncio.run(session())
    assert [r.isError for r in results] == [False, False]
    ran = [c["arguments"]["query"] for c in crm.calls() if c["tool"] == "search_contacts"]
    assert [q for q in ran if q in queries] == queries
    assert crm_leash.exchanges(setup.grant_id) == 2


@pytest.mark.parametrize(
    ("name", "value"),
    [("Mcp-Method", "ping"), ("Mcp-Name", "pay"), ("Mcp-Method", "tools/call, tools/call")],
)
def test_mcp_headers_must_say_what_the_body_says(
    crm_leash: Leash, crm: CrmServer, tmp_path: Path, name: str, value: str
) -> None:
    """2026-07-28 names the message in `Mcp-Method` and `Mcp-Name`: a proxy routing on them must
    see the call Leash judged, so a header that differs from the body is refused."""
    _, agent, task = crm_task(crm_leash, tmp_path)
    before = len(crm.requests())
    call = {
        "jsonrpc": "2.0",
        "id": 3,
        "method": "tools/call",
        "params": {"name": "search_contacts", "arguments": {"query": "x"}},
    }
    with agent:
        answer = httpx.post(
            endpoint(crm_leash), json=call, headers={**HEADERS, name: value}, auth=task.auth
        )
    assert answer.status_code == 400, answer.text
    assert len(crm.requests()) == before


def test_a_client_that_goes_away_withdraws_its_held_call(
    crm_leash: Leash, crm: CrmServer, tmp_path: Path
) -> None:
    """A held call whose client disconnects ends, and its approval leaves the human's inbox."""
    setup, agent, task = crm_task(crm_leash, tmp_path)
    call = {
        "jsonrpc": "2.0",
        "id": 11,
        "method": "tools/call",
        "params": {"name": "delete_contact", "arguments": {"id": 77}},
    }
    with agent, pytest.raises(httpx.ReadTimeout):
        httpx.post(endpoint(crm_leash), json=call, headers=HEADERS, auth=task.auth, timeout=1.5)
    deadline = time.monotonic() + 10
    status = "pending"
    while status == "pending" and time.monotonic() < deadline:
        time.sleep(0.2)
        listed = crm_leash.call("GET", "/v1/approvals", setup.user_key).json()["approvals"]
        status = next(a["status"] for a in listed if a["grant_id"] == setup.grant_id)
    assert status == "denied", "the approval of a call nobody waits for stayed in the inbox"
    assert {"id": 77} not in [c["arguments"] for c in crm.calls()]


def test_the_humans_credential_reaches_the_server_and_never_the_agent(
    crm_leash: Leash, crm: CrmServer, tmp_path: Path
) -> None:
    """The human's vaulted credential for the MCP upstream is injected into each forwarded
    message (API §9, §14), and into what Leash answers the server for the human (a declined
    elicitation the human denied); the agent's own answer carries none of it."""
    setup, agent, task = crm_task(crm_leash, tmp_path)
    secret = f"session={setup.grant_id}-secret"
    stored = crm_leash.call(
        "PUT", "/v1/vault/crm", setup.user_key, {"kind": "cookie", "secret": secret}
    )
    assert stored.status_code in (200, 201), stored.text
    before = len(crm.requests())

    async def session() -> tuple[Any, Any]:
        async with mcp_session(endpoint(crm_leash), task.auth) as mcp:
            found = await mcp.call_tool("search_contacts", {"query": "ada"})
            asked = await mcp.call_tool("ask_new_email", {"id": 1})
            return found, asked

    def human() -> None:
        setup.leash.decide(setup.user_key, pending_elicitation(setup)["id"], "deny")

    with agent:
        deciding = threading.Thread(target=human)
        deciding.start()
        # The guard on an answer carrying the credential must not hold the server's events back
        # until its next one (the elicitation waited for the server's 15 s timeout once).
        found, asked = asyncio.run(asyncio.wait_for(session(), 10))
        deciding.join()
    assert secret not in json.dumps([found.model_dump(), asked.model_dump()])
    seen = crm.requests()[before:]
    carried = [r for r in seen if r["headers"].get("cookie") == secret]
    assert carried, "the vaulted cookie never reached the MCP server"
    declines = [r for r in seen if '"decline"' in r["body"]]
    assert declines, "Leash never answered the elicitation"
    assert all(r["headers"].get("cookie") == secret for r in declines)


CRM = "https://crm.example"


@pytest.fixture(scope="module")
def crm_delegated(crm: CrmServer, upstream: Any) -> Iterator[Leash]:
    """The CRM behind `[upstream.inject] kind = "leash_token"`: it gets delegation tokens."""
    inject = f'kind = "mcp"\ninject = {{ kind = "leash_token", audience = "{CRM}" }}\n'
    server = Leash(
        upstream, CRM_TOOLS.format(url=crm.url, wait=20).replace('kind = "mcp"\n', inject)
    )
    yield server
    server.stop()


def test_an_mcp_server_taking_delegation_tokens_gets_one_per_message_and_answer(
    crm_delegated: Leash, crm: CrmServer, tmp_path: Path
) -> None:
    """API §17 for MCP: each forwarded message carries a delegation token for the tool's action,
    and so does what Leash answers the server for the human (the declined elicitation), under
    `<upstream>:elicitation`; the agent's own token never does."""
    from test_delegation import check, delegation_keys

    setup, agent, task = crm_task(crm_delegated, tmp_path)
    before = len(crm.requests())

    async def session() -> None:
        async with mcp_session(f"{crm_delegated.url}/mcp/crm", task.auth) as mcp:
            await mcp.call_tool("search_contacts", {"query": "ada"})
            await mcp.call_tool("ask_new_email", {"id": 1})

    def human() -> None:
        setup.leash.decide(setup.user_key, pending_elicitation(setup)["id"], "deny")

    with agent:
        deciding = threading.Thread(target=human)
        deciding.start()
        asyncio.run(asyncio.wait_for(session(), 10))
        deciding.join()
    keys = delegation_keys(crm_delegated)
    seen = crm.requests()[before:]
    call = next(r for r in seen if '"search_contacts"' in r["body"])
    called = check(call["headers"]["authorization"].removeprefix("Bearer "), keys, CRM)
    assert (called["scope"], called["act"]["sub"]) == ("crm:search", setup.agent_id)
    assert called["grant_id"] == setup.grant_id
    declines = [r for r in seen if '"decline"' in r["body"]]
    assert declines, "Leash never answered the elicitation"
    for answer in declines:
        claims = check(answer["headers"]["authorization"].removeprefix("Bearer "), keys, CRM)
        assert (claims["scope"], claims["sub"]) == ("crm:elicitation", called["sub"])
        assert claims["act"]["sub"] == setup.agent_id


def test_a_request_from_another_origin_is_refused(
    crm_leash: Leash, crm: CrmServer, tmp_path: Path
) -> None:
    """`Origin`, when sent, must be Leash's own (DNS rebinding, API §14): nothing is forwarded."""
    _, agent, task = crm_task(crm_leash, tmp_path)
    before = len(crm.requests())
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    with agent:
        refused = httpx.post(
            endpoint(crm_leash),
            json=ping,
            headers={**HEADERS, "Origin": "http://evil.example"},
            auth=task.auth,
        )
        own = httpx.post(
            endpoint(crm_leash),
            json=ping,
            headers={**HEADERS, "Origin": crm_leash.url},
            auth=task.auth,
        )
    assert refused.status_code == 403, refused.text
    assert own.status_code != 403, own.text
    assert len(crm.requests()) == before + 1


UNLISTED_TOOLS = """
[mcp]
approval_wait = 20

[[upstream]]
name = "crm"
url = "{url}"
kind = "mcp"
unlisted_tools = "{unlisted}"
[[upstream.tool]]
name = "delete_contact"
action = "crm:delete"
risk = "high"
[[upstream.tool]]
name = "update_contact"
action = "crm:pay"
"""


def test_unlisted_tools_are_let_through_only_when_the_upstream_says_so(
    crm: CrmServer, upstream: Any, tmp_path: Path
) -> None:
    """`unlisted_tools = "allow"` (API §14): a tool the config does not list takes the action
    `<upstream>:<tool>`; one whose action the config gives to another tool (here `pay`, since
    `update_contact` is `crm:pay`) stays hidden and refused, as does one not granted."""
    refusing = Leash(upstream, CRM_TOOLS.format(url=crm.url, wait=5))
    try:
        user_key = refusing.add_user(f"bob-{time.monotonic_ns()}")
        refused = refusing.call(
            "POST",
            "/v1/grants",
            user_key,
            {
                "agent": "spiffe://example.org/agent/x",
                "purpose": "p",
                "upstreams": ["crm"],
                "actions": ["crm:search_contacts"],
                "ttl_seconds": 60,
            },
        )
        assert refused.status_code == 400, "an unlisted tool's action is granted only if allowed"
    finally:
        refusing.stop()

    leash = Leash(upstream, UNLISTED_TOOLS.format(url=crm.url, unlisted="allow"))
    try:
        upstreams = leash.call("GET", "/v1/upstreams", leash.admin_key).json()["upstreams"]
        assert next(u for u in upstreams if u["name"] == "crm")["unlisted_tools"] == "allow"
        setup, agent, task = crm_task(
            leash, tmp_path, actions=["crm:search_contacts", "crm:pay", "crm:delete"]
        )
        paid_before = crm.tools_called().count("pay")

        async def session() -> tuple[set[str], Any, Any]:
            async with mcp_session(f"{leash.url}/mcp/crm", task.auth) as mcp:
                tools = {tool.name for tool in (await mcp.list_tools()).tools}
                found = await mcp.call_tool("search_contacts", {"query": "lovelace"})
                paid = await mcp.call_tool("pay", {"to": "mallory", "amount": 1})
                return tools, found, paid

        with agent:
            tools, found, paid = asyncio.run(session())
        assert tools == {"search_contacts", "update_contact", "delete_contact"}
        assert not found.isError, text_of(found)
        assert "lovelace" in text_of(found).lower()
        assert paid.isError
        assert "not offered" in text_of(paid)
        assert crm.tools_called().count("pay") == paid_before, "a refused call reached the server"
        events = [e for e in leash.audit(setup.grant_id) if e["kind"] == "mcp.call"]
        assert [(e["action"], e["decision"]) for e in events] == [
            ("crm:search_contacts", "allow"),
            (None, "deny"),
        ]
    finally:
        leash.stop()


def test_unlisted_tools_high_wait_for_the_human(
    crm: CrmServer, upstream: Any, tmp_path: Path
) -> None:
    """`unlisted_tools = "high"`: an unlisted tool's call waits for the human's approval."""
    leash = Leash(upstream, UNLISTED_TOOLS.format(url=crm.url, unlisted="high"))
    try:
        setup, agent, task = crm_task(leash, tmp_path, actions=["crm:search_contacts"])

        async def session() -> tuple[Any, Any]:
            async with mcp_session(f"{leash.url}/mcp/crm", task.auth) as mcp:
                human = decide_when_asked(setup, "deny")
                denied = await mcp.call_tool("search_contacts", {"query": "alan"})
                human.join()
                human = decide_when_asked(setup, "approve")
                approved = await mcp.call_tool("search_contacts", {"query": "turing"})
                human.join()
                return denied, approved

        with agent:
            denied, approved = asyncio.run(session())
        assert denied.isError
        assert "denied" in text_of(denied)
        assert not approved.isError, text_of(approved)
        searched = [c["arguments"] for c in crm.calls() if c["tool"] == "search_contacts"]
        assert {"query": "alan"} not in searched
        assert {"query": "turing"} in searched
    finally:
        leash.stop()
