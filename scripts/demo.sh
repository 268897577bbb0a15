#!/usr/bin/env bash
# The main job: two throwaway PostgreSQL clusters, pgtenant in front of them, pgbench traffic for two tenants
# on different backends, and a report of what landed where.
#   bash scripts/demo.sh            (DEMO_SECONDS=20 DEMO_CLIENTS=8 to change the load)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pg-lib.sh

SECONDS_RUN="${DEMO_SECONDS:-10}"
CLIENTS="${DEMO_CLIENTS:-4}"

echo "== building pgtenant (release)"
cargo build --release --quiet
pg_setup_workdir

echo "== starting two PostgreSQL clusters"
pg_start shared
pg_start dedicated
pg_sql "$shared_PORT" postgres "CREATE DATABASE app" >/dev/null
pg_sql "$dedicated_PORT" postgres "CREATE DATABASE app" >/dev/null
pg_sql "$shared_PORT" app "CREATE SCHEMA tenant_acme; CREATE SCHEMA tenant_globex" >/dev/null
echo "   shared    on port $shared_PORT (database app, schemas tenant_acme, tenant_globex)"
echo "   dedicated on port $dedicated_PORT (database app)"

PROXY_PORT="$(free_port)"
CONFIG="$PG_WORKDIR/pgtenant.toml"
cat > "$CONFIG" <<TOML
[proxy]
listen = "127.0.0.1:$PROXY_PORT"
admin_socket = "$PG_WORKDIR/pgtenant.sock"
state_dir = "$PG_WORKDIR/state"

[[users]]
name = "app"
password = "secret"
tenants = ["*"]

[backends.shared]
host = "127.0.0.1"
port = $shared_PORT
user = "postgres"
database = "app"
pool_size = 20

[backends.dedicated]
host = "127.0.0.1"
port = $dedicated_PORT
user = "postgres"
database = "app"
pool_size = 20

[tenants.acme]
backend = "shared"
schema = "tenant_acme"

[tenants.globex]
backend = "dedicated"
TOML

echo "== starting pgtenant on port $PROXY_PORT"
RUST_LOG="${RUST_LOG:-pgtenant=warn}" ./target/release/pgtenant serve --config "$CONFIG" &
PG_CLEANUP_EXTRA+=("$!")
wait_port "$PROXY_PORT"

export PGPASSWORD=secret
url() { echo "host=127.0.0.1 port=$PROXY_PORT user=app.$1 dbname=app"; }

echo "== pgbench -i through the proxy for acme and globex"
for t in acme globex; do pgbench -i -s 1 -q "$(url $t)" 2>&1 | tail -1; done

echo "== pgbench -c $CLIENTS -T $SECONDS_RUN for both tenants at once"
pgbench -c "$CLIENTS" -j 2 -T "$SECONDS_RUN" -M prepared "$(url acme)" > "$PG_WORKDIR/acme.out" 2>&1 &
A=$!
pgbench -c "$CLIENTS" -j 2 -T "$SECONDS_RUN" -M extended "$(url globex)" > "$PG_WORKDIR/globex.out" 2>&1 &
G=$!
wait $A $G

echo
echo "== what landed where"
printf '%-8s %-10s %-10s %-14s %8s %10s %8s\n' tenant backend port schema tps failed history
for t in acme globex; do
  where="$(psql -X -A -t -F ' ' "$(url $t)" -c "SELECT inet_server_port(), current_schema(), (SELECT count(*) FROM pgbench_history)")"
  read -r port schema hist <<<"$where"
  backend=shared; [ "$port" = "$dedicated_PORT" ] && backend=dedicated
  tps="$(grep -oP 'tps = \K[0-9.]+' "$PG_WORKDIR/$t.out" | head -1)"
  failed="$(grep -oP 'number of failed transactions: \K[0-9]+' "$PG_WORKDIR/$t.out" || echo '?')"
  printf '%-8s %-10s %-10s %-14s %8.0f %10s %8s\n' "$t" "$backend" "$port" "$schema" "$tps" "$failed" "$hist"
done
echo
echo "== checked directly on the backends"
echo "   shared/tenant_acme history rows:  $(pg_sql "$shared_PORT" app 'SELECT count(*) FROM tenant_acme.pgbench_history')"
echo "   shared/tenant_globex tables:      $(pg_sql "$shared_PORT" app "SELECT count(*) FROM pg_tables WHERE schemaname = 'tenant_globex'")"
echo "   dedicated/public history rows:    $(pg_sql "$dedicated_PORT" app 'SELECT count(*) FROM public.pgbench_history')"
for t in acme globex; do
  grep -q 'number of failed transactions: 0 ' "$PG_WORKDIR/$t.out" || { echo "pgbench for $t reported failures"; cat "$PG_WORKDIR/$t.out"; exit 1; }
done
echo "demo ok"
