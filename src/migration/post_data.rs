//! A target schema the move makes gets pg_dump's `pre-data` at start (tables, sequences, types, functions) and
//! its `post-data` (indexes, constraints, triggers, policies) once the copy is done, as a restore does: rows
//! load into bare tables about twice as fast. At start the post-data is tried on the still-empty tables and
//! rolled back, so what the target cannot take fails the start, not the end of a long copy.

use std::time::Duration;

use tokio_postgres::Client;

use super::pg::{dump_schema, Endpoint};
use super::MigrateError;
use crate::quote::quote_literal;

const DUMP_TIMEOUT: Duration = Duration::from_secs(120);

/// The source schema's `pre-data` and `post-data` DDL.
pub async fn dump(pg_dump: &str, source: &Endpoint) -> Result<(String, String), MigrateError> {
    let pre = section(pg_dump, source, "pre-data").await?;
    let post = section(pg_dump, source, "post-data").await?;
    Ok((pre, post))
}

/// One section of `pg_dump --schema-only` of the source schema.
async fn section(pg_dump: &str, source: &Endpoint, name: &str) -> Result<String, MigrateError> {
    dump_schema(
        pg_dump,
        source,
        &[format!("--section={name}")],
        DUMP_TIMEOUT,
    )
    .await
}

/// Makes the target schema from `pre` in one transaction, after trying `post` on it and rolling that back.
pub async fn create(dst: &Client, pre: &str, post: &str) -> Result<(), MigrateError> {
    // Rolled back whatever it holds: only whether the target takes it matters here.
    let sql = format!(
        "BEGIN;\n{pre}\nSAVEPOINT pgtenant_post_data;\n{post}\nROLLBACK TO SAVEPOINT pgtenant_post_data;\nCOMMIT;"
    );
    if let Err(e) = dst.batch_execute(&sql).await {
        let _ = dst.batch_execute("ROLLBACK").await;
        return Err(MigrateError::pg("create the target schema from pg_dump", e));
    }
    Ok(())
}

/// After the copy: the source schema's post-data on the target, in one transaction with a marker naming this
/// move (`migration`), so a restart after the commit does not run it twice.
pub async fn apply(
    pg_dump: &str,
    migration: &str,
    source: &Endpoint,
    target: &Endpoint,
) -> Result<(), MigrateError> {
    let dst = target.connect().await?;
    if done(&dst, &target.schema, migration).await? {
        return Ok(());
    }
    let post = section(pg_dump, source, "post-data").await?;
    let marker = format!(
        "CREATE SCHEMA IF NOT EXISTS pgtenant; \
         CREATE TABLE IF NOT EXISTS pgtenant.post_data_done (schema_name text, migration text, \
         at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (schema_name, migration)); \
         INSERT INTO pgtenant.post_data_done (schema_name, migration) VALUES ({}, {});",
        quote_literal(&target.schema),
        quote_literal(migration)
    );
    dst.batch_execute(&format!(
        "BEGIN;\n{post}\n{}\n{marker}\nCOMMIT;",
        drop_pgtenant_triggers_sql(&target.schema)
    ))
    .await
    .map_err(|e| MigrateError::pg("make the target's indexes and constraints", e))
}

async fn done(dst: &Client, schema: &str, migration: &str) -> Result<bool, MigrateError> {
    let pg = |e| MigrateError::pg("look for the post-data marker", e);
    let exists: bool = dst
        .query_one(
            "SELECT to_regclass('pgtenant.post_data_done') IS NOT NULL",
            &[],
        )
        .await
        .map_err(pg)?
        .get(0);
    if !exists {
        return Ok(false);
    }
    dst.query_one(
        "SELECT EXISTS (SELECT 1 FROM pgtenant.post_data_done WHERE schema_name = $1 AND migration = $2)",
        &[&schema, &migration],
    )
    .await
    .map(|r| r.get(0))
    .map_err(pg)
}

/// Drops every trigger on `schema`'s tables (which the move made, so the dump brought them all) that runs a
/// function of the `pgtenant` schema: the source's capture and fence triggers (this move's, another tenant's
/// moving at the same time, a fence left where a tenant moved away) are the source's, never the target's.
fn drop_pgtenant_triggers_sql(schema: &str) -> String {
    format!(
        "DO $pgtenant$ DECLARE r record; BEGIN \
         FOR r IN SELECT t.tgname, c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_proc p ON p.oid = t.tgfoid \
         JOIN pg_namespace pn ON pn.oid = p.pronamespace \
         WHERE pn.nspname = 'pgtenant' AND NOT t.tgisinternal AND n.nspname = {s} LOOP \
         EXECUTE format('DROP TRIGGER %I ON %I.%I', r.tgname, {s}, r.relname); END LOOP; END $pgtenant$;",
        s = quote_literal(schema)
    )
}
