//! Verification on demand and before cutover: both sides compared at one consistent point while the tee runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::record::{State, VerifyLevel, VerifyReport};
use super::registry::{Direction, Live};
use super::sides::{endpoints, ensure_tee};
use super::verify::{self, Sides};
use super::MigrateError;
use crate::context::Shared;

/// Runs a verification at `level` now and records it. Waits for `live.lock`.
pub async fn verify_now(
    shared: &Arc<Shared>,
    live: &Arc<Live>,
    level: VerifyLevel,
) -> Result<VerifyReport, MigrateError> {
    let _one = live.lock.lock().await;
    verify_locked(shared, live, level).await
}

/// Verification with `live.lock` held by the caller.
pub async fn verify_locked(
    shared: &Arc<Shared>,
    live: &Arc<Live>,
    level: VerifyLevel,
) -> Result<VerifyReport, MigrateError> {
    let rec = shared
        .migrations
        .get(&live.tenant)
        .ok_or(MigrateError::Cancelled)?;
    if matches!(rec.state, State::DualWrite | State::Migrated) && !rec.paused {
        ensure_tee(shared, live, &rec).await?;
    }
    let (tee_dir, tee) = live.tee().ok_or_else(|| {
        MigrateError::Refused(format!(
            "verification needs dual_write or migrated; the migration is {}",
            rec.shown_state()
        ))
    })?;
    let (source, target) = endpoints(shared, &rec)?;
    // After cutover the target is authoritative: compare it against the (frozen) source.
    let (a, b) = match tee_dir {
        Direction::Forward => (&source, &target),
        Direction::Reverse => (&target, &source),
    };
    let tables = live.tables();
    let sides = Sides {
        tenant: &rec.tenant,
        source: a,
        target: b,
        tables: &tables,
        chunk_rows: shared.config.load().migration.verify_chunk_rows,
    };
    let started = Instant::now();
    let (src, dst) = {
        let mut guard = tee.hold(Instant::now() + Duration::from_secs(60)).await?;
        let link = guard.as_mut().ok_or(MigrateError::Cancelled)?;
        verify::aligned(&sides, link).await?
    };
    let report = verify::compare(&sides, &src, &dst, level).await?;
    let m = &shared.metrics;
    let l = vec![metrics::Label::new("tenant", rec.tenant.to_string())];
    m.histogram("verification_duration_seconds", l.clone())
        .record(started.elapsed().as_secs_f64());
    m.counter("verification_violations_total", l)
        .increment(report.violations.len() as u64);
    super::events::verified(shared, &rec.tenant, &report);
    let report2 = report.clone();
    shared
        .migrations
        .update(&rec.tenant, |r| r.verification = Some(report2))?;
    Ok(report)
}
