//! Change capture: row-image triggers on the tenant's tables that write into `pgtenant.change_log` inside the
//! writing transaction, the `pgtenant.applied` ledger that makes applying exactly-once, and the DDL guard.
//!
//! Everything is named after the tenant (`pgtenant_capture_<tenant>`), so `abort` and `finalize` find and drop
//! it by name even if the record's table list were stale. Applying runs with `session_replication_role =
//! replica`, under which these (ordinary) triggers do not fire: applied changes are never captured again.

use tokio_postgres::Client;

use super::pg::Endpoint;
use super::MigrateError;
use crate::tenant::quote_ident;

/// The shared objects; idempotent, safe to run while other tenants migrate.
const SETUP: &str = r#"
CREATE SCHEMA IF NOT EXISTS pgtenant;
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
CREATE OR REPLACE FUNCTION pgtenant.capture() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    was boolean;
    now_is boolean;
BEGIN
    -- Shared tables (arguments: tenant, tenant column, tenant's value): only the tenant's rows. A row that leaves
    -- the tenant is a delete for it, one that joins it an insert.
    IF TG_NARGS >= 3 AND TG_LEVEL = 'ROW' THEN
        was := TG_OP <> 'INSERT' AND to_jsonb(OLD)->>TG_ARGV[1] IS NOT DISTINCT FROM TG_ARGV[2];
        now_is := TG_OP <> 'DELETE' AND to_jsonb(NEW)->>TG_ARGV[1] IS NOT DISTINCT FROM TG_ARGV[2];
        IF NOT was AND NOT now_is THEN
            RETURN NULL;
        ELSIF TG_OP = 'UPDATE' AND NOT now_is THEN
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
CREATE OR REPLACE FUNCTION pgtenant.ddl_guard() RETURNS event_trigger LANGUAGE plpgsql AS $fn$
DECLARE
    hit record;
BEGIN
    IF coalesce(current_setting('pgtenant.bypass_ddl_guard', true), '') = 'on' THEN
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
        RAISE EXCEPTION 'pgtenant: DDL on schema "%" is refused while tenant "%" is being migrated', hit.schema_name, hit.tenant
            USING ERRCODE = '55000', HINT = 'Finish or abort the migration (pgtenant ctl migrate ...) first.';
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
"#;

/// Creates the shared objects (change log, ledger, functions, DDL guard) on `client`'s database.
pub async fn setup(client: &Client) -> Result<(), MigrateError> {
    // Two coordinators creating the schema at once can collide on the catalog; the lock makes it one at a time.
    let sql = format!("SELECT pg_advisory_xact_lock(7406721); {SETUP}");
    let mut tx_sql = String::from("BEGIN;");
    tx_sql.push_str(&sql);
    tx_sql.push_str("COMMIT;");
    client
        .batch_execute(&tx_sql)
        .await
        .map_err(|e| MigrateError::pg("install pgtenant schema", e))
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
    // All tables are locked up front with a short lock_timeout, and the whole transaction is retried when that
    // times out: waiting while holding some of the locks could deadlock with an application transaction, and
    // then PostgreSQL might pick the application as the victim.
    let list: Vec<String> = tables.iter().map(|t| side.qualified(t)).collect();
    let mut sql = format!(
        "BEGIN; SET LOCAL lock_timeout = '{LOCK_WAIT_MS}ms'; LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE;",
        list.join(", ")
    );
    for t in tables {
        let q = side.qualified(t);
        // CREATE OR REPLACE: a retry after a crash that left the triggers in place succeeds.
        sql.push_str(&format!(
            "CREATE OR REPLACE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {q} FOR EACH ROW \
             EXECUTE FUNCTION pgtenant.capture({row_args});",
            trigger_name(tenant, "capture"),
        ));
        if side.filter.is_none() {
            sql.push_str(&format!(
                "CREATE OR REPLACE TRIGGER {} AFTER TRUNCATE ON {q} FOR EACH STATEMENT \
                 EXECUTE FUNCTION pgtenant.capture({arg});",
                trigger_name(tenant, "truncate"),
            ));
        }
    }
    sql.push_str(&format!(
        "INSERT INTO pgtenant.guarded (schema_name, tenant) VALUES ({}, {arg}) \
         ON CONFLICT (schema_name, tenant) DO NOTHING; COMMIT;",
        quote_literal(&side.schema)
    ));
    let mut tries = 0;
    loop {
        match client.batch_execute(&sql).await {
            Ok(()) => return Ok(()),
            Err(e) => {
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
    }
}

/// How long the capture install waits for the tables' locks before it backs off and tries again.
const LOCK_WAIT_MS: u64 = 100;
const LOCK_TRIES: u32 = 300;

/// Removes everything [`install`] made for `tenant` on this database, and the tenant's change log and ledger
/// rows. Finds the triggers by name, so it works whatever state the migration was left in.
pub async fn remove(client: &Client, tenant: &str) -> Result<(), MigrateError> {
    remove_inner(client, tenant, true).await
}

/// Like [`remove`] but keeps the tenant's ledger rows here (they guard the other direction's applies).
pub async fn remove_triggers(client: &Client, tenant: &str) -> Result<(), MigrateError> {
    remove_inner(client, tenant, false).await
}

async fn remove_inner(client: &Client, tenant: &str, ledger: bool) -> Result<(), MigrateError> {
    let installed: bool = client
        .query_one("SELECT to_regclass('pgtenant.change_log') IS NOT NULL", &[])
        .await
        .map_err(|e| MigrateError::pg("look for capture", e))?
        .get(0);
    let rows = client
        .query(
            "SELECT format('DROP TRIGGER %I ON %I.%I', t.tgname, n.nspname, c.relname)
               FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE t.tgname IN ($1, $2)",
            &[
                &raw_trigger_name(tenant, "capture"),
                &raw_trigger_name(tenant, "truncate"),
            ],
        )
        .await
        .map_err(|e| MigrateError::pg("find capture triggers", e))?;
    let mut sql = String::from("BEGIN;");
    for r in &rows {
        let stmt: String = r.get(0);
        sql.push_str(&stmt);
        sql.push(';');
    }
    if installed {
        let arg = quote_literal(tenant);
        sql.push_str(&format!(
            "DELETE FROM pgtenant.change_log WHERE tenant = {arg};\
             DELETE FROM pgtenant.guarded WHERE tenant = {arg};"
        ));
        if ledger {
            sql.push_str(&format!(
                "DELETE FROM pgtenant.applied WHERE tenant = {arg};"
            ));
        }
    }
    sql.push_str("COMMIT;");
    if let Err(e) = client.batch_execute(&sql).await {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(MigrateError::pg("remove capture", e));
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

/// A SQL string literal (standard_conforming_strings is on in every supported server).
pub fn quote_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars().filter(|&c| c != '\0') {
        if c == '\'' {
            out.push('\'');
        }
        out.push(c);
    }
    out.push('\'');
    out
}
