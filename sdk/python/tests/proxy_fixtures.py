"""What the forward proxy's tests share (API §16; tests/test_proxy_browser.py,
tests/test_proxy_tunnel_outsider.py, tests/test_proxy_outsider.py and the portal of
tests/browser_app.py):

- the OAuth names of the token exchange, the proxy's `PROXY_LINE` and its `407` challenge
  `REALM`; `exchange_form`, the token-exchange form by which an agent gets its `lpx_` proxy
  credential (or an access token); `revoke`, `pending_approvals`;
- `Proxy`: Leash's forward proxy as a test reaches it (`proxy_listening` finds its port and
  writes its CA); `proxy_toml` and `upstream_toml`, the `[proxy]` and `[[upstream]]` tables;
- upstreams of the tests' own: `make_pki` (a test CA, and a server context whose leaf it
  signed), `TLSServer`, and `RecordingUpstream` with its `RecordingHandler`, which record every
  request as an `AppRequest` (its body read by `Content-Length` or chunked);
- HTTP/1.1 by hand over raw sockets (`basic`, `connect`, `plain`, `at_proxy`, `tunnel`,
  `in_tunnel`, `read_answer` into an `Answer`; `Closed` when the peer closed before a whole
  answer came), TLS by Python's `ssl` trusting only Leash's proxy CA;
- HTTP/2 by hand (RFC 9113; HPACK literals without Huffman, RFC 7541): `h2_frame`,
  `hpack_literal`, the `:status` digits' Huffman codes (`huffman_digits`, `STATIC_STATUS`);
- real Chromium behind the proxy: `trusting_home`, a HOME whose NSS database trusts Leash's
  proxy CA, and `launch_chromium` with it."""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx
import pytest
from conftest import Leash, Setup, printed_address
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from idp_fixtures import CHROMIUM
from playwright.sync_api import Browser, sync_playwright

from leash_agent import Agent

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
GRANT_TYPE = "urn:leash:params:oauth:token-type:grant"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
PROXY_CREDENTIAL = "urn:leash:params:oauth:token-type:proxy-credential"
PROXY_LINE = "leash proxy listening on "
REALM = 'Basic realm="leash"'


# --- Leash's side -------------------------------------------------------------------------------


def exchange_form(
    agent: Agent,
    handle: str,
    *,
    token_type: str | None = PROXY_CREDENTIAL,
    scope: str | None = None,
    client_assertion: str | None = None,
    now: int | None = None,
) -> dict[str, str]:
    """The token-exchange form (API §3.1 and §16) by which `agent` trades the grant handle
    `handle` for the token `token_type` (default: the `lpx_` proxy credential; None: an access
    token), within `scope` if given, with `client_assertion` (default: a fresh one of `agent`'s
    key, made at `now`)."""
    if client_assertion is None:
        at = agent._now() if now is None else now
        client_assertion = agent._key.client_assertion(agent.agent_id, agent.issuer, at)
    form = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": handle,
        "subject_token_type": GRANT_TYPE,
        "client_assertion_type": JWT_BEARER,
        "client_assertion": client_assertion,
    }
    if token_type is not None:
        form["requested_token_type"] = token_type
    if scope is not None:
        form["scope"] = scope
    return form


def revoke(leash: Leash, token: str, key: str) -> httpx.Response:
    """`POST /oauth2/revoke` of `token`, authenticated by the bearer `key` (a human's or the
    admin's)."""
    return leash.http.post(
        "/oauth2/revoke", data={"token": token}, headers={"Authorization": f"Bearer {key}"}
    )


def pending_approvals(leash: Leash, setup: Setup) -> list[dict[str, Any]]:
    """The pending approvals of `setup`'s grant, as its human sees them."""
    answer = leash.call("GET", "/v1/approvals?status=pending", setup.user_key)
    assert answer.status_code == 200, answer.text
    return [a for a in answer.json()["approvals"] if a["grant_id"] == setup.grant_id]


@dataclass
class Proxy:
    """Leash's forward proxy as a test reaches it."""

    leash: Leash
    proxy_port: int  # on 127.0.0.1
    ca_file: Path  # Leash's proxy CA
    host: str  # the granted host `tunnel` and `in_tunnel` open unless told another

    @property
    def server(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"


def proxy_listening(leash: Leash, ca_file: Path) -> int:
    """The port of `leash`'s forward proxy (its `leash proxy listening on ADDR` line); Leash's
    proxy CA (`GET /v1/proxy/ca`) is written to `ca_file`."""
    address = printed_address(leash.output, PROXY_LINE)
    if not address:
        pytest.fail(f"no `{PROXY_LINE}ADDR` line:\n" + "".join(leash.output))
    answer = leash.http.get("/v1/proxy/ca")
    assert answer.status_code == 200, answer.text
    ca_file.write_text(answer.text)
    return int(address.rsplit(":", 1)[1])


def proxy_toml(approval_wait: int) -> str:
    """The `[proxy]` table: a listener on a free port of 127.0.0.1."""
    return f'[proxy]\nlisten = "127.0.0.1:0"\napproval_wait = {approval_wait}\n'


def upstream_toml(
    name: str,
    url: str,
    hosts: list[str],
    routes: Sequence[tuple[str, str, str]],
    ca_file: Path | None = None,
    high_risk: Collection[str] = (),
) -> str:
    """An `[[upstream]]` table: `name` at `url` (trusting only `ca_file`, if given), `hosts` the
    names a browser reaches it by, a route per (method, path, action), each action `name:action`
    and `risk = "high"` for those in `high_risk`."""
    text = f"[[upstream]]\nname = {json.dumps(name)}\nurl = {json.dumps(url)}\n"
    if ca_file is not None:
        text += f"ca_file = {json.dumps(str(ca_file))}\n"
    text += f"hosts = {json.dumps(hosts)}\n"
    for method, path, action in routes:
        text += f'[[upstream.route]]\nmethod = "{method}"\npath = "{path}"\n'
        text += f'action = "{name}:{action}"\n'
        if action in high_risk:
            text += 'risk = "high"\n'
    return text


# --- upstreams of the tests' own ------------------------------------------------------------------


@dataclass(frozen=True)
class AppRequest:
    """A request as the app received it. `headers` are (name in lower case, value) in order."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> list[str]:
        """Every value of the header `name` (case-insensitive)."""
        return [value for key, value in self.headers if key == name.lower()]

    def cookies(self) -> list[tuple[str, str]]:
        """The (name, value) pairs of every `Cookie` header, in order."""
        return parse_cookies(self.header("cookie"))


def parse_cookies(headers: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for header in headers:
        for part in header.split(";"):
            name, _, value = part.strip().partition("=")
            if name:
                pairs.append((name, value))
    return pairs


def _key_usage(ca: bool) -> x509.KeyUsage:
    """A CA's key signs certificates (and CRLs), a leaf's signs handshakes."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def make_pki(
    directory: Path, addresses: Sequence[str] = ("127.0.0.1",), name: str = "Upstream test CA"
) -> tuple[Path, ssl.SSLContext]:
    """A test CA named `name` (`ca.pem` in `directory`, what Leash is given as `ca_file`, and the
    only certificate that trusts the leaf) and a server context (HTTP/1.1 by ALPN) whose leaf it
    signed for `localhost` and `addresses` (the leaf in `leaf.pem`, its key `leaf-key.pem`)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, leaf_file, key_file = (directory / n for n in ("ca.pem", "leaf.pem", "leaf-key.pem"))
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    leaf_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(leaf_file, key_file)
    context.set_alpn_protocols(["http/1.1"])
    return ca_file, context


class TLSServer(ThreadingHTTPServer):
    """A threaded HTTP server on `address` whose connections are TLS, each handshake done in the
    connection's own thread (a client that stalls there holds up no other)."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(
        self,
        handler: type[BaseHTTPRequestHandler],
        context: ssl.SSLContext,
        address: str = "127.0.0.1",
    ) -> None:
        self.context = context
        super().__init__((address, 0), handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(10)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        try:
            super().finish_request(tls, client_address)
        except OSError:
            pass
        finally:
            tls.close()


class RecordingHandler(BaseHTTPRequestHandler):
    """The handler of a `RecordingUpstream` (`upstream`): HTTP/1.1 with keep-alive, no log
    lines; `record()` reads the request's body and records the request."""

    protocol_version = "HTTP/1.1"
    upstream: RecordingUpstream

    def log_message(self, *_: Any) -> None:
        pass

    def read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def record(self) -> AppRequest:
        body = self.read_body()
        request = AppRequest(
            self.command,
            self.path,
            tuple((name.lower(), value) for name, value in self.headers.items()),
            body,
        )
        self.upstream.add(request)
        return request


Recorded = TypeVar("Recorded")


class Recorder(Generic[Recorded]):
    """What an app records, in order: `add`, `requests()`, and `mark()` and `since(mark)` for
    those after a point. Thread-safe (`lock`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.recorded: list[Recorded] = []

    def add(self, request: Recorded) -> None:
        with self.lock:
            self.recorded.append(request)

    def requests(self) -> list[Recorded]:
        with self.lock:
            return list(self.recorded)

    def mark(self) -> int:
        with self.lock:
            return len(self.recorded)

    def since(self, mark: int) -> list[Recorded]:
        with self.lock:
            return self.recorded[mark:]


class RecordingUpstream(Recorder[AppRequest]):
    """An app on `address` (HTTPS with `context`, or plain HTTP), serving until `stop`, that
    records every request it receives: `requests()`, and `mark()` and `since(mark)` for those
    after a point. Thread-safe. A subclass answers through the `RecordingHandler` subclass its
    `handler()` makes."""

    def __init__(self, context: ssl.SSLContext | None, address: str = "127.0.0.1") -> None:
        super().__init__()
        handler = self.handler()
        self.server: ThreadingHTTPServer
        if context is not None:
            self.server = TLSServer(handler, context, address)
        else:
            self.server = ThreadingHTTPServer((address, 0), handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def handler(self) -> type[RecordingHandler]:
        raise NotImplementedError

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- HTTP/1.1 by hand -----------------------------------------------------------------------------


def basic(credential: str, user: str = "leash") -> str:
    return "Basic " + base64.b64encode(f"{user}:{credential}".encode()).decode()


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]  # names in lower case, in order
    body: bytes
    raw: bytes = b""

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]


class Closed(Exception):
    """The peer closed (or reset, or went silent) before a whole answer came."""


class Reader:
    """Buffered reads from a socket (plain or TLS)."""

    def __init__(self, sock: socket.socket | ssl.SSLSocket, timeout: float) -> None:
        self.sock = sock
        self.buffer = b""
        sock.settimeout(timeout)

    def fill(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except (OSError, ssl.SSLError):
            return False
        self.buffer += chunk
        return bool(chunk)

    def until(self, mark: bytes) -> bytes:
        while mark not in self.buffer:
            if not self.fill():
                raise Closed(f"closed before {mark!r}: {self.buffer[:300]!r}")
        got, self.buffer = self.buffer.split(mark, 1)
        return got

    def exact(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self.fill():
                break
        got, self.buffer = self.buffer[:size], self.buffer[size:]
        return got

    def rest(self) -> bytes:
        while self.fill():
            pass
        got, self.buffer = self.buffer, b""
        return got


def read_answer(
    sock: socket.socket | ssl.SSLSocket,
    timeout: float = 10,
    head_only: bool = False,
    reader: Reader | None = None,
) -> Answer:
    """One HTTP/1.1 answer, after any 1xx but 101 (those are kept in `raw`): its body by
    `Content-Length`, by chunks (trailers kept in `raw`), or up to the close; none with
    `head_only` (a CONNECT's 2xx) or for 101/204/304."""
    reader = reader or Reader(sock, timeout)
    raw = b""
    while True:
        head = reader.until(b"\r\n\r\n")
        raw += head + b"\r\n\r\n"
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), value.strip()))
        if not (100 <= status < 200 and status != 101):
            break
    answer = Answer(status, headers, b"", raw)
    if (head_only and 200 <= status < 300) or status in (101, 204, 304):
        return answer
    length = answer.header("content-length")
    if any("chunked" in v.lower() for v in answer.header("transfer-encoding")):
        body = b""
        with contextlib.suppress(Closed):
            while True:
                size_line = reader.until(b"\r\n")
                raw += size_line + b"\r\n"
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while trailer := reader.until(b"\r\n"):  # up to an empty line
                        raw += trailer + b"\r\n"
                    raw += b"\r\n"
                    break
                chunk = reader.exact(size + 2)
                raw += chunk
                body += chunk[:size]
        answer.body = body
        answer.raw = raw
    elif length:
        answer.body = reader.exact(int(length[0]))
        answer.raw = raw + answer.body
    else:
        answer.body = reader.rest()
        answer.raw = raw + answer.body
    return answer


def dial(proxy: Proxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.proxy_port), timeout=10)


def connect_request(target: str, authorization: str | None, host: str | None = None) -> bytes:
    auth = f"Proxy-Authorization: {authorization}\r\n" if authorization is not None else ""
    return f"CONNECT {target} HTTP/1.1\r\nHost: {host or target}\r\n{auth}\r\n".encode()


def at_proxy(proxy: Proxy, request: bytes, timeout: float = 10) -> Answer:
    """`request` (raw bytes) sent to the proxy on a connection of its own; its first answer."""
    with dial(proxy) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(request)
        return read_answer(sock, timeout, head_only=request.startswith(b"CONNECT "))


def connect(proxy: Proxy, target: str, authorization: str | None) -> Answer:
    """`CONNECT target` with `authorization` as the `Proxy-Authorization`; its answer."""
    return at_proxy(proxy, connect_request(target, authorization))


def plain(proxy: Proxy, url: str, authorization: str | None, extra: str = "") -> Answer:
    """A plain-HTTP proxy request for the absolute-form `url`."""
    host = url.split("/")[2]
    auth = f"Proxy-Authorization: {authorization}\r\n" if authorization is not None else ""
    request = f"GET {url} HTTP/1.1\r\nHost: {host}\r\n{auth}{extra}Connection: close\r\n\r\n"
    return at_proxy(proxy, request.encode())


def tls_client(proxy: Proxy, alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLContext:
    """A TLS client that trusts only Leash's proxy CA."""
    context = ssl.create_default_context(cafile=str(proxy.ca_file))
    context.set_alpn_protocols(list(alpn))
    return context


@contextlib.contextmanager
def tunnel(
    proxy: Proxy,
    credential: str,
    host: str | None = None,
    sni: str | None = "",
    alpn: tuple[str, ...] = ("http/1.1",),
    target: str | None = None,
) -> Iterator[ssl.SSLSocket]:
    """A TLS connection inside `CONNECT target` (default `host:443`; `host` defaults to
    `proxy.host`) with SNI `sni` (default `host`; None: none), trusting only Leash's proxy CA
    for `host`."""
    host = proxy.host if host is None else host
    sock = dial(proxy)
    try:
        sock.sendall(connect_request(target or f"{host}:443", basic(credential)))
        opened = read_answer(sock, head_only=True)
        assert opened.status == 200, (opened.status, opened.raw[:300])
        context = tls_client(proxy, alpn)
        if sni is None or (sni and sni != host):
            context.check_hostname = False
        name = host if sni == "" else sni
        with context.wrap_socket(sock, server_hostname=name) as tls:
            yield tls
    finally:
        sock.close()


def in_tunnel(
    proxy: Proxy, credential: str, request: bytes | str, host: str | None = None, **options: Any
) -> Answer:
    """`request` in a tunnel of its own (to `host`, default `proxy.host`); its first answer. A
    tunnel closed without an answer raises `Closed`."""
    data = request.encode() if isinstance(request, str) else request
    with tunnel(proxy, credential, host, **options) as tls:
        with contextlib.suppress(OSError):  # cut off while sending: its answer may have come
            tls.sendall(data)
        return read_answer(tls)


# --- HTTP/2 by hand (RFC 9113; HPACK literals without Huffman, RFC 7541) --------------------------

# HPACK's Huffman codes of the characters a `:status` value holds (RFC 7541 Appendix B).
DIGIT_CODES = {
    "00000": "0",
    "00001": "1",
    "00010": "2",
    "011001": "3",
    "011010": "4",
    "011011": "5",
    "011100": "6",
    "011101": "7",
    "011110": "8",
    "011111": "9",
}
# The static table's `:status` entries (RFC 7541 Appendix A).
STATIC_STATUS = {8: "200", 9: "204", 10: "206", 11: "304", 12: "400", 13: "404", 14: "500"}


def h2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload
    )


def hpack_int(value: int, prefix: int, first: int = 0) -> bytes:
    """RFC 7541 §5.1."""
    top = (1 << prefix) - 1
    if value < top:
        return bytes([first | value])
    out = bytearray([first | top])
    value -= top
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def hpack_literal(name: bytes, value: bytes) -> bytes:
    """A literal header field without indexing, new name, no Huffman (RFC 7541 §6.2.2)."""
    return b"\x00" + hpack_int(len(name), 7) + name + hpack_int(len(value), 7) + value


def huffman_digits(value: bytes) -> str:
    """A Huffman-coded string of digits (a `:status` value), decoded."""
    out, code = "", ""
    for bit in "".join(f"{b:08b}" for b in value):
        code += bit
        if code in DIGIT_CODES:
            out, code = out + DIGIT_CODES[code], ""
    return out


# --- real Chromium --------------------------------------------------------------------------------


def trusting_home(tmp_path_factory: pytest.TempPathFactory, ca_file: Path) -> Path:
    """A HOME whose NSS database (the one chromium reads on Linux) trusts `ca_file` (Leash's
    proxy CA) to identify web sites, and nothing else of ours."""
    if shutil.which("certutil") is None:
        pytest.fail("certutil is missing: install Debian's libnss3-tools")
    home = tmp_path_factory.mktemp("browser-home")
    (home / ".pki" / "nssdb").mkdir(parents=True)
    db = f"sql:{home}/.pki/nssdb"
    subprocess.run(["certutil", "-d", db, "-N", "--empty-password"], check=True)
    subprocess.run(
        ["certutil", "-d", db, "-A", "-t", "C,,", "-n", "leash", "-i", str(ca_file)],
        check=True,
    )
    return home


@contextlib.contextmanager
def launch_chromium(home: Path) -> Iterator[Browser]:
    """Headless chromium with `home` as its HOME (so its NSS database), closed on leaving."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium, or set LEASH_CHROMIUM")
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=args,
            env={**os.environ, "HOME": str(home)},
        )
        yield browser
        browser.close()
