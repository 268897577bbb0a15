//! Carrying a cutover's or rollback's route swap to the other instances (with a control plane). The swap is
//! written to the store before this instance applies it, so the other instances and a restarted coordinator
//! find the same route; the barrier is released only once the swap is there, so no instance opens its gate onto
//! the fenced side. Every store write here can be retried: the swap is conditional on the tenant's route not
//! having changed since the coordinator held it, and a release names its barrier attempt.
//!
//! A store that does not answer within [`WRITE_WINDOW`] does not undo the swap: the old side is fenced, so an
//! instance still routing there is refused the tenant's writes rather than losing them, and undoing a swap that
//! may have committed would split the tenant's writes between two unfenced sides. A task then goes on writing
//! the swap and releasing the barrier until the store answers; the other instances hold the tenant meanwhile.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::MigrateError;
use crate::cluster::store::SwapWrite;
use crate::cluster::ControlPlane;
use crate::context::Shared;
use crate::routing::Route;
use crate::tenant::TenantId;

/// How long a swap's store write is retried with the tenant held before the swap goes on without the answer.
const WRITE_WINDOW: Duration = Duration::from_secs(2);
/// How long the first release is waited for before a task takes it over.
const RELEASE_INLINE: Duration = Duration::from_secs(1);
/// Pause between attempts while the tenant is held.
const RETRY_HELD: Duration = Duration::from_millis(100);
/// One background attempt's limit (the store connection's keepalive ends a dead one meanwhile).
const ATTEMPT_LIMIT: Duration = Duration::from_secs(10);
/// Pause between the background task's attempts.
const RETRY_LATER: Duration = Duration::from_millis(500);
/// The background task's limit; past it an error is logged and the other instances hold the tenant until an
/// operator acts (the limit keeps a task from retrying for the life of the process).
const RETRY_LIMIT: Duration = Duration::from_secs(3600);

/// Whether the swap is in the store.
#[derive(Debug)]
pub(super) enum Published {
    /// In the store, or no control plane.
    Yes,
    /// Not known: [`finish_later`] writes it.
    Unknown { since: i64 },
}

/// One attempt's outcome when it did not write.
enum Failed {
    /// The store refused the swap for good: nothing was swapped.
    Refused(MigrateError),
    /// No answer: the swap may or may not be in the store.
    Unanswered(String),
}

/// Writes the swap of `tenant` to `route` to the store, retrying for up to [`WRITE_WINDOW`]. `Err` when the
/// store holds another route for the tenant now (nothing is swapped then).
pub(super) async fn store_swap(
    shared: &Shared,
    tenant: &TenantId,
    route: &Route,
) -> Result<Published, MigrateError> {
    let Some(cp) = shared.control_plane.get() else {
        return Ok(Published::Yes);
    };
    let since = cp.applied.load(std::sync::atomic::Ordering::Acquire);
    let until = Instant::now() + WRITE_WINDOW;
    loop {
        // Each attempt within the window: a store that silently drops packets must not hold the tenant for as
        // long as TCP takes to notice.
        let left = until.saturating_duration_since(Instant::now());
        let attempt =
            tokio::time::timeout(left, write_once(shared, cp, tenant, since, route)).await;
        let outcome =
            attempt.unwrap_or_else(|_| Err(Failed::Unanswered("no answer in time".into())));
        match outcome {
            Ok(()) => return Ok(Published::Yes),
            Err(Failed::Refused(e)) => return Err(e),
            Err(Failed::Unanswered(e)) if Instant::now() >= until => {
                warn!(%tenant, error = %e, "the control plane did not take the route swap; it is written when it answers, and the other instances hold the tenant until then");
                return Ok(Published::Unknown { since });
            }
            Err(Failed::Unanswered(_)) => tokio::time::sleep(RETRY_HELD).await,
        }
    }
}

async fn write_once(
    shared: &Shared,
    cp: &ControlPlane,
    tenant: &TenantId,
    since: i64,
    route: &Route,
) -> Result<(), Failed> {
    let failpoints = &shared.migrations.failpoints;
    let unanswered = |e: MigrateError| Failed::Unanswered(e.to_string());
    failpoints.check("swap.store").await.map_err(unanswered)?;
    match cp.write_swap(tenant, since, route).await {
        Ok(SwapWrite::Written) => {}
        // An earlier attempt's commit went through; its answer was lost.
        Ok(SwapWrite::Changed(Some(now))) if now == *route => return Ok(()),
        Ok(SwapWrite::Changed(now)) => {
            return Err(Failed::Refused(MigrateError::Refused(format!(
                "the control plane has another route for tenant {tenant} since the move held it ({now:?}); nothing was swapped"
            ))))
        }
        Err(e) => return Err(Failed::Unanswered(e.to_string())),
    }
    // For tests: the answer of a write that committed is lost.
    failpoints
        .check("swap.store_answer")
        .await
        .map_err(unanswered)
}

/// Ends barrier `attempt` of `tenant` with `phase` on every instance; when the store does not answer, a task
/// retries until it does.
pub(super) async fn release(
    shared: &Arc<Shared>,
    tenant: &TenantId,
    attempt: i64,
    phase: &'static str,
) {
    let Some(cp) = shared.control_plane.get() else {
        return;
    };
    // Inline only briefly: this instance's own gate waits on it.
    let once = tokio::time::timeout(
        RELEASE_INLINE,
        cp.release_everywhere(tenant, attempt, phase),
    );
    if matches!(once.await, Ok(Ok(()))) {
        return;
    }
    let (shared, tenant) = (shared.clone(), tenant.clone());
    tokio::spawn(async move { release_later(&shared, &tenant, attempt, phase).await });
}

/// The swap went on without the store's answer: a task writes it, then releases barrier `attempt` (`open`;
/// `abort` if the store holds another route, so the instances follow the store's).
pub(super) fn finish_later(
    shared: &Arc<Shared>,
    tenant: &TenantId,
    since: i64,
    route: &Route,
    attempt: i64,
) {
    let (shared, tenant, route) = (shared.clone(), tenant.clone(), route.clone());
    tokio::spawn(async move {
        let Some(cp) = shared.control_plane.get() else {
            return;
        };
        let (s, t, r) = (&*shared, &tenant, &route);
        let written = retrying(s, t, "write the route swap", move || async move {
            match write_once(s, cp, t, since, r).await {
                Ok(()) => Ok(true),
                Err(Failed::Refused(e)) => {
                    warn!(tenant = %t, error = %e, "the route swap was not written: the control plane's route stands");
                    Ok(false)
                }
                Err(Failed::Unanswered(e)) => Err(e),
            }
        })
        .await;
        // The log up to the swap, applied here too, so this instance's next swap of the tenant (a rollback)
        // does not take its own swap for another's change.
        if let Err(e) = cp.sync(&shared).await {
            warn!(%tenant, error = %e, "could not apply the control plane's log after the swap");
        }
        let phase = match written {
            Some(true) => "open",
            Some(false) => "abort",
            None => return,
        };
        info!(%tenant, phase, "the route swap reached the control plane");
        release_later(&shared, &tenant, attempt, phase).await;
    });
}

async fn release_later(shared: &Shared, tenant: &TenantId, attempt: i64, phase: &'static str) {
    let Some(cp) = shared.control_plane.get() else {
        return;
    };
    let released = retrying(
        shared,
        tenant,
        "release the cutover barrier",
        move || async move {
            cp.release_everywhere(tenant, attempt, phase)
                .await
                .map_err(|e| e.to_string())
        },
    )
    .await;
    if released.is_some() {
        info!(%tenant, phase, "the other instances' hold of the tenant is released");
    }
}

/// Runs `attempt` every [`RETRY_LATER`] until it succeeds (its value), the proxy stops, or [`RETRY_LIMIT`].
async fn retrying<T, F: std::future::Future<Output = Result<T, String>>>(
    shared: &Shared,
    tenant: &TenantId,
    what: &str,
    mut attempt: impl FnMut() -> F,
) -> Option<T> {
    let until = Instant::now() + RETRY_LIMIT;
    let mut warned = false;
    loop {
        let once = tokio::time::timeout(ATTEMPT_LIMIT, attempt()).await;
        match once.unwrap_or_else(|_| Err("no answer in time".into())) {
            Ok(v) => return Some(v),
            Err(e) if !warned => {
                warn!(%tenant, error = %e, "could not {what}; retrying until the control plane answers");
                warned = true;
            }
            Err(_) => {}
        }
        if Instant::now() >= until {
            tracing::error!(%tenant, "gave up trying to {what}: the other instances hold the tenant until an operator acts");
            return None;
        }
        tokio::select! {
            _ = shared.terminate.fired() => return None,
            _ = tokio::time::sleep(RETRY_LATER) => {}
        }
    }
}
