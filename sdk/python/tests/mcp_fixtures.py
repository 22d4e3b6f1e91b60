"""Real MCP servers and clients for the MCP tests, all on loopback:

- `crm_server` (fixture) / `start_crm()`: tests/mcp_servers/crm.py, a FastMCP server that
  records what it executes (`CrmServer.calls()`) and every HTTP request it receives
  (`CrmServer.requests()`);
- `everything_server` (fixture) / `start_everything()`: npm
  `@modelcontextprotocol/server-everything`,
  unmodified, over Streamable HTTP;
- `mcp_session(url, auth)`: the official Python `mcp` client over an `httpx.AsyncClient` with
  that `httpx.Auth` (e.g. `task.auth`);
- `ts_client(url, *steps, ...)`: tests/mcp_node/client.mjs, the official TypeScript client, with
  DPoP when given a token and a key.

Node.js is required, not optional: without `node` the Node fixtures fail."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import ClientSession
from mcp.client.session import ElicitationFnT, LoggingFnT
from mcp.client.streamable_http import streamable_http_client

TESTS = Path(__file__).resolve().parent
CRM = TESTS / "mcp_servers" / "crm.py"
NODE_DIR = TESTS / "mcp_node"
EVERYTHING = (
    NODE_DIR / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"
)
LISTENING = re.compile(r"listening on (\d+)")


class Process:
    """A child process whose output (stdout and stderr together) is read as it comes, until it
    prints `listening on <port>`."""

    def __init__(
        self, argv: list[str], env: Mapping[str, str], what: str, cwd: Path | None = None
    ) -> None:
        self.output: list[str] = []
        self.process = subprocess.Popen(
            argv,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        ports: queue.Queue[int] = queue.Queue()

        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.output.append(line)
                match = LISTENING.fullmatch(line.strip())
                if match:
                    ports.put(int(match.group(1)))

        threading.Thread(target=read, daemon=True).start()
        try:
            self.port = ports.get(timeout=30)
        except queue.Empty:
            self.stop()
            raise RuntimeError(f"{what} did not start:\n" + "".join(self.output)) from None

    def stop(self) -> None:
        stop(self.process)


def stop(process: subprocess.Popen[str]) -> None:
    """Ends a test server: politely, then for good after 5 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class CrmServer:
    """crm.py running: `url` is its MCP endpoint (`http://127.0.0.1:<port>/mcp`)."""

    process: Process
    base: str
    url: str
    http: httpx.Client = field(repr=False)

    def calls(self) -> list[dict[str, Any]]:
        """The tool calls it executed, in order: `{"tool", "arguments", "headers"}`."""
        response = self.http.get(f"{self.base}/calls")
        response.raise_for_status()
        calls: list[dict[str, Any]] = response.json()
        return calls

    def tools_called(self) -> list[str]:
        return [call["tool"] for call in self.calls()]

    def requests(self) -> list[dict[str, Any]]:
        """Every HTTP request to its MCP endpoint: `{"method", "path", "headers", "body"}`."""
        response = self.http.get(f"{self.base}/requests")
        response.raise_for_status()
        requests: list[dict[str, Any]] = response.json()
        return requests


@contextmanager
def start_crm(require_dpop_nonce: str | None = None) -> Iterator[CrmServer]:
    """Runs crm.py on a free port until the block ends (`--require-dpop-nonce` if given)."""
    argv = [sys.executable, str(CRM), "0"]
    if require_dpop_nonce is not None:
        argv += ["--require-dpop-nonce", require_dpop_nonce]
    process = Process(argv, os.environ, "crm.py")
    base = f"http://127.0.0.1:{process.port}"
    http = httpx.Client(timeout=10)
    try:
        yield CrmServer(process, base, f"{base}/mcp", http)
    finally:
        http.close()
        process.stop()


@pytest.fixture
def crm_server() -> Iterator[CrmServer]:
    """A fresh crm.py for the test (its contacts and records start anew)."""
    with start_crm() as server:
        yield server


def node() -> str:
    """The `node` executable, with the harness's packages installed (install.sh). Fails, never
    skips, where there is none."""
    path = shutil.which("node")
    if path is None:
        pytest.fail("node is required for the MCP tests (Node.js 18.18 or later, with npm)")
    subprocess.run(["bash", str(NODE_DIR / "install.sh")], check=True)
    return path


@dataclass
class EverythingServer:
    """server-everything running: `url` is its MCP endpoint (`http://127.0.0.1:<port>/mcp`)."""

    process: Process
    url: str


@contextmanager
def start_everything() -> Iterator[EverythingServer]:
    """Runs `@modelcontextprotocol/server-everything` unmodified: its `streamableHttp` argument
    selects the transport, `PORT` the port (0: a free one), endpoint `/mcp`. The preload
    loopback.mjs only makes its listen bind 127.0.0.1 (it would take every interface) and prints
    the port taken. Its environment is minimal, since its `get-env` tool returns it whole."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PORT": "0", "NODE_ENV": "test"}
    argv = [node(), "--import", "./loopback.mjs", str(EVERYTHING), "streamableHttp"]
    process = Process(argv, env, "server-everything", cwd=NODE_DIR)
    try:
        yield EverythingServer(process, f"http://127.0.0.1:{process.port}/mcp")
    finally:
        process.stop()


@pytest.fixture(scope="session")
def everything_server() -> Iterator[EverythingServer]:
    with start_everything() as server:
        yield server


@asynccontextmanager
async def mcp_session(
    url: str,
    auth: httpx.Auth | None = None,
    *,
    elicitation_callback: ElicitationFnT | None = None,
    logging_callback: LoggingFnT | None = None,
) -> AsyncIterator[ClientSession]:
    """An initialized session of the official Python `mcp` client with the MCP server at `url`,
    every HTTP request of which (POSTs, the GET event stream, the closing DELETE) goes through
    `auth`. Use it as `async with mcp_session(url, task.auth) as session:`, then
    `session.list_tools()`, `session.call_tool(name, arguments)`."""
    # The timeouts of the client the SDK would make itself (30 s, and 300 s to read an event
    # stream), with the auth; `streamable_http_client` sends every request through it with
    # `stream=True` and `follow_redirects=False`.
    async with (
        httpx.AsyncClient(auth=auth, timeout=httpx.Timeout(30, read=300)) as http,
        streamable_http_client(url, http_client=http) as (read, write, _),
        ClientSession(
            read,
            write,
            elicitation_callback=elicitation_callback,
            logging_callback=logging_callback,
        ) as session,
    ):
        await session.initialize()
        yield session


def ts_client(
    url: str,
    *steps: str,
    token: str | None = None,
    dpop_jwk: Mapping[str, str] | None = None,
    elicit: Mapping[str, Any] | None = None,
    timeout: float = 120,
) -> list[dict[str, Any]]:
    """Runs tests/mcp_node/client.mjs against `url` with `steps` (`"list"`, or `"call", NAME,
    JSON`) and returns the JSON lines it printed. With `token` and `dpop_jwk` (a private Ed25519
    JWK) every request is DPoP-signed; `elicit` is its answer to an elicitation."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if token is not None and dpop_jwk is not None:
        env["MCP_ACCESS_TOKEN"] = token
        env["MCP_DPOP_JWK"] = json.dumps(dict(dpop_jwk))
    if elicit is not None:
        env["MCP_ELICIT"] = json.dumps(elicit)
    done = subprocess.run(
        [node(), "client.mjs", url, *steps],
        cwd=NODE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0:
        raise AssertionError(f"client.mjs exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return lines
