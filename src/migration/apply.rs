//! Applying change-log entries from one side to the other, exactly once, in two round trips per pass.
//!
//! Round trip 1 (the "from" side), one statement: delete the entries the previous pass applied, and read the
//! oldest of the others.
//! Round trip 2 (the "to" side): statements that record each entry's id in `pgtenant.applied` and apply its row
//! image only if that id was new (`WITH l AS (INSERT ... ON CONFLICT DO NOTHING RETURNING id) UPDATE ... JOIN
//! l`), and trim ledger rows whose log entries are gone. A pass of batches is one statement per layer
//! ([`super::layers`]; the usual pass is one statement, its own transaction), first in a cheaper form whose
//! ledger insert fails the whole pass on an id already recorded, then, only if it did, in the gated form; a
//! pass with entries applied by themselves is BEGIN, the trim, one statement per batch or entry, COMMIT,
//! pipelined.
//!
//! Entries leave the "from" log only after the pass committed, and ledger rows only after their entries left
//! the log, so a crash anywhere leaves either entries the ledger says were applied (skipped) or entries not
//! yet applied (applied next time), never a second application. When the tee's driver is idle after a pass,
//! [`Link::tidy`] does those deletes at once instead, outside the next commit's wait.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use futures_util::future::{join, try_join_all};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};
use tracing::debug;

use super::batch::{batch_sql, plan, Gate, Work};
use super::catalog::Table;
use super::layers::{layer_ids, layer_params, layer_sql, layers, signature, Signature};
use super::pg::Endpoint;
use super::rowsql::{apply_sql, entry, Entry};
use super::MigrateError;

/// Entries read per pass.
pub const PASS_LIMIT: i64 = 5_000;

/// The two connections of one direction and the statements prepared on the "to" side.
pub struct Link {
    pub from: Client,
    pub to: Client,
    pub to_side: Endpoint,
    tables: HashMap<String, Table>,
    statements: HashMap<(String, i8), Statement>,
    /// Layer statements by what they are made from; emptied when it reaches [`MAX_LAYER_STATEMENTS`].
    layered: HashMap<(Signature, Gate), Statement>,
    /// Passes applied entry by entry after their batches met a unique violation.
    fallbacks: u64,
    /// Passes applied in the gated form after the cheap form met ids the ledger had.
    regated: u64,
    /// Applied on the "to" side; not yet deleted from the "from" log.
    unconfirmed: Vec<i64>,
    /// Deleted from the "from" log; their ledger rows can go.
    trim: Vec<i64>,
    /// READ, DELETE (on "from") and TRIM (on "to"), prepared by [`Link::ready`].
    fixed: Option<[Statement; 3]>,
    /// The tenant whose apply lock the "to" connection holds ([`super::claim`]).
    claimed: Option<String>,
    /// The generation of the coordinator's lease its claim carries (with a control plane).
    pub generation: Option<i64>,
}

/// Layer statements a link keeps prepared, of both forms (a pass's layers depend on which tables it touched
/// with which kinds of change; a workload cycling through more shapes than this prepares them again).
const MAX_LAYER_STATEMENTS: usize = 256;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    pub read: usize,
}

/// Deletes the entries `$3` (confirmed applied) and reads the oldest others. The statement's snapshot still
/// shows the deleted rows, hence the filter: on the ids the delete returns, a hashed subplan (a filter on the
/// array would compare every row scanned with every confirmed id, 5 000 x 5 000 for a full pass).
const READ: &str = "WITH d AS (DELETE FROM pgtenant.change_log \
                    WHERE tenant = $1 AND id = ANY($3::bigint[]) RETURNING id) \
                    SELECT id, tbl, op, old_row::text, new_row::text FROM pgtenant.change_log \
                    WHERE tenant = $1 AND id NOT IN (SELECT id FROM d) ORDER BY id LIMIT $2";
/// The delete of confirmed entries alone, for [`Link::tidy`].
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
            layered: HashMap::new(),
            fallbacks: 0,
            regated: 0,
            unconfirmed: Vec::new(),
            trim: Vec::new(),
            fixed: None,
            claimed: None,
            generation: None,
        }
    }

    /// Claims the target for `tenant` ([`super::claim`]): entries must be read after this for the claim to
    /// protect them, so a link that reads the log itself (a verification's snapshot) claims first. A pass
    /// claims at its first use.
    pub async fn claim(&mut self, tenant: &str) -> Result<(), MigrateError> {
        self.ready(tenant).await.map(|_| ())
    }

    /// The link's setup, done at its first use: the "to" connection takes the tenant's apply lock and the
    /// replica role for good (changing `session_replication_role` empties a backend's plan cache, so setting it
    /// per pass made every pass parse and plan its statements again), and the fixed statements are prepared (a
    /// pass then costs one round trip per side and no parsing).
    async fn ready(&mut self, tenant: &str) -> Result<[Statement; 3], MigrateError> {
        match (&self.claimed, &self.fixed) {
            (Some(t), Some(f)) if t == tenant => return Ok(f.clone()),
            (Some(t), _) if t != tenant => {
                return Err(MigrateError::Refused(format!(
                    "this link applies tenant {t:?}'s changes, not {tenant:?}'s"
                )))
            }
            _ => {}
        }
        super::claim::claim(&self.to, tenant, &self.to_side.schema, self.generation).await?;
        self.claimed = Some(tenant.to_string());
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
        let [read_stmt, _, trim_stmt] = self.ready(tenant).await?;
        let done = std::mem::take(&mut self.unconfirmed);
        let params: [&(dyn ToSql + Sync); 3] = [&tenant, &PASS_LIMIT, &done];
        let rows = match self.from.query(&read_stmt, &params).await {
            Ok(rows) => rows,
            Err(e) => {
                self.unconfirmed = done;
                return Err(MigrateError::pg("read change log", e));
            }
        };
        self.trim.extend(done);
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

    /// Passes this link applied entry by entry after their batches met a unique violation.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks
    }

    /// Passes this link applied in the gated form after the cheap form met ids the ledger had.
    pub fn regated(&self) -> u64 {
        self.regated
    }

    /// Confirms the last pass outside of any commit's wait: deletes its entries from the "from" log and, at
    /// the same time, the ledger rows of entries deleted before. A pass does the same itself when no tidy ran
    /// in between (see [`super::tee::Tee`]'s driver, which tidies only while no commit is waiting).
    pub async fn tidy(&mut self, tenant: &str) -> Result<(), MigrateError> {
        if self.unconfirmed.is_empty() && self.trim.is_empty() {
            return Ok(());
        }
        let [_, delete_stmt, trim_stmt] = self.ready(tenant).await?;
        let done = std::mem::take(&mut self.unconfirmed);
        let trim = std::mem::take(&mut self.trim);
        let (from, to) = (&self.from, &self.to);
        let delete = async {
            if done.is_empty() {
                Ok(0)
            } else {
                from.execute(&delete_stmt, &[&tenant, &done]).await
            }
        };
        let trimmed = async {
            if trim.is_empty() {
                Ok(0)
            } else {
                to.execute(&trim_stmt, &[&tenant, &trim]).await
            }
        };
        let (deleted, trimmed) = join(delete, trimmed).await;
        // What failed is done again later: the entries stay unconfirmed, the ledger rows stay to be trimmed.
        match deleted {
            Ok(_) => self.trim.extend(done),
            Err(_) => self.unconfirmed = done,
        }
        if trimmed.is_err() {
            self.trim.extend(trim);
        }
        deleted.map_err(|e| MigrateError::pg("trim change log", e))?;
        trimmed.map_err(|e| MigrateError::pg("trim ledger", e))?;
        Ok(())
    }

    /// Applies `entries` on the "to" side in one transaction, batched by [`super::batch::plan`] (and layered
    /// when they are all batches); entries the ledger already has are skipped by the statements themselves.
    pub async fn apply(&mut self, tenant: &str, entries: &[Entry]) -> Result<(), MigrateError> {
        let work = plan(entries, &self.tables);
        let [_, _, trim] = self.ready(tenant).await?;
        let attempt = match layers(&work) {
            Some(layers) => {
                // Entries are new to the ledger unless a link stopped between applying them and confirming
                // them; the cheap form finds out by failing, and the gated form then skips those.
                match self.layered(tenant, &layers, Gate::Fail).await? {
                    Err(e) if ledger_conflict(&e) => {
                        self.regated += 1;
                        self.layered(tenant, &layers, Gate::Ledger).await?
                    }
                    // A unique violation of the tenant's own tables goes entry by entry (below).
                    r => r,
                }
            }
            None => {
                for w in &work {
                    self.prepare_work(w).await?;
                }
                self.apply_work(tenant, &work, &trim).await
            }
        };
        match attempt {
            Err(e)
                if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
                    && work.iter().any(|w| !matches!(w, Work::One(_))) =>
            {
                // A collapsed batch can pass through a state the source never had (two rows swapping a unique
                // value): apply this pass entry by entry, in log order, instead.
                self.fallbacks += 1;
                debug!(
                    tenant,
                    entries = entries.len(),
                    "unique violation in a batch; applying entry by entry"
                );
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

    /// Prepares (once) and runs the layers' statements in the form `gate`. The outer error is the prepare's.
    async fn layered(
        &mut self,
        tenant: &str,
        layers: &[Vec<&Work<'_>>],
        gate: Gate,
    ) -> Result<Result<(), tokio_postgres::Error>, MigrateError> {
        let statements = self.prepare_layers(layers, gate).await?;
        Ok(self.apply_layers(tenant, layers, &statements).await)
    }

    /// Runs the layers' statements: a single layer as one statement (its own transaction), several in one
    /// pipelined transaction. The ledger trim rides in the first layer.
    async fn apply_layers(
        &mut self,
        tenant: &str,
        layers: &[Vec<&Work<'_>>],
        statements: &[Statement],
    ) -> Result<(), tokio_postgres::Error> {
        let trim = std::mem::take(&mut self.trim);
        let none = Vec::new();
        let ids: Vec<Vec<i64>> = layers.iter().map(|l| layer_ids(l)).collect();
        let tenant = &tenant;
        let to = &self.to;
        let result = if let ([layer], [stmt]) = (layers, statements) {
            let params = layer_params(tenant, &ids[0], &trim, layer);
            to.execute(stmt, &params).await.map(|_| ())
        } else {
            let mut steps: Vec<Step<'_>> = Vec::with_capacity(layers.len() + 2);
            steps.push(Box::pin(to.batch_execute("BEGIN")));
            for (i, (layer, stmt)) in layers.iter().zip(statements).enumerate() {
                let params =
                    layer_params(tenant, &ids[i], if i == 0 { &trim } else { &none }, layer);
                steps.push(Box::pin(async move {
                    to.execute(stmt, &params).await.map(|_| ())
                }));
            }
            steps.push(Box::pin(to.batch_execute("COMMIT")));
            // As in `apply_work`: sent back to back, the first failure aborts the transaction.
            try_join_all(steps).await.map(|_| ())
        };
        if let Err(e) = result {
            if layers.len() > 1 {
                let _ = self.to.batch_execute("ROLLBACK").await;
            }
            self.trim = trim;
            return Err(e);
        }
        Ok(())
    }

    async fn prepare_layers(
        &mut self,
        layers: &[Vec<&Work<'_>>],
        gate: Gate,
    ) -> Result<Vec<Statement>, MigrateError> {
        let mut out = Vec::with_capacity(layers.len());
        for layer in layers {
            let key = (signature(layer), gate);
            if let Some(stmt) = self.layered.get(&key) {
                out.push(stmt.clone());
                continue;
            }
            let sql = layer_sql(&self.to_side, &self.tables, &key.0, gate)?;
            let stmt = self
                .to
                .prepare(&sql)
                .await
                .map_err(|e| MigrateError::pg("prepare apply", e))?;
            if self.layered.len() >= MAX_LAYER_STATEMENTS {
                self.layered.clear();
            }
            self.layered.insert(key, stmt.clone());
            out.push(stmt);
        }
        Ok(out)
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

/// Whether `e` is the ledger's unique violation: an id the pass carries was recorded already.
fn ledger_conflict(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|d| {
        d.code() == &tokio_postgres::error::SqlState::UNIQUE_VIOLATION
            && d.schema() == Some("pgtenant")
            && d.table() == Some("applied")
    })
}

/// The statement cache key of a unit of work: (table, operation), batch kinds in lower case.
fn statement_key(w: &Work<'_>) -> (String, i8) {
    match w {
        Work::One(e) => (e.table.clone(), e.op),
        Work::Rows { table, kind, .. } => ((*table).to_owned(), *kind as i8),
        Work::Updates { table, .. } => ((*table).to_owned(), b'u' as i8),
    }
}
