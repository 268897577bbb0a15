#!/usr/bin/env bash
# What the move's triggers cost a write on the source, straight on PostgreSQL (no proxy): N single-row UPDATEs
# of pgbench_accounts in one DO block, timed inside the server, per configuration, the configurations taking
# turns (ROUNDS). The capture and fence functions are this build's (read from src/migration/capture.rs); the
# other configurations take the capture apart to show where its cost is.
#
#   bash benches/triggers.sh                                   # N=25000 ROUNDS=3, every configuration
#   CONFIGS="none fence capture" bash benches/triggers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pg-lib.sh

N="${N:-25000}"
ROUNDS="${ROUNDS:-3}"
CONFIGS="${CONFIGS:-none noop fence capture capture_noset capture_min capture_nojson}"
pg_setup_workdir
pg_start one
P=$one_PORT
pg_sql "$P" postgres "CREATE DATABASE app" >/dev/null
pgbench -i -s 5 -q -h 127.0.0.1 -p "$P" -U postgres app >/dev/null 2>&1
ROWS=500000

# This build's schema and functions, as a move installs them.
python3 - "$PG_WORKDIR/setup.sql" <<'PY'
import re, sys
src = open("src/migration/capture.rs").read()
setup = re.search(r'const SETUP: &str = r#"(.*?)"#;', src, re.S).group(1)
body = re.search(r"(CREATE OR REPLACE FUNCTION pgtenant\.capture\(\).*?\$fn\$;)", setup, re.S).group(1)
noset = body.replace("pgtenant.capture()", "pgtenant.capture_noset()").replace(" SET search_path = pg_catalog", "")
parts = """
-- The capture's parts: the row's insert into the change log with and without its JSON images, an empty trigger.
CREATE OR REPLACE FUNCTION pgtenant.capture_min() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO pgtenant.change_log (tenant, tbl, op, old_row, new_row)
    VALUES (TG_ARGV[0], TG_TABLE_NAME, 'U', to_jsonb(OLD), to_jsonb(NEW));
    RETURN NULL;
END
$fn$;
CREATE OR REPLACE FUNCTION pgtenant.capture_nojson() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO pgtenant.change_log (tenant, tbl, op) VALUES (TG_ARGV[0], TG_TABLE_NAME, 'U');
    RETURN NULL;
END
$fn$;
CREATE OR REPLACE FUNCTION pgtenant.noop() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    RETURN NULL;
END
$fn$;
"""
open(sys.argv[1], "w").write(setup + "\n" + noset + "\n" + parts)
PY
psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$P" -U postgres app -f "$PG_WORKDIR/setup.sql" >/dev/null 2>&1

# Installs configuration $1 on pgbench_accounts: a row trigger for capture*, a statement trigger otherwise.
install() {
  local sql="DROP TRIGGER IF EXISTS t ON pgbench_accounts;"
  case $1 in
    none) ;;
    capture*|noop) sql+="CREATE TRIGGER t AFTER INSERT OR UPDATE OR DELETE ON pgbench_accounts FOR EACH ROW
                   EXECUTE FUNCTION pgtenant.$1('acme');" ;;
    fence) sql+="CREATE TRIGGER t BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON pgbench_accounts
                 FOR EACH STATEMENT EXECUTE FUNCTION pgtenant.fence('acme');" ;;
  esac
  [ "$1" = none ] || sql+="ALTER TABLE pgbench_accounts ENABLE ALWAYS TRIGGER t;"
  pg_sql "$P" app "$sql" >/dev/null 2>&1
}

echo "| configuration | µs per single-row UPDATE, per round |"
echo "|---|---|"
declare -A results
off=0
for r in $(seq 1 "$ROUNDS"); do
  for c in $CONFIGS; do
    install "$c"
    pg_sql "$P" app "TRUNCATE pgtenant.change_log" >/dev/null
    # Each run updates rows no run before it touched (while there are any), so none pays for another's bloat.
    [ $((off + N)) -le $ROWS ] || off=0
    us=$(psql -X -qAt -h 127.0.0.1 -p "$P" -U postgres app -c "SET client_min_messages = warning;
      DO \$\$ DECLARE t0 timestamptz := clock_timestamp(); BEGIN
        FOR i IN $((off + 1))..$((off + N)) LOOP UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = i; END LOOP;
        RAISE WARNING '%', round(extract(epoch FROM clock_timestamp() - t0) * 1e6 / $N, 2); END \$\$" 2>&1 |
      grep -oP 'WARNING:  \K[0-9.]+')
    off=$((off + N))
    results[$c]="${results[$c]:-}${results[$c]:+, }$us"
  done
done
for c in $CONFIGS; do echo "| $c | ${results[$c]} |"; done
