//! `migrate rollback`: the tenant back to its source after a cutover, with the cutover's machinery in reverse
//! (gate closed, reverse tee drained, sequences synced, fences swapped, route swapped, gate opened).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::capture;
use super::catalog;
use super::cutover::{end_pinned_sessions, gate_of, labels, swap_route, sync_sequences, CAUGHT_UP};
use super::machine::{transition_off_thread, Event};
use super::ops::reply::RolledBack;
use super::pg::Endpoint;
use super::publish;
use super::record::{Record, State};
use super::registry::Live;
use super::sides::{endpoints, stop_tee};
use super::tee::{Tee, DRAIN_MARGIN};
use super::MigrateError;
use crate::context::Shared;
use crate::gate::Gate;
use crate::tenant::TenantId;

/// The two sides of a rollback, connected.
struct Sides {
    source: Endpoint,
    target: Endpoint,
    src: Client,
    dst: Client,
}

/// Moves the tenant back to the source after a cutover. The caller holds `live.lock`.
pub async fn rollback(shared: &Arc<Shared>, live: &Arc<Live>) -> Result<RolledBack, MigrateError> {
    let rec = shared
        .migrations
        .get(&live.tenant)
        .ok_or(MigrateError::Cancelled)?;
    if rec.state != State::Migrated {
        return Err(MigrateError::Refused(format!(
            "rollback needs state migrated; the migration is {}",
            rec.shown_state()
        )));
    }
    let gate = gate_of(shared, &rec.tenant)?;
    let timeout = Duration::from_millis(shared.config.load().migration.cutover_timeout_ms);
    // Connections and the sequence list before the gate closes, as in the cutover.
    let (source, target) = endpoints(shared, &rec)?;
    let (_, tee) = live
        .tee()
        .ok_or_else(|| MigrateError::Refused("the reverse tee is not running".into()))?;
    let sides = Sides {
        src: source.connect().await?,
        dst: target.connect().await?,
        source,
        target,
    };
    let sequences = catalog::sequences_of(&sides.dst, &sides.target, &rec.tables).await?;
    tee.catch_up(Instant::now() + timeout, CAUGHT_UP).await?;
    let closed_at = Instant::now();
    gate.close();
    let attempt = crate::cluster::ControlPlane::new_attempt();
    let held = hold_everywhere(shared, &rec.tenant, attempt, closed_at + timeout);
    let back = async {
        held.await?;
        back_to_source(
            shared,
            &rec,
            &sides,
            &tee,
            &gate,
            &sequences,
            closed_at + timeout,
        )
        .await
    };
    let swapped = tokio::time::timeout(timeout, back).await;
    let result = match swapped {
        Ok(Ok(())) => swap_route(shared, &rec.tenant, &rec.source).await,
        Ok(Err(e)) => Err(e),
        Err(_) => Err(MigrateError::Timeout(
            "rollback passed its time limit".into(),
        )),
    };
    match result {
        Ok(()) => {}
        // The swap may be in the store: neither side may take the tenant's writes until that is known.
        Err(e @ MigrateError::SwapUnknown(_)) => return Err(e),
        Err(e) => {
            // Not swapped: the target takes the tenant's writes again, the source stays fenced.
            let _ = capture::unfence(&sides.dst, &rec.tenant).await;
            let _ = capture::fence(
                &sides.src,
                &rec.tenant,
                "cut over to another backend",
                sides.source.filter.is_none(),
            )
            .await;
            publish::release(shared, &rec.tenant, attempt, "abort").await;
            gate.open();
            return Err(e);
        }
    }
    stop_tee(shared, live).await;
    end_pinned_sessions(shared, &rec.tenant);
    publish::release(shared, &rec.tenant, attempt, "open").await;
    gate.open();
    let pause_ms = closed_at.elapsed().as_secs_f64() * 1000.0;
    shared
        .metrics
        .histogram("cutover_pause_duration_seconds", labels(&rec.tenant, None))
        .record(pause_ms / 1000.0);
    finish_rollback(shared, &rec, pause_ms).await?;
    Ok(RolledBack {
        tenant: rec.tenant.clone(),
        state: State::RolledBack.as_str().to_owned(),
        pause_ms,
    })
}

/// With the gate closed: open transactions end, the reverse tee drains, sequences are synced, the target is
/// fenced and the source takes writes again. The route is swapped by the caller.
async fn back_to_source(
    shared: &Shared,
    rec: &Record,
    sides: &Sides,
    tee: &Tee,
    gate: &Gate,
    sequences: &[String],
    deadline: Instant,
) -> Result<(), MigrateError> {
    let left = deadline.saturating_duration_since(Instant::now() + DRAIN_MARGIN);
    if !tee.drain_while(gate.wait_drained(left), deadline).await? {
        return Err(MigrateError::Timeout(
            "open transactions did not finish".into(),
        ));
    }
    tee.drain_to_empty(deadline).await?;
    sync_sequences(
        &sides.dst,
        &sides.target,
        &sides.src,
        &sides.source,
        sequences,
    )
    .await?;
    shared
        .migrations
        .failpoints
        .check("rollback.before_swap")
        .await?;
    // The target's copy is fenced from the swap on; the source takes writes again.
    capture::fence(
        &sides.dst,
        &rec.tenant,
        "rolled back to its earlier backend",
        sides.target.filter.is_none(),
    )
    .await?;
    capture::unfence(&sides.src, &rec.tenant).await?;
    tee.drain_to_empty(deadline).await?;
    shared
        .migrations
        .failpoints
        .check("rollback.after_fence")
        .await?;
    Ok(())
}

/// After the route is back on the source: capture removed on both sides, record ended.
pub async fn finish_rollback(
    shared: &Arc<Shared>,
    rec: &Record,
    pause_ms: f64,
) -> Result<(), MigrateError> {
    let (source, target) = endpoints(shared, rec)?;
    capture::remove(&target.connect().await?, &rec.tenant).await?;
    capture::remove(&source.connect().await?, &rec.tenant).await?;
    transition_off_thread(shared, &rec.tenant, Event::RolledBack, move |r| {
        r.last_pause_ms = Some(pause_ms);
    })
    .await?;
    shared.migrations.forget_live(&rec.tenant);
    Ok(())
}

/// With several instances, each holds the tenant too (the same barrier as the cutover's).
async fn hold_everywhere(
    shared: &Shared,
    tenant: &TenantId,
    attempt: i64,
    deadline: Instant,
) -> Result<(), MigrateError> {
    match shared.control_plane.get() {
        Some(cp) => cp
            .hold_everywhere(tenant, attempt, deadline)
            .await
            .map_err(|e| MigrateError::Refused(e.to_string())),
        None => Ok(()),
    }
}
