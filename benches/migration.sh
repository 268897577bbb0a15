#!/usr/bin/env bash
# Migration figures, measured in one run on this machine (issue 6 item 3):
#   - TPS of pgbench -c CLIENTS on a tenant before its migration and during dual_write (the synchronous tee);
#   - bulk-copy rows/s against `pg_dump --data-only | psql` of the same schema;
#   - gate-closed pause p50/p99/max over ROUNDS cutovers and ROUNDS rollbacks under pgbench -c CLIENTS.
#   bash benches/migration.sh        (DURATION=20 CLIENTS=16 SCALE=10 ROUNDS=20; writes benches/results/migration.md)
#   Also: LOOP_SCALE (5), TEE (sync|async), LOOP_MODE (pgbench -M of the pause rounds, prepared), COPY_BATCH
#   (migration.copy_batch_rows), WORKERS (proxy.workers, 0: the default), PERF_PROXY=1 (perf record -g of the proxy during the rounds, /tmp/perf.proxy.data),
#   STATEMENTS=1 (pg_stat_statements of both servers over the dual_write run, printed at the end),
#   PAIRS=N (N alternating PAIR_SECS-second runs, default 3 s, on acme in dual_write and on its twin, a tenant of the
#   same scale on the same server with no move: what the tee adds, measured side by side rather than before and
#   after, so the machine's drift between the two does not count).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pg-lib.sh

DURATION="${DURATION:-20}"
CLIENTS="${CLIENTS:-16}"
SCALE="${SCALE:-10}"
ROUNDS="${ROUNDS:-20}"
TEE="${TEE:-sync}"
LOOP_SCALE="${LOOP_SCALE:-5}"
OUT="benches/results/migration.md"

cargo build --release --quiet
if [ -n "${STATEMENTS:-}" ]; then
  export PG_EXTRA_CONF="shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.track = all"
fi
pg_setup_workdir
pg_start_pair
pg_sql "$shared_PORT" app "CREATE SCHEMA tenant_acme; CREATE SCHEMA tenant_loop; CREATE SCHEMA tenant_twin" >/dev/null
PROXY_PORT="$(free_port)"
METRICS_PORT="$(free_port)"
CONFIG="$PG_WORKDIR/pgtenant.toml"
SOCK="$PG_WORKDIR/pgtenant.sock"
migration_config "$CONFIG" "$PROXY_PORT" "$shared_PORT" "$dedicated_PORT" 40 \
  "metrics_listen = \"127.0.0.1:$METRICS_PORT\"
workers = ${WORKERS:-0}" acme loop twin
printf 'tee = "%s"\n' "$TEE" >> "$CONFIG"
[ -n "${COPY_BATCH:-}" ] && printf 'copy_batch_rows = %s\n' "$COPY_BATCH" >> "$CONFIG"
pgtenant_serve "$CONFIG" "$PG_WORKDIR/proxy.log"
wait_port "$PROXY_PORT"
export PGPASSWORD=secret
url() { echo "host=127.0.0.1 port=$PROXY_PORT user=app.$1 dbname=app"; }
ctl() { ./target/release/pgtenant ctl --socket "$SOCK" "$@"; }
state() { ctl migrate status "$1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])'; }
wait_state() {
  until [ "$(state "$1")" = "$2" ]; do sleep 0.05; done
}
tps() { grep -oP 'tps = \K[0-9.]+' "$1" | head -1; }
# The machine's busy CPU time in jiffies (user, nice, system, irq, softirq: everything on it, proxy, both
# servers and pgbench; steal and idle left out), to put a figure on CPU per transaction that the neighbours'
# noise moves less than TPS.
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }
failed() { grep -oP 'number of failed transactions: \K[0-9]+' "$1"; }

pgbench -i -s "$SCALE" -q "$(url acme)" >/dev/null 2>&1
pgbench -i -s "$LOOP_SCALE" -q "$(url loop)" >/dev/null 2>&1
[ "${PAIRS:-0}" = 0 ] || pgbench -i -s "$SCALE" -q "$(url twin)" >/dev/null 2>&1

echo "== TPS before and during dual_write (pgbench -c $CLIENTS -T $DURATION, TPC-B, prepared)"
b0=$(busy)
pgbench -n -r -c "$CLIENTS" -j 2 -T "$DURATION" -M prepared "$(url acme)" > "$PG_WORKDIR/before.out" 2>&1
b1=$(busy)
t0=$(date +%s.%N)
ctl migrate start acme --to dedicated --verify count >/dev/null
wait_state acme bulk_copy
c0=$(date +%s.%N)
wait_state acme dual_write
c1=$(date +%s.%N)
rows=$(ctl migrate status acme --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["rows_copied"])')
# The "during" figure is the steady state: the backlog written during the copy is caught up first.
lag() { ctl migrate status acme --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["lag_events"])'; }
sleep 2
until [ "$(lag)" -lt 100 ]; do sleep 0.5; done
statements() {
  for p in "$shared_PORT" "$dedicated_PORT"; do pg_sql "$p" app "$1"; done
}
[ -z "${STATEMENTS:-}" ] || statements "CREATE EXTENSION IF NOT EXISTS pg_stat_statements; SELECT pg_stat_statements_reset()" >/dev/null
b2=$(busy)
pgbench -n -r -c "$CLIENTS" -j 2 -T "$DURATION" -M prepared "$(url acme)" > "$PG_WORKDIR/during.out" 2>&1
b3=$(busy)
if [ -n "${STATEMENTS:-}" ]; then
  for p in "$shared_PORT" "$dedicated_PORT"; do
    echo "== server on port $p (shared: $shared_PORT): µs per call, calls, total ms"
    pg_sql "$p" app "SELECT round((mean_exec_time * 1000)::numeric, 1), calls, round(total_exec_time::numeric), left(regexp_replace(query, '\s+', ' ', 'g'), 150)
                       FROM pg_stat_statements WHERE calls > 10 ORDER BY total_exec_time DESC LIMIT 25"
  done > "$PG_WORKDIR/statements.txt"
fi
curl -s "http://127.0.0.1:$METRICS_PORT/metrics" | grep -E '^dual_write_(latency|operations)' > "$PG_WORKDIR/tee.metrics" || true
: > "$PG_WORKDIR/pairs.tsv"
for i in $(seq 1 "${PAIRS:-0}"); do
  for t in twin acme; do
    pgbench -n -c "$CLIENTS" -j 2 -T "${PAIR_SECS:-3}" -M prepared "$(url "$t")" > "$PG_WORKDIR/pair.out" 2>&1
    printf '%s\t%s\t%s\n' "$t" "$(tps "$PG_WORKDIR/pair.out")" \
      "$(grep -oP 'latency average = \K[0-9.]+' "$PG_WORKDIR/pair.out")" >> "$PG_WORKDIR/pairs.tsv"
  done
done
ctl migrate abort acme --drop-target >/dev/null

echo "== pg_dump --data-only | psql of the same schema"
pg_sql "$dedicated_PORT" postgres "CREATE DATABASE dumpcopy" >/dev/null
"$PG_BIN/pg_dump" -h 127.0.0.1 -p "$shared_PORT" -U postgres --schema-only -n tenant_acme app | grep -v '^\\\(un\)\?restrict' | psql -X -q -h 127.0.0.1 -p "$dedicated_PORT" -U postgres dumpcopy >/dev/null
d0=$(date +%s.%N)
"$PG_BIN/pg_dump" -h 127.0.0.1 -p "$shared_PORT" -U postgres --data-only -n tenant_acme app | grep -v '^\\\(un\)\?restrict' | psql -X -q -h 127.0.0.1 -p "$dedicated_PORT" -U postgres dumpcopy >/dev/null
d1=$(date +%s.%N)

echo "== $ROUNDS cutovers and rollbacks of tenant loop under pgbench -c $CLIENTS"
if [ -n "${PERF_PROXY:-}" ]; then perf record -g -o /tmp/perf.proxy.data -p "$PGTENANT_PID" & PERF_PID=$!; fi
# pgbench in 5-second runs until the rounds are done (each run prints its own summary).
( while [ ! -f "$PG_WORKDIR/stop" ]; do
    pgbench -n -c "$CLIENTS" -j 2 -T 5 -M "${LOOP_MODE:-prepared}" "$(url loop)" >> "$PG_WORKDIR/loop.out" 2>&1 || true
  done ) &
BENCH=$!
PG_CLEANUP_EXTRA+=("$BENCH")
: > "$PG_WORKDIR/pauses.tsv"
for i in $(seq 1 "$ROUNDS"); do
  ctl migrate start loop --to dedicated --verify count --allow-existing >/dev/null
  wait_state loop dual_write
  sleep 0.5
  if ! ctl migrate cutover loop --json > "$PG_WORKDIR/cut.json"; then
    echo "   round $i: cutover refused or failed (recorded, migration aborted)"; echo "failed" >> "$PG_WORKDIR/failed_rounds"
    ctl migrate abort loop >/dev/null || true
    continue
  fi
  cut=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pause_ms"])' "$PG_WORKDIR/cut.json")
  python3 -c 'import json,sys; print("   steps (ms):", json.load(open(sys.argv[1]))["steps_ms"])' "$PG_WORKDIR/cut.json"
  sleep 0.5
  until ctl migrate rollback loop --json > "$PG_WORKDIR/back.json"; do
    echo "   round $i: rollback attempt failed; retrying"; echo "failed" >> "$PG_WORKDIR/failed_rounds"; sleep 1
  done
  back=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pause_ms"])' "$PG_WORKDIR/back.json")
  printf '%s\t%s\n' "$cut" "$back" >> "$PG_WORKDIR/pauses.tsv"
  printf '   round %2d: cutover %6.1f ms, rollback %6.1f ms\n' "$i" "$cut" "$back"
done
touch "$PG_WORKDIR/stop"; wait "$BENCH" || true
if [ -n "${PERF_PID:-}" ]; then kill -INT "$PERF_PID"; sleep 2; fi

python3 - "$PG_WORKDIR" "$t0" "$c0" "$c1" "$rows" "$d0" "$d1" "$CLIENTS" "$DURATION" "$SCALE" "$ROUNDS" "$TEE" "$LOOP_SCALE" "$((b1 - b0))" "$((b3 - b2))" "$(getconf CLK_TCK)" > "$OUT" <<'PY'
import sys, re, statistics
w, t0, c0, c1, rows, d0, d1, clients, duration, scale, rounds, tee, loop_scale, busy_before, busy_during, hz = sys.argv[1:]
def grab(name, pat):
    m = re.search(pat, open(f"{w}/{name}.out").read())
    return float(m.group(1)) if m else float("nan")
before = grab("before", r"tps = ([0-9.]+)")
during = grab("during", r"tps = ([0-9.]+)")
fb, fd = grab("before", r"failed transactions: (\d+)"), grab("during", r"failed transactions: (\d+)")
loop_failed = sum(int(x) for x in re.findall(r"failed transactions: (\d+)", open(f"{w}/loop.out").read()))
loop_runs = len(re.findall(r"failed transactions: (\d+)", open(f"{w}/loop.out").read()))
copy_s = float(c1) - float(c0)
dump_s = float(d1) - float(d0)
rows = int(rows)
cuts, backs = [], []
for line in open(f"{w}/pauses.tsv") if rounds != "0" else []:
    a, b = line.split()
    cuts.append(float(a)); backs.append(float(b))
def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]
print(f"# Migration figures\n\npgbench -c {clients} -j 2, TPC-B, -M prepared, scale {scale} (tenant acme); "
      f"pause rounds on a scale-{loop_scale} tenant under pgbench -c {clients}. One run.\n")
print("| figure | value |\n|---|---|")
print(f"| TPS before migration | {before:.0f} (failed {fb:.0f}) |")
print(f"| TPS during dual_write ({tee} tee) | {during:.0f} (failed {fd:.0f}) |")
print(f"| ratio during / before | {during / before:.2f} |")
def per_txn(jiffies, tps):
    return int(jiffies) / int(hz) / (tps * float(duration)) * 1e6
print(f"| machine CPU per transaction, before -> during | {per_txn(busy_before, before):.0f} -> {per_txn(busy_during, during):.0f} us |")
print(f"| bulk copy | {rows} rows in {copy_s:.2f} s = {rows / copy_s:,.0f} rows/s |")
print(f"| pg_dump --data-only \\| psql, same schema | {dump_s:.2f} s = {rows / dump_s:,.0f} rows/s |")
print(f"| bulk copy speed / pg_dump \\| psql | {dump_s / copy_s:.2f} |")
for name, xs in (("cutover", cuts), ("rollback", backs)):
    if not xs:
        continue
    print(f"| {name} pause over {len(xs)} runs: p50 / p99 / max | {pct(xs, 50):.1f} / {pct(xs, 99):.1f} / {max(xs):.1f} ms |")
import os
failed_attempts = sum(1 for _ in open(f"{w}/failed_rounds")) if os.path.exists(f"{w}/failed_rounds") else 0
print(f"| failed pgbench transactions during the {rounds} rounds ({loop_runs} pgbench runs) | {loop_failed} |")
print(f"| cutover/rollback attempts that fell back (timeout) | {failed_attempts} |")
pairs = [l.split() for l in open(f"{w}/pairs.tsv")]
if pairs:
    twin = [(float(p[1]), float(p[2])) for p in pairs if p[0] == "twin"]
    acme = [(float(p[1]), float(p[2])) for p in pairs if p[0] == "acme"]
    ratios = [a[0] / b[0] for a, b in zip(acme, twin)]
    added = [a[1] - b[1] for a, b in zip(acme, twin)]
    print(f"| side by side, {len(ratios)} pairs: TPS in dual_write / twin's | "
          f"{', '.join(f'{r:.2f}' for r in ratios)} (median {statistics.median(ratios):.2f}) |")
    print(f"| side by side: latency added per transaction | "
          f"{', '.join(f'{a:.2f}' for a in added)} ms (median {statistics.median(added):.2f}) |")
PY
cat "$OUT"
cat "$PG_WORKDIR/tee.metrics"
[ -z "${STATEMENTS:-}" ] || cat "$PG_WORKDIR/statements.txt"
[ -n "${SHOW_STATEMENTS:-}" ] && grep -A12 'latency (ms)' "$PG_WORKDIR/before.out" "$PG_WORKDIR/during.out"
true
[ -n "${KEEP_LOG:-}" ] && cp "$PG_WORKDIR/proxy.log" "$KEEP_LOG"
true
