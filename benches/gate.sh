#!/usr/bin/env bash
# Gate figures under load: pgbench -c 16 runs against tenant acme through pgtenant while gate_latency.py pauses
# and resumes acme ROUNDS times. Prints pause->drained and resume->queued-query-done percentiles and pgbench's
# own result (failed transactions must stay 0).
#   bash benches/gate.sh            ROUNDS=20 CLIENTS=16
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pg-lib.sh
ROUNDS="${ROUNDS:-20}"
CLIENTS="${CLIENTS:-16}"
python3 -c 'import psycopg' 2>/dev/null || python3 -m pip install --quiet 'psycopg[binary]'
cargo build --release --quiet
pg_setup_workdir
pg_start main
pg_sql "$main_PORT" postgres "CREATE DATABASE app" >/dev/null
pg_sql "$main_PORT" app "CREATE SCHEMA tenant_acme" >/dev/null
PORT="$(free_port)"
pgtenant_config "$PG_WORKDIR/pgtenant.toml" "$PORT" "$main_PORT" 40 tenant_acme
RUST_LOG=pgtenant=warn pgtenant_serve "$PG_WORKDIR/pgtenant.toml"
wait_port "$PORT"
export PGPASSWORD=secret
URL="host=127.0.0.1 port=$PORT user=app.acme dbname=app password=secret"
pgbench -i -s 10 -q "$URL" >/dev/null 2>&1
SECONDS_LOAD=$((ROUNDS / 2 + 15))
pgbench -n -c "$CLIENTS" -j 2 -T "$SECONDS_LOAD" -M prepared "$URL" > "$PG_WORKDIR/pgbench.out" 2>&1 &
LOAD=$!
sleep 3
python3 benches/gate_latency.py "$PG_WORKDIR/pgtenant.sock" "$URL" "$ROUNDS"
wait "$LOAD"
grep -E "tps|failed|processed" "$PG_WORKDIR/pgbench.out"
