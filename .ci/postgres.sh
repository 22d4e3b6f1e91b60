#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers on 127.0.0.1:5432 for user `postgres` without a
# password, as the PostgreSQL tests expect (LEASH_TEST_POSTGRES overrides the URL), and that the
# server binaries are installed (one test starts and stops a private server). On a fresh Debian
# machine: installs the `postgresql` package, lets 127.0.0.1 in with trust auth and starts the
# cluster. A server that already answers is left alone.
set -euo pipefail

answers() { (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }

export DEBIAN_FRONTEND=noninteractive
# The server binaries are needed either way: the restart test runs a private server of its own.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq postgresql >/dev/null
fi
if answers; then
  exit 0
fi
version=$(ls /usr/lib/postgresql | sort -V | tail -1)
if [[ ! -d /etc/postgresql/$version/main ]]; then
  pg_createcluster "$version" main >/dev/null
fi
hba=/etc/postgresql/$version/main/pg_hba.conf
sed -i -E 's#^(host[[:space:]]+all[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+)[a-z0-9-]+#\1trust#' "$hba"
pg_ctlcluster "$version" main start 2>/dev/null || pg_ctlcluster "$version" main reload
for _ in $(seq 1 50); do
  if answers; then
    exit 0
  fi
  sleep 0.2
done
echo "PostgreSQL did not start on 127.0.0.1:5432" >&2
exit 1
