# Shared shell helpers for the demo and benchmark scripts: throwaway PostgreSQL clusters in a temp dir.
# Source it; call pg_setup_workdir first, then pg_start NAME; everything is stopped and removed on exit.

PG_BIN=""
for d in /usr/lib/postgresql/15/bin /usr/lib/postgresql/16/bin /usr/lib/postgresql/17/bin; do
  if [ -x "$d/initdb" ]; then PG_BIN="$d"; break; fi
done
[ -n "$PG_BIN" ] || PG_BIN="$(dirname "$(command -v initdb)")"

# Postgres refuses to run as root: run server commands as the postgres user then.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

PG_CLUSTERS=()
PG_WORKDIR=""
PG_CLEANUP_EXTRA=()

pg_cleanup() {
  for pid in "${PG_CLEANUP_EXTRA[@]:-}"; do [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; done
  for dir in "${PG_CLUSTERS[@]:-}"; do
    [ -n "$dir" ] && as_pg "$PG_BIN/pg_ctl" -D "$dir" -m immediate -w stop >/dev/null 2>&1 || true
  done
  [ -n "$PG_WORKDIR" ] && [ -z "${KEEP_WORKDIR:-}" ] && rm -rf "$PG_WORKDIR"
}

pg_setup_workdir() {
  PG_WORKDIR="$(mktemp -d /tmp/pgtenant-XXXXXX)"
  chmod 755 "$PG_WORKDIR"
  [ "$(id -u)" = 0 ] && chown postgres "$PG_WORKDIR"
  trap pg_cleanup EXIT
}

# pg_start NAME: initdb and start a cluster; sets ${NAME}_PORT. PG_EXTRA_CONF: more postgresql.conf lines.
pg_start() {
  local name="$1" dir="$PG_WORKDIR/$1" port
  port="$(free_port)"
  as_pg "$PG_BIN/initdb" -D "$dir" -U postgres -A trust -N --no-instructions >/dev/null
  cat >> "$dir/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$PG_WORKDIR'
max_connections = 300
shared_buffers = 128MB
fsync = off
synchronous_commit = off
log_min_messages = warning
${PG_EXTRA_CONF:-}
CONF
  as_pg "$PG_BIN/pg_ctl" -D "$dir" -l "$dir.log" -w start >/dev/null
  PG_CLUSTERS+=("$dir")
  printf -v "${name}_PORT" '%s' "$port"
}

# pgtenant_serve CONFIG [LOG]: starts the release proxy in a session of its own and sets PGTENANT_PID.
# A session of its own is what a service, or PgBouncer started with -d, has. It matters for every figure: with
# the kernel's autogroup scheduling (sched_autogroup_enabled, on by default) CPU is shared between sessions
# first, so a proxy started as a plain child of this script would share one session's CPU share with pgbench,
# while PgBouncer and every PostgreSQL backend (both call setsid) each get one of their own. Measured with the
# same binary on the same run: TPC-B -M extended 0.89 of PgBouncer's TPS from this shell's session, 0.97 in its
# own. setsid forks (and $! would not be the proxy) when it runs as a process-group leader, which a background job
# is under job control: job control is off while the job starts. Without LOG the proxy shares our stderr (not a
# reopened /dev/stderr, which would truncate a log file and fails on a socket).
pgtenant_serve() {
  local log="${2:-}" jc=""
  case $- in *m*) jc=1; set +m ;; esac
  (
    [ -z "$log" ] || exec 2>"$log"
    RUST_LOG="${RUST_LOG:-pgtenant=warn}" exec setsid "${PGTENANT_BIN:-./target/release/pgtenant}" serve --config "$1"
  ) &
  PGTENANT_PID=$!
  [ -z "$jc" ] || set -m
  PG_CLEANUP_EXTRA+=("$PGTENANT_PID")
}

# pgbouncer_serve MODE DIR BACKEND_PORT: PgBouncer in pool mode MODE (session or transaction) in front of the
# backend's database `app` as user postgres, SCRAM client auth for app/secret like pgtenant's, a pool of 20;
# its files in DIR. Sets PGBOUNCER_PORT and PGBOUNCER_PID. PgBouncer daemonizes (-d): a session of its own.
pgbouncer_serve() {
  local mode="$1" dir="$2" backend="$3"
  PGBOUNCER_PORT="$(free_port)"
  printf '"app" "secret"\n' > "$dir/userlist.txt"
  cat > "$dir/pgbouncer-$mode.ini" <<INI
[databases]
app = host=127.0.0.1 port=$backend dbname=app user=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGBOUNCER_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $dir/userlist.txt
pool_mode = $mode
max_client_conn = 2000
default_pool_size = 20
logfile = $dir/pgbouncer-$mode.log
pidfile = $dir/pgbouncer-$mode.pid
ignore_startup_parameters = extra_float_digits,options
INI
  chown postgres "$dir/pgbouncer-$mode.ini" "$dir/userlist.txt" 2>/dev/null || true
  as_pg pgbouncer -d "$dir/pgbouncer-$mode.ini"
  wait_port "$PGBOUNCER_PORT"
  PGBOUNCER_PID="$(cat "$dir/pgbouncer-$mode.pid")"
  PG_CLEANUP_EXTRA+=("$PGBOUNCER_PID")
}

# pg_start_pair: the two clusters of a move, `shared` and `dedicated`, each with an empty database `app`.
pg_start_pair() {
  pg_start shared
  pg_start dedicated
  for p in "$shared_PORT" "$dedicated_PORT"; do pg_sql "$p" postgres "CREATE DATABASE app" >/dev/null; done
}

# pg_sql PORT DB SQL: run SQL as the superuser, unaligned tuples-only output.
pg_sql() {
  psql -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$1" -U postgres -d "$2" -c "$3"
}

# wait_port PORT: until something listens there (10 s).
wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2
  return 1
}

# pgtenant_config FILE LISTEN_PORT BACKEND_PORT POOL_SIZE [SCHEMA] [EXTRA_PROXY_LINES]
# Writes a one-backend config: backend "main" (database app), tenant "acme" (in SCHEMA when given), user
# app/secret; the admin socket and state directory sit beside FILE.
pgtenant_config() {
  local file="$1" port="$2" backend="$3" pool="$4" schema="${5:-}" extra="${6:-}"
  local base="${file%.toml}"
  {
    printf '[proxy]\nlisten = "127.0.0.1:%s"\nadmin_socket = "%s.sock"\nstate_dir = "%s-state"\n' "$port" "$base" "$base"
    if [ -n "$extra" ]; then printf '%s\n' "$extra"; fi
    printf '[[users]]\nname = "app"\npassword = "secret"\ntenants = ["*"]\n'
    printf '[backends.main]\nhost = "127.0.0.1"\nport = %s\nuser = "postgres"\ndatabase = "app"\npool_size = %s\n' "$backend" "$pool"
    printf '[tenants.acme]\nbackend = "main"\n'
    if [ -n "$schema" ]; then printf 'schema = "%s"\n' "$schema"; fi
  } > "$file"
}

# serving_role PORT: creates pgtenant_serve, an ordinary login role (no superuser), on the cluster at PORT.
serving_role() {
  pg_sql "$1" postgres "CREATE ROLE pgtenant_serve LOGIN" >/dev/null
}

# migration_config FILE LISTEN_PORT SHARED_PORT DEDICATED_PORT POOL_SIZE EXTRA_PROXY_LINES TENANT...
# Writes a two-backend config (backends "shared" and "dedicated", database app), user app/secret, each TENANT in
# schema tenant_TENANT on shared, and a [migration] section using this machine's pg_dump; the admin socket and
# state directory sit in $PG_WORKDIR. Append more [migration] keys to FILE afterwards. With ISOLATION=role, tenants
# log in as their own roles under the serving role pgtenant_serve (see serving_role; grant each tenant with
# `pgtenant ctl tenant grants T --apply`) and migrations use postgres; otherwise everything runs as postgres.
migration_config() {
  local file="$1" port="$2" shared="$3" dedicated="$4" pool="$5" extra="$6"
  shift 6
  {
    printf '[proxy]\nlisten = "127.0.0.1:%s"\nadmin_socket = "%s/pgtenant.sock"\nstate_dir = "%s/state"\n' \
      "$port" "$PG_WORKDIR" "$PG_WORKDIR"
    if [ -n "$extra" ]; then printf '%s\n' "$extra"; fi
    printf '[[users]]\nname = "app"\npassword = "secret"\ntenants = ["*"]\n'
    for b in shared dedicated; do
      local p="$shared"; [ "$b" = dedicated ] && p="$dedicated"
      if [ "${ISOLATION:-}" = role ]; then
        printf '[backends.%s]\nhost = "127.0.0.1"\nport = %s\nuser = "pgtenant_serve"\nadmin_user = "postgres"\nisolation = "role"\ndatabase = "app"\npool_size = %s\n' \
          "$b" "$p" "$pool"
      else
        printf '[backends.%s]\nhost = "127.0.0.1"\nport = %s\nuser = "postgres"\ndatabase = "app"\npool_size = %s\n' \
          "$b" "$p" "$pool"
      fi
    done
    for t in "$@"; do printf '[tenants.%s]\nbackend = "shared"\nschema = "tenant_%s"\n' "$t" "$t"; done
    printf '[migration]\npg_dump = "%s/pg_dump"\n' "$PG_BIN"
  } > "$file"
}
