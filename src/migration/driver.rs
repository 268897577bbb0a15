//! The task that drives one migration through its states: capture, bulk copy, then keeping the tee running,
//! verifying, and cutting over when automatic. What it does in each state and after a failure is decided by
//! `decide`; every state change goes through `machine::transition`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::warn;
use tracing::Instrument;

use super::catalog::Table;
use super::decide::{self, AfterFailure, Step};
use super::machine::{labels, set_state_gauge, transition_off_thread, Event};
use super::record::{Record, State};
use super::registry::{Direction, Live};
use super::sides::{endpoints, load_tables, start_tee, stop_tee};
use super::{capture, copy, MigrateError};
use crate::context::Shared;

/// How often the driving task looks at its migration when nothing happens.
const TICK: Duration = Duration::from_millis(200);
/// How long a resumption waits for its tee before serving goes on without it.
const PRESTART: Duration = Duration::from_secs(5);

/// Spawns the task that drives `tenant`'s migration.
pub fn spawn(shared: Arc<Shared>, live: Arc<Live>) {
    let task_live = live.clone();
    // Every log line of the migration's task names its tenant and the state it was in.
    let span = tracing::info_span!(
        "migration",
        tenant = %live.tenant,
        state = tracing::field::Empty
    );
    let handle = tokio::spawn(
        async move {
            drive(&shared, &task_live).await;
            if !task_live.stop.is_cancelled() {
                warn!("migration task ended");
            }
        }
        .instrument(span),
    );
    *live.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
}

/// Resumes every unfinished migration after a start (DESIGN: restart safety), before the listener accepts
/// clients: each one's tee is started first (see [`prestart_tee`]).
pub async fn resume_all(shared: &Arc<Shared>) {
    for rec in shared.migrations.all() {
        if rec.state.is_final() {
            continue;
        }
        let live = restore(shared, &rec).await;
        // As `recover` left it (a cutover interrupted at start-up is back in dual_write or migrated).
        if let Some(now) = shared.migrations.get(&rec.tenant) {
            prestart_tee(shared, &live, &now).await;
        }
        spawn(shared.clone(), live);
    }
}

/// Continues one unfinished migration from its record, taken over from another instance. Its tee is left to
/// the driver: this runs in the control plane's loop, which must go on renewing the other leases.
pub async fn resume(shared: &Arc<Shared>, rec: &super::record::Record) {
    let live = restore(shared, rec).await;
    spawn(shared.clone(), live);
}

/// Registers a resumed migration's task and settles a cutover it was interrupted in.
async fn restore(shared: &Arc<Shared>, rec: &super::record::Record) -> Arc<Live> {
    let live = shared.migrations.register_live(&rec.tenant);
    set_state_gauge(shared, rec);
    if rec.state == State::CutoverPaused {
        super::cutover::recover(shared, rec).await;
    }
    // A barrier the previous coordinator (this process before a restart, or a dead instance) left closed
    // holds the other instances until it ends; the route they apply first is settled by now.
    super::publish::end_barrier(shared, &rec.tenant, "open");
    live
}

/// A resumed move's tee is published before clients are served again: left to the driver's first step,
/// commits in dual_write would return without waiting for it until then. Bounded: a source that is down leaves
/// it to the driver, which retries.
async fn prestart_tee(shared: &Arc<Shared>, live: &Arc<Live>, rec: &Record) {
    let runs = match rec.state {
        State::DualWrite => true,
        // Unless a rollback swapped the route back (the driver finishes it, with no tee).
        State::Migrated => !on_source(shared, rec),
        _ => false,
    };
    if rec.paused || !runs {
        return;
    }
    let _one = live.lock.lock().await;
    let started = tokio::time::timeout(PRESTART, super::sides::ensure_tee(shared, live, rec)).await;
    if let Err(e) = started.unwrap_or(Err(MigrateError::Timeout("starting the tee".into()))) {
        warn!(tenant = %rec.tenant, error = %e, "the tee did not start with the move's resumption; the driver retries");
    }
}

async fn drive(shared: &Arc<Shared>, live: &Arc<Live>) {
    let mut failures = 0u32;
    let mut loaded = false;
    // The span's state is recorded when it changes: the log formatter appends a field each time it is recorded,
    // so recording it on every turn of this loop grew the span (and every line logged in it) without end.
    let mut shown = "";
    loop {
        if live.stop.is_cancelled() || shared.terminate.is_fired() {
            return;
        }
        let Some(rec) = shared.migrations.get(&live.tenant) else {
            return;
        };
        if rec.state.is_final() {
            return;
        }
        if shown != rec.shown_state() {
            shown = rec.shown_state();
            tracing::Span::current().record("state", shown);
        }
        if !loaded && rec.state != State::Failed {
            match load_tables(shared, live, &rec).await {
                Ok(()) => loaded = true,
                Err(e) => {
                    note_error(shared, &rec.tenant, &e);
                    sleep(live, Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        if !super::sides::lease_held(shared, &live.tenant) {
            // Cut off from the control plane, or frozen past the lease: another instance may be running this
            // move now. Nothing is done until a renewal confirms the lease (or finds it taken: then this task is
            // halted).
            sleep(live, TICK).await;
            continue;
        }
        match step(shared, live, &rec).await {
            Ok(()) => failures = 0,
            Err(MigrateError::Cancelled) => {}
            Err(e) => {
                failures += 1;
                note_error(shared, &rec.tenant, &e);
                match decide::after_failure(rec.state, failures) {
                    AfterFailure::Retry(after) => sleep(live, after).await,
                    AfterFailure::Fail => fail(shared, live, &rec, &e, &mut failures).await,
                }
            }
        }
    }
}

/// Marks the migration `failed` (an operator resumes it). If even that cannot be written, the failure is
/// logged and the step tried again later: the record on disk still says where the migration stands.
async fn fail(
    shared: &Arc<Shared>,
    live: &Live,
    rec: &Record,
    e: &MigrateError,
    failures: &mut u32,
) {
    warn!(tenant = %rec.tenant, error = %e, "migration failed");
    let (state, error) = (rec.state, e.to_string());
    let failed = transition_off_thread(shared, &rec.tenant, Event::StepFailed, move |r| {
        r.failed_in = Some(state);
        r.last_error = Some(error);
    })
    .await;
    match failed {
        Ok(_) => *failures = 0,
        Err(write) => {
            warn!(tenant = %rec.tenant, error = %write, "could not record the failure; trying again");
            sleep(live, Duration::from_secs(5)).await;
        }
    }
}

fn note_error(shared: &Shared, tenant: &str, e: &MigrateError) {
    warn!(%tenant, error = %e, "migration step failed");
    let _ = shared
        .migrations
        .update(tenant, |r| r.last_error = Some(e.to_string()));
}

fn pause_work(live: &Live) {
    if let Some((_, t)) = live.tee() {
        t.set_paused(true);
    }
}

async fn sleep(live: &Live, d: Duration) {
    tokio::select! {
        _ = live.stop.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

async fn step(shared: &Arc<Shared>, live: &Arc<Live>, rec: &Record) -> Result<(), MigrateError> {
    let fp = shared.migrations.failpoints.clone();
    match decide::step_for(rec) {
        Step::InstallCapture => {
            let (source, target) = endpoints(shared, rec)?;
            fp.check_until("pending.before_capture", &live.stop).await?;
            // The target's ledger (and later its reverse capture) live in its own pgtenant schema.
            capture::setup(&target.connect().await?).await?;
            let client = source.connect().await?;
            capture::install(&client, &source, &rec.tenant, &rec.tables, &live.stop).await?;
            fp.check_until("pending.after_capture", &live.stop).await?;
            transition_off_thread(shared, &rec.tenant, Event::CaptureInstalled, |_| {}).await?;
            Ok(())
        }
        Step::Copy => {
            bulk_copy(shared, live, rec).await?;
            if shared
                .migrations
                .get(&rec.tenant)
                .is_some_and(|r| r.post_data_pending)
            {
                let (source, target) = endpoints(shared, rec)?;
                let pg_dump = shared.config.load().migration.pg_dump.clone();
                let migration = format!("{}@{}", rec.tenant, rec.started_at);
                super::post_data::apply(&pg_dump, &migration, &source, &target).await?;
                super::ops::grant_target(shared, rec, &target)
                    .await
                    .map_err(|e| MigrateError::Postgres {
                        context: "grant the tenant's role on the target".into(),
                        message: e.to_string(),
                    })?;
                shared
                    .migrations
                    .update(&rec.tenant, |r| r.post_data_pending = false)?;
            }
            fp.check_until("copy.before_dual_write", &live.stop).await?;
            // The tee first: once the state says dual_write, a commit that returns is on the target. (The record
            // as it is now: a pause may have come during the copy.)
            let now = shared
                .migrations
                .get(&rec.tenant)
                .unwrap_or_else(|| rec.clone());
            start_tee(shared, live, &now, Direction::Forward).await?;
            transition_off_thread(shared, &rec.tenant, Event::Copied, |r| {
                r.rows_copied = r.copied.values().map(|c| c.rows).sum();
                r.bytes_copied = r.copied.values().map(|c| c.bytes).sum();
            })
            .await?;
            Ok(())
        }
        Step::Run => {
            running(shared, live, rec.state).await?;
            sleep(live, TICK).await;
            Ok(())
        }
        Step::Wait => {
            if rec.paused {
                pause_work(live);
            }
            sleep(live, TICK).await;
            Ok(())
        }
    }
}

/// The running states: keep the tee going, verify once on entering dual_write, cut over when automatic. Under
/// `live.lock`, with the state read again: the commands that stop the tee (cutover, rollback, finalize) hold
/// the lock until their transition is written, so this can never restart a tee they just stopped.
async fn running(
    shared: &Arc<Shared>,
    live: &Arc<Live>,
    expected: State,
) -> Result<(), MigrateError> {
    let _one = live.lock.lock().await;
    let Some(rec) = shared.migrations.get(&live.tenant) else {
        return Ok(());
    };
    if rec.state != expected || rec.paused || live.stop.is_cancelled() {
        return Ok(());
    }
    if rec.state == State::Migrated && on_source(shared, &rec) {
        // A rollback swapped the route back but did not finish its cleanup: finish it.
        stop_tee(shared, live).await;
        return super::rollback::finish_rollback(shared, &rec, rec.last_pause_ms.unwrap_or(0.0))
            .await;
    }
    // Migrated and routed to the target: a rollback that stopped between fencing the target and swapping the
    // route back left the tenant's only route fenced. Checked once per run, by the move's own task (under its
    // lease, and off the control plane's loop: a dead old source takes a connect timeout).
    // Not while the tenant is held: a rollback waiting for the store's answer has the fences its way.
    let held =
        shared.gates.get(&rec.tenant).is_closed() || live.swap_pending.load(Ordering::Acquire);
    if rec.state == State::Migrated && !held && !live.fences_settled.load(Ordering::Relaxed) {
        let settled = super::cutover::settle_fences(shared, &rec).await;
        live.fences_settled.store(settled, Ordering::Relaxed);
    }
    if rec.state == State::Migrated {
        start_tee(shared, live, &rec, Direction::Reverse)
            .await?
            .set_paused(false);
        return Ok(());
    }
    let tee = start_tee(shared, live, &rec, Direction::Forward).await?;
    tee.set_paused(false);
    if rec.verification.is_none() {
        if let Err(e) = super::verification::verify_locked(shared, live, rec.verify).await {
            warn!(tenant = %rec.tenant, error = %e, "verification failed to run");
        }
    } else if decide::should_auto_cutover(&rec, tee.lag(), super::record::now_ms() / 1000) {
        if let Err(e) = super::cutover::cutover(shared, live).await {
            warn!(tenant = %rec.tenant, error = %e, "automatic cutover attempt failed");
            drop(_one);
            sleep(live, Duration::from_secs(1)).await;
        }
    }
    Ok(())
}

fn on_source(shared: &Shared, rec: &Record) -> bool {
    shared
        .router
        .load()
        .get(&rec.tenant)
        .is_some_and(|r| **r == rec.source)
}

/// The copy step: rows_total counted once, then the tables without a checkpoint.
async fn bulk_copy(
    shared: &Arc<Shared>,
    live: &Arc<Live>,
    rec: &Record,
) -> Result<(), MigrateError> {
    let (source, target) = endpoints(shared, rec)?;
    let mut rec = rec.clone();
    if rec.rows_total == 0 && rec.copied.is_empty() {
        let client = source.connect().await?;
        let total = copy::count_rows(&client, &source, &live.tables()).await?;
        rec = shared
            .migrations
            .update(&rec.tenant, |r| r.rows_total = total)?;
        set_state_gauge(shared, &rec);
    }
    let done = rec.copied_tables();
    let tables: Vec<Table> = live
        .tables()
        .into_iter()
        .filter(|t| !done.contains(t.name.as_str()))
        .collect();
    live.partial_rows.store(0, Ordering::Relaxed);
    let cfg = shared.config.load();
    let job = copy::CopyJob {
        tenant: rec.tenant.clone(),
        source,
        target,
        tables,
        batch_rows: cfg.migration.copy_batch_rows.max(1),
        parallel: cfg.migration.copy_parallel_tables.max(1),
        split_bytes: cfg.migration.copy_split_mb.saturating_mul(1024 * 1024),
        failpoints: shared.migrations.failpoints.clone(),
        stop: live.stop.clone(),
        lease: shared.control_plane.get().map(|cp| cp.lease_clock.clone()),
    };
    let progress = Arc::new(Progress {
        shared: shared.clone(),
        live: live.clone(),
    });
    copy::run(job, progress).await
}

struct Progress {
    shared: Arc<Shared>,
    live: Arc<Live>,
}

impl copy::CopyProgress for Progress {
    fn rows(&self, n: u64) {
        self.live.partial_rows.fetch_add(n, Ordering::Relaxed);
        self.shared
            .metrics
            .counter("migration_events_copied_total", labels(&self.live.tenant))
            .increment(n);
    }

    fn table_done(
        &self,
        table: &str,
        cp: super::record::TableCheckpoint,
    ) -> Result<(), MigrateError> {
        let rows = cp.rows;
        let rec = self.shared.migrations.update(&self.live.tenant, |r| {
            r.copied.insert(table.to_owned(), cp);
            r.rows_copied = r.copied.values().map(|c| c.rows).sum();
            r.bytes_copied = r.copied.values().map(|c| c.bytes).sum();
            r.rows_total = r.rows_total.max(r.rows_copied);
        })?;
        self.live.partial_rows.fetch_sub(
            rows.min(self.live.partial_rows.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        set_state_gauge(&self.shared, &rec);
        Ok(())
    }

    fn stopped(&self) -> bool {
        self.live.stop.is_cancelled()
            || self.shared.terminate.is_fired()
            || self
                .shared
                .migrations
                .get(&self.live.tenant)
                .is_none_or(|r| r.paused)
    }
}
