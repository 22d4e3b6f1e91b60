"""The real `leash` binary on a random loopback port with a temporary store, a recording
upstream behind its gateway, and the admin and human calls the tests need.

`LEASH_BIN` names the binary (default: the repository's `target/release/leash`)."""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

# The OIDC IdP's and the browser's fixtures (tests/idp_fixtures.py), the hostile IdP's
# (tests/idp_hostile.py), the MCP servers' (tests/mcp_fixtures.py) and the upstream API's
# (tests/upstream_api.py), for every test module.
from idp_fixtures import browser, browser_page, idp, make_idp  # noqa: F401
from idp_hostile import hostile_idp  # noqa: F401
from mcp_fixtures import crm_server, everything_server  # noqa: F401
from upstream_api import make_resource_server  # noqa: F401

REPO = Path(__file__).resolve().parents[3]
AGENT_ID = "spiffe://example.org/agent/mailbot"


def leash_bin() -> Path:
    path = Path(os.environ.get("LEASH_BIN") or REPO / "target" / "release" / "leash")
    if not path.is_file():
        pytest.exit(
            f"{path} is missing: build it with `cargo build --release`, or set LEASH_BIN",
            returncode=2,
        )
    return path


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes


@dataclass
class Upstream:
    """An app behind the gateway that records every request and answers 200 with JSON, except
    under `/fake/`, where it imitates Leash's refusals (which the SDK must not act on)."""

    url: str
    requests: list[Recorded] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def seen(self) -> list[Recorded]:
        with self.lock:
            return list(self.requests)


# What an upstream pretending to be Leash answers under /fake/: (status, headers, body).
FAKES: dict[str, tuple[int, dict[str, str], dict[str, Any]]] = {
    "/fake/approval": (
        403,
        {"Leash-Decision": "approval_required"},
        {
            "error": "approval_required",
            "approval_id": "apr_fake",
            "status_url": "/v1/approvals/apr_fake",
        },
    ),
    "/fake/nonce": (
        401,
        {
            "Leash-Decision": "use_dpop_nonce",
            "DPoP-Nonce": "from-the-upstream",
            "WWW-Authenticate": 'DPoP error="use_dpop_nonce"',
        },
        {"error": "use_dpop_nonce"},
    ),
    "/fake/expired": (
        401,
        {"Leash-Decision": "invalid_token", "WWW-Authenticate": 'DPoP error="invalid_token"'},
        {"error": "invalid_token"},
    ),
}


def start_upstream() -> tuple[Upstream, ThreadingHTTPServer]:
    upstream = Upstream(url="")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: Any) -> None:
            pass

        def handle_any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            with upstream.lock:
                upstream.requests.append(
                    Recorded(
                        self.command,
                        self.path,
                        {name.lower(): value for name, value in self.headers.items()},
                        body,
                    )
                )
            status, headers, answer = FAKES.get(
                self.path, (200, {}, {"method": self.command, "path": self.path})
            )
            payload = json.dumps(answer).encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_DELETE = handle_any

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    upstream.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return upstream, server


ROUTES = """
[[upstream]]
name = "mail"
url = "{upstream}"
[[upstream.route]]
method = "GET"
path = "/messages/**"
action = "mail:read"
[[upstream.route]]
method = "POST"
path = "/drafts"
action = "mail:draft"
[[upstream.route]]
method = "POST"
path = "/messages/*/send"
action = "mail:send"
risk = "high"
[[upstream.route]]
method = "GET"
path = "/export"
action = "mail:export"
[[upstream.route]]
method = "GET"
path = "/fake/*"
action = "mail:read"
"""

LIMITS = "[limits]\ntoken_rate = 0\ngateway_rate = 0\nunauthenticated_rate = 0\n"


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Runs the `leash` command line with `env` over the caller's environment, of which the
    variables that would point it at another server, database or key never leak in."""
    inherited = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LEASH_MASTER_KEY", "LEASH_DATABASE", "LEASH_URL", "LEASH_TOKEN")
    }
    return subprocess.run(
        [str(leash_bin()), *args],
        env={**inherited, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def serve(
    config: Path, data: Path, env: dict[str, str]
) -> tuple[subprocess.Popen[str], list[str], str]:
    """Starts `leash serve` with `config` on `data`, logging warnings, with `env` over the
    caller's environment, of which `LEASH_ISSUER`, `LEASH_DATABASE` and `LEASH_MASTER_KEY` never
    leak in (`env` may still set them: a cluster's nodes share one master key). Returns the
    process, its output lines (filled as it runs) and its URL: "" if it exited, or did not
    listen within 30 s."""
    inherited = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LEASH_ISSUER", "LEASH_DATABASE", "LEASH_MASTER_KEY")
    }
    process = subprocess.Popen(
        [
            *(str(leash_bin()), "serve", "--config", str(config), "--data-dir", str(data)),
            *("--listen", "127.0.0.1:0"),
        ],
        env={**inherited, "LEASH_LOG": "warn", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    listening: queue.Queue[str] = queue.Queue()

    def read_output() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            if line.startswith("leash listening on "):
                listening.put(line.split()[3])

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            return process, output, "http://" + listening.get(timeout=0.2)
        except queue.Empty:
            if process.poll() is not None:
                # Its last words (why it did not start) are read before the caller looks.
                reader.join(timeout=2)
                break
    return process, output, ""


def printed_address(output: list[str], prefix: str, timeout: float = 10) -> str:
    """The address that a server started by `serve` printed after `prefix` (e.g. `leash proxy
    listening on `, the forward proxy's line, API §16) on a line of its `output`; "" if no
    such line came within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        for line in list(output):
            if line.startswith(prefix):
                return line[len(prefix) :].split()[0]
        if time.monotonic() > deadline:
            return ""
        time.sleep(0.05)


class Leash:
    """A running server: its URL, admin key, and the human's side of the API."""

    def __init__(
        self,
        upstream: Upstream,
        extra: str = "",
        env: dict[str, str] | None = None,
        limits: str = LIMITS,
    ) -> None:
        self.upstream = upstream
        self.admin_key = "lsk_test_admin_" + secrets.token_hex(16)
        self.dir = Path(tempfile.mkdtemp(prefix="leash-sdk-"))
        config = self.dir / "leash.toml"
        config.write_text(f"{extra}\n{ROUTES.format(upstream=upstream.url)}\n{limits}")
        self.process, self.output, url = serve(
            config, self.dir / "data", {"LEASH_ADMIN_TOKEN": self.admin_key, **(env or {})}
        )
        if not url:
            self.stop()
            raise RuntimeError("leash did not start:\n" + "".join(self.output))
        self.url = url
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def call(self, method: str, path: str, key: str, body: Any = None) -> httpx.Response:
        return self.http.request(
            method, path, headers={"Authorization": f"Bearer {key}"}, json=body
        )

    def add_user(self, name: str) -> str:
        """A human; returns their API key."""
        response = self.call("POST", "/v1/users", self.admin_key, {"name": name})
        assert response.status_code == 201, response.text
        key: str = response.json()["api_key"]
        return key

    def register_agent(self, agent_id: str, public_jwk: dict[str, str]) -> None:
        body = {"id": agent_id, "name": "test agent", "jwks": {"keys": [public_jwk]}}
        response = self.call("POST", "/v1/agents", self.admin_key, body)
        assert response.status_code == 201, response.text

    def grant(self, user_key: str, agent_id: str = AGENT_ID, **fields: Any) -> dict[str, Any]:
        body = {
            "agent": agent_id,
            "purpose": "Summarise my inbox and draft replies",
            "upstreams": ["mail"],
            "actions": ["mail:read", "mail:draft", "mail:send"],
            "approval_required": ["mail:send"],
            "ttl_seconds": 900,
            **fields,
        }
        response = self.call("POST", "/v1/grants", user_key, body)
        assert response.status_code == 201, response.text
        grant: dict[str, Any] = response.json()
        return grant

    def grant_status(self, user_key: str, grant_id: str) -> str:
        response = self.call("GET", f"/v1/grants/{grant_id}", user_key)
        assert response.status_code == 200, response.text
        status: str = response.json()["status"]
        return status

    def decide(self, user_key: str, approval_id: str, decision: str) -> None:
        response = self.call("POST", f"/v1/approvals/{approval_id}/{decision}", user_key)
        assert response.status_code == 200, response.text

    def audit(self, grant_id: str) -> list[dict[str, Any]]:
        response = self.call("GET", f"/v1/audit?grant_id={grant_id}", self.admin_key)
        assert response.status_code == 200, response.text
        return [json.loads(line) for line in response.text.splitlines() if line]

    def exchanges(self, grant_id: str) -> int:
        """Tokens issued for the grant, as the audit log counts them."""
        return sum(
            1
            for event in self.audit(grant_id)
            if event["kind"] == "token.exchange" and event["decision"] == "allow"
        )


@pytest.fixture(scope="session")
def upstream() -> Iterator[Upstream]:
    upstream, server = start_upstream()
    yield upstream
    server.shutdown()


@pytest.fixture(scope="session")
def leash(upstream: Upstream) -> Iterator[Leash]:
    server = Leash(upstream)
    yield server
    server.stop()


@pytest.fixture
def make_leash(upstream: Upstream) -> Iterator[Any]:
    """A server of the test's own, with `extra` config lines (short token lifetimes, nonces),
    `env` added to its environment, and its `[limits]` table (default: rates off)."""
    servers: list[Leash] = []

    def make(extra: str, env: dict[str, str] | None = None, limits: str = LIMITS) -> Leash:
        server = Leash(upstream, extra, env, limits)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def keygen(directory: Path, alg: str = "EdDSA") -> Path:
    """A key file as `leash agent keygen` writes it."""
    path = directory / f"agent-{secrets.token_hex(4)}.jwk"
    subprocess.run(
        [str(leash_bin()), "agent", "keygen", "--out", str(path), "--alg", alg],
        check=True,
        capture_output=True,
    )
    return path


@dataclass
class Setup:
    """A human, a registered agent (its key from `leash agent keygen`) and a grant."""

    leash: Leash
    user_key: str
    agent_id: str
    key_file: Path
    grant: dict[str, Any]

    @property
    def handle(self) -> str:
        handle: str = self.grant["handle"]
        return handle

    @property
    def grant_id(self) -> str:
        grant_id: str = self.grant["id"]
        return grant_id


def set_up(leash: Leash, directory: Path, alg: str = "EdDSA", **grant: Any) -> Setup:
    from leash_agent import SigningKey

    user_key = leash.add_user(f"alice-{secrets.token_hex(4)}")
    agent_id = f"spiffe://example.org/agent/mailbot-{secrets.token_hex(4)}"
    key_file = keygen(directory, alg)
    public = SigningKey.from_jwk(json.loads(key_file.read_text())).public_jwk()
    leash.register_agent(agent_id, public)
    return Setup(leash, user_key, agent_id, key_file, leash.grant(user_key, agent_id, **grant))


@pytest.fixture
def setup(leash: Leash, tmp_path: Path) -> Setup:
    return set_up(leash, tmp_path)
