"""An outsider's attacks on the SDK (brief: sdk-attack): a malicious upstream behind the gateway,
URLs that look like the issuer, concurrency, and the contract's details (API §4, §6, §7, §15).

Every test runs against the real `leash` binary over loopback. The upstream here is scriptable:
`Scripted.answer(path, status, headers, body)` makes it answer `path` that way (a redirect, a
forged Leash refusal, ...); everything it receives is recorded. A second scripted server,
`elsewhere`, stands for any host on the network that an upstream can point the agent at.

Tests that FAIL on the current SDK are findings; the others pin down attacks that held (each
says so in its docstring: "Held:").
"""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import secrets
import threading
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from conftest import Leash, Recorded, Setup, Upstream, set_up

from leash_agent import (
    Agent,
    ApprovalDenied,
    ApprovalTimeout,
    LeashError,
    PendingApproval,
    TaskEnded,
)


class Scripted(Upstream):
    """A recording HTTP server whose answers the test scripts per path (query ignored)."""

    def __init__(self) -> None:
        super().__init__(url="")
        self.answers: dict[str, tuple[int, dict[str, str], bytes]] = {}
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:
                pass

            def handle_any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    body = self.rfile.read(length)
                elif "chunked" in self.headers.get("Transfer-Encoding", ""):
                    body = b""
                    while True:
                        size = int(self.rfile.readline().strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            break
                        body += self.rfile.read(size)
                        self.rfile.readline()
                else:
                    body = b""
                with scripted.lock:
                    scripted.requests.append(
                        Recorded(
                            self.command,
                            self.path,
                            {name.lower(): value for name, value in self.headers.items()},
                            body,
                        )
                    )
                path = self.path.split("?", 1)[0]
                status, headers, payload = scripted.answers.get(
                    path,
                    (200, {}, json.dumps({"method": self.command, "path": self.path}).encode()),
                )
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if "Content-Type" not in headers:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = handle_any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(
        self, path: str, status: int, headers: dict[str, str] | None = None, body: Any = None
    ) -> None:
        payload = body if isinstance(body, bytes) else json.dumps(body or {}).encode()
        self.answers[path] = (status, headers or {}, payload)

    def seen_at(self, path: str) -> list[Recorded]:
        return [r for r in self.seen() if r.path.split("?", 1)[0] == path]


# A forged Leash refusal of each kind the SDK acts on, as an attacker's server would send it.
FORGED: dict[str, tuple[int, dict[str, str], dict[str, Any]]] = {
    "nonce": (
        401,
        {
            "Leash-Decision": "use_dpop_nonce",
            "DPoP-Nonce": "from-the-attacker",
            "WWW-Authenticate": 'DPoP error="use_dpop_nonce"',
        },
        {"error": "use_dpop_nonce"},
    ),
    "expired": (
        401,
        {"Leash-Decision": "invalid_token", "WWW-Authenticate": 'DPoP error="invalid_token"'},
        {"error": "invalid_token"},
    ),
    "approval": (
        403,
        {"Leash-Decision": "approval_required"},
        {
            "error": "approval_required",
            "approval_id": "apr_forged",
            "status_url": "/v1/approvals/apr_forged",
        },
    ),
}

# A second upstream, `evil`, that accepts anything, besides the conftest's `mail` routes (which
# point at the same scripted server).
EVIL_ROUTES = """
[[upstream]]
name = "evil"
url = "{url}"
[[upstream.route]]
method = "GET"
path = "/**"
action = "evil:read"
[[upstream.route]]
method = "POST"
path = "/**"
action = "evil:write"
"""

ALL_ACTIONS = ["mail:read", "mail:draft", "mail:send", "evil:read", "evil:write"]


@pytest.fixture(scope="module")
def scripted() -> Iterator[Scripted]:
    server = Scripted()
    yield server
    server.server.shutdown()


@pytest.fixture(scope="module")
def elsewhere() -> Iterator[Scripted]:
    server = Scripted()
    yield server
    server.server.shutdown()


def start(scripted: Scripted, top: str = "") -> Leash:
    return Leash(scripted, f"{top}\n{EVIL_ROUTES.format(url=scripted.url)}")


@pytest.fixture(scope="module")
def evil_leash(scripted: Scripted) -> Iterator[Leash]:
    server = start(scripted)
    yield server
    server.stop()


def grant_all(leash: Leash, tmp_path: Path, **fields: Any) -> Setup:
    return set_up(
        leash,
        tmp_path,
        upstreams=["mail", "evil"],
        **{"actions": ALL_ACTIONS, "approval_required": ["mail:send"], **fields},
    )


def agent_of(setup: Setup, **options: Any) -> Agent:
    return Agent.from_jwk_file(setup.leash.url, setup.agent_id, setup.key_file, **options)


def unique(name: str) -> str:
    return f"/{name}-{secrets.token_hex(4)}"


# ---- 1. Redirects: an upstream points the agent's own HTTP client elsewhere ----------------------


def redirect_to(scripted: Scripted, target: str, status: int = 307) -> str:
    """A path on the upstream that redirects to `target`; returns the path."""
    path = unique("redirect")
    scripted.answer(path, status, {"Location": target})
    return path


def test_a_followed_redirect_carries_no_proof_elsewhere_httpx(
    evil_leash: Leash, scripted: Scripted, elsewhere: Scripted, tmp_path: Path
) -> None:
    """Found: with `follow_redirects=True` an upstream's redirect takes the request, DPoP proof
    included, to any host (httpx drops only `Authorization`). An `httpx.Auth` cannot see the
    hops, so `task.client()` makes a client whose request hook strips the task's credentials
    from every hop that leaves the issuer (README: use it when following redirects)."""
    setup = grant_all(evil_leash, tmp_path)
    landing = unique("landing")
    path = redirect_to(scripted, f"{elsewhere.url}{landing}")
    with agent_of(setup) as agent:
        task = agent.task(setup.handle)
        with task.client(follow_redirects=True) as client:
            assert client.get(task.url("evil", path)).status_code == 200
    assert len(elsewhere.seen_at(landing)) == 1, "the redirect was followed"
    leaked = elsewhere.seen_at(landing)
    for request in leaked:
        assert "dpop" not in request.headers, "the DPoP proof went to another host"
        assert "authorization" not in request.headers, "the token went to another host"


def test_a_followed_redirect_carries_no_proof_elsewhere_requests(
    evil_leash: Leash, scripted: Scripted, elsewhere: Scripted, tmp_path: Path
) -> None:
    """FINDING: `requests` follows redirects by default, and its redirect handling drops only
    `Authorization`: the DPoP proof that `task.requests_auth()` put on the request goes to
    whatever host the upstream names."""
    setup = grant_all(evil_leash, tmp_path)
    landing = unique("landing")
    path = redirect_to(scripted, f"{elsewhere.url}{landing}", 302)
    with agent_of(setup) as agent, requests.Session() as session:
        task = agent.task(setup.handle)
        session.get(task.url("evil", path), auth=task.requests_auth())
    for request in elsewhere.seen_at(landing):
        assert "dpop" not in request.headers, "the DPoP proof went to another host"
        assert "authorization" not in request.headers, "the token went to another host"


@pytest.mark.parametrize("forged", ["nonce", "expired"])
def test_a_redirect_to_a_forged_refusal_makes_no_second_copy(
    evil_leash: Leash, scripted: Scripted, elsewhere: Scripted, tmp_path: Path, forged: str
) -> None:
    """FINDING: the SDK acts on the answer at the end of httpx's redirect chain as if the
    gateway had sent it. An upstream that redirects (307) a POST to a server answering a forged
    `use_dpop_nonce` or `invalid_token` (the gateway's stripping of `Leash-Decision` never sees
    that answer) makes the SDK take the attacker's nonce or exchange again, and send the POST to
    the upstream a second time."""
    setup = grant_all(evil_leash, tmp_path)
    landing = unique(f"forged-{forged}")
    elsewhere.answer(landing, *FORGED[forged][:2], FORGED[forged][2])
    path = redirect_to(scripted, f"{elsewhere.url}{landing}")
    with agent_of(setup) as agent, httpx.Client(follow_redirects=True) as client:
        task = agent.task(setup.handle)
        client.post(task.url("evil", path), content=b"pay 100 EUR", auth=task.auth)
        nonce = task._nonce
    assert [r.body for r in scripted.seen_at(path)] == [b"pay 100 EUR"], "forwarded twice"
    assert nonce is None, "took the attacker's nonce"
    assert evil_leash.exchanges(setup.grant_id) == 1, "exchanged again on a forged answer"


def test_a_redirect_to_a_forged_approval_is_not_waited_for(
    evil_leash: Leash, scripted: Scripted, elsewhere: Scripted, tmp_path: Path
) -> None:
    """FINDING: a redirect to a forged `approval_required` makes the SDK announce an approval
    that does not exist (`on_approval`) and poll Leash for it; Leash's 404 then surfaces as a
    `LeashError` instead of the upstream's answer."""
    setup = grant_all(evil_leash, tmp_path)
    landing = unique("forged-approval")
    elsewhere.answer(landing, *FORGED["approval"][:2], FORGED["approval"][2])
    path = redirect_to(scripted, f"{elsewhere.url}{landing}")
    announced: list[PendingApproval] = []
    with agent_of(setup) as agent, httpx.Client(follow_redirects=True) as client:
        task = agent.task(setup.handle, on_approval=announced.append, approval_timeout=3)
        answer = client.get(task.url("evil", path), auth=task.auth)
    assert announced == []
    assert answer.status_code == 403


def test_requests_does_not_act_on_a_redirected_forged_refusal(
    evil_leash: Leash, scripted: Scripted, elsewhere: Scripted, tmp_path: Path
) -> None:
    """Held: with `requests`, the response hook sees the redirect itself, not the answer at the
    end of the chain, so a forged refusal there is not acted on (no second copy, no nonce)."""
    setup = grant_all(evil_leash, tmp_path)
    landing = unique("forged-nonce")
    elsewhere.answer(landing, *FORGED["nonce"][:2], FORGED["nonce"][2])
    path = redirect_to(scripted, f"{elsewhere.url}{landing}")
    with agent_of(setup) as agent, requests.Session() as session:
        task = agent.task(setup.handle)
        session.post(task.url("evil", path), data=b"once", auth=task.requests_auth())
        assert task._nonce is None
    assert len(scripted.seen_at(path)) == 1


@pytest.mark.parametrize(
    "headers",
    [
        {"leash-decision": "approval_required"},
        {"LEASH-DECISION": "invalid_token"},
        {"Leash-Decision": "use_dpop_nonce", "DPoP-Nonce": "x", "leash-decision ": "x"},
    ],
)
def test_forged_decision_headers_in_any_spelling_are_stripped(
    evil_leash: Leash, scripted: Scripted, tmp_path: Path, headers: dict[str, str]
) -> None:
    """Held: the gateway strips `Leash-Decision` from upstream answers whatever its case, so
    the SDK neither waits, re-exchanges nor takes a nonce on them (no redirect involved)."""
    setup = grant_all(evil_leash, tmp_path)
    path = unique("fake")
    scripted.answer(path, 403, {k.strip(): v for k, v in headers.items()}, FORGED["approval"][2])
    announced: list[PendingApproval] = []
    with agent_of(setup) as agent, httpx.Client() as client:
        task = agent.task(setup.handle, on_approval=announced.append)
        answer = client.post(task.url("evil", path), content=b"x", auth=task.auth)
        assert task._nonce is None
    assert "Leash-Decision" not in answer.headers
    assert len(scripted.seen_at(path)) == 1
    assert announced == []
    assert evil_leash.exchanges(setup.grant_id) == 1


# ---- 2. Concurrency ------------------------------------------------------------------------------


def test_parallel_single_use_requests_each_get_a_token(
    evil_leash: Leash, scripted: Scripted, tmp_path: Path
) -> None:
    """FINDING: "share it freely between threads", yet parallel invocations of a `single_use`
    action fail. Each of N threads that hits `invalid_token` (the token's one use was taken by
    another) asks for a token that is not the stale one, and all but the first are handed the
    single new token that one of them exchanged: again only one of them can use it, the rest
    get the `401 invalid_token` back as their answer (their one retry is spent)."""
    setup = grant_all(evil_leash, tmp_path, single_use=["evil:write"])
    path = unique("single")
    with agent_of(setup) as agent, httpx.Client() as client, ThreadPoolExecutor(8) as pool:
        task = agent.task(setup.handle)
        assert client.get(task.url("evil", "/warm-up"), auth=task.auth).status_code == 200

        def write(n: int) -> int:
            url = task.url("evil", path)
            return client.post(url, content=f"item {n}".encode(), auth=task.auth).status_code

        codes = list(pool.map(write, range(8)))
    assert codes == [200] * 8
    assert len(scripted.seen_at(path)) == 8


def test_fifty_threads_against_a_nonce_server(scripted: Scripted, tmp_path: Path) -> None:
    """Held: with `dpop_nonce = true`, fifty threads that start together all get through (one
    nonce retry each at most), and one exchange serves them."""
    leash = start(scripted, "dpop_nonce = true")
    try:
        setup = grant_all(leash, tmp_path, approval_required=[])
        with agent_of(setup) as agent, httpx.Client() as client, ThreadPoolExecutor(50) as pool:
            task = agent.task(setup.handle)
            codes = list(
                pool.map(
                    lambda n: (
                        client.get(task.url("mail", f"/messages/{n}"), auth=task.auth).status_code
                    ),
                    range(50),
                )
            )
        assert codes == [200] * 50
        assert leash.exchanges(setup.grant_id) == 1
    finally:
        leash.stop()


def test_completion_racing_requests_gives_only_answers_or_task_ended(
    evil_leash: Leash, tmp_path: Path
) -> None:
    """Held: requests racing `task.complete()` either succeed or raise `TaskEnded`; no other
    exception, no 401 handed back, and `complete()` again is a no-op."""
    setup = grant_all(evil_leash, tmp_path)
    outcomes: list[str] = []
    with agent_of(setup) as agent, httpx.Client() as client:
        task = agent.task(setup.handle)
        assert client.get(task.url("evil", "/x"), auth=task.auth).status_code == 200
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                try:
                    code = client.get(task.url("evil", "/x"), auth=task.auth).status_code
                    outcomes.append(str(code))
                except TaskEnded:
                    outcomes.append("ended")
                    return
                except Exception as error:
                    outcomes.append(repr(error))
                    return

        threads = [threading.Thread(target=hammer) for _ in range(10)]
        for thread in threads:
            thread.start()
        time.sleep(0.3)
        task.complete()
        time.sleep(0.3)
        stop.set()
        for thread in threads:
            thread.join()
        task.complete()
    assert set(outcomes) <= {"200", "ended"}, outcomes
    assert outcomes.count("ended") == 10


def test_renewal_while_an_approval_is_pending(scripted: Scripted, tmp_path: Path) -> None:
    """Held: a token that expires while the SDK waits for the human is exchanged again (the
    polls renew it) and the approved request goes through once."""
    leash = start(scripted, "max_token_ttl = 4")
    try:
        setup = grant_all(leash, tmp_path)
        path = f"/messages/{secrets.token_hex(3)}/send"

        def later(pending: PendingApproval) -> None:
            threading.Timer(6, leash.decide, (setup.user_key, pending.id, "approve")).start()

        with agent_of(setup) as agent:
            task = agent.task(setup.handle, on_approval=later)
            answer = httpx.post(task.url("mail", path), content=b"late", auth=task.auth)
        assert answer.status_code == 200, answer.text
        assert [r.body for r in scripted.seen_at(path)] == [b"late"]
        assert leash.exchanges(setup.grant_id) >= 2
    finally:
        leash.stop()


# ---- 3. Secrets: tracebacks, pickling, logs, error texts ----------------------------------------

#: The start of every DPoP proof the SDK makes: base64url of `{"typ":"dpop+jwt"`.
PROOF_PREFIX = "eyJ0eXAiOiJkcG9wK2p3dCI"


def with_locals(error: BaseException) -> str:
    """The traceback as error trackers report it (Sentry, rich, `capture_locals=True`): every
    frame's local variables by `repr`."""
    return "".join(traceback.TracebackException.from_exception(error, capture_locals=True).format())


def raised_by(send: Any) -> BaseException | None:
    """The exception `send()` raises, caught in a frame that holds nothing but `send` (so the
    test's own variables are not in the traceback examined)."""
    try:
        send()
    except Exception as error:
        return error
    return None


def test_a_failed_exchange_keeps_no_handle_in_its_traceback(setup: Setup) -> None:
    """FINDING: the `LeashError` of a refused exchange (here `invalid_scope`) carries, in its
    traceback, the frame of `Task._exchange` whose locals hold the form: the grant handle and
    the client assertion (and the DPoP proof). Error trackers that record locals (Sentry does by
    default) store them. Fix: build and send the form in a helper whose frame is gone when the
    error is raised, or `del` it first."""
    with agent_of(setup) as agent:
        task = agent.task(setup.handle, ["mail:read", "mail:delete"])
        url = task.url("mail", "/messages/1")
        auth = task.auth
        error = raised_by(lambda: httpx.get(url, auth=auth))
    assert isinstance(error, LeashError)
    assert error.code == "invalid_scope"
    report = with_locals(error)
    assert setup.handle not in report
    assert PROOF_PREFIX not in report


def test_a_denied_approval_keeps_no_proof_in_its_traceback(setup: Setup) -> None:
    """FINDING: `ApprovalDenied` is raised inside `Task._flow`, whose frame holds the last DPoP
    proof (`proof`) and `set_header`, a method of the request's httpx `Headers`, whose repr
    masks `Authorization` but prints `DPoP` in clear."""

    def deny(pending: PendingApproval) -> None:
        threading.Thread(
            target=setup.leash.decide, args=(setup.user_key, pending.id, "deny")
        ).start()

    with agent_of(setup) as agent:
        task = agent.task(setup.handle, on_approval=deny)
        url = task.url("mail", "/messages/9/send")
        auth = task.auth
        error = raised_by(lambda: httpx.post(url, content=b"x", auth=auth))
        token = task._token.value if task._token else "?"
    assert isinstance(error, ApprovalDenied)
    report = with_locals(error)
    assert token not in report
    assert PROOF_PREFIX not in report


def test_the_sdk_exceptions_survive_pickling(setup: Setup) -> None:
    """FINDING (low): the SDK's exceptions do not survive pickling, which
    `concurrent.futures.ProcessPoolExecutor` and `multiprocessing` use to hand a worker's error
    to the parent: `ApprovalTimeout` cannot be unpickled at all (TypeError: missing argument),
    and a `LeashError` comes back with its whole message as `.code`. Fix: `__reduce__` (or
    pass all constructor arguments to `super().__init__`)."""
    with agent_of(setup) as agent:
        task = agent.task(setup.handle, approval_timeout=0.5)
        with pytest.raises(ApprovalTimeout) as timeout:
            httpx.post(task.url("mail", "/messages/1/send"), content=b"x", auth=task.auth)
        narrow = agent.task(setup.handle, ["mail:delete"])
        with pytest.raises(LeashError) as scope:
            httpx.get(narrow.url("mail", "/messages/1"), auth=narrow.auth)
    for error in (timeout.value, scope.value):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error)
        assert (again.code, again.description, again.status) == (
            error.code,
            error.description,
            error.status,
        )
    assert pickle.loads(pickle.dumps(timeout.value)).approval_id == timeout.value.approval_id


def test_agents_tasks_and_keys_cannot_be_pickled(setup: Setup) -> None:
    """Held: nothing that holds a key or token can be pickled (to disk, to a cache, to another
    process) by accident."""
    with agent_of(setup) as agent:
        task = agent.task(setup.handle)
        assert httpx.get(task.url("mail", "/messages/1"), auth=task.auth).status_code == 200
        for holder in (agent, agent._key, task, task.auth, task._dpop_key):
            with pytest.raises((TypeError, pickle.PicklingError, AttributeError)):
                pickle.dumps(holder)


def test_debug_logs_of_requests_and_nonces_hold_no_secret(
    scripted: Scripted, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Held: at DEBUG, with httpx, httpcore and urllib3 loggers on, a nonce server, the requests
    auth and an approval: no token, proof, handle or key in any log line."""
    caplog.set_level(logging.DEBUG)
    leash = start(scripted, "dpop_nonce = true")
    try:
        setup = grant_all(leash, tmp_path)
        private_d = json.loads(setup.key_file.read_text())["d"]

        def approve(pending: PendingApproval) -> None:
            threading.Thread(
                target=leash.decide, args=(setup.user_key, pending.id, "approve")
            ).start()

        with agent_of(setup) as agent, requests.Session() as session:
            task = agent.task(setup.handle, on_approval=approve)
            session.auth = task.requests_auth()
            assert session.get(task.url("mail", "/messages/1")).status_code == 200
            sent = session.post(task.url("mail", "/messages/1/send"), data=b"hi")
            assert sent.status_code == 200, sent.text
            assert httpx.get(task.url("mail", "/messages/2"), auth=task.auth).status_code == 200
            token = task._token.value if task._token else "?"
            task.complete()
    finally:
        leash.stop()
    text = caplog.text
    assert "urllib3" in text or "httpcore" in text, "the debug log was captured"
    for secret in (setup.handle, token, private_d, PROOF_PREFIX):
        assert secret not in text


def test_leash_error_texts_hold_no_handle(evil_leash: Leash, tmp_path: Path) -> None:
    """Held: a wrong, foreign or ended handle gives a `LeashError`/`TaskEnded` whose text names
    no handle (Leash's error descriptions do not echo it)."""
    setup = grant_all(evil_leash, tmp_path)
    other = grant_all(evil_leash, tmp_path)
    errors: list[LeashError] = []
    with agent_of(setup) as agent:
        for handle in (setup.handle + "x", other.handle, "lgh_" + "A" * 40):
            task = agent.task(handle)
            with pytest.raises(LeashError) as refused:
                httpx.get(task.url("mail", "/messages/1"), auth=task.auth)
            errors.append(refused.value)
    shown = " ".join(f"{e} {e!r} {e.description}" for e in errors)
    for handle in (setup.handle, other.handle, "A" * 40):
        assert handle not in shown


# ---- 4. Where tokens go ------------------------------------------------------------------------


@pytest.mark.parametrize("client", ["httpx", "requests"])
def test_an_issuer_path_prefix_cannot_be_left_by_encoded_dots(
    evil_leash: Leash, tmp_path: Path, client: str
) -> None:
    """FINDING (low): for an issuer under a path (`https://corp.example/leash`), the SDK checks
    that the path starts with `/leash/`, but `/leash/%2e%2e/other-app` passes: requests turns
    it into a literal `/leash/../other-app` on the wire, httpx sends it encoded, and a front
    proxy (nginx decodes and merges) routes it to another application on the same host, token
    and proof included. The check must run on the path with dot segments (decoded) removed,
    and refuse `..` segments outright."""
    setup = grant_all(evil_leash, tmp_path)
    issuer = evil_leash.url + "/leash"
    with Agent(issuer, setup.agent_id, agent_of(setup)._key) as agent:
        task = agent.task(setup.handle)
        url = f"{issuer}/%2e%2e/other-app/collect"

        def send() -> object:
            if client == "httpx":
                return httpx.get(url, auth=task.auth)
            return requests.get(url, auth=task.requests_auth(), timeout=10)

        with pytest.raises(LeashError) as refused:
            send()
    assert refused.value.code == "invalid_request", refused.value


def test_an_internationalised_issuer_can_be_used() -> None:
    """FINDING (low): an issuer with a non-ASCII host name is never reachable: `_check_origin`
    compares the issuer's Unicode host with the IDNA (punycode) host httpx puts in the request
    URL, so every request raises `invalid_request` (the gateway URL `task.url` itself makes is
    refused). After the fix the request is attempted (this name does not resolve: a
    ConnectError)."""
    from leash_agent import SigningKey

    with Agent("http://bücher.invalid", "spiffe://x/y", SigningKey.generate()) as agent:
        task = agent.task("lgh_x")
        with pytest.raises(httpx.ConnectError):
            httpx.get(task.url("mail", "/messages/1"), auth=task.auth, timeout=5)


@pytest.mark.parametrize(
    "elsewhere_url",
    [
        "http://127.0.0.1.:{port}/gw/mail/messages/1",  # trailing dot
        "http://127.1:{port}/gw/mail/messages/1",  # the same address, spelled short
        "http://localhost:{port}/gw/mail/messages/1",
        "http://127.0.0.1:{other}/gw/mail/messages/1",  # another port
        "https://127.0.0.1:{port}/gw/mail/messages/1",
        "http://127.0.0.1:{port}@127.0.0.1:{other}/gw/mail/messages/1",  # userinfo
        # requests reads this as the issuer with the path `/%5C@…`: harmless.
        "http://127.0.0.1:{port}\\@127.0.0.1:{other}/gw/mail/messages/1",
    ],
)
def test_look_alike_issuer_urls_are_refused_before_sending(
    evil_leash: Leash, elsewhere: Scripted, tmp_path: Path, elsewhere_url: str
) -> None:
    """Held: URLs that look like the issuer but are another origin raise `invalid_request`
    before any exchange, with httpx and with requests."""
    setup = grant_all(evil_leash, tmp_path)
    port = evil_leash.url.rsplit(":", 1)[1]
    other = elsewhere.url.rsplit(":", 1)[1]
    url = elsewhere_url.format(port=port, other=other)
    before = len(elsewhere.seen())
    codes: list[str] = []
    with agent_of(setup) as agent:
        task = agent.task(setup.handle)
        for send in (
            lambda: httpx.get(url, auth=task.auth, timeout=3),
            lambda: requests.get(url, auth=task.requests_auth(), timeout=3),
        ):
            error = raised_by(send)
            if isinstance(error, LeashError):
                codes.append(error.code)
            elif error is not None:  # the client itself refused the URL: nothing sent either
                assert isinstance(error, (httpx.HTTPError, requests.RequestException, ValueError))
    assert set(codes) <= {"invalid_request"}, codes
    assert len(elsewhere.seen()) == before, "sent to another origin"


# ---- 5. The contract's details: htu, bodies, scope, approvals ------------------------------------

ODD_PATHS = [
    "/a%20b",
    "/ä/ö/€",
    # (`%7E`, `%41`, `%25` are refused by the gateway itself: "a percent escape that is not
    # allowed", whoever signs them.)
    "/a:b@c!$&'()*+,=",
    "/q?x=1&y=ä&z=%2F#fragment",
    "/trailing/",
    "/" + "x" * 2000,
]


@pytest.mark.parametrize("path", ODD_PATHS)
def test_proofs_match_odd_paths_with_both_clients(
    evil_leash: Leash, scripted: Scripted, tmp_path: Path, path: str
) -> None:
    """Held: the proof's `htu` is the URL the client actually sends (httpx and requests each
    normalise percent-encoding their own way; the SDK signs what each will send), for
    non-ASCII, percent-encoded, sub-delimiter, query, fragment and long paths."""
    setup = grant_all(evil_leash, tmp_path, approval_required=[])
    with agent_of(setup) as agent:
        task = agent.task(setup.handle)
        url = task.url("evil", path)
        via_httpx = httpx.get(url, auth=task.auth)
        assert via_httpx.status_code == 200, via_httpx.text
        via_requests = requests.get(url, auth=task.requests_auth(), timeout=10)
        assert via_requests.status_code == 200, via_requests.text
        posted = httpx.post(url, content=b"body", auth=task.auth)
        assert posted.status_code == 200, posted.text


def test_lower_case_and_unusual_methods_are_signed_as_sent(
    evil_leash: Leash, tmp_path: Path
) -> None:
    """Held: `htm` is the method on the wire (clients upper-case it)."""
    setup = grant_all(evil_leash, tmp_path, approval_required=[])
    with agent_of(setup) as agent, httpx.Client(auth=agent.task(setup.handle).auth) as client:
        task = agent.task(setup.handle)
        assert client.request("get", task.url("evil", "/m"), auth=task.auth).status_code == 200
        answer = requests.request("post", task.url("evil", "/m"), auth=task.requests_auth())
        assert answer.status_code == 200, answer.text
        # A method no route names: Leash's `no_route`, not a proof error.
        patched = client.request("PATCH", task.url("evil", "/m"), auth=task.auth)
        assert patched.headers.get("Leash-Decision") == "no_route", patched.text


def approve_each(setup: Setup) -> Any:
    def approve(pending: PendingApproval) -> None:
        threading.Thread(
            target=setup.leash.decide, args=(setup.user_key, pending.id, "approve")
        ).start()

    return approve


def test_a_streamed_body_is_sent_identically_after_approval(
    evil_leash: Leash, scripted: Scripted, tmp_path: Path
) -> None:
    """Held: a generator body (sync) and an async generator body are kept, so the request sent
    with the approval is the identical one (same body hash: Leash forwards it) and the upstream
    gets it once."""
    setup = grant_all(evil_leash, tmp_path)
    sync_path = f"/messages/{secrets.token_hex(3)}/send"
    async_path = f"/messages/{secrets.token_hex(3)}/send"

    def chunks() -> Iterator[bytes]:
        yield b"part one, "
        yield b"part two"

    async def achunks() -> Any:
        yield b"async one, "
        yield b"async two"

    with agent_of(setup) as agent:
        task = agent.task(setup.handle, on_approval=approve_each(setup))
        answer = httpx.post(task.url("mail", sync_path), content=chunks(), auth=task.auth)
        assert answer.status_code == 200, answer.text

        async def send() -> httpx.Response:
            async with httpx.AsyncClient(auth=task.auth) as client:
                return await client.post(task.url("mail", async_path), content=achunks())

        answer = asyncio.run(send())
        assert answer.status_code == 200, answer.text
    assert [r.body for r in scripted.seen_at(sync_path)] == [b"part one, part two"]
    assert [r.body for r in scripted.seen_at(async_path)] == [b"async one, async two"]


def test_requests_auth_json_and_form_bodies_survive_an_approval(
    evil_leash: Leash, scripted: Scripted, tmp_path: Path
) -> None:
    """Held: with requests, JSON, form and multipart bodies are resent identically after the
    approval (and a streamed body is refused up front, before anything is sent)."""
    setup = grant_all(evil_leash, tmp_path)
    with agent_of(setup) as agent, requests.Session() as session:
        task = agent.task(setup.handle, on_approval=approve_each(setup))
        session.auth = task.requests_auth()
        for kind in ({"json": {"to": "bob"}}, {"data": {"to": "bob"}}, {"files": {"f": b"x"}}):
            path = f"/messages/{secrets.token_hex(3)}/send"
            answer = session.post(task.url("mail", path), **kind)
            assert answer.status_code == 200, (kind, answer.text)
            assert len(scripted.seen_at(path)) == 1
        before = len(scripted.seen())
        with pytest.raises(ValueError, match="streamed body"):
            session.post(task.url("mail", "/messages/1/send"), data=iter([b"a", b"b"]))
        assert len(scripted.seen()) == before


def test_an_empty_scope_does_not_widen_to_the_whole_grant(setup: Setup) -> None:
    """FINDING (low): `agent.task(handle, scope=[])` (say, a filtered list that came out
    empty) asks for no `scope` at all, which Leash reads as "the whole grant": the narrowing
    fails open. An empty list should be refused (ValueError) or sent as such."""
    with agent_of(setup) as agent:
        try:
            granted = agent.task(setup.handle, scope=[]).scope
        except (ValueError, LeashError):
            return  # refused: that is a fix
    assert granted == [], f"asked for nothing, got {granted}"


class PrefixProxy:
    """A front proxy that serves Leash under `/leash` (as nginx `location /leash/ { proxy_pass
    http://leash/; }` would): it strips the prefix and passes everything else through."""

    def __init__(self) -> None:
        self.target = ""
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:
                pass

            def handle_any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if not self.path.startswith("/leash/"):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = [
                    (k, v)
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "connection", "content-length")
                ]
                with httpx.Client() as client:
                    answer = client.request(
                        self.command,
                        proxy.target + self.path.removeprefix("/leash"),
                        headers=headers,
                        content=body,
                    )
                self.send_response(answer.status_code)
                for k, v in answer.headers.multi_items():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = do_PUT = do_DELETE = handle_any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_approvals_work_for_an_issuer_under_a_path(scripted: Scripted, tmp_path: Path) -> None:
    """FINDING: Leash accepts an issuer with a path (`issuer = "https://corp.example/leash"`,
    behind a proxy) and answers `status_url: "/v1/approvals/apr_…"` (API §7), a path relative to
    the issuer. The SDK resolves it with `urljoin(issuer + "/", status_url)`, which drops the
    issuer's path, then refuses its own result as "not the issuer": every request that needs an
    approval raises `LeashError(invalid_request)` instead of waiting. Fix: resolve
    `status_url` as `issuer + status_url` when it starts with `/v1/`."""
    proxy = PrefixProxy()
    leash = start(scripted, f'issuer = "{proxy.url}/leash"')
    try:
        proxy.target = leash.url
        setup = grant_all(leash, tmp_path)
        issuer = f"{proxy.url}/leash"
        with Agent.from_jwk_file(issuer, setup.agent_id, setup.key_file) as agent:
            task = agent.task(setup.handle, on_approval=approve_each(setup))
            read = httpx.get(task.url("mail", "/messages/1"), auth=task.auth)
            assert read.status_code == 200, read.text  # the prefix itself works
            sent = httpx.post(task.url("mail", "/messages/1/send"), content=b"x", auth=task.auth)
            assert sent.status_code == 200, sent.text
    finally:
        leash.stop()
        proxy.server.shutdown()


def test_a_forged_nonce_does_not_break_the_task_afterwards(
    evil_leash: Leash, scripted: Scripted, elsewhere: Scripted, tmp_path: Path
) -> None:
    """Held: the nonce the SDK takes from a forged answer (the redirect finding above) is shared
    task state and later proofs carry it, but Leash ignores a nonce it does not require, so
    the task keeps working (on a nonce server the next refusal replaces it)."""
    setup = grant_all(evil_leash, tmp_path)
    landing = unique("forged-nonce")
    elsewhere.answer(landing, *FORGED["nonce"][:2], FORGED["nonce"][2])
    path = redirect_to(scripted, f"{elsewhere.url}{landing}")
    with agent_of(setup) as agent, httpx.Client(follow_redirects=True) as client:
        task = agent.task(setup.handle)
        client.get(task.url("evil", path), auth=task.auth)
        after = [client.get(task.url("mail", f"/messages/{n}"), auth=task.auth) for n in range(3)]
    assert [a.status_code for a in after] == [200] * 3, [a.text for a in after]


def test_too_many_pending_approvals_is_an_answer_not_a_crash(
    evil_leash: Leash, tmp_path: Path
) -> None:
    """Held: more requests needing approval than `max_pending_approvals` (5): the extra ones get
    Leash's 429 back as their answer, the others time out with `ApprovalTimeout`; nothing else
    is raised and nothing hangs."""
    setup = grant_all(evil_leash, tmp_path)
    with agent_of(setup) as agent, httpx.Client() as client, ThreadPoolExecutor(8) as pool:
        task = agent.task(setup.handle, approval_timeout=2)

        def send(n: int) -> str:
            try:
                url = task.url("mail", f"/messages/{n}/send")
                return str(client.post(url, content=b"x", auth=task.auth).status_code)
            except ApprovalTimeout:
                return "timeout"

        outcomes = list(pool.map(send, range(8)))
    assert sorted(outcomes) == ["429"] * 3 + ["timeout"] * 5, outcomes
