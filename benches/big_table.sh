#!/usr/bin/env bash
# Bulk copy of one big table (issue 16, item 3): a tenant whose data is a single table of SIZE_MB, copied by
# `pg_dump --data-only | psql` into the same schema, by pgtenant's copy as one stream (`copy_split_mb = 0`), and
# by pgtenant's copy split into block ranges (`copy_split_mb` 64, `copy_parallel_tables` PARALLEL). Both
# clusters run on this machine. Copy time is from `bulk_copy` to `dual_write`.
#
#   bash benches/big_table.sh                       # SIZE_MB=1024 PARALLEL=2
#   SIZE_MB=256 PARALLEL=4 bash benches/big_table.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pg-lib.sh

SIZE_MB="${SIZE_MB:-1024}"
PARALLEL="${PARALLEL:-2}"
cargo build --release --quiet
pg_setup_workdir
pg_start_pair
# About 150 bytes a row on disk.
ROWS=$((SIZE_MB * 1024 * 1024 / 150))
psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$shared_PORT" -U postgres -d app >/dev/null <<SQL
CREATE SCHEMA tenant_acme;
CREATE TABLE tenant_acme.big (id bigint PRIMARY KEY, v int NOT NULL, pad text NOT NULL);
INSERT INTO tenant_acme.big SELECT g, g % 1000, repeat(md5(g::text), 3) FROM generate_series(1, $ROWS) g;
VACUUM ANALYZE tenant_acme.big;
SQL
size="$(pg_sql "$shared_PORT" app "SELECT pg_size_pretty(pg_total_relation_size('tenant_acme.big'))")"
heap="$(pg_sql "$shared_PORT" app "SELECT pg_size_pretty(pg_relation_size('tenant_acme.big'))")"

echo "== pg_dump --data-only | psql into the same schema"
pg_sql "$dedicated_PORT" postgres "CREATE DATABASE dumpcopy" >/dev/null
"$PG_BIN/pg_dump" -h 127.0.0.1 -p "$shared_PORT" -U postgres --schema-only -n tenant_acme app \
  | grep -v '^\\\(un\)\?restrict' | psql -X -q -h 127.0.0.1 -p "$dedicated_PORT" -U postgres dumpcopy >/dev/null
d0=$(date +%s.%N)
"$PG_BIN/pg_dump" -h 127.0.0.1 -p "$shared_PORT" -U postgres --data-only -n tenant_acme app \
  | grep -v '^\\\(un\)\?restrict' | psql -X -q -h 127.0.0.1 -p "$dedicated_PORT" -U postgres dumpcopy >/dev/null
d1=$(date +%s.%N)
pg_sql "$dedicated_PORT" postgres "DROP DATABASE dumpcopy" >/dev/null
echo "== pg_dump | psql (schema, data, then indexes) into an empty database"
pg_sql "$dedicated_PORT" postgres "CREATE DATABASE dumpcopy" >/dev/null
f0=$(date +%s.%N)
"$PG_BIN/pg_dump" -h 127.0.0.1 -p "$shared_PORT" -U postgres -n tenant_acme app \
  | grep -v '^\\\(un\)\?restrict' | psql -X -q -h 127.0.0.1 -p "$dedicated_PORT" -U postgres dumpcopy >/dev/null
f1=$(date +%s.%N)
pg_sql "$dedicated_PORT" postgres "DROP DATABASE dumpcopy" >/dev/null

PROXY_PORT="$(free_port)"
CONFIG="$PG_WORKDIR/pgtenant.toml"
SOCK="$PG_WORKDIR/pgtenant.sock"
ctl() { ./target/release/pgtenant ctl --socket "$SOCK" "$@"; }
state() { ctl migrate status acme --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])'; }
wait_state() { until [ "$(state)" = "$1" ]; do sleep 0.05; done; }

# copy_run SPLIT_MB: one move of acme; prints its copy seconds.
copy_run() {
  migration_config "$CONFIG" "$PROXY_PORT" "$shared_PORT" "$dedicated_PORT" 10 "" acme
  printf 'copy_parallel_tables = %s\ncopy_split_mb = %s\n' "$PARALLEL" "$1" >> "$CONFIG"
  RUST_LOG=pgtenant=warn pgtenant_serve "$CONFIG" "$PG_WORKDIR/proxy-$1.log"
  wait_port "$PROXY_PORT"
  ctl migrate start acme --to dedicated --verify count >/dev/null
  wait_state bulk_copy
  local c0 c1
  c0=$(date +%s.%N)
  wait_state dual_write
  c1=$(date +%s.%N)
  ctl migrate abort acme --drop-target >/dev/null
  kill "$PGTENANT_PID"; wait "$PGTENANT_PID" 2>/dev/null || true
  python3 -c "print(f'{$c1 - $c0:.2f}')"
}
echo "== pgtenant, one stream"
one="$(copy_run 0)"
echo "== pgtenant, $PARALLEL block ranges"
split="$(copy_run 64)"

python3 - "$ROWS" "$size" "$heap" "$d0" "$d1" "$one" "$split" "$PARALLEL" "$f0" "$f1" <<'PY'
import sys
rows, size, heap, d0, d1, one, split, parallel, f0, f1 = sys.argv[1:]
rows, dump, one, split = int(rows), float(d1) - float(d0), float(one), float(split)
full = float(f1) - float(f0)
print(f"\nOne table, {rows:,} rows, {heap} heap ({size} with its primary key), both clusters on this machine.\n")
print(f"pgtenant's copy is `bulk_copy` to `dual_write`, its primary key made after the rows. Against the second "
      f"row: one stream {full / one:.2f}, ranges {full / split:.2f}.\n")
print("| copy | seconds | rows/s | speed / first row |\n|---|---:|---:|---:|")
print(f"| pg_dump --data-only \\| psql into the schema (primary key in place) | {dump:.2f} | {rows / dump:,.0f} | 1.00 |")
print(f"| pg_dump \\| psql into an empty database (primary key after the rows) | {full:.2f} | {rows / full:,.0f} | {dump / full:.2f} |")
print(f"| pgtenant, one stream | {one:.2f} | {rows / one:,.0f} | {dump / one:.2f} |")
print(f"| pgtenant, {parallel} block ranges | {split:.2f} | {rows / split:,.0f} | {dump / split:.2f} |")
PY
