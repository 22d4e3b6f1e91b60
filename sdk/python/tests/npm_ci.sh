#!/usr/bin/env bash
# Installs the pinned npm packages of a test harness directory ($1: its package-lock.json) into
# node_modules there, with `npm ci`; does nothing when they are already installed from this lock.
set -euo pipefail
cd "$1"
stamp=node_modules/.package-lock.sha256
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi
npm ci --no-audit --no-fund --loglevel=error
echo "$want" >"$stamp"
