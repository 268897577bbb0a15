//! Verification: do the tenant's tables hold the same rows on both sides?
//!
//! Exact under live writes: with the tee's drain lock held (so the target changes only through us), the source
//! is read in a snapshot S, the change-log entries visible in S are applied to the target, and the target's
//! snapshot is taken right after, before the lock is released. The target then holds exactly the source as of S,
//! and the comparison runs in both snapshots while traffic goes on. `count` compares row counts, `hash` compares
//! md5 digests per primary-key range chunk (a mismatch names its range), `full` lists the differing keys.

use std::collections::BTreeMap;
use std::time::Instant;

use tokio_postgres::Client;

use super::apply::Link;
use super::catalog::Table;
use super::pg::Endpoint;
use super::record::{KeyRange, VerifyLevel, VerifyReport};
use super::MigrateError;
use crate::quote::quote_ident;
use crate::quote::quote_literal;

/// Keys listed per table by `full`.
const MAX_LISTED: usize = 100;

pub struct Sides<'a> {
    pub tenant: &'a str,
    pub source: &'a Endpoint,
    pub target: &'a Endpoint,
    pub tables: &'a [Table],
    pub chunk_rows: usize,
}

/// Opens the two aligned snapshots. `link` is the tee's link, taken under its drain lock.
pub async fn aligned(sides: &Sides<'_>, link: &mut Link) -> Result<(Client, Client), MigrateError> {
    // The entries read below are applied by `link`, so it must hold the target before they are read.
    link.claim(sides.tenant).await?;
    let src = sides.source.connect().await?;
    src.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await
        .map_err(|e| MigrateError::pg("begin source snapshot", e))?;
    // Everything the snapshot shows in the log, applied to the target (the ledger skips what already was).
    let rows = src
        .query(
            "SELECT id, tbl, op, old_row::text, new_row::text FROM pgtenant.change_log WHERE tenant = $1 ORDER BY id",
            &[&sides.tenant],
        )
        .await
        .map_err(|e| MigrateError::pg("read change log in snapshot", e))?;
    let entries: Vec<_> = rows.iter().map(super::rowsql::entry).collect();
    for chunk in entries.chunks(super::apply::PASS_LIMIT as usize) {
        link.apply(sides.tenant, chunk).await?;
    }
    let dst = sides.target.connect().await?;
    dst.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SELECT 1")
        .await
        .map_err(|e| MigrateError::pg("begin target snapshot", e))?;
    Ok((src, dst))
}

/// Compares the two snapshots at `level`.
pub async fn compare(
    sides: &Sides<'_>,
    src: &Client,
    dst: &Client,
    level: VerifyLevel,
) -> Result<VerifyReport, MigrateError> {
    let started = Instant::now();
    let mut report = VerifyReport {
        level: Some(level),
        ..VerifyReport::default()
    };
    for t in sides.tables {
        report.tables += 1;
        let (a, b) = (
            count(src, sides.source, t).await?,
            count(dst, sides.target, t).await?,
        );
        report.rows += a;
        if a != b {
            report.violations.push(format!(
                "{}: {a} rows on the source, {b} on the target",
                t.name
            ));
        }
        if level >= VerifyLevel::Hash {
            hash_chunks(sides, src, dst, t, level, &mut report).await?;
        }
    }
    report.passed = report.violations.is_empty();
    report.duration_ms = started.elapsed().as_millis() as u64;
    report.at = crate::state::audit::rfc3339_now();
    Ok(report)
}

async fn count(c: &Client, side: &Endpoint, t: &Table) -> Result<u64, MigrateError> {
    let row = c
        .query_one(
            &format!("SELECT count(*) FROM {} x", side.rows(&t.name)),
            &[],
        )
        .await
        .map_err(|e| MigrateError::pg(&format!("count {}", t.name), e))?;
    Ok(row.get::<_, i64>(0).max(0) as u64)
}

/// `md5(ROW(columns)::text)`: the row's text form over the columns both sides have in common.
fn row_hash(t: &Table) -> String {
    let cols: Vec<String> = t
        .columns
        .iter()
        .map(|c| format!("x.{}", quote_ident(c)))
        .collect();
    format!("md5(ROW({})::text)", cols.join(", "))
}

fn key_json(t: &Table) -> String {
    let parts: Vec<String> = t
        .key
        .iter()
        .map(|k| format!("{}, x.{}", quote_literal(k), quote_ident(k)))
        .collect();
    format!("jsonb_build_object({})::text", parts.join(", "))
}

/// `(k1, k2) OP (key of json)` against `side`'s table type.
fn key_cmp(side: &Endpoint, t: &Table, op: &str, json: &str) -> String {
    let keys: Vec<String> = t.key.iter().map(|k| quote_ident(k)).collect();
    let left: Vec<String> = keys.iter().map(|k| format!("x.{k}")).collect();
    let right: Vec<String> = keys.iter().map(|k| format!("b.{k}")).collect();
    format!(
        "({}) {op} (SELECT {} FROM jsonb_populate_record(NULL::{}, {}::jsonb) AS b)",
        left.join(", "),
        right.join(", "),
        side.qualified(&t.name),
        quote_literal(json)
    )
}

/// Chunk `i` of `bounds` (each the first key of a chunk): `[bounds[i], bounds[i+1])`, the first chunk open below.
fn chunk_filter(side: &Endpoint, t: &Table, bounds: &[String], i: usize) -> String {
    let mut conds = Vec::new();
    if i > 0 {
        conds.push(key_cmp(side, t, ">=", &bounds[i]));
    }
    if let Some(next) = bounds.get(i + 1) {
        conds.push(key_cmp(side, t, "<", next));
    }
    if conds.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conds.join(" AND "))
    }
}

async fn hash_chunks(
    sides: &Sides<'_>,
    src: &Client,
    dst: &Client,
    t: &Table,
    level: VerifyLevel,
    report: &mut VerifyReport,
) -> Result<(), MigrateError> {
    if t.key.is_empty() {
        return hash_whole(sides, src, dst, t, report).await;
    }
    let h = row_hash(t);
    let order: Vec<String> = t
        .key
        .iter()
        .map(|k| format!("x.{}", quote_ident(k)))
        .collect();
    let order = order.join(", ");
    let bounds = chunk_bounds(sides, src, t, &order).await?;
    for i in 0..bounds.len().max(1) {
        let q = |side: &Endpoint| {
            format!(
                "SELECT coalesce(md5(string_agg({h}, '' ORDER BY {order})), '') FROM {} x {}",
                side.rows(&t.name),
                chunk_filter(side, t, &bounds, i)
            )
        };
        let a: String = one(src, &q(sides.source)).await?;
        let b: String = one(dst, &q(sides.target)).await?;
        if a == b {
            continue;
        }
        let from = if i > 0 { bounds.get(i).cloned() } else { None };
        let to = bounds.get(i + 1).cloned();
        report.violations.push(format!(
            "{}: rows differ in key range [{}, {})",
            t.name,
            from.as_deref().unwrap_or("start"),
            to.as_deref().unwrap_or("end")
        ));
        report.ranges.push(KeyRange {
            table: t.name.clone(),
            from,
            to,
        });
        if level == VerifyLevel::Full {
            let keys = differing_keys(sides, src, dst, t, &bounds, i).await?;
            for k in keys {
                report
                    .violations
                    .push(format!("{}: row {k} differs", t.name));
            }
        }
    }
    Ok(())
}

/// A table without a primary key: one hash over all its rows, in row order.
async fn hash_whole(
    sides: &Sides<'_>,
    src: &Client,
    dst: &Client,
    t: &Table,
    report: &mut VerifyReport,
) -> Result<(), MigrateError> {
    let h = row_hash(t);
    let q = |side: &Endpoint| {
        format!(
            "SELECT coalesce(md5(string_agg(h, '' ORDER BY h)), '') FROM (SELECT {h} AS h FROM {} x) s",
            side.rows(&t.name)
        )
    };
    let a: String = one(src, &q(sides.source)).await?;
    let b: String = one(dst, &q(sides.target)).await?;
    if a != b {
        report.violations.push(format!(
            "{}: rows differ (table without primary key)",
            t.name
        ));
        report.ranges.push(KeyRange {
            table: t.name.clone(),
            from: None,
            to: None,
        });
    }
    Ok(())
}

/// The key of every `chunk_rows`-th row of the source, in key order: the chunks' lower bounds.
async fn chunk_bounds(
    sides: &Sides<'_>,
    src: &Client,
    t: &Table,
    order: &str,
) -> Result<Vec<String>, MigrateError> {
    let bounds_sql = format!(
        "SELECT k FROM (SELECT {} AS k, row_number() OVER (ORDER BY {order}) AS rn FROM {} x) s \
         WHERE (rn - 1) % {} = 0 ORDER BY rn",
        key_json(t),
        sides.source.rows(&t.name),
        sides.chunk_rows.max(1)
    );
    Ok(src
        .query(&bounds_sql, &[])
        .await
        .map_err(|e| MigrateError::pg(&format!("chunk bounds of {}", t.name), e))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

async fn one(c: &Client, sql: &str) -> Result<String, MigrateError> {
    let row = c
        .query_one(sql, &[])
        .await
        .map_err(|e| MigrateError::pg("hash chunk", e))?;
    Ok(row.get(0))
}

async fn differing_keys(
    sides: &Sides<'_>,
    src: &Client,
    dst: &Client,
    t: &Table,
    bounds: &[String],
    i: usize,
) -> Result<Vec<String>, MigrateError> {
    let rows = |side: &Endpoint| {
        format!(
            "SELECT {}, {} FROM {} x {}",
            key_json(t),
            row_hash(t),
            side.rows(&t.name),
            chunk_filter(side, t, bounds, i)
        )
    };
    let a = fetch(src, &rows(sides.source)).await?;
    let b = fetch(dst, &rows(sides.target)).await?;
    let mut out = Vec::new();
    for (k, h) in &a {
        if b.get(k) != Some(h) {
            out.push(k.clone());
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            out.push(k.clone());
        }
    }
    out.truncate(MAX_LISTED);
    Ok(out)
}

async fn fetch(c: &Client, sql: &str) -> Result<BTreeMap<String, String>, MigrateError> {
    let rows = c
        .query(sql, &[])
        .await
        .map_err(|e| MigrateError::pg("list rows", e))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// A report's key range as the SQL filter it names, for repair.
pub fn range_filter(side: &Endpoint, t: &Table, range: &KeyRange) -> String {
    let mut conds = Vec::new();
    if let Some(f) = &range.from {
        conds.push(key_cmp(side, t, ">=", f));
    }
    if let Some(to) = &range.to {
        conds.push(key_cmp(side, t, "<", to));
    }
    if conds.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conds.join(" AND "))
    }
}
