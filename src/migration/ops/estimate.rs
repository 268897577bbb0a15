//! `migrate estimate`: how big a move would be (tables, rows, bytes, what the target lacks) and how long it
//! would take, from the source's catalog and the rates this proxy measured on its earlier moves (the history),
//! with the same preflight checks as `start` and nothing installed or changed on either side.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;

use super::preflight;
use super::reply::{Estimate, Figure, Place, TableEstimate};
use super::request::StartRequest;
use super::start::{check_target, plan, source_tables, superuser};
use crate::admin::code::AdminError;
use crate::context::Shared;
use crate::migration::catalog::Table;
use crate::migration::history::{copy_model, median, HistoryEntry};
use crate::migration::pg::Endpoint;
use crate::migration::record::VerifyLevel;
use crate::migration::sides::endpoints;
use crate::migration::MigrateError;

/// Tables with fewer rows than this (by the planner's estimate) are counted exactly.
const EXACT_BELOW: i64 = 200_000;
/// Changes the tee applies per second during catch-up (row-at-a-time statements), until measured.
const DEFAULT_APPLY_ROWS_PER_S: f64 = 20_000.0;
/// How long the source's write rate is sampled for the catch-up estimate.
const WRITE_SAMPLE: Duration = Duration::from_secs(1);

pub async fn estimate(shared: &Arc<Shared>, req: StartRequest) -> Result<Estimate, AdminError> {
    let rec = plan(shared, &req)?;
    let (source, target) = endpoints(shared, &rec).map_err(preflight)?;
    let src = source.connect().await.map_err(preflight)?;
    let tables = source_tables(&src, &source).await?;
    let mut problems = Vec::new();
    if let Err(e) = superuser(&src, &source.backend).await {
        problems.push(e.message);
    }
    let missing = match target.connect().await {
        Ok(dst) => {
            if let Err(e) = superuser(&dst, &target.backend).await {
                problems.push(e.message);
            }
            if let Err(e) = check_target(&dst, &source, &target, &tables, req.allow_existing).await
            {
                problems.push(e.message);
            }
            missing_on_target(&src, &dst, &source, &target)
                .await
                .map_err(preflight)?
        }
        Err(e) => {
            problems.push(format!("target: {e}"));
            Vec::new()
        }
    };
    let sizes = table_sizes(&src, &source, &tables)
        .await
        .map_err(preflight)?;
    let writes_per_s = write_rate(&src, &source, &tables)
        .await
        .map_err(preflight)?;
    let history = shared.migrations.history.read().unwrap_or_default();
    Ok(assemble(Facts {
        tenant: req.tenant.clone(),
        source: Place::source(&rec),
        target: Place::target(&rec),
        problems,
        missing,
        sizes,
        no_key: tables
            .iter()
            .filter(|t| t.key.is_empty())
            .map(|t| t.name.clone())
            .collect(),
        sequences: sequences(&src, &source.schema).await.map_err(preflight)?,
        writes_per_s,
        level: req.verify,
        history,
    }))
}

/// What the estimate is computed from.
struct Facts {
    tenant: crate::tenant::TenantId,
    source: Place,
    target: Place,
    problems: Vec<String>,
    missing: Vec<String>,
    sizes: Vec<TableEstimate>,
    no_key: Vec<String>,
    sequences: u64,
    writes_per_s: f64,
    level: VerifyLevel,
    history: Vec<HistoryEntry>,
}

/// The durations, from the sizes and the rates (measured where the history has them, else the defaults).
fn assemble(f: Facts) -> Estimate {
    let rows: u64 = f.sizes.iter().map(|t| t.rows).sum();
    let bytes: u64 = f.sizes.iter().map(|t| t.bytes).sum();
    let model = copy_model(&f.history);
    let verify = verify_rate(&f.history, f.level);
    let copy_s = model.seconds(rows, f.sizes.len());
    // Changes written during the copy, applied by the tee afterwards.
    let catch_up_s = f.writes_per_s * copy_s / DEFAULT_APPLY_ROWS_PER_S;
    let verify_s = rows as f64 / verify.value;
    let pauses: Vec<f64> = f.history.iter().filter_map(|e| e.pause_ms).collect();
    Estimate {
        tenant: f.tenant,
        source: f.source,
        target: f.target,
        preflight_passed: f.problems.is_empty(),
        problems: f.problems,
        tables: f.sizes,
        rows,
        bytes,
        tables_without_primary_key: f.no_key,
        sequences: f.sequences,
        missing_on_target: f.missing,
        copy_rows_per_s: copy_figure(&model),
        copy_per_table_s: model.per_table_s,
        verify_rows_per_s: verify,
        source_writes_per_s: f.writes_per_s,
        copy_s,
        catch_up_s,
        verify_s,
        total_s: copy_s + catch_up_s + verify_s,
        expected_pause_ms: median(pauses.clone()),
        pause_from_moves: pauses.len(),
    }
}

/// The copy rate and where it comes from.
fn copy_figure(m: &crate::migration::history::CopyModel) -> Figure {
    let from = match (m.moves, m.fitted) {
        (0, _) => "default: no earlier move measured".to_string(),
        (n, true) => format!("measured: fitted to {n} earlier moves (rate and per-table cost)"),
        (n @ (1 | 2), false) => format!("measured: mean of {n} earlier moves"),
        (n, false) => format!("measured: median of {n} earlier moves"),
    };
    Figure {
        value: m.rows_per_s,
        from,
    }
}

/// Rows per second of verification at `level` in earlier moves, or a default per level.
fn verify_rate(history: &[HistoryEntry], level: VerifyLevel) -> Figure {
    let rates: Vec<f64> = history
        .iter()
        .filter(|e| e.verification_level == Some(level))
        .filter_map(|e| e.verification_rows_per_s)
        .collect();
    let default = match level {
        VerifyLevel::Count => 2_000_000.0,
        VerifyLevel::Hash => 400_000.0,
        VerifyLevel::Full => 150_000.0,
    };
    Figure::measured_or(rates, default)
}

impl Figure {
    fn measured_or(rates: Vec<f64>, default: f64) -> Figure {
        let moves = rates.len();
        match median(rates) {
            Some(value) => Figure {
                value,
                from: format!("measured: median of {moves} earlier moves"),
            },
            None => Figure {
                value: default,
                from: "default: no earlier move measured".into(),
            },
        }
    }
}

/// Rows and bytes per table: exact counts below [`EXACT_BELOW`] rows, the planner's estimate above (sampled
/// for shared tables); bytes are the table's with indexes and TOAST, or the tenant's share of a shared table.
async fn table_sizes(
    src: &Client,
    source: &Endpoint,
    tables: &[Table],
) -> Result<Vec<TableEstimate>, MigrateError> {
    let mut out = Vec::with_capacity(tables.len());
    for t in tables {
        let row = src
            .query_one(
                "SELECT c.reltuples::bigint, pg_total_relation_size(c.oid) FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
                &[&source.schema, &t.name],
            )
            .await
            .map_err(|e| MigrateError::pg("table size", e))?;
        let (planner, total): (i64, i64) = (row.get(0), row.get(1));
        let exact = planner < EXACT_BELOW;
        let all = if exact {
            count(src, &source.qualified(&t.name), "").await?
        } else {
            planner
        };
        let rows = match (&source.filter, exact) {
            (None, _) => all,
            (Some(_), true) => count(src, &source.rows(&t.name), "").await?,
            // 1% of the table's pages, scaled up.
            (Some(_), false) => {
                let from = format!("{} TABLESAMPLE SYSTEM (1)", source.qualified(&t.name));
                count(src, &from, &source.tenant_where()).await? * 100
            }
        };
        let share = if all > 0 {
            rows as f64 / all as f64
        } else {
            1.0
        };
        out.push(TableEstimate {
            table: t.name.clone(),
            rows: rows.max(0) as u64,
            rows_exact: exact,
            bytes: (total.max(0) as f64 * share.min(1.0)) as u64,
            primary_key: !t.key.is_empty(),
        });
    }
    Ok(out)
}

async fn count(src: &Client, from: &str, filter: &str) -> Result<i64, MigrateError> {
    src.query_one(&format!("SELECT count(*) FROM {from} x{filter}"), &[])
        .await
        .map(|r| r.get(0))
        .map_err(|e| MigrateError::pg("count rows", e))
}

/// Sequences in the tenant's schema (their values are moved at cutover).
async fn sequences(src: &Client, schema: &str) -> Result<u64, MigrateError> {
    src.query_one(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relkind = 'S'",
        &[&schema],
    )
    .await
    .map(|r| r.get::<_, i64>(0) as u64)
    .map_err(|e| MigrateError::pg("count sequences", e))
}

/// Inserted, updated and deleted rows per second in the tables, sampled over [`WRITE_SAMPLE`] (whole tables:
/// for shared tables an upper bound of the tenant's own rate).
async fn write_rate(
    src: &Client,
    source: &Endpoint,
    tables: &[Table],
) -> Result<f64, MigrateError> {
    let names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
    let sample = || async {
        src.query_one(
            "SELECT pg_stat_clear_snapshot(), coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)::bigint \
             FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = ANY($2)",
            &[&source.schema, &names],
        )
        .await
        .map(|r| r.get::<_, i64>(1))
        .map_err(|e| MigrateError::pg("sample writes", e))
    };
    let before = sample().await?;
    tokio::time::sleep(WRITE_SAMPLE).await;
    let after = sample().await?;
    Ok((after - before).max(0) as f64 / WRITE_SAMPLE.as_secs_f64())
}

/// Extensions the source database has and the target's lacks, and types of the tenant's schema missing from
/// the target's schema (when the target schema exists: else `start` creates it with them).
async fn missing_on_target(
    src: &Client,
    dst: &Client,
    source: &Endpoint,
    target: &Endpoint,
) -> Result<Vec<String>, MigrateError> {
    const EXTENSIONS: &str = "SELECT extname::text FROM pg_extension WHERE $1::text IS NOT NULL";
    const TYPES: &str =
        "SELECT t.typname::text FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace \
         LEFT JOIN pg_class c ON c.oid = t.typrelid WHERE n.nspname = $1 \
         AND t.typtype IN ('e', 'd', 'c', 'r') AND (t.typrelid = 0 OR c.relkind = 'c')";
    let theirs = names(dst, EXTENSIONS, "").await?;
    let mut missing: Vec<String> = names(src, EXTENSIONS, "")
        .await?
        .into_iter()
        .filter(|e| !theirs.contains(e))
        .map(|e| format!("extension {e}"))
        .collect();
    let target_types = names(dst, TYPES, &target.schema).await?;
    let schema_there = crate::migration::catalog::schema_exists(dst, &target.schema).await?;
    if schema_there {
        missing.extend(
            names(src, TYPES, &source.schema)
                .await?
                .into_iter()
                .filter(|t| !target_types.contains(t))
                .map(|t| format!("type {}.{t}", target.schema)),
        );
    }
    Ok(missing)
}

/// The first column of `sql`'s rows, as text (`$1` is `param`).
async fn names(c: &Client, sql: &str, param: &str) -> Result<Vec<String>, MigrateError> {
    c.query(sql, &[&param])
        .await
        .map(|rows| rows.iter().map(|r| r.get::<_, String>(0)).collect())
        .map_err(|e| MigrateError::pg("catalog", e))
}
