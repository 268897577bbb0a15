//! Bulk copy: the tenant's tables read in one snapshot of the source and written to the target with binary
//! COPY, several tables at once, in key-ordered batches so progress moves as rows arrive.
//!
//! A table counts as copied when its target transaction committed; its checkpoint records the snapshot it was
//! read in, and the change-log entries visible in that snapshot (already contained in the copy) are deleted, so
//! copy + replay never applies a change twice. A restart re-copies only tables without a checkpoint (in a new
//! snapshot, with their own cleanup); a table half-copied before is truncated and copied again.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{pin_mut, SinkExt, StreamExt, TryStreamExt};
use tokio_postgres::Client;

use super::capture::quote_literal;
use super::catalog::Table;
use super::pg::Endpoint;
use super::record::TableCheckpoint;
use super::MigrateError;
use crate::tenant::quote_ident;

/// What the copy reports as it goes.
pub trait CopyProgress: Send + Sync {
    fn rows(&self, n: u64);
    /// A table is on the target; persist its checkpoint before returning.
    fn table_done(&self, table: &str, checkpoint: TableCheckpoint) -> Result<(), MigrateError>;
    /// Stop requested (abort, pause, shutdown).
    fn stopped(&self) -> bool;
}

pub struct CopyJob {
    pub tenant: String,
    pub source: Endpoint,
    pub target: Endpoint,
    pub tables: Vec<Table>,
    pub batch_rows: usize,
    pub parallel: usize,
    pub failpoints: Arc<super::failpoint::Failpoints>,
    pub stop: tokio_util::sync::CancellationToken,
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
    let holder = job.source.connect().await?;
    holder
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
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
    let queue = Arc::new(Mutex::new(
        job.tables.iter().cloned().collect::<VecDeque<_>>(),
    ));
    let job = Arc::new(job);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..job.parallel.clamp(1, job.tables.len()) {
        let (job, queue, progress) = (job.clone(), queue.clone(), progress.clone());
        let (exported, snapshot) = (exported.clone(), snapshot.clone());
        workers.spawn(async move { worker(&job, &queue, &*progress, &exported, &snapshot).await });
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

async fn worker(
    job: &CopyJob,
    queue: &Mutex<VecDeque<Table>>,
    progress: &dyn CopyProgress,
    exported: &str,
    snapshot: &str,
) -> Result<(), MigrateError> {
    let source = job.source.connect().await?;
    source
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(exported)
        ))
        .await
        .map_err(|e| MigrateError::pg("import snapshot", e))?;
    let mut target = job.target.connect().await?;
    loop {
        let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
        let Some(table) = next else {
            break;
        };
        if progress.stopped() {
            return Err(MigrateError::Cancelled);
        }
        let rows = copy_table(job, &source, &mut target, &table, progress).await?;
        // Entries committed before the snapshot are in the copy; the others stay for the tee. The cleanup runs
        // before the checkpoint (it is idempotent), so a checkpointed table never has its copied changes left in
        // the log.
        let cleanup = job.source.connect().await?;
        cleanup
            .execute(
                "DELETE FROM pgtenant.change_log WHERE tenant = $1 AND tbl = $2 \
                 AND pg_visible_in_snapshot(xid, $3::text::pg_snapshot)",
                &[&job.tenant, &table.name, &snapshot],
            )
            .await
            .map_err(|e| MigrateError::pg("trim change log after copy", e))?;
        job.failpoints
            .check_until("copy.before_checkpoint", &job.stop)
            .await?;
        progress.table_done(
            &table.name,
            TableCheckpoint {
                rows,
                snapshot: snapshot.to_owned(),
            },
        )?;
        job.failpoints
            .check_until("copy.after_table", &job.stop)
            .await?;
    }
    let _ = source.batch_execute("COMMIT").await;
    Ok(())
}

/// Copies one table in key-ordered batches within one target transaction (emptied first, so a retry after a
/// crash starts clean). Returns the rows copied.
async fn copy_table(
    job: &CopyJob,
    source: &Client,
    target: &mut Client,
    table: &Table,
    progress: &dyn CopyProgress,
) -> Result<u64, MigrateError> {
    let src = job.source.qualified(&table.name);
    let src_rows = format!("{} s", job.source.rows(&table.name));
    let dst = job.target.qualified(&table.name);
    let dst_where = job.target.tenant_where();
    let cols: Vec<String> = table.columns.iter().map(|c| quote_ident(c)).collect();
    let list = cols.join(", ");
    let tx = target
        .transaction()
        .await
        .map_err(|e| MigrateError::pg("begin copy", e))?;
    tx.batch_execute(&format!(
        "SET LOCAL session_replication_role = replica; DELETE FROM {dst}{dst_where}"
    ))
    .await
    .map_err(|e| MigrateError::pg(&format!("prepare {}", table.name), e))?;
    let key: Vec<String> = table.key.iter().map(|k| quote_ident(k)).collect();
    let mut total = 0u64;
    let mut after: Option<String> = None;
    loop {
        if progress.stopped() {
            return Err(MigrateError::Cancelled);
        }
        let (query, last) = if key.is_empty() {
            (format!("SELECT {list} FROM {src_rows}"), None)
        } else {
            let sql = BatchSql {
                src: &src,
                src_rows: &src_rows,
                list: &list,
                key: &key,
            };
            batch_query(source, table, &sql, after.as_deref(), job.batch_rows).await?
        };
        let n = copy_one(source, &tx, &query, &dst, &list).await?;
        total += n;
        progress.rows(n);
        match last {
            Some(l) if n > 0 => after = Some(l),
            _ => break,
        }
    }
    tx.commit()
        .await
        .map_err(|e| MigrateError::pg(&format!("commit copy of {}", table.name), e))?;
    Ok(total)
}

/// The SQL pieces of one table's batches.
struct BatchSql<'a> {
    /// The table (names its row type).
    src: &'a str,
    /// The tenant's rows of it, aliased, for FROM.
    src_rows: &'a str,
    /// The column list.
    list: &'a str,
    /// Quoted key columns.
    key: &'a [String],
}

/// The next batch: the key of its last row (found with an index-ordered probe), and the query for the rows after
/// `after` up to it. `None` as last key means this batch runs to the end of the table.
async fn batch_query(
    source: &Client,
    table: &Table,
    sql: &BatchSql<'_>,
    after: Option<&str>,
    batch_rows: usize,
) -> Result<(String, Option<String>), MigrateError> {
    let BatchSql {
        src,
        src_rows,
        list,
        key,
    } = *sql;
    let tuple = format!("({})", key.join(", "));
    let bound = |json: &str| {
        let lit = quote_literal(json);
        format!(
            "(SELECT {} FROM jsonb_populate_record(NULL::{src}, {lit}::jsonb) AS b)",
            key.iter()
                .map(|k| format!("b.{k}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let lower = after.map(|a| format!("{tuple} > {}", bound(a)));
    let obj = table
        .key
        .iter()
        .zip(key)
        .map(|(raw, q)| format!("{}, {q}", quote_literal(raw)))
        .collect::<Vec<_>>()
        .join(", ");
    let probe = format!(
        "SELECT jsonb_build_object({obj})::text FROM {src_rows} {} ORDER BY {} OFFSET {} LIMIT 1",
        lower
            .as_ref()
            .map(|l| format!("WHERE {l}"))
            .unwrap_or_default(),
        key.join(", "),
        batch_rows.max(1) - 1
    );
    let last: Option<String> = source
        .query_opt(&probe, &[])
        .await
        .map_err(|e| MigrateError::pg(&format!("batch bound of {}", table.name), e))?
        .map(|r| r.get(0));
    let mut conds: Vec<String> = lower.into_iter().collect();
    if let Some(l) = &last {
        conds.push(format!("{tuple} <= {}", bound(l)));
    }
    let filter = if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    };
    let query = format!("SELECT {list} FROM {src_rows}{filter}");
    // With no bound found this batch is the table's tail; say so by returning no "last" key.
    Ok((query, last))
}

/// Streams one `COPY (query) TO STDOUT` into `COPY dst FROM STDIN`, both binary. Returns rows written.
async fn copy_one(
    source: &Client,
    tx: &tokio_postgres::Transaction<'_>,
    query: &str,
    dst: &str,
    list: &str,
) -> Result<u64, MigrateError> {
    let out = source
        .copy_out(&format!("COPY ({query}) TO STDOUT (FORMAT binary)"))
        .await
        .map_err(|e| MigrateError::pg("copy out", e))?;
    let sink = tx
        .copy_in::<_, Bytes>(&format!("COPY {dst} ({list}) FROM STDIN (FORMAT binary)"))
        .await
        .map_err(|e| MigrateError::pg("copy in", e))?;
    pin_mut!(out);
    pin_mut!(sink);
    let mut stream = out.map_err(|e| MigrateError::pg("copy out", e));
    while let Some(chunk) = stream.next().await {
        sink.send(chunk?)
            .await
            .map_err(|e| MigrateError::pg("copy in", e))?;
    }
    sink.finish()
        .await
        .map_err(|e| MigrateError::pg("copy in", e))
}
