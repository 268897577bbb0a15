//! Carrying a cutover's or rollback's route swap to the other instances (with a control plane). The swap is
//! written to the store before this instance applies it, so the other instances, a restarted coordinator and an
//! instance taking the move over all find the same route; the barrier is released only once the swap is there,
//! so no instance opens its gate onto the fenced side. Every store write here can be retried: the swap is
//! conditional on the tenant's route not having changed since the coordinator held it and on the move's lease
//! still being this process's, and a release names its barrier attempt.
//!
//! A store that does not answer leaves the swap's outcome unknown (a commit whose answer was lost is a swap).
//! Then nothing is guessed: the tenant stays held on every instance, and the write is retried until the store
//! answers. The cutover (or rollback) answers after [`ANSWER_LIMIT`] with the tenant still held, and a task goes
//! on retrying ([`keep_writing`]) and finishes or undoes it by the store's answer; a restart meanwhile settles it
//! from the store ([`super::cutover::recover`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::MigrateError;
use crate::cluster::store::{SwapBasis, SwapWrite};
use crate::cluster::ControlPlane;
use crate::context::Shared;
use crate::routing::Route;
use crate::tenant::TenantId;

/// How long a swap's store write is retried, with the tenant held, before the cutover answers (the tenant
/// stays held after it, while [`keep_writing`] goes on).
const ANSWER_LIMIT: Duration = Duration::from_secs(60);
/// One attempt's limit while the cutover waits for it.
const ATTEMPT_HELD: Duration = Duration::from_secs(3);
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

/// What a swap's write is conditional on, read when the tenant is held: the store's log as this instance has
/// applied it, and its lease's generation (none without a control plane).
pub(super) fn since(shared: &Shared, tenant: &TenantId) -> SwapBasis {
    let Some(cp) = shared.control_plane.get() else {
        return SwapBasis {
            epoch: 0,
            generation: 0,
        };
    };
    SwapBasis {
        epoch: cp.applied.load(std::sync::atomic::Ordering::Acquire),
        generation: cp.lease_clock.generation(tenant.as_str()).unwrap_or(0),
    }
}

/// Writes the swap of `tenant` to `route` to the store (nothing to do without a control plane). `Ok` once the
/// store has it. `Err(Refused)` when the store refused it for good (another route, or the move's lease taken
/// over): nothing is swapped. `Err(SwapUnknown)` when the store did not answer within [`ANSWER_LIMIT`]: the
/// caller keeps the tenant held and goes on with [`keep_writing`].
pub(super) async fn store_swap(
    shared: &Shared,
    tenant: &TenantId,
    since: SwapBasis,
    route: &Route,
) -> Result<(), MigrateError> {
    let Some(cp) = shared.control_plane.get() else {
        return Ok(());
    };
    let until = Instant::now() + ANSWER_LIMIT;
    let mut warned = false;
    loop {
        // Each attempt bounded: a store that silently drops packets must not hold the tenant for as long as
        // TCP takes to notice, nor use up the whole limit in one attempt.
        let left = until
            .saturating_duration_since(Instant::now())
            .min(ATTEMPT_HELD);
        let error = match attempt(shared, cp, tenant, since, route, left).await {
            Ok(()) => return Ok(()),
            Err(Failed::Refused(e)) => return Err(e),
            Err(Failed::Unanswered(e)) => e,
        };
        // For tests: the limit is reached at the first unanswered attempt.
        let limit_reached = shared
            .migrations
            .failpoints
            .check("swap.answer_limit")
            .await
            .is_err();
        if limit_reached || Instant::now() >= until {
            return Err(MigrateError::SwapUnknown(format!(
                "the control plane did not answer the route swap of tenant {tenant} for {}s ({error}); the \
                 tenant stays held on every instance until it answers",
                ANSWER_LIMIT.as_secs()
            )));
        }
        if !warned {
            warn!(%tenant, error = %error, "the control plane did not take the route swap; the tenant is held until it answers");
            warned = true;
        }
        tokio::time::sleep(RETRY_HELD).await;
    }
}

/// After `SwapUnknown`: the same write, retried until the store answers (its outcome, which settles the
/// cutover or rollback), the proxy stops or [`RETRY_LIMIT`] (`None`: the tenant stays held, and a restart
/// settles it from the store).
pub(super) async fn keep_writing(
    shared: &Shared,
    tenant: &TenantId,
    since: SwapBasis,
    route: &Route,
) -> Option<Result<(), MigrateError>> {
    let cp = shared.control_plane.get()?;
    let outcome = retrying(shared, tenant, "write the route swap", move || async move {
        // Shorter than `retrying`'s own limit, so a silent connection is dropped here, not just given up on.
        match attempt(shared, cp, tenant, since, route, ATTEMPT_HELD).await {
            Ok(()) => Ok(Ok(())),
            Err(Failed::Refused(e)) => Ok(Err(e)),
            Err(Failed::Unanswered(e)) => Err(e),
        }
    })
    .await;
    if outcome.is_some() {
        info!(%tenant, "the control plane answered the route swap");
    }
    outcome
}

/// One write within `limit`; a connection that gave no answer in time is dropped, so the next attempt does
/// not wait on it again.
async fn attempt(
    shared: &Shared,
    cp: &ControlPlane,
    tenant: &TenantId,
    since: SwapBasis,
    route: &Route,
    limit: Duration,
) -> Result<(), Failed> {
    match tokio::time::timeout(limit, write_once(shared, cp, tenant, since, route)).await {
        Ok(outcome) => outcome,
        Err(_) => {
            cp.disconnect().await;
            Err(Failed::Unanswered("no answer in time".into()))
        }
    }
}

/// With a control plane, the record in `cutover_paused` is in the store before the tenant is held: an instance
/// taking the move over from here (the coordinator died) must know a cutover was under way, since the source may
/// be fenced by then. The lease is renewed each second otherwise, which may be too late.
pub(super) async fn record_started(
    shared: &Shared,
    rec: &super::record::Record,
) -> Result<(), MigrateError> {
    let Some(cp) = shared.control_plane.get() else {
        return Ok(());
    };
    match cp.renew_now(rec).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(MigrateError::Refused(format!(
            "another instance took the move of tenant {} over",
            rec.tenant
        ))),
        Err(e) => Err(MigrateError::Barrier(format!(
            "the control plane did not take the cutover's start: {e}"
        ))),
    }
}

/// One attempt's outcome when it did not write.
enum Failed {
    /// The store refused the swap for good: nothing was swapped.
    Refused(MigrateError),
    /// No answer: the swap may or may not be in the store.
    Unanswered(String),
}

async fn write_once(
    shared: &Shared,
    cp: &ControlPlane,
    tenant: &TenantId,
    since: SwapBasis,
    route: &Route,
) -> Result<(), Failed> {
    let failpoints = &shared.migrations.failpoints;
    let unanswered = |e: MigrateError| Failed::Unanswered(e.to_string());
    failpoints.check("swap.store").await.map_err(unanswered)?;
    let refused = |why: String| Err(Failed::Refused(MigrateError::Refused(why)));
    match cp.write_swap(tenant, since, route).await {
        Ok(SwapWrite::Written) => {}
        // An earlier attempt's commit went through; its answer was lost.
        Ok(SwapWrite::Changed(Some(now))) if now == *route => return Ok(()),
        Ok(SwapWrite::Changed(now)) => {
            return refused(format!(
                "the control plane has another route for tenant {tenant} since the move held it ({now:?}); nothing was swapped"
            ))
        }
        Ok(SwapWrite::NotHolder) => {
            return refused(format!(
                "another instance took the move of tenant {tenant} over; nothing was swapped here"
            ))
        }
        Err(e) => return Err(Failed::Unanswered(e.to_string())),
    }
    // For tests: the answer of a write that committed is lost.
    failpoints
        .check("swap.store_answer")
        .await
        .map_err(unanswered)
}

/// After `SwapUnknown`: the store's answer to the swap to `route`, with the move's lock taken. `None` when
/// nothing is left to do: no answer (the tenant stays held), or the move is no longer this task's (the tenant
/// was let go).
pub(super) async fn answer<'a>(
    shared: &Arc<Shared>,
    tenant: &TenantId,
    held: &'a super::cutover::Held,
    route: &Route,
) -> Option<(tokio::sync::MutexGuard<'a, ()>, Result<(), MigrateError>)> {
    let answer = keep_writing(shared, tenant, held.since, route).await?;
    let lock = held.live.lock.lock().await;
    held.live
        .swap_pending
        .store(false, std::sync::atomic::Ordering::Release);
    if stale(shared, &held.live) {
        let_go(shared, tenant, held).await;
        return None;
    }
    Some((lock, answer))
}

/// Whether a move's waiting task acts on a move no longer this instance's to drive: stopped, replaced in the
/// registry (aborted, finished, taken over and resumed), or its lease not held.
pub(super) fn stale(shared: &Shared, live: &Arc<super::registry::Live>) -> bool {
    live.stop.is_cancelled()
        || !shared
            .migrations
            .live(live.tenant.as_str())
            .is_some_and(|now| Arc::ptr_eq(&now, live))
        || !super::sides::lease_held(shared, live.tenant.as_str())
}

/// Lets the tenant go after a swap that did not happen here: the other instances' hold ends, the store's log is
/// applied (bounded: a store that does not answer must not keep the clients held), the gate opens.
pub(super) async fn let_go(shared: &Arc<Shared>, tenant: &TenantId, held: &super::cutover::Held) {
    release(shared, tenant, held.attempt, "abort").await;
    if let Some(cp) = shared.control_plane.get() {
        let _ = tokio::time::timeout(RELEASE_INLINE, cp.sync(shared)).await;
    }
    held.gate.open();
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

/// Ends whatever barrier of `tenant` an earlier coordinator left closed, whoever it was: after a restart or a
/// takeover the attempt that held the other instances is not known here ([`ControlPlane::end_barrier`] keeps
/// this to the lease's holder and to barriers older than the resume).
pub(super) fn end_barrier(shared: &Arc<Shared>, tenant: &TenantId, phase: &'static str) {
    let resumed_ms = ControlPlane::new_attempt();
    let (shared, tenant) = (shared.clone(), tenant.clone());
    tokio::spawn(async move {
        let Some(cp) = shared.control_plane.get() else {
            return;
        };
        let (s, t) = (&*shared, &tenant);
        let ended = retrying(s, t, "end the cutover barrier", move || async move {
            cp.end_barrier(t, phase, resumed_ms)
                .await
                .map_err(|e| e.to_string())
        })
        .await;
        if ended == Some(true) {
            info!(%tenant, phase, "the interrupted cutover's hold on the other instances is released");
        }
    });
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
