//! Bulk copy: the tenant's tables read in one snapshot of the source and written to the target with binary
//! COPY, several tables at once, each as one stream, or a big table as several block ranges at once
//! ([`super::copy_split`]); progress moves as rows arrive.
//!
//! A table counts as copied when its target transaction committed; its checkpoint records the snapshot it was
//! read in, and the change-log entries visible in that snapshot (already contained in the copy) are deleted, so
//! copy + replay never applies a change twice. A restart re-copies only tables without a checkpoint (in a new
//! snapshot, with their own cleanup); a table half-copied before is truncated and copied again.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures_util::{pin_mut, SinkExt, StreamExt, TryStreamExt};
use tokio_postgres::Client;

use super::catalog::Table;
use super::copy_fence::CopyRun;
use super::copy_split::{plan, Piece};
use super::pg::Endpoint;
use super::record::TableCheckpoint;
use super::MigrateError;
use crate::quote::quote_ident;
use crate::quote::quote_literal;
use crate::tenant::TenantId;

/// Bytes of rows passed to the target per COPY message.
const COPY_BLOCK: usize = 64 * 1024;

/// What the copy reports as it goes.
pub trait CopyProgress: Send + Sync {
    fn rows(&self, n: u64);
    /// A table is on the target; persist its checkpoint before returning.
    fn table_done(&self, table: &str, checkpoint: TableCheckpoint) -> Result<(), MigrateError>;
    /// Stop requested (abort, pause, shutdown).
    fn stopped(&self) -> bool;
}

pub struct CopyJob {
    pub tenant: TenantId,
    pub source: Endpoint,
    pub target: Endpoint,
    pub tables: Vec<Table>,
    pub batch_rows: usize,
    pub parallel: usize,
    /// Tables of at least this many bytes are split into `parallel` block ranges (0: never).
    pub split_bytes: u64,
    pub failpoints: Arc<super::failpoint::Failpoints>,
    pub stop: tokio_util::sync::CancellationToken,
    /// With a control plane: the copy takes the target over only while this instance's lease is confirmed.
    pub lease: Option<Arc<crate::cluster::leases::LeaseClock>>,
}

/// Counts the rows of `tables` in a fresh snapshot (for `rows_total`).
pub async fn count_rows(
    client: &Client,
    side: &Endpoint,
    tables: &[Table],
) -> Result<u64, MigrateError> {
    let mut total = 0u64;
    for t in tables {
        let row = client
            .query_one(
                &format!("SELECT count(*) FROM {} x", side.rows(&t.name)),
                &[],
            )
            .await
            .map_err(|e| MigrateError::pg(&format!("count {}", t.name), e))?;
        total += row.get::<_, i64>(0).max(0) as u64;
    }
    Ok(total)
}

/// Copies `job.tables` (those without a checkpoint); returns when all are on the target.
pub async fn run(job: CopyJob, progress: Arc<dyn CopyProgress>) -> Result<(), MigrateError> {
    if job.tables.is_empty() {
        return Ok(());
    }
    // Before anything is read: an earlier run's streams are ended and fenced off the target.
    let fence =
        Arc::new(CopyRun::begin(&job.target, job.tenant.as_str(), job.lease.as_deref()).await?);
    job.failpoints
        .check_until("copy.after_claim", &job.stop)
        .await?;
    let holder = job.source.connect().await?;
    holder
        .batch_execute(
            "SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0; \
             BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
        )
        .await
        .map_err(|e| MigrateError::pg("begin snapshot", e))?;
    let row = holder
        .query_one(
            "SELECT pg_export_snapshot(), pg_current_snapshot()::text",
            &[],
        )
        .await
        .map_err(|e| MigrateError::pg("export snapshot", e))?;
    let exported: String = row.get(0);
    let snapshot: String = row.get(1);
    let pieces = plan(
        &holder,
        &job.source,
        &job.tables,
        job.parallel,
        job.split_bytes,
    )
    .await?;
    empty_split_tables(&job, &pieces, &fence).await?;
    let workers_n = job.parallel.clamp(1, pieces.len());
    let queue = Arc::new(Mutex::new(pieces.into_iter().collect::<VecDeque<_>>()));
    let job = Arc::new(job);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..workers_n {
        let (job, queue, progress) = (job.clone(), queue.clone(), progress.clone());
        let (exported, snapshot, fence) = (exported.clone(), snapshot.clone(), fence.clone());
        workers.spawn(async move {
            worker(&job, &fence, &queue, &progress, &exported, &snapshot).await
        });
    }
    let mut result = Ok(());
    while let Some(done) = workers.join_next().await {
        let r =
            done.unwrap_or_else(|e| Err(MigrateError::Refused(format!("copy worker died: {e}"))));
        if let Err(e) = r {
            if result.is_ok() {
                result = Err(e);
                // The others stop at their next table.
                queue.lock().unwrap_or_else(|p| p.into_inner()).clear();
            }
        }
    }
    let _ = holder.batch_execute("COMMIT").await;
    result
}

/// The target's rows of every split table are deleted first, in a transaction of their own: each range is then
/// written in its own transaction (a retry after a crash empties the table again, as a whole table's copy does).
async fn empty_split_tables(
    job: &CopyJob,
    pieces: &[Piece],
    fence: &CopyRun,
) -> Result<(), MigrateError> {
    let mut split: Vec<&str> = pieces
        .iter()
        .filter(|p| p.split.is_some())
        .map(|p| p.table.name.as_str())
        .collect();
    split.dedup();
    if split.is_empty() {
        return Ok(());
    }
    let mut target = job.target.connect().await?;
    fence.join(&target).await?;
    let empty = |e| MigrateError::pg("empty the split tables on the target", e);
    let tx = target.transaction().await.map_err(empty)?;
    fence.check(&tx).await?;
    for name in split {
        tx.batch_execute(&empty_sql(job, name))
            .await
            .map_err(empty)?;
    }
    tx.commit().await.map_err(empty)
}

/// Empties the tenant's rows of `table` on the target, inside a transaction (triggers off, as for the copy).
fn empty_sql(job: &CopyJob, table: &str) -> String {
    format!(
        "SET LOCAL session_replication_role = replica; DELETE FROM {}{}",
        job.target.qualified(table),
        job.target.tenant_where()
    )
}

async fn worker(
    job: &CopyJob,
    fence: &CopyRun,
    queue: &Mutex<VecDeque<Piece>>,
    progress: &Arc<dyn CopyProgress>,
    exported: &str,
    snapshot: &str,
) -> Result<(), MigrateError> {
    // A copy stream takes as long as its table: no statement timeout on either side.
    let source = job.source.connect().await?;
    source
        .batch_execute(&format!(
            "SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0; \
             BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(exported)
        ))
        .await
        .map_err(|e| MigrateError::pg("import snapshot", e))?;
    let mut target = job.target.connect().await?;
    fence.join(&target).await?;
    target
        .batch_execute("SET statement_timeout = 0")
        .await
        .map_err(|e| MigrateError::pg("copy session setup", e))?;
    loop {
        let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
        let Some(piece) = next else {
            break;
        };
        if progress.stopped() {
            return Err(MigrateError::Cancelled);
        }
        let (rows, bytes) =
            copy_table(job, fence, &source, &mut target, &piece, &**progress).await?;
        // A split table is done when its last range is.
        let (rows, bytes) = match &piece.split {
            None => (rows, bytes),
            Some(split) => match split.done(rows, bytes) {
                Some(totals) => totals,
                None => continue,
            },
        };
        let table = piece.table;
        // Entries committed before the snapshot are in the copy; the others stay for the tee. The cleanup runs
        // before the checkpoint (it is idempotent), so a checkpointed table never has its copied changes left in
        // the log.
        let cleanup = job.source.connect().await?;
        cleanup
            .execute(
                "DELETE FROM pgtenant.change_log WHERE tenant = $1 AND tbl = $2 \
                 AND pg_visible_in_snapshot(xid, $3::text::pg_snapshot)",
                &[&job.tenant.as_str(), &table.name, &snapshot],
            )
            .await
            .map_err(|e| MigrateError::pg("trim change log after copy", e))?;
        job.failpoints
            .check_until("copy.before_checkpoint", &job.stop)
            .await?;
        // The checkpoint is a state write (an fsync): on a blocking thread, not one that serves clients.
        let checkpoint = TableCheckpoint {
            rows,
            bytes,
            snapshot: snapshot.to_owned(),
        };
        let (p, name) = (progress.clone(), table.name.clone());
        tokio::task::spawn_blocking(move || p.table_done(&name, checkpoint))
            .await
            .map_err(|e| MigrateError::state_thread("checkpoint", e))??;
        job.failpoints
            .check_until("copy.after_table", &job.stop)
            .await?;
    }
    let _ = source.batch_execute("COMMIT").await;
    Ok(())
}

/// Copies one table (or one range of a split table) as one stream within one target transaction (a whole table
/// is emptied first in it, so a retry after a crash starts clean). Returns the rows and bytes copied.
async fn copy_table(
    job: &CopyJob,
    fence: &CopyRun,
    source: &Client,
    target: &mut Client,
    piece: &Piece,
    progress: &dyn CopyProgress,
) -> Result<(u64, u64), MigrateError> {
    let table = &piece.table;
    let src_rows = match piece.range {
        None => format!("{} s", job.source.rows(&table.name)),
        // A TID range scan of the table itself (a shared table's filter applies on top).
        Some(_) => format!(
            "{} s WHERE {}{}",
            job.source.qualified(&table.name),
            piece.ctid_cond(),
            job.source.tenant_and("s")
        ),
    };
    let dst = job.target.qualified(&table.name);
    let cols: Vec<String> = table.columns.iter().map(|c| quote_ident(c)).collect();
    let list = cols.join(", ");
    let tx = target
        .transaction()
        .await
        .map_err(|e| MigrateError::pg("begin copy", e))?;
    fence.check(&tx).await?;
    let setup = match piece.split {
        None => empty_sql(job, &table.name),
        Some(_) => "SET LOCAL session_replication_role = replica".to_owned(),
    };
    tx.batch_execute(&setup)
        .await
        .map_err(|e| MigrateError::pg(&format!("prepare {}", table.name), e))?;
    let copy = TableCopy {
        query: format!("SELECT {list} FROM {src_rows}"),
        dst: &dst,
        list: &list,
        step: job.batch_rows.max(1) as u64,
    };
    let total = copy_one(source, &tx, &copy, progress).await?;
    job.failpoints
        .check_until("copy.before_commit", &job.stop)
        .await?;
    tx.commit()
        .await
        .map_err(|e| MigrateError::pg(&format!("commit copy of {}", table.name), e))?;
    Ok(total)
}

/// One table's stream.
struct TableCopy<'a> {
    /// The rows to copy.
    query: String,
    /// The target table, qualified.
    dst: &'a str,
    /// The column list.
    list: &'a str,
    /// Rows between progress reports.
    step: u64,
}

/// Streams one `COPY (query) TO STDOUT` into `COPY dst FROM STDIN`, both binary, reporting progress every
/// `step` rows. Returns rows and bytes (of the binary stream) written.
async fn copy_one(
    source: &Client,
    tx: &tokio_postgres::Transaction<'_>,
    copy: &TableCopy<'_>,
    progress: &dyn CopyProgress,
) -> Result<(u64, u64), MigrateError> {
    let out = source
        .copy_out(&format!("COPY ({}) TO STDOUT (FORMAT binary)", copy.query))
        .await
        .map_err(|e| MigrateError::pg("copy out", e))?;
    let sink = tx
        .copy_in::<_, Bytes>(&format!(
            "COPY {} ({}) FROM STDIN (FORMAT binary)",
            copy.dst, copy.list
        ))
        .await
        .map_err(|e| MigrateError::pg("copy in", e))?;
    pin_mut!(out);
    pin_mut!(sink);
    let mut stream = out.map_err(|e| MigrateError::pg("copy out", e));
    // PostgreSQL sends one CopyData per row (the binary header rides with the first, the trailer comes alone);
    // the COPY FROM side takes the byte stream cut anywhere, so rows are passed on in blocks (one message and one
    // sink call per block, not per row), and messages count the rows for progress as they arrive.
    let mut block = BytesMut::with_capacity(COPY_BLOCK);
    let (mut messages, mut reported, mut bytes) = (0u64, 0u64, 0u64);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        bytes += chunk.len() as u64;
        block.extend_from_slice(&chunk);
        messages += 1;
        // `messages - 1`: every message but a possible trailer is a row already here.
        if messages - 1 - reported >= copy.step {
            if progress.stopped() {
                return Err(MigrateError::Cancelled);
            }
            progress.rows(messages - 1 - reported);
            reported = messages - 1;
        }
        if block.len() >= COPY_BLOCK {
            sink.send(block.split().freeze())
                .await
                .map_err(|e| MigrateError::pg("copy in", e))?;
            block.reserve(COPY_BLOCK);
        }
    }
    if !block.is_empty() {
        sink.send(block.freeze())
            .await
            .map_err(|e| MigrateError::pg("copy in", e))?;
    }
    let rows = sink
        .finish()
        .await
        .map_err(|e| MigrateError::pg("copy in", e))?;
    progress.rows(rows.saturating_sub(reported));
    Ok((rows, bytes))
}
