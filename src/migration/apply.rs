//! Applying change-log entries from one side to the other, exactly once, in two round trips per pass.
//!
//! Round trip 1 (the "from" side): delete the entries the previous pass applied, then read the oldest entries.
//! Round trip 2 (the "to" side), pipelined: BEGIN; trim ledger rows whose log entries are gone; one statement
//! per entry that records its id in `pgtenant.applied` and applies the row image only if that id was new
//! (`WITH l AS (INSERT ... ON CONFLICT DO NOTHING RETURNING 1) UPDATE ... WHERE EXISTS (SELECT 1 FROM l)`);
//! COMMIT. Entries leave the "from" log only after that commit, and ledger rows only after their entries left
//! the log, so a crash anywhere leaves either entries the ledger says were applied (skipped) or entries not
//! yet applied (applied next time), never a second application.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use futures_util::future::{join, try_join_all};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use super::batch::{batch_sql, plan, Work};
use super::catalog::Table;
use super::pg::Endpoint;
use super::MigrateError;
use crate::tenant::quote_ident;

/// Entries read per pass.
pub const PASS_LIMIT: i64 = 5_000;

/// One change-log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// Applied on the "to" side; not yet deleted from the "from" log.
    unconfirmed: Vec<i64>,
    /// Deleted from the "from" log; their ledger rows can go.
    trim: Vec<i64>,
    /// READ, DELETE (on "from") and TRIM (on "to"), prepared by [`Link::ready`].
    fixed: Option<[Statement; 3]>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    pub read: usize,
}

const READ: &str = "SELECT id, tbl, op, old_row::text, new_row::text FROM pgtenant.change_log WHERE tenant = $1 ORDER BY id LIMIT $2";
const DELETE: &str = "DELETE FROM pgtenant.change_log WHERE tenant = $1 AND id = ANY($2)";
const TRIM: &str = "DELETE FROM pgtenant.applied WHERE tenant = $1 AND id = ANY($2)";

type Step<'a> = Pin<Box<dyn Future<Output = Result<(), tokio_postgres::Error>> + Send + 'a>>;

impl Link {
    pub fn new(from: Client, to: Client, to_side: Endpoint, tables: Vec<Table>) -> Link {
        Link {
            from,
            to,
            to_side,
            tables: tables.into_iter().map(|t| (t.name.clone(), t)).collect(),
            statements: HashMap::new(),
            unconfirmed: Vec::new(),
            trim: Vec::new(),
            fixed: None,
        }
    }

    /// The link's setup, done at its first use: the "to" connection takes the replica role for good (changing
    /// `session_replication_role` empties a backend's plan cache, so setting it per pass made every pass parse
    /// and plan its statements again), and the fixed statements are prepared (a pass then costs one round trip
    /// per side and no parsing).
    async fn ready(&mut self) -> Result<[Statement; 3], MigrateError> {
        if let Some(f) = &self.fixed {
            return Ok(f.clone());
        }
        self.to
            .batch_execute("SET session_replication_role = replica")
            .await
            .map_err(|e| MigrateError::pg("set the apply connection's replication role", e))?;
        let (read, delete, trim) = futures_util::future::try_join3(
            self.from.prepare(READ),
            self.from.prepare(DELETE),
            self.to.prepare(TRIM),
        )
        .await
        .map_err(|e| MigrateError::pg("prepare the change-log statements", e))?;
        let f = [read, delete, trim];
        self.fixed = Some(f.clone());
        Ok(f)
    }

    /// One pass: confirm the previous pass, read the oldest entries and apply them. Returns what it read;
    /// `read == 0` means the log held nothing unapplied.
    pub async fn pass(&mut self, tenant: &str) -> Result<Pass, MigrateError> {
        let [read_stmt, delete_stmt, trim_stmt] = self.ready().await?;
        let done = std::mem::take(&mut self.unconfirmed);
        let delete = async {
            if done.is_empty() {
                Ok(0)
            } else {
                self.from.execute(&delete_stmt, &[&tenant, &done]).await
            }
        };
        let params: [&(dyn ToSql + Sync); 2] = [&tenant, &PASS_LIMIT];
        let read = self.from.query(&read_stmt, &params);
        let (deleted, rows) = join(delete, read).await;
        if let Err(e) = deleted {
            self.unconfirmed = done;
            return Err(MigrateError::pg("trim change log", e));
        }
        self.trim.extend(done);
        let rows = rows.map_err(|e| MigrateError::pg("read change log", e))?;
        let entries: Vec<Entry> = rows.iter().map(entry).collect();
        if entries.is_empty() {
            if !self.trim.is_empty() {
                self.to
                    .execute(&trim_stmt, &[&tenant, &self.trim])
                    .await
                    .map_err(|e| MigrateError::pg("trim ledger", e))?;
                self.trim.clear();
            }
            return Ok(Pass::default());
        }
        self.apply(tenant, &entries).await?;
        self.unconfirmed = entries.iter().map(|e| e.id).collect();
        Ok(Pass {
            read: entries.len(),
        })
    }

    /// Applies `entries` on the "to" side in one pipelined transaction, batched by [`super::batch::plan`];
    /// entries the ledger already has are skipped by the statements themselves.
    pub async fn apply(&mut self, tenant: &str, entries: &[Entry]) -> Result<(), MigrateError> {
        let work = plan(entries, &self.tables);
        let [_, _, trim] = self.ready().await?;
        for w in &work {
            self.prepare_work(w).await?;
        }
        match self.apply_work(tenant, &work, &trim).await {
            Err(e)
                if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
                    && work.iter().any(|w| !matches!(w, Work::One(_))) =>
            {
                // A collapsed batch can pass through a state the source never had (two rows swapping a unique
                // value): apply this pass entry by entry, in log order, instead.
                let one_by_one: Vec<Work<'_>> = entries.iter().map(Work::One).collect();
                for w in &one_by_one {
                    self.prepare_work(w).await?;
                }
                self.apply_work(tenant, &one_by_one, &trim)
                    .await
                    .map_err(|e| MigrateError::pg("apply changes", e))
            }
            r => r.map_err(|e| MigrateError::pg("apply changes", e)),
        }
    }

    async fn apply_work(
        &mut self,
        tenant: &str,
        work: &[Work<'_>],
        trim_stmt: &Statement,
    ) -> Result<(), tokio_postgres::Error> {
        let to = &self.to;
        let statements = &self.statements;
        let trim = std::mem::take(&mut self.trim);
        let mut steps: Vec<Step<'_>> = Vec::with_capacity(work.len() + 3);
        steps.push(Box::pin(to.batch_execute("BEGIN")));
        if !trim.is_empty() {
            let trim = &trim;
            steps.push(Box::pin(async move {
                to.execute(trim_stmt, &[&tenant, trim]).await.map(|_| ())
            }));
        }
        for w in work {
            steps.push(Box::pin(async move {
                let stmt = &statements[&statement_key(w)];
                match w {
                    Work::One(e) => {
                        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&tenant, &e.id];
                        match e.op as u8 {
                            b'I' => params.push(&e.new_row),
                            b'U' => {
                                params.push(&e.new_row);
                                params.push(&e.old_row);
                            }
                            b'D' => params.push(&e.old_row),
                            _ => {}
                        }
                        to.execute(stmt, &params).await
                    }
                    Work::Rows { ids, images, .. } => {
                        to.execute(stmt, &[&tenant, ids, images]).await
                    }
                    Work::Updates {
                        ids,
                        last_ids,
                        images,
                        ..
                    } => to.execute(stmt, &[&tenant, ids, last_ids, images]).await,
                }
                .map(|_| ())
            }));
        }
        steps.push(Box::pin(to.batch_execute("COMMIT")));
        // Sent back to back in this order (tokio-postgres pipelines futures polled together) and executed in
        // order; the first failure aborts the transaction, which COMMIT then ends.
        let result = try_join_all(steps).await;
        if let Err(e) = result {
            let _ = self.to.batch_execute("ROLLBACK").await;
            self.trim = trim;
            return Err(e);
        }
        Ok(())
    }

    async fn prepare_work(&mut self, w: &Work<'_>) -> Result<(), MigrateError> {
        let key = statement_key(w);
        if self.statements.contains_key(&key) {
            return Ok(());
        }
        let table = self.tables.get(&key.0).ok_or_else(|| {
            MigrateError::Refused(format!(
                "change log names table {:?}, which is not part of the migration",
                key.0
            ))
        })?;
        let sql = match w {
            Work::One(e) => apply_sql(&self.to_side, table, e.op as u8)?,
            _ => batch_sql(&self.to_side, table, key.1 as u8).ok_or_else(|| {
                MigrateError::Refused(format!("no batch statement for {:?}", key))
            })?,
        };
        let stmt = self
            .to
            .prepare(&sql)
            .await
            .map_err(|err| MigrateError::pg(&format!("prepare apply of {}", key.0), err))?;
        self.statements.insert(key, stmt);
        Ok(())
    }
}

/// The statement cache key of a unit of work: (table, operation), batch kinds in lower case.
fn statement_key(w: &Work<'_>) -> (String, i8) {
    match w {
        Work::One(e) => (e.table.clone(), e.op),
        Work::Rows { table, kind, .. } => ((*table).to_owned(), *kind as i8),
        Work::Updates { table, .. } => ((*table).to_owned(), b'u' as i8),
    }
}

/// A change-log row as an [`Entry`] (columns as in [`READ`]).
pub fn entry(r: &tokio_postgres::Row) -> Entry {
    Entry {
        id: r.get(0),
        table: r.get(1),
        op: r.get(2),
        old_row: r.get(3),
        new_row: r.get(4),
    }
}

/// `x.k1 = alias.k1 AND ...` over the table's primary key (`x` is the table being changed).
pub(super) fn key_match(table: &Table, alias: &str) -> String {
    table
        .key
        .iter()
        .map(|k| format!("x.{0} = {alias}.{0}", quote_ident(k)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// `c1 = r.c1, ...` for every column an UPDATE may assign (not `GENERATED ALWAYS AS IDENTITY`).
pub(super) fn assignments(table: &Table) -> String {
    table
        .columns
        .iter()
        .filter(|c| !table.identity_always.contains(c))
        .map(|c| format!("{0} = r.{0}", quote_ident(c)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The statement that applies one kind of row image to `table` on `side`, only if the entry's id is new to the
/// ledger ($1 tenant, $2 id, then the images). Rows are rebuilt from their JSON image with
/// `jsonb_populate_record`, so every column type round-trips through its own text form.
pub fn apply_sql(side: &Endpoint, table: &Table, op: u8) -> Result<String, MigrateError> {
    let q = side.qualified(&table.name);
    let cols: Vec<String> = table.columns.iter().map(|c| quote_ident(c)).collect();
    let list = cols.join(", ");
    let ledger = "WITH l AS (INSERT INTO pgtenant.applied (tenant, id) VALUES ($1, $2) \
                  ON CONFLICT DO NOTHING RETURNING 1)";
    let new = "EXISTS (SELECT 1 FROM l)";
    let image = |n: u8| format!("jsonb_populate_record(NULL::{q}, ${n}::text::jsonb)");
    let matches = |old: u8| -> String {
        if table.key.is_empty() {
            // Full-row identity: one row whose image equals the old image.
            // Compared as row text rendered here, on both sides, so the writer's session settings (time
            // zone, float digits) cannot make equal rows look different.
            format!(
                "x.ctid = (SELECT y.ctid FROM {q} y WHERE y::text = \
                 jsonb_populate_record(NULL::{q}, ${old}::text::jsonb)::text LIMIT 1)"
            )
        } else {
            key_match(table, "o")
        }
    };
    Ok(match op {
        b'I' => format!(
            "{ledger} INSERT INTO {q} ({list}) OVERRIDING SYSTEM VALUE SELECT {list} FROM {} WHERE {new}",
            image(3)
        ),
        b'U' => {
            let old = if table.key.is_empty() {
                String::new()
            } else {
                format!(", {} o", image(4))
            };
            format!(
                "{ledger} UPDATE {q} AS x SET {} FROM {} r{old} WHERE {} AND {new}{}",
                assignments(table),
                image(3),
                matches(4),
                side.tenant_and("x")
            )
        }
        b'D' => {
            if table.key.is_empty() {
                format!(
                    "{ledger} DELETE FROM {q} AS x WHERE {} AND {new}{}",
                    matches(3),
                    side.tenant_and("x")
                )
            } else {
                format!(
                    "{ledger} DELETE FROM {q} AS x USING {} o WHERE {} AND {new}{}",
                    image(3),
                    matches(3),
                    side.tenant_and("x")
                )
            }
        }
        // DELETE, not TRUNCATE: foreign keys from tables truncated alongside would refuse a lone TRUNCATE
        // (their own 'T' entries follow), while DELETE under the replica role does not check them.
        b'T' => format!("{ledger} DELETE FROM {q} AS x WHERE {new}{}", side.tenant_and("x")),
        other => {
            return Err(MigrateError::Refused(format!(
                "unknown change-log operation {:?}",
                other as char
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendConfig;

    fn side() -> Endpoint {
        Endpoint {
            backend: "b".into(),
            config: BackendConfig::new("h", 5432, "u"),
            database: "d".into(),
            schema: "Ten\"ant".into(),
            filter: None,
        }
    }

    fn table(key: &[&str]) -> Table {
        Table {
            name: "or'ders".into(),
            columns: vec!["id".into(), "Note".into()],
            identity_always: vec![],
            key: key.iter().map(|k| k.to_string()).collect(),
        }
    }

    #[test]
    fn statements_quote_names_and_check_the_ledger() {
        let s = side();
        let insert = apply_sql(&s, &table(&["id"]), b'I').unwrap();
        assert!(insert.starts_with("WITH l AS (INSERT INTO pgtenant.applied"));
        assert!(insert.contains(r#"INSERT INTO "Ten""ant"."or'ders" ("id", "Note")"#));
        assert!(insert.ends_with("WHERE EXISTS (SELECT 1 FROM l)"));
        let update = apply_sql(&s, &table(&["id"]), b'U').unwrap();
        assert!(update.contains(r#"x."id" = o."id""#));
        assert!(update.contains("$4::text::jsonb) o"));
        let delete = apply_sql(&s, &table(&[]), b'D').unwrap();
        assert!(delete.contains("y::text = jsonb_populate_record"));
        assert!(apply_sql(&s, &table(&[]), b'X').is_err());
    }

    #[test]
    fn identity_always_columns_are_not_assigned() {
        let mut t = table(&["id"]);
        t.identity_always = vec!["id".into()];
        let update = apply_sql(&side(), &t, b'U').unwrap();
        assert!(!update.contains(r#""id" = r."id""#), "{update}");
        assert!(update.contains(r#""Note" = r."Note""#));
    }
}
