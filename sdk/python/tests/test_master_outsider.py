"""An outsider's attacks on online master-key rotation (API §3, docs/operations.md "The master
key"), against the real `leash` binary: who may rotate, what a staged key file may be, what a
rotation does to sealed values under concurrent writes, two rotations at once, nodes without the
key, crashes and restarts, and whether key material ever leaves the machine.

Each test is one attack and asserts the secure behaviour; the four that failed against the
binary reviewed were findings, fixed since and marked `# FIXED:`. The cluster tests need the
test PostgreSQL server (`LEASH_TEST_POSTGRES`, default postgres://postgres@127.0.0.1:5432/postgres)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import LIMITS, ROUTES, Leash, Setup, Upstream, cli, serve, set_up

from leash_agent import Agent

ROTATE = "/v1/master-key/rotate"


# --- helpers ---------------------------------------------------------------------------------


def fresh_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def key_file(directory: Path, text: str | None = None, mode: int = 0o600) -> Path:
    path = directory / f"k-{secrets.token_hex(4)}.key"
    path.write_text((text or fresh_key()) + "\n")
    path.chmod(mode)
    return path


def stage(data: Path, text: str, mode: int = 0o600) -> Path:
    path = data / "master.key.next"
    if path.is_symlink() or path.is_file():
        path.unlink()
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def key_id(text: str, directory: Path) -> str:
    done = cli("master-key", "id", "--key-file", str(key_file(directory, text)))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def forms(key: str) -> list[str]:
    """The ways a key's bytes could show up in text."""
    raw = base64.b64decode(key)
    return [
        key,
        key.rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        raw.hex(),
        raw.hex().upper(),
    ]


class Node(Leash):
    """`leash serve` on a data dir (which outlives the process), optionally on a shared
    database and with `LEASH_MASTER_KEY`."""

    def __init__(
        self,
        data: Path,
        upstream: Upstream,
        admin_key: str,
        database: str | None = None,
        master_key: str | None = None,
        log: str = "warn",
    ) -> None:
        self.upstream = upstream
        self.admin_key = admin_key
        self.data = data
        self.dir = data.parent
        config = data.parent / f"leash-{secrets.token_hex(3)}.toml"
        top = f'database = "{database}"\n' if database else ""
        config.write_text(f"{top}{ROUTES.format(upstream=upstream.url)}\n{LIMITS}")
        env = {"LEASH_ADMIN_TOKEN": admin_key, "LEASH_LOG": log}
        if master_key:
            env["LEASH_MASTER_KEY"] = master_key
        self.process, self.output, self.url = serve(config, data, env)
        self.http = httpx.Client(base_url=self.url or "http://127.0.0.1:9", timeout=15)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.http.close()

    def log(self) -> str:
        time.sleep(0.2)
        return "".join(self.output)

    def ready(self) -> int:
        return self.http.get("/readyz").status_code


@pytest.fixture
def nodes(upstream: Upstream, tmp_path: Path) -> Iterator[Callable[..., Node]]:
    started: list[Node] = []
    admin = "lsk_test_admin_" + secrets.token_hex(16)

    def start(name: str, **options: Any) -> Node:
        data = tmp_path / name / "data"
        data.parent.mkdir(exist_ok=True)
        node = Node(data, upstream, options.pop("admin_key", admin), **options)
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


@pytest.fixture
def database() -> Iterator[str]:
    server = os.environ.get("LEASH_TEST_POSTGRES", "postgres://postgres@127.0.0.1:5432/postgres")
    name = f"mk_outsider_{secrets.token_hex(6)}"
    subprocess.run(["psql", server, "-qc", f"CREATE DATABASE {name}"], check=True)
    yield f"{server.rsplit('/', 1)[0]}/{name}"
    subprocess.run(["psql", server, "-qc", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"])


def rotate(node: Node, body: Any, key: str | None = None) -> httpx.Response:
    return node.call("POST", ROTATE, key or node.admin_key, body)


def put_secret(node: Node, user_key: str, secret: str, upstream: str = "mail") -> int:
    answer = node.call(
        "PUT", f"/v1/vault/{upstream}", user_key, {"kind": "bearer", "secret": secret}
    )
    return answer.status_code


def injected(node: Node, setup: Setup) -> tuple[int, str | None]:
    """A gateway read through `node` by the setup's agent: (status, Authorization the upstream
    saw, if it was reached)."""
    path = f"/messages/{secrets.token_hex(6)}"
    with Agent.from_jwk_file(node.url, setup.agent_id, setup.key_file) as agent:
        task = agent.task(setup.handle)
        with httpx.Client(timeout=15) as http:
            answer = http.get(task.url("mail", path), auth=task.auth)
    seen = [r for r in node.upstream.seen() if r.path == path]
    return answer.status_code, (seen[0].headers.get("authorization") if seen else None)


def high_risk(node: Node, setup: Setup, body: bytes) -> httpx.Response:
    """A high-risk POST (approval with a body preview) sent raw through `node`."""
    with Agent.from_jwk_file(node.url, setup.agent_id, setup.key_file) as agent:
        task = agent.task(setup.handle)
        url = task.url("mail", f"/messages/{secrets.token_hex(4)}/send")
        token = task._usable_token().value
        proof = task._dpop_key.dpop_proof("POST", url, agent._now(), token)
        with httpx.Client(timeout=15) as http:
            return http.post(
                url,
                content=body,
                headers={
                    "Authorization": f"DPoP {token}",
                    "DPoP": proof,
                    "Content-Type": "application/json",
                },
            )


def wait_for(check: Callable[[], bool], seconds: float = 5) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


def audit_verify(database: str) -> subprocess.CompletedProcess[str]:
    return cli("audit", "verify", "--database", database)


def events(node: Node, kind: str) -> list[dict[str, Any]]:
    answer = node.call("GET", "/v1/audit?limit=10000", node.admin_key)
    assert answer.status_code == 200, answer.text
    return [e for e in map(json.loads, answer.text.splitlines()) if e["kind"] == kind]


def sqlite_url(node: Node) -> str:
    return f"sqlite://{node.data / 'leash.db'}"


# --- who may rotate, and with what body ------------------------------------------------------


def test_only_the_admin_rotates_and_junk_bodies_are_4xx_and_change_nothing(
    nodes: Callable[..., Node], tmp_path: Path
) -> None:
    node = nodes("a")
    setup = set_up(node, tmp_path)
    current = (node.data / "master.key").read_text()
    new = fresh_key()
    stage(node.data, new)
    new_id = key_id(new, tmp_path)
    with Agent.from_jwk_file(node.url, setup.agent_id, setup.key_file) as agent:
        token = agent.task(setup.handle)._usable_token().value
    callers = {
        "nobody": {},
        "human": {"Authorization": f"Bearer {setup.user_key}"},
        "junk key": {"Authorization": "Bearer lsk_" + secrets.token_hex(16)},
        "agent bearer": {"Authorization": f"Bearer {token}"},
        "agent dpop": {"Authorization": f"DPoP {token}"},
        "basic": {"Authorization": "Basic " + base64.b64encode(b"admin:x").decode()},
    }
    for who, headers in callers.items():
        # A fresh connection for each (see the keep-alive test below).
        answer = node.http.post(
            ROTATE, json={"new_key_id": new_id}, headers={**headers, "Connection": "close"}
        )
        assert answer.status_code in (401, 403), (who, answer.status_code, answer.text)
    bodies: list[bytes] = [
        b"",
        b"{}",
        b"[]",
        json.dumps([new_id]).encode(),
        b"null",
        b'{"new_key_id": null}',
        b'{"new_key_id": 1}',
        b'{"new_key_id": ""}',
        b'{"new_key_id": "' + b"a" * 100_000 + b'"}',
        b'{"new_key_id": "../../etc/passwd"}',
        b'{"new_key_id": "' + new_id.encode() + b'", "new_key_id": "x"}',
        b'{"new_key_id": "' + new_id.upper().encode() + b'"}',
        b'{"new_key_id": "' + new.encode() + b'"}',
        b'{"new_key": "' + new.encode() + b'"}',
        b'{"new_key_id": "\\u0000"}',
        b"\xff\xfe",
    ]
    for body in bodies:
        answer = node.http.post(
            ROTATE,
            content=body,
            headers={
                "Authorization": f"Bearer {node.admin_key}",
                "Content-Type": "application/json",
            },
        )
        assert 400 <= answer.status_code < 500, (body[:60], answer.status_code, answer.text)
        assert answer.headers["content-type"].startswith("application/json"), body[:60]
        if new.encode() not in body:
            assert new not in answer.text, "an answer carried the staged key"
    assert (node.data / "master.key").read_text() == current
    assert (node.data / "master.key.next").read_text().strip() == new
    assert node.ready() == 200
    assert events(node, "master_key.rotated") == []
    # The same call as the admin rotates.
    assert rotate(node, {"new_key_id": new_id}).status_code == 200


def test_a_session_cookie_cannot_rotate_from_another_site(
    make_leash: Callable[..., Leash], idp: Any, tmp_path: Path
) -> None:
    from login_helpers import leash_for, log_in

    leash = leash_for(make_leash, idp)
    data = leash.dir / "data"
    new = fresh_key()
    stage(data, new)
    new_id = key_id(new, tmp_path)
    root = log_in(leash, idp, "root")
    # A fresh connection for each refusal (see the keep-alive test below).
    for headers in (
        {"Connection": "close"},
        {"Origin": "https://evil.example", "Connection": "close"},
        {"Origin": "null", "Connection": "close"},
    ):
        answer = root.post(ROTATE, json={"new_key_id": new_id}, headers=headers)
        assert answer.status_code == 403, (headers, answer.status_code, answer.text)
        simple = root.post(
            ROTATE,
            content=json.dumps({"new_key_id": new_id}).encode(),
            headers={**headers, "Content-Type": "text/plain"},
        )
        assert simple.status_code in (403, 415), (headers, simple.status_code)
    assert (data / "master.key.next").exists()
    alice = log_in(leash, idp, "alice")
    answer = alice.post(
        ROTATE, json={"new_key_id": new_id}, headers={"Origin": leash.url, "Connection": "close"}
    )
    assert answer.status_code == 403, answer.text
    assert (data / "master.key.next").read_text().strip() == new


def test_refused_rotations_do_not_drop_the_next_request_on_the_connection(
    nodes: Callable[..., Node], tmp_path: Path
) -> None:
    # FIXED: a human's POST /v1/master-key/rotate, refused 403, now and then leaves the
    # keep-alive connection closed by the server without an answer to the *next* request (and
    # without `Connection: close` on the 403): httpx raises "Server disconnected without sending
    # a response" for ~5 % of 200 requests (the same with POST /v1/keys/rotate, ~12 %, and
    # sometimes POST /v1/users; a session cookie's cross-site refusal does it too; 401s and the
    # admin's 4xx never do). Intermittent: from 1 in 1,000 to 1 in 10 in this review's runs.
    # Every request should get an answer, or the refusal should close the connection
    # explicitly.
    node = nodes("a")
    human = node.add_user(f"h-{secrets.token_hex(3)}")
    dropped = 0
    with httpx.Client(base_url=node.url, timeout=10) as http:
        for i in range(1000):
            try:
                answer = http.post(
                    (ROTATE, "/v1/keys/rotate")[i % 2],
                    json=({"new_key_id": "0" * 16}, {})[i % 2],
                    headers={"Authorization": f"Bearer {human}"},
                )
                assert answer.status_code == 403, answer.text
            except httpx.RemoteProtocolError:
                dropped += 1
    assert dropped == 0, f"{dropped} of 1000 requests got no answer"


# --- what the staged file may be --------------------------------------------------------------


def test_bad_staged_files_are_refused_and_change_nothing(
    nodes: Callable[..., Node], tmp_path: Path
) -> None:
    node = nodes("a")
    setup = set_up(node, tmp_path)
    assert put_secret(node, setup.user_key, "bad-staged-secret") == 200
    data = node.data
    current = (data / "master.key").read_text().strip()
    good = fresh_key()
    good_id = key_id(good, tmp_path)
    cases: dict[str, Callable[[], str]] = {}

    def mode(m: int) -> Callable[[], str]:
        return lambda: (stage(data, good, m), good_id)[1]

    cases["world-readable"] = mode(0o644)
    cases["group-readable"] = mode(0o640)
    cases["world-writable"] = mode(0o602)
    cases["empty"] = lambda: (stage(data, ""), good_id)[1]
    cases["garbage"] = lambda: (stage(data, "garbage!!"), good_id)[1]
    cases["short"] = lambda: (stage(data, base64.b64encode(b"x" * 16).decode()), good_id)[1]
    cases["long"] = lambda: (stage(data, base64.b64encode(b"x" * 64).decode()), good_id)[1]
    cases["two keys"] = lambda: (stage(data, good + "\n" + fresh_key()), good_id)[1]
    cases["same as current"] = lambda: (stage(data, current), key_id(current, tmp_path))[1]

    def directory() -> str:
        stage(data, "x")
        (data / "master.key.next").unlink()
        (data / "master.key.next").mkdir()
        return good_id

    cases["directory"] = directory
    for name, make in cases.items():
        wanted = make()
        answer = rotate(node, {"new_key_id": wanted})
        assert 400 <= answer.status_code < 500, (name, answer.status_code, answer.text)
        assert good not in answer.text, name
        assert current not in answer.text, name
        assert (data / "master.key").read_text().strip() == current, name
        assert node.ready() == 200, name
        if (data / "master.key.next").is_dir():
            (data / "master.key.next").rmdir()
    status, auth = injected(node, setup)
    assert (status, auth) == (200, "Bearer bad-staged-secret")
    assert events(node, "master_key.rotated") == []
    assert node.process.poll() is None


def test_a_fifo_as_the_staged_key_does_not_wedge_online_rotation(
    nodes: Callable[..., Node], tmp_path: Path
) -> None:
    # FIXED: `master.key.next` that is a FIFO is opened and read: the rotate call never
    # answers, and the node's online rotation stays wedged after the FIFO is replaced by a good
    # key (every later POST /v1/master-key/rotate hangs too) until the process restarts. A
    # directory is refused ("Is a directory"); anything but a regular file should be refused at
    # once, without blocking (O_NONBLOCK, or check the type first).
    node = nodes("a")
    staged = node.data / "master.key.next"
    os.mkfifo(staged, 0o600)
    statuses = []
    try:
        try:
            statuses.append(
                rotate_with_timeout(node, {"new_key_id": "0123456789abcdef"}, 4).status_code
            )
        except httpx.TimeoutException:
            statuses.append(0)
        parked = node.data / f"fifo-{secrets.token_hex(3)}"
        staged.rename(parked)
        new = fresh_key()
        stage(node.data, new)
        try:
            statuses.append(
                rotate_with_timeout(node, {"new_key_id": key_id(new, tmp_path)}, 6).status_code
            )
        except httpx.TimeoutException:
            statuses.append(0)
    finally:
        # Unblock any reader the node left waiting, so the node can be stopped.
        for path in node.data.glob("fifo-*"):
            with contextlib.suppress(OSError):
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    assert node.ready() == 200
    assert 400 <= statuses[0] < 500, statuses
    assert statuses[1] == 200, statuses


def rotate_with_timeout(node: Node, body: Any, seconds: float) -> httpx.Response:
    return node.http.post(
        ROTATE,
        json=body,
        headers={"Authorization": f"Bearer {node.admin_key}", "Connection": "close"},
        timeout=seconds,
    )


def test_a_symlinked_staged_key_does_not_leave_master_key_pointing_outside_the_data_dir(
    nodes: Callable[..., Node], tmp_path: Path
) -> None:
    # FIXED: `master.key.next` may be a symlink (to the operator's new.key, say): the rotation
    # succeeds and renames the *link* over `master.key`, so the store's only key now lives
    # outside the data dir, in a file the guide's workflow treats as a temporary (delete new.key
    # after the rotation and the node never starts again; whoever can write the target's
    # directory can swap the key). A staged symlink should be refused (O_NOFOLLOW), or its
    # content installed as a regular 0600 file.
    node = nodes("a")
    setup = set_up(node, tmp_path)
    assert put_secret(node, setup.user_key, "symlink-secret") == 200
    outside = key_file(tmp_path)
    new = outside.read_text().strip()
    (node.data / "master.key.next").symlink_to(outside)
    answer = rotate(node, {"new_key_id": key_id(new, tmp_path)})
    if answer.status_code == 200:
        master = node.data / "master.key"
        assert not master.is_symlink(), f"master.key -> {os.readlink(master)}"
        assert master.read_text().strip() == new
        assert stat.S_IMODE(master.stat().st_mode) & 0o077 == 0
    else:
        assert 400 <= answer.status_code < 500, answer.text
    # Either way the operator deleting new.key never makes the store unopenable.
    outside.unlink()
    node.stop()
    again = Node(node.data, node.upstream, node.admin_key)
    try:
        assert again.url, "the node no longer starts once new.key is deleted:\n" + again.log()
        assert injected(again, setup) == (200, "Bearer symlink-secret")
    finally:
        again.stop()


# --- one node on SQLite -----------------------------------------------------------------------


def test_online_rotation_keeps_every_sealed_value_and_only_the_new_key_opens_the_store(
    nodes: Callable[..., Node], tmp_path: Path
) -> None:
    node = nodes("a")
    setup = set_up(node, tmp_path)
    assert put_secret(node, setup.user_key, "before-rotation") == 200
    preview = b'{"to": "bob", "marker": "' + secrets.token_hex(8).encode() + b'"}'
    ask = high_risk(node, setup, preview)
    assert ask.status_code == 403, ask.text
    assert ask.json()["error"] == "approval_required", ask.text
    approval = ask.json()["approval_id"]
    old = (node.data / "master.key").read_text().strip()
    new_file = key_file(tmp_path)
    new = new_file.read_text().strip()
    done = cli(
        "master-key", "rotate", "--online", "--new-key-file", str(new_file),
        "--data-dir", str(node.data),
        env={"LEASH_URL": node.url, "LEASH_TOKEN": node.admin_key},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for form in forms(old) + forms(new):
        assert form not in done.stdout + done.stderr
    master = node.data / "master.key"
    assert master.read_text().strip() == new
    assert not master.is_symlink()
    assert stat.S_IMODE(master.stat().st_mode) & 0o077 == 0
    assert not (node.data / "master.key.next").exists()
    # Nothing in the data dir still holds the old key.
    for path in node.data.iterdir():
        if path.is_file():
            content = path.read_bytes()
            assert old.encode() not in content, path
            assert base64.b64decode(old) not in content, path
    rotated = events(node, "master_key.rotated")
    assert len(rotated) == 1
    assert key_id(old, tmp_path) in rotated[0]["reason"]
    assert key_id(new, tmp_path) in rotated[0]["reason"]
    assert node.ready() == 200
    assert injected(node, setup) == (200, "Bearer before-rotation")
    body = node.call("GET", f"/v1/approvals/{approval}/body", setup.user_key)
    assert body.status_code == 200, body.text
    assert body.content == preview
    assert put_secret(node, setup.user_key, "after-rotation") == 200
    assert node.call("POST", "/v1/keys/rotate", node.admin_key, {}).status_code == 200
    node.stop()
    # Only the new key opens it; every value is there.
    again = Node(node.data, node.upstream, node.admin_key)
    try:
        assert again.url, again.log()
        assert injected(again, setup) == (200, "Bearer after-rotation")
        body = again.call("GET", f"/v1/approvals/{approval}/body", setup.user_key)
        assert body.status_code == 200, body.text
        assert body.content == preview
    finally:
        again.stop()
    verify = audit_verify(sqlite_url(node))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    master.write_text(old + "\n")
    refused = Node(node.data, node.upstream, node.admin_key)
    try:
        assert not refused.url, "the old key opened the store"
        assert refused.process.wait(timeout=10) != 0
        assert "master key" in refused.log()
        for form in forms(old) + forms(new):
            assert form not in refused.log()
    finally:
        refused.stop()


def test_no_answer_log_line_or_audit_event_carries_key_material(
    nodes: Callable[..., Node], tmp_path: Path
) -> None:
    node = nodes("a", log="debug")
    setup = set_up(node, tmp_path)
    assert put_secret(node, setup.user_key, "log-secret") == 200
    old = (node.data / "master.key").read_text().strip()
    new = fresh_key()
    answers: list[str] = []
    # Refusals that name the staged file, then the rotation itself.
    stage(node.data, new, 0o644)
    answers.append(rotate(node, {"new_key_id": key_id(new, tmp_path)}).text)
    stage(node.data, new)
    answers.append(rotate(node, {"new_key_id": "ffffffffffffffff"}).text)
    answers.append(rotate(node, {"new_key_id": key_id(new, tmp_path)}).text)
    answers.append(rotate(node, {"new_key_id": key_id(new, tmp_path)}).text)
    assert injected(node, setup)[0] == 200
    answers.append(node.call("GET", "/v1/audit?limit=10000", node.admin_key).text)
    answers.append(node.http.get("/metrics").text)
    answers.append(node.call("GET", "/v1/keys", node.admin_key).text)
    node.stop()
    text = node.log() + "".join(answers)
    for form in forms(old) + forms(new):
        assert form not in text, "key material in an answer or a log line"


def test_kill_9_of_the_rotating_node_leaves_a_store_that_opens(
    nodes: Callable[..., Node], tmp_path: Path
) -> None:
    node = nodes("a")
    setup = set_up(node, tmp_path)
    assert put_secret(node, setup.user_key, "crash-secret") == 200
    for i in range(20):  # more sealed values, a longer transaction
        other = node.add_user(f"crash-{i}-{secrets.token_hex(3)}")
        assert put_secret(node, other, f"other-{i}") == 200
    old = (node.data / "master.key").read_text().strip()
    new = fresh_key()
    stage(node.data, new)
    new_id = key_id(new, tmp_path)
    results: list[int] = []

    def call() -> None:
        try:
            results.append(rotate(node, {"new_key_id": new_id}).status_code)
        except httpx.HTTPError:
            results.append(0)

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.003)
    node.process.send_signal(signal.SIGKILL)
    node.process.wait()
    thread.join()
    master = (node.data / "master.key").read_text().strip()
    assert master in (old, new)
    if results == [200]:
        assert master == new
    again = Node(node.data, node.upstream, node.admin_key)
    try:
        assert again.url, again.log()
        assert injected(again, setup) == (200, "Bearer crash-secret")
        # Whatever happened, a rotation to the staged key completes now (or already did).
        if (again.data / "master.key").read_text().strip() != new:
            if not (again.data / "master.key.next").exists():
                stage(again.data, new)
            assert rotate(again, {"new_key_id": new_id}).status_code == 200
        assert injected(again, setup) == (200, "Bearer crash-secret")
        assert stat.S_IMODE((again.data / "master.key").stat().st_mode) & 0o077 == 0
    finally:
        again.stop()


def test_a_restart_with_a_staged_key_keeps_the_old_key_until_the_rotation(
    nodes: Callable[..., Node], tmp_path: Path
) -> None:
    node = nodes("a")
    setup = set_up(node, tmp_path)
    assert put_secret(node, setup.user_key, "restart-secret") == 200
    old = (node.data / "master.key").read_text().strip()
    new = fresh_key()
    stage(node.data, new)
    node.stop()
    again = Node(node.data, node.upstream, node.admin_key)
    try:
        assert again.url, again.log()
        assert (again.data / "master.key").read_text().strip() == old
        assert (again.data / "master.key.next").read_text().strip() == new
        assert again.ready() == 200
        assert injected(again, setup) == (200, "Bearer restart-secret")
        assert rotate(again, {"new_key_id": key_id(new, tmp_path)}).status_code == 200
        assert (again.data / "master.key").read_text().strip() == new
    finally:
        again.stop()
    # After the rotation, a stale copy of the old key staged again is no key at all.
    stage(node.data, old)
    third = Node(node.data, node.upstream, node.admin_key)
    try:
        assert third.url, third.log()
        assert (third.data / "master.key").read_text().strip() == new
        assert injected(third, setup) == (200, "Bearer restart-secret")
    finally:
        third.stop()


# --- a cluster on PostgreSQL ------------------------------------------------------------------


def cluster(
    nodes: Callable[..., Node], database: str, key: str, names: tuple[str, ...] = ("a", "b")
) -> list[Node]:
    started = [nodes(n, database=database, master_key=key) for n in names]
    for node in started:
        assert node.url, node.log()
    return started


def test_concurrent_vault_writes_on_two_nodes_survive_a_rotation(
    nodes: Callable[..., Node], database: str, tmp_path: Path
) -> None:
    old, new = fresh_key(), fresh_key()
    a, b = cluster(nodes, database, old)
    setups = [set_up(a, tmp_path) for _ in range(4)]
    for node in (a, b):
        stage(node.data, new)
    last: dict[int, str] = {}
    stop = threading.Event()
    statuses: list[int] = []

    def writer(i: int) -> None:
        n = 0
        while not stop.is_set():
            secret = f"s{i}-{n}"
            status = put_secret((a, b)[n % 2], setups[i].user_key, secret)
            statuses.append(status)
            if status == 200:
                last[i] = secret
            n += 1
            time.sleep(0.05)  # ~80 sealed writes a second over the cluster

    with ThreadPoolExecutor(len(setups)) as pool:
        for i in range(len(setups)):
            pool.submit(writer, i)
        time.sleep(0.5)
        # A value written meanwhile cancels a rotation (409, documented): retry as an operator
        # would, a few times.
        tries = []
        for _ in range(10):
            answer = rotate(a, {"new_key_id": key_id(new, tmp_path)})
            tries.append(answer.status_code)
            if answer.status_code != 409:
                break
            time.sleep(0.2)
        time.sleep(2.5)
        stop.set()
    assert answer.status_code == 200, (tries, answer.text)
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    assert wait_for(lambda: a.ready() == 200 and b.ready() == 200)
    # With LEASH_MASTER_KEY, the staged file is removed once the node switched.
    assert wait_for(lambda: not (a.data / "master.key.next").exists())
    assert wait_for(lambda: not (b.data / "master.key.next").exists())
    time.sleep(6)  # the documented sweep of values sealed under the old key
    for i, setup in enumerate(setups):
        for node in (a, b):
            assert injected(node, setup) == (200, f"Bearer {last[i]}"), (i, node.url)
    for node in (a, b):
        node.stop()
    # Each node, started with only the new key, opens every value.
    fresh = cluster(nodes, database, new, ("a2", "b2"))
    for i, setup in enumerate(setups):
        for node in fresh:
            assert injected(node, setup) == (200, f"Bearer {last[i]}"), (i, node.url)
    assert fresh[0].call("POST", "/v1/keys/rotate", fresh[0].admin_key, {}).status_code == 200
    for node in fresh:
        node.stop()
    verify = audit_verify(database)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # A node restarted with the old LEASH_MASTER_KEY refuses to start, and says why.
    stale = nodes("c", database=database, master_key=old)
    assert not stale.url, "a node ran with a key that opens nothing"
    assert stale.process.wait(timeout=10) != 0
    assert "master key" in stale.log().lower() or "master_key" in stale.log().lower()
    for form in forms(old) + forms(new):
        assert form not in stale.log()


def test_a_node_without_the_staged_key_stops_sealing_never_serves_a_wrong_secret_and_recovers(
    nodes: Callable[..., Node], database: str, tmp_path: Path
) -> None:
    old, new = fresh_key(), fresh_key()
    a, b = cluster(nodes, database, old)
    setup = set_up(a, tmp_path)
    assert put_secret(a, setup.user_key, "before") == 200
    stage(a.data, new)
    assert rotate(a, {"new_key_id": key_id(new, tmp_path)}).status_code == 200
    assert put_secret(a, setup.user_key, "after") == 200
    assert wait_for(lambda: b.ready() == 503), "the node without the key still says ready"
    # It refuses what would seal.
    assert put_secret(b, setup.user_key, "from-b") == 503
    assert b.call("POST", "/v1/keys/rotate", b.admin_key, {}).status_code == 503
    preview = b'{"marker": "' + secrets.token_hex(6).encode() + b'"}'
    ask = high_risk(b, setup, preview)
    if ask.status_code == 403 and ask.json().get("error") == "approval_required":
        # If it took the approval, its preview must open on the node that has the key.
        body = a.call("GET", f"/v1/approvals/{ask.json()['approval_id']}/body", setup.user_key)
        assert body.status_code in (200, 404), body.text
        if body.status_code == 200:
            assert body.content == preview
    else:
        assert ask.status_code == 503, ask.text
    # It never serves a wrong credential: the current one, or none.
    for _ in range(3):
        status, auth = injected(b, setup)
        assert auth in (None, "Bearer after"), auth
        assert status in (200, 503), status
    assert a.ready() == 200
    assert injected(a, setup) == (200, "Bearer after")
    # Given the key, it switches by itself.
    stage(b.data, new)
    assert wait_for(lambda: b.ready() == 200, 5), b.log()
    assert put_secret(b, setup.user_key, "from-b") == 200
    assert injected(b, setup) == (200, "Bearer from-b")
    assert injected(a, setup) == (200, "Bearer from-b")
    for node in (a, b):
        node.stop()
    again = cluster(nodes, database, new, ("a2",))[0]
    assert injected(again, setup) == (200, "Bearer from-b")


def test_a_node_with_the_staged_key_opens_new_values_before_it_switched(
    nodes: Callable[..., Node], database: str, tmp_path: Path
) -> None:
    # FIXED: the guide says "until then [its switch, within a second] a node opens values
    # under either key". It does not: right after node A's rotation, node B (the new key
    # staged, /readyz 200) answers the gateway with 503 temporarily_unavailable "the vaulted
    # credential cannot be used" and logs ERROR "a vaulted credential does not open with the
    # master key", until its 500-ms poll switches it. Every rotation is thus a short outage of
    # credential injection on every other node, with an error that reads as corruption. A node
    # holding the staged key should try it when a value does not open under the current one.
    old, new = fresh_key(), fresh_key()
    a, b = cluster(nodes, database, old)
    setups = [set_up(a, tmp_path) for _ in range(6)]
    for i, setup in enumerate(setups):
        assert put_secret(a, setup.user_key, f"window-{i}") == 200
    # Agents holding tokens from node B (no gateway call yet: B has opened none of the values).
    agents = [Agent.from_jwk_file(b.url, s.agent_id, s.key_file) for s in setups]
    tasks = [agent.task(s.handle) for agent, s in zip(agents, setups, strict=True)]
    for task in tasks:
        task._usable_token()
    http = httpx.Client(timeout=10)
    try:
        for node in (a, b):
            stage(node.data, new)
        assert rotate(a, {"new_key_id": key_id(new, tmp_path)}).status_code == 200
        start = time.monotonic()
        seen = []
        for task in tasks:
            answer = http.get(task.url("mail", "/messages/w"), auth=task.auth)
            seen.append((round(time.monotonic() - start, 3), answer.status_code))
    finally:
        http.close()
        for agent in agents:
            agent.close()
    assert all(status == 200 for _, status in seen), seen
    assert "does not open" not in b.log(), b.log()


def test_two_rotations_at_once_to_different_keys_end_in_one_key(
    nodes: Callable[..., Node], database: str, tmp_path: Path
) -> None:
    old, k1, k2 = fresh_key(), fresh_key(), fresh_key()
    a, b = cluster(nodes, database, old)
    setup = set_up(a, tmp_path)
    assert put_secret(a, setup.user_key, "race") == 200
    for i in range(10):
        other = a.add_user(f"race-{i}-{secrets.token_hex(3)}")
        assert put_secret((a, b)[i % 2], other, f"r{i}") == 200
    stage(a.data, k1)
    stage(b.data, k2)
    ids = {key_id(k1, tmp_path): k1, key_id(k2, tmp_path): k2}
    barrier = threading.Barrier(2)

    def go(node: Node, wanted: str) -> httpx.Response:
        barrier.wait()
        return rotate(node, {"new_key_id": wanted})

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(go, (a, b), list(ids)))
    statuses = sorted(r.status_code for r in answers)
    assert statuses[0] == 200, [r.text for r in answers]
    assert statuses[1] in (409, 503), [r.text for r in answers]
    winner = ids[
        answers[0].json()["key_id"]
        if answers[0].status_code == 200
        else answers[1].json()["key_id"]
    ]
    winner_node, loser_node = (a, b) if winner == k1 else (b, a)
    assert wait_for(lambda: loser_node.ready() == 503)
    assert winner_node.ready() == 200
    assert len(events(winner_node, "master_key.rotated")) == 1
    assert injected(winner_node, setup) == (200, "Bearer race")
    stage(loser_node.data, winner)
    assert wait_for(lambda: loser_node.ready() == 200), loser_node.log()
    assert injected(loser_node, setup) == (200, "Bearer race")
    for node in (a, b):
        node.stop()
    again = cluster(nodes, database, winner, ("a2",))[0]
    assert injected(again, setup) == (200, "Bearer race")


def test_two_rotations_at_once_to_the_same_key_never_fail_and_agree(
    nodes: Callable[..., Node], database: str, tmp_path: Path
) -> None:
    old, new = fresh_key(), fresh_key()
    a, b = cluster(nodes, database, old)
    setup = set_up(a, tmp_path)
    assert put_secret(a, setup.user_key, "same") == 200
    for node in (a, b):
        stage(node.data, new)
    new_id = key_id(new, tmp_path)
    barrier = threading.Barrier(4)

    def go(node: Node) -> httpx.Response:
        barrier.wait()
        return rotate(node, {"new_key_id": new_id})

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(go, (a, b, a, b)))
    statuses = [r.status_code for r in answers]
    assert all(s < 500 for s in statuses), [r.text for r in answers]
    assert statuses.count(200) >= 1
    assert wait_for(lambda: a.ready() == 200 and b.ready() == 200)
    # Both switched (the staged file goes once a LEASH_MASTER_KEY node switched).
    assert wait_for(lambda: not any((n.data / "master.key.next").exists() for n in (a, b)))
    time.sleep(1)
    assert len(events(a, "master_key.rotated")) == 1, statuses
    for node in (a, b):
        assert injected(node, setup) == (200, "Bearer same")
        node.stop()
    again = cluster(nodes, database, new, ("a2",))[0]
    assert injected(again, setup) == (200, "Bearer same")


def test_a_key_file_node_and_an_env_node_in_one_cluster_both_end_on_the_new_key(
    nodes: Callable[..., Node], database: str, tmp_path: Path
) -> None:
    """One node keeps the key in master.key (a copy of the shared key), one in LEASH_MASTER_KEY;
    the rotation must leave the first with master.key = new (0600) and the second with no
    staged file left and a warning to change its variable."""
    old, new = fresh_key(), fresh_key()
    a = nodes("a", database=database, master_key=old)
    assert a.url, a.log()
    file_data = tmp_path / "b" / "data"
    file_data.mkdir(parents=True)
    (file_data / "master.key").write_text(old + "\n")
    (file_data / "master.key").chmod(0o600)
    b = nodes("b", database=database)
    assert b.url, b.log()
    setup = set_up(a, tmp_path)
    assert put_secret(b, setup.user_key, "mixed") == 200
    for node in (a, b):
        stage(node.data, new)
    assert rotate(b, {"new_key_id": key_id(new, tmp_path)}).status_code == 200
    assert wait_for(lambda: a.ready() == 200 and not (a.data / "master.key.next").exists())
    assert (b.data / "master.key").read_text().strip() == new
    assert stat.S_IMODE((b.data / "master.key").stat().st_mode) & 0o077 == 0
    assert (
        not (a.data / "master.key").exists() or (a.data / "master.key").read_text().strip() != old
    )
    assert "LEASH_MASTER_KEY" in a.log(), a.log()
    for node in (a, b):
        assert injected(node, setup) == (200, "Bearer mixed")
        node.stop()
    again = nodes("b", database=database)  # its master.key alone
    assert again.url, again.log()
    assert injected(again, setup) == (200, "Bearer mixed")
