"""The MCP test harness on its own, without Leash: each real client straight to each real server
(tests/mcp_fixtures.py), so that a failure in the MCP tests is Leash's and not the harness's."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib.util
import json
import socket
import sys
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

import httpx
import mcp.types as types
import pytest
from conftest import Leash, set_up
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from mcp.client.session import ClientSession
from mcp.shared.context import RequestContext
from mcp_fixtures import CRM, CrmServer, EverythingServer, mcp_session, start_crm, ts_client

from leash_agent import Agent

pytestmark = pytest.mark.anyio

CRM_TOOLS = {
    "search_contacts",
    "update_contact",
    "delete_contact",
    "pay",
    "long_report",
    "ask_new_email",
}


@pytest.fixture
def anyio_backend() -> str:
    # LeashAuth's async flow uses asyncio (asyncio.sleep, asyncio.to_thread).
    return "asyncio"


class Seen:
    """What an `httpx.Auth` saw of one exchange."""

    def __init__(self, request: httpx.Request, response: httpx.Response) -> None:
        self.method = request.method
        # The JSON-RPC method of a POST: the auth sees the body (requires_request_body).
        self.rpc = json.loads(request.content).get("method") if request.content else None
        self.status = response.status_code
        self.content_type = response.headers.get("content-type", "")
        # Whether the client had read the body before handing the response to the auth flow.
        self.body_read_before_auth = response.is_stream_consumed


class HeaderAuth(httpx.Auth):
    """An auth of the same shape as the SDK's `LeashAuth` (needs the request body, never asks for
    the response body): adds a header and records what each request got back."""

    requires_request_body = True

    def __init__(self, value: str) -> None:
        self.value = value
        self.seen: list[Seen] = []

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        request.headers["Authorization"] = self.value
        response = yield request
        self.seen.append(Seen(request, response))


def text_of(result: types.CallToolResult) -> str:
    return "".join(part.text for part in result.content if isinstance(part, types.TextContent))


# The Python client (`mcp`) against crm.py.


async def test_python_client_lists_and_calls_crm(crm_server: CrmServer) -> None:
    auth = HeaderAuth("Bearer harness")
    async with mcp_session(crm_server.url, auth) as session:
        tools = await session.list_tools()
        assert {tool.name for tool in tools.tools} == CRM_TOOLS

        found = await session.call_tool("search_contacts", {"query": "grace"})
        assert not found.isError
        assert found.structuredContent == {
            "result": [{"id": 2, "name": "Grace Hopper", "email": "grace@example.com"}]
        }
        updated = await session.call_tool("update_contact", {"id": 2, "email": "g@example.org"})
        assert updated.structuredContent == {
            "id": 2,
            "name": "Grace Hopper",
            "email": "g@example.org",
        }
        paid = await session.call_tool("pay", {"to": "acme", "amount": 1250})
        assert text_of(paid) == "paid 1250 to acme"
        deleted = await session.call_tool("delete_contact", {"id": 3})
        assert text_of(deleted) == "deleted contact 3"
        missing = await session.call_tool("delete_contact", {"id": 3})
        assert missing.isError
        assert "no contact 3" in text_of(missing)

    calls = crm_server.calls()
    assert [(call["tool"], call["arguments"]) for call in calls] == [
        ("search_contacts", {"query": "grace"}),
        ("update_contact", {"id": 2, "email": "g@example.org"}),
        ("pay", {"to": "acme", "amount": 1250}),
        ("delete_contact", {"id": 3}),
        ("delete_contact", {"id": 3}),
    ]
    # Each call records the headers of the HTTP request that carried it.
    assert all(call["headers"]["authorization"] == "Bearer harness" for call in calls)

    # Every HTTP request of the session went through the auth: the POSTs, the GET event stream
    # the client opens after initializing, and the DELETE that ends the session.
    requests = crm_server.requests()
    assert {request["method"] for request in requests} == {"POST", "GET", "DELETE"}
    assert all(request["headers"]["authorization"] == "Bearer harness" for request in requests)
    assert {seen.method for seen in auth.seen} >= {"POST", "DELETE"}
    # The client streams: it hands the auth flow each response unread, SSE bodies included.
    assert not any(seen.body_read_before_auth for seen in auth.seen)
    assert any(seen.content_type.startswith("text/event-stream") for seen in auth.seen)


async def test_python_client_streams_long_report(crm_server: CrmServer) -> None:
    updates: list[tuple[float, float | None, str | None]] = []
    messages: list[Any] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        updates.append((progress, total, message))

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        messages.append(params.data)

    auth = HeaderAuth("Bearer harness")
    async with mcp_session(crm_server.url, auth, logging_callback=on_log) as session:
        result = await session.call_tool(
            "long_report", {"sections": 4}, progress_callback=on_progress
        )
    assert not result.isError
    assert text_of(result).splitlines() == [f"section {n}: all quiet" for n in range(1, 5)]
    assert updates == [(n, 4, f"section {n}") for n in range(1, 5)]
    assert messages == [f"writing section {n} of 4" for n in range(1, 5)]
    # The call's answer was one event stream (4 log messages, 4 progress notifications, then the
    # result), handed to the auth unread.
    (call,) = [seen for seen in auth.seen if seen.rpc == "tools/call"]
    assert call.status == 200
    assert call.content_type.startswith("text/event-stream")
    assert not call.body_read_before_auth
    assert crm_server.tools_called() == ["long_report"]


async def test_python_client_answers_an_elicitation(crm_server: CrmServer) -> None:
    asked: list[str] = []

    async def answer(
        context: RequestContext[ClientSession, Any], params: types.ElicitRequestParams
    ) -> types.ElicitResult:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"email": "ada@new.example"})

    async with mcp_session(crm_server.url, elicitation_callback=answer) as session:
        result = await session.call_tool("ask_new_email", {"id": 1})
        found = await session.call_tool("search_contacts", {"query": "ada"})
    assert text_of(result) == "contact 1 now has ada@new.example"
    assert asked == ["New email address for contact 1?"]
    assert found.structuredContent == {
        "result": [{"id": 1, "name": "Ada Lovelace", "email": "ada@new.example"}]
    }
    # The answer went back as a JSON-RPC response in its own POST.
    answers = [
        json.loads(request["body"])
        for request in crm_server.requests()
        if request["body"] and "result" in json.loads(request["body"])
    ]
    assert [body["result"]["action"] for body in answers] == ["accept"]


async def test_recorded_calls_show_what_never_ran(crm_server: CrmServer) -> None:
    assert crm_server.calls() == []
    async with mcp_session(crm_server.url) as session:
        await session.list_tools()
        await session.call_tool("search_contacts", {"query": "a"})
    # Listing tools executes none; only the call that was made is recorded.
    assert crm_server.tools_called() == ["search_contacts"]
    assert "delete_contact" not in crm_server.tools_called()
    bodies = [json.loads(r["body"]) for r in crm_server.requests() if r["method"] == "POST"]
    assert [b.get("params", {}).get("name") for b in bodies if b.get("method") == "tools/call"] == [
        "search_contacts"
    ]


async def test_crm_connections_send_without_nagle(monkeypatch: pytest.MonkeyPatch) -> None:
    """crm.py's listener makes asyncio turn Nagle's algorithm off on each connection it accepts.
    With it on, an event-stream answer's pieces each waited for the previous one's delayed
    acknowledgement on a kept-alive connection: 40 ms a call through Leash (BENCHMARKS.md, "MCP
    call overhead"). No timing here: the option itself, read on the accepted socket, as uvicorn
    serves it (`loop.create_server(sock=...)`)."""
    spec = importlib.util.spec_from_file_location("crm_under_test", CRM)
    assert spec is not None
    assert spec.loader is not None
    crm = importlib.util.module_from_spec(spec)
    # pydantic looks the module of crm.py's models up in sys.modules.
    monkeypatch.setitem(sys.modules, spec.name, crm)
    spec.loader.exec_module(crm)
    listener = crm.listen(0)
    loop = asyncio.get_running_loop()
    nodelay: asyncio.Future[int] = loop.create_future()

    class Accepted(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            nodelay.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    server = await loop.create_server(Accepted, sock=listener)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", listener.getsockname()[1])
        assert await asyncio.wait_for(nodelay, 10) != 0
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_python_client_against_server_everything(
    everything_server: EverythingServer,
) -> None:
    async with mcp_session(everything_server.url, HeaderAuth("Bearer harness")) as session:
        tools = {tool.name for tool in (await session.list_tools()).tools}
        assert {"echo", "get-sum", "trigger-long-running-operation"} <= tools
        echoed = await session.call_tool("echo", {"message": "hello"})
        assert text_of(echoed) == "Echo: hello"
        steps: list[float] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            steps.append(progress)

        long = await session.call_tool(
            "trigger-long-running-operation",
            {"duration": 0.3, "steps": 3},
            progress_callback=on_progress,
        )
        assert "Steps: 3" in text_of(long)
        assert steps == [1, 2, 3]


# The TypeScript client (client.mjs) against crm.py and server-everything.


def test_ts_client_lists_and_calls_crm(crm_server: CrmServer) -> None:
    lines = ts_client(
        crm_server.url,
        "list",
        "call",
        "search_contacts",
        '{"query": "alan"}',
        "call",
        "long_report",
        '{"sections": 3}',
        "call",
        "pay",
        '{"to": "acme", "amount": 5}',
        "call",
        "no_such_tool",
        "{}",
    )
    assert [line["step"] for line in lines] == ["list", "call", "call", "call", "call"]
    assert {tool["name"] for tool in lines[0]["result"]["tools"]} == CRM_TOOLS
    assert lines[1]["result"]["structuredContent"] == {
        "result": [{"id": 3, "name": "Alan Turing", "email": "alan@example.com"}]
    }
    report = lines[2]
    assert report["result"]["content"][0]["text"].count("all quiet") == 3
    assert [update["progress"] for update in report["progress"]] == [1, 2, 3]
    assert [message["data"] for message in report["messages"]] == [
        f"writing section {n} of 3" for n in (1, 2, 3)
    ]
    assert lines[3]["result"]["content"][0]["text"] == "paid 5 to acme"
    assert lines[4]["result"]["isError"] is True
    assert crm_server.tools_called() == ["search_contacts", "long_report", "pay"]
    # Without a token the client sends no auth.
    assert not any("authorization" in r["headers"] for r in crm_server.requests())


def test_ts_client_answers_an_elicitation(crm_server: CrmServer) -> None:
    lines = ts_client(
        crm_server.url,
        "call",
        "ask_new_email",
        '{"id": 2}',
        elicit={"action": "accept", "content": {"email": "grace@new.example"}},
    )
    assert lines[0]["elicitation"]["message"] == "New email address for contact 2?"
    assert lines[1]["result"]["content"][0]["text"] == "contact 2 now has grace@new.example"
    declined = ts_client(crm_server.url, "call", "ask_new_email", '{"id": 1}')
    assert declined[1]["result"]["content"][0]["text"] == "no change (decline)"


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def private_jwk(key: Ed25519PrivateKey) -> dict[str, str]:
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    private = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return {"kty": "OKP", "crv": "Ed25519", "x": b64url(public), "d": b64url(private)}


def test_ts_client_signs_every_request_with_dpop() -> None:
    """client.mjs with a token and a DPoP key, against crm.py demanding a DPoP nonce (as
    RFC 9449 §8 lets a resource server): every request carries `Authorization: DPoP <token>` and
    a valid proof; the first, refused for want of the nonce, is retried once with it."""
    key = Ed25519PrivateKey.generate()
    jwk = private_jwk(key)
    token = "harness-token." + b64url(b"x" * 24)
    started = time.time()
    with start_crm(require_dpop_nonce="nonce-1") as crm:
        lines = ts_client(
            crm.url,
            "list",
            "call",
            "update_contact",
            '{"id": 1, "email": "a@b.example"}',
            token=token,
            dpop_jwk=jwk,
        )
        assert [line["step"] for line in lines] == ["list", "call"]
        assert lines[1]["result"]["isError"] is False
        requests = crm.requests()
        # The retried POST ran the tool once.
        assert crm.tools_called() == ["update_contact"]

    ath = b64url(hashlib.sha256(token.encode()).digest())
    public_key = Ed25519PublicKey.from_public_bytes(b64url_decode(jwk["x"]))
    jtis = set()
    nonces = []
    for request in requests:
        assert request["headers"]["authorization"] == f"DPoP {token}"
        header_b64, claims_b64, signature = request["headers"]["dpop"].split(".")
        public_key.verify(b64url_decode(signature), f"{header_b64}.{claims_b64}".encode())
        header = json.loads(b64url_decode(header_b64))
        assert header == {
            "typ": "dpop+jwt",
            "alg": "EdDSA",
            "jwk": {"kty": "OKP", "crv": "Ed25519", "x": jwk["x"]},
        }
        claims = json.loads(b64url_decode(claims_b64))
        assert claims["htm"] == request["method"]
        assert claims["htu"] == crm.url
        assert claims["ath"] == ath
        assert started - 5 <= claims["iat"] <= time.time() + 5
        jtis.add(claims["jti"])
        nonces.append(claims.get("nonce"))
    assert len(jtis) == len(requests)
    # The first request had no nonce and was answered 401 use_dpop_nonce; every later one
    # (the retry included) carries it.
    assert nonces[0] is None
    assert nonces[1:] == ["nonce-1"] * (len(requests) - 1)
    assert requests[0]["body"] == requests[1]["body"]
    assert json.loads(requests[0]["body"])["method"] == "initialize"


def test_ts_client_against_server_everything(everything_server: EverythingServer) -> None:
    lines = ts_client(
        everything_server.url,
        "list",
        "call",
        "echo",
        '{"message": "hi"}',
        "call",
        "get-sum",
        '{"a": 2, "b": 3}',
        "call",
        "trigger-long-running-operation",
        '{"duration": 0.3, "steps": 3}',
    )
    assert [line["step"] for line in lines] == ["list", "call", "call", "call"]
    assert {"echo", "get-sum"} <= {tool["name"] for tool in lines[0]["result"]["tools"]}
    assert lines[1]["result"]["content"][0]["text"] == "Echo: hi"
    assert lines[2]["result"]["content"][0]["text"] == "The sum of 2 and 3 is 5."
    assert [update["progress"] for update in lines[3]["progress"]] == [1, 2, 3]


# The SDK's `task.auth` with the Python client, through today's gateway (`/gw`, not yet the MCP
# endpoint): the way the client drives httpx suits the auth (nonce retry, streamed answers).


async def test_task_auth_with_the_python_client_through_the_gateway(
    make_leash: Callable[[str], Leash], tmp_path: Path
) -> None:
    with start_crm() as crm:
        routes = "".join(
            f'[[upstream.route]]\nmethod = "{method}"\npath = "/mcp"\naction = "crm:rpc"\n'
            for method in ("POST", "GET", "DELETE")
        )
        upstream = f'[[upstream]]\nname = "crm"\nurl = "{crm.base}"\n{routes}'
        leash = make_leash(f"dpop_nonce = true\n{upstream}")
        setup = set_up(
            leash, tmp_path, upstreams=["crm"], actions=["crm:rpc"], approval_required=[]
        )
        arrivals: list[float] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            arrivals.append(time.monotonic())

        with Agent.from_jwk_file(leash.url, setup.agent_id, setup.key_file) as agent:
            task = agent.task(setup.handle, ["crm:rpc"])
            async with mcp_session(task.url("crm", "/mcp"), task.auth) as session:
                tools = await session.list_tools()
                assert {tool.name for tool in tools.tools} == CRM_TOOLS
                report = await session.call_tool(
                    "long_report", {"sections": 5}, progress_callback=on_progress
                )
        assert not report.isError
        # The progress came as it was sent (50 ms apart), not all at once at the end: neither
        # the gateway nor the auth read the event stream before handing it on.
        assert len(arrivals) == 5
        assert arrivals[-1] - arrivals[0] >= 0.1
        assert crm.tools_called() == ["long_report"]
        requests = crm.requests()
        assert {request["method"] for request in requests} == {"POST", "GET", "DELETE"}
        # The agent's token and proofs stopped at Leash.
        assert not any(
            "authorization" in request["headers"] or "dpop" in request["headers"]
            for request in requests
        )
