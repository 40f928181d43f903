#!/usr/bin/env bash
# Start a PostgreSQL server on 127.0.0.1 for tests/test_scale.py and print its URL.
# Installs Debian's postgresql when missing. Exits non-zero (and prints nothing on stdout)
# when no server could be started: the tests that need it are then skipped with a reason.
set -euo pipefail
PG_USER="${PG_USER:-bloodbench}"
PG_PASSWORD="${PG_PASSWORD:-bloodbench}"
PG_DB="${PG_DB:-bloodbench_test}"
PG_PORT="${PG_PORT:-5432}"

if ! command -v pg_ctlcluster >/dev/null || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
fi
ver="$(ls -d /usr/lib/postgresql/*/bin/postgres | awk -F/ '{print $5}' | sort -V | tail -1)"
if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$ver main"; then
    pg_createcluster --port "$PG_PORT" "$ver" main >&2
fi
port="$(pg_lsclusters -h | awk -v v="$ver" '$1==v && $2=="main" {print $3}')"
pg_ctlcluster "$ver" main start >/dev/null 2>&1 || true   # already running is fine
for _ in $(seq 30); do
    pg_isready -q -h 127.0.0.1 -p "$port" && break
    sleep 1
done
pg_isready -q -h 127.0.0.1 -p "$port"

as_pg() { (cd / && su postgres -c "$1"); }
if [ "$(as_pg "psql -p $port -tAc \"SELECT 1 FROM pg_roles WHERE rolname='$PG_USER'\"")" != "1" ]; then
    as_pg "psql -p $port -qc \"CREATE ROLE $PG_USER LOGIN PASSWORD '$PG_PASSWORD'\"" >&2
fi
if [ "$(as_pg "psql -p $port -tAc \"SELECT 1 FROM pg_database WHERE datname='$PG_DB'\"")" != "1" ]; then
    as_pg "createdb -p $port -O $PG_USER $PG_DB" >&2
fi
echo "postgresql://$PG_USER:$PG_PASSWORD@127.0.0.1:$port/$PG_DB"
