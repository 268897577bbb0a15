//! A pool of connections to one backend database as one login role.
//!
//! Connections remember the startup parameters they were opened with ([`StartupTag`]); a checkout prefers an
//! idle connection with the same tag, and when the pool is full of idle connections with other tags it closes one
//! and opens a fresh one rather than hand out a connection whose session defaults differ from what the client
//! asked for. Returned connections are reset (`DISCARD ALL`, after `ROLLBACK` when the client left mid-transaction)
//! before anyone else may use them, and closed instead when their session ever made temporary objects
//! (PostgreSQL keeps the temporary namespace for the backend's life) or left anything half-done.
//!
//! Shares: a client that finds the pool full waits in a queue served round-robin by tenant, a tenant may hold
//! at most `max_tenant_connections` of a shared pool, a client that waited `reserve_pool_timeout_ms` may use
//! `reserve_pool_size` extra connections, and the backend's `max_connections` caps all of its pools together
//! (an idle connection of another pool is closed to make room for a waiting one).
//!
//! Concurrency note: the pool's lock is never held while another pool's is taken; the backend's slot lock is
//! taken inside a pool's lock, never the other way round.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;

use super::conn::{ServerConn, StartupTag};
use super::connect::{connect, ConnectError};
use super::query::query_value;
use super::waiters::{Grant, WaitQueue};
use super::{Backend, Login};
use crate::auth::scram_client::SaltedPasswordCache;
use crate::errors::ClientError;
use crate::protocol::PgError;
use crate::tenant::TenantId;

mod pooled;
mod tags;
mod turns;

pub use pooled::PooledConn;

/// Bound on the reset a returned connection gets before it is trusted again.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum PoolError {
    #[error("no connection to backend {backend} database {database} became free in time")]
    Timeout {
        backend: String,
        database: String,
        /// What was full, in the words of the setting that limits it.
        limit: String,
    },
    #[error(transparent)]
    Connect(#[from] ConnectError),
}

impl PoolError {
    /// What the client is told: FATAL when the failure ends its connection (at login), else ERROR.
    pub fn to_client(&self, severity_fatal: bool) -> PgError {
        let e = match self {
            PoolError::Timeout { limit, .. } => ClientError::PoolTimeout(limit.to_string()),
            PoolError::Connect(c) => c.to_client(),
        }
        .to_pg();
        let severity = if severity_fatal {
            crate::protocol::messages::Severity::Fatal
        } else {
            crate::protocol::messages::Severity::Error
        };
        PgError { severity, ..e }
    }
}

/// How a client left its backend connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseState {
    /// Idle outside a transaction, nothing in flight.
    Idle,
    /// Idle inside a (possibly failed) transaction, nothing in flight.
    InTransaction,
    /// A reply still owed, a COPY unfinished, or the stream broken: close it.
    Dirty,
    /// Idle outside a transaction at the end of a transaction-pool transaction: back to the pool as it is, its
    /// prepared statements and settings tracked by the proxy (no reset, no round trip).
    Keep,
}

#[derive(Default)]
struct Inner {
    /// Boxed for the connection's life: a checkout and a checkin then move a pointer, not the connection's
    /// 272 bytes through every step from this list to the session and back (perf: those copies were 4% of
    /// the proxy's user time in transaction pooling).
    #[allow(clippy::vec_box)]
    idle: Vec<Box<ServerConn>>,
    /// Open connections, idle or not, plus connections being opened (and places granted to open one).
    total: usize,
    /// Connections held per tenant (kept only while `max_tenant_connections` is set).
    held: HashMap<TenantId, usize>,
    waiting: WaitQueue,
    /// Idle connections kept for their owner's next transaction (`kept_until` set).
    kept: usize,
    /// When the task that ends kept connections' time (when no checkout or checkin comes to do it) wakes
    /// next; none while no such task runs.
    sweep_at: Option<Instant>,
}

pub struct Pool {
    pub backend: Arc<Backend>,
    pub database: String,
    pub login: Login,
    /// SCRAM salted password of this pool's login, computed once.
    pub(crate) scram_cache: SaltedPasswordCache,
    /// Whether the login role is a superuser or bypasses row-level security (a serving role should do
    /// neither): looked up on the pool's first connection.
    privileged: AtomicU8,
    inner: Mutex<Inner>,
    tags: tags::Tags,
    /// Wakes the sweeping task early: a connection was kept until before its wake-up (a shorter linger after a
    /// reload, or a turn about to end).
    sweep_sooner: Arc<tokio::sync::Notify>,
}

const PRIVILEGE_UNKNOWN: u8 = 0;
const PRIVILEGE_NONE: u8 = 1;
const PRIVILEGE_HIGH: u8 = 2;

enum Step {
    Reuse(Box<ServerConn>),
    Open,
    /// The backend's `max_connections` is reached: make room in another pool, then look again.
    Starved,
    Wait(u64, tokio::sync::oneshot::Receiver<Grant>),
}

impl Pool {
    pub fn new(backend: Arc<Backend>, database: String, login: Login) -> Arc<Pool> {
        Arc::new(Pool {
            backend,
            database,
            login,
            scram_cache: SaltedPasswordCache::default(),
            privileged: AtomicU8::new(PRIVILEGE_UNKNOWN),
            inner: Mutex::new(Inner::default()),
            tags: tags::Tags::default(),
            sweep_sooner: Arc::default(),
        })
    }

    /// The pool's shared copy of a session's startup parameters (see `tags`): checkouts with it compare
    /// connections' tags by pointer.
    pub fn intern(&self, tag: StartupTag) -> Arc<StartupTag> {
        self.tags.intern(tag)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// (open connections, idle connections).
    pub fn counts(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.total, inner.idle.len())
    }

    /// Clients waiting for a connection.
    pub fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    fn max(&self) -> usize {
        self.backend.pool_size()
    }

    /// A connection with `tag`'s startup parameters for `tenant`, waiting up to the checkout timeout when the
    /// pool is full.
    pub async fn checkout(
        self: &Arc<Self>,
        tag: &Arc<StartupTag>,
        tenant: Option<&TenantId>,
    ) -> Result<PooledConn, PoolError> {
        // Read the clock only when the checkout has to wait (most find an idle connection).
        let mut deadline = None;
        let mut reclaimed = false;
        loop {
            let (step, evicted) = self.choose(tag, tenant, reclaimed);
            drop(evicted);
            let grant = match step {
                Step::Reuse(conn) => Grant::Conn(conn),
                Step::Open => Grant::Open,
                Step::Starved => {
                    // Boxed out of the common path; closes an idle connection of another pool, if any.
                    self.backend.reclaim_idle(self);
                    reclaimed = true;
                    continue;
                }
                Step::Wait(id, rx) => {
                    let deadline = *deadline.get_or_insert_with(|| {
                        tokio::time::Instant::now() + self.backend.timeouts.checkout
                    });
                    self.wait(id, rx, tenant, deadline).await?
                }
            };
            return self.take(grant, tag, tenant).await;
        }
    }

    /// The common checkout without an `await`: an idle connection with `tag`'s parameters for `tenant` that is
    /// alive, as [`Pool::checkout`] would take it. `None` changes nothing, and `checkout` decides (it may open,
    /// replace, reclaim or wait; a dead idle connection is its to replace). Connections kept for a tenant's turn
    /// are left to it too: their times need the clock. Counted with `benches/instructions.sh`, the checkout's
    /// nested futures cost a transaction-pool transaction about 2% of the session's work.
    pub fn try_reuse(
        self: &Arc<Self>,
        tag: &Arc<StartupTag>,
        tenant: Option<&TenantId>,
    ) -> Option<PooledConn> {
        let mut inner = self.lock();
        let cap = self.backend.max_tenant_connections();
        if inner.kept > 0 || !under_cap(&inner, tenant, cap) {
            return None;
        }
        let i = pick_idle(&inner.idle, tag, tenant, None).0?;
        if !alive(&mut inner.idle[i]) {
            return None;
        }
        let conn = take_idle(&mut inner, i);
        note_held(&mut inner, tenant, cap);
        drop(inner);
        Some(self.wrap(conn, tenant))
    }

    /// Picks what a checkout does, under the lock; an evicted connection is returned to be closed outside it.
    fn choose(
        self: &Arc<Self>,
        tag: &Arc<StartupTag>,
        tenant: Option<&TenantId>,
        reclaimed: bool,
    ) -> (Step, Option<Box<ServerConn>>) {
        let mut inner = self.lock();
        let cap = self.backend.max_tenant_connections();
        let now = (inner.kept > 0).then(Instant::now);
        if let Some(now) = now {
            // (Nothing is closed for another pool here: this checkout may take what is no longer kept.)
            let closed = self.end_kept(&mut inner, now, cap, false);
            debug_assert!(closed.is_empty());
        }
        // Connections kept for another tenant's turn are not replaced either: this checkout waits for one.
        let mut kept_for_others = false;
        if under_cap(&inner, tenant, cap) {
            // (An idle connection beside a queue is one no waiter could take: their tenants are at their cap.)
            let (pick, skipped) = pick_idle(&inner.idle, tag, tenant, now);
            kept_for_others = skipped;
            if let Some(i) = pick {
                // `remove`, not `swap_remove`: the list stays in the order connections came back, oldest first,
                // which the evictions below and `close_one_idle` count on (the list is a pool's size at most).
                let conn = take_idle(&mut inner, i);
                note_held(&mut inner, tenant, cap);
                return (Step::Reuse(conn), None);
            }
        }
        // Nobody overtakes a queue: a new client waits behind those already waiting.
        if inner.waiting.is_empty() && under_cap(&inner, tenant, cap) {
            if inner.total < self.max() {
                if self.backend.take_slot() {
                    inner.total += 1;
                    note_held(&mut inner, tenant, cap);
                    return (Step::Open, None);
                }
                if !inner.idle.is_empty() && !kept_for_others {
                    // The backend is full but this pool has an idle connection with other parameters: its
                    // place on the backend is reused.
                    let old = take_idle(&mut inner, 0);
                    note_held(&mut inner, tenant, cap);
                    return (Step::Open, Some(old));
                }
                if !reclaimed {
                    return (Step::Starved, None);
                }
                self.backend.starving(self);
            } else if !inner.idle.is_empty() && !kept_for_others {
                // Full, but some idle connection has other startup parameters: replace the oldest one.
                let old = take_idle(&mut inner, 0);
                note_held(&mut inner, tenant, cap);
                return (Step::Open, Some(old));
            }
        }
        let (id, rx) = inner.waiting.push(tenant);
        (Step::Wait(id, rx), None)
    }

    /// Waits for a grant until the deadline; past `reserve_pool_timeout_ms` a reserve place may be taken.
    async fn wait(
        self: &Arc<Self>,
        id: u64,
        mut rx: tokio::sync::oneshot::Receiver<Grant>,
        tenant: Option<&TenantId>,
        deadline: tokio::time::Instant,
    ) -> Result<Grant, PoolError> {
        let reserve = self.backend.reserve();
        let mut reserve_at = (reserve.0 > 0).then(|| tokio::time::Instant::now() + reserve.1);
        loop {
            let reserve_wait = async {
                match reserve_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                granted = &mut rx => {
                    // A sender is only dropped with the pool; treat it as a timeout.
                    return granted.map_err(|_| self.timeout());
                }
                _ = tokio::time::sleep_until(deadline) => {
                    let removed = self.lock().waiting.remove(tenant, id);
                    if removed {
                        return Err(self.timeout());
                    }
                    // Served just now: the grant is on its way.
                    return rx.await.map_err(|_| self.timeout());
                }
                _ = reserve_wait => {
                    reserve_at = None;
                    if self.take_reserve(id, tenant, reserve.0) {
                        return Ok(Grant::Open);
                    }
                }
            }
        }
    }

    /// A waiter past the reserve timeout takes one of the reserve places, if one is free.
    fn take_reserve(&self, id: u64, tenant: Option<&TenantId>, reserve: usize) -> bool {
        let mut inner = self.lock();
        let cap = self.backend.max_tenant_connections();
        if inner.total >= self.max() + reserve || !under_cap(&inner, tenant, cap) {
            return false;
        }
        if !self.backend.take_slot() {
            return false;
        }
        if !inner.waiting.remove(tenant, id) {
            // Served meanwhile: the place is not needed.
            drop(inner);
            self.backend.free_slot();
            return false;
        }
        inner.total += 1;
        note_held(&mut inner, tenant, cap);
        tracing::debug!(backend = %self.backend.name, "reserve pool connection");
        true
    }

    /// Turns a grant into a usable connection: a live one with the right parameters, else a new one opened in
    /// its place.
    async fn take(
        self: &Arc<Self>,
        grant: Grant,
        tag: &Arc<StartupTag>,
        tenant: Option<&TenantId>,
    ) -> Result<PooledConn, PoolError> {
        if let Grant::Conn(mut conn) = grant {
            if alive(&mut conn) && (Arc::ptr_eq(&conn.tag, tag) || conn.tag == *tag) {
                return Ok(self.wrap(conn, tenant));
            }
            // Dead, or opened with other parameters: its place is ours to open a new one in.
            drop(conn);
        }
        // Boxed: a connection attempt (TCP, TLS, authentication) is a large state that would otherwise be part
        // of every session task that may check out, for the session's life.
        let opening = Box::pin(connect(self, tag.clone()));
        match opening.await {
            Ok(mut conn) => {
                self.backend.note_connect(Ok(()));
                if self.privileged.load(Ordering::Relaxed) == PRIVILEGE_UNKNOWN {
                    Box::pin(self.check_privileges(&mut conn)).await;
                }
                Ok(self.wrap(Box::new(conn), tenant))
            }
            Err(e) => {
                self.backend.note_connect(Err(&e));
                self.forget(tenant);
                Err(e.into())
            }
        }
    }

    /// Looks up whether the login role is a superuser or has BYPASSRLS, and warns when it is: a serving role
    /// needs neither, and either one undoes the isolation between tenants inside the database.
    async fn check_privileges(&self, conn: &mut ServerConn) {
        let sql = "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user";
        let Ok(Some(value)) = query_value(&self.backend.name, conn, sql).await else {
            return;
        };
        let high = value == "t";
        let state = if high { PRIVILEGE_HIGH } else { PRIVILEGE_NONE };
        if self.privileged.swap(state, Ordering::Relaxed) != state && high {
            tracing::warn!(
                backend = %self.backend.name,
                role = %self.login.user,
                "serving role is a superuser or has BYPASSRLS: tenants on it are not isolated inside the database; \
                 give serving connections a role of their own (README: Security model)"
            );
        }
    }

    /// Whether the login role is a superuser or bypasses row-level security (`None`: not known yet).
    pub fn privileged(&self) -> Option<bool> {
        match self.privileged.load(Ordering::Relaxed) {
            PRIVILEGE_NONE => Some(false),
            PRIVILEGE_HIGH => Some(true),
            _ => None,
        }
    }

    fn timeout(&self) -> PoolError {
        let b = &self.backend;
        let limit = if b.max_connections() > 0 && b.open() >= b.max_connections() {
            format!(
                "backend \"{}\" is at max_connections = {}",
                b.name,
                b.max_connections()
            )
        } else if b.max_tenant_connections() > 0 {
            format!(
                "backend \"{}\" pool_size = {} or max_tenant_connections = {} is in use",
                b.name,
                self.max(),
                b.max_tenant_connections()
            )
        } else {
            format!(
                "backend \"{}\" pool_size = {} is in use",
                b.name,
                self.max()
            )
        };
        PoolError::Timeout {
            backend: b.name.to_string(),
            database: self.database.clone(),
            limit,
        }
    }

    fn wrap(self: &Arc<Self>, conn: Box<ServerConn>, tenant: Option<&TenantId>) -> PooledConn {
        PooledConn::new(conn, self.clone(), tenant.cloned())
    }

    /// A connection (or a place granted to open one) is gone for good: its place goes to the next waiter, or
    /// back to the backend.
    fn forget(&self, tenant: Option<&TenantId>) {
        let mut inner = self.lock();
        let cap = self.backend.max_tenant_connections();
        inner.total = inner.total.saturating_sub(1);
        note_released(&mut inner, tenant, cap);
        if inner.total < self.max() && self.give(&mut inner, Grant::Open, cap).is_none() {
            inner.total += 1;
            return;
        }
        drop(inner);
        self.backend.free_slot();
    }

    /// Offers a grant to the waiters; returns it when nobody took it.
    fn give(&self, inner: &mut Inner, grant: Grant, cap: usize) -> Option<Grant> {
        if inner.waiting.is_empty() {
            return Some(grant);
        }
        let Inner { waiting, held, .. } = inner;
        match waiting.hand_out(grant, |t| {
            cap == 0 || t.is_none_or(|t| held.get(t).copied().unwrap_or(0) < cap)
        }) {
            Ok(served) => {
                if cap > 0 {
                    if let Some(t) = served {
                        *held.entry(t).or_default() += 1;
                    }
                }
                None
            }
            Err(grant) => Some(grant),
        }
    }

    fn checkin(
        self: &Arc<Self>,
        mut conn: Box<ServerConn>,
        tenant: Option<&TenantId>,
        now: Option<Instant>,
    ) {
        let now = now.unwrap_or_else(Instant::now);
        conn.idle_since = now;
        let mut inner = self.lock();
        let cap = self.backend.max_tenant_connections();
        note_released(&mut inner, tenant, cap);
        if inner.total > self.max() {
            // The pool shrank on reload; let this one go.
            inner.total -= 1;
            drop(inner);
            drop(conn);
            self.backend.free_slot();
            return;
        }
        let closed = match inner.kept {
            0 => Vec::new(),
            _ => self.end_kept(&mut inner, now, cap, true),
        };
        if !closed.is_empty() {
            drop(inner);
            self.closed(closed);
            inner = self.lock();
        }
        let conn = match self.keep_turn(&mut inner, conn, tenant, now, cap) {
            Some(conn) => conn,
            None => return,
        };
        let Some(Grant::Conn(conn)) = self.give(&mut inner, Grant::Conn(conn), cap) else {
            return;
        };
        if self.backend.has_starving() {
            // Another pool of this backend waits for room: this idle connection makes it.
            inner.total -= 1;
            drop(inner);
            drop(conn);
            self.backend.free_slot();
            return;
        }
        inner.idle.push(conn);
    }

    /// Offers a place freed on the backend to this pool's waiters; false when none took it.
    pub(super) fn offer_slot(&self) -> bool {
        let mut inner = self.lock();
        if inner.total >= self.max() {
            return false;
        }
        let cap = self.backend.max_tenant_connections();
        inner.total += 1;
        if self.give(&mut inner, Grant::Open, cap).is_some() {
            inner.total -= 1;
            return false;
        }
        true
    }

    /// Closes one idle connection to make room on the backend for another pool; true when one was closed.
    pub(super) fn close_one_idle(&self) -> bool {
        let mut inner = self.lock();
        // A connection kept for its tenant's turn is as good as busy: this pool's clients wait for it.
        let Some(i) = inner.idle.iter().position(|c| c.kept_until.is_none()) else {
            return false;
        };
        let conn = take_idle(&mut inner, i);
        inner.total -= 1;
        drop(inner);
        drop(conn);
        self.backend.release_slot_quietly();
        true
    }

    /// The idle connections, for `SHOW SERVERS`.
    pub fn idle_list(&self) -> Vec<IdleServer> {
        let now = Instant::now();
        self.lock()
            .idle
            .iter()
            .map(|c| IdleServer {
                pid: c.pid,
                connected_s: now.duration_since(c.born).as_secs(),
                idle_ms: now.duration_since(c.idle_since).as_millis() as u64,
                last_tenant: c.owner.clone(),
            })
            .collect()
    }

    /// Closes idle connections idle for `max_idle` or older than `lifetime` (zero: no limit), as PgBouncer's
    /// `server_idle_timeout` and `server_lifetime`: a connection in use is never closed, only once it is idle.
    pub fn reap_idle(&self, max_idle: Duration, lifetime: Duration) {
        let now = Instant::now();
        let mut inner = self.lock();
        let before = inner.idle.len();
        let (keep, old): (Vec<_>, Vec<_>) =
            std::mem::take(&mut inner.idle).into_iter().partition(|c| {
                // A connection kept for its tenant's turn is as good as busy (clients wait for it): it goes
                // once its keeping ends, like one in use.
                c.kept_until.is_some()
                    || (now.duration_since(c.idle_since) < max_idle
                        && (lifetime.is_zero() || now.duration_since(c.born) < lifetime))
            });
        inner.idle = keep;
        let closed = before - inner.idle.len();
        inner.total -= closed;
        drop(inner);
        drop(old);
        for _ in 0..closed {
            self.backend.free_slot();
        }
    }
}

/// The idle connection a checkout takes, among those with `tag`'s startup parameters, the most recently
/// returned of: those `tenant` itself used last, else those no tenant has used since a reset (they need only
/// the schema), else any. In transaction pooling of a shared pool, a connection another tenant used last costs
/// a full reset before it can be used (a third of a point select's throughput); preferring the tenant's own lets
/// the tenants of a pool that is not saturated each keep finding theirs, where taking the last one returned
/// would hand each transaction the connection another tenant just left.
fn pick_idle(
    idle: &[Box<ServerConn>],
    tag: &Arc<StartupTag>,
    tenant: Option<&TenantId>,
    now: Option<Instant>,
) -> (Option<usize>, bool) {
    let (mut clean, mut any, mut skipped) = (None, None, false);
    for (i, c) in idle.iter().enumerate().rev() {
        // Sessions share their tag's Arc, so the pointer comparison settles almost every check.
        if !(Arc::ptr_eq(&c.tag, tag) || c.tag == *tag) {
            continue;
        }
        let own = tenant.is_some() && c.owner.as_ref() == tenant;
        // Kept for its owner's turn (`now` is read whenever a connection is kept).
        if !own && c.kept_until.zip(now).is_some_and(|(u, now)| u > now) {
            skipped = true;
            continue;
        }
        if own || tenant.is_none() {
            return (Some(i), skipped);
        }
        if c.owner.is_none() && !c.suspect {
            clean.get_or_insert(i);
        }
        any.get_or_insert(i);
    }
    (clean.or(any), skipped)
}

/// Takes idle connection `i` out of the list, ending its keeping.
fn take_idle(inner: &mut Inner, i: usize) -> Box<ServerConn> {
    let mut conn = inner.idle.remove(i);
    if conn.kept_until.take().is_some() {
        inner.kept -= 1;
    }
    conn
}

fn under_cap(inner: &Inner, tenant: Option<&TenantId>, cap: usize) -> bool {
    cap == 0 || tenant.is_none_or(|t| inner.held.get(t).copied().unwrap_or(0) < cap)
}

fn note_held(inner: &mut Inner, tenant: Option<&TenantId>, cap: usize) {
    if let (true, Some(t)) = (cap > 0, tenant) {
        *inner.held.entry(t.clone()).or_default() += 1;
    }
}

fn note_released(inner: &mut Inner, tenant: Option<&TenantId>, cap: usize) {
    if let (true, Some(t)) = (cap > 0, tenant) {
        if let Some(n) = inner.held.get_mut(t) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                inner.held.remove(t);
            }
        }
    }
}

/// An idle backend has nothing to say; if its socket is readable it sent an error (shutdown, terminate) or closed.
fn alive(conn: &mut ServerConn) -> bool {
    conn.buf.is_empty() && conn.stream.nothing_to_read()
}

/// An idle connection of a pool.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IdleServer {
    pub pid: i32,
    pub connected_s: u64,
    pub idle_ms: u64,
    /// Transaction pooling: the tenant whose transaction used it last.
    pub last_tenant: Option<TenantId>,
}
