#!/usr/bin/env bash
# Installs the pinned npm packages of the test IdP (package-lock.json: oidc-provider) into
# node_modules here, with `npm ci`; does nothing when they are already installed from this lock.
set -euo pipefail
cd "$(dirname "$0")"
stamp=node_modules/.package-lock.sha256
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi
npm ci --no-audit --no-fund --loglevel=error
echo "$want" >"$stamp"
