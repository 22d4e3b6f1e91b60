#!/usr/bin/env python3
"""The demo's inbox task, as an agent written with the Python SDK: read a message, draft a
reply, and send it once the human approves. The agent never sees the human's mail credential;
every request goes through Leash's gateway with a short-lived token bound to a key of its own.

Against the README's walkthrough (`leash serve --config examples/leash.toml`, a grant of
mail:read, mail:draft and mail:send for this agent):

    pip install ./sdk/python
    LEASH_GRANT_HANDLE=lgh_… python3 examples/agents/inbox.py \\
        --id spiffe://example.org/agent/mailbot --key mailbot.jwk

The handle comes from the environment, not the command line, where `ps` would show it.
"""

from __future__ import annotations

import argparse
import os
import sys

import httpx

import leash_agent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--leash",
        default=os.environ.get("LEASH_URL", "http://127.0.0.1:8470"),
        help="Leash's URL (default: $LEASH_URL or http://127.0.0.1:8470)",
    )
    parser.add_argument("--id", required=True, help="the agent's id (spiffe://…)")
    parser.add_argument("--key", required=True, help="the key file `leash agent keygen` wrote")
    parser.add_argument("--message", default="1", help="the message to answer (default 1)")
    args = parser.parse_args()
    handle = os.environ.get("LEASH_GRANT_HANDLE")
    if not handle:
        print("set LEASH_GRANT_HANDLE to the grant's handle (lgh_…)", file=sys.stderr)
        return 2

    def waiting(pending: leash_agent.PendingApproval) -> None:
        print(
            f"waiting for the human to approve {pending.action} ({pending.method} "
            f"{pending.path}): leash approvals approve {pending.id}",
            flush=True,
        )

    agent = leash_agent.Agent.from_jwk_file(args.leash, args.id, args.key)
    task = agent.task(handle, ["mail:read", "mail:draft", "mail:send"], on_approval=waiting)
    reply = {"in_reply_to": args.message, "body": "Thanks, I will have it ready by Friday."}
    try:
        with httpx.Client(auth=task.auth, timeout=30) as mail:
            message = mail.get(task.url("mail", f"/messages/{args.message}"))
            print(f"read message {args.message}: HTTP {message.status_code}", flush=True)
            draft = mail.post(task.url("mail", "/drafts"), json=reply)
            print(f"drafted a reply: HTTP {draft.status_code}", flush=True)
            sent = mail.post(task.url("mail", f"/messages/{args.message}/send"), json=reply)
            print(f"sent the reply: HTTP {sent.status_code}", flush=True)
        task.complete()
        print("task complete: every token of it is dead", flush=True)
    except leash_agent.ApprovalDenied:
        print("the human said no; nothing was sent", file=sys.stderr)
        task.complete()
        return 1
    except leash_agent.LeashError as refused:
        print(f"Leash refused: {refused}", file=sys.stderr)
        return 1
    finally:
        agent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
