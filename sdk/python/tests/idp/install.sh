#!/usr/bin/env bash
# Installs the test IdP's pinned npm packages (package-lock.json: oidc-provider) here.
exec bash "$(dirname "$0")/../npm_ci.sh" "$(dirname "$0")"
