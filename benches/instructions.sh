#!/usr/bin/env bash
# The proxy's instructions per transaction, counted by valgrind (callgrind): a figure this shared machine does
# not blur, for A/B of changes too small for cpu_split.sh's CPU times (which move by 10-30% between runs). The
# proxy runs under callgrind twice, for TX_SMALL and TX_BIG transactions of `pgbench -S -c 4 -j 1`; the
# difference of its instruction counts over the difference of transactions is the cost of a transaction, start-up
# and shutdown taken out. Under valgrind the proxy runs about three times slower, so clients' queries wait for it
# and each wake-up finds more to do than at full speed: the per-wake-up share (tokio's) comes out
# lower than in production, the per-transaction share (the session's own work) as it is.
#
#   bash benches/instructions.sh                          # transaction pooling, -M simple
#   MODE=session QMODE=extended bash benches/instructions.sh
#   PGTENANT_BIN=/path/to/other/build bash benches/instructions.sh
#   TOP=25 bash benches/instructions.sh                   # also the top functions per transaction (inclusive)
#   TARGET=pgbouncer bash benches/instructions.sh         # PgBouncer (in MODE), counted the same way
#   TARGET=floor-tokio bash benches/instructions.sh       # a bare relay (examples/relay_floor.rs; also floor-epoll)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pg-lib.sh

MODE="${MODE:-transaction}"
QMODE="${QMODE:-simple}"
TX_SMALL="${TX_SMALL:-2000}"
TX_BIG="${TX_BIG:-10000}"
TOP="${TOP:-0}"
TARGET="${TARGET:-pgtenant}"
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
case "$TARGET" in
  floor-*) cargo build --release --quiet --example relay_floor ;;
  pgtenant) [ -n "${PGTENANT_BIN:-}" ] || cargo build --release --quiet ;;
esac
BIN=""
[ "$TARGET" != pgtenant ] || BIN="$(realpath "${PGTENANT_BIN:-./target/release/pgtenant}")"

pg_setup_workdir
pg_start bench
W="$PG_WORKDIR"
pg_sql "$bench_PORT" postgres "CREATE DATABASE app" >/dev/null
pgbench -i -s 1 -q "host=127.0.0.1 port=$bench_PORT user=postgres dbname=app" >/dev/null 2>&1
export PGPASSWORD=secret

# start_pgtenant TX OUT PORT / start_pgbouncer ...: the proxy under callgrind, listening on PORT; sets PROXY_PID.
start_pgtenant() {
  pgtenant_config "$W/p$1.toml" "$3" "$bench_PORT" 8 "" "pool_mode = \"$MODE\""
  printf '#!/bin/sh\nexec valgrind -q --tool=callgrind --callgrind-out-file=%s %s "$@"\n' "$2" "$BIN" >"$W/vg.sh"
  chmod +x "$W/vg.sh"
  PGTENANT_BIN="$W/vg.sh" pgtenant_serve "$W/p$1.toml" "$W/p$1.log"
  PROXY_PID="$PGTENANT_PID"
}
# PgBouncer as benches/compare.sh configures it (scripts/pg-lib.sh), in the foreground under valgrind.
start_pgbouncer() {
  printf '"app" "secret"\n' >"$W/userlist.txt"
  printf '[databases]\napp = host=127.0.0.1 port=%s dbname=app user=postgres\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = %s\nunix_socket_dir =\nauth_type = scram-sha-256\nauth_file = %s/userlist.txt\npool_mode = %s\ndefault_pool_size = 8\nlogfile = %s/pgbouncer%s.log\npidfile = %s/pgbouncer%s.pid\nignore_startup_parameters = extra_float_digits,options\n' \
    "$bench_PORT" "$3" "$W" "$MODE" "$W" "$1" "$W" "$1" >"$W/pgbouncer$1.ini"
  chown postgres "$W/pgbouncer$1.ini" "$W/userlist.txt" 2>/dev/null || true
  as_pg valgrind -q --tool=callgrind --callgrind-out-file="$2" pgbouncer "$W/pgbouncer$1.ini" &
  PROXY_PID=$!
  PG_CLEANUP_EXTRA+=("$PROXY_PID")
}
# A bare relay straight to PostgreSQL, which authenticates the client itself.
start_floor() {
  valgrind -q --tool=callgrind --callgrind-out-file="$2" ./target/release/examples/relay_floor "${TARGET#floor-}" \
    "127.0.0.1:$3" "127.0.0.1:$bench_PORT" >"$W/floor$1.log" 2>&1 &
  PROXY_PID=$!
  PG_CLEANUP_EXTRA+=("$PROXY_PID")
}

# run TX OUT: the proxy under callgrind for TX transactions, its profile written to OUT at exit.
run() {
  local tx="$1" out="$2" port user=app.acme
  port="$(free_port)"
  case "$TARGET" in
    pgbouncer) start_pgbouncer "$tx" "$out" "$port"; user=app ;;
    floor-*) start_floor "$tx" "$out" "$port"; user=postgres ;;
    *) start_pgtenant "$tx" "$out" "$port" ;;
  esac
  # (Start-up under valgrind takes longer than wait_port's ten seconds.)
  for _ in $(seq 600); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.2; done
  local url="host=127.0.0.1 port=$port user=$user dbname=app"
  pgbench -n -S -M "$QMODE" -c 4 -j 1 -t $((tx / 4)) "$url" >"$W/pgbench$tx.log" 2>&1 || { cat "$W/pgbench$tx.log" >&2; echo "(KEEP_WORKDIR=1 keeps the proxy log)" >&2; exit 1; }
  # PgBouncer itself (not the runuser around it) gets SIGINT, its shutdown that does not wait for clients.
  if [ "$TARGET" = pgbouncer ]; then kill -INT "$(cat "$W/pgbouncer$tx.pid")"; else kill -TERM "$PROXY_PID"; fi
  for _ in $(seq 600); do kill -0 "$PROXY_PID" 2>/dev/null || break; sleep 0.1; done
  [ -s "$out" ] || { echo "no profile from the proxy in $out (KEEP_WORKDIR=1 keeps the logs)" >&2; exit 1; }
}
run "$TX_SMALL" "$W/small.cg"
run "$TX_BIG" "$W/big.cg"
grep -h "tps\|processed" "$W"/pgbench*.log >&2
python3 - "$W/small.cg" "$W/big.cg" "$TX_SMALL" "$TX_BIG" "$MODE" "$QMODE" "$TOP" "$TARGET" <<'PY'
import subprocess, sys, re
small, big, ts, tb, mode, qmode, top, target = sys.argv[1:]
ts, tb, top = int(ts), int(tb), int(top)
def totals(path):
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", path],
                         capture_output=True, text=True).stdout
    total = int(re.search(r"^([\d,]+) \(100.0%\)\s+PROGRAM TOTALS", out, re.M).group(1).replace(",", ""))
    funcs = {}
    # "Ir (share) file:function [object]"; a function inlined from several files has a line per file (each
    # inclusive of its own part only), so the largest stands for it.
    for m in re.finditer(r"^\s*([\d,]+) \([^)]*\)\s+[^:\s]*:(.+?)(?: \[[^\]]*\])?$", out, re.M):
        name, ir = m.group(2), int(m.group(1).replace(",", ""))
        funcs[name] = max(funcs.get(name, 0), ir)
    return total, funcs
(t0, f0), (t1, f1) = totals(small), totals(big)
n = tb - ts
# The whole process's count moves by several percent between runs: start-up work of varying length (the metrics
# clock's calibration loop) and how many events each wake-up finds. The session task's own count (inclusive of
# what it calls) is steady to a fraction of a percent: compare builds by that one.
task = "pgtenant::frontend::login::serve_in_span::{{closure}}"
label = target if target.startswith("floor") else f"{target}-{mode}"
line = f"{label} -M {qmode}: {(t1 - t0) / n:.0f} instructions per transaction"
if task in f1:
    line += f", {(f1[task] - f0.get(task, 0)) / n:.0f} of them in the session's task"
print(line)
if top:
    rows = sorted(((f1.get(k, 0) - f0.get(k, 0)) / n, k) for k in f1)
    for per, name in reversed(rows[-top:]):
        print(f"  {per:8.0f}  {name[:150]}")
PY
