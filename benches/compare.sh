#!/usr/bin/env bash
# Side-by-side pgbench: direct PostgreSQL, PgBouncer (session and transaction pooling) and pgtenant, on one
# throwaway cluster, interleaved and repeated, printed as one table and written to benches/results/.
# Fairness: every proxy runs in a session of its own (pgtenant_serve, see scripts/pg-lib.sh: autogroup
# scheduling), odd repetitions run the targets in order and even ones in reverse, and every TPC-B cell starts
# from vacuumed small tables, an empty history and a checkpoint.
#
#   bash benches/compare.sh                        # quick: about two and a half minutes (2 s cells)
#   DURATION=10 REPEAT=2 bash benches/compare.sh   # full: about thirteen minutes
#   CLIENTS=16 THREADS=2 SCALE=10 TARGETS="direct pgbouncer-session pgtenant-session"
#   BASELINE=/path/to/older/pgtenant TARGETS="pgtenant-session baseline-session"   # A/B against another build
#   TENANTS=0 skips the many-schema-tenants case (benches/tenants.sh) run at the end
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pg-lib.sh

DURATION="${DURATION:-2}"
REPEAT="${REPEAT:-2}"
CLIENTS="${CLIENTS:-16}"
THREADS="${THREADS:-2}"
SCALE="${SCALE:-10}"
TARGETS="${TARGETS:-direct pgbouncer-session pgbouncer-transaction pgtenant-session pgtenant-transaction}"
PGT_WORKERS="${PGT_WORKERS:-0}"   # pgtenant runtime threads (0: the default, chosen from the core count)
MODES="${MODES:-simple extended prepared}"
OUT_DIR="benches/results"

if ! command -v pgbouncer >/dev/null; then
  echo "== installing pgbouncer (Debian package)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer) >/dev/null
  systemctl stop pgbouncer >/dev/null 2>&1 || service pgbouncer stop >/dev/null 2>&1 || true
fi
cargo build --release --quiet
pg_setup_workdir
pg_start bench
pg_sql "$bench_PORT" postgres "CREATE DATABASE app" >/dev/null
W="$PG_WORKDIR"
export PGPASSWORD=secret

# PgBouncer, one instance per pool mode (scripts/pg-lib.sh).
start_pgbouncer() {
  local mode="$1"
  pgbouncer_serve "$mode" "$W" "$bench_PORT"
  printf -v "PID_pgbouncer_${mode}" '%s' "$PGBOUNCER_PID"
  printf -v "PGB_${mode}_PORT" '%s' "$PGBOUNCER_PORT"
}

start_pgtenant() { # mode [name bin]: name pgtenant (this build) or baseline ($BASELINE)
  local mode="$1" name="${2:-pgtenant}" bin="${3:-./target/release/pgtenant}" port
  port="$(free_port)"
  pgtenant_config "$W/$name-$mode.toml" "$port" "$bench_PORT" 20 "" \
    "pool_mode = \"$mode\"
workers = $PGT_WORKERS
max_client_conn = 2000"
  RUST_LOG=pgtenant=warn PGTENANT_BIN="$bin" pgtenant_serve "$W/$name-$mode.toml" "$W/$name-$mode.log"
  printf -v "PID_${name}_${mode}" '%s' "$PGTENANT_PID"
  wait_port "$port"
  printf -v "PORT_${name}_${mode}" '%s' "$port"
}

url_for() {
  case "$1" in
    direct) echo "host=127.0.0.1 port=$bench_PORT user=postgres dbname=app" ;;
    pgbouncer-session) echo "host=127.0.0.1 port=$PGB_session_PORT user=app dbname=app" ;;
    pgbouncer-transaction) echo "host=127.0.0.1 port=$PGB_transaction_PORT user=app dbname=app" ;;
    pgtenant-session) echo "host=127.0.0.1 port=$PORT_pgtenant_session user=app.acme dbname=app" ;;
    pgtenant-transaction) echo "host=127.0.0.1 port=$PORT_pgtenant_transaction user=app.acme dbname=app" ;;
    baseline-session) echo "host=127.0.0.1 port=$PORT_baseline_session user=app.acme dbname=app" ;;
    baseline-transaction) echo "host=127.0.0.1 port=$PORT_baseline_transaction user=app.acme dbname=app" ;;
  esac
}

for t in $TARGETS; do
  case "$t" in
    pgbouncer-*) start_pgbouncer "${t#pgbouncer-}" ;;
    pgtenant-*) start_pgtenant "${t#pgtenant-}" ;;
    baseline-*) start_pgtenant "${t#baseline-}" baseline "$BASELINE" ;;
  esac
done

echo "== pgbench -i -s $SCALE"
pgbench -i -s "$SCALE" -q "$(url_for direct)" >/dev/null 2>&1

RAW="$W/raw.tsv"
TICK="$(getconf CLK_TCK)"
# CPU time (user + system, in clock ticks) the proxy process of a target has used so far; empty for direct.
cpu_ticks() {
  local var="PID_${1//-/_}"
  [ -n "${!var:-}" ] && awk '{print $14 + $15}' "/proc/${!var}/stat"
  true
}
: > "$RAW"
reset_tpcb() {
  local db=(psql -X -q -v ON_ERROR_STOP=1 "$(url_for direct)")
  "${db[@]}" -c "VACUUM pgbench_branches" -c "VACUUM pgbench_tellers" -c "TRUNCATE pgbench_history" \
    -c "CHECKPOINT" >/dev/null
}
run_cell() { # target script(select|tpcb|connect) mode
  local target="$1" script="$2" mode="$3"
  local args=(-n -c "$CLIENTS" -j "$THREADS" -T "$DURATION" -M "$mode")
  [ "$script" = tpcb ] || args+=(-S)
  [ "$script" = connect ] && args+=(-C)
  local out tps lat c0 c1 txns cpu=""
  # Every TPC-B cell starts from the same state, as a pgbench run without -n would: small tables vacuumed,
  # history emptied, and nothing left dirty by the cell before.
  [ "$script" = tpcb ] && reset_tpcb
  c0="$(cpu_ticks "$target")"
  if out="$(pgbench "${args[@]}" "$(url_for "$target")" 2>&1)" && grep -q 'number of failed transactions: 0 ' <<<"$out"; then
    tps="$(grep -oP 'tps = \K[0-9.]+' <<<"$out" | head -1)"
    lat="$(grep -oP 'latency average = \K[0-9.]+' <<<"$out" | head -1)"
    txns="$(grep -oP 'number of transactions actually processed: \K[0-9]+' <<<"$out" | head -1)"
    c1="$(cpu_ticks "$target")"
    # The proxy's CPU per transaction: on a machine whose cores pgbench, PostgreSQL and the proxy share, this is
    # what the TPS ratio mostly measures.
    if [ -n "$c0" ] && [ -n "$txns" ] && [ "$txns" -gt 0 ]; then
      cpu="$(python3 -c "print(f'{($c1 - $c0) / $TICK / $txns * 1e6:.1f}')")"
    fi
  else
    tps=fail; lat=fail
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$target" "$script" "$mode" "$tps" "$lat" "$cpu" >> "$RAW"
  printf '   %-22s %-7s %-9s tps=%s\n' "$target" "$script" "$mode" "$tps"
}

echo "== runs: ${DURATION}s each, $CLIENTS clients, $THREADS threads, $REPEAT repetitions, targets interleaved"
for rep in $(seq 1 "$REPEAT"); do
  # Odd repetitions run the targets in order, even ones in reverse: whatever drifts during a repetition (tables
  # growing, caches warming) then falls on every target alike over two repetitions.
  order="$TARGETS"
  if [ $((rep % 2)) = 0 ]; then order=""; for t in $TARGETS; do order="$t $order"; done; fi
  for script in select tpcb; do
    for mode in $MODES; do
      for t in $order; do run_cell "$t" "$script" "$mode"; done
    done
  done
  for t in $order; do run_cell "$t" connect simple; done
done

mkdir -p "$OUT_DIR"
STAMP="$(date -u +%Y-%m-%dT%H:%MZ)"
REPORT="$OUT_DIR/latest.md"
python3 benches/report.py "$RAW" "$STAMP" "pgbench -c $CLIENTS -j $THREADS -T $DURATION, scale $SCALE, $REPEAT repetitions, $(nproc) cores, pgtenant workers=$PGT_WORKERS" > "$REPORT"
cp "$RAW" "$OUT_DIR/latest.tsv"
cat "$REPORT"

# Many schema tenants in transaction pooling (one client per tenant against all clients on one tenant): its own
# cluster and table, appended to the report. TENANTS=0 skips it.
if [ "${TENANTS:-1}" = 1 ]; then
  echo
  echo "== many schema tenants (benches/tenants.sh)"
  DURATION="$DURATION" bash benches/tenants.sh | tee -a "$REPORT"
fi
