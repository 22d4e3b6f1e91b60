#!/usr/bin/env python3
"""A browser agent behind Leash's forward proxy: Playwright drives Chromium through Leash, which
holds the human's session for the portal; the browser never sees a cookie of it.

The agent gets a proxy credential for its task with the Python SDK, makes the browser trust
Leash's proxy CA (a private NSS database in a temporary HOME, as Chromium on Linux reads it),
opens `--url`, prints the page's title and text, and completes the task. With
`examples/browser-agent/leash.toml`, the human's session vaulted
(`leash vault put portal --kind cookie`, or the console) and a grant of portal:read for this
agent:

    pip install ./sdk/python        # brings playwright; the browser is Debian's chromium
    LEASH_GRANT_HANDLE=lgh_… python3 examples/browser-agent/agent.py \\
        --id spiffe://example.org/agent/browser --key browser.jwk \\
        --url https://portal.example.com/ledger

Needs `chromium` and `certutil` (Debian: `apt-get install chromium libnss3-tools`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

import leash_agent


def trusting_home(leash_url: str) -> Path:
    """A HOME whose NSS database trusts Leash's proxy CA, and nothing else added."""
    home = Path(tempfile.mkdtemp(prefix="leash-browser-"))
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    ca = home / "leash-proxy-ca.pem"
    ca.write_text(httpx.get(f"{leash_url}/v1/proxy/ca", timeout=10).raise_for_status().text)
    db = f"sql:{nssdb}"
    certutil = shutil.which("certutil")
    if certutil is None:
        raise SystemExit("certutil is missing: install Debian's libnss3-tools")
    subprocess.run([certutil, "-d", db, "-N", "--empty-password"], check=True)  # noqa: S603
    trust = [certutil, "-d", db, "-A", "-t", "C,,", "-n", "leash-proxy", "-i", str(ca)]
    subprocess.run(trust, check=True)  # noqa: S603 (fixed arguments)
    return home


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--leash",
        default=os.environ.get("LEASH_URL", "http://127.0.0.1:8470"),
        help="Leash's URL (default: $LEASH_URL or http://127.0.0.1:8470)",
    )
    parser.add_argument(
        "--proxy",
        default=os.environ.get("LEASH_PROXY", "http://127.0.0.1:8471"),
        help="Leash's forward proxy (default: $LEASH_PROXY or http://127.0.0.1:8471)",
    )
    parser.add_argument("--id", required=True, help="the agent's id (spiffe://…)")
    parser.add_argument("--key", required=True, help="the key file `leash agent keygen` wrote")
    parser.add_argument("--url", required=True, help="the page to read, on a configured host")
    parser.add_argument("--chromium", default=os.environ.get("LEASH_CHROMIUM", "/usr/bin/chromium"))
    args = parser.parse_args()
    handle = os.environ.get("LEASH_GRANT_HANDLE")
    if not handle:
        print("set LEASH_GRANT_HANDLE to the grant's handle (lgh_…)", file=sys.stderr)
        return 2

    agent = leash_agent.Agent.from_jwk_file(args.leash, args.id, args.key)
    task = agent.task(handle)
    credential = task.proxy_credential()
    home = trusting_home(args.leash)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=args.chromium,
            headless=True,
            args=os.environ.get("LEASH_CHROMIUM_ARGS", "").split(),
            proxy={"server": args.proxy, "username": "leash", "password": credential},
            env={**os.environ, "HOME": str(home)},
        )
        page = browser.new_page()
        response = page.goto(args.url)
        status = response.status if response else 0
        print(f"opened {args.url}: HTTP {status}", flush=True)
        print(f"title: {page.title()}", flush=True)
        print(page.inner_text("body"), flush=True)
        cookies = page.context.cookies()
        print(f"cookies the browser holds: {len(cookies)}", flush=True)
        browser.close()
    task.complete()
    print("task complete: the proxy credential is dead", flush=True)
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
