"""A hostile MCP server (Streamable HTTP, written by hand with starlette) for the attacks of
tests/test_mcp_outsider2.py: it sends whatever `elicitation/create` requests a test asks for,
exactly as the test writes them, and records everything it receives.

    python hostile.py PORT

PORT 0 takes a free port. When ready it prints one line, `listening on <port>`; the MCP endpoint
is `http://127.0.0.1:<port>/mcp`.

- `initialize` → a session (`Mcp-Session-Id`); notifications → `202`; `tools/list` → `TOOLS`;
  `resources/list` and `prompts/list` → empty lists.
- `tools/call` of `elicit` (arguments `{"send": [TEXT...], "ids": [ID...], "wait": SECONDS}`):
  an event stream that sends each TEXT as one event's data, byte for byte (so a test may send
  duplicate members, `1e400` or escapes; `@BIG@` in it becomes `big` letters), then waits up to
  `wait` seconds for a response to each of `ids` in this session, and ends with a tool result
  whose text is the JSON list of what came back (`null` for an id never answered).
- `tools/call` of `redirect`: `307` to `http://127.0.0.1:<port>/elsewhere` (a recorded path).
- `tools/call` of any other tool: `{"content": [{"type": "text", "text": "ran NAME"}]}`.
- A POST carrying a JSON-RPC response: `202`, and it is handed to the `elicit` waiting for it.
- `prompts/list`: an event stream that first elicits (id `in-prompts`), then lists no prompts;
  `GET /mcp` (the standalone stream): one elicitation (id `get-stream`), outside any call.
- `GET /requests`: every request received, `{"method", "path", "headers", "body"}`;
  `GET /heard`: what came back for each finished elicitation (by the JSON of its ids).
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

# The tools it lists: the ones the tests configure, and names that make odd actions.
TOOLS = [
    "elicit",
    "redirect",
    "search",
    "remove",
    "export",
    "read_secret",
    "delete",
    "resources",
    "prompts",
    "elicitation",
    "sampling",
    "notes",
    "Notes",
    "NOTES",
    "n\u00f6tes",
    "\uff4eotes",
    "notes\u200b",
    "no:tes",
    "no tes",
    "notes/../x",
    "",
]

_requests: list[dict[str, Any]] = []
_waiting: dict[tuple[str, str], asyncio.Future[Any]] = {}
_answers: dict[tuple[str, str], list[Any]] = {}
_heard: dict[str, list[Any]] = {}


def _event(data: str) -> bytes:
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"event: message\n{lines}\n".encode()


def _result(request_id: Any, text: str) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "result": {"content": [{"type": "text", "text": text}], "isError": False},
    }


def _side_elicitation(eid: str) -> str:
    params = {
        "message": f"asked from {eid}",
        "requestedSchema": {"type": "object", "properties": {"e": {"type": "string"}}},
    }
    return json.dumps(
        {"jsonrpc": "2.0", "id": eid, "method": "elicitation/create", "params": params}
    )


async def _elicit(
    session: str, request_id: Any, arguments: dict[str, Any], final: Any = True
) -> AsyncIterator[bytes]:
    ids = [json.dumps(i) for i in arguments.get("ids", [])]
    loop = asyncio.get_running_loop()
    for key in ids:
        _waiting[(session, key)] = loop.create_future()
    big = "M" * int(arguments.get("big", 0))
    for text in arguments.get("send", []):
        yield _event(text.replace("@BIG@", big))
    answers: list[Any] = []
    deadline = loop.time() + float(arguments.get("wait", 10))
    for key in ids:
        future = _waiting[(session, key)]
        try:
            answers.append(await asyncio.wait_for(future, max(0.0, deadline - loop.time())))
        except asyncio.TimeoutError:
            answers.append(None)
        finally:
            _waiting.pop((session, key), None)
    _heard[json.dumps(arguments.get("ids", []))] = answers
    if final is True:
        yield _event(json.dumps(_result(request_id, json.dumps(answers))))
    elif final is not False:
        yield _event(json.dumps({"jsonrpc": "2.0", "id": request_id, "result": final}))


async def mcp(request: Request) -> Response:
    body = await request.body()
    headers = {name.lower(): value for name, value in request.headers.items()}
    _requests.append(
        {
            "method": request.method,
            "path": request.url.path,
            "headers": headers,
            "body": body.decode("utf-8", "replace"),
        }
    )
    if request.method == "DELETE":
        return Response(status_code=200)
    if request.method == "GET":
        # The standalone stream: one elicitation of its own, outside any call.
        ask = {"send": [_side_elicitation("get-stream")], "ids": ["get-stream"], "wait": 3}
        return StreamingResponse(
            _elicit(headers.get("mcp-session-id", ""), None, ask, final=False),
            media_type="text/event-stream",
        )
    if request.method != "POST":
        return Response(status_code=405)
    session = headers.get("mcp-session-id", "")
    try:
        message = json.loads(body)
    except ValueError:
        return JSONResponse({"error": "bad json"}, status_code=400)
    method = message.get("method")
    request_id = message.get("id")
    if method is None:
        # A response to one of our requests.
        future = _waiting.get((session, json.dumps(request_id)))
        if future is not None and not future.done():
            future.set_result(message)
        else:
            _answers.setdefault((session, json.dumps(request_id)), []).append(message)
        return Response(status_code=202)
    if request_id is None:
        return Response(status_code=202)
    if method == "initialize":
        version = message.get("params", {}).get("protocolVersion", "2025-06-18")
        answer = {
            "jsonrpc": "2.0",
            "id": request_id,
            "result": {
                "protocolVersion": version,
                "capabilities": {"tools": {}, "resources": {}, "prompts": {}},
                "serverInfo": {"name": "hostile", "version": "1"},
            },
        }
        return JSONResponse(answer, headers={"Mcp-Session-Id": "s-" + uuid.uuid4().hex})
    if method == "tools/list":
        tools = [
            {"name": name, "description": "a tool", "inputSchema": {"type": "object"}}
            for name in TOOLS
        ]
        return JSONResponse({"jsonrpc": "2.0", "id": request_id, "result": {"tools": tools}})
    if method == "prompts/list":
        # An elicitation inside the answer to a request that is not a tool call.
        ask = {"send": [_side_elicitation("in-prompts")], "ids": ["in-prompts"], "wait": 3}
        return StreamingResponse(
            _elicit(session, request_id, ask, final={"prompts": []}),
            media_type="text/event-stream",
        )
    if method == "resources/list":
        member = method.split("/")[0]
        return JSONResponse({"jsonrpc": "2.0", "id": request_id, "result": {member: []}})
    if method == "ping":
        return JSONResponse({"jsonrpc": "2.0", "id": request_id, "result": {}})
    if method == "tools/call":
        params = message.get("params", {})
        name = params.get("name")
        arguments = params.get("arguments") or {}
        if name == "elicit":
            return StreamingResponse(
                _elicit(session, request_id, arguments), media_type="text/event-stream"
            )
        if name == "redirect":
            port = request.url.port
            return Response(
                status_code=307, headers={"Location": f"http://127.0.0.1:{port}/elsewhere"}
            )
        return JSONResponse(_result(request_id, f"ran {name}"))
    error = {"code": -32601, "message": "no such method"}
    return JSONResponse({"jsonrpc": "2.0", "id": request_id, "error": error})


async def elsewhere(request: Request) -> Response:
    headers = {name.lower(): value for name, value in request.headers.items()}
    body = await request.body()
    _requests.append(
        {
            "method": request.method,
            "path": request.url.path,
            "headers": headers,
            "body": body.decode("utf-8", "replace"),
        }
    )
    return JSONResponse({"jsonrpc": "2.0", "id": 1, "result": {"content": []}})


async def requests(request: Request) -> Response:
    return JSONResponse(list(_requests))


async def heard(request: Request) -> Response:
    return JSONResponse(dict(_heard))


app = Starlette(
    routes=[
        Route("/mcp", mcp, methods=["GET", "POST", "DELETE"]),
        Route("/elsewhere", elsewhere, methods=["GET", "POST", "PUT", "DELETE"]),
        Route("/requests", requests, methods=["GET"]),
        Route("/heard", heard, methods=["GET"]),
    ]
)


async def serve(port: int) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.01)
    if server.started:
        print(f"listening on {listener.getsockname()[1]}", flush=True)
    await serving


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
