//! The coordinator: the registry of migrations (persisted records plus what runs for each), the task that drives
//! a migration through its states, and the transitions (persisted and audited before they take effect).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use metrics::Label;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::catalog::{self, Table};
use super::failpoint::Failpoints;
use super::pg::{Endpoint, Filter};
use super::record::{CutoverMode, Record, State, Store};
use super::tee::{Tee, TeeMetrics, TeeSpec};
use super::{capture, copy, MigrateError};
use crate::context::Shared;
use crate::state::StateError;

/// Tries of a failing copy/capture step before the migration is marked `failed`.
const STEP_TRIES: u32 = 3;
/// How often the driving task looks at its migration when nothing happens.
const TICK: Duration = Duration::from_millis(200);
/// Automatic cutover waits for the backlog to be this small.
const AUTO_CUTOVER_LAG: u64 = 100;

/// Which way a tee runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Source to target (dual_write).
    Forward,
    /// Target back to source (after cutover).
    Reverse,
}

/// What runs for one migration.
pub struct Live {
    pub tenant: String,
    /// One operation at a time (verify, cutover, rollback, finalize, abort, repair).
    pub lock: tokio::sync::Mutex<()>,
    pub stop: CancellationToken,
    /// Rows copied for tables not yet checkpointed.
    pub partial_rows: AtomicU64,
    pub tee: Mutex<Option<(Direction, Arc<Tee>)>>,
    pub tables: Mutex<Vec<Table>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Live {
    fn new(tenant: &str) -> Arc<Live> {
        Arc::new(Live {
            tenant: tenant.to_owned(),
            lock: tokio::sync::Mutex::new(()),
            stop: CancellationToken::new(),
            partial_rows: AtomicU64::new(0),
            tee: Mutex::new(None),
            tables: Mutex::new(Vec::new()),
            task: Mutex::new(None),
        })
    }

    /// Stops the driving task and waits (bounded) until it has ended, so nothing it was doing (a capture
    /// install, a copy batch) can land after the caller's cleanup.
    pub async fn halt(&self) {
        self.stop.cancel();
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = task {
            if tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .is_err()
            {
                warn!(tenant = %self.tenant, "migration task did not stop within 60 s");
            }
        }
    }

    pub fn tee(&self) -> Option<(Direction, Arc<Tee>)> {
        self.tee.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn tables(&self) -> Vec<Table> {
        self.tables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

pub struct Migrations {
    store: Store,
    records: Mutex<BTreeMap<String, Record>>,
    live: Mutex<HashMap<String, Arc<Live>>>,
    /// The running tees by tenant; sessions look here after a transaction that wrote.
    pub tees: ArcSwap<HashMap<String, Arc<Tee>>>,
    pub failpoints: Arc<Failpoints>,
    /// The routing epoch at which a migration moved each tenant (cutover or rollback): a session still on an
    /// older route of the tenant is ended rather than left writing to the fenced old side.
    moved: Mutex<HashMap<String, u64>>,
}

impl Migrations {
    pub fn open(dir: &std::path::Path) -> Result<Migrations, StateError> {
        let store = Store::new(dir);
        let records = store.load()?;
        Ok(Migrations {
            store,
            records: Mutex::new(records),
            live: Mutex::new(HashMap::new()),
            tees: ArcSwap::from_pointee(HashMap::new()),
            failpoints: Arc::new(Failpoints::from_env()),
            moved: Mutex::new(HashMap::new()),
        })
    }

    /// A migration swapped `tenant`'s route at routing epoch `epoch`.
    pub fn note_moved(&self, tenant: &str, epoch: u64) {
        self.moved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.to_owned(), epoch);
    }

    /// The epoch at which a migration last moved `tenant`, if one did since the proxy started.
    pub fn moved_at(&self, tenant: &str) -> Option<u64> {
        self.moved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            .copied()
    }

    pub fn get(&self, tenant: &str) -> Option<Record> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            .cloned()
    }

    pub fn all(&self) -> Vec<Record> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn live(&self, tenant: &str) -> Option<Arc<Live>> {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            .cloned()
    }

    /// Migrations not yet ended.
    pub fn active_count(&self) -> usize {
        self.all().iter().filter(|r| !r.state.is_final()).count()
    }

    /// Writes `record` (new or changed) to disk, then makes it current. On a write failure nothing changes.
    pub fn put(&self, record: Record) -> Result<(), StateError> {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = records.clone();
        next.insert(record.tenant.clone(), record);
        self.store.save(&next)?;
        *records = next;
        Ok(())
    }

    /// Changes the record of `tenant` with `f` and persists it.
    pub fn update(
        &self,
        tenant: &str,
        f: impl FnOnce(&mut Record),
    ) -> Result<Record, MigrateError> {
        let mut rec = self
            .get(tenant)
            .ok_or_else(|| MigrateError::Refused(format!("no migration for tenant {tenant:?}")))?;
        f(&mut rec);
        rec.updated_at = crate::state::audit::rfc3339_now();
        self.put(rec.clone())?;
        Ok(rec)
    }

    fn publish_tee(&self, tenant: &str, tee: Option<Arc<Tee>>) {
        let mut map = (**self.tees.load()).clone();
        match tee {
            Some(t) => map.insert(tenant.to_owned(), t),
            None => map.remove(tenant),
        };
        self.tees.store(Arc::new(map));
    }

    pub fn register_live(&self, tenant: &str) -> Arc<Live> {
        let live = Live::new(tenant);
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.to_owned(), live.clone());
        live
    }

    /// Stops every migration task and tee (the proxy is going away; records stay as they are on disk, and the
    /// next start resumes them).
    pub fn shutdown(&self) {
        self.failpoints.close();
        self.tees.store(Arc::new(HashMap::new()));
        let live: Vec<Arc<Live>> = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, l)| l)
            .collect();
        for l in live {
            l.stop.cancel();
            if let Some((_, t)) = l.tee.lock().unwrap_or_else(|p| p.into_inner()).take() {
                t.stop_now();
            }
        }
    }

    pub fn forget_live(&self, tenant: &str) {
        if let Some(live) = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tenant)
        {
            live.stop.cancel();
        }
    }
}

/// Moves `tenant`'s migration to `to` (persisted, then audited), applying `f` to the record on the way.
pub fn transition(
    shared: &Shared,
    tenant: &str,
    to: State,
    f: impl FnOnce(&mut Record),
) -> Result<Record, MigrateError> {
    let before = shared.migrations.get(tenant).map(|r| r.state);
    let rec = shared.migrations.update(tenant, |r| {
        r.state = to;
        f(r)
    })?;
    info!(%tenant, from = ?before, to = to.as_str(), "migration state");
    if let Err(e) = shared.audit.append(
        "migration",
        "migrate.state",
        Some(tenant),
        json!({"state": before.map(State::as_str)}),
        json!({"state": to.as_str()}),
        "ok",
    ) {
        shared.audit_ok.store(false, Ordering::Relaxed);
        warn!(%tenant, error = %e, "audit write failed for a migration transition");
    }
    set_state_gauge(shared, &rec);
    Ok(rec)
}

fn labels(tenant: &str) -> Vec<Label> {
    vec![Label::new("tenant", tenant.to_owned())]
}

pub fn set_state_gauge(shared: &Shared, rec: &Record) {
    let m = &shared.metrics;
    let state = if rec.paused && !rec.state.is_final() {
        8.0
    } else {
        rec.state.code()
    };
    m.gauge("migration_state", labels(&rec.tenant)).set(state);
    m.gauge("migration_progress_percent", labels(&rec.tenant))
        .set(rec.progress_percent(0));
    m.gauge("migration_events_total", labels(&rec.tenant))
        .set(rec.rows_total as f64);
}

/// The two endpoints of a record, from the configured backends.
pub fn endpoints(shared: &Shared, rec: &Record) -> Result<(Endpoint, Endpoint), MigrateError> {
    let backends = shared.backends.load();
    let side = |backend: &str, database: &str, schema: &str| {
        let b = backends.get(backend).ok_or_else(|| {
            MigrateError::Refused(format!("backend {backend:?} is no longer configured"))
        })?;
        Ok::<_, MigrateError>(Endpoint {
            backend: backend.to_owned(),
            config: b.config.clone(),
            database: database.to_owned(),
            schema: schema.to_owned(),
            filter: rec.tenant_column.as_ref().map(|column| Filter {
                column: column.clone(),
                key: rec.tenant_key.clone().unwrap_or_else(|| rec.tenant.clone()),
            }),
        })
    };
    let target_schema = rec.target.schema.as_deref().unwrap_or(&rec.schema);
    Ok((
        side(&rec.source.backend, &rec.source_database, &rec.schema)?,
        side(&rec.target.backend, &rec.target_database, target_schema)?,
    ))
}

/// Starts (or replaces) the tee of `live` in `dir`, and publishes it to sessions.
pub async fn start_tee(
    shared: &Arc<Shared>,
    live: &Live,
    rec: &Record,
    dir: Direction,
) -> Result<Arc<Tee>, MigrateError> {
    if let Some((d, t)) = live.tee() {
        if d == dir {
            return Ok(t);
        }
        stop_tee(shared, live).await;
    }
    let (source, target) = endpoints(shared, rec)?;
    let (from, to) = match dir {
        Direction::Forward => (source, target),
        Direction::Reverse => (target, source),
    };
    let cfg = shared.config.load();
    let m = &shared.metrics;
    let t = &rec.tenant;
    let status = |s: &str| {
        vec![
            Label::new("tenant", t.clone()),
            Label::new("status", s.to_owned()),
        ]
    };
    let metrics = TeeMetrics {
        ok: m.counter("dual_write_operations_total", status("ok")),
        failed: m.counter("dual_write_operations_total", status("failed")),
        target_failures: m.counter("dual_write_target_failures_total", labels(t)),
        latency: m.histogram("dual_write_latency_seconds", labels(t)),
        lag: m.gauge("dual_write_sync_lag_events", labels(t)),
    };
    let spec = TeeSpec {
        tenant: rec.tenant.clone(),
        from,
        to,
        tables: live.tables(),
        mode: cfg.migration.tee,
        timeout: Duration::from_millis(cfg.migration.tee_timeout_ms),
        interval: Duration::from_millis(cfg.migration.catchup_interval_ms.max(10)),
        failpoints: shared.migrations.failpoints.clone(),
    };
    let tee = Tee::start(spec, metrics, rec.paused);
    *live.tee.lock().unwrap_or_else(|p| p.into_inner()) = Some((dir, tee.clone()));
    shared
        .migrations
        .publish_tee(&rec.tenant, Some(tee.clone()));
    Ok(tee)
}

/// Unpublishes and stops the tee of `live`; returns once no pass of it is in flight.
pub async fn stop_tee(shared: &Shared, live: &Live) {
    shared.migrations.publish_tee(&live.tenant, None);
    let tee = live.tee.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some((_, t)) = tee {
        t.stop().await;
    }
}

/// Loads the source tables of `rec` into `live`.
pub async fn load_tables(shared: &Shared, live: &Live, rec: &Record) -> Result<(), MigrateError> {
    let (source, _) = endpoints(shared, rec)?;
    let client = source.connect().await?;
    let mut tables = catalog::tables(&client, &source.schema).await?;
    tables.retain(|t| rec.tables.contains(&t.name));
    *live.tables.lock().unwrap_or_else(|p| p.into_inner()) = tables;
    Ok(())
}

/// The tee of the migration's running state, started now if the driver has not yet (a command right after a
/// restart must not be refused because the driver's first tick has not come). Call under `live.lock`.
pub async fn ensure_tee(
    shared: &Arc<Shared>,
    live: &Live,
    rec: &Record,
) -> Result<Arc<Tee>, MigrateError> {
    let dir = match rec.state {
        State::DualWrite | State::CutoverPaused => Direction::Forward,
        State::Migrated => Direction::Reverse,
        _ => {
            return Err(MigrateError::Refused(format!(
                "the tee runs in dual_write and migrated; the migration is {}",
                rec.shown_state()
            )))
        }
    };
    if live.tables().is_empty() {
        load_tables(shared, live, rec).await?;
    }
    start_tee(shared, live, rec, dir).await
}

/// Spawns the task that drives `tenant`'s migration.
pub fn spawn(shared: Arc<Shared>, live: Arc<Live>) {
    let task_live = live.clone();
    let handle = tokio::spawn(async move {
        drive(&shared, &task_live).await;
        if !task_live.stop.is_cancelled() {
            warn!(tenant = %task_live.tenant, "migration task ended");
        }
    });
    *live.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
}

/// Resumes every unfinished migration after a start (DESIGN: restart safety).
pub async fn resume_all(shared: &Arc<Shared>) {
    for rec in shared.migrations.all() {
        if rec.state.is_final() {
            continue;
        }
        let live = shared.migrations.register_live(&rec.tenant);
        set_state_gauge(shared, &rec);
        if rec.state == State::CutoverPaused {
            super::cutover::recover(shared, &rec).await;
        }
        spawn(shared.clone(), live);
    }
}

async fn drive(shared: &Arc<Shared>, live: &Arc<Live>) {
    let mut failures = 0u32;
    let mut loaded = false;
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
        let step = if rec.paused {
            pause_work(live);
            sleep(live, TICK).await;
            Ok(())
        } else {
            step(shared, live, &rec).await
        };
        match step {
            Ok(()) => failures = 0,
            Err(MigrateError::Cancelled) => {}
            Err(e) => {
                failures += 1;
                note_error(shared, &rec.tenant, &e);
                if failures >= STEP_TRIES && matches!(rec.state, State::Pending | State::BulkCopy) {
                    warn!(tenant = %rec.tenant, error = %e, "migration failed");
                    let _ = transition(shared, &rec.tenant, State::Failed, |r| {
                        r.failed_in = Some(rec.state);
                        r.last_error = Some(e.to_string());
                    });
                    failures = 0;
                } else {
                    sleep(live, Duration::from_millis(500 << failures.min(4))).await;
                }
            }
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
    match rec.state {
        State::Pending => {
            let (source, target) = endpoints(shared, rec)?;
            fp.check_until("pending.before_capture", &live.stop).await?;
            // The target's ledger (and later its reverse capture) live in its own pgtenant schema.
            capture::setup(&target.connect().await?).await?;
            let client = source.connect().await?;
            capture::install(&client, &source, &rec.tenant, &rec.tables, &live.stop).await?;
            fp.check_until("pending.after_capture", &live.stop).await?;
            transition(shared, &rec.tenant, State::BulkCopy, |_| {})?;
            Ok(())
        }
        State::BulkCopy => {
            bulk_copy(shared, live, rec).await?;
            fp.check_until("copy.before_dual_write", &live.stop).await?;
            let rec = transition(shared, &rec.tenant, State::DualWrite, |r| {
                r.rows_copied = r.copied.values().map(|c| c.rows).sum();
            })?;
            start_tee(shared, live, &rec, Direction::Forward).await?;
            Ok(())
        }
        State::DualWrite | State::Migrated => {
            running(shared, live, rec.state).await?;
            sleep(live, TICK).await;
            Ok(())
        }
        _ => {
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
        return super::cutover::finish_rollback(shared, &rec, rec.last_pause_ms.unwrap_or(0.0))
            .await;
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
        if let Err(e) = super::ops::verify_locked(shared, live, rec.verify).await {
            warn!(tenant = %rec.tenant, error = %e, "verification failed to run");
        }
    } else if rec.cutover == CutoverMode::Auto
        && rec.verification.as_ref().is_some_and(|v| v.passed)
        && tee.lag() <= AUTO_CUTOVER_LAG
        && rec.cutover_attempts < 20
    {
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
        failpoints: shared.migrations.failpoints.clone(),
        stop: live.stop.clone(),
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
