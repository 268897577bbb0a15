#!/usr/bin/env bash
# Many schema tenants on one backend in transaction pooling (issue 16, goal 0): N tenants with schema routes,
# one pgbench client each, against the same N clients all on one tenant, and against direct connections. For each
# case: total TPS, per-tenant spread (max/median TPS), and the backend connections opened during the run
# (pg_stat_database.sessions), and through the proxy the full resets of a connection between tenants per
# transaction (pgtenant_pool_tenant_resets_total). Shared isolation (one pool for the backend's tenants, the schema set per
# transaction) and role isolation (a pool per tenant role, the database enforcing the boundary) side by side.
#
#   bash benches/tenants.sh                              # N=50, 10 s cells, pool_size 10
#   N=50 DURATION=20 POOL=10 ISOLATIONS="shared role" MODE=prepared bash benches/tenants.sh
#   TURN_MS=0 bash benches/tenants.sh                    # tenants' turns off (default: the backend's default)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pg-lib.sh

N="${N:-50}"
DURATION="${DURATION:-10}"
POOL="${POOL:-10}"
ISOLATIONS="${ISOLATIONS:-shared role}"
MODE="${MODE:-simple}" # pgbench's query protocol: simple, extended or prepared
ROWS=1000

cargo build --release --quiet
pg_setup_workdir
pg_start bench
W="$PG_WORKDIR"
pg_sql "$bench_PORT" postgres "CREATE DATABASE app" >/dev/null
{
  # Shared pools log in as an ordinary role, as README's security model asks (no superuser serving).
  echo "CREATE ROLE serve LOGIN;"
  for i in $(seq 1 "$N"); do
    echo "CREATE SCHEMA t$i; CREATE TABLE t$i.acc (id int PRIMARY KEY, v int);"
    echo "INSERT INTO t$i.acc SELECT g, g FROM generate_series(1, $ROWS) g;"
    echo "CREATE ROLE t_t$i LOGIN; GRANT USAGE ON SCHEMA t$i TO t_t$i; GRANT SELECT ON t$i.acc TO t_t$i;"
    echo "GRANT USAGE ON SCHEMA t$i TO serve; GRANT SELECT ON t$i.acc TO serve;"
  done
  echo "VACUUM ANALYZE;"
} | psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$bench_PORT" -U postgres -d app >/dev/null
printf '\\set id random(1, %s)\nSELECT v FROM acc WHERE id = :id;\n' "$ROWS" > "$W/select.sql"
export PGPASSWORD=secret

# busy: the machine's busy CPU time so far, in clock ticks (every /proc/stat field but idle and iowait).
busy() {
  awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat
}

sessions() {
  pg_sql "$bench_PORT" app "SELECT sessions FROM pg_stat_database WHERE datname = 'app'"
}

# counts: "<full resets> <transactions>" so far, from the proxy's metrics ("- -" with no proxy running).
METRICS=""
counts() {
  [ -n "$METRICS" ] || { echo "- -"; return; }
  python3 - "$METRICS" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=5).read().decode()
resets = txns = 0.0
for line in text.splitlines():
    if line.startswith("pgtenant_pool_tenant_resets_total "):
        resets = float(line.rsplit(" ", 1)[1])
    elif line.startswith("pgtenant_transactions_total{"):
        txns += float(line.rsplit(" ", 1)[1])
print(f"{resets:.0f} {txns:.0f}")
PY
}

start_proxy() { # isolation
  local port
  port="$(free_port)"
  METRICS="127.0.0.1:$(free_port)"
  {
    printf '[proxy]\nlisten = "127.0.0.1:%s"\nadmin_socket = "%s/%s.sock"\nstate_dir = "%s/%s-state"\n' \
      "$port" "$W" "$1" "$W" "$1"
    printf 'metrics_listen = "%s"\n' "$METRICS"
    printf 'pool_mode = "transaction"\nmax_client_conn = 2000\n'
    printf '[[users]]\nname = "app"\npassword = "secret"\ntenants = ["*"]\n'
    printf '[backends.main]\nhost = "127.0.0.1"\nport = %s\nuser = "serve"\ndatabase = "app"\n' "$bench_PORT"
    printf 'pool_size = %s\nisolation = "%s"\n' "$POOL" "$1"
    # Tenants' turns on shared connections (README: pooling); TURN_MS=0 turns them off, for comparison.
    if [ -n "${TURN_MS:-}" ]; then printf 'tenant_turn_ms = %s\n' "$TURN_MS"; fi
    # Role isolation needs a connection per busy tenant: room for every tenant's pool, bounded backend-wide.
    if [ "$1" = role ]; then printf 'max_connections = %s\n' "$((N + POOL))"; fi
    for i in $(seq 1 "$N"); do printf '[tenants.t%s]\nbackend = "main"\nschema = "t%s"\n' "$i" "$i"; done
  } > "$W/$1.toml"
  RUST_LOG=pgtenant=warn pgtenant_serve "$W/$1.toml" "$W/$1.log"
  wait_port "$port"
  PROXY_PORT="$port"
}

# run CASE KIND: N single-client pgbench processes, one per tenant (spread) or all on tenant t1 (one).
run() {
  local name="$1" kind="$2" before after i pids=() counted
  before="$(sessions)"
  counted="$(counts)"
  local cpu0 cpu1
  cpu0="$(busy)"
  # One pgbench process per client in both cases, so the two differ only in the tenants.
  for i in $(seq 1 "$N"); do
    pgbench -n -c 1 -j 1 -T "$DURATION" -M "$MODE" -f "$W/select.sql" "$(url "$([ "$kind" = spread ] && echo "$i" || echo 1)")" \
      > "$W/out.$i" 2>&1 &
    pids+=("$!")
  done
  wait "${pids[@]}"
  cpu1="$(busy)"
  after="$(sessions)"
  python3 - "$name" "$kind" "$N" "$((after - before))" "$W" $counted $(counts) "$cpu0" "$cpu1" "$DURATION" <<'PY'
import re, statistics, sys
name, kind, n, opened, w = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
r0, t0, r1, t1 = sys.argv[6:10]
cpu = (float(sys.argv[11]) - float(sys.argv[10])) / 100.0  # clock ticks to seconds
resets = "-" if r0 == "-" or float(t1) == float(t0) else f"{(float(r1) - float(r0)) / (float(t1) - float(t0)):.2f}"
files = [f"{w}/out.{i}" for i in range(1, n + 1)]
tps, lat, failed = [], [], 0
for f in files:
    text = open(f).read()
    m = re.search(r"tps = ([0-9.]+)", text)
    tps.append(float(m.group(1)) if m else 0.0)
    m = re.search(r"latency average = ([0-9.]+) ms", text)
    lat.append(float(m.group(1)) if m else 0.0)
    failed += 0 if "number of failed transactions: 0 " in text else 1
spread = max(tps) / statistics.median(tps) if kind == "spread" and statistics.median(tps) else 1.0
per_txn = cpu / (sum(tps) * float(sys.argv[12])) * 1e6 if sum(tps) else 0.0
print(f"| {name} | {sum(tps):.0f} | {spread:.2f} | {statistics.median(lat):.2f} / {max(lat):.2f} | {per_txn:.0f} | {opened} | {resets} | {failed} |")
PY
}

echo "| case ($N clients, ${DURATION}s, pool_size $POOL) | TPS | spread max/median | latency ms, median / worst client's average | machine CPU µs per transaction | backend connections opened | full resets per transaction | pgbench runs failed |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
url() { echo "host=127.0.0.1 port=$bench_PORT user=postgres dbname=app options=-csearch_path=t$1"; }
run "direct, one client per tenant" spread
for iso in $ISOLATIONS; do
  start_proxy "$iso"
  url() { echo "host=127.0.0.1 port=$PROXY_PORT user=app.t$1 dbname=app"; }
  run "pgtenant $iso isolation, all clients on one tenant" one
  run "pgtenant $iso isolation, one client per tenant" spread
  kill "$PGTENANT_PID"
  METRICS=""
done
