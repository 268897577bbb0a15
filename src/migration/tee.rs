//! The tee: keeps one side in step with the other by draining the tenant's change log.
//!
//! Sessions whose transaction wrote call [`Tee::after_commit`] before they release the ReadyForQuery that ends
//! it. Drains are coalesced: a commit takes a ticket, the driver notes the highest ticket before it starts a
//! pass, and one pass answers every ticket up to that one (their commits were visible before the pass read the
//! log). A failing or slow target never fails a client: a waiter is released after `tee_timeout_ms` at most, or
//! at once when a pass fails; the entries stay in the log and the driver retries with backoff. Between commits
//! the driver also polls the log (writes that reached the database outside the proxy are applied too).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram};
use tokio::sync::{watch, Mutex, MutexGuard, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::apply::{Link, PASS_LIMIT};
use super::catalog::Table;
use super::failpoint::Failpoints;
use super::pg::Endpoint;
use super::MigrateError;
use crate::config::TeeMode;
use crate::tenant::TenantId;

/// Longest pause between retries after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Longest one background pass may take (a blackholed target must not hang the tee for a TCP timeout).
const PASS_TIMEOUT: Duration = Duration::from_secs(30);
/// [`Tee::drain_while`] starts no pass, and its callers stop waiting for open transactions, this long before
/// their deadline, so the deadline finds no pass halfway.
pub const DRAIN_MARGIN: Duration = Duration::from_millis(100);
/// How often the backlog gauge is refreshed from the database when nothing else updates it.
const LAG_REFRESH: Duration = Duration::from_secs(1);

pub struct TeeMetrics {
    pub ok: Counter,
    pub failed: Counter,
    pub target_failures: Counter,
    pub latency: Histogram,
    pub lag: Gauge,
}

/// What the tee drains: from one endpoint to the other.
pub struct TeeSpec {
    pub tenant: TenantId,
    pub from: Endpoint,
    pub to: Endpoint,
    pub tables: Vec<Table>,
    pub mode: TeeMode,
    pub timeout: Duration,
    pub interval: Duration,
    /// `tee.before_pass`: between taking the drain lock and reading the log.
    pub failpoints: Arc<Failpoints>,
    /// With a control plane: the link connects only while this instance's lease on the move is confirmed.
    pub lease: Option<Arc<crate::cluster::leases::LeaseClock>>,
}

pub struct Tee {
    spec: TeeSpec,
    requested: AtomicU64,
    done: watch::Sender<u64>,
    wake: Notify,
    link: Mutex<Option<Link>>,
    /// A connection to the "from" side for counting the backlog while the link is down.
    probe: Mutex<Option<tokio_postgres::Client>>,
    /// Operator pause: no drains (waiters released at once), lag grows.
    paused: AtomicBool,
    stop: CancellationToken,
    lag: AtomicU64,
    last_error: std::sync::Mutex<Option<String>>,
    metrics: TeeMetrics,
}

impl Tee {
    pub fn start(spec: TeeSpec, metrics: TeeMetrics, paused: bool) -> Arc<Tee> {
        let (done, _) = watch::channel(0);
        let tee = Arc::new(Tee {
            spec,
            requested: AtomicU64::new(0),
            done,
            wake: Notify::new(),
            link: Mutex::new(None),
            probe: Mutex::new(None),
            paused: AtomicBool::new(paused),
            stop: CancellationToken::new(),
            lag: AtomicU64::new(0),
            last_error: std::sync::Mutex::new(None),
            metrics,
        });
        tokio::spawn(tee.clone().run());
        tee
    }

    /// Called by a session after a transaction that wrote has committed, before its ReadyForQuery goes out.
    pub async fn after_commit(&self) {
        if self.spec.mode == TeeMode::Async || self.paused.load(Ordering::Relaxed) {
            self.wake.notify_one();
            return;
        }
        let started = Instant::now();
        let ticket = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut rx = self.done.subscribe();
        self.wake.notify_one();
        let _ = tokio::time::timeout(self.spec.timeout, rx.wait_for(|d| *d >= ticket)).await;
        self.metrics.latency.record(started.elapsed().as_secs_f64());
    }

    pub fn lag(&self) -> u64 {
        self.lag.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Stops the driver, waits for a pass in flight to end (so nothing of this direction is applied after this
    /// returns), closes the link (its target session holds the tenant's apply lock, see `claim`), and releases
    /// the waiters.
    pub async fn stop(&self) {
        self.stop.cancel();
        drop(self.link.lock().await.take());
        self.release_all();
    }

    /// Stops the driver without waiting (the proxy is shutting down).
    pub fn stop_now(&self) {
        self.stop.cancel();
        self.release_all();
    }

    fn release_all(&self) {
        self.publish(self.requested.load(Ordering::SeqCst));
    }

    /// Releases the commits holding tickets up to `ticket` (never moves backwards).
    fn publish(&self, ticket: u64) {
        self.done.send_if_modified(|d| {
            let newer = ticket > *d;
            if newer {
                *d = ticket;
            }
            newer
        });
    }

    /// Takes the drain lock (no pass runs while it is held) with a connected link, within `deadline`.
    pub async fn hold(
        &self,
        deadline: Instant,
    ) -> Result<MutexGuard<'_, Option<Link>>, MigrateError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut guard = tokio::time::timeout(left, self.link.lock())
            .await
            .map_err(|_| MigrateError::Timeout("waiting for the tee".into()))?;
        if guard.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let link = tokio::time::timeout(left, self.connect())
                .await
                .map_err(|_| MigrateError::Timeout("connecting the tee".into()))??;
            *guard = Some(link);
        }
        Ok(guard)
    }

    /// One pass under the held lock, bounded by `deadline`. Commits that took their ticket before the pass read
    /// the log are released when the pass read everything there was (fewer than a full batch).
    async fn pass_locked(
        &self,
        guard: &mut MutexGuard<'_, Option<Link>>,
        deadline: Instant,
    ) -> Result<usize, MigrateError> {
        self.spec
            .failpoints
            .check_until("tee.before_pass", &self.stop)
            .await?;
        let link = guard.as_mut().ok_or(MigrateError::Cancelled)?;
        let ticket = self.requested.load(Ordering::SeqCst);
        let left = deadline.saturating_duration_since(Instant::now());
        let read = match tokio::time::timeout(left, link.pass(&self.spec.tenant)).await {
            Ok(Ok(p)) => p.read,
            Ok(Err(e)) => {
                **guard = None;
                return Err(e);
            }
            Err(_) => {
                // The link is in an unknown state mid-pass; the next use reconnects.
                **guard = None;
                return Err(MigrateError::Timeout(format!(
                    "draining the change log ({} entries behind)",
                    self.lag()
                )));
            }
        };
        if (read as i64) < PASS_LIMIT {
            self.publish(ticket);
        }
        if read == 0 {
            self.lag.store(0, Ordering::Relaxed);
            self.metrics.lag.set(0.0);
        }
        Ok(read)
    }

    /// Drains until the log is empty (cutover, rollback, finalize), within `deadline`.
    pub async fn drain_to_empty(&self, deadline: Instant) -> Result<u64, MigrateError> {
        let mut guard = self.hold(deadline).await?;
        let mut total = 0u64;
        loop {
            let read = self.pass_locked(&mut guard, deadline).await?;
            total += read as u64;
            if read == 0 {
                return Ok(total);
            }
        }
    }

    /// Drains while traffic goes on until a pass finds fewer than `small` entries (the backlog is down to a few
    /// milliseconds of writes), within `deadline`. The cutover calls it before closing the gate, so the final
    /// drain with the tenant held is short.
    pub async fn catch_up(&self, deadline: Instant, small: usize) -> Result<(), MigrateError> {
        loop {
            let read = {
                let mut guard = self.hold(deadline).await?;
                self.pass_locked(&mut guard, deadline).await?
            };
            if read < small {
                return Ok(());
            }
        }
    }

    /// While the gate waits for the tenant's open transactions (`drained`), keeps draining the log, so that
    /// when the last one ends only its own changes are left for the final drain. Passes are never cut short
    /// (a pass abandoned halfway would leave the target inside a transaction): the one running when `drained`
    /// finishes is awaited. Returns what `drained` said.
    pub async fn drain_while(
        &self,
        drained: impl std::future::Future<Output = bool>,
        deadline: Instant,
    ) -> Result<bool, MigrateError> {
        let done = AtomicBool::new(false);
        let waiter = async {
            let ok = drained.await;
            done.store(true, Ordering::SeqCst);
            ok
        };
        // No new pass starts near the deadline, so none is running when the caller's time runs out.
        let last_start = deadline
            .checked_sub(DRAIN_MARGIN)
            .unwrap_or_else(Instant::now);
        let drainer = async {
            while !done.load(Ordering::SeqCst) && Instant::now() < last_start {
                let read = {
                    let mut guard = self.hold(deadline).await?;
                    self.pass_locked(&mut guard, deadline).await?
                };
                if read == 0 {
                    // Nothing to do: look again shortly (a commit lands in the log before its transaction ends).
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            Ok::<(), MigrateError>(())
        };
        tokio::pin!(waiter, drainer);
        // A drainer that fails ends the wait at once (the gate must not stay closed for an error already known);
        // otherwise the pass running when the transactions are done is awaited.
        tokio::select! {
            ok = &mut waiter => {
                drainer.await?;
                Ok(ok)
            }
            r = &mut drainer => match r {
                // The deadline came during a pass: what counts is whether the transactions finished.
                Ok(()) | Err(MigrateError::Timeout(_)) => Ok(waiter.await),
                Err(e) => Err(e),
            },
        }
    }

    async fn connect(&self) -> Result<Link, MigrateError> {
        let from = self.spec.from.connect().await?;
        let to = self.spec.to.connect().await?;
        let mut link = Link::new(from, to, self.spec.to.clone(), self.spec.tables.clone());
        // Just before the claim, which ends the session of whichever link holds the target now; the claim
        // carries the lease's generation, so a newer coordinator's claim is never undone by this one.
        if let Some(clock) = &self.spec.lease {
            let Some(generation) = clock.held(self.spec.tenant.as_str()) else {
                return Err(lease_unconfirmed());
            };
            link.generation = Some(generation);
        }
        // Before anything reads the log through this link (a verification reads it outside a pass).
        link.claim(&self.spec.tenant).await?;
        Ok(link)
    }

    async fn run(self: Arc<Self>) {
        let mut backoff = Duration::ZERO;
        let mut last_lag = Instant::now() - LAG_REFRESH;
        loop {
            let wait = if backoff.is_zero() {
                self.spec.interval
            } else {
                backoff
            };
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = self.wake.notified(), if backoff.is_zero() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            if self.paused.load(Ordering::SeqCst) {
                self.release_all();
                continue;
            }
            match self.drain_once().await {
                Ok(more) => {
                    backoff = Duration::ZERO;
                    self.metrics.ok.increment(1);
                    *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    if more {
                        self.wake.notify_one();
                    }
                }
                Err(MigrateError::Cancelled) => return,
                Err(e) => {
                    // A failing target never holds a client: the waiters go now, the entries stay in the log.
                    self.release_all();
                    self.metrics.failed.increment(1);
                    self.metrics.target_failures.increment(1);
                    backoff = (backoff * 2).clamp(Duration::from_millis(100), MAX_BACKOFF);
                    warn!(tenant = %self.spec.tenant, error = %e, retry_in_ms = backoff.as_millis() as u64, "tee drain failed");
                    *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(e.to_string());
                }
            }
            if last_lag.elapsed() >= LAG_REFRESH {
                last_lag = Instant::now();
                self.refresh_lag().await;
                self.vacuum().await;
            }
        }
    }

    /// One pass; `Ok(true)` when the log may hold more.
    async fn drain_once(&self) -> Result<bool, MigrateError> {
        let deadline = Instant::now() + PASS_TIMEOUT;
        let mut guard = self.hold(deadline).await?;
        if self.stop.is_cancelled() {
            return Err(MigrateError::Cancelled);
        }
        let read = self.pass_locked(&mut guard, deadline).await?;
        if read > 0 {
            debug!(tenant = %self.spec.tenant, read, "tee pass");
            // With no commit waiting, confirm the pass now rather than at the start of the next one, where
            // it would add a statement on each side to the next commit's wait (a single writer: 4 entries a
            // pass, the two deletes were ~0.1 ms of its 0.9 ms).
            if *self.done.borrow() >= self.requested.load(Ordering::SeqCst) {
                self.tidy_locked(&mut guard, deadline).await?;
            }
        }
        Ok(read as i64 >= PASS_LIMIT)
    }

    async fn tidy_locked(
        &self,
        guard: &mut MutexGuard<'_, Option<Link>>,
        deadline: Instant,
    ) -> Result<(), MigrateError> {
        let link = guard.as_mut().ok_or(MigrateError::Cancelled)?;
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, link.tidy(&self.spec.tenant)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                **guard = None;
                Err(MigrateError::Timeout("confirming a tee pass".into()))
            }
        }
    }

    /// Vacuums the change log and the ledger. Both are queues (every row is inserted and deleted within
    /// milliseconds), and autovacuum visits a database at most once per `autovacuum_naptime` (a minute by
    /// default): without this, every read of the log walks past a minute's worth of dead index entries.
    /// `TRUNCATE false`: truncating the table's tail would take an exclusive lock that stalls the capture
    /// triggers of every writing transaction.
    async fn vacuum(&self) {
        let guard = self.link.lock().await;
        let Some(link) = guard.as_ref() else {
            return;
        };
        let sql = "VACUUM (SKIP_LOCKED, TRUNCATE false) pgtenant.change_log, pgtenant.applied";
        let (a, b) =
            futures_util::future::join(link.from.batch_execute(sql), link.to.batch_execute(sql))
                .await;
        if let Err(e) = a.and(b) {
            debug!(tenant = %self.spec.tenant, error = %e, "vacuum of the change log failed");
        }
    }

    /// Counts the backlog on the "from" side with a connection of its own (so it works while the other side
    /// is down).
    async fn refresh_lag(&self) {
        let mut probe = self.probe.lock().await;
        if probe.as_ref().is_none_or(|c| c.is_closed()) {
            *probe = self.spec.from.connect().await.ok();
        }
        let Some(client) = probe.as_ref() else {
            return;
        };
        match super::capture::backlog(client, &self.spec.tenant).await {
            Ok(n) => {
                self.lag.store(n, Ordering::Relaxed);
                self.metrics.lag.set(n as f64);
            }
            Err(_) => *probe = None,
        }
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Why a move's work waits on an instance whose lease is not confirmed.
pub fn lease_unconfirmed() -> MigrateError {
    MigrateError::Refused(
        "this instance's lease on the move is not confirmed (the control plane has not renewed it for 3 s, or \
         another instance took the move over); its work waits"
            .into(),
    )
}
