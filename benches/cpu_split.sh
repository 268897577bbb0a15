#!/usr/bin/env bash
# The proxy's user and system CPU per transaction, pgtenant against PgBouncer: where a gap in proxy CPU is.
# One throwaway cluster (scale 10) per call; pgbench -c 16 -j 2 for 5 s after a 2 s warm-up; the proxy's utime and
# stime from /proc over the run, divided by the transactions. Both proxies make the same system calls per
# transaction (two recvfrom, two sendto, about 0.2 epoll_wait at -c 16), so system time says little about the
# proxy's own code and user time says most.
#
#   bash benches/cpu_split.sh pgtenant-transaction simple select     # TARGET QUERY_MODE SCRIPT(select|tpcb)
#   bash benches/cpu_split.sh pgbouncer-transaction extended tpcb
#   PGTENANT_BIN=/path/to/other/build bash benches/cpu_split.sh pgtenant-session prepared select
#   PERF_OUT=/tmp/p.data bash benches/cpu_split.sh pgtenant-transaction simple select   # + a user-only perf profile
#   bash benches/cpu_split.sh floor-tokio simple select   # a bare relay, no protocol logic (examples/relay_floor.rs)
#   bash benches/cpu_split.sh floor-epoll simple select   #   as tasks on tokio, or on a bare epoll loop
#   STRACE=1 bash benches/cpu_split.sh pgbouncer-transaction simple select  # + the proxy's system calls per
#                                                          # transaction (strace -c over 4 000 more transactions)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pg-lib.sh

TARGET="${1:?target: pgtenant-session|pgtenant-transaction|pgbouncer-session|pgbouncer-transaction|floor-tokio|floor-epoll}"
QMODE="${2:-simple}"
SCRIPT="${3:-select}"
MODE="${TARGET#*-}"
if [[ $TARGET == floor-* ]]; then
  cargo build --release --quiet --example relay_floor
elif [ -z "${PGTENANT_BIN:-}" ]; then
  cargo build --release --quiet
fi

pg_setup_workdir
pg_start bench
W="$PG_WORKDIR"
pg_sql "$bench_PORT" postgres "CREATE DATABASE app" >/dev/null
export PGPASSWORD=secret
if [[ $TARGET == floor-* ]]; then
  # Straight through to PostgreSQL, which authenticates the client itself.
  port="$(free_port)"
  setsid ./target/release/examples/relay_floor "$MODE" "127.0.0.1:$port" "127.0.0.1:$bench_PORT" \
    >"$W/floor.log" 2>&1 &
  PID=$!
  PG_CLEANUP_EXTRA+=("$PID")
  user=postgres
elif [[ $TARGET == pgtenant-* ]]; then
  port="$(free_port)"
  pgtenant_config "$W/p.toml" "$port" "$bench_PORT" 20 "" "pool_mode = \"$MODE\"
max_client_conn = 2000"
  RUST_LOG=pgtenant=warn pgtenant_serve "$W/p.toml" "$W/p.log"
  PID="$PGTENANT_PID"
  user=app.acme
else
  pgbouncer_serve "$MODE" "$W" "$bench_PORT"
  port="$PGBOUNCER_PORT"
  PID="$PGBOUNCER_PID"
  user=app
fi
wait_port "$port"
pgbench -i -s 10 -q "host=127.0.0.1 port=$bench_PORT user=postgres dbname=app" >/dev/null 2>&1
args=(-n -c 16 -j 2 -M "$QMODE")
[ "$SCRIPT" = select ] && args+=(-S)
url="host=127.0.0.1 port=$port user=$user dbname=app"
pgbench "${args[@]}" -T 2 "$url" >/dev/null 2>&1
read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$PID/stat")
# The machine's idle and busy ticks, its context switches, and the proxy's own (voluntary: it slept), summed
# over its threads.
machine() {
  awk '/^cpu /{print $5 + $6, $2 + $3 + $4 + $7 + $8 + $9} /^ctxt/{print $2}' /proc/stat | paste -sd' '
}
proxy_switches() {
  cat /proc/"$PID"/task/*/status | awk '/^voluntary_ctxt/{v += $2} /^nonvoluntary_ctxt/{n += $2} END {print v, n}'
}
read -r i0 b0 c0 < <(machine)
read -r v0 n0 < <(proxy_switches)
if [ -n "${PERF_OUT:-}" ]; then
  # User-space samples only: the system calls are the same in both proxies (see above).
  perf record -q ${PERF_ARGS:-} -e cpu-clock:u -p "$PID" -o "$PERF_OUT" -- sleep 4 >/dev/null 2>&1 &
  PERF_PID=$!
fi
out="$(pgbench "${args[@]}" -T 5 "$url" 2>&1)"
read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$PID/stat")
read -r i1 b1 c1 < <(machine)
read -r v1 n1 < <(proxy_switches)
[ -z "${PERF_OUT:-}" ] || wait "$PERF_PID" || true
tx="$(grep -oP 'actually processed: \K[0-9]+' <<<"$out")"
tick="$(getconf CLK_TCK)"
python3 - "$TARGET" "$QMODE" "$SCRIPT" "$(grep -oP 'tps = \K[0-9.]+' <<<"$out")" "$tx" "$tick" "$u0" "$u1" "$s0" "$s1" \
  "$i0" "$i1" "$b0" "$b1" "$c0" "$c1" "$v0" "$v1" "$n0" "$n1" <<'PY'
import sys
t, q, s, tps, tx, tick, u0, u1, s0, s1, i0, i1, b0, b1, c0, c1, v0, v1, n0, n1 = sys.argv[1:]
tx, tick = int(tx), int(tick)
us = lambda a, b: (int(b) - int(a)) / tick / tx * 1e6
per = lambda a, b: (int(b) - int(a)) / tx
idle = (int(i1) - int(i0)) / max(1, int(i1) - int(i0) + int(b1) - int(b0)) * 100
print(f"{t} -M {q} {s}: tps={float(tps):.0f} user_us_per_txn={us(u0, u1):.2f} sys_us_per_txn={us(s0, s1):.2f}"
      f" machine_us_per_txn={us(b0, b1):.1f} idle={idle:.1f}% ctxt_per_txn={per(c0, c1):.2f}"
      f" proxy_sleeps_per_txn={per(v0, v1):.3f} proxy_preempted_per_txn={per(n0, n1):.3f}")
PY
if [ -n "${STRACE:-}" ]; then
  # Counted on a run of its own: strace slows every call, which would distort the CPU figures above.
  strace -c -f -p "$PID" -o "$W/strace.txt" &
  STRACE_PID=$!
  PG_CLEANUP_EXTRA+=("$STRACE_PID")
  sleep 1
  out="$(pgbench "${args[@]}" -t 250 "$url" 2>&1)"
  tx="$(grep -oP 'actually processed: \K[0-9]+' <<<"$out")"
  kill -INT "$STRACE_PID"
  wait "$STRACE_PID" 2>/dev/null || true
  awk -v tx="$tx" '$NF ~ /^[a-z_0-9]+$/ && $4 ~ /^[0-9]+$/ && $NF != "total" {
      printf "  %-16s %.3f calls per transaction\n", $NF, $4 / tx }' "$W/strace.txt"
fi
