"""A browser agent through Leash's forward proxy (API §16, ATTACKS 36-41): Playwright drives
Debian's chromium (tests/idp_fixtures.py's `CHROMIUM`) through the real `leash` binary's proxy
to a real HTTPS web app that knows only browser sessions (tests/browser_app.py).

The browser trusts Leash's proxy CA (`GET /v1/proxy/ca`) for real: the CA is added to an NSS
database in a HOME of its own (`certutil`, Debian's libnss3-tools); no certificate error is
ignored anywhere. The agent's `lpx_` credential comes from the token exchange and is given to
the browser as its proxy login (`leash` and the credential), which the browser sends after
Leash's `407`. The human logs in at the app, and only the vault holds the session cookie."""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser_app import BrowserApp
from conftest import REPO, Leash, Setup, Upstream, set_up
from idp_fixtures import CHROMIUM
from playwright.sync_api import Browser, BrowserContext, Page, Response
from playwright.sync_api import Error as PlaywrightError
from proxy_fixtures import (
    REALM,
    Answer,
    AppRequest,
    Closed,
    Proxy,
    basic,
    connect,
    in_tunnel,
    launch_chromium,
    pending_approvals,
    plain,
    proxy_listening,
    proxy_toml,
    revoke,
    trusting_home,
    upstream_toml,
)

from leash_agent import Agent

PORTAL = "https://portal.test"


def portal_config(app: BrowserApp) -> str:
    """`[proxy]` and the upstream `portal` (the app, at `portal.test` for the browser), and an
    upstream `other` (the same app at `other.test`) that the tests' grants never name."""
    routes = [
        ("GET", "/ledger/**", "read"),
        ("GET", "/rotate", "read"),
        ("GET", "/transfer", "read"),
        ("POST", "/transfer", "transfer"),
        ("GET", "/cookies", "read"),
        ("GET", "/echo/*", "read"),
    ]
    return "\n".join(
        [
            proxy_toml(approval_wait=20),
            upstream_toml(
                "portal", app.url, ["portal.test"], routes, app.ca_file, high_risk={"transfer"}
            ),
            upstream_toml(
                "other", app.url, ["other.test"], [("GET", "/ledger/**", "read")], app.ca_file
            ),
        ]
    )


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserApp]:
    portal = BrowserApp(tmp_path_factory.mktemp("portal"))
    yield portal
    portal.stop()


@pytest.fixture(scope="module")
def proxy(
    upstream: Upstream, app: BrowserApp, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    leash = Leash(upstream, portal_config(app))
    try:
        ca_file = tmp_path_factory.mktemp("leash-ca") / "ca.pem"
        yield Proxy(leash, proxy_listening(leash, ca_file), ca_file, "portal.test")
    finally:
        leash.stop()


@pytest.fixture(scope="module")
def nss_home(proxy: Proxy, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HOME whose NSS database (the one chromium reads on Linux) trusts Leash's proxy CA to
    identify web sites, and nothing else of ours."""
    return trusting_home(tmp_path_factory, proxy.ca_file)


@pytest.fixture(scope="module")
def proxied_browser(nss_home: Path) -> Iterator[Browser]:
    """Headless chromium with `nss_home` as its HOME, so that it trusts Leash's proxy CA
    (Playwright's own switches keep `http://` navigations on HTTP)."""
    with launch_chromium(nss_home) as browser:
        yield browser


def proxy_credential(leash: Leash, setup: Setup, agent: Agent) -> str:
    """The agent's `lpx_` credential for its grant (token exchange, API §3.1 and §16), as the
    SDK gets it."""
    credential = agent.task(handle=setup.handle).proxy_credential()
    assert credential.startswith("lpx_"), credential[:8]
    return credential


@dataclass
class Task:
    """A human with a session at the portal (vaulted, never in the browser), their grant to a
    browser agent, the agent's proxy credential, and the browser page the agent drives."""

    proxy: Proxy
    app: BrowserApp
    setup: Setup
    user: str  # the human's user name at the portal
    sid: str  # the session id the human vaulted
    credential: str
    context: BrowserContext
    page: Page

    @property
    def leash(self) -> Leash:
        return self.proxy.leash

    def mine(self, requests: list[AppRequest]) -> list[AppRequest]:
        """Those of `requests` made for this task's human (Leash names them in
        `Leash-Subject`)."""
        subject = self.setup.grant["subject"]
        return [r for r in requests if r.header("leash-subject") == [subject]]


@pytest.fixture
def make_task(
    proxy: Proxy, app: BrowserApp, proxied_browser: Browser, tmp_path: Path
) -> Iterator[Callable[..., Task]]:
    """`make_task(actions=[...])`: a `Task` whose grant has `actions` on `portal` (default: read
    and transfer) and no `approval_required` of its own (the transfer's `risk = "high"` asks)."""
    closing: list[Callable[[], None]] = []

    def make(actions: tuple[str, ...] = ("portal:read", "portal:transfer")) -> Task:
        setup = set_up(
            proxy.leash,
            tmp_path,
            upstreams=["portal"],
            actions=list(actions),
            approval_required=[],
            purpose="Pay the supplier through the portal",
        )
        user = f"alice-{secrets.token_hex(4)}"
        password = secrets.token_urlsafe(12)
        app.add_user(user, password)
        sid = app.log_in(user, password)
        vaulted = proxy.leash.call(
            "PUT", "/v1/vault/portal", setup.user_key, {"kind": "cookie", "secret": f"sid={sid}"}
        )
        assert vaulted.status_code in (200, 201, 204), vaulted.text
        agent = Agent.from_jwk_file(proxy.leash.url, setup.agent_id, setup.key_file)
        closing.append(agent.close)
        credential = proxy_credential(proxy.leash, setup, agent)
        context = proxied_browser.new_context(
            proxy={"server": proxy.server, "username": "leash", "password": credential}
        )
        closing.append(context.close)
        context.set_default_timeout(15_000)
        return Task(proxy, app, setup, user, sid, credential, context, context.new_page())

    yield make
    for close in reversed(closing):
        close()


@pytest.fixture
def task(make_task: Callable[..., Task]) -> Task:
    return make_task()


def goto(page: Page, url: str) -> Response:
    response = page.goto(url)
    assert response is not None, url
    return response


def refused_navigation(page: Page, url: str) -> str:
    """Navigates to `url`, which must not load the upstream's page: returns how it ended (the
    browser's network error, or the status of the refusal it showed)."""
    try:
        response = page.goto(url, timeout=10_000)
    except PlaywrightError as error:
        return str(error).splitlines()[0]
    assert response is not None, url
    assert response.status >= 400, (url, response.status, page.content()[:300])
    return str(response.status)


def decide_when_asked(task: Task, decision: str) -> Future[dict[str, Any]]:
    """The human, in another thread: waits for the grant's pending approval through the API,
    notes it and the transfers the app has done for the human by then, then decides it."""

    def human() -> dict[str, Any]:
        deadline = time.monotonic() + 20
        with httpx.Client(base_url=task.leash.url, timeout=10) as http:
            headers = {"Authorization": f"Bearer {task.setup.user_key}"}
            while time.monotonic() < deadline:
                answer = http.get("/v1/approvals?status=pending", headers=headers)
                assert answer.status_code == 200, answer.text
                mine = [
                    a for a in answer.json()["approvals"] if a["grant_id"] == task.setup.grant_id
                ]
                if mine:
                    done_then = [t for t in task.app.transfers() if t.user == task.user]
                    decided = http.post(
                        f"/v1/approvals/{mine[0]['id']}/{decision}", headers=headers
                    )
                    assert decided.status_code == 200, decided.text
                    return {"approval": mine[0], "transfers_then": len(done_then)}
                time.sleep(0.05)
        raise AssertionError("no pending approval appeared within 20 s")

    executor = ThreadPoolExecutor(max_workers=1)
    future = executor.submit(human)
    executor.shutdown(wait=False)
    return future


# --- the browser works as the human ------------------------------------------------------------


def test_the_browser_reads_the_ledger_as_the_human(task: Task, app: BrowserApp) -> None:
    mark = app.mark()
    response = goto(task.page, f"{PORTAL}/ledger/2024")
    assert response.status == 200, task.page.content()[:500]
    assert task.page.text_content("#user") == task.user
    assert task.page.text_content("#path") == "/ledger/2024"
    received = [r for r in app.since(mark) if r.path == "/ledger/2024"]
    assert len(received) == 1, received
    got = received[0]
    # The vaulted session, and Leash's attribution headers (API §6 step 8).
    assert [v for n, v in got.cookies() if n == "sid"] == [task.sid]
    assert got.header("leash-subject") == [task.setup.grant["subject"]]
    assert got.header("leash-actor") == [task.setup.agent_id]
    assert got.header("leash-grant") == [task.setup.grant_id]
    assert not got.header("proxy-authorization")
    assert all(task.credential not in value for _, value in got.headers)
    # Audited as a delegated request that came through the proxy.
    events = [e for e in task.leash.audit(task.setup.grant_id) if e["path"] == "/ledger/2024"]
    allowed = [e for e in events if e["decision"] == "allow"]
    assert allowed, events
    assert allowed[-1]["mode"] == "delegated", allowed[-1]
    assert allowed[-1].get("via") == "proxy", allowed[-1]


def test_the_browser_never_holds_the_session_cookie_before_or_after_rotation(
    task: Task, app: BrowserApp
) -> None:
    mark = app.mark()
    responses: list[Response] = []

    def note(response: Response) -> None:
        responses.append(response)

    task.page.on("response", note)

    def script_sees() -> str:
        assert goto(task.page, f"{PORTAL}/cookies").status == 200
        seen = task.page.text_content("#cookies") or ""
        # The page's script ran (it sets `theme` itself).
        assert seen.startswith("cookies:"), seen
        assert "theme=dark" in seen, seen
        return seen

    def browser_jar() -> list[tuple[str, str]]:
        return [(c.get("name", ""), c.get("value", "")) for c in task.context.cookies()]

    before = script_sees()
    assert "sid" not in before, before
    assert task.sid not in before
    assert [name for name, _ in browser_jar()] in ([], ["theme"]), browser_jar()
    assert goto(task.page, f"{PORTAL}/rotate").status == 200
    rotated = [s for s, user in app.sessions().items() if user == task.user]
    assert len(rotated) == 1, "the app rotated the session"
    after = script_sees()
    for value in ("sid", task.sid, rotated[0], "seen"):
        assert value not in after, (value, after)
    jar = browser_jar()
    assert [name for name, _ in jar] == ["theme"], jar
    assert all(value not in (task.sid, rotated[0]) for _, value in jar)
    # No answer the browser got set a cookie (the app's `Set-Cookie` stays in Leash's jar).
    for response in responses:
        headers = {k.lower(): v for k, v in response.all_headers().items()}
        assert "set-cookie" not in headers, (response.url, headers["set-cookie"])
    # The app got the human's session, never the browser's own cookie (`theme`) nor the proxy
    # credential.
    received = app.since(mark)
    assert task.mine(received), "nothing reached the app"
    first = next(r for r in received if r.path == "/cookies")
    assert [v for n, v in first.cookies() if n == "sid"] == [task.sid]
    for request in received:
        assert not request.header("proxy-authorization"), request
        assert "theme" not in [n for n, _ in request.cookies()], request
        assert all(task.credential not in value for _, value in request.headers), request


def test_after_rotation_the_next_request_carries_the_new_session(
    task: Task, app: BrowserApp
) -> None:
    assert goto(task.page, f"{PORTAL}/ledger/before").status == 200
    assert goto(task.page, f"{PORTAL}/rotate").status == 200
    assert task.page.text_content("#rotated") == f"New session for {task.user}"
    sessions = app.sessions()
    assert task.sid not in sessions, "the app invalidated the vaulted session"
    new = [s for s, user in sessions.items() if user == task.user]
    assert len(new) == 1
    mark = app.mark()
    response = goto(task.page, f"{PORTAL}/ledger/after")
    assert response.status == 200, task.page.content()[:500]
    assert task.page.text_content("#user") == task.user
    got = [r for r in app.since(mark) if r.path == "/ledger/after"]
    assert len(got) == 1, got
    assert [v for n, v in got[0].cookies() if n == "sid"] == new, got[0].header("cookie")
    # And the one after that too.
    assert goto(task.page, f"{PORTAL}/ledger/later").status == 200
    assert task.page.text_content("#user") == task.user


def test_two_humans_browsers_keep_their_own_sessions(
    make_task: Callable[..., Task], app: BrowserApp
) -> None:
    first, second = make_task(), make_task()
    assert goto(first.page, f"{PORTAL}/rotate").status == 200
    rotated = [s for s, user in app.sessions().items() if user == first.user]
    assert len(rotated) == 1
    mark = app.mark()
    for task, sid in ((second, second.sid), (first, rotated[0])):
        assert goto(task.page, f"{PORTAL}/ledger/mine").status == 200
        assert task.page.text_content("#user") == task.user
        got = [r for r in task.mine(app.since(mark)) if r.path == "/ledger/mine"]
        assert len(got) == 1, got
        assert [v for n, v in got[0].cookies() if n == "sid"] == [sid], task.user


def test_an_answer_reflecting_the_session_never_reaches_the_browser(
    task: Task, app: BrowserApp
) -> None:
    """API §16: an answer that echoes an injected secret is refused: the vaulted cookie, and
    after a rotation the one Leash keeps in the grant's jar and sends in its place."""

    def never_shown(sid: str) -> None:
        mark = app.mark()
        # In a header: refused before anything is sent.
        response = goto(task.page, f"{PORTAL}/echo/header")
        assert response.status == 502, task.page.content()[:500]
        assert response.header_value("leash-decision") == "credential_reflected"
        assert response.header_value("x-seen-cookie") is None
        assert sid not in task.page.content()
        # In the body (the answer is cut off where it appears, or closed unanswered): every
        # byte that came out of the tunnel, and what the browser shows.
        try:
            answer = in_tunnel(
                task.proxy,
                task.credential,
                "GET /echo/body HTTP/1.1\r\nHost: portal.test\r\nConnection: close\r\n\r\n",
            )
        except Closed:
            answer = Answer(0, [], b"")
        assert sid.encode() not in answer.body
        assert all(sid not in v for _, v in answer.headers)
        # (A navigation whose body was cut off never finishes loading: wait for its answer.)
        with contextlib.suppress(PlaywrightError):
            task.page.goto(f"{PORTAL}/echo/body", wait_until="commit", timeout=5_000)
        task.page.wait_for_timeout(300)
        assert sid not in task.page.content()
        # The app did echo it: each of the three reached it with the session.
        echoed = [r for r in app.since(mark) if r.path.startswith("/echo/")]
        assert len(echoed) == 3, echoed
        for request in echoed:
            assert [v for n, v in request.cookies() if n == "sid"] == [sid]

    never_shown(task.sid)
    assert goto(task.page, f"{PORTAL}/rotate").status == 200
    rotated = [s for s, user in app.sessions().items() if user == task.user]
    assert len(rotated) == 1
    never_shown(rotated[0])


def test_plain_http_reaches_the_configured_https_upstream(task: Task, app: BrowserApp) -> None:
    mark = app.mark()
    response = goto(task.page, "http://portal.test/ledger/plain")
    assert response.status == 200, task.page.content()[:500]
    assert task.page.url == "http://portal.test/ledger/plain"
    assert task.page.text_content("#user") == task.user
    # The same by hand, with a cookie of the client's own that must not reach the app.
    answer = plain(
        task.proxy,
        "http://portal.test/ledger/raw",
        basic(task.credential),
        extra="Cookie: sid=from-the-browser\r\n",
    )
    assert answer.status == 200, answer.body[:300]
    assert f'<span id="user">{task.user}</span>'.encode() in answer.body
    received = [r for r in app.since(mark) if r.path in ("/ledger/plain", "/ledger/raw")]
    assert [r.path for r in received] == ["/ledger/plain", "/ledger/raw"]
    for request in received:
        # The app speaks only HTTPS: Leash connected with the configured scheme and port.
        assert [v for n, v in request.cookies() if n == "sid"] == [task.sid], request
        assert not request.header("proxy-authorization")
    # A plain request for a host outside the grant goes nowhere.
    for url in (
        "http://other.test/ledger/1",  # a configured upstream's host, outside this grant
        "http://example.org/",
        f"http://localhost:{app.port}/ledger/1",  # the upstream's own address
        f"http://127.0.0.1:{app.port}/ledger/1",
    ):
        refused = plain(task.proxy, url, basic(task.credential))
        assert refused.status == 403, (url, refused.status, refused.body[:200])
    assert len(app.since(mark)) == 2


# --- approvals ---------------------------------------------------------------------------------


def test_a_high_risk_transfer_waits_for_the_humans_approval(task: Task, app: BrowserApp) -> None:
    assert goto(task.page, f"{PORTAL}/transfer").status == 200
    mark = app.mark()
    human = decide_when_asked(task, "approve")
    with task.page.expect_navigation(timeout=30_000) as navigation:
        task.page.click("#submit")
    asked = human.result(timeout=30)
    response = navigation.value
    assert response is not None
    assert response.status == 200, task.page.content()[:500]
    assert "done for " + task.user in (task.page.text_content("#done") or "")
    approval = asked["approval"]
    assert approval["action"] == "portal:transfer", approval
    assert approval["method"] == "POST", approval
    assert approval["path"] == "/transfer", approval
    assert asked["transfers_then"] == 0, "the transfer ran before the human approved it"
    mine = [t for t in app.transfers() if t.user == task.user]
    assert len(mine) == 1, mine
    assert (mine[0].to, mine[0].amount) == ("bob", "100")
    posts = [r for r in app.since(mark) if r.method == "POST"]
    assert len(posts) == 1, posts
    decided = task.leash.call("GET", f"/v1/approvals/{approval['id']}", task.setup.user_key)
    assert decided.json()["status"] in ("approved", "used"), decided.text


def test_a_denied_transfer_shows_leashs_refusal_page(task: Task, app: BrowserApp) -> None:
    assert goto(task.page, f"{PORTAL}/transfer").status == 200
    mark = app.mark()
    human = decide_when_asked(task, "deny")
    started = time.monotonic()
    with task.page.expect_navigation(timeout=30_000) as navigation:
        task.page.click("#submit")
    human.result(timeout=30)
    response = navigation.value
    assert response is not None
    assert response.status == 403, task.page.content()[:500]
    assert response.header_value("leash-decision"), response.headers
    assert time.monotonic() - started < 15, "the refusal waited for approval_wait"
    assert "text/html" in (response.header_value("content-type") or "")
    assert "denied" in (task.page.text_content("body") or "").lower(), task.page.content()
    assert not [t for t in app.transfers() if t.user == task.user]
    assert not [r for r in app.since(mark) if r.method == "POST"]


# --- refusals ----------------------------------------------------------------------------------


def test_connect_outside_the_grant_is_refused(task: Task, app: BrowserApp) -> None:
    mark = app.mark()
    good = basic(task.credential)
    assert connect(task.proxy, "portal.test:443", good).status == 200
    for target in (
        "example.org:443",
        "other.test:443",  # a configured upstream's host, outside this grant
        f"localhost:{app.port}",  # the upstream's own address
        f"127.0.0.1:{app.port}",
        f"127.0.0.1:{task.proxy.proxy_port}",
        f"127.0.0.1:{task.leash.url.rsplit(':', 1)[1]}",
    ):
        answer = connect(task.proxy, target, good)
        assert answer.status == 403, (target, answer.status, answer.body[:200])
    for url in ("https://example.org/", "https://other.test/ledger/1"):
        refused_navigation(task.page, url)
    assert not app.since(mark)


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Basic " + base64.b64encode(b"leash:").decode(),
        "Basic " + base64.b64encode(b"leash:garbage").decode(),
        "Basic " + base64.b64encode(b"leash:lpx_" + secrets.token_urlsafe(40).encode()).decode(),
        "Basic !!!not-base64!!!",
        "Basic",
        "Negotiate abc",
    ],
    ids=["none", "empty", "garbage", "forged-lpx", "bad-base64", "no-value", "negotiate"],
)
def test_no_or_garbage_proxy_credential_gets_407(
    proxy: Proxy, app: BrowserApp, authorization: str | None
) -> None:
    mark = app.mark()
    answer = connect(proxy, "portal.test:443", authorization)
    assert answer.status == 407, (answer.status, answer.body[:200])
    assert answer.header("proxy-authenticate") == [REALM], answer.headers
    over_http = plain(proxy, "http://portal.test/ledger/1", authorization)
    assert over_http.status == 407, (over_http.status, over_http.body[:200])
    assert over_http.header("proxy-authenticate") == [REALM], over_http.headers
    assert not app.since(mark)


def test_a_tampered_bearer_or_revoked_credential_gets_407(task: Task, app: BrowserApp) -> None:
    assert goto(task.page, f"{PORTAL}/ledger/1").status == 200
    cred = task.credential
    tampered = cred[:-2] + ("AA" if not cred.endswith("AA") else "BB")
    for authorization in (basic(tampered), f"Bearer {cred}", f"DPoP {cred}"):
        answer = connect(task.proxy, "portal.test:443", authorization)
        assert answer.status == 407, (authorization[:12], answer.status)
        assert answer.header("proxy-authenticate") == [REALM], answer.headers
    revoked = revoke(task.leash, cred, task.setup.user_key)
    assert revoked.status_code == 200, revoked.text
    mark = app.mark()
    answer = connect(task.proxy, "portal.test:443", basic(cred))
    assert answer.status == 407, answer.status
    assert answer.header("proxy-authenticate") == [REALM], answer.headers
    over_http = plain(task.proxy, "http://portal.test/ledger/2", basic(cred))
    assert over_http.status == 407, over_http.status
    how = refused_navigation(task.page, f"{PORTAL}/ledger/3")
    assert not app.since(mark), how


def test_actions_outside_the_grant_or_without_a_route_are_refused(
    make_task: Callable[..., Task], app: BrowserApp
) -> None:
    task = make_task(actions=("portal:read",))
    assert goto(task.page, f"{PORTAL}/transfer").status == 200
    mark = app.mark()
    with task.page.expect_navigation(timeout=15_000) as navigation:
        task.page.click("#submit")
    response = navigation.value
    assert response is not None
    assert response.status == 403, task.page.content()[:500]
    assert response.header_value("leash-decision") == "insufficient_scope"
    # Refused for its scope at once: no approval was asked of the human.
    assert not pending_approvals(task.leash, task.setup)
    # A page the app has but no route names.
    assert refused_navigation(task.page, f"{PORTAL}/admin") == "403"
    assert not app.since(mark)
    assert not [t for t in app.transfers() if t.user == task.user]


def test_a_request_in_a_tunnel_for_another_host_is_refused(task: Task, app: BrowserApp) -> None:
    mark = app.mark()
    ok = in_tunnel(
        task.proxy,
        task.credential,
        "GET /ledger/tunnel HTTP/1.1\r\nHost: portal.test\r\nConnection: close\r\n\r\n",
    )
    assert ok.status == 200, ok.body[:300]
    assert f'<span id="user">{task.user}</span>'.encode() in ok.body
    assert len(app.since(mark)) == 1
    for host in ("other.test", "example.org", f"localhost:{app.port}"):
        request = f"GET /ledger/tunnel HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        try:
            answer = in_tunnel(task.proxy, task.credential, request)
        except (Closed, ssl.SSLError):
            continue  # closed unanswered: refused too
        assert answer.status in (400, 403, 421), (host, answer.status, answer.body[:200])
    assert len(app.since(mark)) == 1


def test_a_completed_grant_stops_the_browser_at_once(task: Task, app: BrowserApp) -> None:
    # A tunnel is open and in use.
    assert goto(task.page, f"{PORTAL}/ledger/1").status == 200
    done = task.leash.call(
        "POST", f"/v1/grants/{task.setup.grant_id}/complete", task.setup.user_key
    )
    assert done.status_code == 200, done.text
    completed = time.monotonic()
    mark = app.mark()
    how = refused_navigation(task.page, f"{PORTAL}/ledger/2")
    answer = connect(task.proxy, "portal.test:443", basic(task.credential))
    assert answer.status == 407, answer.status
    assert answer.header("proxy-authenticate") == [REALM], answer.headers
    assert time.monotonic() - completed < 1.5
    assert not app.since(mark), how
    # Nothing else lets it through either.
    over_http = plain(task.proxy, "http://portal.test/ledger/3", basic(task.credential))
    assert over_http.status == 407, over_http.status
    assert not app.since(mark)


def test_the_app_only_trusts_its_own_ca(app: BrowserApp) -> None:
    """The harness's own check: the app's TLS is verified against its test CA, which no system
    store holds, so Leash's `ca_file` is what lets it through."""
    with pytest.raises(httpx.ConnectError):
        httpx.get(app.url + "/login", timeout=5)
    trusted = ssl.create_default_context(cafile=str(app.ca_file))
    assert httpx.get(app.url + "/login", verify=trusted, timeout=5).status_code == 200


def test_the_example_browser_agent_does_its_task(task: Task, proxy: Proxy) -> None:
    """`examples/browser-agent/agent.py` runs as its docstring says: the SDK's proxy credential,
    its own NSS trust of the proxy CA, Chromium through the proxy, the task completed."""
    setup = task.setup
    script = REPO / "examples" / "browser-agent" / "agent.py"
    env = {
        **os.environ,
        "LEASH_GRANT_HANDLE": setup.handle,
        "LEASH_URL": proxy.leash.url,
        "LEASH_PROXY": proxy.server,
        "LEASH_CHROMIUM": CHROMIUM,
    }
    command = [
        *(sys.executable, str(script), "--id", setup.agent_id, "--key", str(setup.key_file)),
        *("--url", f"{PORTAL}/ledger/2026"),
    ]
    if os.geteuid() == 0:
        env["LEASH_CHROMIUM_ARGS"] = "--no-sandbox"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=90)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert f"opened {PORTAL}/ledger/2026: HTTP 200" in done.stdout, out
    assert task.user in done.stdout, "the page was read as the human"
    assert "cookies the browser holds: 0" in done.stdout, out
    assert task.sid not in out
    assert setup.handle not in out
    status = proxy.leash.grant_status(setup.user_key, setup.grant_id)
    assert status == "completed", status
