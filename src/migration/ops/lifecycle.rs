//! The commands that move a running migration on or end it: verify, cutover, rollback, finalize, abort.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::live_of;
use super::reply::{Aborted, CutOver, Finalized, RolledBack};
use crate::admin::code::{AdminCode, AdminError};
use crate::context::Shared;
use crate::migration::machine::{transition_off_thread, Event};
use crate::migration::pg::Endpoint;
use crate::migration::record::{Record, State, VerifyLevel, VerifyReport};
use crate::migration::registry::Live;
use crate::migration::sides::{endpoints, ensure_tee, stop_tee};
use crate::migration::verification::{verify_locked, verify_now};
use crate::migration::{capture, cutover, driver, rollback, MigrateError};
use crate::quote::quote_ident;
use crate::routing::Route;
use crate::tenant::TenantId;

/// `migrate verify T [--level L]`.
pub async fn verify_cmd(
    shared: &Arc<Shared>,
    tenant: &TenantId,
    level: Option<VerifyLevel>,
) -> Result<VerifyReport, AdminError> {
    let (rec, live) = live_of(shared, tenant)?;
    Ok(verify_now(shared, &live, level.unwrap_or(rec.verify)).await?)
}

/// `migrate cutover T`: verification at the migration's level must pass first (run now if it has not).
pub async fn cutover_cmd(shared: &Arc<Shared>, tenant: &TenantId) -> Result<CutOver, AdminError> {
    let (rec, live) = live_of(shared, tenant)?;
    if rec.state != State::DualWrite || rec.paused {
        return Err(AdminError::new(
            AdminCode::InvalidState,
            format!(
                "cutover needs state dual_write (not paused); the migration is {}",
                rec.shown_state()
            ),
        ));
    }
    let now = crate::migration::record::now_ms() / 1000;
    if let Some(w) = rec.cutover_window.as_ref().filter(|w| !w.contains(now)) {
        return Err(AdminError::new(
            AdminCode::InvalidState,
            format!(
                "outside the migration's cutover window {w} (opens in {} s); it waits in dual_write",
                w.opens_in(now)
            ),
        ));
    }
    let _one = live.lock.lock().await;
    ensure_tee(shared, &live, &rec).await?;
    let passed = rec
        .verification
        .as_ref()
        .is_some_and(|v| v.passed && v.level.is_some_and(|l| l >= rec.verify));
    if !passed {
        let report = verify_locked(shared, &live, rec.verify).await?;
        if !report.passed {
            return Err(AdminError::new(
                AdminCode::VerificationFailed,
                format!(
                    "verification ({:?}) found {} mismatch(es): {}",
                    rec.verify,
                    report.violations.len(),
                    report
                        .violations
                        .iter()
                        .take(5)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            ));
        }
    }
    cutover::cutover(shared, &live).await.map_err(|e| {
        let mut err = AdminError::from(e);
        if matches!(err.code, AdminCode::MigrationFailed | AdminCode::Timeout) {
            err.code = AdminCode::CutoverFailed;
        }
        err
    })
}

/// While the store has not told whether the move's route swap is in, the move's outcome is not known: dropping
/// either side's data, or undoing the move, could leave the tenant routed to what is gone.
fn refuse_while_swap_pending(shared: &Shared, tenant: &TenantId) -> Result<(), AdminError> {
    match shared.migrations.swap_pending(tenant.as_str()) {
        true => Err(AdminError::new(
            AdminCode::InvalidState,
            format!("tenant {tenant:?}'s route swap waits for the control plane's answer; try again once it has one"),
        )),
        false => Ok(()),
    }
}

/// `migrate rollback T`.
pub async fn rollback_cmd(
    shared: &Arc<Shared>,
    tenant: &TenantId,
) -> Result<RolledBack, AdminError> {
    let (rec, live) = live_of(shared, tenant)?;
    let _one = live.lock.lock().await;
    if rec.state == State::Migrated {
        ensure_tee(shared, &live, &rec).await?;
    }
    Ok(rollback::rollback(shared, &live).await?)
}

/// `migrate finalize T [--drop-source]`.
pub async fn finalize(
    shared: &Arc<Shared>,
    tenant: &TenantId,
    drop_source: bool,
    drop_source_after_s: Option<u64>,
) -> Result<Finalized, AdminError> {
    if drop_source && drop_source_after_s.is_some() {
        return Err(AdminError::invalid(
            "give --drop-source or --drop-source-after, not both",
        ));
    }
    let (rec, live) = live_of(shared, tenant)?;
    refuse_while_swap_pending(shared, tenant)?;
    if rec.state != State::Migrated {
        return Err(AdminError::new(
            AdminCode::InvalidState,
            format!(
                "finalize needs state migrated; the migration is {}",
                rec.shown_state()
            ),
        ));
    }
    // The task first (it may be waiting for the lock), then the lock.
    if !on_route(shared, &rec.target, tenant) {
        return Err(AdminError::new(AdminCode::InvalidState,
            "the tenant's route is not the target's (a rollback did not finish); run migrate rollback again",
        ));
    }
    live.halt().await;
    let _one = live.lock.lock().await;
    if let Some((_, tee)) = live.tee() {
        // The source gets every change made so far, so it is a consistent (frozen) copy when capture goes.
        tee.drain_to_empty(Instant::now() + Duration::from_secs(30))
            .await?;
    }
    stop_tee(shared, &live).await;
    let (source, target) = endpoints(shared, &rec)?;
    let (src, dst) = (source.connect().await?, target.connect().await?);
    capture::remove(&dst, tenant).await?;
    // On the source the fence stays as long as the data does.
    capture::remove(&src, tenant).await?;
    if drop_source {
        src.batch_execute(&super::drops::drop_tenant_sql(&source, &rec.tables))
            .await
            .map_err(|e| MigrateError::pg("drop the tenant's data on the source", e))?;
        capture::remove_fence(&src, tenant).await?;
    }
    // Scheduled before the state changes: a drop that cannot be persisted leaves the move to finalize again.
    let scheduled = drop_source_after_s.map(|s| super::drops::plan(&rec, &source, s));
    if let Some(d) = &scheduled {
        shared
            .migrations
            .drops
            .schedule(d.clone())
            .map_err(AdminError::state_write)?;
    }
    transition_off_thread(shared, tenant, Event::Finalized, |_| {}).await?;
    shared.migrations.forget_live(tenant);
    Ok(Finalized {
        tenant: tenant.clone(),
        state: State::Completed.as_str().to_owned(),
        source_dropped: drop_source,
        source_drop_due: scheduled.as_ref().map(|d| d.due.clone()),
    })
}

/// `migrate abort T [--drop-target]`: from any state before the swap, back to how the source was.
pub async fn abort(
    shared: &Arc<Shared>,
    tenant: &TenantId,
    drop_target: bool,
) -> Result<Aborted, AdminError> {
    let rec = shared.migrations.get(tenant).ok_or_else(|| {
        AdminError::new(
            AdminCode::NoMigration,
            format!("tenant {tenant:?} has no migration"),
        )
    })?;
    refuse_while_swap_pending(shared, tenant)?;
    if !rec.state.before_swap() {
        return Err(AdminError::new(
            AdminCode::InvalidState,
            format!(
                "abort works before cutover; the migration is {} (use rollback)",
                rec.shown_state()
            ),
        ));
    }
    super::lease_confirmed(shared, tenant)?;
    let live = shared.migrations.live(tenant);
    let _one = match &live {
        Some(l) => {
            l.halt().await;
            Some(l.lock.lock().await)
        }
        None => None,
    };
    // A cutover that held the lock may have swapped the route meanwhile: then it is too late to abort.
    let rec = shared.migrations.get(tenant).unwrap_or(rec);
    if !rec.state.before_swap() || on_route(shared, &rec.target, tenant) {
        if let Some(l) = &live {
            respawn(shared, l);
        }
        return Err(AdminError::new(
            AdminCode::InvalidState,
            format!(
                "the migration reached {} while abort waited; use rollback",
                rec.shown_state()
            ),
        ));
    }
    if let Some(l) = &live {
        stop_tee(shared, l).await;
    }
    // From here on cutover must not trust an earlier verification: capture is going away.
    shared
        .migrations
        .update(tenant, |r| r.verification = None)?;
    let (source, target) = endpoints(shared, &rec)?;
    // The source must end clean; if it cannot be reached the abort fails (the migration goes on) and can be
    // repeated.
    let cleaned = match source.connect().await {
        Ok(c) => capture::remove(&c, tenant).await,
        Err(e) => Err(e),
    };
    if let Err(e) = cleaned {
        if let Some(l) = &live {
            respawn(shared, l);
        }
        return Err(e.into());
    }
    // The target's leftovers (ledger rows, copied data) are cleaned best-effort: a dead target is a common reason
    // to abort, and its leftovers are removed by name at the next migration of this tenant.
    let target_cleanup = abort_target(&target, &rec, tenant, drop_target).await;
    transition_off_thread(shared, tenant, Event::Aborted, |r| r.paused = false).await?;
    shared.migrations.forget_live(tenant);
    let (left, error) = match target_cleanup {
        Ok(left) => (Some(left), None),
        Err(e) => (None, Some(e.to_string())),
    };
    Ok(Aborted {
        tenant: tenant.clone(),
        state: State::RolledBack.as_str().to_owned(),
        target_rows_left: left,
        target_dropped: drop_target && error.is_none(),
        target_cleanup_error: error,
    })
}

/// Removes the migration's objects from the target and, with `drop_target`, the copied data. Returns the rows
/// left on the target.
async fn abort_target(
    target: &Endpoint,
    rec: &Record,
    tenant: &str,
    drop_target: bool,
) -> Result<u64, MigrateError> {
    let dst = target.connect().await?;
    capture::remove(&dst, tenant).await?;
    if !drop_target {
        return Ok(target_rows(&dst, target, &rec.tables).await);
    }
    let sql = if rec.created_target_schema {
        format!("DROP SCHEMA {} CASCADE", quote_ident(&target.schema))
    } else if target.filter.is_some() {
        super::drops::drop_tenant_sql(target, &rec.tables)
    } else {
        let list: Vec<String> = rec.tables.iter().map(|t| target.qualified(t)).collect();
        format!("TRUNCATE {}", list.join(", "))
    };
    dst.batch_execute(&sql)
        .await
        .map_err(|e| MigrateError::pg("drop the target copy", e))?;
    Ok(0)
}

/// Deletes the tenant's data on `side`: its schema, or for shared tables its rows (in one transaction, foreign
/// keys not checked: every table of the tenant loses the tenant's rows together).
/// A fresh task for a migration whose task was halted (its token is cancelled for good), taking over the tee.
fn respawn(shared: &Arc<Shared>, old: &Live) {
    let fresh = shared.migrations.register_live(&old.tenant);
    *fresh.tables.lock().unwrap_or_else(|p| p.into_inner()) = old.tables();
    *fresh.tee.lock().unwrap_or_else(|p| p.into_inner()) =
        old.tee.lock().unwrap_or_else(|p| p.into_inner()).take();
    driver::spawn(shared.clone(), fresh);
}

/// The tenant's current route is `route`.
fn on_route(shared: &Shared, route: &Route, tenant: &str) -> bool {
    shared
        .router
        .load()
        .get(tenant)
        .is_some_and(|r| **r == *route)
}

async fn target_rows(dst: &Client, target: &Endpoint, tables: &[String]) -> u64 {
    let mut n = 0;
    for t in tables {
        if let Ok(r) = dst
            .query_one(&format!("SELECT count(*) FROM {} x", target.rows(t)), &[])
            .await
        {
            n += r.get::<_, i64>(0).max(0) as u64;
        }
    }
    n
}
