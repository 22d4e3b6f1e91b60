"""An outsider's attacks on the forward proxy's WebSockets (API §16 with §5-§8; ATTACKS 36-41,
58), against the real `leash` binary: a browser agent that holds the `lpx_` credential of its
own grant opens WebSockets through the proxy (real Chromium, and hand-made handshakes and frames
over raw sockets), to a WebSocket app made with the `websockets` package (`Live`) and to a
hostile one of raw sockets (`Odd`: 101s that name extensions or other protocols, frames no
client may accept).

What is promised, and attacked here: a WebSocket opens only on a `GET` route with `websocket =
true`, through a tunnel or as a plain `http://` request, and no other upgrade does (h2c, other
tokens, malformed handshakes, HTTP/2's extended CONNECT); its handshake is one request of the
route's action (scope, Cedar, approval), audited as `gateway.request` with `via = "proxy"`; the
upstream gets the human's vaulted cookie and the grant's jar, never the browser's cookie, and its
`Set-Cookie` never reaches the browser; Leash offers the upstream no extension and refuses a 101
that names one or switches to anything else (502); every upstream message is checked for an
echo of a credential Leash sent (raw, hex or base64, text or binary, across messages), which
closes the socket with 1008 and the audit event `credential_reflected`; ending the grant closes
an open socket within about a second; messages are at most `[limits] gateway_body_bytes`; no
secret in the audit or the log.

Each test is one attack and asserts the secure behaviour. Those that failed against the binary
reviewed were findings, fixed since and marked `# FIXED:` (what was seen, and the fix): the
reason of an app's close frame was never checked for an echo (the page read the vaulted session
in `CloseEvent.reason`, and the debug log held it); the browser's `Sec-WebSocket-Key` was never
checked (a malformed one opened a socket to an app that switches on anything); a 101 whose
`Sec-WebSocket-Accept` answered another key was passed on."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import secrets
import socket
import ssl
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
from conftest import LIMITS, Leash, Setup, Upstream, set_up
from playwright.sync_api import Browser, BrowserContext, Page
from proxy_fixtures import (
    STATIC_STATUS,
    Answer,
    Closed,
    Proxy,
    Recorder,
    basic,
    dial,
    h2_frame,
    hpack_literal,
    huffman_digits,
    launch_chromium,
    make_pki,
    parse_cookies,
    pending_approvals,
    proxy_listening,
    trusting_home,
    tunnel,
)
from proxy_fixtures import Reader as LenientReader
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from leash_agent import Agent

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
BODY_LIMIT = 65536  # `[limits] gateway_body_bytes` of the Leash under attack
APPROVAL_WAIT = 10

Action = Callable[[ServerConnection], Coroutine[Any, Any, None]]


def accept_for(key: str) -> str:
    """RFC 6455 §4.2.2: the `Sec-WebSocket-Accept` that answers `key`."""
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


@dataclass
class Seen:
    """A request as an upstream received it: its target, its headers (names in lower case, in
    order) and (`Odd`) the bytes that followed its head on the connection, once `done`."""

    path: str
    headers: tuple[tuple[str, str], ...]
    after: bytes = b""
    done: threading.Event = field(default_factory=threading.Event)

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name.lower()]

    def cookies(self) -> list[tuple[str, str]]:
        return parse_cookies(self.header("cookie"))

    @property
    def route(self) -> str:
        return urllib.parse.urlsplit(self.path).path

    @property
    def upgrade(self) -> bool:
        return bool(self.header("upgrade"))


# --- the WebSocket app (websockets) ---------------------------------------------------------------


class Socket:
    """A WebSocket the app accepted: what the browser sent through it, and how it ended."""

    def __init__(self, app: Live, ws: ServerConnection) -> None:
        self.app = app
        self.ws = ws
        self.received: list[str | bytes] = []
        self.closed = threading.Event()

    def wait_received(self, count: int, timeout: float = 5) -> list[str | bytes]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.received)


Sent = str | bytes | list[str] | float


def sends(*messages: Sent) -> Action:
    """Sends `messages` in order (a list: one message in fragments, one frame each; a number: a
    pause of that many seconds)."""

    async def act(ws: ServerConnection) -> None:
        for message in messages:
            if isinstance(message, float):
                await asyncio.sleep(message)
            else:
                await ws.send(message)
                await asyncio.sleep(0.01)

    return act


class Live(Recorder[Seen]):
    """A WebSocket app over HTTPS (a test CA of its own, given to Leash as `ca_file`), made with
    the `websockets` package (compression on offer, as by default: an extension Leash offered
    would be taken). It records every request, and answers:

    - a WebSocket handshake anywhere: accepted; each message it then gets is echoed back with
      `echo:` in front; `?s=ID` names the socket (`socket(ID)`), whose `on_open[ID]` action runs
      first; `?c101=COOKIE`: a `Set-Cookie` on the 101; `?echo101=1`: the `Cookie` it got, in a
      header of the 101;
    - `GET /page`: an HTML page; `GET /set?c=COOKIE`: `Set-Cookie: COOKIE` (each `c`);
    - anything else: 404."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.ca_file, self.context = make_pki(directory)
        self.sockets: dict[str, Socket] = {}
        self.on_open: dict[str, Action] = {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: Server = asyncio.run_coroutine_threadsafe(self.start(), self.loop).result(10)
        self.port: int = self.server.sockets[0].getsockname()[1]

    async def start(self) -> Server:
        server: Server = await serve(
            self.handler,
            "127.0.0.1",
            0,
            ssl=self.context,
            process_request=self.process_request,
            process_response=self.process_response,
            ping_interval=None,
            max_size=None,
        )
        return server

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            await self.server.wait_closed()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)

    def socket(self, name: str, timeout: float = 5) -> Socket:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if name in self.sockets:
                    return self.sockets[name]
            time.sleep(0.02)
        raise AssertionError(f"no socket {name} reached the app")

    def opened(self, name: str) -> bool:
        with self.lock:
            return name in self.sockets

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        seen = Seen(request.path, tuple((k.lower(), v) for k, v in request.headers.raw_items()))
        self.add(seen)
        if seen.upgrade:
            return None
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.path).query)
        headers = Headers([("Content-Type", "text/html; charset=utf-8")])
        body = b"<!doctype html><title>live</title><p id=live>live</p>"
        if seen.route == "/set":
            for cookie in query.get("c", []):
                headers["Set-Cookie"] = cookie
            body = b"set"
        elif seen.route != "/page":
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        headers["Content-Length"] = str(len(body))
        return Response(200, "OK", headers, body)

    def process_response(
        self, connection: ServerConnection, request: Request, response: Response
    ) -> Response | None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.path).query)
        for cookie in query.get("c101", []):
            response.headers["Set-Cookie"] = cookie
        if query.get("echo101"):
            response.headers["X-Echo"] = request.headers.get("Cookie", "")
        return response

    async def handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(ws.request.path).query)
        name = query.get("s", [secrets.token_hex(4)])[0]
        socket_ = Socket(self, ws)
        with self.lock:
            self.sockets[name] = socket_
            action = self.on_open.get(name)
        try:
            if action is not None:
                await action(ws)
            async for message in ws:
                socket_.received.append(message)
                echo = "echo:" + message if isinstance(message, str) else b"echo:" + message
                await ws.send(echo)
        except ConnectionClosed:
            pass
        finally:
            socket_.closed.set()


# --- the hostile app (raw sockets) ----------------------------------------------------------------


def frame(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0, mask: bool = False) -> bytes:
    """One RFC 6455 frame (`rsv`: the three RSV bits, 0-7)."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    flag = 0x80 if mask else 0
    if len(payload) < 126:
        head += bytes([flag | len(payload)])
    elif len(payload) < 1 << 16:
        head += bytes([flag | 126]) + len(payload).to_bytes(2, "big")
    else:
        head += bytes([flag | 127]) + len(payload).to_bytes(8, "big")
    if not mask:
        return head + payload
    key = secrets.token_bytes(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def deflated(data: bytes) -> bytes:
    """`data` as permessage-deflate sends it (RFC 7692 §7.2.1: raw DEFLATE, tail removed)."""
    packer = zlib.compressobj(wbits=-15)
    return (packer.compress(data) + packer.flush(zlib.Z_SYNC_FLUSH))[:-4]


def cookie_value(seen: Seen, name: str = "sid") -> bytes:
    return next((v for n, v in seen.cookies() if n == name), "").encode()


class Odd(Recorder[Seen]):
    """A hostile WebSocket app over HTTPS with raw sockets, that answers every request by its
    path (and records it, with whatever the connection carried in the next second):

    - `/ext`: a 101 that names `permessage-deflate`, then the `sid` cookie it got, compressed
      (RSV1);
    - `/h2c`: a 101 to `h2c`; `/other`: a 101 to `websocket, foo`;
    - `/accept`: a 101 whose `Sec-WebSocket-Accept` answers another key;
    - `/rsv1`: a good 101, then the `sid` cookie compressed in an RSV1 frame no extension allows;
    - `/masked`: a good 101, then the `sid` cookie in a masked frame (a server's never are);
    - `/opcode`: a good 101, then the `sid` cookie in a frame of the reserved opcode 3;
    - `/pong`: a good 101, then the `sid` cookie in an unasked pong;
    - `/echo`: a good 101 and, in the same write, the `sid` cookie in a text message;
    - `/huge`: a good 101, then a frame that declares 2**40 bytes and sends the `sid` cookie;
    - anything else: a good 101 and nothing more."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.ca_file, self.context = make_pki(directory)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def stop(self) -> None:
        self.listener.close()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.one, args=(conn,), daemon=True).start()

    def one(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except (OSError, ssl.SSLError):
            conn.close()
            return
        with tls:
            reader = Reader(tls, 5)
            try:
                head = reader.until(b"\r\n\r\n").decode("latin-1")
            except Closed:
                return
            lines = head.split("\r\n")
            headers = []
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers.append((name.strip().lower(), value.strip()))
            seen = Seen(lines[0].split()[1], tuple(headers))
            self.add(seen)
            with contextlib.suppress(OSError):
                self.answer(tls, seen)
            tls.settimeout(1)
            after = reader.buffer
            with contextlib.suppress(OSError):
                while chunk := tls.recv(65536):
                    after += chunk
            seen.after = after
            seen.done.set()

    def answer(self, tls: ssl.SSLSocket, seen: Seen) -> None:
        key = (seen.header("sec-websocket-key") or [""])[0]
        route, sid = seen.route, cookie_value(seen)
        upgrade = {"/h2c": "h2c", "/other": "websocket, foo"}.get(route, "websocket")
        accept = accept_for("x" * 22 + "==" if route == "/accept" else key)
        head = (
            f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: {upgrade}\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept}\r\n"
        )
        if route == "/ext":
            head += "Sec-WebSocket-Extensions: permessage-deflate\r\n"
        after = {
            "/ext": frame(1, deflated(b"sid=" + sid), rsv=4),
            "/rsv1": frame(1, deflated(b"sid=" + sid), rsv=4),
            "/masked": frame(1, b"sid=" + sid, mask=True),
            "/opcode": frame(3, b"sid=" + sid),
            "/pong": frame(10, sid),
            "/echo": frame(1, b"sid=" + sid),
            "/huge": b"\x82\x7f" + (1 << 40).to_bytes(8, "big") + b"sid=" + sid * 100,
        }.get(route, b"")
        tls.sendall(head.encode() + b"\r\n" + frame(1, b"hello") + after)


# --- raw sockets: HTTP/1.1 and WebSocket frames by hand -------------------------------------------


class Reader(LenientReader):
    """The shared `Reader`, but `exact` raises `Closed` when the peer closes short (a frame cut
    off is an end, not a short frame)."""

    def exact(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self.fill():
                raise Closed(f"closed {size - len(self.buffer)} bytes short")
        got, self.buffer = self.buffer[:size], self.buffer[size:]
        return got


def read_answer(reader: Reader, head_only: bool = False) -> Answer:
    """One HTTP/1.1 answer; no body for a 101 or with `head_only` (a CONNECT's 2xx). Not the
    shared `read_answer`: this one stops at the first answer, 1xx included, reads a 204's body
    like any other, keeps no body cut short and no chunk framing in `raw`."""
    head = reader.until(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    answer = Answer(status, headers, b"", head + b"\r\n\r\n")
    if status == 101 or (head_only and 200 <= status < 300):
        return answer
    length = answer.header("content-length")
    if length:
        with contextlib.suppress(Closed):
            answer.body = reader.exact(int(length[0]))
    elif not any("chunked" in v for v in answer.header("transfer-encoding")):
        answer.body = reader.rest()
    else:
        with contextlib.suppress(Closed):
            while size := int(reader.until(b"\r\n").split(b";")[0] or b"0", 16):
                answer.body += reader.exact(size + 2)[:size]
    answer.raw += answer.body
    return answer


@dataclass
class Frame:
    fin: bool
    rsv: int
    opcode: int
    masked: bool
    payload: bytes


@dataclass
class Ending:
    """What came out of a socket up to its end: the data messages (text as `str`), every frame,
    the close frame's code and reason (None: no close frame), and whether the TCP/TLS connection
    ended (rather than the wait timing out)."""

    messages: list[str | bytes] = field(default_factory=list)
    frames: list[Frame] = field(default_factory=list)
    code: int | None = None
    reason: bytes = b""
    ended: bool = False

    def everything(self) -> bytes:
        return b"".join(f.payload for f in self.frames)


class Client:
    """The browser's side of a WebSocket, by hand."""

    def __init__(self, sock: ssl.SSLSocket | socket.socket, reader: Reader) -> None:
        self.sock = sock
        self.reader = reader

    def send_frame(
        self, opcode: int, payload: bytes, fin: bool = True, rsv: int = 0, mask: bool = True
    ) -> None:
        self.sock.sendall(frame(opcode, payload, fin, rsv, mask))

    def send(self, message: str | bytes) -> None:
        if isinstance(message, str):
            self.send_frame(1, message.encode())
        else:
            self.send_frame(2, message)

    def frame(self) -> Frame:
        first, second = self.reader.exact(2)
        size = second & 0x7F
        if size == 126:
            size = int.from_bytes(self.reader.exact(2), "big")
        elif size == 127:
            size = int.from_bytes(self.reader.exact(8), "big")
        key = self.reader.exact(4) if second & 0x80 else b""
        payload = self.reader.exact(size)
        if key:
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        return Frame(bool(first & 0x80), (first >> 4) & 7, first & 0x0F, bool(key), payload)

    def until_closed(self, timeout: float = 5, count: int | None = None) -> Ending:
        """Frames until a close frame (answered), the end of the connection, `timeout` seconds,
        or `count` data messages."""
        ending = Ending()
        self.reader.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        parts: list[Frame] = []
        while time.monotonic() < deadline:
            try:
                got = self.frame()
            except Closed:
                ending.ended = not self.reader.buffer and time.monotonic() < deadline
                return ending
            ending.frames.append(got)
            if got.opcode == 8:
                if len(got.payload) >= 2:
                    ending.code = int.from_bytes(got.payload[:2], "big")
                ending.reason = got.payload[2:]
                with contextlib.suppress(OSError):
                    self.send_frame(8, got.payload[:2])
                ending.ended = True
                return ending
            if got.opcode in (0, 1, 2):
                parts.append(got)
                if got.fin:
                    data = b"".join(p.payload for p in parts)
                    text = parts[0].opcode == 1
                    ending.messages.append(data.decode(errors="replace") if text else data)
                    parts = []
                    if count is not None and len(ending.messages) >= count:
                        return ending
        return ending


def handshake(
    path: str,
    host: str = "live.test",
    extra: str = "",
    key: str = "dGhlIHNhbXBsZSBub25jZQ==",
    method: str = "GET",
    target: str | None = None,
) -> str:
    return (
        f"{method} {target or path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"{extra}\r\n"
    )


# --- the rig --------------------------------------------------------------------------------------


@dataclass
class Rig(Proxy):
    """The proxy (its `host` is `live.test`) and the two apps behind it."""

    live: Live
    odd: Odd


def rig_config(live: Live, odd: Odd, policies: Path) -> str:
    def route(path: str, action: str, websocket: bool, risk: str = "") -> str:
        return (
            f'[[upstream.route]]\nmethod = "GET"\npath = "{path}"\naction = "{action}"\n'
            + ("websocket = true\n" if websocket else "")
            + (f'risk = "{risk}"\n' if risk else "")
        )

    return f"""policy_dir = {json.dumps(str(policies))}
[proxy]
listen = "127.0.0.1:0"
approval_wait = {APPROVAL_WAIT}

[[upstream]]
name = "live"
url = "https://localhost:{live.port}"
ca_file = {json.dumps(str(live.ca_file))}
hosts = ["live.test"]
{route("/page", "live:read", False)}{route("/set", "live:read", False)}
{route("/live", "live:read", True)}{route("/feed", "live:read", False)}
{route("/chat", "live:chat", True)}{route("/banned", "live:banned", True)}
{route("/watch", "live:watch", True, "high")}
[[upstream]]
name = "odd"
url = "https://localhost:{odd.port}"
ca_file = {json.dumps(str(odd.ca_file))}
hosts = ["odd.test"]
{route("/**", "odd:read", True)}
"""


@pytest.fixture(scope="module")
def rig(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    directory = tmp_path_factory.mktemp("ws-rig")
    live = Live(tmp_path_factory.mktemp("live"))
    odd = Odd(tmp_path_factory.mktemp("odd"))
    policies = directory / "policies"
    policies.mkdir()
    (policies / "ws.cedar").write_text(
        '@id("no-banned-sockets")\n'
        'forbid (principal, action == Leash::Action::"live:banned", resource);\n'
        "permit (principal, action, resource);\n"
    )
    limits = LIMITS + f"gateway_body_bytes = {BODY_LIMIT}\n"
    leash = Leash(
        upstream, rig_config(live, odd, policies), env={"LEASH_LOG": "debug"}, limits=limits
    )
    try:
        ca_file = directory / "leash-proxy-ca.pem"
        yield Rig(leash, proxy_listening(leash, ca_file), ca_file, "live.test", live, odd)
    finally:
        alive = leash.process.poll() is None
        last_words = "".join(leash.output[-30:])
        leash.stop()
        live.stop()
        odd.stop()
        assert alive, "the server died:\n" + last_words


@dataclass
class Task:
    rig: Rig
    setup: Setup
    agent: Agent
    sid: str  # the session the human vaulted for `live` (cookie `sid`)
    odd_sid: str  # and for `odd`
    credential: str

    @property
    def leash(self) -> Leash:
        return self.rig.leash

    @property
    def grant_id(self) -> str:
        return self.setup.grant_id

    def events(self) -> list[dict[str, Any]]:
        return self.leash.audit(self.setup.grant_id)

    def end(self, how: str) -> None:
        answer = self.leash.call("POST", f"/v1/grants/{self.grant_id}/{how}", self.setup.user_key)
        assert answer.status_code == 200, answer.text

    def pending(self) -> list[dict[str, Any]]:
        return pending_approvals(self.leash, self.setup)


SECRETS: list[str] = []  # every credential this module's tasks had, for the log's check


def session_id() -> str:
    """A session id whose base64 differs from its base64url wherever it starts: `~` (0x7E) is
    `+` or `-` as the third byte of a group, and one of `~~~` is, whatever the alignment (an
    id of URL-safe characters alone reads the same in both alphabets)."""
    return "vaulted-" + secrets.token_urlsafe(9) + "~~~" + secrets.token_urlsafe(9)


def new_task(rig: Rig, directory: Path, **grant: Any) -> Task:
    fields: dict[str, Any] = {
        "upstreams": ["live", "odd"],
        "actions": ["live:read", "live:banned", "live:watch", "odd:read"],
        "approval_required": [],
        "purpose": "Watch the live feed",
        **grant,
    }
    setup = set_up(rig.leash, directory, **fields)
    sids = [session_id() for _ in range(2)]
    for name, sid in zip(("live", "odd"), sids, strict=True):
        vaulted = rig.leash.call(
            "PUT", f"/v1/vault/{name}", setup.user_key, {"kind": "cookie", "secret": f"sid={sid}"}
        )
        assert vaulted.status_code in (200, 201, 204), vaulted.text
    agent = Agent.from_jwk_file(rig.leash.url, setup.agent_id, setup.key_file)
    credential = agent.task(handle=setup.handle).proxy_credential()
    assert credential.startswith("lpx_"), credential[:8]
    SECRETS.extend([*sids, credential, setup.handle])
    return Task(rig, setup, agent, sids[0], sids[1], credential)


@pytest.fixture
def make_task(rig: Rig, tmp_path: Path) -> Iterator[Callable[..., Task]]:
    made: list[Task] = []

    def make(**grant: Any) -> Task:
        task = new_task(rig, tmp_path, **grant)
        made.append(task)
        return task

    yield make
    for task in made:
        task.agent.close()


@pytest.fixture
def task(make_task: Callable[..., Task]) -> Task:
    return make_task()


@pytest.fixture(scope="module")
def shared(rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Task]:
    """One task for the tests that leave its grant alive."""
    task = new_task(rig, tmp_path_factory.mktemp("shared"))
    yield task
    task.agent.close()


@pytest.fixture(autouse=True)
def still_serving(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "rig" in request.fixturenames:
        rig: Rig = request.getfixturevalue("rig")
        assert rig.leash.process.poll() is None, "".join(rig.leash.output[-30:])
        assert rig.leash.http.get("/healthz").status_code == 200


@contextlib.contextmanager
def opened(
    rig: Rig, credential: str, request: str | bytes, host: str = "live.test"
) -> Iterator[tuple[Answer, Client]]:
    """`request` (a handshake) in a tunnel of its own: Leash's answer, and the socket."""
    with tunnel(rig, credential, host) as tls:
        reader = Reader(tls, 10)
        tls.sendall(request.encode() if isinstance(request, str) else request)
        yield read_answer(reader), Client(tls, reader)


def attempt(rig: Rig, credential: str, request: str | bytes, host: str = "live.test") -> Answer:
    """`request` in a tunnel of its own; Leash's answer (status 0: closed without one)."""
    try:
        with opened(rig, credential, request, host) as (answer, _):
            return answer
    except (Closed, ssl.SSLError, ConnectionError) as error:
        return Answer(0, [], b"", repr(error).encode())


def name() -> str:
    return secrets.token_hex(6)


def reflected(events: list[dict[str, Any]], path: str = "/live") -> list[dict[str, Any]]:
    """The audit's `credential_reflected` events of sockets on `path`, each checked to follow
    the `allow` of its own handshake."""
    found = []
    for at, event in enumerate(events):
        if event.get("reason") != "credential_reflected":
            continue
        assert (event["kind"], event["decision"], event["via"]) == (
            "gateway.request",
            "deny",
            "proxy",
        ), event
        if event["path"] != path:
            continue
        opened_by = [e for e in events[:at] if e["request_id"] == event["request_id"]]
        assert [e["decision"] for e in opened_by] == ["allow"], (event, opened_by)
        found.append(event)
    return found


# === 1. Real Chromium =============================================================================


@pytest.fixture(scope="module")
def chromium(rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """Headless chromium whose NSS database trusts Leash's proxy CA (and nothing else of ours)."""
    with launch_chromium(trusting_home(tmp_path_factory, rig.ca_file)) as browser:
        yield browser


# Opens `url`, sends `send`, and resolves with what happened once closed (or after `wait` ms, or
# after `count` messages).
SOCKET_SCRIPT = """async ({url, send, count, wait}) => {
  const events = [];
  return await new Promise((resolve) => {
    const ws = new WebSocket(url);
    const done = () => resolve({events, extensions: ws.extensions, cookie: document.cookie});
    ws.onopen = () => { events.push("open"); for (const m of send) ws.send(m); };
    ws.onmessage = (e) => {
      events.push("message:" + e.data);
      if (events.filter((x) => x.startsWith("message:")).length >= count) ws.close(1000);
    };
    ws.onerror = () => events.push("error");
    ws.onclose = (e) => { events.push("close:" + e.code + ":" + e.reason); done(); };
    setTimeout(done, wait);
  });
}"""


@contextlib.contextmanager
def live_page(rig: Rig, task: Task, chromium: Browser) -> Iterator[tuple[BrowserContext, Page]]:
    """A browser context with Leash as its proxy (the task's credential as its login), and a
    page of it at `https://live.test/page`, which has set a cookie of its own (`theme`)."""
    context = chromium.new_context(
        proxy={
            "server": rig.server,
            "username": "leash",
            "password": task.credential,
        }
    )
    try:
        context.set_default_timeout(15_000)
        page = context.new_page()
        page.goto("https://live.test/page")
        assert page.text_content("#live") == "live"
        page.evaluate("document.cookie = 'theme=dark; Path=/'")
        yield context, page
    finally:
        context.close()


def test_chromium_opens_a_socket_only_where_the_route_allows_and_never_holds_the_session(
    rig: Rig, task: Task, chromium: Browser
) -> None:
    with live_page(rig, task, chromium) as (context, page):
        mark = rig.live.mark()
        good, feed, echo = name(), name(), name()
        script = {"send": ["hello", "again"], "count": 2, "wait": 8000}
        result = page.evaluate(SOCKET_SCRIPT, {"url": f"wss://live.test/live?s={good}", **script})
        events = result["events"]
        assert events[:3] == ["open", "message:echo:hello", "message:echo:again"], events
        # Leash offered the app no compression (Chromium offers it), and chose none for the page.
        assert result["extensions"] == "", result
        assert rig.live.socket(good).wait_received(2) == ["hello", "again"]
        # The session never reaches the page, nor the browser's cookie store.
        assert result["cookie"] == "theme=dark", result
        assert [c.get("name") for c in context.cookies()] == ["theme"], context.cookies()
        # A route without `websocket = true` fails the socket, and the app never sees it.
        refused = page.evaluate(SOCKET_SCRIPT, {"url": f"wss://live.test/feed?s={feed}", **script})
        assert "open" not in refused["events"], refused
        assert "error" in refused["events"] or refused["events"][-1].startswith("close:1006")
        # An echo of the session in a message closes the socket with 1008, unseen by the page.
        rig.live.on_open[echo] = sends("first", json.dumps({"session": task.sid}))
        echoed = page.evaluate(SOCKET_SCRIPT, {"url": f"wss://live.test/live?s={echo}", **script})
        assert echoed["events"][:2] == ["open", "message:first"], echoed
        assert any(e.startswith("close:1008") for e in echoed["events"]), echoed
        assert not [e for e in echoed["events"] if task.sid in e], echoed
    received = rig.live.since(mark)
    assert [r.route for r in received] == ["/live", "/live"], received
    for request in received:
        assert request.cookies() == [("sid", task.sid)], request
        assert not request.header("sec-websocket-extensions"), request
        assert not request.header("proxy-authorization"), request
    assert not rig.live.opened(feed)


def test_chromium_reads_no_session_in_the_reason_of_the_apps_close_frame(
    rig: Rig, task: Task, chromium: Browser
) -> None:
    # FIXED: the app's close reason is checked as its messages are. Seen: the app closes with
    # `1000, "bye <the vaulted sid>"` and the page's `onclose` reads
    # `close:1000:bye vaulted-...` (`CloseEvent.reason`): the session the browser must never
    # hold, in the page's hands. Expected: 1008, and no credential in the reason.
    IN_A_CLOSE_REASON.append(task.sid)
    socket_ = name()
    rig.live.on_open[socket_] = control_frame("close reason", task.sid)
    with live_page(rig, task, chromium) as (_, page):
        script = {"send": [], "count": 1, "wait": 5000}
        result = page.evaluate(
            SOCKET_SCRIPT, {"url": f"wss://live.test/live?s={socket_}", **script}
        )
    assert result["events"][0] == "open", result
    assert not [e for e in result["events"] if task.sid in e], result
    assert any(e.startswith("close:1008") for e in result["events"]), result


# === 2. Raw sockets: the handshake ================================================================


def test_the_app_gets_the_vaulted_session_and_jar_and_the_browser_gets_no_cookie(
    rig: Rig, shared: Task
) -> None:
    """The browser's own `Cookie` is dropped and its compression offer not passed on; the app
    gets the vaulted session, the jar's cookies and Leash's attribution; the 101 the browser gets
    answers its own key, names no extension and sets no cookie."""
    task, socket_ = shared, name()
    jar = "jar-" + secrets.token_urlsafe(16)
    SECRETS.append(jar)
    with tunnel(rig, task.credential) as tls:
        reader = Reader(tls, 10)
        tls.sendall(
            f"GET /set?c=j%3D{jar}%3B+Path%3D%2F HTTP/1.1\r\nHost: live.test\r\n\r\n".encode()
        )
        assert read_answer(reader).status == 200
    mark = rig.live.mark()
    key = base64.b64encode(secrets.token_bytes(16)).decode()
    from_101 = "from101-" + secrets.token_urlsafe(12)
    extra = (
        "Cookie: sid=the-browsers-own; theme=dark\r\n"
        "Leash-Grant: grt_forged\r\nLeash-Subject: usr_forged\r\nX-Forwarded-For: 10.0.0.1\r\n"
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        f"Proxy-Authorization: {basic(task.credential)}\r\n"
    )
    path = f"/live?s={socket_}&c101=w%3D{from_101}%3B+Path%3D%2F"
    with opened(rig, task.credential, handshake(path, extra=extra, key=key)) as (answer, ws):
        assert answer.status == 101, answer.raw[:400]
        assert answer.header("sec-websocket-accept") == [accept_for(key)], answer.headers
        assert not answer.header("sec-websocket-extensions"), answer.headers
        assert not answer.header("set-cookie"), answer.headers
        assert from_101 not in answer.raw.decode("latin-1")
        ws.send("text one")
        ws.send(b"\x00binary\xff")
        got = ws.until_closed(timeout=3, count=2)
        assert got.messages == ["echo:text one", b"echo:\x00binary\xff"], got
        assert all(f.rsv == 0 for f in got.frames), got.frames
    assert rig.live.socket(socket_).received == ["text one", b"\x00binary\xff"]
    (seen,) = rig.live.since(mark)
    assert seen.route == "/live"
    assert seen.cookies() == [("sid", task.sid), ("j", jar)], seen.cookies()
    assert not seen.header("sec-websocket-extensions"), seen.headers
    assert not seen.header("proxy-authorization"), seen.headers
    assert seen.header("leash-subject") == [task.setup.grant["subject"]], seen.headers
    assert seen.header("leash-actor") == [task.setup.agent_id], seen.headers
    assert seen.header("leash-grant") == [task.grant_id], seen.headers
    assert not seen.header("x-forwarded-for"), seen.headers
    events = [e for e in task.events() if e["kind"] == "gateway.request" and e["path"] == "/live"]
    assert events, task.events()[-3:]
    last = events[-1]
    assert (last["decision"], last["mode"], last.get("via")) == ("allow", "delegated", "proxy")
    assert (last["upstream"], last["action"], last["method"]) == ("live", "live:read", "GET")


@pytest.mark.parametrize(
    ("path", "status", "decision"),
    [
        ("/feed", 403, None),  # a route without `websocket = true`
        ("/chat", 403, "insufficient_scope"),  # an action outside the grant
        ("/banned", 403, "policy_denied"),  # Cedar forbids it
        ("/nowhere", 403, "no_route"),
    ],
    ids=["no websocket route", "scope", "cedar", "no route"],
)
def test_a_handshake_the_route_grant_or_policy_does_not_allow_never_reaches_the_app(
    rig: Rig, shared: Task, path: str, status: int, decision: str | None
) -> None:
    task, mark, socket_ = shared, rig.live.mark(), name()
    before = len(task.events())
    with opened(rig, task.credential, handshake(f"{path}?s={socket_}")) as (answer, ws):
        assert answer.status == status, answer.raw[:400]
        assert answer.header("leash-decision"), answer.headers
        if decision:
            assert answer.header("leash-decision") == [decision], answer.headers
        # The frames a page would then send are no request either.
        with contextlib.suppress(OSError):
            ws.send("after the refusal")
            ws.send_frame(1, b"GET /live HTTP/1.1\r\nHost: live.test\r\n\r\n")
        with contextlib.suppress(Closed):
            read_answer(ws.reader)
    time.sleep(0.2)
    assert rig.live.since(mark) == [], rig.live.since(mark)
    assert not rig.live.opened(socket_)
    added = [e for e in task.events()[before:] if e["kind"] == "gateway.request"]
    assert added, "not audited"
    assert (added[0]["decision"], added[0]["via"], added[0]["path"]) == ("deny", "proxy", path)
    if decision:
        assert added[0]["reason"] == decision, added[0]


KEY = "dGhlIHNhbXBsZSBub25jZQ=="
HEAD = "GET /live?s={s} HTTP/1.1\r\nHost: {host}\r\n"
WS = "Upgrade: websocket\r\nConnection: Upgrade\r\n"
# Each on the route that allows WebSockets; `{host}` is the tunnel's host, `{other}` another one.
MALFORMED = {
    "h2c": HEAD + "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
    "Connection: Upgrade, HTTP2-Settings\r\n\r\n",
    "another token": HEAD + "Upgrade: foo/1\r\nConnection: Upgrade\r\n\r\n",
    "websocket and h2c": HEAD + "Upgrade: websocket, h2c\r\nConnection: Upgrade\r\n"
    f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n",
    "two Upgrade headers": HEAD + "Upgrade: websocket\r\nUpgrade: h2c\r\n"
    f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n",
    "no key": HEAD + WS + "Sec-WebSocket-Version: 13\r\n\r\n",
    "short key": HEAD + WS + "Sec-WebSocket-Key: YWJj\r\nSec-WebSocket-Version: 13\r\n\r\n",
    "junk key": HEAD + WS + "Sec-WebSocket-Key: ?not*base64 at all, no!\r\n"
    "Sec-WebSocket-Version: 13\r\n\r\n",
    "two keys": HEAD + WS + f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Key: {KEY}\r\n"
    "Sec-WebSocket-Version: 13\r\n\r\n",
    "version 8": HEAD + WS + f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 8\r\n\r\n",
    "no version": HEAD + WS + f"Sec-WebSocket-Key: {KEY}\r\n\r\n",
    "no Connection: upgrade": HEAD + "Upgrade: websocket\r\nConnection: keep-alive\r\n"
    f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n",
    "HTTP/1.0": handshake("/live?s={s}", host="{host}").replace("HTTP/1.1", "HTTP/1.0", 1),
    "POST": handshake("/live?s={s}", host="{host}", method="POST", extra="Content-Length: 0\r\n"),
    "with a body": handshake("/live?s={s}", host="{host}", extra="Content-Length: 6\r\n")
    + "\x81\x00abcd",
    "chunked": handshake("/live?s={s}", host="{host}", extra="Transfer-Encoding: chunked\r\n")
    + "0\r\n\r\n",
    "another Host": handshake("/live?s={s}", host="{other}"),
    "absolute target for another host": handshake(
        "/live?s={s}", host="{host}", target="https://{other}/live?s={s}"
    ),
}


# FIXED: a key that is not the base64 of 16 bytes is no handshake (403). Seen: the browser's
# `Sec-WebSocket-Key` was passed to the app as it came, never checked to be
# the base64 of 16 bytes (RFC 6455 §4.1, §4.2.1): `Sec-WebSocket-Key: YWJj` (3 bytes) or
# `Sec-WebSocket-Key: ?not*base64 at all, no!` in a handshake on `/live` (a `websocket = true`
# route) reaches the app as an upgrade; a strict app (`websockets`) answers 400 ("invalid
# Sec-WebSocket-Key header"), but one that switches on anything (`Odd`) gets its `101` through to
# the browser and the socket opens. Every other malformed handshake here is refused by Leash
# itself (403 with a `Leash-Decision`) and reaches no app.
MALFORMED_CASES = [
    pytest.param(request_, host, id=f"{case}-{kind}")
    for case, request_ in MALFORMED.items()
    for host, kind in (("live.test", "strict app"), ("odd.test", "lenient app"))
]


@pytest.mark.parametrize(("request_", "host"), MALFORMED_CASES)
def test_other_upgrades_and_malformed_handshakes_open_nothing(
    rig: Rig, shared: Task, request_: str, host: str
) -> None:
    """On a route that allows WebSockets: anything but a well-formed WebSocket handshake is
    refused by Leash itself, and nothing reaches the app, whether the app is strict
    (`websockets`) or would switch on anything (`Odd`)."""
    marks, socket_ = (rig.live.mark(), rig.odd.mark()), name()
    other = "odd.test" if host == "live.test" else "live.test"
    sent = request_.replace("{s}", socket_).replace("{host}", host).replace("{other}", other)
    answer = attempt(rig, shared.credential, sent, host=host)
    assert answer.status != 101, answer.raw[:400]
    assert 400 <= answer.status < 500, answer.raw[:400]
    assert answer.header("leash-decision"), answer.raw[:400]  # Leash's own refusal
    time.sleep(0.1)
    received = rig.live.since(marks[0]) + rig.odd.since(marks[1])
    assert received == [], received
    assert not rig.live.opened(socket_)


def test_bytes_pipelined_after_a_handshake_are_frames_never_a_request(
    rig: Rig, shared: Task
) -> None:
    """A request sent right behind a handshake, in the same packet: once switched, those bytes
    are (bad) WebSocket frames, never a request of their own."""
    mark, socket_ = rig.live.mark(), name()
    smuggled = "GET /feed HTTP/1.1\r\nHost: live.test\r\n\r\n"
    with opened(rig, shared.credential, handshake(f"/live?s={socket_}") + smuggled) as (
        answer,
        ws,
    ):
        assert answer.status == 101, answer.raw[:300]
        got = ws.until_closed(timeout=3)
        assert got.messages == [], got
        assert got.code in (None, 1002), got
    time.sleep(0.2)
    assert [r.route for r in rig.live.since(mark)] == ["/live"]
    assert rig.live.socket(socket_).received == []


# --- HTTP/2 by hand: RFC 8441's extended CONNECT --------------------------------------------------


def h2_status(block: bytes) -> str:
    """The `:status` a response's header block starts with (the server may not use its dynamic
    table: our SETTINGS_HEADER_TABLE_SIZE is 0, which its first block acknowledges with a
    dynamic table size update, RFC 7541 §6.3)."""
    while block[0] & 0xE0 == 0x20:
        block = block[1:]
    first = block[0]
    if first & 0x80:
        return STATIC_STATUS.get(first & 0x7F, f"index {first & 0x7F}")
    length = block[1] & 0x7F
    value = block[2 : 2 + length]
    if not block[1] & 0x80:
        return value.decode()
    return huffman_digits(value)


def h2_attempt(
    rig: Rig, credential: str, headers: list[tuple[str, str]], end: bool
) -> tuple[dict[int, int], str]:
    """One stream of `headers` over HTTP/2 in a tunnel: the server's SETTINGS, and how the
    stream ended (`status N`, `reset`, `goaway`, `closed`)."""
    with tunnel(rig, credential, alpn=("h2",)) as tls:
        reader = Reader(tls, 10)
        assert tls.selected_alpn_protocol() == "h2"
        block = b"".join(hpack_literal(n.encode(), v.encode()) for n, v in headers)
        settings = (1).to_bytes(2, "big") + (0).to_bytes(4, "big")
        tls.sendall(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + h2_frame(4, 0, 0, settings)
            + h2_frame(1, 0x4 | (0x1 if end else 0), 1, block)
        )
        server: dict[int, int] = {}
        outcome = "closed"
        with contextlib.suppress(Closed):
            while True:
                head = reader.exact(9)
                size, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
                stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                payload = reader.exact(size)
                if kind == 4 and not flags & 1:
                    for at in range(0, len(payload), 6):
                        server[int.from_bytes(payload[at : at + 2], "big")] = int.from_bytes(
                            payload[at + 2 : at + 6], "big"
                        )
                    tls.sendall(h2_frame(4, 1, 0, b""))
                elif kind == 1 and stream == 1:
                    outcome = "status " + h2_status(payload)
                    break
                elif kind == 3 and stream == 1:
                    outcome = "reset"
                    break
                elif kind == 7:
                    outcome = "goaway"
                    break
        return server, outcome


H2_ATTEMPTS = {
    "extended CONNECT": (
        [
            (":method", "CONNECT"),
            (":protocol", "websocket"),
            (":scheme", "https"),
            (":path", "/live?s={s}"),
            (":authority", "live.test"),
            ("sec-websocket-version", "13"),
        ],
        False,
    ),
    "GET with upgrade": (
        [
            (":method", "GET"),
            (":scheme", "https"),
            (":path", "/live?s={s}"),
            (":authority", "live.test"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", KEY),
            ("sec-websocket-version", "13"),
        ],
        True,
    ),
}


@pytest.mark.parametrize("attempt_", list(H2_ATTEMPTS.values()), ids=list(H2_ATTEMPTS))
def test_http2_offers_and_opens_no_websocket(
    rig: Rig, shared: Task, attempt_: tuple[list[tuple[str, str]], bool]
) -> None:
    # The same by hand for an ordinary page gets it (so the frames and HPACK here are sound).
    page = [(":method", "GET"), (":scheme", "https"), (":path", "/page")]
    _, fetched = h2_attempt(rig, shared.credential, [*page, (":authority", "live.test")], True)
    assert fetched == "status 200", fetched
    mark, socket_ = rig.live.mark(), name()
    headers = [(n, v.replace("{s}", socket_)) for n, v in attempt_[0]]
    settings, outcome = h2_attempt(rig, shared.credential, headers, attempt_[1])
    # SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441 §3) is not offered.
    assert settings.get(8, 0) == 0, settings
    assert outcome in ("reset", "goaway", "closed") or outcome.startswith("status 4"), outcome
    time.sleep(0.1)
    assert rig.live.since(mark) == []
    assert not rig.live.opened(socket_)


@contextlib.contextmanager
def plain(
    rig: Rig, credential: str | None, path: str, extra: str = ""
) -> Iterator[tuple[Answer, Client]]:
    """A handshake for `http://live.test{path}` as a plain proxy request (no tunnel)."""
    auth = f"Proxy-Authorization: {basic(credential)}\r\n" if credential else ""
    with dial(rig) as sock:
        request = handshake(path, extra=auth + extra, target=f"http://live.test{path}")
        sock.sendall(request.encode())
        reader = Reader(sock, 10)
        yield read_answer(reader), Client(sock, reader)


def test_a_plain_http_handshake_opens_only_where_the_route_allows(rig: Rig, shared: Task) -> None:
    task, mark = shared, rig.live.mark()
    good, feed, echo = name(), name(), name()
    with plain(rig, task.credential, f"/live?s={good}", "Cookie: sid=mine\r\n") as (answer, ws):
        assert answer.status == 101, answer.raw[:300]
        assert answer.header("sec-websocket-accept") == [accept_for(KEY)]
        ws.send("over plain http")
        assert ws.until_closed(timeout=3, count=1).messages == ["echo:over plain http"]
    with plain(rig, task.credential, f"/feed?s={feed}") as (refused, _):
        assert refused.status == 403, refused.raw[:300]
        assert refused.header("leash-decision"), refused.headers
    with plain(rig, None, f"/live?s={feed}") as (unauthenticated, _):
        assert unauthenticated.status == 407, unauthenticated.raw[:300]
    (seen,) = rig.live.since(mark)
    assert seen.route == "/live"
    assert [v for n, v in seen.cookies() if n == "sid"] == [task.sid], seen.cookies()
    assert "mine" not in seen.header("cookie")[0]
    assert not rig.live.opened(feed)
    # An echo of the session closes a plain socket too.
    rig.live.on_open[echo] = sends("hello", f"sid={task.sid}")
    with plain(rig, task.credential, f"/live?s={echo}") as (answer, ws):
        assert answer.status == 101, answer.raw[:300]
        got = ws.until_closed(timeout=5)
    assert (got.messages, got.code) == (["hello"], 1008), got


def test_a_high_risk_socket_waits_for_the_humans_approval_each_time(rig: Rig, task: Task) -> None:
    mark = rig.live.mark()
    first, second = name(), name()

    def human(decision: str) -> dict[str, Any]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pending = task.pending()
            if pending:
                seen_then = list(rig.live.since(mark))
                task.leash.decide(task.setup.user_key, pending[0]["id"], decision)
                return {"approval": pending[0], "seen": seen_then}
            time.sleep(0.05)
        raise AssertionError("no pending approval")

    with ThreadPoolExecutor(max_workers=1) as pool:
        asked = pool.submit(human, "approve")
        with opened(rig, task.credential, handshake(f"/watch?s={first}")) as (answer, ws):
            assert answer.status == 101, answer.raw[:300]
            ws.send("approved")
            assert ws.until_closed(timeout=3, count=1).messages == ["echo:approved"]
        approval = asked.result(10)
    assert approval["seen"] == [], "the socket opened before the human approved it"
    assert (approval["approval"]["action"], approval["approval"]["path"]) == (
        "live:watch",
        "/watch",
    )
    # The approval was for that one handshake: the next one asks again (and is denied here).
    with ThreadPoolExecutor(max_workers=1) as pool:
        asked = pool.submit(human, "deny")
        refused = attempt(rig, task.credential, handshake(f"/watch?s={second}"))
        asked.result(10)
    assert refused.status == 403, refused.raw[:300]
    assert refused.header("leash-decision"), refused.headers
    assert [r.route for r in rig.live.since(mark)] == ["/watch"]
    assert not rig.live.opened(second)


# === 3. Hostile upstreams =========================================================================


@pytest.mark.parametrize(
    "path",
    [
        "/ext",
        "/h2c",
        "/other",
        # FIXED: the accept must answer the browser's key (502 otherwise). Seen: a 101 whose
        # `Sec-WebSocket-Accept` does not answer the key is passed on as it
        # is (RFC 6455 §4.1: the client MUST fail the connection): `GET /accept` with a good
        # handshake on `odd.test` gets `101` with the app's wrong accept, and the socket is
        # relayed. (Leash forwards the browser's key and the app's accept unchanged, so it
        # never checks that what answered is a WebSocket server at all.)
        "/accept",
    ],
)
def test_a_101_with_an_extension_another_protocol_or_a_wrong_accept_is_refused(
    rig: Rig, shared: Task, path: str
) -> None:
    mark = rig.odd.mark()
    answer = attempt(rig, shared.credential, handshake(path, host="odd.test"), host="odd.test")
    assert answer.status == 502, answer.raw[:400]
    assert answer.header("leash-decision"), answer.headers
    assert b"hello" not in answer.raw
    assert shared.odd_sid.encode() not in answer.raw
    (seen,) = rig.odd.since(mark)
    assert not seen.header("sec-websocket-extensions"), seen.headers
    assert seen.done.wait(3)
    assert seen.after == b"", seen.after


def test_a_101_reflecting_the_session_is_refused(rig: Rig, shared: Task) -> None:
    mark, socket_ = rig.live.mark(), name()
    answer = attempt(rig, shared.credential, handshake(f"/live?s={socket_}&echo101=1"))
    assert answer.status == 502, answer.raw[:400]
    assert answer.header("leash-decision") == ["credential_reflected"], answer.headers
    assert shared.sid.encode() not in answer.raw
    assert [r.route for r in rig.live.since(mark)] == ["/live"]
    # The app's side is closed too.
    assert rig.live.socket(socket_).closed.wait(3)


@pytest.mark.parametrize("path", ["/rsv1", "/masked", "/opcode", "/pong"])
def test_frames_no_client_may_accept_never_carry_the_session_to_the_browser(
    rig: Rig, shared: Task, path: str
) -> None:
    """An upstream's frame Leash cannot read as a message (compressed with no extension agreed,
    masked, a reserved opcode, an unasked pong) holding the session: it never reaches the
    browser in any form."""
    sid = shared.odd_sid.encode()
    request = handshake(path, host="odd.test")
    with opened(rig, shared.credential, request, host="odd.test") as (answer, ws):
        assert answer.status == 101, answer.raw[:300]
        got = ws.until_closed(timeout=3)
    assert got.messages[:1] == ["hello"], got
    for sent in got.frames:
        assert sid not in sent.payload, sent
        assert sent.payload != deflated(b"sid=" + sid), sent
        assert sent.rsv == 0, sent
        assert not sent.masked, sent
        assert sent.opcode in (1, 2, 8, 9), sent
    assert got.ended, "the socket stayed open"


def test_an_echo_sent_with_the_101_itself_closes_the_socket(rig: Rig, shared: Task) -> None:
    """The app's first message comes in the same write as its 101: it is checked like any."""
    request = handshake("/echo", host="odd.test")
    with opened(rig, shared.credential, request, host="odd.test") as (answer, ws):
        assert answer.status == 101, answer.raw[:300]
        got = ws.until_closed(timeout=3)
    assert (got.messages, got.code) == (["hello"], 1008), got
    assert shared.odd_sid.encode() not in got.everything()
    assert reflected(shared.events(), "/echo")


def test_a_frame_declaring_more_than_the_limit_is_cut_off_at_once(rig: Rig, shared: Task) -> None:
    """A frame head that declares 2**40 (app) or 2**62 (browser) bytes: nothing of it passes,
    and the socket ends without waiting for the rest."""
    request = handshake("/huge", host="odd.test")
    started = time.monotonic()
    with opened(rig, shared.credential, request, host="odd.test") as (answer, ws):
        assert answer.status == 101, answer.raw[:300]
        got = ws.until_closed(timeout=3)
    assert got.messages == ["hello"], got
    assert got.ended, got
    assert time.monotonic() - started < 2, got
    assert shared.odd_sid.encode() not in got.everything()
    socket_ = name()
    with opened(rig, shared.credential, handshake(f"/live?s={socket_}")) as (answer, ws):
        assert answer.status == 101, answer.raw[:300]
        started = time.monotonic()
        ws.sock.sendall(b"\x82\xff" + (1 << 62).to_bytes(8, "big") + secrets.token_bytes(4))
        ws.sock.sendall(b"x" * 4096)
        got = ws.until_closed(timeout=3)
    assert got.ended, got
    assert time.monotonic() - started < 2, got
    assert got.code in (None, 1009), got
    assert rig.live.socket(socket_).received == []


# === 4. Echoes of a credential Leash sent =========================================================


def encodings(secret: str) -> dict[str, list[Sent]]:
    """Upstream messages, after `hello`, whose last one completes an echo of `secret`."""
    raw = secret.encode()
    b64 = base64.b64encode(raw).decode()
    hexed = raw.hex()
    return {
        "text": [f"your session is {secret}."],
        "binary": [b"\x00\x01" + raw + b"\xff"],
        "JSON": [json.dumps({"cookie": f"sid={secret}"})],
        "hex": [f"debug {hexed}"],
        "HEX": [hexed.upper()],
        "hex in binary": [hexed.encode()],
        "base64": [b64],
        "base64 at offset 1": [base64.b64encode(b"x" + raw).decode()],
        "base64 at offset 2": [base64.b64encode(b"xy" + raw).decode()],
        "base64url": [base64.urlsafe_b64encode(b"\xfb\xff" + raw).decode().rstrip("=")],
        "base64 in binary": [base64.b64encode(b"z" + raw)],
        "fragmented": [[f"<{secret[:9]}", f"{secret[9:20]}", f"{secret[20:]}>"]],
        "after 60 KB": ["." * 60_000 + secret],
        "split over two messages": [f"part {secret[:12]}", f"{secret[12:]} end"],
        "split over three, text and binary": [secret[:6], secret[6:18].encode(), secret[18:]],
        "one character a message": list(secret),
        "split with a pause of 1.5 s": [secret[:15], 1.5, secret[15:]],
        "split hex": [hexed[:11], hexed[11:]],
        "split base64": [b64[:9], b64[9:]],
    }


VARIANTS = list(encodings("x" * 32))


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_echo_of_the_session_closes_the_socket_with_1008_unseen(
    rig: Rig, shared: Task, variant: str
) -> None:
    task, socket_ = shared, name()
    messages = encodings(task.sid)[variant]
    before = len(reflected(task.events()))
    rig.live.on_open[socket_] = sends("hello", *messages)
    with opened(rig, task.credential, handshake(f"/live?s={socket_}")) as (answer, ws):
        assert answer.status == 101, answer.raw[:300]
        got = ws.until_closed(timeout=5)
    assert got.code == 1008, got
    assert got.messages[:1] == ["hello"], got
    sent = ["".join(m) if isinstance(m, list) else m for m in messages if not isinstance(m, float)]
    # What came is what the app sent before the message that completed the echo.
    assert got.messages[1:] == sent[: len(got.messages) - 1], got.messages[-2:]
    assert len(got.messages) <= len(sent), got.messages[-2:]
    assert task.sid.encode() not in got.everything()
    assert task.sid.encode() not in got.reason
    assert rig.live.socket(socket_).closed.wait(3), "the app's side stayed open"
    time.sleep(0.1)
    assert len(reflected(task.events())) > before, task.events()[-3:]


def control_frame(kind: str, sid: str) -> Action:
    """The app sends `sid` in a ping, an unasked pong, or the reason of its close frame."""

    async def act(ws: ServerConnection) -> None:
        if kind == "ping":
            await ws.ping(sid.encode())
        elif kind == "pong":
            await ws.pong(b"sid=" + sid.encode())
        else:
            await ws.close(1000, f"bye {sid}")

    return act


# The credentials an app echoed in a close frame's reason (left to the log's own finding).
IN_A_CLOSE_REASON: list[str] = []


@pytest.mark.parametrize(
    "kind",
    [
        "ping",
        "pong",
        # FIXED: checked as a message is. Seen: the reason of the app's close frame is never
        # checked: an app that closes
        # with `1000, "bye <the vaulted sid>"` gets that close frame relayed to the browser
        # as it is (the page reads it as `CloseEvent.reason`); no 1008, no
        # `credential_reflected` in the audit. Expected: the echo closes with 1008 and the
        # reason never reaches the browser, as for a message.
        "close reason",
    ],
)
def test_an_echo_of_the_session_in_a_control_frame_never_reaches_the_browser(
    rig: Rig, task: Task, kind: str
) -> None:
    socket_ = name()
    control = control_frame(kind, task.sid)
    if kind == "close reason":
        IN_A_CLOSE_REASON.append(task.sid)

    async def act(ws: ServerConnection) -> None:
        await ws.send("hello")
        await control(ws)
        await asyncio.sleep(0.2)
        await ws.close(1000)

    rig.live.on_open[socket_] = act
    with opened(rig, task.credential, handshake(f"/live?s={socket_}")) as (answer, ws):
        assert answer.status == 101, answer.raw[:300]
        got = ws.until_closed(timeout=3)
    assert got.messages[:1] == ["hello"], got
    assert task.sid.encode() not in got.everything(), [f for f in got.frames if f.opcode > 2]
    if kind == "close reason":  # an echo, as in a message: 1008, audited
        assert got.code == 1008, got
        time.sleep(0.1)
        assert reflected(task.events()), task.events()[-2:]


def test_an_echo_of_a_jar_cookie_or_the_rotated_session_closes_the_socket(
    rig: Rig, task: Task
) -> None:
    jar = "jar-" + secrets.token_urlsafe(16)
    rotated = "rotated-" + secrets.token_urlsafe(16)
    SECRETS.extend([jar, rotated])
    cookies = "&".join(
        "c=" + urllib.parse.quote(c) for c in (f"j={jar}; Path=/", f"sid={rotated}; Path=/")
    )
    with tunnel(rig, task.credential) as tls:
        reader = Reader(tls, 10)
        tls.sendall(f"GET /set?{cookies} HTTP/1.1\r\nHost: live.test\r\n\r\n".encode())
        assert read_answer(reader).status == 200
    for secret in (jar, rotated):
        socket_ = name()
        mark = rig.live.mark()
        rig.live.on_open[socket_] = sends(
            "hello", "seen: " + base64.b64encode(secret.encode()).decode()
        )
        with opened(rig, task.credential, handshake(f"/live?s={socket_}")) as (answer, ws):
            assert answer.status == 101, answer.raw[:300]
            got = ws.until_closed(timeout=5)
        (seen,) = rig.live.since(mark)
        assert sorted(seen.cookies()) == [("j", jar), ("sid", rotated)], seen.cookies()
        assert got.messages == ["hello"], got
        assert got.code == 1008, got


# === 5. The grant's end, and the size of messages =================================================


ENDINGS = [
    "complete",
    "revoke",
    "credential revoked",
    "expired",
    "revoke, then a message at once",
    "revoke, over plain http",
]


@pytest.mark.parametrize("ending", ENDINGS)
def test_ending_the_grant_closes_an_idle_socket_within_a_second(
    rig: Rig, make_task: Callable[..., Task], ending: str
) -> None:
    task = make_task(**({"ttl_seconds": 2} if ending == "expired" else {}))
    expires = time.monotonic() + 2  # (for "expired": the grant was made before)
    socket_ = name()
    path = f"/live?s={socket_}"
    with contextlib.ExitStack() as stack:
        if ending.endswith("plain http"):
            answer, ws = stack.enter_context(plain(rig, task.credential, path))
        else:
            answer, ws = stack.enter_context(opened(rig, task.credential, handshake(path)))
        assert answer.status == 101, answer.raw[:300]
        ws.send("before")
        assert ws.until_closed(timeout=3, count=1).messages == ["echo:before"]
        if ending == "credential revoked":
            revoked = task.leash.http.post(
                "/oauth2/revoke",
                data={"token": task.credential},
                headers={"Authorization": f"Bearer {task.setup.user_key}"},
            )
            assert revoked.status_code == 200, revoked.text
        elif ending != "expired":
            task.end(ending.split(",")[0])
        ended = expires if ending == "expired" else time.monotonic()
        if ending.endswith("at once"):
            # A message sent at once after the end never reaches the app.
            with contextlib.suppress(OSError):
                ws.send("after")
        got = ws.until_closed(timeout=5)
        took = time.monotonic() - ended
    assert got.code == 1008, got
    assert took < 1.5, took
    assert "echo:after" not in got.messages, got
    live = rig.live.socket(socket_)
    assert live.closed.wait(2), "the app's side stayed open"
    assert live.received == ["before"], live.received


def test_messages_over_gateway_body_bytes_never_pass_either_way(rig: Rig, shared: Task) -> None:
    task = shared
    # Exactly the limit passes to the app; its echo, 5 bytes over, never reaches the browser.
    at_limit, echo_over = name(), name()
    with opened(rig, task.credential, handshake(f"/live?s={at_limit}")) as (answer, ws):
        assert answer.status == 101
        ws.send(b"a" * BODY_LIMIT)
        got = ws.until_closed(timeout=5)
    assert rig.live.socket(at_limit).wait_received(1) == [b"a" * BODY_LIMIT]
    assert got.messages == [], [len(m) for m in got.messages]
    assert got.ended, got
    # One byte over, in one frame or in fragments under the limit each: never at the app.
    for parts in ([BODY_LIMIT + 1], [BODY_LIMIT // 2, BODY_LIMIT // 2, 1]):
        socket_ = name()
        with opened(rig, task.credential, handshake(f"/live?s={socket_}")) as (answer, ws):
            assert answer.status == 101
            with contextlib.suppress(OSError):
                for i, size in enumerate(parts):
                    ws.send_frame(2 if i == 0 else 0, b"b" * size, fin=i == len(parts) - 1)
                ws.send("small after")
            got = ws.until_closed(timeout=5)
        assert got.ended, got
        assert got.code in (None, 1009), got
        time.sleep(0.2)
        assert rig.live.socket(socket_).received == [], parts
    # The app's message one byte over never reaches the browser.
    rig.live.on_open[echo_over] = sends(b"c" * (BODY_LIMIT + 1), "small after")
    with opened(rig, task.credential, handshake(f"/live?s={echo_over}")) as (answer, ws):
        assert answer.status == 101
        got = ws.until_closed(timeout=5)
    assert got.messages == [], [len(m) for m in got.messages]
    assert got.ended, got


# === 6. The audit and the log =====================================================================


def test_an_apps_close_reason_never_reaches_the_debug_log(rig: Rig, task: Task) -> None:
    # FIXED: the WebSocket library's targets are never logged (as `cookie_store`). Seen: with
    # `LEASH_LOG=debug`, the reason of every close frame the app sends is written
    # to the log as it is, by the WebSocket library's own line
    # `DEBUG tungstenite::protocol: Received close frame: Some(CloseFrame { code: Normal, reason:
    # Utf8Bytes(b"bye vaulted-...") })`: here the vaulted session, which the app echoed in its
    # close reason. Expected (ATTACKS 39): no log line holds a credential Leash sent (as the
    # `cookie_store` target is never logged).
    IN_A_CLOSE_REASON.append(task.sid)
    socket_ = name()
    rig.live.on_open[socket_] = control_frame("close reason", task.sid)
    with opened(rig, task.credential, handshake(f"/live?s={socket_}")) as (answer, ws):
        assert answer.status == 101
        ws.until_closed(timeout=3)
    time.sleep(0.3)
    assert task.sid not in "".join(rig.leash.output)


def test_no_credential_in_the_audit_or_the_debug_log(rig: Rig, task: Task) -> None:
    """Run last: every socket of this module went through this server, logging at `debug`
    (but for the credentials an app echoed in a close reason: the finding above)."""
    socket_ = name()
    rig.live.on_open[socket_] = sends("hello", task.sid.encode().hex())
    with opened(rig, task.credential, handshake(f"/live?s={socket_}")) as (answer, ws):
        assert answer.status == 101
        assert ws.until_closed(timeout=5).code == 1008
    time.sleep(0.3)
    log = "".join(rig.leash.output)
    audit = rig.leash.call("GET", "/v1/audit?limit=100000", rig.leash.admin_key).text
    assert "gateway.request" in audit
    checked = {*SECRETS, basic(task.credential)[6:]} - set(IN_A_CLOSE_REASON)
    leaked = [s for s in checked if s in log or s in audit]
    assert not leaked, f"{len(leaked)} credentials in the log or the audit"
    for value in checked:
        for form in (value.encode().hex(), base64.b64encode(value.encode()).decode()[:24]):
            assert form not in log, "an encoded credential in the log"
