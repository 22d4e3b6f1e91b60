"""An outsider's attacks on the MCP endpoint (API §14, ATTACKS 56-57): raw, hand-made JSON-RPC
messages with a valid token and proof against the real FastMCP server (tests/mcp_servers/crm.py)
and npm server-everything behind `/mcp/...`; crm.py's `/requests` record shows what reached the
server. Tests whose docstring starts with "Held:" pin down an attack that failed; the others fail
on the reviewed binary and pass once the finding is fixed."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from conftest import Leash, Setup, set_up
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp_fixtures import CrmServer, EverythingServer, start_crm
from test_mcp import CRM_TOOLS, crm_task

from leash_agent import Agent, Task

# The configuration of test_mcp.py: the CRM's tools behind `/mcp/crm`.
TOOLS = CRM_TOOLS

ACCEPT = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "outsider", "version": "1"},
    },
}


@pytest.fixture(scope="module")
def crm_out() -> Iterator[CrmServer]:
    with start_crm() as server:
        yield server


@pytest.fixture(scope="module")
def leash_out(crm_out: CrmServer, upstream: Any) -> Iterator[Leash]:
    server = Leash(upstream, TOOLS.format(url=crm_out.url, wait=4))
    yield server
    server.stop()


def task_of(leash: Leash, tmp_path: Path, **grant: Any) -> tuple[Setup, Agent, Task]:
    """test_mcp's task, with the actions these attacks use."""
    return crm_task(leash, tmp_path, **{"actions": OUTSIDER_ACTIONS, **grant})


OUTSIDER_ACTIONS = ["crm:search", "crm:delete", "crm:pay", "crm:ask", "crm:resources"]


class Pinned(httpx.Auth):
    """One access token for every request (the SDK would exchange again when a single use is
    spent), with a fresh DPoP proof each time."""

    def __init__(self, task: Task) -> None:
        self.token = task._usable_token().value
        self.key = task._dpop_key

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"DPoP {self.token}"
        request.headers["DPoP"] = self.key.dpop_proof(
            request.method, str(request.url), int(time.time()), self.token
        )
        yield request


def url_of(leash: Leash) -> str:
    return f"{leash.url}/mcp/crm"


def post(
    leash: Leash,
    auth: httpx.Auth,
    body: Any,
    session: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = {**ACCEPT, **(headers or {})}
    if session is not None:
        sent["Mcp-Session-Id"] = session
    return httpx.post(url_of(leash), content=content, headers=sent, auth=auth, timeout=timeout)


def message_of(response: httpx.Response) -> dict[str, Any]:
    """The JSON-RPC answer in a JSON body or the last message of an event stream."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        data = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
        answer: dict[str, Any] = json.loads(data[-1])
        return answer
    answer = response.json()
    return answer


def open_session(leash: Leash, auth: httpx.Auth) -> str:
    opened = post(leash, auth, INIT)
    assert opened.status_code == 200, opened.text
    session = opened.headers["Mcp-Session-Id"]
    done = post(leash, auth, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
    assert done.status_code in (200, 202), done.text
    return session


def bodies(crm: CrmServer) -> list[str]:
    return [str(request["body"]) for request in crm.requests()]


def refused(answer: dict[str, Any]) -> bool:
    """A JSON-RPC error, or a tool result with `isError` (Leash's refusals)."""
    return "error" in answer or bool(answer.get("result", {}).get("isError"))


# ---- Findings ----------------------------------------------------------------------------------


def test_a_single_use_resources_action_is_used_once_per_token(
    leash_out: Leash, crm_out: CrmServer, tmp_path: Path
) -> None:
    """`single_use` (API §2) holds for `<upstream>:resources` as for a tool: one token may read
    resources once. The endpoint judges `resources/*` without the action in its commit, so the
    single use is never claimed and the same token lists resources again and again."""
    _, agent, task = task_of(leash_out, tmp_path, single_use=["crm:resources"])
    with agent:
        auth = Pinned(task)
        session = open_session(leash_out, auth)
        marker = f"single-use-{time.time_ns()}"
        answers = [
            message_of(
                post(
                    leash_out,
                    auth,
                    {"jsonrpc": "2.0", "id": marker + str(n), "method": "resources/list"},
                    session,
                )
            )
            for n in range(3)
        ]
    reached = [body for body in bodies(crm_out) if marker in body]
    assert not refused(answers[0]), answers[0]
    assert len(reached) == 1, f"one token listed resources {len(reached)} times"
    assert all(refused(answer) for answer in answers[1:]), answers


def test_a_retry_with_input_responses_is_not_the_agent_answering_for_the_human(
    leash_out: Leash, crm_out: CrmServer, tmp_path: Path
) -> None:
    """ATTACKS 57 / API §14: a 2026-07-28 `tools/call` retry carrying `inputResponses` (the
    answers to the server's elicitation) is decided and approved again, by the human, with
    those members in its hash. Leash ignores `inputResponses` (the approval digest is only
    `{name, arguments}`) and forwards the agent's own answers to the server at once, with no
    approval ever asked."""
    setup, agent, task = task_of(leash_out, tmp_path)
    marker = f"agent-made-up-{time.time_ns()}@evil.example"
    call = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {
            "name": "search_contacts",
            "arguments": {"query": "ada"},
            "inputResponses": {
                "email": {"action": "accept", "content": {"email": marker}},
            },
        },
    }
    headers = {
        "Mcp-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call",
        "Mcp-Name": "search_contacts",
    }
    with agent:
        answer = post(leash_out, task.auth, call, headers=headers)
    assert answer.status_code < 500, answer.text
    assert not [body for body in bodies(crm_out) if marker in body], (
        "the agent's own answers to an elicitation reached the server unapproved"
    )
    asked = [e for e in leash_out.audit(setup.grant_id) if e["decision"] == "approval_required"]
    assert asked, "no human was asked to approve the answers"


def test_a_sampling_request_reaches_the_agent_only_if_policy_permits(
    everything_server: EverythingServer, upstream: Any, tmp_path: Path
) -> None:
    """API §14: `sampling/createMessage` from the server passes only if policy permits it. The
    grant holds one tool and nothing about sampling, and the default policy permits nothing but
    the grant's actions; yet the server's sampling request reaches the agent's model and the
    agent's answer goes back to the server as the model's."""
    config = (
        "[[upstream]]\n"
        'name = "everything"\n'
        f'url = "{everything_server.url}"\n'
        'kind = "mcp"\n'
        "[[upstream.tool]]\n"
        'name = "trigger-sampling-request"\n'
        'action = "everything:sample"\n'
    )
    leash = Leash(upstream, config)
    asked: list[Any] = []
    try:
        setup = set_up(
            leash,
            tmp_path,
            upstreams=["everything"],
            actions=["everything:sample"],
            approval_required=[],
        )

        async def sample(context: Any, params: Any) -> Any:
            from mcp.types import CreateMessageResult, TextContent

            asked.append(params)
            return CreateMessageResult(
                role="assistant",
                content=TextContent(type="text", text="whatever the agent likes"),
                model="agent-forged",
            )

        async def session(task: Task) -> Any:
            async with (
                httpx.AsyncClient(auth=task.auth, timeout=httpx.Timeout(30, read=60)) as http,
                streamable_http_client(f"{leash.url}/mcp/everything", http_client=http) as (
                    read,
                    write,
                    _,
                ),
                ClientSession(read, write, sampling_callback=sample) as mcp,
            ):
                await mcp.initialize()
                return await mcp.call_tool(
                    "trigger-sampling-request", {"prompt": "hello", "maxTokens": 10}
                )

        with Agent.from_jwk_file(leash.url, setup.agent_id, setup.key_file) as agent:
            asyncio.run(asyncio.wait_for(session(agent.task(setup.handle)), 60))
    finally:
        leash.stop()
    assert asked == [], "a sampling request no policy permits reached the agent"


def test_a_cancelled_held_call_is_withdrawn(
    leash_out: Leash, crm_out: CrmServer, tmp_path: Path
) -> None:
    """API §14: a held call is withdrawn when the client sends `notifications/cancelled`. Leash
    forwards the cancellation but keeps holding the call: when the human, not knowing, approves
    the pending request, the withdrawn delete runs on the server anyway."""
    setup, agent, task = task_of(leash_out, tmp_path)
    target = 1000 + time.time_ns() % 1000
    call = {
        "jsonrpc": "2.0",
        "id": "held-1",
        "method": "tools/call",
        "params": {"name": "delete_contact", "arguments": {"id": target}},
    }
    with agent:
        session = open_session(leash_out, task.auth)
        answers: list[httpx.Response] = []
        holder = threading.Thread(
            target=lambda: answers.append(post(leash_out, task.auth, call, session))
        )
        holder.start()
        pending: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while not pending and time.monotonic() < deadline:
            listed = leash_out.call("GET", "/v1/approvals?status=pending", setup.user_key)
            pending = [a for a in listed.json()["approvals"] if a["grant_id"] == setup.grant_id]
            time.sleep(0.1)
        assert pending, "the call was not held for approval"
        cancel = {
            "jsonrpc": "2.0",
            "method": "notifications/cancelled",
            "params": {"requestId": "held-1", "reason": "the user changed their mind"},
        }
        cancelled = post(leash_out, task.auth, cancel, session)
        assert cancelled.status_code in (200, 202), cancelled.text
        time.sleep(0.5)
        # The human approves what the inbox still shows.
        leash_out.call("POST", f"/v1/approvals/{pending[0]['id']}/approve", setup.user_key)
        holder.join(15)
    deleted = [c for c in crm_out.calls() if c["tool"] == "delete_contact"]
    assert {"id": target} not in [c["arguments"] for c in deleted], (
        "a call the agent had cancelled ran after the approval"
    )


def test_mcp_name_must_equal_the_uri_of_a_resource_read(
    leash_out: Leash, crm_out: CrmServer, tmp_path: Path
) -> None:
    """ATTACKS 56 / API §14: `Mcp-Name` must equal the body's value: for `resources/read` that is
    `params.uri`. Leash compares it with `params.name` when there is one, so a body naming one
    resource in `uri` and another in a stray `name` passes with `Mcp-Name` showing the stray
    one to anything that routes or logs on the header."""
    _, agent, task = task_of(leash_out, tmp_path)
    marker = f"decoy-{time.time_ns()}"
    read = {
        "jsonrpc": "2.0",
        "id": 3,
        "method": "resources/read",
        "params": {"uri": "crm://contacts/secret", "name": marker},
    }
    headers = {
        "Mcp-Protocol-Version": "2026-07-28",
        "Mcp-Method": "resources/read",
        "Mcp-Name": marker,
    }
    with agent:
        answer = post(leash_out, task.auth, read, headers=headers)
    assert answer.status_code == 400, answer.text
    assert "Leash-Decision" in answer.headers, "the 400 must be Leash's, not the server's"
    assert not [body for body in bodies(crm_out) if marker in body]


# ---- Held --------------------------------------------------------------------------------------


def test_a_single_use_tool_is_called_once_per_token(
    leash_out: Leash, crm_out: CrmServer, tmp_path: Path
) -> None:
    """Held: a `single_use` tool (`pay`) called three times with one token runs once."""
    _, agent, task = task_of(leash_out, tmp_path, single_use=["crm:pay"])
    to = f"once-{time.time_ns()}"
    with agent:
        auth = Pinned(task)
        session = open_session(leash_out, auth)
        answers = [
            post(
                leash_out,
                auth,
                {
                    "jsonrpc": "2.0",
                    "id": n,
                    "method": "tools/call",
                    "params": {"name": "pay", "arguments": {"to": to, "amount": 1}},
                },
                session,
            )
            for n in range(3)
        ]
    paid = [c for c in crm_out.calls() if c["tool"] == "pay" and c["arguments"]["to"] == to]
    assert len(paid) == 1
    assert all(a.status_code < 500 for a in answers)


def test_another_agents_session_cannot_be_read_ended_or_answered(
    leash_out: Leash, crm_out: CrmServer, tmp_path: Path
) -> None:
    """Held: another agent's `Mcp-Session-Id` gets 404 for POST, the GET stream and DELETE, and
    the owner's session still works; a response to a server request never sent (say, a guessed
    elicitation id) is refused with 400 and not forwarded."""
    _, agent, task = task_of(leash_out, tmp_path)
    _, intruder, other = task_of(leash_out, tmp_path)
    with agent, intruder:
        session = open_session(leash_out, task.auth)
        before = len(crm_out.requests())
        ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
        assert post(leash_out, other.auth, ping, session).status_code == 404
        headers = {"Accept": "text/event-stream", "Mcp-Session-Id": session}
        got = httpx.get(url_of(leash_out), headers=headers, auth=other.auth, timeout=10)
        assert got.status_code == 404
        ended = httpx.delete(url_of(leash_out), headers=headers, auth=other.auth, timeout=10)
        assert ended.status_code == 404
        assert len(crm_out.requests()) == before, "a foreign session's request was forwarded"
        for guess in (0, 1, 2, "0", "1"):
            answer = {
                "jsonrpc": "2.0",
                "id": guess,
                "result": {"action": "accept", "content": {"email": "x@evil.example"}},
            }
            forged = post(leash_out, task.auth, answer, session)
            assert forged.status_code == 400, forged.text
        assert len(crm_out.requests()) == before
        assert post(leash_out, task.auth, ping, session).status_code == 200


@pytest.mark.parametrize(
    "name",
    [
        "Update_contact",
        "update_contact ",
        "update\\u005fcontact",
        "\uff55pdate_contact",
        "pay\\u0000",
    ],
)
def test_look_alike_and_ungranted_tool_names_are_refused(
    leash_out: Leash, crm_out: CrmServer, tmp_path: Path, name: str
) -> None:
    """Held: case, whitespace, escape, fullwidth and NUL look-alikes of tools, and
    `update_contact` (configured, not granted) written with an escape, are refused and never
    reach the server; a `tools/call` notification is a 400."""
    _, agent, task = task_of(leash_out, tmp_path)
    marker = f"look-alike-{time.time_ns()}"
    raw = (
        '{"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "'
        + name
        + '", "arguments": {"id": 1, "email": "'
        + marker
        + '", "to": "x", "amount": 1}}}'
    ).encode()
    with agent:
        session = open_session(leash_out, task.auth)
        answer = post(leash_out, task.auth, raw, session)
        notification = json.loads(raw)
        del notification["id"]
        silent = post(leash_out, task.auth, notification, session)
    assert answer.status_code == 200, answer.text
    assert refused(message_of(answer))
    assert silent.status_code == 400
    assert not [body for body in bodies(crm_out) if marker in body]


def test_the_agents_credentials_and_forged_headers_never_reach_the_server(
    leash_out: Leash, crm_out: CrmServer, tmp_path: Path
) -> None:
    """Held: `Authorization`, `DPoP`, `Cookie`, forged `Leash-*`, `X-Forwarded-*` and override
    headers are not forwarded; the server sees Leash's own attribution."""
    setup, agent, task = task_of(leash_out, tmp_path)
    forged = {
        "Cookie": "leash_session=stolen",
        "Leash-Actor": "spiffe://example.org/agent/someone-else",
        "Leash-Subject": "usr_admin",
        "Leash-Grant": "grt_other",
        "X-Forwarded-For": "10.0.0.1",
        "X-HTTP-Method-Override": "DELETE",
        "Forwarded": "for=10.0.0.1",
    }
    with agent:
        session = open_session(leash_out, task.auth)
        call = {
            "jsonrpc": "2.0",
            "id": 9,
            "method": "tools/call",
            "params": {"name": "search_contacts", "arguments": {"query": "grace"}},
        }
        answer = post(leash_out, task.auth, call, session, headers=forged)
        token = task._usable_token().value
    assert answer.status_code == 200, answer.text
    seen = crm_out.requests()[-1]["headers"]
    for name in ("authorization", "dpop", "cookie"):
        assert name not in seen, name
    assert token not in json.dumps(crm_out.requests())
    assert seen.get("leash-actor") == setup.agent_id
    assert seen.get("leash-grant") == setup.grant_id
    for name in ("x-forwarded-for", "x-http-method-override", "forwarded"):
        assert name not in seen, name


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"[" * 100_000 + b"]" * 100_000, {}),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "x": "' + b"a" * 20_000_000 + b'"}', {}),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}', {"Content-Encoding": "identity"}),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}', {"Mcp-Session-Id": "a b"}),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}', {"Mcp-Method": "tools/call"}),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "extra": 1}', {}),
        (b'{"jsonrpc": "2.0", "id": 1e3, "method": "ping"}', {}),
        (b'{"jsonrpc": "2.0", "id": 99999999999999999999, "method": "ping"}', {}),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": "x"}', {}),
        (b'\xef\xbb\xbf{"jsonrpc": "2.0", "id": 1, "method": "ping"}', {}),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "\\ud800"}}', {}),
        (b"", {}),
    ],
)
def test_bad_input_is_a_4xx_and_is_not_forwarded(
    leash_out: Leash, crm_out: CrmServer, tmp_path: Path, body: bytes, headers: dict[str, str]
) -> None:
    """Held: deep, huge, encoded, mislabelled and malformed messages get a 4xx from Leash, never
    a 5xx, and nothing reaches the server."""
    _, agent, task = task_of(leash_out, tmp_path)
    with agent:
        before = len(crm_out.requests())
        answer = post(leash_out, task.auth, body, headers=headers)
    assert 400 <= answer.status_code < 500, answer.text[:300]
    assert len(crm_out.requests()) == before


def test_audit_holds_arguments_only_as_a_hash_even_when_refused(
    leash_out: Leash, tmp_path: Path
) -> None:
    """Held: a call refused because an argument is unrepresentable (a null beside a secret
    string) is audited with the arguments' hash, never their values."""
    setup, agent, task = task_of(leash_out, tmp_path)
    secret = f"SECRET-{time.time_ns()}"
    with agent:
        session = open_session(leash_out, task.auth)
        call = {
            "jsonrpc": "2.0",
            "id": 4,
            "method": "tools/call",
            "params": {"name": "search_contacts", "arguments": {"query": secret, "n": None}},
        }
        answer = post(leash_out, task.auth, call, session)
    assert refused(message_of(answer)), answer.text
    events = leash_out.audit(setup.grant_id)
    assert [e for e in events if e["kind"] == "mcp.call"], events
    assert secret not in json.dumps(events)


@pytest.mark.parametrize(
    "resources",
    [["{url}/mcp/crm#frag"], ["{url}/mcp/crm", "https://evil.example/mcp"], ["{url}/mcp/crm?x=1"]],
)
def test_the_token_endpoint_refuses_odd_resource_indicators(
    leash_out: Leash, tmp_path: Path, resources: list[str]
) -> None:
    """Held: RFC 8707 `resource` with a fragment, a query, or beside a foreign one is refused
    (`invalid_target`; two `resource` parameters: `invalid_request`)."""
    from leash_agent import SigningKey
    from leash_agent._agent import GRANT_TOKEN_TYPE, JWT_BEARER, TOKEN_EXCHANGE

    setup, agent, _ = task_of(leash_out, tmp_path)
    agent.close()
    key = SigningKey.from_jwk(json.loads(setup.key_file.read_text()))
    now, token_url = int(time.time()), f"{leash_out.url}/oauth2/token"
    form: list[tuple[str, str]] = [
        ("grant_type", TOKEN_EXCHANGE),
        ("subject_token", setup.handle),
        ("subject_token_type", GRANT_TOKEN_TYPE),
        ("client_assertion_type", JWT_BEARER),
        ("client_assertion", key.client_assertion(setup.agent_id, leash_out.url, now)),
    ]
    form += [("resource", r.format(url=leash_out.url)) for r in resources]
    proof = SigningKey.generate().dpop_proof("POST", token_url, now)
    answer = httpx.post(
        token_url,
        content=urlencode(form).encode(),
        headers={"DPoP": proof, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert answer.status_code == 400, answer.text
    # A repeated parameter may be refused as such (RFC 6749 §3.1), a foreign one is a target.
    expected = {"invalid_target", "invalid_request"} if len(resources) > 1 else {"invalid_target"}
    assert answer.json()["error"] in expected
