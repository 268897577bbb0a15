#!/usr/bin/env bash
# Control-plane scale (issue 16, item 4): start time and RSS with N tenants (seeded from the config), route
# changes per second and their latency, another tenant's worst `SELECT 1` latency while they run, RSS over the
# changes, and the start time of a restart that replays them from routes.log.
#
#   bash benches/control_plane.sh                   # N in 10000 100000, CHANGES=10000
#   SIZES="100000" CHANGES=20000 bash benches/control_plane.sh
#   TOUCHED=1000 ...: the changes cycle over 1 000 tenants (RSS over many changes of the same tenants)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pg-lib.sh

SIZES="${SIZES:-10000 100000}"
CHANGES="${CHANGES:-10000}"
python3 -c 'import psycopg' 2>/dev/null || python3 -m pip install --quiet 'psycopg[binary]'
cargo build --release --quiet
pg_setup_workdir
pg_start main
pg_sql "$main_PORT" postgres "CREATE DATABASE app" >/dev/null
W="$PG_WORKDIR"

# start_timed CONFIG SOCKET: starts the proxy; STARTED is the seconds until its admin socket answered.
start_timed() {
  local t0 t1
  t0="$(date +%s.%N)"
  RUST_LOG=pgtenant=warn pgtenant_serve "$1" "$W/proxy.log"
  until python3 - "$2" <<'PY' 2>/dev/null
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b'{"cmd":"stats"}\n')
assert json.loads(s.makefile().readline())["ok"]
PY
  do sleep 0.02; done
  t1="$(date +%s.%N)"
  STARTED="$(python3 -c "print(f'{$t1 - $t0:.2f}')")"
}
rss() { awk '/VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }

rows=()
for n in $SIZES; do
  port="$(free_port)"
  cfg="$W/cp$n.toml"
  {
    printf '[proxy]\nlisten = "127.0.0.1:%s"\nadmin_socket = "%s/cp%s.sock"\nstate_dir = "%s/cp%s-state"\n' \
      "$port" "$W" "$n" "$W" "$n"
    printf 'pool_mode = "transaction"\n[[users]]\nname = "app"\npassword = "secret"\ntenants = ["*"]\n'
    printf '[backends.main]\nhost = "127.0.0.1"\nport = %s\nuser = "postgres"\ndatabase = "app"\npool_size = 4\n' \
      "$main_PORT"
    python3 -c "
import sys
for i in range($n):
    sys.stdout.write(f'[tenants.t{i}]\nbackend = \"main\"\nschema = \"s{i}\"\n')"
  } > "$cfg"
  start_timed "$cfg" "$W/cp$n.sock"
  start1="$STARTED"
  rss1="$(rss "$PGTENANT_PID")"
  row="$(python3 benches/control_plane.py "$PGTENANT_PID" "$W/cp$n.sock" \
    "host=127.0.0.1 port=$port user=app.t0 dbname=app password=secret" "$n" "$CHANGES")"
  kill "$PGTENANT_PID"; wait "$PGTENANT_PID" 2>/dev/null || true
  start_timed "$cfg" "$W/cp$n.sock"
  start2="$STARTED"
  rss2="$(rss "$PGTENANT_PID")"
  kill "$PGTENANT_PID"; wait "$PGTENANT_PID" 2>/dev/null || true
  rows+=("$row $start1 s / $rss1 MB | $start2 s / $rss2 MB |")
done
echo "| tenants | changes | change latency p50 / p99 / max (ms) | t0's worst SELECT 1 quiet / during (ms) | t0's SELECT 1 per second quiet / during | RSS before / after a fifth / after all the changes (MB) | first start (seeded from config): time / RSS | restart (snapshot + log replay): time / RSS |"
echo "|---:|---:|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
