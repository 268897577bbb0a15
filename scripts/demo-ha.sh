#!/usr/bin/env bash
# Three pgtenant instances sharing one control plane (a PostgreSQL database): pgbench through every instance,
# a route change made on one instance seen by all, and a live move of a tenant coordinated across the three:
# the cutover holds the tenant on every instance, then all route it to the new backend.
#   bash scripts/demo-ha.sh     (DEMO_SECONDS=20 DEMO_CLIENTS=2 DEMO_SCALE=5 to change the load; INSTANCES=1 runs
#   the same move with one instance, for comparison)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pg-lib.sh

SECONDS_RUN="${DEMO_SECONDS:-20}"
CLIENTS="${DEMO_CLIENTS:-2}"
SCALE="${DEMO_SCALE:-5}"
INSTANCES="${INSTANCES:-3}"

echo "== building pgtenant (release)"
cargo build --release --quiet
pg_setup_workdir

echo "== starting three PostgreSQL clusters: the control plane, shared and dedicated"
pg_start control
pg_start_pair
pg_sql "$shared_PORT" app "CREATE SCHEMA tenant_acme; CREATE SCHEMA tenant_globex" >/dev/null
CP="postgres://postgres@127.0.0.1:$control_PORT/postgres"

ports=()
for i in $(seq 1 "$INSTANCES"); do
  port="$(free_port)"
  ports+=("$port")
  {
    printf 'control_plane = "%s"\n' "$CP"
    printf '[proxy]\nlisten = "127.0.0.1:%s"\nadmin_socket = "%s/p%s.sock"\nstate_dir = "%s/state%s"\n' \
      "$port" "$PG_WORKDIR" "$i" "$PG_WORKDIR" "$i"
    printf '[[users]]\nname = "app"\npassword = "secret"\ntenants = ["*"]\n'
    for b in shared dedicated; do
      p="$shared_PORT"; [ "$b" = dedicated ] && p="$dedicated_PORT"
      printf '[backends.%s]\nhost = "127.0.0.1"\nport = %s\nuser = "postgres"\ndatabase = "app"\npool_size = 10\n' "$b" "$p"
    done
    for t in acme globex; do printf '[tenants.%s]\nbackend = "shared"\nschema = "tenant_%s"\n' "$t" "$t"; done
    printf '[migration]\npg_dump = "%s/pg_dump"\n' "$PG_BIN"
  } > "$PG_WORKDIR/p$i.toml"
  pgtenant_serve "$PG_WORKDIR/p$i.toml" "$PG_WORKDIR/p$i.log"
  wait_port "$port"
  echo "   instance $i on port $port"
done
ctl() { local i="$1"; shift; ./target/release/pgtenant ctl --socket "$PG_WORKDIR/p$i.sock" "$@"; }
sleep 1.5
echo "== members of the control plane"
ctl 1 instances

export PGPASSWORD=secret
url() { echo "host=127.0.0.1 port=${ports[$(( $1 - 1 ))]} user=app.$2 dbname=app"; }

echo "== a route change on instance $INSTANCES, seen by every instance"
start_ns=$(date +%s%N)
ctl "$INSTANCES" tenant set globex --backend shared --schema tenant_globex --database app >/dev/null
for i in $(seq 1 "$INSTANCES"); do
  until ctl "$i" tenant get globex --json | grep -q '"database": *"app"'; do sleep 0.005; done
done
echo "   applied by all $INSTANCES in $(( ($(date +%s%N) - start_ns) / 1000000 )) ms (ctl round trips included)"

echo "== pgbench -i -s $SCALE for acme (through instance 1), then pgbench through every instance"
pgbench -i -s "$SCALE" -q "$(url 1 acme)" 2>&1 | tail -1
pids=()
for i in $(seq 1 "$INSTANCES"); do
  pgbench -n -c "$CLIENTS" -T "$SECONDS_RUN" "$(url "$i" acme)" > "$PG_WORKDIR/bench$i.out" 2>&1 &
  pids+=($!)
done
sleep 3

echo "== live migration of acme to the dedicated cluster, coordinated by instance 1 of $INSTANCES"
ctl 1 migrate start acme --to dedicated --verify hash --cutover auto
ctl 1 migrate status acme --watch
wait "${pids[@]}"

echo
echo "summary"
for i in $(seq 1 "$INSTANCES"); do
  failed="$(grep -oP 'number of failed transactions: \K[0-9]+' "$PG_WORKDIR/bench$i.out" || echo '?')"
  tps="$(grep -oP 'tps = \K[0-9.]+' "$PG_WORKDIR/bench$i.out" | head -1)"
  backend="$(ctl "$i" tenant get acme --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["route"]["backend"])')"
  held="$(pg_sql "$control_PORT" postgres "SELECT coalesce(round(max(held_ms)::numeric, 1)::text || ' ms', 'its cutover pause (coordinator)') FROM pgtenant_cp.barrier_acks WHERE state = 'opened' AND instance LIKE '%:${ports[$(( i - 1 ))]}'")"
  printf '   instance %s: acme on %-9s  pgbench %6.0f tps, %s failed; held acme for %s\n' "$i" "$backend" "$tps" "$failed" "$held"
done
ctl 1 migrate status acme --json > "$PG_WORKDIR/status.json"
pause="$(python3 -c 'import json,sys; print("%.1f" % json.load(open(sys.argv[1]))["last_pause_ms"])' "$PG_WORKDIR/status.json")"
echo "   coordinator's cutover pause:  $pause ms"
digest() {
  pg_sql "$1" app "SELECT (SELECT count(*) FROM tenant_acme.pgbench_history), (SELECT sum(abalance) FROM tenant_acme.pgbench_accounts),
    (SELECT sum(delta) FROM tenant_acme.pgbench_history)"
}
src="$(digest "$shared_PORT")"; dst="$(digest "$dedicated_PORT")"
IFS='|' read -r hist abal delta <<<"$dst"
echo "   source and target identical:  $([ "$src" = "$dst" ] && echo yes || echo "NO ($src vs $dst)")"
echo "   pgbench invariant on target:  sum(abalance)=$abal sum(delta)=$delta over $hist history rows"
status=0
for i in $(seq 1 "$INSTANCES"); do grep -q 'number of failed transactions: 0 ' "$PG_WORKDIR/bench$i.out" || status=1; done
[ "$src" = "$dst" ] && [ "$abal" = "$delta" ] || status=1
[ "$status" = 0 ] && echo "demo-ha ok" || { echo "demo-ha FAILED"; exit 1; }
