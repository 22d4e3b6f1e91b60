"""`examples/agents/inbox.py` runs as the README says, its send approved by the human."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO, Setup


def test_the_example_agent_does_its_task(setup: Setup) -> None:
    leash = setup.leash
    script = REPO / "examples" / "agents" / "inbox.py"
    env = {**os.environ, "LEASH_GRANT_HANDLE": setup.handle, "LEASH_URL": leash.url}
    command = [sys.executable, str(script), "--id", setup.agent_id, "--key", str(setup.key_file)]
    # The grant of the fixture allows read, draft and send (send with approval).
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as agent:
        assert agent.stdout is not None
        lines = []
        for line in agent.stdout:
            lines.append(line)
            if line.startswith("waiting for the human"):
                approval_id = line.rsplit(" ", 1)[-1].strip()
                leash.decide(setup.user_key, approval_id, "approve")
        errors = agent.stderr.read() if agent.stderr else ""
    assert agent.returncode == 0, "".join(lines) + errors
    assert lines[-1] == "task complete: every token of it is dead\n"
    assert "sent the reply: HTTP 200\n" in lines
    assert leash.grant_status(setup.user_key, setup.grant_id) == "completed"
    assert setup.handle not in "".join(lines) + errors
