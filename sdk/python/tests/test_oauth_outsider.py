"""An outsider's attacks on Leash's upstream credentials (API §17: OAuth connections and
delegation tokens; §6, §9, §13; ATTACKS 39, 43, 59, 60), beyond test_oauth_connect.py and
test_delegation.py.

Most tests run the real `leash` binary against `HostileAs`, an OAuth authorization server of
this file's own that plays its part badly on purpose (odd token responses, slow or hanging
endpoints, 5xx storms, echoes) and records everything it issued, was asked and revoked, so that
the tests can look for each token it issued wherever Leash could leak it. The same server also
serves the upstream's API under `/api/` (it accepts the access tokens it issued and can echo the
`Authorization` it got). Humans log in to Leash at the real test IdP (npm oidc-provider).

Each test is one attack and asserts the secure behaviour. The review found 13 holes, each now
fixed and its test marked `# FIXED:` (a finding of the review): tokens left live at the
server (reconnect, a static secret over a connection, a refresh that loses the race with
DELETE), two cluster nodes refreshing with one refresh token (the lease shorter than a refresh
with discovery), a dead connection spending the grant and audited `allow`, the human's vaulted
secret sent to a delegation-token MCP server with elicitation answers, a refresh token echoed
by the server into the audit and the log, unsendable or unbounded token responses stored,
non-web discovered endpoints answered as `authorization_url`, a DELETE and a request held by a
slow server, and a duplicated callback parameter answered as text."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import jwt
import pytest
from conftest import Leash, set_up
from idp_fixtures import DEFAULT_AUDIENCE, Idp
from login_helpers import SECRET_ENV, MakeLeash, agent_for, log_in, oidc_section, origin
from mcp_fixtures import CrmServer
from test_mcp import ask_new_email, pending_elicitation
from test_oauth_connect import events

from leash_agent import Agent, LeashError

AS_SECRET_ENV = "LEASH_TEST_UPSTREAM_AS_SECRET"
PROXY_KEY = secrets.token_hex(32)
BOOKS = "https://books.example"
LEDGER = "https://ledger.example"

# (status, headers, body) of a hostile answer.
Answer = tuple[int, dict[str, str], bytes]


def as_json(body: Any, status: int = 200) -> Answer:
    return status, {"Content-Type": "application/json"}, json.dumps(body).encode()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --- the hostile authorization server (and the upstream's API) ---------------------------------


@dataclass
class HostileAs:
    """An OAuth authorization server (RFC 8414 metadata, `/authorize` without any login,
    `/token` with PKCE S256 and client_secret_basic, `/revoke`) and the upstream's API under
    `/api/`. Its knobs (set by a test) decide how badly it behaves; it records what it issued,
    every token request, revocation and API request. Thread-safe."""

    issuer: str = ""
    client_id: str = "leash"
    client_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Knobs.
    ttl: int | None = 3600
    rotate: bool = True
    names_itself: bool = True
    metadata_issuer: str | None = None  # what discovery names (default: `issuer`)
    metadata_changes: dict[str, Any] = field(default_factory=dict)
    iss: str | None = None  # the `iss` /authorize sends back (default: `issuer`)
    omit_iss: bool = False
    discovery_delay: float = 0.0
    code_delay: float = 0.0
    refresh_delay: float = 0.0
    revocation_delay: float = 0.0
    revocation_status: int = 200
    code_answer: Callable[[], Answer] | None = None
    refresh_answer: Callable[[str], Answer] | None = None
    # What it issued and saw.
    codes: dict[str, tuple[str, str]] = field(default_factory=dict)
    live_access: set[str] = field(default_factory=set)
    live_refresh: set[str] = field(default_factory=set)
    issued: list[str] = field(default_factory=list)
    verifiers: list[str] = field(default_factory=list)
    authorize_requests: list[dict[str, str]] = field(default_factory=list)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    revocations: list[dict[str, str]] = field(default_factory=list)
    api_requests: list[tuple[str, str | None]] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)

    def metadata(self) -> dict[str, Any]:
        return {
            "issuer": self.metadata_issuer or self.issuer,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "revocation_endpoint": f"{self.issuer}/revoke",
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic"],
            "scopes_supported": ["notes.read"],
            "authorization_response_iss_parameter_supported": self.names_itself,
            **self.metadata_changes,
        }

    def grants(self, kind: str) -> list[dict[str, str]]:
        with self.lock:
            return [r for r in self.token_requests if r.get("grant_type") == kind]

    def secrets_issued(self) -> dict[str, str]:
        """Every secret this server shares with Leash: tokens, codes, PKCE verifiers, Leash's
        client secret."""
        with self.lock:
            found = {f"token {i}": t for i, t in enumerate(self.issued)}
            found.update({f"code {i}": c for i, c in enumerate(self.codes)})
            found.update({f"verifier {i}": v for i, v in enumerate(self.verifiers)})
        found["client secret"] = self.client_secret
        return found

    def new_tokens(self, refresh: bool) -> dict[str, Any]:
        access = secrets.token_urlsafe(32)
        answer: dict[str, Any] = {"access_token": access, "token_type": "Bearer"}
        if self.ttl is not None:
            answer["expires_in"] = self.ttl
        self.live_access.add(access)
        self.issued.append(access)
        if refresh:
            token = secrets.token_urlsafe(32)
            answer["refresh_token"] = token
            self.live_refresh.add(token)
            self.issued.append(token)
        return answer

    def authorize(self, query: dict[str, str]) -> str:
        code = secrets.token_urlsafe(24)
        with self.lock:
            self.authorize_requests.append(query)
            self.codes[code] = (query.get("code_challenge", ""), query.get("redirect_uri", ""))
        back = {"code": code, "state": query.get("state", "")}
        if not self.omit_iss:
            back["iss"] = self.iss or self.issuer
        return f"{query['redirect_uri']}?{urlencode(back)}"

    def client_ok(self, authorization: str | None) -> bool:
        if not authorization or not authorization.lower().startswith("basic "):
            return False
        user, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
        return (user, password) == (self.client_id, self.client_secret)

    def token(self, form: dict[str, str], authorization: str | None) -> Answer:
        with self.lock:
            self.token_requests.append({**form, "at": str(time.monotonic())})
            if "code_verifier" in form:
                self.verifiers.append(form["code_verifier"])
        if not self.client_ok(authorization):
            return as_json({"error": "invalid_client"}, 401)
        if form.get("grant_type") == "authorization_code":
            return self.code_grant(form)
        if form.get("grant_type") == "refresh_token":
            return self.refresh_grant(form.get("refresh_token", ""))
        return as_json({"error": "unsupported_grant_type"}, 400)

    def code_grant(self, form: dict[str, str]) -> Answer:
        with self.lock:
            challenge, redirect_uri = self.codes.pop(form.get("code", ""), ("", ""))
        verifier = form.get("code_verifier", "")
        expected = b64url(hashlib.sha256(verifier.encode()).digest())
        if not challenge or challenge != expected or redirect_uri != form.get("redirect_uri"):
            return as_json({"error": "invalid_grant"}, 400)
        time.sleep(self.code_delay)
        if self.code_answer is not None:
            return self.code_answer()
        with self.lock:
            return as_json(self.new_tokens(refresh=True))

    def refresh_grant(self, presented: str) -> Answer:
        # Processed (and rotated) at once; the answer may be slow to come, but for a refusal
        # of a refresh token that is not (or no longer) live.
        with self.lock:
            if self.refresh_answer is None:
                if presented not in self.live_refresh:
                    return as_json({"error": "invalid_grant"}, 400)
                else:
                    if self.rotate:
                        self.live_refresh.discard(presented)
                    fresh = self.new_tokens(refresh=self.rotate)
                    answer = as_json(fresh)
            else:
                answer = self.refresh_answer(presented)
        time.sleep(self.refresh_delay)
        return answer

    def revoke(self, form: dict[str, str], authorization: str | None) -> Answer:
        with self.lock:
            self.revocations.append(form)
        time.sleep(self.revocation_delay)
        if not self.client_ok(authorization):
            return as_json({"error": "invalid_client"}, 401)
        with self.lock:
            self.live_access.discard(form.get("token", ""))
            self.live_refresh.discard(form.get("token", ""))
        return self.revocation_status, {}, b""

    def api(self, path: str, authorization: str | None) -> Answer:
        with self.lock:
            self.api_requests.append((path, authorization))
        token = (authorization or "").removeprefix("Bearer ")
        if path.startswith("/api/echo-header/"):
            return 200, {"X-Echo": authorization or "", "Content-Type": "text/plain"}, b"ok"
        if path.startswith("/api/echo-body/"):
            return as_json({"you_sent": authorization, "path": path})
        if path.startswith("/api/notes/"):
            with self.lock:
                live = token in self.live_access
            return as_json({"path": path}) if live else as_json({"error": "invalid_token"}, 401)
        return as_json({"path": path})

    def api_tokens(self, prefix: str) -> list[str | None]:
        with self.lock:
            return [a for p, a in self.api_requests if p.startswith(prefix)]


def start_hostile_as() -> tuple[HostileAs, ThreadingHTTPServer]:
    server_as = HostileAs()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: Any) -> None:
            pass

        def send(self, answer: Answer) -> None:
            status, headers, body = answer
            try:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def form(self) -> dict[str, str]:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode() if length else ""
            return {name: values[0] for name, values in parse_qs(body).items()}

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = {name: values[0] for name, values in parse_qs(url.query).items()}
            if url.path == "/.well-known/oauth-authorization-server":
                time.sleep(server_as.discovery_delay)
                self.send(as_json(server_as.metadata()))
            elif url.path == "/authorize" and "redirect_uri" in query:
                self.send((302, {"Location": server_as.authorize(query)}, b""))
            elif url.path.startswith("/api/"):
                self.send(server_as.api(url.path, self.headers.get("Authorization")))
            elif url.path.startswith("/elsewhere"):
                self.record_elsewhere()
            else:
                self.send(as_json({"error": "not_found"}, 404))

        def record_elsewhere(self) -> None:
            with server_as.lock:
                server_as.elsewhere.append(f"{self.command} {self.path} {dict(self.headers)}")
            self.send(as_json({"error": "nothing here"}, 404))

        def do_POST(self) -> None:
            path = urlsplit(self.path).path
            authorization = self.headers.get("Authorization")
            if path == "/token":
                self.send(server_as.token(self.form(), authorization))
            elif path == "/revoke":
                self.send(server_as.revoke(self.form(), authorization))
            elif path.startswith("/elsewhere"):
                self.form()
                self.record_elsewhere()
            else:
                self.send(server_as.api(path, authorization))

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128

    server = Server(("127.0.0.1", 0), Handler)
    server_as.issuer = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server_as, server


@pytest.fixture
def hostile_as() -> Iterator[HostileAs]:
    server_as, server = start_hostile_as()
    yield server_as
    server.shutdown()
    server.server_close()


def notes_on(server_as: HostileAs, name: str = "notes") -> str:
    """An upstream `name` whose accounts are reached through `server_as`, and whose API it is."""
    return f"""
[[upstream]]
name = "{name}"
url = "{server_as.issuer}/api"
route = [
  {{ method = "GET", path = "/notes/**", action = "{name}:read" }},
  {{ method = "GET", path = "/echo-header/**", action = "{name}:read" }},
  {{ method = "GET", path = "/echo-body/**", action = "{name}:read" }},
]

[upstream.oauth]
issuer = "{server_as.issuer}"
client_id = "leash"
client_secret_env = "{AS_SECRET_ENV}"
scopes = ["notes.read"]
"""


def books_on(url: str) -> str:
    """Two upstreams that get delegation tokens, served by `url`."""
    return f"""
[[upstream]]
name = "books"
url = "{url}"
inject = {{ kind = "leash_token", audience = "{BOOKS}" }}
route = [
  {{ method = "GET", path = "/books/**", action = "books:read" }},
  {{ method = "GET", path = "/echo-header/**", action = "books:read" }},
  {{ method = "GET", path = "/echo-body/**", action = "books:read" }},
]

[[upstream]]
name = "ledger"
url = "{url}"
inject = {{ kind = "leash_token", audience = "{LEDGER}" }}
route = [{{ method = "GET", path = "/ledger/**", action = "ledger:read" }}]
"""


def leash_with(
    make_leash: MakeLeash,
    idp: Idp,
    server_as: HostileAs,
    top: str = "",
    env: dict[str, str] | None = None,
    limits: str | None = None,
) -> Leash:
    config = f"{top}\n{notes_on(server_as)}\n{oidc_section(idp.issuer)}"
    environment = {SECRET_ENV: idp.client_secret, AS_SECRET_ENV: server_as.client_secret}
    environment.update(env or {})
    leash = (
        make_leash(config, environment)
        if limits is None
        else make_leash(config, environment, limits)
    )
    idp.set_redirect_uri(f"{leash.url}/auth/callback")
    return leash


@pytest.fixture
def as_leash(make_leash: MakeLeash, idp: Idp, hostile_as: HostileAs) -> Leash:
    return leash_with(make_leash, idp, hostile_as)


def fresh(leash: Leash, cookies: httpx.Cookies | None = None) -> httpx.Client:
    """A client that never reuses a connection (Leash may close one after a refusal)."""
    client = httpx.Client(
        base_url=leash.url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)
    )
    if cookies is not None:
        client.cookies = cookies
    return client


def human(leash: Leash, idp: Idp, username: str = "alice") -> httpx.Client:
    logged_in = log_in(leash, idp, username)
    client = fresh(leash, logged_in.cookies)
    logged_in.close()
    return client


def callback_url(leash: Leash, client: httpx.Client) -> str:
    """Starts a connection to `notes` and consents at the hostile server (no login there): the
    callback URL it sends the browser back to, not followed."""
    started = client.post("/v1/vault/notes/connect", headers=origin(leash))
    assert started.status_code == 200, started.text
    back = httpx.get(started.json()["authorization_url"], follow_redirects=False)
    assert back.status_code == 302, back.text
    location: str = back.headers["location"]
    return location


def connect(leash: Leash, client: httpx.Client) -> httpx.Response:
    """A whole connection: the callback's answer."""
    return client.get(callback_url(leash, client))


def connected(leash: Leash, client: httpx.Client) -> None:
    done = connect(leash, client)
    assert done.status_code == 303, done.text


def notes_entry(client: httpx.Client) -> dict[str, Any] | None:
    listed = client.get("/v1/vault")
    assert listed.status_code == 200, listed.text
    for entry in listed.json()["credentials"]:
        if entry["upstream"] == "notes":
            found: dict[str, Any] = entry
            return found
    return None


def assert_active(client: httpx.Client) -> None:
    """The human's connection is there and `active` (no reconnect asked)."""
    entry = notes_entry(client)
    assert entry is not None
    assert entry["status"] == "active"


def gateway_of(leash: Leash, idp: Idp, username: str = "alice") -> httpx.Client:
    """The human calling the gateway directly with an IdP access token (API §6 direct mode)."""
    token = idp.access_token(username, DEFAULT_AUDIENCE)
    client = fresh(leash)
    client.headers["Authorization"] = f"Bearer {token}"
    return client


def alive(leash: Leash) -> None:
    assert leash.process.poll() is None, "".join(leash.output[-40:])
    assert leash.http.get("/healthz").status_code == 200


def leaks(leash: Leash, found: dict[str, str], *texts: str) -> list[str]:
    """Where the secrets in `found` appear (`<name> in <place>`) in Leash's log, its audit
    trail, or `texts` (answers)."""
    audit = leash.call("GET", "/v1/audit", leash.admin_key)
    assert audit.status_code == 200
    places = {"log": "".join(leash.output), "audit": audit.text, "answers": "".join(texts)}
    return [
        f"{name} in {place}"
        for name, value in found.items()
        for place, text in places.items()
        if value and value in text
    ]


def wait_past(seconds: float) -> None:
    time.sleep(seconds)


# --- connect and callback: CSRF, session binding, odd requests ----------------------------------


def test_connect_and_delete_with_a_session_cookie_need_leashs_own_origin(
    as_leash: Leash, idp: Idp, hostile_as: HostileAs
) -> None:
    """A page of another site makes the human's browser start a connection (rows, a consent
    page the attacker chose the moment of) or delete one: `403 csrf` without Leash's Origin."""
    alice = human(as_leash, idp)
    for headers in ({}, {"Origin": "https://evil.example"}, {"Origin": "null"}):
        started = alice.post("/v1/vault/notes/connect", headers=headers)
        assert started.status_code == 403, started.text
        assert started.json()["error"] == "csrf"
    connected(as_leash, alice)
    deleted = alice.delete("/v1/vault/notes")
    assert deleted.status_code == 403
    assert notes_entry(alice) is not None
    assert hostile_as.revocations == []


def test_connect_and_callback_of_unknown_or_disguised_upstreams_are_4xx(
    as_leash: Leash, idp: Idp
) -> None:
    alice = human(as_leash, idp)
    state = dict(httpx.URL(callback_url(as_leash, alice)).params)["state"]
    for name in (
        "nope",
        "NOTES",
        "notes%2F..%2Fmail",
        "notes%00",
        "notes%20",
        "..%2Fnotes",
        "%6Eotes",
        "n" * 4000,
    ):
        started = alice.post(f"/v1/vault/{name}/connect", headers=origin(as_leash))
        back = alice.get(f"/v1/vault/{name}/callback?state={state}&code=x")
        for answer in (started, back):
            if name == "%6Eotes" and answer is started:
                # Percent-decoded to `notes`: the same upstream, a real start.
                assert answer.status_code == 200
                continue
            assert 400 <= answer.status_code < 500, (name, answer.status_code, answer.text)
            assert "error" in answer.json()
    # An upstream with no [upstream.oauth] cannot be connected.
    mail = alice.post("/v1/vault/mail/connect", headers=origin(as_leash))
    assert mail.status_code == 400
    assert notes_entry(alice) is None
    alive(as_leash)


def test_only_a_logged_in_human_may_start_a_connection(
    as_leash: Leash, idp: Idp, tmp_path: Path
) -> None:
    nobody = fresh(as_leash).post("/v1/vault/notes/connect")
    assert nobody.status_code == 401
    admin = as_leash.call("POST", "/v1/vault/notes/connect", as_leash.admin_key)
    assert admin.status_code == 403
    # An agent, with its own token as Bearer or as DPoP with a proof.
    alice = human(as_leash, idp)
    agent_id, key_file = agent_for(as_leash, tmp_path)
    grant = alice.post(
        "/v1/grants",
        json={
            "agent": agent_id,
            "purpose": "read",
            "upstreams": ["notes"],
            "actions": ["notes:read"],
            "ttl_seconds": 600,
        },
        headers=origin(as_leash),
    )
    assert grant.status_code == 201, grant.text
    with Agent.from_jwk_file(as_leash.url, agent_id, key_file) as agent:
        task = agent.task(grant.json()["handle"])
        url = f"{as_leash.url}/v1/vault/notes/connect"
        as_dpop = httpx.post(url, auth=task.auth)
        token = task._usable_token().value
        as_bearer = httpx.post(url, headers={"Authorization": f"Bearer {token}"})
    assert as_dpop.status_code in (401, 403), as_dpop.text
    assert as_bearer.status_code in (401, 403), as_bearer.text
    assert "authorization_url" not in as_dpop.text + as_bearer.text


def test_connecting_needs_human_login(make_leash: MakeLeash, hostile_as: HostileAs) -> None:
    """Without [oidc] the callback could not be tied to a browser session: no connection."""
    leash = make_leash(notes_on(hostile_as), {AS_SECRET_ENV: hostile_as.client_secret})
    key = leash.add_user("alice")
    started = leash.call("POST", "/v1/vault/notes/connect", key)
    assert started.status_code == 400
    assert hostile_as.authorize_requests == []


def test_starting_connections_without_end_is_rate_limited(
    make_leash: MakeLeash, idp: Idp, hostile_as: HostileAs
) -> None:
    """Each start stores a row until it expires: one human cannot make them without end."""
    leash = leash_with(
        make_leash, idp, hostile_as, limits="[limits]\ntoken_rate = 0\ngateway_rate = 0\n"
    )
    alice = human(leash, idp)
    statuses = [
        alice.post("/v1/vault/notes/connect", headers=origin(leash)).status_code for _ in range(80)
    ]
    assert set(statuses) <= {200, 429}
    assert 429 in statuses
    refused = alice.post("/v1/vault/notes/connect", headers=origin(leash))
    if refused.status_code == 429:
        assert refused.json()["error"]
        assert "retry-after" in refused.headers


def test_the_authorization_request_has_pkce_s256_a_strong_state_and_leashs_callback(
    as_leash: Leash, idp: Idp, hostile_as: HostileAs
) -> None:
    alice = human(as_leash, idp)
    urls = [
        alice.post("/v1/vault/notes/connect", headers=origin(as_leash)).json()["authorization_url"]
        for _ in range(2)
    ]
    queries = [{k: v[0] for k, v in parse_qs(urlsplit(u).query).items()} for u in urls]
    for query in queries:
        assert query["response_type"] == "code"
        assert query["code_challenge_method"] == "S256"
        assert len(query["code_challenge"]) == 43
        assert len(query["state"]) >= 22
        assert query["redirect_uri"] == f"{as_leash.url}/v1/vault/notes/callback"
        assert query["client_id"] == "leash"
        assert query["scope"] == "notes.read"
        assert hostile_as.client_secret not in urls[0]
    assert queries[0]["state"] != queries[1]["state"]
    assert queries[0]["code_challenge"] != queries[1]["code_challenge"]


def test_a_callback_error_with_markup_is_an_inert_json_refusal_that_ends_the_connection(
    as_leash: Leash, idp: Idp
) -> None:
    alice = human(as_leash, idp)
    callback = callback_url(as_leash, alice)
    state = dict(httpx.URL(callback).params)["state"]
    refused = alice.get(
        "/v1/vault/notes/callback",
        params={
            "state": state,
            "error": "<script>parent.__pwned=1</script>",
            "error_description": "<img src=x onerror=alert(1)>",
            "iss": dict(httpx.URL(callback).params)["iss"],
        },
    )
    assert refused.status_code == 400
    assert refused.headers["content-type"].startswith("application/json")
    assert "html" not in refused.headers["content-type"]
    assert refused.json()["error"] == "invalid_request"
    # The connection is over: its genuine answer completes nothing now.
    assert alice.get(callback).status_code == 400
    assert notes_entry(alice) is None


# FIXED: a callback with a parameter twice (`state`, `code` or `iss`) is refused by the web
# framework's query extractor before Leash's handler runs: `400` with a `text/plain` body
# ("Failed to deserialize query string: duplicate field `state`") and no `Leash-Decision`, where
# API §0 wants every error as JSON `{"error", "error_description"}`. Nothing is stored (safe),
# but the error is not Leash's.
def test_duplicated_callback_parameters_are_refused_with_a_json_error(
    as_leash: Leash, idp: Idp, hostile_as: HostileAs
) -> None:
    """`state`, `code` or `iss` twice: which one would count? Refused, answered as every error
    is (API §0: a JSON body), and nothing is stored."""
    alice = human(as_leash, idp)
    for extra in ("state=forged", "code=other", "iss=https%3A%2F%2Fevil.example"):
        callback = callback_url(as_leash, alice)
        refused = alice.get(f"{callback}&{extra}")
        assert refused.status_code == 400, (extra, refused.text)
        assert refused.headers["content-type"].startswith("application/json"), (
            extra,
            refused.headers.get("content-type"),
            refused.text,
        )
        assert refused.json()["error"] == "invalid_request"
    assert notes_entry(alice) is None
    assert hostile_as.grants("authorization_code") == []


def test_an_iss_that_differs_only_in_form_is_another_issuer(
    as_leash: Leash, idp: Idp, hostile_as: HostileAs
) -> None:
    """RFC 9207 §2.4: `iss` is compared as a string, with no normalisation."""
    alice = human(as_leash, idp)
    host = hostile_as.issuer.removeprefix("http://")
    for variant in (
        f"{hostile_as.issuer}/",
        f"HTTP://{host}",
        f"http://{host.replace('127.0.0.1', 'localhost')}",
        f"{hostile_as.issuer}/.",
        f"{hostile_as.issuer}#",
        f" {hostile_as.issuer}",
        "",
    ):
        callback = callback_url(as_leash, alice)
        query = dict(httpx.URL(callback).params)
        query["iss"] = variant
        refused = alice.get("/v1/vault/notes/callback", params=query)
        assert refused.status_code == 400, (variant, refused.text)
    assert notes_entry(alice) is None
    assert hostile_as.grants("authorization_code") == []


def test_two_racing_callbacks_exchange_the_code_once(
    as_leash: Leash, idp: Idp, hostile_as: HostileAs
) -> None:
    alice = human(as_leash, idp)
    callback = callback_url(as_leash, alice)
    barrier = threading.Barrier(4)

    def finish(_: int) -> int:
        with fresh(as_leash, alice.cookies) as client:
            barrier.wait()
            return client.get(callback).status_code

    with ThreadPoolExecutor(4) as pool:
        statuses = sorted(pool.map(finish, range(4)))
    assert statuses == [303, 400, 400, 400]
    assert len(hostile_as.grants("authorization_code")) == 1


def test_discovery_naming_another_issuer_starts_nothing(
    as_leash: Leash, idp: Idp, hostile_as: HostileAs
) -> None:
    """A metadata document that names another issuer is not this server's (RFC 8414 §3.3)."""
    hostile_as.metadata_issuer = "https://evil.example"
    alice = human(as_leash, idp)
    started = alice.post("/v1/vault/notes/connect", headers=origin(as_leash))
    assert started.status_code == 502, started.text
    assert started.json()["error"] == "bad_gateway"
    assert "authorization_url" not in started.text


# FIXED: endpoints found by discovery are taken as any URL at all, where configured ones
# must be http(s): metadata naming `"authorization_endpoint": "javascript:..."` (or `data:`,
# `file:`) makes `POST /v1/vault/{upstream}/connect` answer that as the `authorization_url` to
# open. The console checks the scheme before it navigates, but the API answer is what any
# other client (a CLI, a script opening a browser) gets. Discovered endpoints should be held
# to the configured ones' rule and the connect refused (`502`).
@pytest.mark.parametrize(
    "endpoint",
    ["javascript:alert(document.domain)//", "data:text/html,<script>alert(1)</script>"],
    ids=["javascript", "data"],
)
def test_discovered_endpoints_must_be_web_addresses(
    as_leash: Leash, idp: Idp, hostile_as: HostileAs, endpoint: str
) -> None:
    hostile_as.metadata_changes = {"authorization_endpoint": endpoint}
    alice = human(as_leash, idp)
    started = alice.post("/v1/vault/notes/connect", headers=origin(as_leash))
    assert started.status_code == 502, started.text
    assert "authorization_url" not in started.text


# --- a hostile authorization server's token responses at the callback --------------------------


def raw(body: bytes, status: int = 200, content_type: str = "application/json") -> Answer:
    return status, {"Content-Type": content_type}, body


def good_tokens(**changes: Any) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "access_token": secrets.token_urlsafe(32),
        "token_type": "Bearer",
        "expires_in": 3600,
        "refresh_token": secrets.token_urlsafe(32),
    }
    for name, value in changes.items():
        if value is None:
            answer.pop(name, None)
        else:
            answer[name] = value
    return answer


HOSTILE_TOKEN_ANSWERS: dict[str, Callable[[HostileAs], Answer]] = {
    "token_type mac": lambda _: as_json(good_tokens(token_type="mac")),
    "token_type DPoP": lambda _: as_json(good_tokens(token_type="DPoP")),
    "no token_type": lambda _: as_json(good_tokens(token_type=None)),
    "no access_token": lambda _: as_json(good_tokens(access_token=None)),
    "access_token a number": lambda _: as_json(good_tokens(access_token=12345678901234)),
    "access_token an object": lambda _: as_json(good_tokens(access_token={"a": "b"})),
    "expires_in negative": lambda _: as_json(good_tokens(expires_in=-3600)),
    "expires_in a string": lambda _: as_json(good_tokens(expires_in="3600")),
    "expires_in past 2**64": lambda _: raw(
        json.dumps(good_tokens()).replace("3600", "1" + "0" * 30).encode()
    ),
    "a JSON array": lambda _: as_json([good_tokens()]),
    "not JSON": lambda _: raw(b"<html><body>hello</body></html>"),
    "HTML content type": lambda _: raw(json.dumps(good_tokens()).encode(), 200, "text/html"),
    "an empty 200": lambda _: raw(b""),
    "truncated JSON": lambda _: raw(json.dumps(good_tokens()).encode()[:30]),
    "a 500 with an error": lambda _: as_json({"error": "server_error"}, 500),
    "a 503 without a body": lambda _: raw(b"", 503),
    "a 302 elsewhere": lambda server_as: (
        302,
        {"Location": f"{server_as.issuer}/elsewhere/token"},
        b"",
    ),
    "a 307 elsewhere": lambda server_as: (
        307,
        {"Location": f"{server_as.issuer}/elsewhere/token"},
        b"",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TOKEN_ANSWERS))
def test_a_hostile_token_response_at_the_callback_stores_nothing(
    as_leash: Leash, idp: Idp, hostile_as: HostileAs, case: str
) -> None:
    """Whatever the server answers the code exchange with, the callback refuses with a 4xx or
    `502` (never another 5xx), stores nothing, follows no redirect (the client secret would go
    with it) and keeps running."""
    make = HOSTILE_TOKEN_ANSWERS[case]
    hostile_as.code_answer = lambda: make(hostile_as)
    alice = human(as_leash, idp)
    answer = connect(as_leash, alice)
    assert answer.status_code == 502 or 400 <= answer.status_code < 500, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    assert notes_entry(alice) is None
    assert hostile_as.elsewhere == []
    alive(as_leash)


def test_odd_but_valid_token_responses_are_accepted_and_their_extras_never_shown(
    as_leash: Leash, idp: Idp, hostile_as: HostileAs
) -> None:
    """Extra members (RFC 6749 §5.1 allows them), a lower-case `bearer`, a lifetime past i64:
    connected, and nothing of the answer shown back."""
    extras = {
        "id_token": "eyJ" + secrets.token_urlsafe(40),
        "scope": "notes.read",
        "refresh_token_expires_in": 86400,
        "x_secret": secrets.token_urlsafe(32),
    }
    answer = good_tokens(token_type="bearer", expires_in=2**63 + 5, **extras)
    hostile_as.code_answer = lambda: as_json(answer)
    hostile_as.live_access.add(answer["access_token"])
    alice = human(as_leash, idp)
    done = connect(as_leash, alice)
    assert done.status_code == 303, done.text
    assert notes_entry(alice) is not None
    used = gateway_of(as_leash, idp).get("/gw/notes/notes/1")
    assert used.status_code == 200, used.text
    shown = alice.get("/v1/vault").text + done.text
    found = {name: str(value) for name, value in answer.items() if name != "expires_in"}
    found.pop("token_type")
    found.pop("scope")
    found.pop("refresh_token_expires_in")
    assert leaks(as_leash, found, shown, used.text) == []


# FIXED: an access token that cannot be sent as a header value (a line break, a NUL, a
# control character) or that is empty is accepted and stored by the callback (`303`, status
# `active`); every request then fails with `502 upstream_credential_expired` ("an access token
# that cannot be sent"), or, for the empty one, goes out as a bare `Bearer `. The callback should
# refuse what it can never inject and store nothing.
@pytest.mark.parametrize(
    "access_token",
    ["", "a" * 20 + "\r\nX-Injected: 1", "a" * 20 + "\x00", "a" * 20 + "\x7f", " "],
    ids=["empty", "crlf", "nul", "del", "blank"],
)
def test_an_access_token_that_cannot_be_injected_is_refused_at_the_callback(
    as_leash: Leash, idp: Idp, hostile_as: HostileAs, access_token: str
) -> None:
    hostile_as.code_answer = lambda: as_json(good_tokens(access_token=access_token))
    alice = human(as_leash, idp)
    answer = connect(as_leash, alice)
    assert answer.status_code in (400, 502), answer.text
    assert notes_entry(alice) is None
    alive(as_leash)


# FIXED: the token response (and the discovery document) is read whole into memory with no
# bound: a hostile or broken authorization server answering the code exchange with a 16 MiB
# "access token" gets it stored (sealed, in the database) and `303`; larger answers cost Leash
# memory without limit within the HTTP client's 10 s. Token answers should be bounded (a few
# tens of KiB) and refused past it, with nothing stored.
def test_a_huge_token_response_is_refused(as_leash: Leash, idp: Idp, hostile_as: HostileAs) -> None:
    huge = good_tokens(access_token="A" * (16 * 1024 * 1024))
    body = json.dumps(huge).encode()
    hostile_as.code_answer = lambda: raw(body)
    alice = human(as_leash, idp)
    answer = connect(as_leash, alice)
    assert answer.status_code in (400, 502), answer.status_code
    assert notes_entry(alice) is None
    alive(as_leash)


def test_a_hanging_token_endpoint_does_not_hold_the_callback_long(
    as_leash: Leash, idp: Idp, hostile_as: HostileAs
) -> None:
    hostile_as.code_delay = 40
    alice = human(as_leash, idp)
    callback = callback_url(as_leash, alice)
    started = time.monotonic()
    answer = alice.get(callback, timeout=60)
    took = time.monotonic() - started
    assert took < 15, took
    assert answer.status_code in (502, 504), answer.text
    assert notes_entry(alice) is None


# --- refresh ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rotate", [True, False], ids=["rotating", "not-rotating"])
def test_refresh_presents_the_newest_refresh_token_whether_or_not_the_server_rotates(
    as_leash: Leash, idp: Idp, hostile_as: HostileAs, rotate: bool
) -> None:
    """A server that rotates gets the newest refresh token each time (never a spent one); one
    that does not gets the first one again (Leash keeps it)."""
    hostile_as.ttl, hostile_as.rotate = 3, rotate
    alice = human(as_leash, idp)
    connected(as_leash, alice)
    gateway = gateway_of(as_leash, idp)
    statuses: list[int] = []
    ends = time.monotonic() + 8
    while time.monotonic() < ends:
        statuses.append(gateway.get(f"/gw/notes/notes/{len(statuses)}").status_code)
        time.sleep(0.2)
    assert set(statuses) == {200}
    refreshes = hostile_as.grants("refresh_token")
    assert len(refreshes) >= 2
    presented = [r["refresh_token"] for r in refreshes]
    assert len(set(presented)) == (len(presented) if rotate else 1)


def test_requests_at_expiry_with_a_slow_refresh_make_one_refresh_and_all_succeed(
    as_leash: Leash, idp: Idp, hostile_as: HostileAs
) -> None:
    hostile_as.ttl = 3
    alice = human(as_leash, idp)
    connected(as_leash, alice)
    wait_past(3.2)
    hostile_as.refresh_delay = 3
    gateway = gateway_of(as_leash, idp)
    barrier = threading.Barrier(20)

    def call(i: int) -> tuple[int, float]:
        barrier.wait()
        started = time.monotonic()
        status = gateway.get(f"/gw/notes/notes/s{i}").status_code
        return status, time.monotonic() - started

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(call, range(20)))
    assert {status for status, _ in answers} == {200}
    assert max(took for _, took in answers) < 8
    assert len(hostile_as.grants("refresh_token")) == 1


def test_a_hanging_token_endpoint_bounds_every_request_and_is_asked_once(
    as_leash: Leash, idp: Idp, hostile_as: HostileAs
) -> None:
    hostile_as.ttl = 3
    alice = human(as_leash, idp)
    connected(as_leash, alice)
    wait_past(3.2)
    hostile_as.refresh_delay = 40
    gateway = gateway_of(as_leash, idp)

    def call(i: int) -> tuple[int, float, str]:
        started = time.monotonic()
        answer = gateway.get(f"/gw/notes/notes/h{i}", timeout=60)
        return answer.status_code, time.monotonic() - started, answer.text

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(call, range(10)))
    assert {status for status, _, _ in answers} == {502}, answers[0]
    assert max(took for _, took, _ in answers) < 14
    assert all("upstream_credential_expired" in text for _, _, text in answers)
    # During the back-off, at once and with no new call to the server.
    later = [call(100 + i) for i in range(5)]
    assert {status for status, _, _ in later} == {502}
    assert max(took for _, took, _ in later) < 1.5
    assert len(hostile_as.grants("refresh_token")) == 1
    # A passing failure: the human is not asked to reconnect.
    assert_active(alice)


# FIXED: the request that opens the refresh window (a third of the lifetime before expiry)
# refreshes in line and waits for the token endpoint, though the access token it holds is still
# good: with a server that takes 6 s to answer, that request takes 6 s (up to the HTTP client's
# 10 s). A still-usable token should go out at once while the refresh runs (in the background,
# or by a caller that does not hold up its own request).
def test_a_slow_refresh_does_not_delay_a_request_whose_token_is_still_good(
    as_leash: Leash, idp: Idp, hostile_as: HostileAs
) -> None:
    hostile_as.ttl = 24
    alice = human(as_leash, idp)
    connected(as_leash, alice)
    gateway = gateway_of(as_leash, idp)
    assert gateway.get("/gw/notes/notes/early").status_code == 200
    hostile_as.refresh_delay = 6
    # Refreshed from 16 s on (24 s less a third); the token lives until 24 s.
    wait_past(17)
    started = time.monotonic()
    answer = gateway.get("/gw/notes/notes/window")
    took = time.monotonic() - started
    assert answer.status_code == 200
    assert took < 2, f"a request with a good token waited {took:.1f} s for the refresh"


def test_a_5xx_storm_at_the_token_endpoint_is_not_hammered(
    as_leash: Leash, idp: Idp, hostile_as: HostileAs
) -> None:
    hostile_as.ttl = 3
    alice = human(as_leash, idp)
    connected(as_leash, alice)
    wait_past(3.2)
    hostile_as.refresh_answer = lambda _: as_json({"error": "temporarily_unavailable"}, 503)
    gateway = gateway_of(as_leash, idp)
    statuses: list[int] = []
    ends = time.monotonic() + 12
    while time.monotonic() < ends:
        started = time.monotonic()
        statuses.append(gateway.get(f"/gw/notes/notes/{len(statuses)}").status_code)
        assert time.monotonic() - started < 3
        time.sleep(0.2)
    assert set(statuses) == {502}
    last = gateway.get("/gw/notes/notes/last")
    assert last.headers.get("leash-decision") == "upstream_credential_expired"
    assert last.json()["error"] == "upstream_credential_expired"
    # One try, then one per back-off (10 s): not one per request.
    assert 1 <= len(hostile_as.grants("refresh_token")) <= 3
    assert_active(alice)


# FIXED: a refusal's `error` code is copied into the audit event `credential.refresh_failed`
# (`reason`, up to 64 visible characters) as the server wrote it: a server that echoes what it
# was sent (`{"error": "<the refresh token>"}`) puts the refresh token into the audit trail,
# which the human and the admin read (ATTACKS 39, API §17 "the refresh token never leaves
# Leash"). Only registered RFC 6749 §5.2 codes (or a fixed `other`) should be recorded.
def test_a_refresh_refusal_echoing_the_refresh_token_puts_it_in_no_event(
    as_leash: Leash, idp: Idp, hostile_as: HostileAs
) -> None:
    hostile_as.ttl = 3
    alice = human(as_leash, idp)
    connected(as_leash, alice)
    wait_past(3.2)
    hostile_as.refresh_answer = lambda presented: as_json(
        {"error": presented, "error_description": f"bad refresh_token {presented}"}, 400
    )
    answer = gateway_of(as_leash, idp).get("/gw/notes/notes/echo")
    assert answer.status_code == 502
    kinds = [e["kind"] for e in events(as_leash)]
    assert "credential.refresh_failed" in kinds
    assert leaks(as_leash, hostile_as.secrets_issued(), answer.text) == []


@pytest.fixture
def cluster_database() -> Iterator[str]:
    """A fresh database on the test PostgreSQL server (`LEASH_TEST_POSTGRES`, as in
    test_oauth_connect.py); no server is a failure, never a skip."""
    server = os.environ.get("LEASH_TEST_POSTGRES", "postgres://postgres@127.0.0.1:5432/postgres")
    name = f"leash_py_{secrets.token_hex(6)}"
    subprocess.run(["psql", server, "-qc", f"CREATE DATABASE {name}"], check=True)
    yield f"{server.rsplit('/', 1)[0]}/{name}"
    subprocess.run(["psql", server, "-qc", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"])


# FIXED: the cluster-wide refresh lease (15 s) is shorter than a refresh can take: a node
# that has not yet fetched the server's metadata (a node started since, or one whose 5-minute
# cache ran out) discovers it inside the lease (up to twice 10 s) before the token request (up
# to 10 s). With a server that takes 8 s for each, the lease runs out while the first node's
# refresh is still under way; the other node takes it and presents the same, already rotated,
# refresh token: `invalid_grant`, the connection marked `reconnect`, the first node's fresh
# tokens thrown away (and, at a server like oidc-provider, the whole grant revoked for the
# reuse). API §17: "refreshed ... by exactly one node at a time". The lease should outlast the
# whole refresh (or be extended while it runs), discovery included.
def test_a_slow_server_never_gets_two_refreshes_from_two_cluster_nodes(
    make_leash: MakeLeash, idp: Idp, hostile_as: HostileAs, cluster_database: str
) -> None:
    hostile_as.ttl = 3
    shared = {"LEASH_MASTER_KEY": base64.b64encode(secrets.token_bytes(32)).decode()}
    top = f'database = "{cluster_database}"\n'
    a = leash_with(make_leash, idp, hostile_as, top=top, env=shared)
    b = leash_with(make_leash, idp, hostile_as, top=top, env=shared)
    idp.set_redirect_uri(f"{a.url}/auth/callback")
    alice = human(a, idp)
    connected(a, alice)
    on_a, on_b = gateway_of(a, idp), gateway_of(b, idp)
    assert on_b.get("/gw/notes/notes/b0").status_code == 200
    wait_past(3.2)
    hostile_as.discovery_delay, hostile_as.refresh_delay = 8, 8
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(on_b.get, "/gw/notes/notes/b1", timeout=60)
        time.sleep(9)
        # Node B's refresh is under way at the server; node A's requests wait for it.
        statuses = []
        ends = time.monotonic() + 10
        while time.monotonic() < ends:
            statuses.append(on_a.get("/gw/notes/notes/a", timeout=60).status_code)
            time.sleep(0.3)
        first.result()
    hostile_as.discovery_delay, hostile_as.refresh_delay = 0, 0
    presented = [r["refresh_token"] for r in hostile_as.grants("refresh_token")]
    entry = notes_entry(alice)
    assert entry is not None
    # No refresh token presented twice (the 3-s tokens may be due again before the loop ends:
    # a later refresh presents the rotated token, which is no double use).
    assert len(presented) == len(set(presented)), (
        f"{len(presented)} refreshes, {len(set(presented))} refresh token(s); "
        f"the connection is now {entry['status']}"
    )
    assert entry["status"] == "active"
    assert on_a.get("/gw/notes/notes/after").status_code == 200


# --- secrets ------------------------------------------------------------------------------------


def test_an_upstream_echoing_the_access_token_gives_the_agent_nothing_of_it(
    as_leash: Leash, idp: Idp, hostile_as: HostileAs
) -> None:
    """The reflection guard covers the connection's token, and the refreshed one too."""
    hostile_as.ttl = 3
    alice = human(as_leash, idp)
    connected(as_leash, alice)
    gateway = gateway_of(as_leash, idp)
    for round_ in ("first", "refreshed"):
        header = gateway.get(f"/gw/notes/echo-header/{round_}")
        assert header.status_code == 502, header.text
        assert header.json()["error"] == "credential_reflected"
        try:
            body = gateway.get(f"/gw/notes/echo-body/{round_}").text
        except httpx.HTTPError:
            body = ""
        sent = [a for a in hostile_as.api_tokens("/api/echo-body/") if a]
        assert sent
        assert sent[-1].removeprefix("Bearer ") not in body
        wait_past(3.2)
    assert len(hostile_as.grants("refresh_token")) >= 1


def test_no_token_code_verifier_or_client_secret_reaches_an_answer_the_audit_or_a_debug_log(
    make_leash: MakeLeash, idp: Idp, hostile_as: HostileAs
) -> None:
    """Connect, use, refresh, a failing refresh, a refused one (reconnect), connect again,
    delete: every secret of the connection looked for everywhere Leash writes, at debug."""
    hostile_as.ttl = 3
    leash = leash_with(make_leash, idp, hostile_as, env={"LEASH_LOG": "debug"})
    alice = human(leash, idp)
    texts = [connect(leash, alice).text]
    gateway = gateway_of(leash, idp)
    texts.append(gateway.get("/gw/notes/notes/1").text)
    wait_past(3.2)
    texts.append(gateway.get("/gw/notes/notes/2").text)
    hostile_as.refresh_answer = lambda _: as_json({"error": "temporarily_unavailable"}, 503)
    wait_past(3.2)
    texts.append(gateway.get("/gw/notes/notes/3").text)
    wait_past(10.5)
    hostile_as.refresh_answer = lambda _: as_json({"error": "invalid_grant"}, 400)
    texts.append(gateway.get("/gw/notes/notes/4").text)
    entry = notes_entry(alice)
    assert entry is not None
    assert entry["status"] == "reconnect"
    hostile_as.refresh_answer = None
    texts.append(connect(leash, alice).text)
    texts.append(alice.get("/v1/vault").text)
    texts.append(alice.get("/v1/upstreams").text)
    texts.append(alice.delete("/v1/vault/notes", headers=origin(leash)).text)
    time.sleep(0.3)
    found = hostile_as.secrets_issued()
    assert len(found) >= 8
    assert leaks(leash, found, *texts) == []


def test_an_agent_calling_authorize_never_gets_the_connection_or_a_delegation_token(
    make_leash: MakeLeash, idp: Idp, hostile_as: HostileAs, tmp_path: Path
) -> None:
    """ATTACKS 43 with the new credential kinds: only the configured proxy, by its key, gets
    the connection's access token or a delegation token injected."""
    leash = leash_with(
        make_leash,
        idp,
        hostile_as,
        top=books_on(f"{hostile_as.issuer}/api"),
        env={"LEASH_AUTHORIZE_KEY": PROXY_KEY},
    )
    alice = human(leash, idp)
    connected(leash, alice)
    agent_id, key_file = agent_for(leash, tmp_path)
    grant = alice.post(
        "/v1/grants",
        json={
            "agent": agent_id,
            "purpose": "read",
            "upstreams": ["notes", "books"],
            "actions": ["notes:read", "books:read"],
            "ttl_seconds": 600,
        },
        headers=origin(leash),
    )
    assert grant.status_code == 201, grant.text
    with Agent.from_jwk_file(leash.url, agent_id, key_file) as agent:
        task = agent.task(grant.json()["handle"])
        token = task._usable_token().value
        for target in ("/gw/notes/notes/a", "/gw/books/books/a"):
            original = {"Leash-Original-Method": "GET", "Leash-Original-URI": target}
            asked = [
                httpx.post(f"{leash.url}/v1/authorize", headers=original, auth=task.auth),
                httpx.get(f"{leash.url}/v1/authorize", headers=original, auth=task.auth),
                httpx.post(
                    f"{leash.url}/v1/authorize",
                    headers={**original, "Leash-Proxy-Key": secrets.token_hex(32)},
                    auth=task.auth,
                ),
            ]
            for answer in asked:
                assert answer.status_code == 401, answer.text
                assert not any(n.startswith("leash-inject") for n in answer.headers)
            # The proxy, by its key, with the agent's token and its proof for the original.
            proof = task._dpop_key.dpop_proof(
                "GET", f"{leash.url}{target}", int(time.time()), token
            )
            proxied = httpx.post(
                f"{leash.url}/v1/authorize",
                headers={
                    **original,
                    "Leash-Proxy-Key": PROXY_KEY,
                    "Authorization": f"DPoP {token}",
                    "DPoP": proof,
                },
            )
            assert proxied.status_code == 200, proxied.text
            injected = proxied.headers["leash-inject-authorization"].removeprefix("Bearer ")
            if "notes" in target:
                assert injected in hostile_as.live_access
            else:
                assert jwt.get_unverified_header(injected)["typ"] == "at+jwt"
            texts = "".join(a.text + json.dumps(dict(a.headers)) for a in asked)
            assert injected not in texts


# --- deletion and replacement ------------------------------------------------------------------


def revoked_soon(hostile_as: HostileAs, tokens: set[str] | None = None) -> bool:
    """Whether the refresh tokens (`tokens`, or all) are revoked within a few seconds: Leash
    revokes after its answer, so that the human never waits on the server."""
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        live = hostile_as.live_refresh if tokens is None else tokens & hostile_as.live_refresh
        if not live:
            return True
        time.sleep(0.05)
    return False


def test_delete_revokes_the_current_tokens_and_nothing_is_injected_after(
    as_leash: Leash, idp: Idp, hostile_as: HostileAs
) -> None:
    hostile_as.ttl = 3
    alice = human(as_leash, idp)
    connected(as_leash, alice)
    gateway = gateway_of(as_leash, idp)
    wait_past(3.2)
    assert gateway.get("/gw/notes/notes/refreshed").status_code == 200
    deleted = alice.delete("/v1/vault/notes", headers=origin(as_leash))
    assert deleted.status_code == 204
    assert revoked_soon(hostile_as)
    deadline = time.monotonic() + 5
    while len(hostile_as.revocations) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    revoked = {r["token"] for r in hostile_as.revocations}
    current = hostile_as.api_tokens("/api/notes/refreshed")[-1]
    assert current is not None
    # The refresh token, and the access token in use (the one before the refresh Leash no
    # longer has; it dies with its short life).
    assert current.removeprefix("Bearer ") in revoked
    assert len(revoked) == 2
    after = gateway.get("/gw/notes/notes/after")
    assert after.status_code == 401
    assert hostile_as.api_tokens("/api/notes/after") == [None]
    # Deleting again: nothing there, nothing revoked.
    again = alice.delete("/v1/vault/notes", headers=origin(as_leash))
    assert again.status_code == 404
    assert len(hostile_as.revocations) == 2


def test_delete_with_a_failing_revocation_endpoint_still_removes_the_connection(
    as_leash: Leash, idp: Idp, hostile_as: HostileAs
) -> None:
    hostile_as.revocation_status = 503
    alice = human(as_leash, idp)
    connected(as_leash, alice)
    deleted = alice.delete("/v1/vault/notes", headers=origin(as_leash))
    assert deleted.status_code == 204
    assert notes_entry(alice) is None
    after = gateway_of(as_leash, idp).get("/gw/notes/notes/after")
    assert hostile_as.api_tokens("/api/notes/after") == [None]
    assert after.status_code == 401


# FIXED: `DELETE /v1/vault/{upstream}` waits for the RFC 7009 revocation before it answers:
# a revocation endpoint that hangs holds the human's DELETE for the HTTP client's whole 10 s
# timeout (and the access token's revocation is then not even tried: the first failure ends
# the loop). The connection is already gone from Leash by then; the answer should not wait on
# the upstream's server (revoke in the background, each token on its own, with a short bound).
def test_delete_does_not_wait_on_a_hanging_revocation_endpoint(
    as_leash: Leash, idp: Idp, hostile_as: HostileAs
) -> None:
    hostile_as.revocation_delay = 40
    alice = human(as_leash, idp)
    connected(as_leash, alice)
    started = time.monotonic()
    deleted = alice.delete("/v1/vault/notes", headers=origin(as_leash), timeout=60)
    took = time.monotonic() - started
    assert deleted.status_code == 204
    assert took < 3, f"DELETE took {took:.1f} s"


# FIXED: connecting again (the console's "reconnect", or a second connect while one is
# active) replaces the stored tokens without revoking the replaced ones: the old refresh token
# stays valid at the server, forgotten by Leash, which can no longer revoke it (DELETE revokes
# only the current tokens). Replaced tokens should be revoked as DELETE revokes them.
def test_connecting_again_revokes_the_replaced_connection(
    as_leash: Leash, idp: Idp, hostile_as: HostileAs
) -> None:
    alice = human(as_leash, idp)
    connected(as_leash, alice)
    first = set(hostile_as.live_refresh)
    connected(as_leash, alice)
    assert len(hostile_as.grants("authorization_code")) == 2
    assert revoked_soon(hostile_as, first), "the replaced refresh token is still live"
    alice.delete("/v1/vault/notes", headers=origin(as_leash))
    assert revoked_soon(hostile_as)


# FIXED: a static secret stored over an OAuth connection (`PUT /v1/vault/{upstream}`, kind
# bearer) drops the connection's tokens without revoking them at the server.
def test_a_static_secret_stored_over_a_connection_revokes_it(
    as_leash: Leash, idp: Idp, hostile_as: HostileAs
) -> None:
    alice = human(as_leash, idp)
    connected(as_leash, alice)
    put = alice.put(
        "/v1/vault/notes",
        json={"kind": "bearer", "secret": "static-" + secrets.token_hex(8)},
        headers=origin(as_leash),
    )
    assert put.status_code in (200, 201, 204), put.text
    assert revoked_soon(hostile_as), "the replaced refresh token is still live"


# FIXED: a refresh in flight when the human deletes the connection loses the race (its
# result is not stored over the deleted row, rightly) but the tokens it obtained are simply
# dropped: DELETE revoked only the tokens it read before the refresh finished, so the rotated
# refresh token (and its access token) stay valid at the server, unknown to Leash. Tokens
# obtained but not stored should be revoked.
def test_a_refresh_that_loses_the_race_with_delete_revokes_what_it_obtained(
    as_leash: Leash, idp: Idp, hostile_as: HostileAs
) -> None:
    hostile_as.ttl = 3
    alice = human(as_leash, idp)
    connected(as_leash, alice)
    gateway = gateway_of(as_leash, idp)
    wait_past(3.2)
    hostile_as.refresh_delay = 3
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(gateway.get, "/gw/notes/notes/racing")
        time.sleep(1)
        assert len(hostile_as.grants("refresh_token")) == 1
        deleted = alice.delete("/v1/vault/notes", headers=origin(as_leash))
        assert deleted.status_code == 204
        in_flight.result()
    time.sleep(1)
    assert notes_entry(alice) is None
    assert revoked_soon(hostile_as), "a refresh token Leash obtained is still live"


# --- a dead connection and the grant ------------------------------------------------------------


# FIXED: the gateway commits a request (its audit event `allow`, the grant's `max_requests`,
# a `single_use` action, an attached approval) before it asks for the OAuth connection's
# token; when that fails (`502 upstream_credential_expired`) nothing was forwarded, yet the
# grant's budget is spent and the trail shows only `allow` for the request. A grant of one
# request is used up by a refusal, and the agent cannot retry after the human reconnects. The
# credential should be obtained before the commit (or the failure recorded as `deny` and the
# use given back).
def test_a_dead_connection_spends_nothing_of_the_grant_and_is_audited_as_not_forwarded(
    as_leash: Leash, idp: Idp, hostile_as: HostileAs, tmp_path: Path
) -> None:
    hostile_as.ttl = 3
    alice = human(as_leash, idp)
    connected(as_leash, alice)
    agent_id, key_file = agent_for(as_leash, tmp_path)
    grant = alice.post(
        "/v1/grants",
        json={
            "agent": agent_id,
            "purpose": "read one note",
            "upstreams": ["notes"],
            "actions": ["notes:read"],
            "ttl_seconds": 600,
            "max_requests": 1,
        },
        headers=origin(as_leash),
    )
    assert grant.status_code == 201, grant.text
    grant_id = grant.json()["id"]
    wait_past(3.2)
    hostile_as.refresh_answer = lambda _: as_json({"error": "invalid_grant"}, 400)

    def read(path: str) -> int | str:
        with Agent.from_jwk_file(as_leash.url, agent_id, key_file) as agent:
            task = agent.task(grant.json()["handle"])
            try:
                return httpx.get(task.url("notes", path), auth=task.auth).status_code
            except LeashError as e:
                return str(e)

    assert read("/notes/dead") == 502
    hostile_as.refresh_answer = None
    connected(as_leash, alice)
    decisions = [
        e["decision"]
        for e in as_leash.audit(grant_id)
        if e["kind"] == "gateway.request" and (e["path"] or "").endswith("/notes/dead")
    ]
    again = read("/notes/again")
    assert again == 200, f"after the human reconnected, the agent's one request: {again}"
    assert decisions != ["allow"], "the request that was never forwarded is audited as allowed"


# --- delegation tokens --------------------------------------------------------------------------


@pytest.fixture
def books_leash(make_leash: MakeLeash, hostile_as: HostileAs) -> Leash:
    return make_leash(books_on(f"{hostile_as.issuer}/api"), {"LEASH_AUTHORIZE_KEY": PROXY_KEY})


def delegation_token(leash: Leash, server_as: HostileAs, tmp_path: Path) -> tuple[str, Any]:
    """A delegation token for `books` as the upstream got it, and the setup of its grant."""
    setup = set_up(
        leash,
        tmp_path,
        upstreams=["books", "ledger"],
        actions=["books:read", "ledger:read"],
        approval_required=[],
    )
    with Agent.from_jwk_file(leash.url, setup.agent_id, setup.key_file) as agent:
        task = agent.task(setup.handle)
        assert httpx.get(task.url("books", "/books/1"), auth=task.auth).status_code == 200
    sent = server_as.api_tokens("/api/books/1")[-1]
    assert sent is not None
    assert sent.startswith("Bearer ")
    return sent.removeprefix("Bearer "), setup


def test_leash_itself_refuses_a_delegation_token_an_upstream_replays_to_it(
    books_leash: Leash, hostile_as: HostileAs, tmp_path: Path
) -> None:
    """A hostile upstream keeps the token it was sent and tries it on Leash: as a human's Bearer,
    at the gateway (Bearer and DPoP with a proof of its own), at the proxies' decision API,
    at introspection. It is nobody's credential at Leash."""
    leash = books_leash
    token, _ = delegation_token(leash, hostile_as, tmp_path)
    before = len(hostile_as.api_requests)
    with fresh(leash) as client:
        bearer = {"Authorization": f"Bearer {token}"}
        assert client.get("/v1/me", headers=bearer).status_code == 401
        assert client.get("/v1/vault", headers=bearer).status_code == 401
        assert client.get("/v1/grants", headers=bearer).status_code == 401
        for upstream in ("books", "ledger"):
            path = f"/gw/{upstream}/{upstream}/replayed"
            assert client.get(path, headers=bearer).status_code == 401
            key = jwt_key()
            proof = dpop_proof(key, "GET", f"{leash.url}{path}", token)
            dpop = {"Authorization": f"DPoP {token}", "DPoP": proof}
            assert client.get(path, headers=dpop).status_code == 401
        decided = client.post(
            "/v1/authorize",
            headers={
                **bearer,
                "Leash-Proxy-Key": PROXY_KEY,
                "Leash-Original-Method": "GET",
                "Leash-Original-URI": "/gw/books/books/replayed",
            },
        )
        assert decided.status_code == 401
        assert not any(n.startswith("leash-inject") for n in decided.headers)
    introspected = leash.http.post(
        "/oauth2/introspect",
        data={"token": token},
        headers={"Authorization": f"Bearer {leash.admin_key}"},
    )
    assert introspected.status_code == 200
    assert introspected.json() == {"active": False}
    assert len(hostile_as.api_requests) == before


def jwt_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def dpop_proof(key: Any, method: str, url: str, token: str) -> str:
    from cryptography.hazmat.primitives import serialization

    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url(public)}
    claims = {
        "htm": method,
        "htu": url,
        "iat": int(time.time()),
        "jti": secrets.token_urlsafe(16),
        "ath": b64url(hashlib.sha256(token.encode()).digest()),
    }
    proof: str = jwt.encode(claims, key, algorithm="EdDSA", headers={"typ": "dpop+jwt", "jwk": jwk})
    return proof


def test_the_two_key_sets_share_no_key_and_publish_no_private_part(books_leash: Leash) -> None:
    leash = books_leash
    access = leash.http.get("/.well-known/jwks.json").json()["keys"]
    delegation = leash.http.get("/.well-known/leash-delegation-jwks.json").json()["keys"]
    assert access
    assert delegation
    private = {"d", "p", "q", "dp", "dq", "qi", "k", "oth"}
    for key in access + delegation:
        assert private.isdisjoint(key), key
    material = {
        k: {json.dumps({n: key.get(n) for n in ("kty", "crv", "x", "y", "n", "e")}) for key in ks}
        for k, ks in (("access", access), ("delegation", delegation))
    }
    assert material["access"].isdisjoint(material["delegation"])
    assert {k["kid"] for k in access}.isdisjoint({k["kid"] for k in delegation})
    metadata = leash.http.get("/.well-known/oauth-authorization-server").json()
    assert metadata["jwks_uri"].endswith("/.well-known/jwks.json")
    assert "leash-delegation" not in json.dumps(metadata)


def test_an_upstream_echoing_a_delegation_token_gives_the_agent_nothing_of_it(
    books_leash: Leash, hostile_as: HostileAs, tmp_path: Path
) -> None:
    """An echoed delegation token is a bearer credential for the upstream for up to 60 s:
    the agent would bypass the gateway's checks with it."""
    leash = books_leash
    _, setup = delegation_token(leash, hostile_as, tmp_path)
    with Agent.from_jwk_file(leash.url, setup.agent_id, setup.key_file) as agent:
        task = agent.task(setup.handle)
        header = httpx.get(task.url("books", "/echo-header/x"), auth=task.auth)
        assert header.status_code == 502, header.text
        assert header.json()["error"] == "credential_reflected"
        try:
            body = httpx.get(task.url("books", "/echo-body/x"), auth=task.auth).text
        except httpx.HTTPError:
            body = ""
    sent = hostile_as.api_tokens("/api/echo-body/x")[-1]
    assert sent is not None
    assert sent.removeprefix("Bearer ") not in body
    assert sent.split(".")[2] not in body


def test_a_delegation_token_in_direct_mode_names_the_human_and_no_agent(
    books_leash: Leash, hostile_as: HostileAs, tmp_path: Path
) -> None:
    leash = books_leash
    _, setup = delegation_token(leash, hostile_as, tmp_path)
    direct = leash.http.get(
        "/gw/books/books/direct", headers={"Authorization": f"Bearer {setup.user_key}"}
    )
    assert direct.status_code == 200, direct.text
    sent = hostile_as.api_tokens("/api/books/direct")[-1]
    assert sent is not None
    token = sent.removeprefix("Bearer ")
    keys = jwt.PyJWKSet.from_dict(leash.http.get("/.well-known/leash-delegation-jwks.json").json())
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in keys.keys if k.key_id == kid)
    claims = jwt.decode(token, key=key, algorithms=["EdDSA"], audience=BOOKS)
    me = leash.call("GET", "/v1/me", setup.user_key).json()
    assert claims["sub"] == me["id"]
    assert "act" not in claims
    assert "cnf" not in claims
    assert claims.get("client_id") in (None, me["id"])
    assert claims["scope"] == "books:read"
    assert 0 < claims["exp"] - claims["iat"] <= 60
    # Never the human's own key.
    assert setup.user_key not in json.dumps(hostile_as.api_requests)


def test_delegation_tokens_are_minted_per_request_and_never_reused(
    books_leash: Leash, hostile_as: HostileAs, tmp_path: Path
) -> None:
    leash = books_leash
    _, setup = delegation_token(leash, hostile_as, tmp_path)
    with Agent.from_jwk_file(leash.url, setup.agent_id, setup.key_file) as agent:
        task = agent.task(setup.handle)
        for i in range(10):
            assert httpx.get(task.url("books", f"/books/m{i}"), auth=task.auth).status_code == 200
            assert httpx.get(task.url("ledger", f"/ledger/m{i}"), auth=task.auth).is_success
    tokens = [t for t in hostile_as.api_tokens("/api/") if t]
    jtis = [
        jwt.decode(t.removeprefix("Bearer "), options={"verify_signature": False})["jti"]
        for t in tokens
    ]
    assert len(set(tokens)) == len(tokens)
    assert len(set(jtis)) == len(jtis)
    audiences = {
        p: jwt.decode(a.removeprefix("Bearer "), options={"verify_signature": False})["aud"]
        for p, a in hostile_as.api_requests
        if a
    }
    assert {a for p, a in audiences.items() if p.startswith("/api/books/")} == {BOOKS}
    assert {a for p, a in audiences.items() if p.startswith("/api/ledger/")} == {LEDGER}


CRM_DELEGATED = """
[mcp]
approval_wait = 20

[[upstream]]
name = "crm"
url = "{url}"
kind = "mcp"
inject = {{ kind = "leash_token", audience = "https://crm.example" }}
[[upstream.tool]]
name = "search_contacts"
action = "crm:search"
[[upstream.tool]]
name = "ask_new_email"
action = "crm:ask"
"""


# FIXED: for an MCP upstream with `inject = { kind = "leash_token" }`, the human's answer to
# the server's `elicitation/create` (sent by Leash as the client's, `mcp.rs` `answer`) carries
# the human's *vaulted* secret for that upstream (`crate::vault::injection`) instead of a
# delegation token: every other message gets `Bearer <delegation JWT>`, this one gets `Bearer
# <the stored secret>`, which the upstream was configured never to receive (and without a
# vaulted secret it gets no credential at all, so the answer fails). It should get a delegation
# token like the rest (`upstream_headers`).
def test_an_mcp_server_with_delegation_tokens_never_gets_the_vaulted_secret(
    make_leash: MakeLeash, crm_server: CrmServer, tmp_path: Path
) -> None:
    """An MCP upstream configured for delegation tokens gets one with every message Leash
    sends it, the human's answer to its elicitation included; a secret the human happens to
    have vaulted for it is never sent (the delegation token replaces it, as at the gateway)."""
    leash = make_leash(CRM_DELEGATED.format(url=crm_server.url))
    setup = set_up(
        leash,
        tmp_path,
        upstreams=["crm"],
        actions=["crm:search", "crm:ask"],
        approval_required=[],
    )
    vaulted = "VAULTED-" + secrets.token_hex(16)
    put = leash.call("PUT", "/v1/vault/crm", setup.user_key, {"kind": "bearer", "secret": vaulted})
    assert put.status_code in (200, 201, 204), put.text
    with Agent.from_jwk_file(leash.url, setup.agent_id, setup.key_file) as agent:
        task = agent.task(setup.handle)
        out: list[Any] = []
        call = threading.Thread(target=lambda: out.append(ask_new_email(leash, task, 1)))
        call.start()
        approval_id = pending_elicitation(setup)["id"]
        answered = leash.call(
            "POST",
            f"/v1/approvals/{approval_id}/approve",
            setup.user_key,
            {"content": {"email": "ada@lovelace.example"}},
        )
        assert answered.status_code == 200, answered.text
        call.join(30)
    assert out, "the tool call did not finish"
    requests = crm_server.requests()
    answers = [r for r in requests if '"result"' in r["body"] and '"action"' in r["body"]]
    assert answers, "the human's answer never reached the server"
    assert vaulted not in json.dumps(requests), "the vaulted secret went to the MCP server"
    for request in requests:
        authorization = request["headers"].get("authorization", "")
        assert authorization.startswith("Bearer ey"), (request["body"][:80], authorization)
        claims = jwt.decode(
            authorization.removeprefix("Bearer "), options={"verify_signature": False}
        )
        assert claims["aud"] == "https://crm.example"
