//! Splitting a big table into block ranges for the bulk copy: each range is read with a TID range scan
//! (`ctid >= '(lo,0)' AND ctid < '(hi,0)'`) in the one exported snapshot and written in a target transaction
//! of its own, so one large table is copied by several streams at once. The table counts as copied when its
//! last range committed.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio_postgres::Client;

use super::catalog::Table;
use super::pg::Endpoint;
use super::MigrateError;

/// A part of the copy: a whole table, or one block range of a split table.
#[derive(Clone)]
pub(super) struct Piece {
    pub table: Table,
    /// `[lo, hi)` in blocks; `None` bounds are open (the first range has no lower bound, the last no upper,
    /// so rows in blocks added after the size was read are not missed).
    pub range: Option<(Option<u64>, Option<u64>)>,
    pub split: Option<Arc<Split>>,
}

/// What the ranges of one split table share: how many are left, and the rows and bytes copied so far.
#[derive(Default)]
pub(super) struct Split {
    left: AtomicUsize,
    rows: AtomicU64,
    bytes: AtomicU64,
}

impl Split {
    /// One range committed; the table's totals when it was the last.
    pub fn done(&self, rows: u64, bytes: u64) -> Option<(u64, u64)> {
        let rows = self.rows.fetch_add(rows, Ordering::AcqRel) + rows;
        let bytes = self.bytes.fetch_add(bytes, Ordering::AcqRel) + bytes;
        (self.left.fetch_sub(1, Ordering::AcqRel) == 1).then_some((rows, bytes))
    }
}

impl Piece {
    /// The condition selecting this piece's rows (alias `s`), or nothing for a whole table.
    pub fn ctid_cond(&self) -> String {
        let tid = |b: u64| format!("'({b},0)'::tid");
        match self.range {
            None => String::new(),
            Some((lo, hi)) => {
                let mut c: Vec<String> = Vec::new();
                if let Some(lo) = lo {
                    c.push(format!("s.ctid >= {}", tid(lo)));
                }
                if let Some(hi) = hi {
                    c.push(format!("s.ctid < {}", tid(hi)));
                }
                c.join(" AND ")
            }
        }
    }
}

/// The pieces of `tables`: a table of at least `split_bytes` on the source (read in the snapshot's
/// transaction on `client`) becomes `parallel` block ranges, any other stays whole.
pub(super) async fn plan(
    client: &Client,
    source: &Endpoint,
    tables: &[Table],
    parallel: usize,
    split_bytes: u64,
) -> Result<Vec<Piece>, MigrateError> {
    let mut pieces = Vec::new();
    for t in tables {
        let blocks = if parallel > 1 && split_bytes > 0 {
            big_table_blocks(client, source, t, split_bytes).await?
        } else {
            None
        };
        match blocks {
            Some(blocks) if blocks >= parallel as u64 => {
                tracing::info!(table = %t.name, blocks, ranges = parallel, "copying a big table as block ranges at once");
                pieces.extend(ranges(t, blocks, parallel))
            }
            _ => pieces.push(Piece {
                table: t.clone(),
                range: None,
                split: None,
            }),
        }
    }
    Ok(pieces)
}

/// The table's size in blocks when it is at least `split_bytes`, after locking it for the copy: row positions
/// must hold until the last range is read (VACUUM FULL, CLUSTER or a rewriting ALTER TABLE between two ranges
/// would move rows across them; they wait for the copy instead).
async fn big_table_blocks(
    client: &Client,
    source: &Endpoint,
    t: &Table,
    split_bytes: u64,
) -> Result<Option<u64>, MigrateError> {
    let table = source.qualified(&t.name);
    let row = client
        .query_one(
            "SELECT pg_relation_size($1::text::regclass)::int8, current_setting('block_size')::int8",
            &[&table],
        )
        .await
        .map_err(|e| MigrateError::pg(&format!("size of {}", t.name), e))?;
    let (size, block): (i64, i64) = (row.get(0), row.get(1));
    if (size as u64) < split_bytes {
        return Ok(None);
    }
    client
        .batch_execute(&format!("LOCK TABLE {table} IN ACCESS SHARE MODE"))
        .await
        .map_err(|e| MigrateError::pg(&format!("lock {}", t.name), e))?;
    Ok(Some(size as u64 / block.max(1) as u64))
}

/// `n` block ranges covering `blocks` blocks (and whatever follows them).
fn ranges(table: &Table, blocks: u64, n: usize) -> Vec<Piece> {
    let split = Arc::new(Split {
        left: AtomicUsize::new(n),
        ..Split::default()
    });
    let step = blocks.div_ceil(n as u64);
    (0..n as u64)
        .map(|i| Piece {
            table: table.clone(),
            range: Some((
                (i > 0).then_some(i * step),
                (i + 1 < n as u64).then_some((i + 1) * step),
            )),
            split: Some(split.clone()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        Table {
            name: "big".into(),
            columns: vec!["id".into()],
            identity_always: vec![],
            key: vec!["id".into()],
        }
    }

    #[test]
    fn ranges_cover_every_block_and_beyond() {
        let p = ranges(&table(), 10, 3);
        let conds: Vec<String> = p.iter().map(|p| p.ctid_cond()).collect();
        assert_eq!(
            conds,
            [
                "s.ctid < '(4,0)'::tid",
                "s.ctid >= '(4,0)'::tid AND s.ctid < '(8,0)'::tid",
                "s.ctid >= '(8,0)'::tid",
            ]
        );
        let split = p[0].split.clone().unwrap();
        assert_eq!(split.done(5, 50), None);
        assert_eq!(split.done(6, 60), None);
        assert_eq!(split.done(7, 70), Some((18, 180)));
    }
}
