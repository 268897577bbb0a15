//! Coordinator connections to backends (tokio-postgres): one side of a migration is a backend, a database on it
//! and the tenant's schema.

use std::time::Duration;

use tokio_postgres::{Client, NoTls};
use tracing::debug;

use super::MigrateError;
use crate::config::{BackendConfig, SslMode};
use crate::quote::{quote_ident, quote_literal};
use crate::routing::BackendId;

/// Settings every coordinator session uses: text forms that compare equal on both sides (hashes are over row
/// text), and synchronous commit: exactly-once rests on the order "applied on the target, then deleted from
/// the log, then ledger trimmed", which a server running with `synchronous_commit = off` could lose on a crash.
/// (Our own DDL and writes get past the guard, capture and fence by the apply key, see `capture`.)
/// `standard_conforming_strings` is set because `quote_literal` doubles quotes only: a database or role default
/// of `off` would make a backslash in a value an escape.
const SESSION_SETUP: &str =
    "SET standard_conforming_strings = on; SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; \
     SET IntervalStyle = 'postgres'; SET extra_float_digits = 3; SET bytea_output = 'hex'; \
     SET lock_timeout = '10s'; SET synchronous_commit = on; \
     SET statement_timeout = '300s'; SET idle_in_transaction_session_timeout = '600s'";

/// Where one side of a migration lives.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub backend: BackendId,
    pub config: BackendConfig,
    pub database: String,
    pub schema: String,
    /// Shared tables: only the rows whose `column` holds `key` are the tenant's.
    pub filter: Option<Filter>,
}

/// The tenant's rows in shared tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub column: String,
    pub key: String,
}

impl Endpoint {
    /// `"schema"."table"`: the table itself (to write to, lock, trigger on, or name its row type).
    pub fn qualified(&self, table: &str) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(table))
    }

    /// The tenant's rows of `table`, for a FROM clause (give it an alias): the table, or for shared tables a
    /// subquery that keeps only the tenant's rows.
    pub fn rows(&self, table: &str) -> String {
        match &self.filter {
            None => self.qualified(table),
            Some(_) => format!(
                "(SELECT * FROM {}{})",
                self.qualified(table),
                self.tenant_where()
            ),
        }
    }

    /// ` WHERE column::text = 'key'` for shared tables, else nothing. The column's text form is compared, as
    /// the capture trigger does (it sees the row as JSON), so both agree for every column type.
    pub fn tenant_where(&self) -> String {
        self.tenant_cond("")
            .map(|c| format!(" WHERE {c}"))
            .unwrap_or_default()
    }

    /// ` AND alias.column::text = 'key'` for shared tables, else nothing: applied changes touch only the
    /// tenant's rows, even where another tenant's row on the target has the same key.
    pub fn tenant_and(&self, alias: &str) -> String {
        self.tenant_cond(&format!("{alias}."))
            .map(|c| format!(" AND {c}"))
            .unwrap_or_default()
    }

    fn tenant_cond(&self, prefix: &str) -> Option<String> {
        self.filter.as_ref().map(|f| {
            format!(
                "{prefix}{}::text = {}",
                quote_ident(&f.column),
                quote_literal(&f.key)
            )
        })
    }

    pub async fn connect(&self) -> Result<Client, MigrateError> {
        if self.config.sslmode == SslMode::Require {
            return Err(MigrateError::Refused(format!(
                "backend {:?} requires TLS, which the migration coordinator does not speak yet",
                self.backend
            )));
        }
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&self.config.host)
            .port(self.config.port)
            .user(self.config.admin_user())
            .dbname(&self.database)
            .application_name("pgtenant-migration")
            // A role's or database's timeouts are for applications: a table's copy is one long statement, and
            // the snapshot holder sits idle inside its transaction while the tables are copied.
            .options("-c statement_timeout=0 -c idle_in_transaction_session_timeout=0")
            .connect_timeout(Duration::from_secs(10))
            // A blackholed server is noticed in about a minute, not after the kernel's retransmission timeout.
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .keepalives_interval(Duration::from_secs(10))
            .keepalives_retries(3);
        if !self.config.admin_password().is_empty() {
            cfg.password(self.config.admin_password());
        }
        let (client, conn) = cfg
            .connect(NoTls)
            .await
            .map_err(|e| MigrateError::pg(&format!("connect to {}", self.backend), e))?;
        let backend = self.backend.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%backend, error = %e, "migration connection ended");
            }
        });
        client
            .batch_execute(SESSION_SETUP)
            .await
            .map_err(|e| MigrateError::pg("session setup", e))?;
        present_key(&client).await?;
        Ok(client)
    }
}

/// Makes `client` one of the migration's own connections (see `capture`), when the database has
/// the migration's objects already; the admin role reads the key, nobody else can.
pub async fn present_key(client: &Client) -> Result<(), MigrateError> {
    let row = client
        .query_one(
            "SELECT CASE WHEN to_regclass('pgtenant.apply_key') IS NOT NULL \
             THEN (xpath('/row/k/text()', query_to_xml('SELECT k FROM pgtenant.apply_key', false, true, '')))[1]::text END",
            &[],
        )
        .await
        .map_err(|e| MigrateError::pg("read the apply key", e))?;
    let key: Option<String> = row.get(0);
    if let Some(k) = key {
        client
            .batch_execute(&format!("SET pgtenant.apply_key = {}", quote_literal(&k)))
            .await
            .map_err(|e| MigrateError::pg("present the apply key", e))?;
    }
    Ok(())
}

/// A name as a pg_dump pattern that matches exactly it: double-quoted, which keeps its letter case and makes
/// `*`, `?` and `.` literal (unquoted, `Acme` matched `acme` and `t_*` several schemas).
fn pattern_literal(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A value in a libpq connection string: a database name with `=` in it would otherwise be read as one.
fn conninfo_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The DDL `pg_dump --schema-only` writes for `side`'s schema, with `extra` arguments (a section, a snapshot);
/// psql meta-commands (`\restrict` in newer dumps) are left out, as they are not SQL.
pub async fn dump_schema(
    pg_dump: &str,
    side: &Endpoint,
    extra: &[String],
    timeout: Duration,
) -> Result<String, MigrateError> {
    let mut cmd = tokio::process::Command::new(pg_dump);
    cmd.arg("--schema-only")
        .arg("--no-owner")
        .arg("--no-privileges")
        .arg(format!("--schema={}", pattern_literal(&side.schema)))
        .arg(format!("--host={}", side.config.host))
        .arg(format!("--port={}", side.config.port))
        .arg(format!("--username={}", side.config.admin_user()))
        .arg(format!(
            "--dbname=dbname={}",
            conninfo_value(&side.database)
        ))
        .args(extra)
        .env("PGPASSWORD", side.config.admin_password())
        .kill_on_drop(true);
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .map_err(|_| {
            MigrateError::Timeout(format!(
                "pg_dump --schema-only took over {} s",
                timeout.as_secs()
            ))
        })?
        .map_err(|e| {
            MigrateError::Refused(format!(
                "{pg_dump:?} could not run ({e}); install pg_dump or set migration.pg_dump"
            ))
        })?;
    if !out.status.success() {
        return Err(MigrateError::Refused(format!(
            "pg_dump --schema-only failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('\\'))
        .collect::<Vec<_>>()
        .join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_reach_pg_dump_as_themselves() {
        assert_eq!(pattern_literal("Acme"), "\"Acme\"");
        assert_eq!(pattern_literal("t_*"), "\"t_*\"");
        assert_eq!(pattern_literal("a\"b"), "\"a\"\"b\"");
        assert_eq!(conninfo_value("app"), "'app'");
        assert_eq!(
            conninfo_value("host=evil dbname=x'\\"),
            "'host=evil dbname=x\\'\\\\'"
        );
    }
}
