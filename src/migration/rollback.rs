//! `migrate rollback`: the tenant back to its source after a cutover, with the cutover's machinery in reverse
//! (gate closed, reverse tee drained, sequences synced, fences swapped, route swapped, gate opened).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::capture;
use super::catalog;
use super::cutover::{
    end_pinned_sessions, gate_of, labels, swap_locally, swap_route, sync_sequences, Held, CAUGHT_UP,
};
use super::machine::{transition_off_thread, Event};
use super::ops::reply::RolledBack;
use super::pg::Endpoint;
use super::publish;
use super::record::{Record, State};
use super::registry::Live;
use super::sides::{endpoints, lease_held, stop_tee};
use super::tee::{Tee, DRAIN_MARGIN};
use super::MigrateError;
use crate::context::Shared;
use crate::gate::Gate;
use crate::tenant::TenantId;
use tracing::warn;

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
    let since = publish::since(shared, &rec.tenant);
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
        Ok(Ok(())) => swap_route(shared, &rec.tenant, since, &rec.source).await,
        Ok(Err(e)) => Err(e),
        Err(_) => Err(MigrateError::Timeout(
            "rollback passed its time limit".into(),
        )),
    };
    let held = Held {
        live: live.clone(),
        gate,
        closed_at,
        attempt,
        since,
    };
    match result {
        Ok(()) => after_swap_back(shared, &rec, &held).await,
        // The swap may be in the store: neither side may take the tenant's writes until that is known.
        Err(e @ MigrateError::SwapUnknown(_)) => {
            live.swap_pending
                .store(true, std::sync::atomic::Ordering::Release);
            tokio::spawn(settle_when_answered(shared.clone(), rec, held));
            Err(e)
        }
        Err(e) => {
            undo(shared, &rec, Some((&sides.src, &sides.dst)), &held).await;
            Err(e)
        }
    }
}

/// The route is back on the source: the reverse tee stops, pinned sessions end, the gate opens, capture is
/// removed and the record ends.
async fn after_swap_back(
    shared: &Arc<Shared>,
    rec: &Record,
    held: &Held,
) -> Result<RolledBack, MigrateError> {
    stop_tee(shared, &held.live).await;
    end_pinned_sessions(shared, &rec.tenant);
    publish::release(shared, &rec.tenant, held.attempt, "open").await;
    held.gate.open();
    let pause_ms = held.closed_at.elapsed().as_secs_f64() * 1000.0;
    shared
        .metrics
        .histogram("cutover_pause_duration_seconds", labels(&rec.tenant, None))
        .record(pause_ms / 1000.0);
    finish_rollback(shared, rec, pause_ms).await?;
    Ok(RolledBack {
        tenant: rec.tenant.clone(),
        state: State::RolledBack.as_str().to_owned(),
        pause_ms,
    })
}

/// Not swapped: the target takes the tenant's writes again and the source is fenced, unless this instance no
/// longer holds the move's lease (the fences are then the holder's to set; if the lease comes back, the move's
/// task checks them again); the other instances are let go, the gate opens.
async fn undo(shared: &Arc<Shared>, rec: &Record, sides: Option<(&Client, &Client)>, held: &Held) {
    match sides {
        Some((src, dst)) if lease_held(shared, rec.tenant.as_str()) => {
            let _ = capture::unfence(dst, &rec.tenant).await;
            let filtered = endpoints(shared, rec).is_ok_and(|(source, _)| source.filter.is_some());
            let _ =
                capture::fence(src, &rec.tenant, "cut over to another backend", !filtered).await;
        }
        _ => held
            .live
            .fences_settled
            .store(false, std::sync::atomic::Ordering::Relaxed),
    }
    publish::let_go(shared, &rec.tenant, held).await;
}

/// After `SwapUnknown`: the swap's write goes on until the store answers, then the rollback completes (the swap
/// is in) or is undone (refused), under the move's lock. Without an answer the tenant stays held; a restart
/// settles it from the store.
async fn settle_when_answered(shared: Arc<Shared>, rec: Record, held: Held) {
    let Some((_one, answer)) = publish::answer(&shared, &rec.tenant, &held, &rec.source).await
    else {
        return;
    };
    let done = match answer {
        Ok(()) => match swap_locally(&shared, &rec.tenant, &rec.source).await {
            Ok(()) => after_swap_back(&shared, &rec, &held).await.map(|_| ()),
            Err(e) => Err(e),
        },
        Err(refused) => {
            warn!(tenant = %rec.tenant, error = %refused, "the rollback's swap was refused");
            // Connections only when the fences are this instance's to set; the tenant is let go in any case.
            let sides = match (
                lease_held(&shared, rec.tenant.as_str()),
                endpoints(&shared, &rec),
            ) {
                (true, Ok((source, target))) => {
                    match (source.connect().await, target.connect().await) {
                        (Ok(src), Ok(dst)) => Some((src, dst)),
                        _ => None,
                    }
                }
                _ => None,
            };
            undo(&shared, &rec, sides.as_ref().map(|(s, d)| (s, d)), &held).await;
            Ok(())
        }
    };
    if let Err(e) = done {
        warn!(tenant = %rec.tenant, error = %e, "settling the rollback after the control plane answered");
    }
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
