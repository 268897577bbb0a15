#!/usr/bin/env bash
# The main job: two throwaway PostgreSQL clusters, pgtenant in front of them, two tenants in schemas on the
# shared cluster with pgbench traffic through the proxy, and a live migration of one of them to the other
# cluster while the traffic runs. Ends with a summary: rows moved, pause, failed transactions, verification.
#   bash scripts/demo.sh     (DEMO_SECONDS=30 DEMO_CLIENTS=8 DEMO_SCALE=10 to change the load)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pg-lib.sh

SECONDS_RUN="${DEMO_SECONDS:-25}"
CLIENTS="${DEMO_CLIENTS:-4}"
SCALE="${DEMO_SCALE:-5}"

echo "== building pgtenant (release)"
cargo build --release --quiet
pg_setup_workdir

echo "== starting two PostgreSQL clusters"
pg_start shared
pg_start dedicated
pg_sql "$shared_PORT" postgres "CREATE DATABASE app" >/dev/null
pg_sql "$dedicated_PORT" postgres "CREATE DATABASE app" >/dev/null
pg_sql "$shared_PORT" app "CREATE SCHEMA tenant_acme; CREATE SCHEMA tenant_globex" >/dev/null
serving_role "$shared_PORT"
serving_role "$dedicated_PORT"
echo "   shared    on port $shared_PORT (database app, schemas tenant_acme, tenant_globex)"
echo "   dedicated on port $dedicated_PORT (database app, empty)"

PROXY_PORT="$(free_port)"
CONFIG="$PG_WORKDIR/pgtenant.toml"
ISOLATION=role migration_config "$CONFIG" "$PROXY_PORT" "$shared_PORT" "$dedicated_PORT" 20 "" acme globex

echo "== starting pgtenant on port $PROXY_PORT"
pgtenant_serve "$CONFIG"
wait_port "$PROXY_PORT"
ctl() { ./target/release/pgtenant ctl --socket "$PG_WORKDIR/pgtenant.sock" "$@"; }

echo "== each tenant gets a role of its own (serving connections are never a superuser)"
for t in acme globex; do ctl tenant grants "$t" --apply >/dev/null && echo "   t_$t: schema tenant_$t only"; done

export PGPASSWORD=secret
url() { echo "host=127.0.0.1 port=$PROXY_PORT user=app.$1 dbname=app"; }

echo "== pgbench -i -s $SCALE through the proxy for acme and globex (both on the shared cluster)"
for t in acme globex; do pgbench -i -s "$SCALE" -q "$(url $t)" 2>&1 | tail -1; done
if psql -X -q "$(url acme)" -c "SELECT count(*) FROM tenant_globex.pgbench_accounts" >/dev/null 2>"$PG_WORKDIR/peek.err"; then
  echo "acme could read globex's rows"; exit 1
fi
echo "   acme reading globex's table: $(grep -o 'permission denied[^"]*' "$PG_WORKDIR/peek.err" | head -1)"

echo "== pgbench -c $CLIENTS -T $SECONDS_RUN for both tenants at once"
pgbench -n -c "$CLIENTS" -j 2 -T "$SECONDS_RUN" -M prepared "$(url acme)" > "$PG_WORKDIR/acme.out" 2>&1 &
A=$!
pgbench -n -c "$CLIENTS" -j 2 -T "$SECONDS_RUN" -M extended "$(url globex)" > "$PG_WORKDIR/globex.out" 2>&1 &
G=$!
sleep 3

field() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, {'d': d}))" "$@"; }
echo "== estimate of the move (same preflight as start, nothing installed)"
ctl migrate estimate acme --to dedicated --verify hash --json > "$PG_WORKDIR/estimate.json"
echo "   $(field "$PG_WORKDIR/estimate.json" '"%d rows, %.1f MB in %d tables; copy ~%.1f s (%s), catch-up ~%.1f s, verification ~%.1f s; preflight %s" % (d["rows"], d["bytes"] / 1e6, len(d["tables"]), d["copy_s"], d["copy_rows_per_s"]["from"], d["catch_up_s"], d["verify_s"], "passed" if d["preflight_passed"] else d["problems"])')"

echo "== live migration of acme to the dedicated cluster while pgbench runs"
ctl migrate start acme --to dedicated --verify hash --cutover auto
ctl migrate status acme --watch
wait $A $G

echo
echo "== after the migration"
ctl migrate verify acme --level full --json > "$PG_WORKDIR/verify.json"
ctl migrate status acme --json > "$PG_WORKDIR/status.json"
ctl migrate finalize acme --drop-source-after 7d --json > "$PG_WORKDIR/finalize.json"
ctl migrate history --tenant acme --json > "$PG_WORKDIR/history.json"
ctl tenant backup acme --json > "$PG_WORKDIR/backup.json"

printf '%-8s %-10s %-14s %8s %10s\n' tenant backend schema tps failed
for t in acme globex; do
  where="$(psql -X -A -t -F ' ' "$(url $t)" -c "SELECT inet_server_port(), current_schema()")"
  read -r port schema <<<"$where"
  backend=shared; [ "$port" = "$dedicated_PORT" ] && backend=dedicated
  tps="$(grep -oP 'tps = \K[0-9.]+' "$PG_WORKDIR/$t.out" | head -1)"
  failed="$(grep -oP 'number of failed transactions: \K[0-9]+' "$PG_WORKDIR/$t.out" || echo '?')"
  printf '%-8s %-10s %-14s %8.0f %10s\n' "$t" "$backend" "$schema" "$tps" "$failed"
done

# The same data on both sides (the source stayed in step until finalize) and pgbench's own invariant.
digest() {
  pg_sql "$1" app "SELECT (SELECT count(*) FROM tenant_acme.pgbench_history), (SELECT sum(abalance) FROM tenant_acme.pgbench_accounts),
    (SELECT sum(delta) FROM tenant_acme.pgbench_history), (SELECT md5(string_agg(a::text, ',' ORDER BY aid)) FROM tenant_acme.pgbench_accounts a)"
}
src="$(digest "$shared_PORT")"; dst="$(digest "$dedicated_PORT")"
IFS='|' read -r hist abal delta _ <<<"$dst"
echo
echo "summary"
echo "   rows moved by the bulk copy:   $(field "$PG_WORKDIR/status.json" 'd["rows_copied"]')"
echo "   cutover pause (gate closed):   $(field "$PG_WORKDIR/status.json" '"%.1f ms" % d["last_pause_ms"]') after $(field "$PG_WORKDIR/status.json" 'd["cutover_attempts"]') attempt(s)"
echo "   full verification after cutover: $(field "$PG_WORKDIR/verify.json" '"passed" if d["passed"] else "FAILED: %s" % d["violations"][:3]') ($(field "$PG_WORKDIR/verify.json" 'd["rows"]') rows compared)"
echo "   copy estimate off by:          $(field "$PG_WORKDIR/history.json" '"%+.0f%%" % d["entries"][0]["copy_estimate_error_percent"]') (history: $(field "$PG_WORKDIR/history.json" 'd["entries"][0]["outcome"]'))"
echo "   source and target identical:   $([ "$src" = "$dst" ] && echo yes || echo "NO ($src vs $dst)")"
echo "   source copy kept (fenced) until: $(field "$PG_WORKDIR/finalize.json" 'd["source_drop_due"]') (migrate drops; cancel-drop keeps it)"
echo "   backup of acme on its new home: $(field "$PG_WORKDIR/backup.json" '"%d rows, %.1f MB in %d ms: %s" % (d["rows"], d["size"] / 1e6, d["took_ms"], d["file"])')"
echo "   pgbench invariant on target:   sum(abalance)=$abal sum(delta)=$delta over $hist history rows"
status=0
for t in acme globex; do
  grep -q 'number of failed transactions: 0 ' "$PG_WORKDIR/$t.out" || { echo "pgbench for $t reported failures"; cat "$PG_WORKDIR/$t.out"; status=1; }
done
[ "$src" = "$dst" ] && [ "$abal" = "$delta" ] || status=1
grep -q '"passed": true' "$PG_WORKDIR/verify.json" || status=1
[ "$status" = 0 ] && echo "demo ok" || { echo "demo FAILED"; exit 1; }
