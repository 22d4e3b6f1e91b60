"""An outsider's attacks on MCP elicitations through the approvals inbox and on
`unlisted_tools` (API §7, §14; ATTACKS 53-61): a malicious agent, a malicious MCP server
(tests/mcp_servers/hostile.py, which sends exactly the bytes a test gives it and records all it
receives) and another human. Tests pass when Leash refuses the attack. Each of the attacks that
first succeeded (an answer sent for an ended task, a held call outliving it, the `elicitation`
action taken by a tool, unbounded elicitations, an audit flood, C1 and bidi characters printed
raw) is fixed and kept here as a test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Leash, Setup, leash_bin, set_up
from mcp_fixtures import TESTS, Process

from leash_agent import Agent, PendingApproval, Task

HOSTILE = TESTS / "mcp_servers" / "hostile.py"
WAIT = 3  # [mcp] approval_wait, seconds

CONFIG = """
max_pending_approvals = 5

[mcp]
approval_wait = {wait}

[[upstream]]
name = "evil"
url = "{url}"
kind = "mcp"
unlisted_tools = "allow"
[[upstream.tool]]
name = "elicit"
action = "evil:elicit"
[[upstream.tool]]
name = "redirect"
action = "evil:redirect"
[[upstream.tool]]
name = "find"
action = "evil:search"
[[upstream.tool]]
name = "remove"
action = "evil:delete"
risk = "high"

[[upstream]]
name = "evilhigh"
url = "{url}"
kind = "mcp"
unlisted_tools = "high"
[[upstream.tool]]
name = "elicit"
action = "evilhigh:elicit"
"""

ACCEPT = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
INIT = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {"elicitation": {}},
        "clientInfo": {"name": "outsider2", "version": "1"},
    },
}
EMAIL_FORM = {
    "type": "object",
    "properties": {"email": {"type": "string", "description": "your email"}},
    "required": ["email"],
}


@dataclass
class Hostile:
    process: Process
    base: str
    url: str

    def requests(self) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.base}/requests", timeout=10)
        answer.raise_for_status()
        seen: list[dict[str, Any]] = answer.json()
        return seen

    def heard(self) -> dict[str, list[Any]]:
        """What came back for each finished elicitation, by the JSON of its ids."""
        answer = httpx.get(f"{self.base}/heard", timeout=10)
        answer.raise_for_status()
        heard: dict[str, list[Any]] = answer.json()
        return heard

    def bodies(self) -> str:
        return json.dumps([r["body"] for r in self.requests()])


@pytest.fixture(scope="module")
def hostile() -> Iterator[Hostile]:
    process = Process([sys.executable, str(HOSTILE), "0"], os.environ, "hostile.py")
    base = f"http://127.0.0.1:{process.port}"
    try:
        yield Hostile(process, base, f"{base}/mcp")
    finally:
        process.stop()


@pytest.fixture(scope="module")
def evil(hostile: Hostile, upstream: Any) -> Iterator[Leash]:
    server = Leash(upstream, CONFIG.format(url=hostile.url, wait=WAIT))
    yield server
    server.stop()


# ---- The agent's side: raw JSON-RPC over HTTP ---------------------------------------------------


@dataclass
class Side:
    """A human, their agent's task on `upstream`, and an open MCP session."""

    setup: Setup
    agent: Agent
    task: Task
    leash: Leash
    upstream: str
    session: str = ""

    @property
    def url(self) -> str:
        return f"{self.leash.url}/mcp/{self.upstream}"

    def post(self, body: Any, timeout: float = 30) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = dict(ACCEPT)
        if self.session:
            headers["Mcp-Session-Id"] = self.session
        return httpx.post(
            self.url, content=content, headers=headers, auth=self.task.auth, timeout=timeout
        )

    def open(self) -> Side:
        opened = self.post(INIT)
        assert opened.status_code == 200, opened.text
        self.session = opened.headers["Mcp-Session-Id"]
        done = self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert done.status_code in (200, 202), done.text
        return self

    def call(self, tool: str, arguments: dict[str, Any], request_id: Any = 1) -> dict[str, Any]:
        message = {
            "jsonrpc": "2.0",
            "id": request_id,
            "method": "tools/call",
            "params": {"name": tool, "arguments": arguments},
        }
        return last_message(self.post(message, timeout=60))

    def pending(self, method: str = "elicitation/create") -> list[dict[str, Any]]:
        listed = self.leash.call("GET", "/v1/approvals?status=pending", self.setup.user_key)
        assert listed.status_code == 200, listed.text
        return [
            a
            for a in listed.json()["approvals"]
            if a["grant_id"] == self.setup.grant_id and a["method"] == method
        ]

    def wait_pending(self, count: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            mine = self.pending()
            if len(mine) >= count:
                return mine
            time.sleep(0.05)
        raise AssertionError(f"fewer than {count} elicitations reached the inbox")

    def answer(self, approval_id: str, content: Any, key: str | None = None) -> httpx.Response:
        body = None if content is None else {"content": content}
        path = f"/v1/approvals/{approval_id}/approve"
        return self.leash.call("POST", path, key or self.setup.user_key, body)

    def close(self) -> None:
        self.agent.close()


def side(leash: Leash, tmp_path: Path, upstream: str = "evil", **grant: Any) -> Side:
    fields: dict[str, Any] = {
        "upstreams": [upstream],
        "actions": [f"{upstream}:elicit"],
        "approval_required": [],
        **grant,
    }
    setup = set_up(leash, tmp_path, **fields)
    agent = Agent.from_jwk_file(leash.url, setup.agent_id, setup.key_file)
    return Side(setup, agent, agent.task(setup.handle), leash, upstream).open()


def last_message(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text[:500]
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        data = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
        answer: dict[str, Any] = json.loads(data[-1])
        return answer
    answer = response.json()
    return answer


def elicitation(eid: Any, params: dict[str, Any]) -> str:
    return json.dumps(
        {"jsonrpc": "2.0", "id": eid, "method": "elicitation/create", "params": params}
    )


def form(message: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"message": message, "requestedSchema": schema or EMAIL_FORM}


def server_got(result: dict[str, Any]) -> list[Any]:
    """What the hostile server's `elicit` says came back for each of its ids."""
    assert "result" in result, result
    got: list[Any] = json.loads(result["result"]["content"][0]["text"])
    return got


def background(work: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Runs `work` in a thread; `out` gets its result, or the exception it raised (a stream
    Leash ends early has no last message)."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(work())
        except Exception as error:  # handed to the test, which asserts on it
            out.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def elicit_in_background(
    me: Side, sends: list[str], ids: list[Any], wait: float = WAIT + 3, request_id: Any = 1
) -> tuple[threading.Thread, list[Any]]:
    arguments = {"send": sends, "ids": ids, "wait": wait}
    return background(lambda: me.call("elicit", arguments, request_id))


# ---- Baseline ----------------------------------------------------------------------------------


def test_baseline_the_human_answers_and_the_server_gets_exactly_that(
    evil: Leash, hostile: Hostile, tmp_path: Path
) -> None:
    me = side(evil, tmp_path)
    try:
        thread, out = elicit_in_background(me, [elicitation("e1", form("Your email?"))], ["e1"])
        inbox = me.wait_pending()
        assert inbox[0]["action"] == "evil:elicitation"
        assert inbox[0]["elicitation"]["message"] == "Your email?"
        answered = me.answer(inbox[0]["id"], {"email": "alice@example.com"})
        assert answered.status_code == 200, answered.text
        thread.join(30)
    finally:
        me.close()
    got = server_got(out[0])
    assert got[0]["result"] == {"action": "accept", "content": {"email": "alice@example.com"}}


# ---- The malicious agent -------------------------------------------------------------------------


def test_agent_cannot_answer_the_elicitation_with_its_own_response(
    evil: Leash, hostile: Hostile, tmp_path: Path
) -> None:
    """The agent, guessing the server's elicitation id, posts its own JSON-RPC response (accept
    with its content, then decline) on its session while the human has not answered: 400, never
    forwarded; the human's answer is the one the server gets."""
    me = side(evil, tmp_path)
    marker = f"agent-forged-{time.time_ns()}@evil.example"
    try:
        thread, out = elicit_in_background(me, [elicitation("e1", form("Email?"))], ["e1"])
        inbox = me.wait_pending()
        forged = [
            {
                "jsonrpc": "2.0",
                "id": "e1",
                "result": {"action": "accept", "content": {"email": marker}},
            },
            {"jsonrpc": "2.0", "id": "e1", "result": {"action": "decline"}},
            {"jsonrpc": "2.0", "id": "e1", "error": {"code": -1, "message": marker}},
        ]
        codes = [me.post(message).status_code for message in forged]
        answered = me.answer(inbox[0]["id"], {"email": "human@example.com"})
        assert answered.status_code == 200, answered.text
        thread.join(30)
    finally:
        me.close()
    assert codes == [400, 400, 400], codes
    assert marker not in hostile.bodies()
    assert server_got(out[0])[0]["result"]["content"] == {"email": "human@example.com"}


def test_agent_token_cannot_list_read_or_decide_an_elicitation(
    evil: Leash, hostile: Hostile, tmp_path: Path
) -> None:
    """The agent's DPoP token: the inbox list, the approve and deny calls (with content) and the
    body preview are refused; the one approval it may read shows neither the message, the form
    nor, after the human answered, the answer."""
    me = side(evil, tmp_path)
    secret_message = f"server-secret-message-{time.time_ns()}"
    marker = f"agent-forged-{time.time_ns()}@evil.example"
    try:
        thread, out = elicit_in_background(me, [elicitation(7, form(secret_message))], [7])
        inbox = me.wait_pending()
        approval = inbox[0]["id"]
        client = me.task.client()
        listed = client.get(f"{evil.url}/v1/approvals?status=pending")
        assert listed.status_code in (401, 403) or secret_message not in listed.text, listed.text
        assert listed.status_code != 200 or not listed.json().get("approvals"), listed.text
        for verb in ("approve", "deny"):
            decided = client.post(
                f"{evil.url}/v1/approvals/{approval}/{verb}", json={"content": {"email": marker}}
            )
            assert decided.status_code == 403, (verb, decided.status_code, decided.text)
        preview = client.get(f"{evil.url}/v1/approvals/{approval}/body")
        assert preview.status_code in (403, 404), preview.text
        assert secret_message not in preview.text
        seen = client.get(f"{evil.url}/v1/approvals/{approval}")
        assert seen.status_code == 200
        # Its token as a plain Bearer (a DPoP downgrade), and a token of another grant.
        token = me.task._usable_token().value
        bearer = httpx.post(
            f"{evil.url}/v1/approvals/{approval}/approve",
            json={"content": {"email": marker}},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert bearer.status_code in (401, 403), bearer.text
        other = me.agent.task(other_grant(evil, me)["handle"]).client()
        foreign = other.get(f"{evil.url}/v1/approvals/{approval}")
        assert foreign.status_code in (403, 404), foreign.text
        other.close()
        assert secret_message not in seen.text
        assert "elicitation" not in seen.json()
        assert me.answer(approval, {"email": "human-answer@example.com"}).status_code == 200
        after = client.get(f"{evil.url}/v1/approvals/{approval}")
        assert "human-answer" not in after.text, after.text
        assert after.json()["status"] in ("approved", "used"), after.text
        thread.join(30)
        client.close()
    finally:
        me.close()
    assert marker not in hostile.bodies()
    assert server_got(out[0])[0]["result"]["content"] == {"email": "human-answer@example.com"}


def test_agent_cannot_send_an_elicitation_of_its_own(
    evil: Leash, hostile: Hostile, tmp_path: Path
) -> None:
    """The agent sends `elicitation/create` itself (to the server, or hoping Leash puts it in
    the human's inbox as the server's): a JSON-RPC error, nothing forwarded, nothing pending."""
    me = side(evil, tmp_path)
    marker = f"agent-asks-{time.time_ns()}"
    try:
        answer = me.post(
            {
                "jsonrpc": "2.0",
                "id": 5,
                "method": "elicitation/create",
                "params": {"message": marker, "requestedSchema": EMAIL_FORM},
            }
        )
        pending = me.pending()
    finally:
        me.close()
    assert answer.status_code in (200, 400), answer.text
    if answer.status_code == 200:
        assert last_message(answer)["error"]["code"] == -32601, answer.text
    assert pending == []
    assert marker not in hostile.bodies()


def other_grant(evil: Leash, me: Side) -> dict[str, Any]:
    """A second grant of the same human to the same agent."""
    return evil.grant(
        me.setup.user_key,
        me.setup.agent_id,
        upstreams=["evil"],
        actions=["evil:elicit"],
        approval_required=[],
    )


def test_an_answered_elicitation_is_no_approval_for_anything_else(
    evil: Leash, hostile: Hostile, upstream: Any, tmp_path: Path
) -> None:
    """The elicitation's approval id, once the human accepted it, sent as `Leash-Approval` on a
    high-risk gateway request and on a high-risk MCP tool call of the same grant (replay into a
    normal approval): never forwarded."""
    me = side(
        evil,
        tmp_path,
        upstreams=["evil", "mail"],
        actions=["evil:elicit", "evil:delete", "mail:send"],
        approval_required=["mail:send"],
    )
    me.task = me.agent.task(me.setup.handle, approval_timeout=1)
    path = f"/messages/replay-{time.time_ns()}/send"
    try:
        thread, _ = elicit_in_background(me, [elicitation("r1", form("Email?"))], ["r1"])
        approval = me.wait_pending()[0]["id"]
        assert me.answer(approval, {"email": "a@example.com"}).status_code == 200
        thread.join(30)
        sent = httpx.post(
            f"{evil.url}/gw/mail{path}",
            content=b"hi",
            headers={"Leash-Approval": approval},
            auth=me.task.auth,
            timeout=10,
        )
        # The same at the MCP endpoint: a high-risk tool call carrying the elicitation's id.
        marker = f"replayed-{time.time_ns()}"
        headers = {**ACCEPT, "Mcp-Session-Id": me.session, "Leash-Approval": approval}
        call = {
            "jsonrpc": "2.0",
            "id": 8,
            "method": "tools/call",
            "params": {"name": "remove", "arguments": {"marker": marker}},
        }
        removed = httpx.post(me.url, json=call, headers=headers, auth=me.task.auth, timeout=30)
    finally:
        me.close()
    assert last_message(removed)["result"]["isError"], removed.text
    assert tool_calls(hostile, marker) == []
    assert sent.status_code == 403, sent.text
    assert sent.json()["error"] in ("approval_required", "approval_mismatch"), sent.text
    assert path not in [r.path for r in upstream.seen()]


def test_another_human_cannot_read_or_answer_the_elicitation(
    evil: Leash, hostile: Hostile, tmp_path: Path
) -> None:
    """Bob (another human with his own grant) neither sees Alice's elicitation in his inbox, nor
    reads it, nor answers or denies it; Alice's answer is what the server gets."""
    me = side(evil, tmp_path)
    bob = evil.add_user(f"bob-{time.time_ns()}")
    marker = f"bob-{time.time_ns()}@evil.example"
    secret = f"for-alice-only-{time.time_ns()}"
    try:
        thread, out = elicit_in_background(me, [elicitation("b1", form(secret))], ["b1"])
        approval = me.wait_pending()[0]["id"]
        listed = evil.call("GET", "/v1/approvals?status=pending", bob)
        assert listed.status_code == 200
        assert secret not in listed.text
        assert approval not in listed.text
        read = evil.call("GET", f"/v1/approvals/{approval}", bob)
        assert read.status_code in (403, 404), read.text
        assert secret not in read.text
        for verb in ("approve", "deny"):
            decided = evil.call(
                "POST", f"/v1/approvals/{approval}/{verb}", bob, {"content": {"email": marker}}
            )
            assert decided.status_code in (403, 404), (verb, decided.text)
        shown = subprocess.run(
            [str(leash_bin()), "approvals", "show", approval],
            env={**os.environ, "LEASH_URL": evil.url, "LEASH_TOKEN": bob},
            capture_output=True,
            text=True,
            check=False,
        )
        assert shown.returncode != 0
        assert secret not in shown.stdout + shown.stderr
        assert me.pending()[0]["status"] == "pending"
        assert me.answer(approval, {"email": "alice@example.com"}).status_code == 200
        thread.join(30)
    finally:
        me.close()
    assert marker not in hostile.bodies()
    assert server_got(out[0])[0]["result"]["content"] == {"email": "alice@example.com"}


def test_two_concurrent_answers_only_one_reaches_the_server(
    evil: Leash, hostile: Hostile, tmp_path: Path
) -> None:
    """Eight approves with different content (and a deny) at once: exactly one decision wins, and
    the server gets exactly that one."""
    me = side(evil, tmp_path)
    tag = f"race-{time.time_ns()}"
    try:
        thread, out = elicit_in_background(me, [elicitation("c1", form("Email?"))], ["c1"])
        approval = me.wait_pending()[0]["id"]
        barrier = threading.Barrier(9)
        results: dict[str, int] = {}

        def approve(n: int) -> None:
            barrier.wait()
            results[f"{tag}-{n}@x.example"] = me.answer(
                approval, {"email": f"{tag}-{n}@x.example"}
            ).status_code

        def deny() -> None:
            barrier.wait()
            path = f"/v1/approvals/{approval}/deny"
            results["deny"] = evil.call("POST", path, me.setup.user_key).status_code

        threads = [threading.Thread(target=approve, args=(n,)) for n in range(8)]
        threads.append(threading.Thread(target=deny))
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        thread.join(30)
    finally:
        me.close()
    winners = [who for who, code in results.items() if code == 200]
    assert len(winners) == 1, results
    assert all(code == 409 for who, code in results.items() if who not in winners), results
    got = server_got(out[0])[0]["result"]
    if winners[0] == "deny":
        assert got == {"action": "decline"}, got
    else:
        assert got == {"action": "accept", "content": {"email": winners[0]}}, got
    assert hostile.bodies().count(tag) == (0 if winners[0] == "deny" else 1)


# ---- The malicious MCP server ------------------------------------------------------------------


def test_an_elicitation_flood_fills_at_most_max_pending_approvals(
    evil: Leash, hostile: Hostile, tmp_path: Path
) -> None:
    """Twelve elicitations at once in one call: at most `max_pending_approvals` (5) wait in the
    human's inbox, the others are declined at once."""
    me = side(evil, tmp_path)
    ids = [f"f{n}" for n in range(12)]
    try:
        sends = [elicitation(i, form(f"flood {i}")) for i in ids]
        thread, out = elicit_in_background(me, sends, ids)
        me.wait_pending()
        time.sleep(0.5)
        waiting = me.pending()
        thread.join(30)
    finally:
        me.close()
    assert 1 <= len(waiting) <= 5, len(waiting)
    got = server_got(out[0])
    assert all(g is not None for g in got), got
    assert all(g["result"] == {"action": "decline"} for g in got), got


def shown_to_the_human(
    evil: Leash, tmp_path: Path, message: str, schema: dict[str, Any]
) -> list[bytes]:
    """What `leash approvals show` and `leash approvals list` print (stdout, stderr) for an
    elicitation with this message and form; the elicitation is then denied."""
    me = side(evil, tmp_path)
    try:
        sends = [elicitation("t1", form(message, schema))]
        thread, _ = elicit_in_background(me, sends, ["t1"])
        approval = me.wait_pending()[0]["id"]
        env = {**os.environ, "LEASH_URL": evil.url, "LEASH_TOKEN": me.setup.user_key}
        printed: list[bytes] = []
        for command in (["show", approval], ["list", "--status", "pending"]):
            done = subprocess.run(
                [str(leash_bin()), "approvals", *command],
                env=env,
                capture_output=True,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            printed += [done.stdout, done.stderr]
        evil.call("POST", f"/v1/approvals/{approval}/deny", me.setup.user_key)
        thread.join(30)
    finally:
        me.close()
    return printed


def everywhere(text: str) -> tuple[str, dict[str, Any]]:
    """A message and a form with `text` in every string a server writes."""
    schema = {
        "type": "object",
        "title": "T" + text,
        "properties": {
            "pick" + text: {
                "type": "string",
                "title": "P" + text,
                "description": "D" + text,
                "enum": ["a" + text, "b"],
            }
        },
    }
    return "M" + text, schema


def test_c0_terminal_escapes_from_the_server_are_not_printed_raw(
    evil: Leash, tmp_path: Path
) -> None:
    """OSC 52 (clipboard write), CSI (clear screen, colours), BEL, CR, BS and NUL in the
    server's message and form: `leash approvals show` never prints them raw."""
    control = "\x1b]52;c;cHduZWQ=\x07\x1b[2J\x1b[31mRED\rX\x08\x00"
    for printed in shown_to_the_human(evil, tmp_path, *everywhere(control)):
        for raw in (b"\x1b", b"\x07", b"\r", b"\x08", b"\x00"):
            assert raw not in printed, (raw, printed)


def test_c1_terminal_escapes_from_the_server_are_not_printed_raw(
    evil: Leash, tmp_path: Path
) -> None:
    """8-bit CSI and OSC (`U+009B 2J`, `U+009D 52;c;… U+009C`) anywhere the server writes."""
    control = "\x9b2J\x9d52;c;cHduZWQ=\x9c"
    for printed in shown_to_the_human(evil, tmp_path, *everywhere(control)):
        for raw in ("\x9b".encode(), "\x9d".encode(), "\x9c".encode()):
            assert raw not in printed, (raw, printed)


def test_bidi_overrides_from_the_server_are_not_printed_raw(evil: Leash, tmp_path: Path) -> None:
    """A right-to-left override (Trojan Source style) in the message and the form."""
    control = "\u202eexe.gnp\u2066x\u2069"
    for printed in shown_to_the_human(evil, tmp_path, *everywhere(control)):
        for raw in ("\u202e".encode(), "\u2066".encode()):
            assert raw not in printed, (raw, printed)


def test_a_huge_elicitation_does_not_fill_the_inbox(evil: Leash, tmp_path: Path) -> None:
    """Five elicitations of 3 MB each (the server may send events of up to 16 MB): what waits in
    the human's inbox is bounded (here: 1 MiB a message), or the elicitation is declined."""
    me = side(evil, tmp_path)
    try:
        sends = [elicitation(f"h{n}", form("@BIG@")) for n in range(5)]
        arguments = {"send": sends, "ids": [f"h{n}" for n in range(5)], "wait": 6, "big": 3_000_000}
        thread, _ = background(lambda: me.call("elicit", arguments))
        # Declined at once (Leash puts at most 64 KiB before the human) or bounded if listed.
        time.sleep(2)
        listed = evil.call("GET", "/v1/approvals?status=pending", me.setup.user_key)
        for approval in me.pending():
            evil.call("POST", f"/v1/approvals/{approval['id']}/deny", me.setup.user_key)
        thread.join(30)
    finally:
        me.close()
    assert listed.status_code == 200
    assert len(listed.content) < 5 * 1024 * 1024, f"the inbox list is {len(listed.content)} bytes"


def test_the_server_cannot_redirect_a_call_with_the_humans_credential(
    evil: Leash, hostile: Hostile, tmp_path: Path
) -> None:
    """The server answers a forwarded call with `307` to another URL: Leash does not follow it
    with the human's vaulted credential."""
    me = side(evil, tmp_path, actions=["evil:elicit", "evil:redirect"])
    secret = f"vaulted-{time.time_ns()}"
    stored = evil.call(
        "PUT", "/v1/vault/evil", me.setup.user_key, {"kind": "bearer", "secret": secret}
    )
    assert stored.status_code in (200, 201, 204), stored.text
    try:
        answer = me.post(
            {
                "jsonrpc": "2.0",
                "id": 3,
                "method": "tools/call",
                "params": {"name": "redirect", "arguments": {}},
            }
        )
    finally:
        me.close()
    assert answer.status_code < 500 or answer.headers.get("Leash-Decision"), answer.text
    elsewhere = [r for r in hostile.requests() if r["path"] == "/elsewhere"]
    assert not [r for r in elsewhere if secret in json.dumps(r)], elsewhere
    assert secret not in answer.text


@pytest.mark.parametrize(
    "params",
    [
        {"mode": "url", "message": "Sign in", "url": "{base}/elsewhere", "elicitationId": "u1"},
        form("ref", {"type": "object", "properties": {"a": {"$ref": "{base}/elsewhere"}}}),
        form("ref", {"$ref": "{base}/elsewhere"}),
        form("id", {"$id": "{base}/elsewhere", "type": "object", "properties": {}}),
    ],
    ids=["url-mode", "property-ref", "schema-ref", "schema-id"],
)
def test_leash_fetches_nothing_an_elicitation_names(
    evil: Leash, hostile: Hostile, tmp_path: Path, params: dict[str, Any]
) -> None:
    """A URL-mode elicitation and `$ref`/`$id` in the form pointing at a URL: Leash never fetches
    it (with or without the human's credential)."""
    me = side(evil, tmp_path)
    evil.call("PUT", "/v1/vault/evil", me.setup.user_key, {"kind": "bearer", "secret": "v-1"})
    sent = json.dumps(params).replace("{base}", hostile.base)
    before = len([r for r in hostile.requests() if r["path"] == "/elsewhere"])
    try:
        result = me.call(
            "elicit", {"send": [elicitation("u", json.loads(sent))], "ids": ["u"], "wait": 2}
        )
        for approval in me.pending():
            evil.call("POST", f"/v1/approvals/{approval['id']}/deny", me.setup.user_key)
    finally:
        me.close()
    assert "result" in result, result
    assert len([r for r in hostile.requests() if r["path"] == "/elsewhere"]) == before


@pytest.mark.parametrize("end", ["revoke", "complete"])
def test_an_answer_after_the_grant_ended_is_not_sent(
    evil: Leash, hostile: Hostile, tmp_path: Path, end: str
) -> None:
    """The grant is revoked (by the human) or completed (by the agent) while its elicitation
    waits: the human's later answer is refused and never reaches the server with the human's
    vaulted credential (injection only for live grants, API §9)."""
    me = side(evil, tmp_path)
    secret = f"vaulted-{time.time_ns()}"
    evil.call("PUT", "/v1/vault/evil", me.setup.user_key, {"kind": "bearer", "secret": secret})
    marker = f"late-{time.time_ns()}@example.com"
    try:
        thread, _out = elicit_in_background(me, [elicitation("g1", form("Email?"))], ["g1"])
        approval = me.wait_pending()[0]["id"]
        if end == "revoke":
            ended = evil.call("POST", f"/v1/grants/{me.setup.grant_id}/revoke", me.setup.user_key)
        else:
            ended = me.task.client().post(f"{evil.url}/v1/grants/{me.setup.grant_id}/complete")
        assert ended.status_code == 200, ended.text
        late = me.answer(approval, {"email": marker})
        thread.join(30)
    finally:
        me.close()
    assert late.status_code in (400, 403, 404, 409), late.text
    assert marker not in hostile.bodies()


def test_a_call_held_by_an_elicitation_ends_when_the_grant_is_revoked(
    evil: Leash, hostile: Hostile, tmp_path: Path
) -> None:
    """The human revokes the grant while the server's elicitation waits in the inbox: the agent's
    held `tools/call` ends at once, and nothing the server sends afterwards reaches the agent."""
    me = side(evil, tmp_path)
    try:
        thread, out = background(
            lambda: me.post(
                {
                    "jsonrpc": "2.0",
                    "id": 1,
                    "method": "tools/call",
                    "params": {
                        "name": "elicit",
                        "arguments": {
                            "send": [elicitation("v1", form("Email?"))],
                            "ids": ["v1"],
                            "wait": WAIT + 3,
                        },
                    },
                },
                timeout=30,
            )
        )
        me.wait_pending()
        revoked = evil.call("POST", f"/v1/grants/{me.setup.grant_id}/revoke", me.setup.user_key)
        assert revoked.status_code == 200, revoked.text
        revoked_at = time.monotonic()
        thread.join(30)
        ended_after = time.monotonic() - revoked_at
    finally:
        me.close()
    assert ended_after < 2, f"the held call ended {ended_after:.1f} s after the revocation"
    assert "decline" not in out[0].text, out[0].text


def odd(eid: str, params: str) -> str:
    """An `elicitation/create` with `params` written by hand (raw JSON text)."""
    head = f'{{"jsonrpc": "2.0", "id": "{eid}", "method": "elicitation/create", '
    return head + f'"params": {params}}}'


FLAT = '{"type": "object", "properties": {"e": {"type": "string"}}}'
ODD_ELICITATIONS = [
    # Forms Leash cannot check: nested, arrays, refs, non-string enums, boolean schemas, a
    # required field that does not exist, no form at all, URL mode.
    odd(
        "nested",
        '{"message": "m", "requestedSchema": {"type": "object", "properties": '
        '{"a": {"type": "object", "properties": {"b": {"type": "string"}}}}}}',
    ),
    odd(
        "array",
        '{"message": "m", "requestedSchema": {"type": "object", "properties": '
        '{"a": {"type": "array", "items": {"type": "string"}}}}}',
    ),
    odd(
        "enum",
        '{"message": "m", "requestedSchema": {"type": "object", "properties": '
        '{"a": {"type": "string", "enum": [1, true, null, {"x": 1}]}}}}',
    ),
    odd(
        "bool", '{"message": "m", "requestedSchema": {"type": "object", "properties": {"a": true}}}'
    ),
    odd(
        "ghost",
        '{"message": "m", "requestedSchema": {"type": "object", "properties": {}, '
        '"required": ["ghost"]}}',
    ),
    odd("noform", '{"message": "m"}'),
    odd("notobject", '{"message": "m", "requestedSchema": "string"}'),
    odd("arrayform", '{"message": "m", "requestedSchema": [1, 2]}'),
    odd("msgnum", '{"message": 12, "requestedSchema": ' + FLAT + "}"),
    odd("params", "[1, 2]"),
    # Not I-JSON, or not JSON-RPC: duplicate members, 1e400, -0 ranges, lone surrogates, odd ids.
    odd("dupmsg", '{"message": "shown", "message": "hidden", "requestedSchema": ' + FLAT + "}"),
    odd(
        "dupprop",
        '{"message": "m", "requestedSchema": {"type": "object", "properties": '
        '{"e": {"type": "string"}, "e": {"type": "number"}}}}',
    ),
    odd(
        "huge",
        '{"message": "m", "requestedSchema": {"type": "object", "properties": '
        '{"n": {"type": "number", "minimum": 1e400, "maximum": -0}}}}',
    ),
    odd("surrogate", '{"message": "\\ud800", "requestedSchema": ' + FLAT + "}"),
    '{"jsonrpc": "2.0", "id": {"a": 1}, "method": "elicitation/create", "params": '
    '{"message": "objid", "requestedSchema": ' + FLAT + "}}",
    '{"jsonrpc": "2.0", "id": true, "method": "elicitation/create", "params": '
    '{"message": "boolid", "requestedSchema": ' + FLAT + "}}",
    '{"jsonrpc": "2.0", "id": "both", "method": "elicitation/create", "result": {}, "params": '
    '{"message": "both", "requestedSchema": ' + FLAT + "}}",
    '{"jsonrpc": "2.0", "method": "elicitation/create", "params": '
    '{"message": "notification", "requestedSchema": ' + FLAT + "}}",
    "not json at all {",
]


def test_odd_elicitations_are_declined_or_dropped_and_leash_stays_up(
    evil: Leash, hostile: Hostile, tmp_path: Path
) -> None:
    """A stream of elicitations Leash cannot check or that are not I-JSON (nested forms, arrays,
    refs, non-string enums, boolean schemas, duplicate members, 1e400, lone surrogates, object
    and boolean ids, `method` with `result`, a notification, garbage): none reaches the human's
    inbox, none is accepted, the agent's call completes without a 5xx, and a well-formed
    elicitation after them still reaches the human."""
    me = side(evil, tmp_path)
    ids = [
        "nested",
        "array",
        "enum",
        "bool",
        "ghost",
        "noform",
        "notobject",
        "arrayform",
        "msgnum",
        "params",
        "dupmsg",
        "dupprop",
        "huge",
        "surrogate",
        "both",
        "last",
    ]
    try:
        sends = [*ODD_ELICITATIONS, elicitation("last", form("the last one"))]
        thread, out = elicit_in_background(me, sends, ids, wait=3)
        inbox = me.wait_pending()
        assert [a["elicitation"]["message"] for a in inbox] == ["the last one"], inbox
        assert me.answer(inbox[0]["id"], {"email": "ok@example.com"}).status_code == 200
        thread.join(30)
    finally:
        me.close()
    got = server_got(out[0])
    answers = dict(zip(ids, got, strict=False))
    assert answers["last"]["result"] == {"action": "accept", "content": {"email": "ok@example.com"}}
    for eid, answer in answers.items():
        if eid != "last" and answer is not None:
            assert answer.get("result", {}).get("action") != "accept", (eid, answer)
    assert evil.http.get("/healthz").status_code == 200


# ---- unlisted_tools ----------------------------------------------------------------------------


def tool_calls(hostile: Hostile, marker: str) -> list[str]:
    """The names of the tools/call requests carrying `marker` that reached the server."""
    names = []
    for request in hostile.requests():
        if marker in request["body"]:
            message = json.loads(request["body"])
            if message.get("method") == "tools/call":
                names.append(message["params"]["name"])
    return names


def call_raw(me: Side, name: str, marker: str, timeout: float = 30) -> dict[str, Any]:
    return last_message(
        me.post(
            {
                "jsonrpc": "2.0",
                "id": 9,
                "method": "tools/call",
                "params": {"name": name, "arguments": {"marker": marker}},
            },
            timeout=timeout,
        )
    )


@pytest.mark.parametrize(
    ("method", "action"),
    [("resources/read", "evil:resources"), ("prompts/get", "evil:prompts")],
)
def test_a_resource_or_prompt_needing_approval_is_refused_and_audited(
    evil: Leash, hostile: Hostile, tmp_path: Path, method: str, action: str
) -> None:
    """Only a tool call can be held for the human: a `resources/*` or `prompts/*` message whose
    grant wants an approval is refused with a JSON-RPC error, never forwarded, and the refusal is
    in the audit log like any other, its proof spent: sent again as it was, it is a replay."""
    me = side(evil, tmp_path, actions=["evil:elicit", action], approval_required=[action])
    marker = f"needs-approval-{time.time_ns()}"
    member = "uri" if method == "resources/read" else "name"
    message = {"jsonrpc": "2.0", "id": 5, "method": method, "params": {member: marker}}
    try:
        first = me.post(message)
        answer = last_message(first)
        sent = first.request.headers
        replayed = httpx.post(
            me.url,
            content=first.request.content,
            headers={
                **ACCEPT,
                "Mcp-Session-Id": me.session,
                "Authorization": sent["Authorization"],
                "DPoP": sent["DPoP"],
            },
        )
    finally:
        me.close()
    assert replayed.status_code == 401, replayed.text
    assert answer["error"]["code"] == -32003, answer
    assert "approval" in answer["error"]["message"], answer
    assert [r for r in hostile.requests() if marker in r["body"]] == []
    refused = [
        event
        for event in evil.audit(me.setup.grant_id)
        if event["kind"] == "mcp.request" and event.get("action") == action
    ]
    assert [(e["decision"], e["reason"]) for e in refused] == [
        ("deny", "approval_unsupported"),
        ("deny", "replayed"),
    ]


def test_tools_list_shows_only_tools_the_token_may_call(
    evil: Leash, hostile: Hostile, tmp_path: Path
) -> None:
    """With `unlisted_tools = "allow"` the server lists look-alikes (case, NFKC, accents,
    zero-width, `:`, spaces, `..`, empty), names colliding with configured or reserved actions,
    and high-risk names: the agent sees exactly the tools its scope holds."""
    me = side(evil, tmp_path, actions=["evil:elicit", "evil:notes", "evil:export"])
    try:
        listed = last_message(me.post({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}))
    finally:
        me.close()
    names = sorted(tool["name"] for tool in listed["result"]["tools"])
    assert names == ["elicit", "export", "notes"], names


@pytest.mark.parametrize(
    "name",
    [
        "Notes",
        "NOTES",
        "n\u00f6tes",
        "\uff4eotes",
        "notes\u200b",
        "no:tes",
        "no tes",
        "notes/../x",
        "",
    ],
)
def test_unlisted_look_alike_names_are_refused(
    evil: Leash, hostile: Hostile, tmp_path: Path, name: str
) -> None:
    """Names that make no valid action (case, accents, fullwidth, zero-width space, `:`, space,
    `..`, empty) stay refused though the grant holds `evil:notes`."""
    me = side(evil, tmp_path, actions=["evil:elicit", "evil:notes"])
    marker = f"look-alike-{time.time_ns()}"
    try:
        answer = call_raw(me, name, marker)
    finally:
        me.close()
    assert answer["result"]["isError"], answer
    assert tool_calls(hostile, marker) == []


@pytest.mark.parametrize(
    ("name", "action"),
    [
        ("search", "evil:search"),  # the configured tool `find`'s action
        ("delete", "evil:delete"),  # the configured high-risk tool `remove`'s action
        ("resources", "evil:resources"),
        ("prompts", "evil:prompts"),
        ("sampling", "evil:sampling"),
        ("elicitation", "evil:elicitation"),
    ],
)
def test_unlisted_names_colliding_with_used_actions_are_refused(
    evil: Leash, hostile: Hostile, tmp_path: Path, name: str, action: str
) -> None:
    """An unlisted tool whose default action is one the configuration (or Leash itself) already
    uses stays hidden and refused, even when the grant holds that action without approval."""
    granted = evil.call(
        "POST",
        "/v1/grants",
        evil.add_user(f"probe-{time.time_ns()}"),
        {
            "agent": "spiffe://x/y",
            "purpose": "p",
            "upstreams": ["evil"],
            "actions": [action],
            "ttl_seconds": 60,
        },
    )
    if "not defined" in granted.text:
        return  # the action cannot even be granted
    me = side(evil, tmp_path, actions=["evil:elicit", action])
    marker = f"collision-{time.time_ns()}"
    try:
        listed = last_message(me.post({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}))
        answer = call_raw(me, name, marker, timeout=WAIT + 10)
        for approval in me.pending("tools/call"):
            evil.call("POST", f"/v1/approvals/{approval['id']}/deny", me.setup.user_key)
    finally:
        me.close()
    assert name not in [tool["name"] for tool in listed["result"]["tools"]]
    assert answer["result"]["isError"], answer
    assert tool_calls(hostile, marker) == []


@pytest.mark.parametrize(
    ("via", "name"),
    [("evil", "export"), ("evilhigh", "notes")],
)
def test_unlisted_high_risk_tools_wait_for_the_human(
    evil: Leash, hostile: Hostile, tmp_path: Path, via: str, name: str
) -> None:
    """`export`/`read_secret` are high risk by name even when `unlisted_tools = "allow"`; any
    unlisted tool is under `"high"`: the call waits for an approval, is not forwarded when
    nobody answers, and runs once when the human approves."""
    action = f"{via}:{name}"
    me = side(evil, tmp_path, upstream=via, actions=[f"{via}:elicit", action])
    marker = f"high-{time.time_ns()}"
    try:
        refused = call_raw(me, name, marker)
        assert refused["result"]["isError"], refused
        assert tool_calls(hostile, marker) == []
        thread, out = background(lambda: call_raw(me, name, marker))
        deadline = time.monotonic() + 10
        while not me.pending("tools/call") and time.monotonic() < deadline:
            time.sleep(0.05)
        pending = me.pending("tools/call")
        assert pending, "the call asked no approval"
        assert pending[0]["action"] == action, pending
        evil.decide(me.setup.user_key, pending[0]["id"], "approve")
        thread.join(30)
    finally:
        me.close()
    assert not out[0]["result"].get("isError"), out[0]
    assert tool_calls(hostile, marker) == [name]


# ---- More of the malicious server, and the human's answer --------------------------------------


def test_the_same_elicitation_id_in_two_humans_sessions_stays_apart(
    evil: Leash, hostile: Hostile, tmp_path: Path
) -> None:
    """The server uses one elicitation id in Alice's and Bob's sessions at once: each human
    answers their own, and each answer goes back in its own session, with its own grant."""
    alice = side(evil, tmp_path)
    bob = side(evil, tmp_path)
    tag = time.time_ns()
    try:
        threads = [
            elicit_in_background(who, [elicitation("same", form(f"{tag} for {name}"))], ["same"])
            for who, name in ((alice, "alice"), (bob, "bob"))
        ]
        for who, name in ((alice, "alice"), (bob, "bob")):
            inbox = who.wait_pending()
            assert inbox[0]["elicitation"]["message"] == f"{tag} for {name}", inbox
            answered = who.answer(inbox[0]["id"], {"email": f"{name}-{tag}@example.com"})
            assert answered.status_code == 200, answered.text
        for thread, _ in threads:
            thread.join(30)
    finally:
        alice.close()
        bob.close()
    for (_, out), who, name in ((threads[0], alice, "alice"), (threads[1], bob, "bob")):
        got = server_got(out[0])
        assert got[0]["result"]["content"] == {"email": f"{name}-{tag}@example.com"}, got
        carried = [r for r in hostile.requests() if f"{name}-{tag}@" in r["body"]]
        assert len(carried) == 1
        assert carried[0]["headers"]["mcp-session-id"] == who_session(hostile, who)
        assert carried[0]["headers"]["leash-grant"] == who.setup.grant_id


def who_session(hostile: Hostile, who: Side) -> str:
    """The server's session id of `who`'s session (the one its initialize opened)."""
    for request in hostile.requests():
        if request["headers"].get("leash-grant") == who.setup.grant_id and request["headers"].get(
            "mcp-session-id"
        ):
            session: str = request["headers"]["mcp-session-id"]
            return session
    raise AssertionError("no session")


def test_an_answered_elicitation_id_reused_asks_the_human_again(
    evil: Leash, hostile: Hostile, tmp_path: Path
) -> None:
    """After the human answered elicitation `r`, the server sends another with the same id: it is
    a new approval for the human; the old one cannot answer it."""
    me = side(evil, tmp_path)
    try:
        thread, out = elicit_in_background(me, [elicitation("r", form("first"))], ["r"])
        first = me.wait_pending()[0]["id"]
        assert me.answer(first, {"email": "first@example.com"}).status_code == 200
        thread.join(30)
        thread, out = elicit_in_background(me, [elicitation("r", form("second"))], ["r"])
        second = me.wait_pending()[0]
        assert second["id"] != first
        assert second["elicitation"]["message"] == "second"
        assert me.answer(first, {"email": "replayed@example.com"}).status_code == 409
        evil.call("POST", f"/v1/approvals/{second['id']}/deny", me.setup.user_key)
        thread.join(30)
    finally:
        me.close()
    assert server_got(out[0])[0]["result"] == {"action": "decline"}
    assert "replayed@" not in hostile.bodies()


def test_an_elicitation_with_the_agents_own_request_id_cannot_be_answered_by_it(
    evil: Leash, hostile: Hostile, tmp_path: Path
) -> None:
    """The server gives its elicitation the id of the agent's pending `tools/call` (1): the
    agent's JSON-RPC response with that id is still refused, and what the server gets is the
    human's answer."""
    me = side(evil, tmp_path)
    marker = f"same-id-{time.time_ns()}@evil.example"
    try:
        thread, out = elicit_in_background(me, [elicitation(1, form("Email?"))], [1], request_id=1)
        approval = me.wait_pending()[0]["id"]
        forged = me.post(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "result": {"action": "accept", "content": {"email": marker}},
            }
        )
        assert me.answer(approval, {"email": "human@example.com"}).status_code == 200
        thread.join(30)
    finally:
        me.close()
    assert forged.status_code == 400, forged.text
    assert marker not in hostile.bodies()
    assert server_got(out[0])[0]["result"]["content"] == {"email": "human@example.com"}


def test_a_late_answer_after_the_wait_is_refused_and_not_sent(
    evil: Leash, hostile: Hostile, tmp_path: Path
) -> None:
    """Nobody answers within `approval_wait`: the server gets a decline; the human's answer
    afterwards is refused (409) and never sent."""
    me = side(evil, tmp_path)
    marker = f"too-late-{time.time_ns()}@example.com"
    try:
        thread, out = elicit_in_background(me, [elicitation("l", form("Email?"))], ["l"])
        approval = me.wait_pending()[0]["id"]
        thread.join(30)
        late = me.answer(approval, {"email": marker})
    finally:
        me.close()
    assert server_got(out[0])[0]["result"] == {"action": "decline"}
    assert late.status_code == 409, late.text
    assert marker not in hostile.bodies()


def test_the_server_gets_only_what_the_human_gave(
    evil: Leash, hostile: Hostile, tmp_path: Path
) -> None:
    """A form with `default`s and optional fields: the human's accept with one field is sent as
    exactly that (no defaults filled in); a deny that carries content sends a bare decline."""
    schema = {
        "type": "object",
        "properties": {
            "email": {"type": "string", "default": "server-default@evil.example"},
            "admin": {"type": "boolean", "default": True},
            "note": {"type": "string"},
        },
    }
    me = side(evil, tmp_path)
    marker = f"denied-{time.time_ns()}"
    try:
        sends = [elicitation("d1", form("one", schema)), elicitation("d2", form("two", schema))]
        thread, out = elicit_in_background(me, sends, ["d1", "d2"])
        inbox = {a["elicitation"]["message"]: a["id"] for a in me.wait_pending(2)}
        assert me.answer(inbox["one"], {"note": "only this"}).status_code == 200
        denied = evil.call(
            "POST",
            f"/v1/approvals/{inbox['two']}/deny",
            me.setup.user_key,
            {"content": {"note": marker}},
        )
        assert denied.status_code in (200, 400), denied.text
        if denied.status_code == 400:
            evil.call("POST", f"/v1/approvals/{inbox['two']}/deny", me.setup.user_key)
        thread.join(30)
    finally:
        me.close()
    got = server_got(out[0])
    assert got[0]["result"] == {"action": "accept", "content": {"note": "only this"}}, got
    assert got[1]["result"] == {"action": "decline"}, got
    assert marker not in hostile.bodies()


def test_content_cannot_be_smuggled_into_a_gateway_approval(
    evil: Leash, upstream: Any, tmp_path: Path
) -> None:
    """An approval of a gateway request (not an elicitation) takes no `content` (400, still
    pending); approved without it, the agent's retry forwards exactly its own body."""
    me = side(
        evil,
        tmp_path,
        upstreams=["evil", "mail"],
        actions=["evil:elicit", "mail:send"],
        approval_required=["mail:send"],
    )
    path = f"/messages/smuggle-{time.time_ns()}/send"
    seen: list[tuple[int, str]] = []

    def human(pending: PendingApproval) -> None:
        smuggled = me.answer(pending.id, {"body": "smuggled"})
        status = evil.call("GET", f"/v1/approvals/{pending.id}", me.setup.user_key)
        seen.append((smuggled.status_code, status.json()["status"]))
        evil.decide(me.setup.user_key, pending.id, "approve")

    try:
        task = me.agent.task(me.setup.handle, approval_timeout=20, on_approval=human)
        with httpx.Client(auth=task.auth, timeout=30) as client:
            retried = client.post(f"{evil.url}/gw/mail{path}", content=b"agent body")
    finally:
        me.close()
    assert seen == [(400, "pending")], seen
    assert retried.status_code == 200, retried.text
    forwarded = [r for r in upstream.seen() if r.path == path]
    assert [r.body for r in forwarded] == [b"agent body"]


def test_neither_audit_nor_logs_hold_the_answer_or_the_arguments(
    evil: Leash, hostile: Hostile, tmp_path: Path
) -> None:
    """The human's answer to an elicitation and the arguments of an unlisted tool appear in no
    audit event (the agent's human's view and the admin's) and no log line."""
    me = side(evil, tmp_path, actions=["evil:elicit", "evil:notes"])
    answer = f"answer-{time.time_ns()}@secret.example"
    argument = f"argument-{time.time_ns()}"
    try:
        thread, _ = elicit_in_background(me, [elicitation("a", form("Email?"))], ["a"])
        assert me.answer(me.wait_pending()[0]["id"], {"email": answer}).status_code == 200
        thread.join(30)
        called = call_raw(me, "notes", argument)
        assert not called["result"]["isError"], called
    finally:
        me.close()
    as_admin = json.dumps(evil.audit(me.setup.grant_id))
    as_human = evil.call("GET", f"/v1/audit?grant_id={me.setup.grant_id}", me.setup.user_key).text
    for text in (as_admin, as_human, "".join(evil.output)):
        assert answer not in text
        assert argument not in text
    kinds = [json.loads(line)["kind"] for line in as_human.splitlines() if line]
    assert "mcp.elicitation" in kinds, kinds
    assert "mcp.call" in kinds, kinds


def test_elicitations_outside_a_tool_call_reach_the_human_not_the_agent(
    evil: Leash, hostile: Hostile, tmp_path: Path
) -> None:
    """The server elicits inside its answer to `prompts/list` and on the standalone GET stream:
    the agent's streams carry no `elicitation/create`; the human's inbox has both."""
    me = side(evil, tmp_path, actions=["evil:elicit", "evil:prompts"])
    try:
        headers = {"Accept": "text/event-stream", "Mcp-Session-Id": me.session}
        stream_text: list[str] = []

        def listen() -> None:
            with httpx.stream(
                "GET", me.url, headers=headers, auth=me.task.auth, timeout=httpx.Timeout(10)
            ) as stream:
                stream_text.append(f"{stream.status_code}\n")
                try:
                    for chunk in stream.iter_text():
                        stream_text.append(chunk)
                except httpx.HTTPError:
                    pass

        listener = threading.Thread(target=listen)
        listener.start()
        prompts, answer = background(
            lambda: me.post({"jsonrpc": "2.0", "id": 4, "method": "prompts/list"}, timeout=20)
        )
        inbox = me.wait_pending(2)
        messages = sorted(a["elicitation"]["message"] for a in inbox)
        for approval in inbox:
            assert me.answer(approval["id"], {"e": "human"}).status_code == 200
        prompts.join(30)
        listener.join(30)
    finally:
        me.close()
    assert messages == ["asked from get-stream", "asked from in-prompts"], messages
    heard = hostile.heard()
    for eid in ("get-stream", "in-prompts"):
        assert heard[json.dumps([eid])][0]["result"]["content"] == {"e": "human"}, heard
    assert "elicitation/create" not in "".join(stream_text), stream_text
    assert "elicitation/create" not in answer[0].text, answer[0].text


def test_numbers_the_human_gives_arrive_exactly(
    evil: Leash, hostile: Hostile, tmp_path: Path
) -> None:
    """2^53 + 1 as a number and as an integer reaches the server unrounded; an integer beyond
    64 bits is refused rather than rounded; the human's bytes are the content's value."""
    schema = {"type": "object", "properties": {"n": {"type": "number"}, "i": {"type": "integer"}}}
    me = side(evil, tmp_path)
    headers = {"Authorization": f"Bearer {me.setup.user_key}", "Content-Type": "application/json"}
    try:
        thread, out = elicit_in_background(me, [elicitation("n", form("n", schema))], ["n"])
        path = f"/v1/approvals/{me.wait_pending()[0]['id']}/approve"
        too_big = evil.http.post(
            path, content=b'{"content": {"i": 18446744073709551616}}', headers=headers
        )
        exact = evil.http.post(
            path,
            content=b'{"content": {"n": 9007199254740993, "i": 9007199254740993}}',
            headers=headers,
        )
        thread.join(30)
    finally:
        me.close()
    assert too_big.status_code == 400, too_big.text
    assert exact.status_code == 200, exact.text
    assert '"content":{"n":9007199254740993,"i":9007199254740993}' in hostile.bodies().replace(
        "\\", ""
    ), "the human's numbers were changed on the way"
    assert server_got(out[0])[0]["result"]["action"] == "accept"


def test_an_elicitation_flood_cannot_flood_the_audit_log(
    evil: Leash, hostile: Hostile, tmp_path: Path
) -> None:
    """300 elicitations in one call: the refused ones do not each become an audit event."""
    me = side(evil, tmp_path)
    try:
        sends = [elicitation(f"a{n}", form("x")) for n in range(300)]
        me.call("elicit", {"send": sends, "ids": ["a299"], "wait": 1})
        for approval in me.pending():
            evil.call("POST", f"/v1/approvals/{approval['id']}/deny", me.setup.user_key)
    finally:
        me.close()
    events = [e for e in evil.audit(me.setup.grant_id) if e["kind"] == "mcp.elicitation"]
    assert len(events) <= 50, f"{len(events)} mcp.elicitation events from one call"
