#!/usr/bin/env bash
# The test command: unit tests, and integration tests on throwaway PostgreSQL clusters.
# Needs PostgreSQL server binaries (initdb, pg_ctl, postgres), psql and pgbench; psycopg for the Python client test.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import psycopg' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check 'psycopg[binary]' >/dev/null 2>&1 \
    || echo "warning: could not install psycopg; its test will be skipped" >&2
fi
python3 -c 'import psycopg' 2>/dev/null && export PGTENANT_REQUIRE_PSYCOPG=1
exec cargo test --locked "$@"
