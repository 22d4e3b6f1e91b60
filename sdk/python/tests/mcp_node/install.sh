#!/usr/bin/env bash
# Installs the MCP test harness's pinned npm packages (package-lock.json) here.
exec bash "$(dirname "$0")/../npm_ci.sh" "$(dirname "$0")"
