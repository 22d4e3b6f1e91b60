#!/usr/bin/env bash
# The Python SDK's checks: ruff, mypy (strict) and pytest against the real `leash` binary, in a
# virtualenv under target/ that this script creates and keeps up to date; the MCP and OIDC tests
# also need Node.js and npm (tests/mcp_node/install.sh, tests/idp/install.sh), and the console
# tests Debian's chromium, which Playwright drives (its own browser downloads are never used).
#   LEASH_BIN  the binary to test (default: target/release/leash, built here if missing)
# Arguments go to pytest (e.g. `-k story`).
set -euo pipefail
cd "$(dirname "$0")"
repo=$(cd ../.. && pwd)
venv="$repo/target/py-sdk"
[[ -x $venv/bin/python ]] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check -e ".[dev]"
# The MCP tests' Node.js side (tests/mcp_node: the TypeScript client, server-everything). Node is
# required: without it those tests fail.
if command -v node >/dev/null; then
  bash tests/mcp_node/install.sh
  # The OIDC tests' IdP (tests/idp: oidc-provider).
  bash tests/idp/install.sh
fi
chromium=${LEASH_CHROMIUM:-/usr/bin/chromium}
if [[ ! -x $chromium ]]; then
  echo "check.sh: $chromium is missing: the console tests need Debian's chromium" \
    "(apt-get install chromium), or LEASH_CHROMIUM naming another chromium" >&2
  exit 1
fi
if [[ -z ${LEASH_BIN:-} ]]; then
  (cd "$repo" && cargo build --release -p leash-cli)
  export LEASH_BIN="$repo/target/release/leash"
fi
"$venv/bin/ruff" check . ../../examples/agents ../../examples/browser-agent
"$venv/bin/ruff" format --check . ../../examples/agents ../../examples/browser-agent
"$venv/bin/mypy" . ../../examples/agents ../../examples/browser-agent
"$venv/bin/pytest" -q "$@"
