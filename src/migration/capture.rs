//! Change capture and fencing: row-image triggers on the tenant's tables that write into `pgtenant.change_log`
//! inside the writing transaction, the `pgtenant.applied` ledger that makes applying exactly-once, the DDL
//! guard, and the fence that refuses the tenant's writes on the side it has moved away from.
//!
//! Nothing a client can set switches any of it off: the triggers fire `ALWAYS` (also under
//! `session_replication_role = replica`), there is no bypass setting, and the functions run as their owner
//! (the backend's admin role, `SECURITY DEFINER`), so tenants need no rights on the `pgtenant` schema. The
//! migration's own connections are told apart by a random key that only the admin role can read
//! (`pgtenant.apply_key`): they set it as `pgtenant.apply_key` at connect, and the triggers skip them, so applied
//! changes are never captured again and the fence does not stop the tee.
//!
//! Everything is named after the tenant (`pgtenant_capture_<tenant>`, `pgtenant_fence_<tenant>`), so `abort` and
//! `finalize` find and drop it by name even if the record's table list were stale.

use tokio_postgres::Client;

use super::pg::Endpoint;
use super::MigrateError;
use crate::quote::{quote_ident, quote_literal};

/// The shared objects; idempotent, safe to run while other tenants migrate.
const SETUP: &str = r#"
CREATE SCHEMA IF NOT EXISTS pgtenant;
REVOKE ALL ON SCHEMA pgtenant FROM PUBLIC;
CREATE TABLE IF NOT EXISTS pgtenant.change_log (
    id      bigserial PRIMARY KEY,
    tenant  text NOT NULL,
    xid     xid8 NOT NULL DEFAULT pg_current_xact_id(),
    tbl     text NOT NULL,
    op      "char" NOT NULL,
    old_row jsonb,
    new_row jsonb
);
CREATE INDEX IF NOT EXISTS change_log_tenant_id ON pgtenant.change_log (tenant, id);
CREATE TABLE IF NOT EXISTS pgtenant.applied (
    tenant text NOT NULL,
    id     bigint NOT NULL,
    PRIMARY KEY (tenant, id)
);
-- The copy run that may write a tenant's tables into a target schema (see copy_fence.rs).
CREATE TABLE IF NOT EXISTS pgtenant.copy_run (
    tenant text NOT NULL,
    dest   text NOT NULL,
    run    text NOT NULL,
    PRIMARY KEY (tenant, dest)
);
-- The newest lease generation that claimed each apply or copy lock here (see claim.rs).
CREATE TABLE IF NOT EXISTS pgtenant.claim_generation (
    lock       text PRIMARY KEY,
    generation bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS pgtenant.guarded (
    schema_name text NOT NULL,
    tenant      text NOT NULL,
    PRIMARY KEY (schema_name, tenant)
);
-- Several tenants of one schema (shared tables) may migrate at once: one guard row each.
DO $up$ BEGIN
    IF (SELECT array_length(conkey, 1) FROM pg_constraint
         WHERE conrelid = 'pgtenant.guarded'::regclass AND contype = 'p') = 1 THEN
        ALTER TABLE pgtenant.guarded DROP CONSTRAINT guarded_pkey, ADD PRIMARY KEY (schema_name, tenant);
    END IF;
END $up$;
-- Tenants whose writes are refused here: they have moved to another backend.
CREATE TABLE IF NOT EXISTS pgtenant.fenced (
    tenant     text PRIMARY KEY,
    reason     text NOT NULL,
    -- Schema tenants keep their DDL guard while fenced, so a tenant role owning its tables cannot drop the
    -- fence; shared tables (whose schema other tenants use) do not.
    keep_guard boolean NOT NULL DEFAULT true,
    since      timestamptz NOT NULL DEFAULT now()
);
-- The key the migration's own connections present; readable by the admin role only.
CREATE TABLE IF NOT EXISTS pgtenant.apply_key (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    k   text NOT NULL
);
INSERT INTO pgtenant.apply_key (k)
    VALUES (encode(sha256(convert_to(gen_random_uuid()::text || gen_random_uuid()::text || clock_timestamp()::text, 'UTF8')), 'hex'))
    ON CONFLICT DO NOTHING;
REVOKE ALL ON ALL TABLES IN SCHEMA pgtenant FROM PUBLIC;
-- Whether this session is the migration's own: it set the key. Cheap for everyone else (no key set).
CREATE OR REPLACE FUNCTION pgtenant.is_applier() RETURNS boolean LANGUAGE plpgsql STABLE
    SECURITY DEFINER SET search_path = pg_catalog AS $fn$
DECLARE
    given text := current_setting('pgtenant.apply_key', true);
BEGIN
    IF given IS NULL OR given = '' THEN
        RETURN false;
    END IF;
    RETURN given = (SELECT k FROM pgtenant.apply_key);
END
$fn$;
REVOKE ALL ON FUNCTION pgtenant.is_applier() FROM PUBLIC;
-- The word to the proxy that this transaction wrote a migrating tenant's rows where no command tag tells it: in a
-- function called by a SELECT, a procedure, a DO block. The proxy holds the transaction's commit for the
-- synchronous tee on hearing it, and takes it out of the stream (a client connected straight to the server hears
-- it). Called by capture() at the transaction's first captured row (then a transaction-local flag holds the
-- transaction's id, which a default set for a role or database cannot foresee), unless the client's statement
-- is itself one INSERT, UPDATE, DELETE or MERGE, whose tag tells (a FunctionCall message has no statement text:
-- it is noted; so is a text of several statements, where the first one's tag may belong to an earlier
-- transaction than this write's). At NOTICE whatever the session's client_min_messages. A session that sets the flag to its own
-- transaction's id only loses the wait for its own commit.
CREATE OR REPLACE FUNCTION pgtenant.note() RETURNS void LANGUAGE plpgsql
    SET search_path = pg_catalog SET client_min_messages = notice AS $fn$
BEGIN
    RAISE NOTICE 'pgtenant: change captured for a tenant being migrated' USING ERRCODE = 'PT001';
END
$fn$;
REVOKE ALL ON FUNCTION pgtenant.note() FROM PUBLIC;
-- Row images are written as the client's session would print them: its float precision and interval style
-- would change the values (0.30000000000000004 logged as 0.3; an all-negative interval read back as a mixed
-- one), and a table without a key is matched on the old image. So capture() prints them one exact way. (No
-- measurable cost: benches/triggers.sh.)
CREATE OR REPLACE FUNCTION pgtenant.capture() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog SET extra_float_digits = 3 SET IntervalStyle = postgres
    SET DateStyle = 'ISO, MDY' AS $fn$
DECLARE
    was boolean;
    now_is boolean;
BEGIN
    -- The migration's own writes (applied changes, copies, repairs) are not captured again. A session that set
    -- no key is not one of them and is told so without the call: that SECURITY DEFINER call per row was about
    -- a quarter of what the triggers cost a TPC-B transaction. A session that set a key has it checked.
    IF coalesce(current_setting('pgtenant.apply_key', true), '') <> '' AND pgtenant.is_applier() THEN
        RETURN NULL;
    END IF;
    -- Shared tables (arguments: tenant, tenant column, tenant's value): only the tenant's rows. A row that leaves
    -- the tenant is a delete for it, one that joins it an insert.
    IF TG_NARGS >= 3 AND TG_LEVEL = 'ROW' THEN
        was := TG_OP <> 'INSERT' AND to_jsonb(OLD)->>TG_ARGV[1] IS NOT DISTINCT FROM TG_ARGV[2];
        now_is := TG_OP <> 'DELETE' AND to_jsonb(NEW)->>TG_ARGV[1] IS NOT DISTINCT FROM TG_ARGV[2];
        IF NOT was AND NOT now_is THEN
            RETURN NULL;
        END IF;
    END IF;
    IF current_setting('pgtenant.noted', true) IS DISTINCT FROM pg_current_xact_id()::text THEN
        PERFORM set_config('pgtenant.noted', pg_current_xact_id()::text, true);
        IF coalesce(current_query(), '') !~* '^[[:space:]]*(insert|update|delete|merge)[[:space:]][^;]*;?[[:space:]]*$' THEN
            PERFORM pgtenant.note();
        END IF;
    END IF;
    IF TG_NARGS >= 3 AND TG_LEVEL = 'ROW' THEN
        IF TG_OP = 'UPDATE' AND NOT now_is THEN
            INSERT INTO pgtenant.change_log (tenant, tbl, op, old_row)
            VALUES (TG_ARGV[0], TG_TABLE_NAME, 'D', to_jsonb(OLD));
            RETURN NULL;
        ELSIF TG_OP = 'UPDATE' AND NOT was THEN
            INSERT INTO pgtenant.change_log (tenant, tbl, op, new_row)
            VALUES (TG_ARGV[0], TG_TABLE_NAME, 'I', to_jsonb(NEW));
            RETURN NULL;
        END IF;
    END IF;
    IF TG_LEVEL = 'STATEMENT' THEN
        INSERT INTO pgtenant.change_log (tenant, tbl, op) VALUES (TG_ARGV[0], TG_TABLE_NAME, 'T');
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO pgtenant.change_log (tenant, tbl, op, new_row)
        VALUES (TG_ARGV[0], TG_TABLE_NAME, 'I', to_jsonb(NEW));
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO pgtenant.change_log (tenant, tbl, op, old_row, new_row)
        VALUES (TG_ARGV[0], TG_TABLE_NAME, 'U', to_jsonb(OLD), to_jsonb(NEW));
    ELSE
        INSERT INTO pgtenant.change_log (tenant, tbl, op, old_row)
        VALUES (TG_ARGV[0], TG_TABLE_NAME, 'D', to_jsonb(OLD));
    END IF;
    RETURN NULL;
END
$fn$;
CREATE OR REPLACE FUNCTION pgtenant.fence() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog AS $fn$
DECLARE
    why text;
BEGIN
    -- Shared tables (arguments: tenant, tenant column, tenant's value): only writes touching the tenant's rows.
    IF TG_NARGS >= 3 AND TG_LEVEL = 'ROW' THEN
        IF NOT ((TG_OP <> 'INSERT' AND to_jsonb(OLD)->>TG_ARGV[1] IS NOT DISTINCT FROM TG_ARGV[2])
             OR (TG_OP <> 'DELETE' AND to_jsonb(NEW)->>TG_ARGV[1] IS NOT DISTINCT FROM TG_ARGV[2])) THEN
            RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
        END IF;
    END IF;
    SELECT reason INTO why FROM pgtenant.fenced WHERE tenant = TG_ARGV[0];
    IF FOUND AND NOT pgtenant.is_applier() THEN
        RAISE EXCEPTION 'pgtenant: tenant "%" has moved (%); writes to its old location are refused', TG_ARGV[0], why
            USING ERRCODE = '55000', HINT = 'Connect through pgtenant, which routes the tenant to where it lives now.';
    END IF;
    IF TG_LEVEL = 'ROW' THEN
        RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
    END IF;
    RETURN NULL;
END
$fn$;
CREATE OR REPLACE FUNCTION pgtenant.ddl_guard() RETURNS event_trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog AS $fn$
DECLARE
    hit record;
BEGIN
    IF pgtenant.is_applier() THEN
        RETURN;
    END IF;
    IF TG_EVENT = 'sql_drop' THEN
        SELECT g.* INTO hit FROM pg_event_trigger_dropped_objects() d
          JOIN pgtenant.guarded g ON g.schema_name = d.schema_name OR (d.object_type = 'schema' AND g.schema_name = d.object_name)
         LIMIT 1;
    ELSE
        SELECT g.* INTO hit FROM pg_event_trigger_ddl_commands() d
          JOIN pgtenant.guarded g ON g.schema_name = d.schema_name LIMIT 1;
    END IF;
    IF FOUND THEN
        RAISE EXCEPTION 'pgtenant: DDL on schema "%" is refused while tenant "%" is being migrated or has moved away', hit.schema_name, hit.tenant
            USING ERRCODE = '55000', HINT = 'Pause the move and apply the change on both sides (README: schema changes during a move), or finish or abort the migration first.';
    END IF;
END
$fn$;
DO $do$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'pgtenant_ddl_guard') THEN
        CREATE EVENT TRIGGER pgtenant_ddl_guard ON ddl_command_end EXECUTE FUNCTION pgtenant.ddl_guard();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'pgtenant_drop_guard') THEN
        CREATE EVENT TRIGGER pgtenant_drop_guard ON sql_drop EXECUTE FUNCTION pgtenant.ddl_guard();
    END IF;
END
$do$;
-- Also under session_replication_role = replica.
ALTER EVENT TRIGGER pgtenant_ddl_guard ENABLE ALWAYS;
ALTER EVENT TRIGGER pgtenant_drop_guard ENABLE ALWAYS;
"#;

/// Creates the shared objects (change log, ledger, fence, functions, DDL guard) on `client`'s database, and
/// makes `client` one of the migration's own connections.
pub async fn setup(client: &Client) -> Result<(), MigrateError> {
    // Two coordinators creating the schema at once can collide on the catalog; the lock makes it one at a time.
    let sql = format!("SELECT pg_advisory_xact_lock(7406721); {SETUP}");
    let mut tx_sql = String::from("BEGIN;");
    tx_sql.push_str(&sql);
    tx_sql.push_str("COMMIT;");
    client
        .batch_execute(&tx_sql)
        .await
        .map_err(|e| MigrateError::pg("install pgtenant schema", e))?;
    super::pg::present_key(client).await
}

fn trigger_name(tenant: &str, kind: &str) -> String {
    quote_ident(&raw_trigger_name(tenant, kind))
}

/// `pgtenant_<kind>_<tenant>`, shortened with a hash when it would pass PostgreSQL's 63-byte identifier limit
/// (which would truncate it, and then `remove` would look for a name that does not exist).
fn raw_trigger_name(tenant: &str, kind: &str) -> String {
    let name = format!("pgtenant_{kind}_{tenant}");
    if name.len() <= 63 {
        return name;
    }
    use sha2::Digest;
    let hash = crate::state::hex(&sha2::Sha256::digest(tenant.as_bytes()));
    format!(
        "pgtenant_{kind}_{}_{}",
        tenant.get(..30).unwrap_or(tenant),
        &hash[..12]
    )
}

/// Installs capture on every table of `side` for `tenant`, and guards the schema against DDL, in one
/// transaction: either all of it is there or none of it.
pub async fn install(
    client: &Client,
    side: &Endpoint,
    tenant: &str,
    tables: &[String],
    stop: &tokio_util::sync::CancellationToken,
) -> Result<(), MigrateError> {
    setup(client).await?;
    let sql = install_sql(side, tenant, tables);
    // All tables are locked up front with a short lock_timeout, and the whole transaction is retried when that
    // times out: waiting while holding some of the locks could deadlock with an application transaction, and
    // then PostgreSQL might pick the application as the victim.
    let mut tries = 0;
    loop {
        let Err(e) = client.batch_execute(&sql).await else {
            return Ok(());
        };
        let _ = client.batch_execute("ROLLBACK").await;
        let busy = e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE);
        tries += 1;
        if !busy || tries >= LOCK_TRIES {
            return Err(MigrateError::pg("install capture triggers", e));
        }
        if stop.is_cancelled() {
            return Err(MigrateError::Cancelled);
        }
        let jitter = rand::random::<u64>() % 50;
        tokio::time::sleep(std::time::Duration::from_millis(20 + jitter)).await;
    }
}

/// The install transaction: the tables locked, then per table the capture, truncate and fence triggers.
fn install_sql(side: &Endpoint, tenant: &str, tables: &[String]) -> String {
    let arg = quote_literal(tenant);
    // Shared tables: the trigger keeps only the tenant's rows (and a TRUNCATE, which would empty the table for
    // every tenant, is not captured).
    let row_args = match &side.filter {
        None => arg.clone(),
        Some(f) => format!(
            "{arg}, {}, {}",
            quote_literal(&f.column),
            quote_literal(&f.key)
        ),
    };
    let list: Vec<String> = tables.iter().map(|t| side.qualified(t)).collect();
    let mut sql = format!(
        "BEGIN; SET LOCAL lock_timeout = '{LOCK_WAIT_MS}ms'; LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE;",
        list.join(", ")
    );
    let (capture, truncate, fence) = (
        trigger_name(tenant, "capture"),
        trigger_name(tenant, "truncate"),
        trigger_name(tenant, "fence"),
    );
    for t in tables {
        let q = side.qualified(t);
        // CREATE OR REPLACE: a retry after a crash that left the triggers in place succeeds. ENABLE ALWAYS:
        // they fire under session_replication_role = replica too.
        sql.push_str(&format!(
            "CREATE OR REPLACE TRIGGER {capture} AFTER INSERT OR UPDATE OR DELETE ON {q} FOR EACH ROW \
             EXECUTE FUNCTION pgtenant.capture({row_args}); ALTER TABLE {q} ENABLE ALWAYS TRIGGER {capture};"
        ));
        if side.filter.is_none() {
            sql.push_str(&format!(
                "CREATE OR REPLACE TRIGGER {truncate} AFTER TRUNCATE ON {q} FOR EACH STATEMENT \
                 EXECUTE FUNCTION pgtenant.capture({arg}); ALTER TABLE {q} ENABLE ALWAYS TRIGGER {truncate};\
                 CREATE OR REPLACE TRIGGER {fence} BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON {q} \
                 FOR EACH STATEMENT EXECUTE FUNCTION pgtenant.fence({arg});"
            ));
        } else {
            // Shared tables: only writes to the tenant's rows are fenced.
            sql.push_str(&format!(
                "CREATE OR REPLACE TRIGGER {fence} BEFORE INSERT OR UPDATE OR DELETE ON {q} \
                 FOR EACH ROW EXECUTE FUNCTION pgtenant.fence({row_args});"
            ));
        }
        sql.push_str(&format!("ALTER TABLE {q} ENABLE ALWAYS TRIGGER {fence};"));
    }
    sql.push_str(&format!(
        "INSERT INTO pgtenant.guarded (schema_name, tenant) VALUES ({}, {arg}) \
         ON CONFLICT (schema_name, tenant) DO NOTHING; COMMIT;",
        quote_literal(&side.schema)
    ));
    sql
}

/// How long the capture install waits for the tables' locks before it backs off and tries again.
const LOCK_WAIT_MS: u64 = 100;
const LOCK_TRIES: u32 = 300;

/// Removes capture for `tenant` on this database (triggers, change log, ledger). The fence stays while the
/// tenant is fenced here (see [`fence`]); otherwise its triggers go too. Finds the triggers by name, so it
/// works whatever state the migration was left in.
pub async fn remove(client: &Client, tenant: &str) -> Result<(), MigrateError> {
    remove_inner(client, tenant, true).await
}

/// Like [`remove`] but keeps the tenant's ledger rows here (they guard the other direction's applies).
pub async fn remove_triggers(client: &Client, tenant: &str) -> Result<(), MigrateError> {
    remove_inner(client, tenant, false).await
}

/// `DROP TRIGGER` statements for `tenant`'s triggers of the given kinds on this database.
async fn drop_statements(
    client: &Client,
    tenant: &str,
    kinds: &[&str],
) -> Result<Vec<String>, MigrateError> {
    let names: Vec<String> = kinds.iter().map(|k| raw_trigger_name(tenant, k)).collect();
    let rows = client
        .query(
            "SELECT format('DROP TRIGGER %I ON %I.%I', t.tgname, n.nspname, c.relname)
               FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE t.tgname = ANY($1)",
            &[&names],
        )
        .await
        .map_err(|e| MigrateError::pg("find pgtenant triggers", e))?;
    Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
}

/// Whether the migration's objects exist here, and whether `tenant` is fenced here.
async fn fenced_here(client: &Client, tenant: &str) -> Result<(bool, bool), MigrateError> {
    let row = client
        .query_one(
            "SELECT to_regclass('pgtenant.fenced') IS NOT NULL,
                    CASE WHEN to_regclass('pgtenant.fenced') IS NOT NULL THEN
                      (xpath('/row/n/text()', query_to_xml(format('SELECT count(*) AS n FROM pgtenant.fenced WHERE tenant = %L', $1::text), false, true, '')))[1]::text::int > 0
                    ELSE false END",
            &[&tenant],
        )
        .await
        .map_err(|e| MigrateError::pg("look for the fence", e))?;
    Ok((row.get(0), row.get(1)))
}

async fn remove_inner(client: &Client, tenant: &str, ledger: bool) -> Result<(), MigrateError> {
    let (installed, fenced) = fenced_here(client, tenant).await?;
    let kinds: &[&str] = if fenced {
        &["capture", "truncate"]
    } else {
        &["capture", "truncate", "fence"]
    };
    let mut sql = String::from("BEGIN;");
    for stmt in drop_statements(client, tenant, kinds).await? {
        sql.push_str(&stmt);
        sql.push(';');
    }
    if installed {
        let arg = quote_literal(tenant);
        sql.push_str(&format!(
            "DELETE FROM pgtenant.change_log WHERE tenant = {arg};\
             DELETE FROM pgtenant.guarded g WHERE tenant = {arg} AND NOT EXISTS \
               (SELECT 1 FROM pgtenant.fenced f WHERE f.tenant = g.tenant AND f.keep_guard);"
        ));
        if ledger {
            sql.push_str(&format!(
                "DELETE FROM pgtenant.applied WHERE tenant = {arg};"
            ));
        }
    }
    sql.push_str("COMMIT;");
    run_tx(client, &sql, "remove capture").await
}

/// Fences `tenant` here: from this commit on, its writes on this database fail (`55000`) for everyone but the
/// migration's own connections. `keep_guard`: the tenant's schema keeps refusing DDL meanwhile (schema
/// tenants), so the fence cannot be dropped by a tenant role that owns its tables.
pub async fn fence(
    client: &Client,
    tenant: &str,
    reason: &str,
    keep_guard: bool,
) -> Result<(), MigrateError> {
    let sql = format!(
        "INSERT INTO pgtenant.fenced (tenant, reason, keep_guard) VALUES ({t}, {r}, {keep_guard}) \
         ON CONFLICT (tenant) DO UPDATE SET reason = EXCLUDED.reason, keep_guard = EXCLUDED.keep_guard, since = now()",
        t = quote_literal(tenant),
        r = quote_literal(reason),
    );
    client
        .batch_execute(&sql)
        .await
        .map_err(|e| MigrateError::pg("fence the old side", e))
}

/// Writers that started before [`fence`] went up and may still commit here: transactions holding a write lock
/// on one of the tenant's fenced tables that began before `$2`, and prepared transactions (no pid) holding
/// one. The fence is checked by a trigger (per statement on the tenant's own tables, per row on shared ones)
/// reading `pgtenant.fenced` with the statement's snapshot, in `REPEATABLE READ` the transaction's; so these
/// passed it: a client that dropped its socket mid-statement (its gate pass is back), a direct connection, a
/// `PREPARE TRANSACTION` waiting for its `COMMIT PREPARED`.
///
/// Also counted: transactions that began before the fence and keep one snapshot across statements
/// (`REPEATABLE READ`, `SERIALIZABLE`), which may not have touched the tenant's tables yet but will not see the
/// fence when they do. They show as a snapshot held while idle in the transaction, or while running a statement
/// that is not the transaction's first. (A `READ COMMITTED` statement takes a new snapshot, and its table locks
/// at its start: one that started before the fence and holds none will not write the tenant's tables.)
const WRITERS_BEFORE_FENCE: &str = "SELECT count(DISTINCT coalesce(l.pid::text, l.virtualtransaction)) \
     FROM pg_locks l JOIN pg_trigger t ON t.tgrelid = l.relation AND t.tgname = $1 \
     LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
     WHERE l.locktype = 'relation' AND l.granted \
       AND l.mode IN ('RowExclusiveLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock') \
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
       AND l.pid IS DISTINCT FROM pg_backend_pid() \
       AND (l.pid IS NULL OR a.xact_start < $2::text::timestamptz) \
     UNION ALL SELECT count(*) FROM pg_stat_activity a \
     WHERE a.datname = current_database() AND a.backend_type = 'client backend' \
       AND a.pid <> pg_backend_pid() AND a.backend_xmin IS NOT NULL \
       AND a.xact_start < $2::text::timestamptz \
       AND (a.state = 'idle in transaction' OR (a.state = 'active' AND a.query_start > a.xact_start))";

/// After [`fence`]: waits until no writer that passed the fence before it went up is still open, so that
/// whatever they commit is in the change log before the final drain, not on the old side after the swap. Runs
/// with the tenant's gate closed; bounded by `deadline` (then the cutover falls back, as behind any
/// long transaction).
pub async fn wait_for_writers(
    client: &Client,
    tenant: &str,
    deadline: std::time::Instant,
) -> Result<(), MigrateError> {
    let trigger = raw_trigger_name(tenant, "fence");
    // A little before the cutover's own limit, so that the operator reads why it fell back.
    let give_up = deadline
        .checked_sub(std::time::Duration::from_millis(200))
        .unwrap_or(deadline);
    let fenced_at: String = client
        .query_one("SELECT clock_timestamp()::text", &[])
        .await
        .map_err(|e| MigrateError::pg("read the fence's time", e))?
        .get(0);
    loop {
        let open: i64 = client
            .query(WRITERS_BEFORE_FENCE, &[&trigger, &fenced_at])
            .await
            .map_err(|e| MigrateError::pg("look for writers from before the fence", e))?
            .iter()
            .map(|r| r.get::<_, i64>(0))
            .sum();
        if open == 0 {
            return Ok(());
        }
        if std::time::Instant::now() >= give_up {
            return Err(MigrateError::Timeout(format!(
                "{open} transaction(s) that wrote the tenant's tables before the fence still open on the source \
                 (a client gone mid-statement, a direct connection or a prepared transaction)"
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Lets `tenant`'s writes through here again (its fence triggers stay, inactive, while capture is installed).
pub async fn unfence(client: &Client, tenant: &str) -> Result<(), MigrateError> {
    let (installed, _) = fenced_here(client, tenant).await?;
    if !installed {
        return Ok(());
    }
    client
        .execute("DELETE FROM pgtenant.fenced WHERE tenant = $1", &[&tenant])
        .await
        .map_err(|e| MigrateError::pg("unfence", e))?;
    Ok(())
}

/// Removes the fence for good: its triggers, its row and the guard it kept (with the data it protected).
pub async fn remove_fence(client: &Client, tenant: &str) -> Result<(), MigrateError> {
    let (installed, _) = fenced_here(client, tenant).await?;
    let mut sql = String::from("BEGIN;");
    for stmt in drop_statements(client, tenant, &["fence"]).await? {
        sql.push_str(&stmt);
        sql.push(';');
    }
    if installed {
        let arg = quote_literal(tenant);
        sql.push_str(&format!(
            "DELETE FROM pgtenant.fenced WHERE tenant = {arg}; DELETE FROM pgtenant.guarded WHERE tenant = {arg};"
        ));
    }
    sql.push_str("COMMIT;");
    run_tx(client, &sql, "remove the fence").await
}

async fn run_tx(client: &Client, sql: &str, what: &str) -> Result<(), MigrateError> {
    if let Err(e) = client.batch_execute(sql).await {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(MigrateError::pg(what, e));
    }
    Ok(())
}

/// Entries of `tenant` waiting in this database's change log.
pub async fn backlog(client: &Client, tenant: &str) -> Result<u64, MigrateError> {
    let row = client
        .query_one(
            "SELECT count(*) FROM pgtenant.change_log WHERE tenant = $1",
            &[&tenant],
        )
        .await
        .map_err(|e| MigrateError::pg("count change log", e))?;
    Ok(row.get::<_, i64>(0).max(0) as u64)
}
