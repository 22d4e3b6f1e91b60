"""An upstream's API (a protected resource, RFC 6750) for the OAuth connection tests: it checks
each request's `Authorization: Bearer <token>` by introspecting the token (RFC 7662) at the test
IdP (tests/idp_fixtures.py), as the IdP's client `RESOURCE_SERVER_CLIENT_ID`, which may
introspect every client's tokens.

- `ResourceServer(idp, required_scope=None)`: a threaded HTTP server on 127.0.0.1 (HTTP/1.1,
  keep-alive, any method); `url` is its base. An active token gets `200` with the JSON
  `{"sub", "client_id", "scope", "method", "path"}`; a missing, malformed, unknown, expired or
  revoked one gets `401` `{"error": "invalid_token"}` with `WWW-Authenticate: Bearer
  error="invalid_token"`; an active token without `required_scope` gets `403`
  `{"error": "insufficient_scope"}`; when the IdP cannot be asked, `502`
  `{"error": "introspection_failed"}`.
- `ResourceServer.requests()`: every request, in order of arrival, as `ApiRequest` (method, path,
  status, the SHA-256 hex of the bearer token, never the token, and the other headers);
- `make_resource_server` (fixture, a factory): `make_resource_server(idp, required_scope=None)`,
  stopped when the test ends."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from idp_fixtures import RESOURCE_SERVER_CLIENT_ID, Idp


def token_hash(token: str) -> str:
    """What `ApiRequest.token_sha256` holds for `token`."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class ApiRequest:
    """A request the resource server answered. `token_sha256` is the SHA-256 hex of the bearer
    token (None without an `Authorization: Bearer` header); `headers` are the request's other
    headers (names in lower case, repeated ones joined with ", "), without `Authorization`."""

    method: str
    path: str
    status: int
    token_sha256: str | None
    headers: dict[str, str]
    body: bytes


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Room for many clients connecting at once (the default backlog is 5).
    request_queue_size = 128


class ResourceServer:
    """The upstream's API, running until `stop`. Thread-safe."""

    def __init__(self, idp: Idp, required_scope: str | None = None) -> None:
        self.introspection_endpoint = idp.introspection_endpoint
        self.auth = (RESOURCE_SERVER_CLIENT_ID, idp.resource_server_secret)
        self.required_scope = required_scope
        self.http = httpx.Client(timeout=10)
        self.lock = threading.Lock()
        self.recorded: list[ApiRequest] = []
        self.server = _Server(("127.0.0.1", 0), self.handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def requests(self) -> list[ApiRequest]:
        """The requests so far, in order of arrival."""
        with self.lock:
            return list(self.recorded)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.http.close()

    def introspect(self, token: str) -> dict[str, Any] | None:
        """The IdP's introspection of `token`, or None when the IdP did not answer it."""
        try:
            response = self.http.post(
                self.introspection_endpoint, data={"token": token}, auth=self.auth
            )
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        answer: dict[str, Any] = response.json()
        return answer

    def decide(self, method: str, path: str, token: str | None) -> tuple[int, dict[str, Any]]:
        """The status and JSON body for a request with bearer `token`."""
        if not token:
            return 401, {"error": "invalid_token"}
        introspection = self.introspect(token)
        if introspection is None:
            return 502, {"error": "introspection_failed"}
        if introspection.get("active") is not True:
            return 401, {"error": "invalid_token"}
        scope = introspection.get("scope") or ""
        if self.required_scope is not None and self.required_scope not in scope.split():
            return 403, {"error": "insufficient_scope"}
        return 200, {
            "sub": introspection.get("sub"),
            "client_id": introspection.get("client_id"),
            "scope": scope,
            "method": method,
            "path": path,
        }

    def handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:
                pass

            def read_body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    body = b""
                    while True:
                        size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return body
                        body += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def handle_any(self) -> None:
                body = self.read_body()
                token: str | None = None
                headers: dict[str, str] = {}
                for name, value in self.headers.items():
                    lower = name.lower()
                    if lower == "authorization":
                        scheme, _, credentials = value.partition(" ")
                        if scheme.lower() == "bearer" and token is None:
                            token = credentials.strip() or None
                        continue
                    headers[lower] = f"{headers[lower]}, {value}" if lower in headers else value
                status, answer = api.decide(self.command, self.path, token)
                with api.lock:
                    api.recorded.append(
                        ApiRequest(
                            self.command,
                            self.path,
                            status,
                            token_hash(token) if token is not None else None,
                            headers,
                            body,
                        )
                    )
                payload = json.dumps(answer).encode()
                self.send_response(status)
                if status == 401:
                    self.send_header("WWW-Authenticate", 'Bearer error="invalid_token"')
                elif status == 403:
                    self.send_header(
                        "WWW-Authenticate",
                        f'Bearer error="insufficient_scope", scope="{api.required_scope}"',
                    )
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = handle_any

        return Handler


MakeResourceServer = Callable[..., ResourceServer]


@pytest.fixture
def make_resource_server() -> Iterator[MakeResourceServer]:
    """`make_resource_server(idp, required_scope=None) -> ResourceServer`: the upstream's API for
    tokens of `idp`, stopped when the test ends."""
    servers: list[ResourceServer] = []

    def make(idp: Idp, required_scope: str | None = None) -> ResourceServer:
        server = ResourceServer(idp, required_scope)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
