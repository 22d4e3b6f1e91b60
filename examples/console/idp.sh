#!/usr/bin/env bash
# A local identity provider for trying the console: npm `oidc-provider` (the one Leash's tests
# use, sdk/python/tests/idp) on http://127.0.0.1:8471, with two people, alice (alice-password)
# and root (root-password, an admin), and a client for the Leash of examples/console/leash.toml
# (secret `console-example-secret`). Needs Node.js and npm. For trying it out only: its keys
# and sessions live in memory.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
bash "$repo/sdk/python/tests/idp/install.sh"
exec node "$repo/sdk/python/tests/idp/idp.mjs" "$repo/examples/console/idp.json"
