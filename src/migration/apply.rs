//! Applying change-log entries from one side to the other, exactly once.
//!
//! A pass reads the oldest entries of the tenant from the "from" side, and in one transaction on the "to" side
//! records their ids in `pgtenant.applied` (`ON CONFLICT DO NOTHING RETURNING id` tells which ones are new) and
//! applies just those; only after that commit are the entries deleted from the "from" log. A crash anywhere in
//! between leaves either entries that the ledger says were applied (skipped next time) or entries not yet
//! applied (applied next time), never a second application.

use std::collections::HashMap;

use futures_util::future::try_join_all;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use super::catalog::Table;
use super::pg::Endpoint;
use super::MigrateError;
use crate::tenant::quote_ident;

/// Entries read per pass.
pub const PASS_LIMIT: i64 = 5_000;

/// One change-log entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: i64,
    pub table: String,
    pub op: i8,
    pub old_row: Option<String>,
    pub new_row: Option<String>,
}

/// The two connections of one direction and the statements prepared on the "to" side.
pub struct Link {
    pub from: Client,
    pub to: Client,
    pub to_side: Endpoint,
    tables: HashMap<String, Table>,
    statements: HashMap<(String, i8), Statement>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    pub read: usize,
    pub applied: usize,
}

const READ: &str = "SELECT id, tbl, op, old_row::text, new_row::text FROM pgtenant.change_log WHERE tenant = $1 ORDER BY id LIMIT $2";

impl Link {
    pub fn new(from: Client, to: Client, to_side: Endpoint, tables: Vec<Table>) -> Link {
        Link {
            from,
            to,
            to_side,
            tables: tables.into_iter().map(|t| (t.name.clone(), t)).collect(),
            statements: HashMap::new(),
        }
    }

    /// Reads up to `limit` entries from the "from" log (in `from`'s current transaction, if one is open).
    pub async fn read(&self, tenant: &str, limit: i64) -> Result<Vec<Entry>, MigrateError> {
        let rows = self
            .from
            .query(READ, &[&tenant, &limit])
            .await
            .map_err(|e| MigrateError::pg("read change log", e))?;
        Ok(rows
            .iter()
            .map(|r| Entry {
                id: r.get(0),
                table: r.get(1),
                op: r.get(2),
                old_row: r.get(3),
                new_row: r.get(4),
            })
            .collect())
    }

    /// One pass: apply the oldest entries and remove them from the log. Returns what it read and applied.
    pub async fn pass(&mut self, tenant: &str) -> Result<Pass, MigrateError> {
        let entries = self.read(tenant, PASS_LIMIT).await?;
        if entries.is_empty() {
            return Ok(Pass::default());
        }
        let applied = self.apply(tenant, &entries).await?;
        let ids: Vec<i64> = entries.iter().map(|e| e.id).collect();
        self.from
            .execute(
                "DELETE FROM pgtenant.change_log WHERE tenant = $1 AND id = ANY($2)",
                &[&tenant, &ids],
            )
            .await
            .map_err(|e| MigrateError::pg("trim change log", e))?;
        // The ledger rows only guard against the crash window before the delete above; they can go now.
        self.to
            .execute(
                "DELETE FROM pgtenant.applied WHERE tenant = $1 AND id = ANY($2)",
                &[&tenant, &ids],
            )
            .await
            .map_err(|e| MigrateError::pg("trim ledger", e))?;
        Ok(Pass {
            read: entries.len(),
            applied,
        })
    }

    /// Applies `entries` on the "to" side in one transaction, skipping those the ledger already has. Returns
    /// how many were applied.
    pub async fn apply(&mut self, tenant: &str, entries: &[Entry]) -> Result<usize, MigrateError> {
        for e in entries {
            self.prepare(e).await?;
        }
        let ids: Vec<i64> = entries.iter().map(|e| e.id).collect();
        let tx = self
            .to
            .transaction()
            .await
            .map_err(|e| MigrateError::pg("begin apply", e))?;
        tx.batch_execute("SET LOCAL session_replication_role = replica")
            .await
            .map_err(|e| MigrateError::pg("apply setup", e))?;
        let fresh: std::collections::HashSet<i64> = tx
            .query(
                "INSERT INTO pgtenant.applied (tenant, id) SELECT $1, unnest($2::bigint[]) \
                 ON CONFLICT DO NOTHING RETURNING id",
                &[&tenant, &ids],
            )
            .await
            .map_err(|e| MigrateError::pg("record applied entries", e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let todo: Vec<&Entry> = entries.iter().filter(|e| fresh.contains(&e.id)).collect();
        // Sent back to back (tokio-postgres pipelines futures polled together) and executed in order.
        let work = todo.iter().map(|e| {
            let stmt = &self.statements[&(e.table.clone(), e.op)];
            let params: Vec<&(dyn ToSql + Sync)> = match e.op as u8 {
                b'I' => vec![&e.new_row],
                b'U' => vec![&e.new_row, &e.old_row],
                b'D' => vec![&e.old_row],
                _ => vec![],
            };
            let tx = &tx;
            async move { tx.execute(stmt, &params).await }
        });
        try_join_all(work)
            .await
            .map_err(|e| MigrateError::pg("apply change", e))?;
        tx.commit()
            .await
            .map_err(|e| MigrateError::pg("commit apply", e))?;
        Ok(todo.len())
    }

    async fn prepare(&mut self, e: &Entry) -> Result<(), MigrateError> {
        let key = (e.table.clone(), e.op);
        if self.statements.contains_key(&key) {
            return Ok(());
        }
        let table = self.tables.get(&e.table).ok_or_else(|| {
            MigrateError::Refused(format!(
                "change log names table {:?}, which is not part of the migration",
                e.table
            ))
        })?;
        let sql = apply_sql(&self.to_side, table, e.op as u8)?;
        let stmt = self
            .to
            .prepare(&sql)
            .await
            .map_err(|err| MigrateError::pg(&format!("prepare apply of {}", e.table), err))?;
        self.statements.insert(key, stmt);
        Ok(())
    }
}

/// The statement that applies one kind of row image to `table` on `side`. Rows are rebuilt from their JSON image
/// with `jsonb_populate_record`, so every column type round-trips through its own text form.
pub fn apply_sql(side: &Endpoint, table: &Table, op: u8) -> Result<String, MigrateError> {
    let q = side.qualified(&table.name);
    let cols: Vec<String> = table.columns.iter().map(|c| quote_ident(c)).collect();
    let list = cols.join(", ");
    let matches = |alias: &str| -> String {
        if table.key.is_empty() {
            // Full-row identity: one row whose image equals the old image.
            format!("x.ctid = (SELECT y.ctid FROM {q} y WHERE to_jsonb(y) = {alias} LIMIT 1)")
        } else {
            table
                .key
                .iter()
                .map(|k| format!("x.{0} = o.{0}", quote_ident(k)))
                .collect::<Vec<_>>()
                .join(" AND ")
        }
    };
    Ok(match op {
        b'I' => format!(
            "INSERT INTO {q} ({list}) OVERRIDING SYSTEM VALUE SELECT {list} FROM jsonb_populate_record(NULL::{q}, $1::text::jsonb)"
        ),
        b'U' => {
            let sets: Vec<String> = table
                .columns
                .iter()
                .filter(|c| !table.identity_always.contains(c))
                .map(|c| format!("{0} = r.{0}", quote_ident(c)))
                .collect();
            if table.key.is_empty() {
                format!(
                    "UPDATE {q} AS x SET {} FROM jsonb_populate_record(NULL::{q}, $1::text::jsonb) r WHERE {}",
                    sets.join(", "),
                    matches("$2::text::jsonb")
                )
            } else {
                format!(
                    "UPDATE {q} AS x SET {} FROM jsonb_populate_record(NULL::{q}, $1::text::jsonb) r, \
                     jsonb_populate_record(NULL::{q}, $2::text::jsonb) o WHERE {}",
                    sets.join(", "),
                    matches("")
                )
            }
        }
        b'D' => {
            if table.key.is_empty() {
                format!("DELETE FROM {q} AS x WHERE {}", matches("$1::text::jsonb"))
            } else {
                format!(
                    "DELETE FROM {q} AS x USING jsonb_populate_record(NULL::{q}, $1::text::jsonb) o WHERE {}",
                    matches("")
                )
            }
        }
        // DELETE, not TRUNCATE: foreign keys from tables truncated alongside would refuse a lone TRUNCATE
        // (their own 'T' entries follow), while DELETE under the replica role does not check them.
        b'T' => format!("DELETE FROM {q}"),
        other => {
            return Err(MigrateError::Refused(format!(
                "unknown change-log operation {:?}",
                other as char
            )))
        }
    })
}
