//! Cutover and rollback (DESIGN section 5): close the tenant's gate, let open transactions end, drain the log to
//! empty, sync sequences, ready the reverse capture, persist and swap the route, open the gate. Everything before
//! the swap is bounded by `cutover_timeout_ms`; past it the gate opens back onto the source and the migration
//! stays in `dual_write`. The swap is the point of no return.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::Label;
use tokio_postgres::Client;
use tracing::{info, warn};

use super::capture;
use super::catalog;
use super::decide::{decide_swap, BeforeSwap, SwapDecision};
use super::machine::{transition, transition_off_thread, Event};
use super::ops::reply::CutOver;
use super::pg::Endpoint;
use super::publish;
use super::record::{Record, State};
use super::registry::{Direction, Live};
use super::sides::{endpoints, start_tee};
use super::tee::DRAIN_MARGIN;
use super::MigrateError;
use crate::cluster::ControlPlane;
use crate::context::Shared;
use crate::gate::Gate;
use crate::routing::Route;
use crate::tenant::TenantId;

/// A pass reading fewer entries than this before the gate closes means the backlog is a few milliseconds of
/// writes, so the drain with the tenant held stays short.
pub(super) const CAUGHT_UP: usize = 200;

pub(super) fn labels(tenant: &str, result: Option<&str>) -> Vec<Label> {
    let mut l = vec![Label::new("tenant", tenant.to_owned())];
    if let Some(r) = result {
        l.push(Label::new("result", r.to_owned()));
    }
    l
}

pub(super) fn gate_of(shared: &Shared, tenant: &TenantId) -> Result<Arc<Gate>, MigrateError> {
    let gate = shared.gates.get(tenant);
    if gate.is_closed() {
        return Err(MigrateError::Refused(format!(
            "tenant {tenant:?} is paused by an operator; resume it first"
        )));
    }
    Ok(gate)
}

/// Moves the tenant to the target. The caller holds `live.lock`.
pub async fn cutover(shared: &Arc<Shared>, live: &Arc<Live>) -> Result<CutOver, MigrateError> {
    let rec = shared
        .migrations
        .get(&live.tenant)
        .ok_or(MigrateError::Cancelled)?;
    if rec.state != State::DualWrite || rec.paused {
        return Err(MigrateError::Refused(format!(
            "cutover needs state dual_write (not paused); the migration is {}",
            rec.shown_state()
        )));
    }
    let gate = gate_of(shared, &rec.tenant)?;
    let limit = Duration::from_millis(shared.config.load().migration.cutover_timeout_ms);
    let rec = transition_off_thread(shared, &rec.tenant, Event::CutoverStarted, |r| {
        r.cutover_attempts += 1
    })
    .await?;
    // Everything that does not need the tenant held is done before the gate closes: connections, the
    // sequence list, and the reverse capture on the target (which takes no traffic until the swap).
    let prepared = async {
        publish::record_started(shared, &rec).await?;
        prepare(shared, live, &rec).await
    };
    let ready = match prepared.await {
        Ok(r) => r,
        Err(e) => {
            count_attempt(shared, &rec.tenant, "failed");
            fall_back(shared, &rec, &e.to_string(), Duration::ZERO).await?;
            return Err(e);
        }
    };
    let closed_at = Instant::now();
    gate.close();
    let deadline = closed_at + limit;
    let mut marks = Marks::new(closed_at);
    let cluster = shared.control_plane.get();
    let attempt = ControlPlane::new_attempt();
    // The log as applied when the tenant is held: the swap is written only if the tenant's route is unchanged
    // since.
    let since = publish::since(shared, &rec.tenant);
    let held = async {
        // With several instances, each holds the tenant too before anything is drained or swapped.
        if let Some(cp) = cluster {
            cp.hold_everywhere(&rec.tenant, attempt, deadline)
                .await
                .map_err(|e| MigrateError::Barrier(e.to_string()))?;
            marks.mark("barrier_held");
        }
        before_swap(shared, &ready, &gate, deadline, &mut marks).await
    };
    let outcome = match tokio::time::timeout(limit, held).await {
        Ok(Ok(())) => BeforeSwap::Done,
        Ok(Err(e)) => BeforeSwap::Failed(e),
        Err(_) => BeforeSwap::TimedOut,
    };
    // The swap is outside the time limit: once it is on disk it must be completed, not abandoned halfway.
    let swapped = match decide_swap(outcome, Instant::now() >= deadline, limit) {
        SwapDecision::Swap => {
            let r = swap_route(shared, &rec.tenant, since, &rec.target).await;
            marks.mark("swap_route");
            r
        }
        SwapDecision::FallBack(e) => Err(e),
    };
    match swapped {
        Ok(()) => after_swap(shared, live, &rec, &gate, closed_at, marks, attempt).await,
        // The swap may be in the store: neither side may take the tenant's writes until that is known.
        Err(e @ MigrateError::SwapUnknown(_)) => {
            warn!(tenant = %rec.tenant, error = %e, "cutover: the tenant stays held");
            live.swap_pending.store(true, Ordering::Release);
            let held = Held {
                live: live.clone(),
                gate,
                closed_at,
                attempt,
                since,
            };
            tokio::spawn(settle_when_answered(shared.clone(), rec, held));
            Err(e)
        }
        // The source's fence comes down before anyone is let through (they would get 55000 meanwhile).
        Err(e) => {
            let pause = closed_at.elapsed();
            let fell_back = failed_cutover(shared, &rec, e, pause).await;
            publish::release(shared, &rec.tenant, attempt, "abort").await;
            gate.open();
            fell_back
        }
    }
}

/// A cutover (or rollback) waiting for the store's answer to its swap, the tenant held.
pub(super) struct Held {
    pub live: Arc<Live>,
    pub gate: Arc<Gate>,
    pub closed_at: Instant,
    pub attempt: i64,
    pub since: crate::cluster::store::SwapBasis,
}

/// After `SwapUnknown`: the swap's write goes on until the store answers, then the cutover completes (the swap
/// is in) or falls back (refused), under the move's lock. Without an answer the tenant stays held; a restart
/// settles it from the store.
async fn settle_when_answered(shared: Arc<Shared>, rec: Record, held: Held) {
    let Some((_one, answer)) = publish::answer(&shared, &rec.tenant, &held, &rec.target).await
    else {
        return;
    };
    let done = match answer {
        Ok(()) => match swap_locally(&shared, &rec.tenant, &rec.target).await {
            Ok(()) => {
                let marks = Marks::new(held.closed_at);
                after_swap(
                    &shared,
                    &held.live,
                    &rec,
                    &held.gate,
                    held.closed_at,
                    marks,
                    held.attempt,
                )
                .await
                .map(|_| ())
            }
            Err(e) => Err(e),
        },
        Err(e) => {
            let pause = held.closed_at.elapsed();
            let fell_back = failed_cutover(&shared, &rec, e, pause).await.map(|_| ());
            publish::release(&shared, &rec.tenant, held.attempt, "abort").await;
            held.gate.open();
            fell_back
        }
    };
    if let Err(e) = done {
        warn!(tenant = %rec.tenant, error = %e, "settling the cutover after the control plane answered");
    }
}

/// The cutover did not swap: counted, logged, fallen back to the source.
async fn failed_cutover(
    shared: &Arc<Shared>,
    rec: &Record,
    e: MigrateError,
    pause: Duration,
) -> Result<CutOver, MigrateError> {
    if matches!(e, MigrateError::Timeout(_) | MigrateError::Barrier(_)) {
        shared
            .metrics
            .counter("cutover_timeout_total", labels(&rec.tenant, None))
            .increment(1);
    }
    count_attempt(shared, &rec.tenant, "failed");
    warn!(tenant = %rec.tenant, error = %e, "cutover fell back to the source");
    fall_back(shared, rec, &e.to_string(), pause).await?;
    Err(e)
}

/// Past the swap: the target is authoritative, the reverse tee starts, sessions that cannot follow end, the
/// gate opens, and the migration is `migrated`.
async fn after_swap(
    shared: &Arc<Shared>,
    live: &Arc<Live>,
    rec: &Record,
    gate: &Gate,
    closed_at: Instant,
    mut marks: Marks,
    attempt: i64,
) -> Result<CutOver, MigrateError> {
    match shared
        .migrations
        .failpoints
        .check("cutover.after_swap")
        .await
    {
        Ok(()) => {}
        // The proxy stopped right here: a restart finds `cutover_paused` with the route swapped and completes.
        Err(MigrateError::Cancelled) => return Err(MigrateError::Cancelled),
        Err(e) => {
            warn!(tenant = %rec.tenant, error = %e, "failpoint after the swap ignored: the swap stands")
        }
    }
    let rec = shared
        .migrations
        .get(&rec.tenant)
        .unwrap_or_else(|| rec.clone());
    // Past the swap nothing may keep the gate closed: a reverse tee that cannot start now is started by the
    // migration's task at its next tick (the source lags meanwhile, visibly).
    if let Err(e) = start_tee(shared, live, &rec, Direction::Reverse).await {
        warn!(tenant = %rec.tenant, error = %e, "reverse tee did not start with the cutover");
    }
    marks.mark("start_reverse_tee");
    let ended = end_pinned_sessions(shared, &rec.tenant);
    marks.mark("end_pinned_sessions");
    let blocked = gate.queued();
    publish::release(shared, &rec.tenant, attempt, "open").await;
    marks.mark("barrier_released");
    gate.open();
    let pause = closed_at.elapsed();
    let m = &shared.metrics;
    m.histogram("cutover_pause_duration_seconds", labels(&rec.tenant, None))
        .record(pause.as_secs_f64());
    m.gauge("cutover_blocked_writers", labels(&rec.tenant, None))
        .set(blocked as f64);
    count_attempt(shared, &rec.tenant, "ok");
    let pause_ms = pause.as_secs_f64() * 1000.0;
    // If this write fails the record stays `cutover_paused` with the route swapped; every command checks the
    // route, and a restart completes it (recover).
    transition_off_thread(shared, &rec.tenant, Event::Swapped, move |r| {
        r.last_pause_ms = Some(pause_ms);
        r.last_cutover_error = None;
    })
    .await?;
    info!(tenant = %rec.tenant, pause_ms, blocked, ended, "cutover done");
    Ok(CutOver {
        tenant: rec.tenant.clone(),
        state: State::Migrated.as_str().to_owned(),
        pause_ms,
        queued_during_pause: blocked,
        pinned_sessions_ended: ended,
        steps_ms: marks
            .steps
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
    })
}

fn count_attempt(shared: &Shared, tenant: &str, result: &str) {
    shared
        .metrics
        .counter("cutover_attempts_total", labels(tenant, Some(result)))
        .increment(1);
}

/// What the cutover sets up before it closes the gate.
struct Ready {
    src: Client,
    dst: Client,
    source: Endpoint,
    target: Endpoint,
    source_tenant: TenantId,
    sequences: Vec<String>,
    tee: Arc<super::tee::Tee>,
}

async fn prepare(
    shared: &Arc<Shared>,
    live: &Arc<Live>,
    rec: &Record,
) -> Result<Ready, MigrateError> {
    let (source, target) = endpoints(shared, rec)?;
    let (_, tee) = live
        .tee()
        .filter(|(d, _)| *d == Direction::Forward)
        .ok_or_else(|| MigrateError::Refused("the tee is not running".into()))?;
    let (src, dst) = (source.connect().await?, target.connect().await?);
    let sequences = catalog::sequences_of(&src, &source, &rec.tables).await?;
    capture::install(&dst, &target, &rec.tenant, &rec.tables, &live.stop).await?;
    let timeout = Duration::from_millis(shared.config.load().migration.cutover_timeout_ms);
    tee.catch_up(Instant::now() + timeout, CAUGHT_UP).await?;
    shared
        .migrations
        .failpoints
        .check("cutover.before_close")
        .await?;
    Ok(Ready {
        src,
        dst,
        source,
        target,
        source_tenant: rec.tenant.clone(),
        sequences,
        tee,
    })
}

/// Steps 1-3 of the cutover with the gate closed, up to (not including) the route swap.
async fn before_swap(
    shared: &Arc<Shared>,
    ready: &Ready,
    gate: &Gate,
    deadline: Instant,
    marks: &mut Marks,
) -> Result<(), MigrateError> {
    let fp = shared.migrations.failpoints.clone();
    fp.check("cutover.after_close").await?;
    let left = deadline.saturating_duration_since(Instant::now() + DRAIN_MARGIN);
    if !ready
        .tee
        .drain_while(gate.wait_drained(left), deadline)
        .await?
    {
        return Err(MigrateError::Timeout(format!(
            "{} transaction(s) of the tenant still open",
            gate.active()
        )));
    }
    marks.mark("open_transactions");
    ready.tee.drain_to_empty(deadline).await?;
    marks.mark("drain_log");
    fp.check("cutover.after_drain").await?;
    sync_sequences(
        &ready.src,
        &ready.source,
        &ready.dst,
        &ready.target,
        &ready.sequences,
    )
    .await?;
    marks.mark("sequences");
    fp.check("cutover.before_swap").await?;
    // The fence goes up with the swap: from here on no write of the tenant commits on the source (a direct
    // one fails with 55000), and whatever reached the source before it is drained across below. The target
    // may still be fenced from an earlier rollback.
    capture::fence(
        &ready.src,
        &ready.source_tenant,
        "cut over to another backend",
        ready.source.filter.is_none(),
    )
    .await?;
    capture::unfence(&ready.dst, &ready.source_tenant).await?;
    marks.mark("fence");
    capture::wait_for_writers(&ready.src, &ready.source_tenant, deadline).await?;
    marks.mark("writers_before_fence");
    // Writes that reached the source meanwhile (outside the proxy) go across before the swap.
    ready.tee.drain_to_empty(deadline).await?;
    marks.mark("final_drain");
    Ok(())
}

/// Time spent in each step while the gate is closed (reported with the cutover, for operators).
struct Marks {
    last: Instant,
    steps: Vec<(&'static str, f64)>,
}

impl Marks {
    fn new(start: Instant) -> Marks {
        Marks {
            last: start,
            steps: Vec::new(),
        }
    }

    fn mark(&mut self, step: &'static str) {
        let now = Instant::now();
        let ms = (now - self.last).as_secs_f64() * 1000.0;
        self.steps.push((step, (ms * 100.0).round() / 100.0));
        self.last = now;
    }
}

/// Cutover did not happen: lift the fence if it went up, remove the reverse capture made for it and stay in
/// dual_write.
async fn fall_back(
    shared: &Arc<Shared>,
    rec: &Record,
    error: &str,
    pause: Duration,
) -> Result<(), MigrateError> {
    // A coordinator that stalled past its lease may have been replaced by another instance, which may have cut
    // the tenant over since: lifting the fence or removing the reverse capture now would undo that cutover.
    if !super::sides::lease_held(shared, rec.tenant.as_str()) {
        warn!(tenant = %rec.tenant, "this instance no longer holds the move's lease: the fallback leaves the databases and the record to the instance that does");
        return Ok(());
    }
    if let Ok((source, target)) = endpoints(shared, rec) {
        match source.connect().await {
            Ok(c) => {
                if let Err(e) = capture::unfence(&c, &rec.tenant).await {
                    warn!(tenant = %rec.tenant, error = %e, "could not lift the fence on the source");
                }
            }
            Err(e) => {
                warn!(tenant = %rec.tenant, error = %e, "could not reach the source to lift the fence")
            }
        }
        if let Ok(c) = target.connect().await {
            if let Err(e) = capture::remove_triggers(&c, &rec.tenant).await {
                warn!(tenant = %rec.tenant, error = %e, "could not remove the reverse capture");
            }
        }
    }
    let pause_ms = pause.as_secs_f64() * 1000.0;
    let error = error.to_owned();
    transition_off_thread(shared, &rec.tenant, Event::FellBack, move |r| {
        r.last_cutover_error = Some(error);
        r.last_pause_ms = Some(pause_ms);
    })
    .await?;
    Ok(())
}

/// Swaps the route of `tenant` to `route`: in the control plane's store first (so the other instances, a restart
/// and a takeover find the same route; [`publish`]), then here ([`swap_locally`]). `Err` means nothing was
/// swapped, except `SwapUnknown` (the store did not answer; see [`publish::keep_writing`]).
pub(super) async fn swap_route(
    shared: &Arc<Shared>,
    tenant: &TenantId,
    since: crate::cluster::store::SwapBasis,
    route: &Route,
) -> Result<(), MigrateError> {
    publish::store_swap(shared, tenant, since, route).await?;
    swap_locally(shared, tenant, route).await
}

/// The swap, in the store already (or no control plane), persisted here with a higher epoch and published, on a
/// blocking thread: the fsync must not hold up the other tenants served by the runtime thread (one thread on
/// small machines).
pub(super) async fn swap_locally(
    shared: &Arc<Shared>,
    tenant: &TenantId,
    route: &Route,
) -> Result<(), MigrateError> {
    let (s, t, r) = (shared.clone(), tenant.clone(), route.clone());
    let local = match tokio::task::spawn_blocking(move || swap_route_now(&s, &t, &r)).await {
        Ok(result) => result,
        Err(e) => Err(MigrateError::Refused(format!(
            "the route swap's thread failed: {e}"
        ))),
    };
    let cp = shared.control_plane.get();
    match local {
        // The router tells whether the swap was published, which happens only once it is on disk.
        Err(e)
            if shared
                .router
                .load()
                .get(tenant.as_str())
                .is_some_and(|now| **now == *route) =>
        {
            warn!(%tenant, error = %e, "the route swap's thread failed after the swap");
        }
        // The store has the swap: it stands (undoing it could split the tenant's writes), and this instance
        // applies it from the store like the others (until then its sessions find the old side fenced, which
        // refuses their writes).
        Err(e) if cp.is_some() => {
            tracing::error!(%tenant, error = %e, "the route swap is in the control plane but could not be saved here");
        }
        Err(e) => return Err(e),
        Ok(()) => {}
    }
    // Applying the store's log now (the swap included) moves the applied epoch past the swap, so the next swap
    // of the tenant (a rollback) does not take this one for a conflicting change. The follow loop does it
    // within a second otherwise.
    if let Some(cp) = cp {
        if let Err(e) = cp.sync(shared).await {
            warn!(%tenant, error = %e, "could not apply the control plane's log after the swap");
        }
    }
    Ok(())
}

fn swap_route_now(shared: &Shared, tenant: &TenantId, route: &Route) -> Result<(), MigrateError> {
    let route = Arc::new(route.clone());
    let table = shared.router.update(
        |routes| {
            routes.insert(tenant.clone(), route.clone());
            Ok(())
        },
        |table, changes| {
            shared
                .persist_routes(table, changes)
                .map_err(MigrateError::from)
        },
    )?;
    shared.migrations.note_moved(tenant, table.epoch);
    Ok(())
}

/// Ends the tenant's sessions that are still on its old route and cannot move (pinned by state that cannot
/// follow them): the old side is fenced, so they could only fail there. Called with the gate still closed, so
/// none of them is inside a transaction. Returns how many were told to end.
pub(super) fn end_pinned_sessions(shared: &Shared, tenant: &TenantId) -> usize {
    let Some(epoch) = shared.migrations.moved_at(tenant) else {
        return 0;
    };
    let mut ended = 0;
    for s in shared.sessions.of_tenant(tenant) {
        let route = s.route();
        if let (true, Some(reason)) = (route.epoch < epoch, route.pinned) {
            s.end_with(crate::frontend::moved_away(tenant, reason));
            ended += 1;
        }
    }
    ended
}

/// Sets each of `sequences` on `to` at or above the same sequence on `from`: one query per side.
pub async fn sync_sequences(
    from: &Client,
    from_side: &Endpoint,
    to: &Client,
    to_side: &Endpoint,
    sequences: &[String],
) -> Result<(), MigrateError> {
    if sequences.is_empty() {
        return Ok(());
    }
    let read: Vec<String> = sequences
        .iter()
        .enumerate()
        .map(|(i, s)| {
            format!(
                "SELECT {i}::int, last_value, is_called FROM {}",
                from_side.qualified(s)
            )
        })
        .collect();
    let rows = from
        .query(&read.join(" UNION ALL "), &[])
        .await
        .map_err(|e| MigrateError::pg("read sequences", e))?;
    let mut sets = Vec::new();
    for row in &rows {
        let (i, last, called): (i32, i64, bool) = (row.get(0), row.get(1), row.get(2));
        let Some(seq) = sequences.get(i as usize) else {
            continue;
        };
        if called {
            let q = to_side.qualified(seq);
            // At or beyond the source's value in the sequence's own direction.
            let lit = crate::quote::quote_literal(&q);
            sets.push(format!(
                "setval({lit}::regclass, CASE WHEN (SELECT seqincrement FROM pg_sequence \
                 WHERE seqrelid = {lit}::regclass) > 0 \
                 THEN greatest({last}, (SELECT last_value FROM {q})) \
                 ELSE least({last}, (SELECT last_value FROM {q})) END, true)"
            ));
        }
    }
    if sets.is_empty() {
        return Ok(());
    }
    to.query(&format!("SELECT {}", sets.join(", ")), &[])
        .await
        .map_err(|e| MigrateError::pg("set sequences on the target", e))?;
    Ok(())
}

/// The tenant lives on the target (its route): the target not fenced, the source fenced. A restart right after a
/// cutover's swap, or inside a rollback between fencing the target and swapping back, left them otherwise. The
/// target is opened even when the source cannot be reached (it is the tenant's only route). True once the
/// target is open (a source that cannot be reached cannot take the tenant's writes either).
pub async fn settle_fences(shared: &Shared, rec: &Record) -> bool {
    let Ok((source, target)) = endpoints(shared, rec) else {
        return false;
    };
    let opened = match target.connect().await {
        Ok(dst) => capture::unfence(&dst, &rec.tenant)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let fenced = match source.connect().await {
        Ok(src) => capture::fence(
            &src,
            &rec.tenant,
            "cut over to another backend",
            source.filter.is_none(),
        )
        .await
        .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = &fenced {
        warn!(tenant = %rec.tenant, error = %e, "could not fence the source of the migrated tenant");
    }
    match opened {
        Ok(()) => true,
        Err(e) => {
            warn!(tenant = %rec.tenant, error = %e, "could not open the target of the migrated tenant");
            false
        }
    }
}

/// A restart found the migration inside a cutover: finish it if the route was swapped, else fall back.
pub async fn recover(shared: &Arc<Shared>, rec: &Record) {
    let current = shared.router.load().get(&rec.tenant).cloned();
    if current.as_deref() == Some(&rec.target) {
        // Swapped: make sure the fence is where it belongs (the proxy may have stopped right after the swap).
        settle_fences(shared, rec).await;
        if let Err(e) = transition(shared, &rec.tenant, Event::Swapped, |r| {
            r.last_cutover_error = None;
        }) {
            warn!(tenant = %rec.tenant, error = %e, "could not record the finished cutover");
        }
    } else if let Err(e) = fall_back(
        shared,
        rec,
        "the proxy restarted during the cutover, before the route swap",
        Duration::ZERO,
    )
    .await
    {
        // The record still says cutover_paused with the route on the source: the next start tries again.
        warn!(tenant = %rec.tenant, error = %e, "could not record the fallback of an interrupted cutover");
    }
}
