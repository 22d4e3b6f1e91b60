"""Leash for agents: a task's token exchange, DPoP proofs, renewal and approval waits as an
httpx auth (API §15).

    agent = leash_agent.Agent.from_jwk_file(issuer, agent_id, "mailbot.jwk")
    task = agent.task(handle="lgh_…", scope=["mail:read", "mail:draft"])
    r = httpx.get(task.url("mail", "/messages/1"), auth=task.auth)
"""

from ._agent import Agent, PendingApproval, Task
from ._auth import LeashAuth
from ._errors import ApprovalDenied, ApprovalTimeout, LeashError, TaskEnded
from ._jose import InvalidKey, SigningKey

__all__ = [
    "Agent",
    "ApprovalDenied",
    "ApprovalTimeout",
    "InvalidKey",
    "LeashAuth",
    "LeashError",
    "PendingApproval",
    "SigningKey",
    "Task",
    "TaskEnded",
]
