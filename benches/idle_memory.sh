#!/usr/bin/env bash
# Proxy memory per idle client connection: N connections without a tenant (client side only), M connections
# of a tenant in session mode (each also holds a pooled backend connection), and N connections of a tenant in
# transaction mode (between transactions they hold no backend connection).
#   bash benches/idle_memory.sh        N=1000 M=200
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pg-lib.sh
N="${N:-1000}"
M="${M:-200}"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
python3 -c 'import psycopg' 2>/dev/null || python3 -m pip install --quiet 'psycopg[binary]'
cargo build --release --quiet
pg_setup_workdir
pg_start main
pg_sql "$main_PORT" postgres "ALTER SYSTEM SET max_connections = $((M + 50))" >/dev/null
as_pg "$PG_BIN/pg_ctl" -D "$PG_WORKDIR/main" -w restart >/dev/null
pg_sql "$main_PORT" postgres "CREATE DATABASE app" >/dev/null
PORT="$(free_port)"
pgtenant_config "$PG_WORKDIR/pgtenant.toml" "$PORT" "$main_PORT" "$M" "" \
  "max_client_conn = $((N + M + 100))
workers = 1"
pgtenant_config "$PG_WORKDIR/pgtenant-tx.toml" "$PORT" "$main_PORT" 20 "" \
  "max_client_conn = $((N + M + 100))
workers = 1
pool_mode = \"transaction\""
measure() { # user count [config]: a fresh proxy for each measurement, so freed memory is not reused
  RUST_LOG=pgtenant=warn pgtenant_serve "${3:-$PG_WORKDIR/pgtenant.toml}"
  local pid=$PGTENANT_PID
  wait_port "$PORT"
  python3 benches/idle_memory.py "$pid" "host=127.0.0.1 port=$PORT user=$1 dbname=app password=secret" "$2" ${4:-}
  kill "$pid"; wait "$pid" 2>/dev/null || true
  sleep 0.5
}
echo "without a tenant (client side only):"
measure app "$N"
echo "with a tenant in session mode (client side plus the pooled backend connection it holds):"
measure app.acme "$M"
echo "with a tenant in transaction mode (no backend connection held between transactions):"
measure app.acme "$N" "$PG_WORKDIR/pgtenant-tx.toml" all
