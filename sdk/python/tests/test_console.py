"""The web console (API §13) in a real browser (Debian's chromium, driven by Playwright), with a
real IdP (npm oidc-provider): a human logs in through the IdP's page, delegates a task, sees an
agent's pending approval appear while the agent waits, approves it and the agent's request goes
through once; revokes the task; reads the audit with its chain verified; the review; an admin's
pages. Agent-written text (a purpose, a path, a body) is shown as text, never run (ATTACKS 53).

With `LEASH_SCREENSHOTS=<dir>` the main pages are saved there (docs/console/ holds the ones the
README shows)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Leash, Setup, leash_bin
from idp_fixtures import Idp
from login_helpers import SECRET_ENV, MakeLeash, agent_for, leash_for, oidc_section
from playwright.sync_api import Dialog, Page, expect
from test_mcp_outsider2 import (
    CONFIG,
    Hostile,
    Side,
    elicit_in_background,
    elicitation,
    form,
    hostile,  # noqa: F401 (the fixture)
    server_got,
)

from leash_agent import Agent

HOSTILE = 'Weekly report <img src=x onerror="window.__pwned=1">\u202e'
SHOTS = os.environ.get("LEASH_SCREENSHOTS")


def shot(page: Page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


@pytest.fixture
def console(make_leash: MakeLeash, idp: Idp) -> Leash:
    return leash_for(make_leash, idp)


@pytest.fixture
def watched(browser_page: Page) -> Iterator[Page]:
    """The page, failing the test if anything on it opens a dialog (a sign of script run)."""
    dialogs: list[str] = []

    def record(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    browser_page.on("dialog", record)
    yield browser_page
    assert dialogs == [], dialogs
    assert browser_page.evaluate("window.__pwned") is None


def log_in(page: Page, leash: Leash, idp: Idp, username: str) -> None:
    page.goto(f"{leash.url}/console")
    page.get_by_role("link", name="Log in").click()
    page.fill("#username", username)
    page.fill("#password", idp.password(username))
    page.click("#submit")
    expect(page.locator("#who")).to_contain_text(f"{username}@example.com")


def test_a_human_delegates_approves_revokes_and_reviews_in_the_browser(
    console: Leash, idp: Idp, watched: Page, tmp_path: Path
) -> None:
    page = watched
    agent_id, key_file = agent_for(console, tmp_path)
    log_in(page, console, idp, "alice")

    # Delegate a task; the handle is shown once.
    page.goto(f"{console.url}/console#/tasks")
    page.fill("#g-agent", agent_id)
    page.fill("#g-purpose", HOSTILE)
    page.locator('[id="a-mail-mail:read"]').check()
    page.locator('[id="a-mail-mail:send"]').check()
    page.get_by_role("button", name="Delegate the task").click()
    handle_box = page.locator(".handle-box code.handle")
    expect(handle_box).to_contain_text("lgh_")
    handle = handle_box.inner_text().strip()
    shot(page, "tasks")

    # The agent's high-risk send waits for Alice.
    answers: list[httpx.Response] = []
    # Its own path: the recording upstream is shared by the session's tests.
    path = f"/messages/c{time.monotonic_ns()}/send"

    def send() -> None:
        with Agent.from_jwk_file(console.url, agent_id, key_file) as agent:
            task = agent.task(handle, approval_timeout=30)
            with httpx.Client(timeout=40) as client:
                answers.append(
                    client.post(
                        task.url("mail", f"{path}?notify=<b>x</b>"),
                        json={"to": "bob@example.com", "body": "<script>alert(1)</script>"},
                        auth=task.auth,
                    )
                )

    page.goto(f"{console.url}/console#/inbox")
    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    for _ in range(200):
        pending = console.call("GET", "/v1/approvals?status=pending", console.admin_key)
        if pending.json()["approvals"]:
            break
        time.sleep(0.05)
    asked = time.monotonic()
    card = page.locator("article.card.approval").filter(has_text=path)
    # The inbox polls every second: the card appears within 2 s of the ask, without a reload.
    expect(card).to_be_visible(timeout=5000)
    assert time.monotonic() - asked < 3, "the card took too long to appear"
    # What the agent wrote is there as text, and nothing of it ran.
    expect(card).to_contain_text(HOSTILE.replace("\u202e", ""))
    expect(card).to_contain_text("<script>alert(1)</script>")
    expect(card).to_contain_text("<b>x</b>")
    assert card.locator("img").count() == 0
    assert card.locator("script").count() == 0
    shot(page, "inbox")
    assert answers == [], "the agent's request waits for the human"

    card.get_by_role("button", name="Approve").click()
    thread.join(timeout=30)
    assert [a.status_code for a in answers] == [200]
    sends = [r for r in console.upstream.seen() if r.path.startswith(path)]
    assert len(sends) == 1

    # Revoke the task.
    page.goto(f"{console.url}/console#/tasks")
    row = page.locator("tr").filter(has_text="Weekly report")
    row.get_by_role("button", name="Revoke").click()
    page.get_by_role("button", name="Yes, revoke").click()
    grants = console.call("GET", "/v1/grants", console.admin_key).json()["grants"]
    for _ in range(50):
        grants = console.call("GET", "/v1/grants", console.admin_key).json()["grants"]
        if grants[0]["status"] == "revoked":
            break
        time.sleep(0.1)
    assert grants[0]["status"] == "revoked"

    # The audit, its chain checked in the browser.
    page.goto(f"{console.url}/console#/audit")
    expect(page.get_by_text("events verified")).to_be_visible()
    expect(page.locator("body")).to_contain_text("approval.approved")
    shot(page, "audit")

    page.goto(f"{console.url}/console#/review")
    expect(page.locator("body")).to_contain_text("mail:send")
    shot(page, "review")


def test_a_non_admin_sees_no_admin_pages_and_an_admin_does(
    console: Leash, idp: Idp, watched: Page
) -> None:
    log_in(watched, console, idp, "alice")
    expect(watched.locator("#nav")).not_to_contain_text("Admin")
    watched.goto(f"{console.url}/console#/admin/users")
    expect(watched.locator("#main")).to_contain_text("Admin only")

    watched.context.clear_cookies()
    log_in(watched, console, idp, "root")
    expect(watched.locator("#nav")).to_contain_text("Admin")
    watched.goto(f"{console.url}/console#/admin/users")
    expect(watched.locator("#main")).to_contain_text("alice@example.com")
    shot(watched, "admin-users")


def test_logging_out_in_the_browser_ends_the_session(
    console: Leash, idp: Idp, watched: Page
) -> None:
    log_in(watched, console, idp, "alice")
    watched.get_by_role("button", name="Log out").click()
    expect(watched.get_by_role("link", name="Log in")).to_be_visible()
    cookies = {c["name"] for c in watched.context.cookies()}
    assert "leash_session" not in cookies
    answer = watched.request.get(f"{console.url}/v1/me")
    assert answer.status == 401


def test_the_console_cannot_be_framed(console: Leash, watched: Page) -> None:
    # A page of another origin framing the console gets nothing (frame-ancestors 'none').
    watched.set_content(f'<iframe id="f" src="{console.url}/console"></iframe>')
    framed = watched.frame_locator("#f")
    # Chromium shows its own error page in place of a page that refuses framing.
    expect(framed.locator("body")).to_be_attached()
    watched.wait_for_timeout(300)
    frame = next(f for f in watched.frames if f != watched.main_frame)
    assert frame.url.startswith("chrome-error://"), frame.url
    assert framed.locator("#who").count() == 0


def test_the_demo_story_with_the_approval_done_in_the_browser(watched: Page) -> None:
    """`leash demo --console`: the demo waits at the send; a person opens the console, signs in
    at the demo's identity provider as Alice, finds the send in her inbox and approves it; the
    demo's story then goes on to its end and every step checks out."""
    demo = subprocess.Popen(
        [str(leash_bin()), "demo", "--console", "--wait", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )
    try:
        assert demo.stdout is not None
        lines: list[str] = []
        console_url = None
        for line in demo.stdout:
            lines.append(line)
            if line.strip().endswith("/console") and line.strip().startswith("http://"):
                console_url = line.strip()
                break
        assert console_url, "".join(lines)
        watched.goto(console_url)
        watched.get_by_role("link", name="Log in").click()
        watched.get_by_role("button", name="Sign in as Alice").click()
        expect(watched.locator("#who")).to_contain_text("alice@example.com")
        card = watched.locator("article.card.approval").filter(has_text="/messages/draft-1/send")
        expect(card).to_contain_text("triage my inbox")
        card.get_by_role("button", name="Approve").click()
        rest, _ = demo.communicate(timeout=120)
        output = "".join(lines) + rest
        assert demo.returncode == 0, output
        assert "approved" in output
        assert "Every step behaved as expected" in output
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()


def test_a_servers_elicitation_is_shown_as_text_and_answered_in_the_browser(
    make_leash: MakeLeash,
    idp: Idp,
    hostile: Hostile,  # noqa: F811 (the fixture imported above)
    watched: Page,
    tmp_path: Path,
) -> None:
    """What an MCP server writes (an elicitation's message, its form's titles) is the
    upstream's text: the console shows it as text (ATTACKS 53), and the human's answer from the
    generated form is what reaches the server."""
    config = CONFIG.format(url=hostile.url, wait=20)
    leash = make_leash(f"{config}\n{oidc_section(idp.issuer)}", {SECRET_ENV: idp.client_secret})
    idp.set_redirect_uri(f"{leash.url}/auth/callback")
    # Alice's grant, made with her IdP token: the human who logs in below.
    alice = idp.access_token("alice")
    agent_id, key_file = agent_for(leash, tmp_path)
    body = {
        "agent": agent_id,
        "purpose": "Tidy the CRM",
        "upstreams": ["evil"],
        "actions": ["evil:elicit"],
        "approval_required": [],
        "ttl_seconds": 900,
    }
    created = leash.call("POST", "/v1/grants", alice, body)
    assert created.status_code == 201, created.text
    setup = Setup(leash, alice, agent_id, key_file, created.json())
    agent = Agent.from_jwk_file(leash.url, agent_id, key_file)
    me = Side(setup, agent, agent.task(setup.handle), leash, "evil").open()
    message = 'Confirm <img src=x onerror="window.__pwned=1"> \u202eevil\u200b?'
    schema = {
        "type": "object",
        "properties": {
            "email": {"type": "string", "title": "<script>window.__pwned=2</script>Email"}
        },
        "required": ["email"],
    }
    try:
        thread, out = elicit_in_background(
            me, [elicitation("x1", form(message, schema))], ["x1"], wait=25
        )
        log_in(watched, leash, idp, "alice")
        card = watched.locator("article.card.approval").filter(has_text="Confirm")
        expect(card).to_contain_text('Confirm <img src=x onerror="window.__pwned=1">')
        expect(card).to_contain_text("<script>window.__pwned=2</script>Email")
        assert card.locator("img, script").count() == 0
        card.locator("form.elicit input").fill("alice@example.com")
        card.get_by_role("button", name="Send answer").click()
        thread.join(30)
    finally:
        me.close()
    [answer] = server_got(out[0])
    assert answer["result"] == {"action": "accept", "content": {"email": "alice@example.com"}}
