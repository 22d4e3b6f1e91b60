"""What Leash adds to one MCP tool call (issue #30): the official Python `mcp` client calls a real
FastMCP server (tests/mcp_servers/crm.py) directly and through Leash's `/mcp/crm` (with the
SDK's `task.auth`: a DPoP proof per request), in alternating rounds so that the machine's drift
falls on both alike, and prints the medians and the difference per call.

    LEASH_BIN=target/release/leash target/py-sdk/bin/python sdk/python/bench/mcp_overhead.py

Environment: `ROUNDS` (default 20) rounds of `CALLS` (default 25) sequential calls each way.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from conftest import Leash, set_up, start_upstream  # noqa: E402
from mcp_fixtures import mcp_session, start_crm  # noqa: E402

from leash_agent import Agent  # noqa: E402

# The test servers' limits are off (conftest), so the rate of calls here is never refused.
TOOLS = """
[[upstream]]
name = "crm"
url = "{url}"
kind = "mcp"
[[upstream.tool]]
name = "search_contacts"
action = "crm:search"
"""


async def round_of(url: str, auth: httpx.Auth | None, calls: int) -> float:
    """Seconds per call over `calls` sequential calls in one session (setup not counted)."""
    async with mcp_session(url, auth) as session:
        await session.call_tool("search_contacts", {"query": "ada"})
        started = time.perf_counter()
        for _ in range(calls):
            await session.call_tool("search_contacts", {"query": "ada"})
        return (time.perf_counter() - started) / calls


def main() -> None:
    rounds = int(os.environ.get("ROUNDS", "20"))
    calls = int(os.environ.get("CALLS", "25"))
    upstream, server = start_upstream()
    with start_crm() as crm:
        leash = Leash(upstream, TOOLS.format(url=crm.url))
        try:
            with tempfile.TemporaryDirectory() as keys:
                setup = set_up(
                    leash,
                    Path(keys),
                    upstreams=["crm"],
                    actions=["crm:search"],
                    approval_required=[],
                )
                agent = Agent.from_jwk_file(leash.url, setup.agent_id, setup.key_file)
                task = agent.task(setup.handle)
                direct: list[float] = []
                through: list[float] = []
                for _ in range(rounds):
                    direct.append(asyncio.run(round_of(crm.url, None, calls)))
                    through.append(asyncio.run(round_of(f"{leash.url}/mcp/crm", task.auth, calls)))
                agent.close()
        finally:
            leash.stop()
            server.shutdown()
    d, t = statistics.median(direct) * 1e3, statistics.median(through) * 1e3
    print(
        f"mcp_overhead: {rounds} rounds of {calls} calls each way; medians per call: "
        f"direct {d:.2f} ms, through Leash {t:.2f} ms, added {t - d:.2f} ms ({t / d:.2f}x); "
        f"fastest rounds: direct {min(direct) * 1e3:.2f} ms, "
        f"through Leash {min(through) * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    main()
