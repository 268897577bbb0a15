//! `migrate repair`: the key ranges the last verification found different, copied again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::live_of;
use super::reply::Repaired;
use crate::admin::code::{AdminCode, AdminError};
use crate::context::Shared;
use crate::migration::catalog::Table;
use crate::migration::pg::Endpoint;
use crate::migration::record::{KeyRange, State, VerifyLevel};
use crate::migration::sides::endpoints;
use crate::migration::verification::verify_locked;
use crate::migration::verify::{self, Sides};
use crate::migration::MigrateError;
use crate::quote::quote_ident;
use crate::tenant::TenantId;

/// `migrate repair T`: re-copies the key ranges the last verification found different, under the tee's drain
/// lock and in one source snapshot (so the ranges end exactly as the source had them), then verifies again.
pub async fn repair(shared: &Arc<Shared>, tenant: &TenantId) -> Result<Repaired, AdminError> {
    let (rec, live) = live_of(shared, tenant)?;
    if rec.state != State::DualWrite {
        return Err(AdminError::new(
            AdminCode::InvalidState,
            format!(
                "repair needs dual_write; the migration is {}",
                rec.shown_state()
            ),
        ));
    }
    let ranges = rec
        .verification
        .as_ref()
        .map(|v| v.ranges.clone())
        .unwrap_or_default();
    if ranges.is_empty() {
        return Err(AdminError::new(
            AdminCode::InvalidState,
            "the last verification found nothing to repair (run migrate verify --level hash)",
        ));
    }
    let _one = live.lock.lock().await;
    let (source, target) = endpoints(shared, &rec)?;
    let tables = live.tables();
    let (_, tee) = live
        .tee()
        .ok_or_else(|| AdminError::new(AdminCode::InvalidState, "the tee is not running"))?;
    let sides = Sides {
        tenant,
        source: &source,
        target: &target,
        tables: &tables,
        chunk_rows: 1,
    };
    let mut repaired = 0u64;
    {
        let mut guard = tee.hold(Instant::now() + Duration::from_secs(60)).await?;
        let link = guard.as_mut().ok_or(MigrateError::Cancelled)?;
        let (src, _dst) = verify::aligned(&sides, link).await?;
        for range in &ranges {
            let Some(t) = tables.iter().find(|t| t.name == range.table) else {
                continue;
            };
            repaired += repair_range(&src, &mut link.to, &source, &target, t, range).await?;
        }
    }
    let report = verify_locked(shared, &live, VerifyLevel::Hash).await?;
    Ok(Repaired {
        tenant: tenant.clone(),
        ranges: ranges.len(),
        rows_copied: repaired,
        verification: report,
    })
}

async fn repair_range(
    src: &Client,
    dst: &mut Client,
    source: &Endpoint,
    target: &Endpoint,
    t: &Table,
    range: &KeyRange,
) -> Result<u64, MigrateError> {
    let cols: Vec<String> = t.columns.iter().map(|c| quote_ident(c)).collect();
    let list = cols.join(", ");
    let tx = dst
        .transaction()
        .await
        .map_err(|e| MigrateError::pg("begin repair", e))?;
    tx.batch_execute(&format!(
        "SET LOCAL session_replication_role = replica; DELETE FROM {} x {}{}",
        target.qualified(&t.name),
        verify::range_filter(target, t, range),
        target.tenant_and("x")
    ))
    .await
    .map_err(|e| MigrateError::pg("clear range", e))?;
    let rows = src
        .query(
            &format!(
                "SELECT to_jsonb(x)::text FROM {} x {}",
                source.rows(&t.name),
                verify::range_filter(source, t, range)
            ),
            &[],
        )
        .await
        .map_err(|e| MigrateError::pg("read range", e))?;
    let q = target.qualified(&t.name);
    let insert = format!(
        "INSERT INTO {q} ({list}) OVERRIDING SYSTEM VALUE SELECT {list} FROM jsonb_populate_record(NULL::{q}, $1::text::jsonb)"
    );
    let stmt = tx
        .prepare(&insert)
        .await
        .map_err(|e| MigrateError::pg("prepare repair", e))?;
    for r in &rows {
        let v: String = r.get(0);
        tx.execute(&stmt, &[&v])
            .await
            .map_err(|e| MigrateError::pg("copy range", e))?;
    }
    tx.commit()
        .await
        .map_err(|e| MigrateError::pg("commit repair", e))?;
    Ok(rows.len() as u64)
}
