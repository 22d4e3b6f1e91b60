"""A small CRM as a real MCP server (the official `mcp` package's FastMCP), Streamable HTTP on
loopback, for Leash's MCP tests.

    python crm.py PORT [--require-dpop-nonce NONCE]

PORT 0 takes a free port. When ready it prints one line, `listening on <port>`; the MCP endpoint
is `http://127.0.0.1:<port>/mcp`. Every tool it executes is recorded, and so is every HTTP request
it receives, for a test to read:

- `GET /calls`: the tool calls executed, in order: `{"tool", "arguments", "headers"}` (the
  headers of the HTTP request that carried the call, names in lower case);
- `GET /requests`: every HTTP request to `/mcp`: `{"method", "path", "headers", "body"}` (the
  body as text, exactly the bytes received).

With `--require-dpop-nonce`, a request to `/mcp` that carries a `DPoP` header whose proof lacks
that nonce is answered `401` with `DPoP-Nonce` and `WWW-Authenticate: DPoP
error="use_dpop_nonce"` (as RFC 9449 §8 has a resource server do), and is still recorded; it lets
a client's nonce retry be tested without an authorization server. Nothing else checks auth.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import socket
import threading
from typing import Any

import uvicorn
from mcp.server.fastmcp import Context, FastMCP
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTACTS: dict[int, dict[str, Any]] = {
    1: {"id": 1, "name": "Ada Lovelace", "email": "ada@example.com"},
    2: {"id": 2, "name": "Grace Hopper", "email": "grace@example.com"},
    3: {"id": 3, "name": "Alan Turing", "email": "alan@example.com"},
}

_lock = threading.Lock()
_calls: list[dict[str, Any]] = []
_requests: list[dict[str, Any]] = []

# The Host and Origin a gateway sends are its own business: the server checks neither (FastMCP
# would otherwise only accept a Host of 127.0.0.1/localhost).
mcp = FastMCP(
    "crm",
    streamable_http_path="/mcp",
    log_level="WARNING",
    transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
)


def _record(ctx: Context[Any, Any, Any], tool: str, arguments: dict[str, Any]) -> None:
    request = ctx.request_context.request
    headers = (
        {name.lower(): value for name, value in request.headers.items()}
        if isinstance(request, Request)
        else {}
    )
    with _lock:
        _calls.append({"tool": tool, "arguments": arguments, "headers": headers})


@mcp.tool(annotations=ToolAnnotations(readOnlyHint=True))
def search_contacts(query: str, ctx: Context[Any, Any, Any]) -> list[dict[str, Any]]:
    """Contacts whose name or email contains `query` (case-insensitive)."""
    _record(ctx, "search_contacts", {"query": query})
    needle = query.lower()
    with _lock:
        return [
            dict(contact)
            for contact in CONTACTS.values()
            if needle in contact["name"].lower() or needle in contact["email"].lower()
        ]


@mcp.tool()
def update_contact(id: int, email: str, ctx: Context[Any, Any, Any]) -> dict[str, Any]:
    """Sets a contact's email address."""
    _record(ctx, "update_contact", {"id": id, "email": email})
    with _lock:
        if id not in CONTACTS:
            raise ValueError(f"no contact {id}")
        CONTACTS[id]["email"] = email
        return dict(CONTACTS[id])


@mcp.tool(annotations=ToolAnnotations(destructiveHint=True))
def delete_contact(id: int, ctx: Context[Any, Any, Any]) -> str:
    """Deletes a contact for good."""
    _record(ctx, "delete_contact", {"id": id})
    with _lock:
        if CONTACTS.pop(id, None) is None:
            raise ValueError(f"no contact {id}")
    return f"deleted contact {id}"


@mcp.tool()
def pay(to: str, amount: int, ctx: Context[Any, Any, Any]) -> str:
    """Pays `amount` (in cents) to `to`."""
    _record(ctx, "pay", {"to": to, "amount": amount})
    return f"paid {amount} to {to}"


@mcp.tool()
async def long_report(sections: int, ctx: Context[Any, Any, Any]) -> str:
    """Writes a report of `sections` sections, sending a log message and a progress notification
    for each before the result (so its response is an event stream of several events)."""
    _record(ctx, "long_report", {"sections": sections})
    lines = []
    for number in range(1, sections + 1):
        await ctx.info(f"writing section {number} of {sections}")
        await ctx.report_progress(number, sections, f"section {number}")
        lines.append(f"section {number}: all quiet")
        await asyncio.sleep(0.05)
    return "\n".join(lines)


class NewEmail(BaseModel):
    email: str = Field(description="The contact's new email address")


@mcp.tool()
async def ask_new_email(id: int, ctx: Context[Any, Any, Any]) -> str:
    """Asks the user (MCP elicitation, `elicitation/create`) for a contact's new email address,
    and sets it if they give one."""
    _record(ctx, "ask_new_email", {"id": id})
    answer = await ctx.elicit(f"New email address for contact {id}?", NewEmail)
    if answer.action != "accept":
        return f"no change ({answer.action})"
    with _lock:
        if id not in CONTACTS:
            raise ValueError(f"no contact {id}")
        CONTACTS[id]["email"] = answer.data.email
    return f"contact {id} now has {answer.data.email}"


def _proof_nonce(proof: str) -> Any:
    try:
        claims = proof.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4))).get("nonce")
    except (IndexError, ValueError, AttributeError):
        return None


class Recorder:
    """Answers `GET /calls` and `GET /requests`; records each request to the MCP endpoint (whole
    body) before the MCP app sees it, and demands a DPoP nonce if told to."""

    def __init__(self, app: ASGIApp, nonce: str | None) -> None:
        self.app = app
        self.nonce = nonce

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        records = {"/calls": _calls, "/requests": _requests}
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] in records:
            with _lock:
                response: Response = JSONResponse(list(records[scope["path"]]))
            await response(scope, receive, send)
            return
        if scope["type"] != "http" or not scope["path"].startswith("/mcp"):
            await self.app(scope, receive, send)
            return
        body = b""
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in scope["headers"]
        }
        with _lock:
            _requests.append(
                {
                    "method": scope["method"],
                    "path": scope["path"],
                    "headers": headers,
                    "body": body.decode("utf-8", "replace"),
                }
            )
        proof = headers.get("dpop")
        if self.nonce is not None and proof is not None and _proof_nonce(proof) != self.nonce:
            response = JSONResponse(
                {"error": "use_dpop_nonce"},
                status_code=401,
                headers={
                    "DPoP-Nonce": self.nonce,
                    "WWW-Authenticate": 'DPoP error="use_dpop_nonce"',
                },
            )
            await response(scope, receive, send)
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def listen(port: int) -> socket.socket:
    """The listening socket on 127.0.0.1:`port`, made with its protocol named (`IPPROTO_TCP`).

    asyncio turns Nagle's algorithm off (`TCP_NODELAY`) only on an accepted socket whose `proto`
    is `IPPROTO_TCP` (`asyncio.base_events._set_nodelay`), and an accepted socket takes its
    listener's `proto`: a listener made as `socket.socket(AF_INET, SOCK_STREAM)` has 0, so every
    connection kept Nagle on. uvicorn writes an event-stream answer in pieces (head, event,
    closing chunk); with Nagle on, a piece waits until the previous one is acknowledged, and a
    kept-alive client (Leash's pooled upstream connection, a plain httpx client) delays its
    acknowledgement by 40 ms: each call took 40 ms more than its work (BENCHMARKS.md, "MCP call
    overhead"). uvicorn binding a host and port itself gets `proto` from getaddrinfo and is not
    affected; its `--workers` path was (uvicorn issue #3149)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    return listener


async def serve(port: int, nonce: str | None) -> None:
    listener = listen(port)
    app = Recorder(mcp.streamable_http_app(), nonce)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.01)
    if server.started:
        print(f"listening on {listener.getsockname()[1]}", flush=True)
    await serving


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("port", type=int, help="the port on 127.0.0.1 (0: any free one)")
    parser.add_argument("--require-dpop-nonce", metavar="NONCE")
    arguments = parser.parse_args()
    asyncio.run(serve(arguments.port, arguments.require_dpop_nonce))


if __name__ == "__main__":
    main()
