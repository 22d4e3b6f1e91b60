#!/usr/bin/env bash
# schemathesis (PyPI) against a running Leash, from its own /openapi.json: no answer is 5xx and
# every answer matches its documented status, content type and schema. Bounded: a fixed number
# of examples per operation, as the admin and as a human (whose vault endpoints the admin may
# not use). Uses the debug binary the test run built.
set -euo pipefail
cd "$(dirname "$0")/.."

version=4.32.5
if ! schemathesis --version 2>/dev/null | grep -q "$version"; then
  python3 -m pip install -q --disable-pip-version-check "schemathesis==$version"
fi
# The binary the workspace's test build makes (a no-op after `cargo test --workspace`; building
# it with `-p leash-cli` would resolve features differently and rebuild half the workspace).
cargo test -q --workspace --no-run

dir=$(mktemp -d)
admin="lsh_ci_admin_$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
LEASH_ADMIN_TOKEN="$admin" LEASH_LOG=warn target/debug/leash serve \
  --config examples/leash.toml --data-dir "$dir/data" --listen 127.0.0.1:0 >"$dir/log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 100); do
  grep -q "^leash listening on " "$dir/log" && break
  sleep 0.1
done
url="http://$(sed -n 's/^leash listening on \([^ ]*\).*/\1/p' "$dir/log" | head -1)"

human=$(python3 - "$url" "$admin" <<'EOF'
import json, sys, urllib.request
url, admin = sys.argv[1], sys.argv[2]
request = urllib.request.Request(
    f"{url}/v1/users", data=json.dumps({"name": "schemathesis"}).encode(),
    headers={"Authorization": f"Bearer {admin}", "Content-Type": "application/json"})
print(json.load(urllib.request.urlopen(request))["api_key"])
EOF
)

for key in "$admin" "$human"; do
  schemathesis run "$url/openapi.json" \
    -H "Authorization: Bearer $key" \
    --checks not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance \
    --max-examples 40 --no-color
done

if grep -q "panicked" "$dir/log"; then
  echo "the server panicked during the schemathesis run:" >&2
  cat "$dir/log" >&2
  exit 1
fi
