//! Backend servers: connecting and authenticating to them ([`connect`]), the connection type ([`conn`]), simple
//! control queries on a held connection ([`query`]), who a tenant logs in as ([`identity`]) and the
//! per-(database, role) pools ([`pool`]) with their fair wait queue ([`waiters`]).

pub mod conn;
pub mod connect;
pub mod identity;
pub mod pool;
pub mod query;
pub mod statements;
pub mod waiters;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio_rustls::TlsConnector;

use crate::config::{BackendConfig, SslMode};
use crate::net::tls::{self, TlsError};
use crate::routing::BackendId;

pub use conn::{ServerConn, StartupTag};
pub use connect::ConnectError;
pub use identity::Login;
pub use pool::{Pool, PoolError, PooledConn};

/// Most (database, role) pools one backend serves.
pub const MAX_POOLS_PER_BACKEND: usize = 100_000;
/// Connection failures of one backend are logged at most this often (each is still counted and shown).
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);

/// Timeouts every backend connection uses, from `[proxy]`.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub checkout: Duration,
    pub idle: Duration,
    pub keepalive: Option<crate::config::Keepalive>,
}

/// Connections open to the backend over all its pools, and the pools waiting for room under `max_connections`.
#[derive(Default)]
struct Slots {
    open: usize,
    starving: VecDeque<Weak<Pool>>,
}

/// The last connection failure, and when one was last logged.
#[derive(Default)]
struct Health {
    last_error: Option<String>,
    logged: Option<Instant>,
    suppressed: u64,
}

/// Opens an in-process pipe to a scripted backend instead of a socket (the relay's unit tests).
pub type MemoryDialer = Arc<dyn Fn() -> tokio::io::DuplexStream + Send + Sync>;

/// One configured backend server and its pools (one per database and login role).
pub struct Backend {
    pub name: BackendId,
    pub config: BackendConfig,
    /// Live limits (reload may change them).
    pool_size: AtomicUsize,
    max_connections: AtomicUsize,
    max_tenant_connections: AtomicUsize,
    /// `tenant_turn_ms` and `tenant_turn_linger_ms`, in µs.
    turn_us: AtomicU64,
    turn_linger_us: AtomicU64,
    reserve: Mutex<(usize, Duration)>,
    health: Mutex<Health>,
    tls: Option<TlsConnector>,
    pools: Mutex<HashMap<(String, String), Arc<Pool>>>,
    slots: Mutex<Slots>,
    /// Pools waiting for room (mirrors `slots.starving.len()`), read without the lock on every check-in.
    starving_count: AtomicUsize,
    pub timeouts: Timeouts,
    /// Set only by tests: connections go through this pipe, not to `config.host`.
    pub(crate) dialer: std::sync::OnceLock<MemoryDialer>,
}

impl Backend {
    pub fn new(
        name: &BackendId,
        config: BackendConfig,
        timeouts: Timeouts,
    ) -> Result<Arc<Backend>, TlsError> {
        let tls = match config.sslmode {
            SslMode::Disable => None,
            SslMode::Prefer | SslMode::Require => Some(tls::backend_connector()?),
        };
        let backend = Backend {
            name: name.clone(),
            pool_size: AtomicUsize::new(0),
            max_connections: AtomicUsize::new(0),
            max_tenant_connections: AtomicUsize::new(0),
            turn_us: AtomicU64::new(0),
            turn_linger_us: AtomicU64::new(0),
            reserve: Mutex::new((0, Duration::ZERO)),
            health: Mutex::new(Health::default()),
            config,
            tls,
            pools: Mutex::new(HashMap::new()),
            slots: Mutex::new(Slots::default()),
            starving_count: AtomicUsize::new(0),
            timeouts,
            dialer: std::sync::OnceLock::new(),
        };
        backend.set_limits(&backend.config.clone());
        Ok(Arc::new(backend))
    }

    /// The serving login (`user`/`password` of the backend): shared-isolation routes and tenant-less work.
    pub fn serving_login(&self) -> Login {
        Login {
            user: self.config.user.clone(),
            password: self.config.secrets.password.clone(),
        }
    }

    /// The pool for `database` as `login`, created on first use. Database names can come from clients (when
    /// neither the route nor the backend names one), so the number of pools per backend is bounded.
    pub fn pool(self: &Arc<Self>, database: &str, login: &Login) -> Option<Arc<Pool>> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let key = (database.to_owned(), login.user.clone());
        match pools.get(&key) {
            Some(p) if p.login == *login => return Some(p.clone()),
            // The role's password changed (reload): a new pool; the old one's idle connections go now, its
            // busy ones when they are given back.
            Some(old) => old.reap_idle(Duration::ZERO, Duration::ZERO),
            None => {}
        }
        if pools.len() >= MAX_POOLS_PER_BACKEND {
            return None;
        }
        let pool = Pool::new(self.clone(), database.to_owned(), login.clone());
        pools.insert(key, pool.clone());
        Some(pool)
    }

    pub fn pool_size(&self) -> usize {
        self.pool_size.load(Ordering::Relaxed)
    }

    pub fn max_connections(&self) -> usize {
        self.max_connections.load(Ordering::Relaxed)
    }

    pub fn max_tenant_connections(&self) -> usize {
        self.max_tenant_connections.load(Ordering::Relaxed)
    }

    /// Tenants' turns on shared transaction-pool connections: (turn, linger); `None`: no turns.
    pub fn turns(&self) -> Option<(Duration, Duration)> {
        let turn = self.turn_us.load(Ordering::Relaxed);
        (turn > 0).then(|| {
            let linger = self.turn_linger_us.load(Ordering::Relaxed);
            (Duration::from_micros(turn), Duration::from_micros(linger))
        })
    }

    /// (reserve_pool_size, reserve_pool_timeout).
    pub fn reserve(&self) -> (usize, Duration) {
        *self.reserve.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies the limits of `config` (at start and on reload).
    pub fn set_limits(&self, config: &BackendConfig) {
        self.pool_size.store(config.pool_size, Ordering::Relaxed);
        self.max_connections
            .store(config.max_connections, Ordering::Relaxed);
        self.max_tenant_connections
            .store(config.max_tenant_connections, Ordering::Relaxed);
        self.turn_us.store(
            config.tenant_turn_ms.saturating_mul(1000),
            Ordering::Relaxed,
        );
        self.turn_linger_us.store(
            config.tenant_turn_linger_ms.saturating_mul(1000),
            Ordering::Relaxed,
        );
        *self.reserve.lock().unwrap_or_else(|p| p.into_inner()) = (
            config.reserve_pool_size,
            Duration::from_millis(config.reserve_pool_timeout_ms),
        );
    }

    pub fn set_pool_size(&self, n: usize) {
        self.pool_size.store(n, Ordering::Relaxed);
    }

    /// Connections open (or opening) over all pools.
    pub fn open(&self) -> usize {
        self.lock_slots().open
    }

    fn lock_slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a place for a new connection under `max_connections`.
    fn take_slot(&self) -> bool {
        let mut slots = self.lock_slots();
        let max = self.max_connections();
        if max > 0 && slots.open >= max {
            return false;
        }
        slots.open += 1;
        true
    }

    /// A connection closed: its place goes to a pool waiting for room (round-robin), else back.
    fn free_slot(&self) {
        loop {
            let next = {
                let mut slots = self.lock_slots();
                let next = slots.starving.pop_front();
                self.starving_count
                    .store(slots.starving.len(), Ordering::Relaxed);
                next
            };
            let Some(pool) = next else {
                break;
            };
            let Some(pool) = pool.upgrade() else {
                continue;
            };
            if pool.offer_slot() {
                if pool.waiting() > 0 {
                    let mut slots = self.lock_slots();
                    slots.starving.push_back(Arc::downgrade(&pool));
                    self.starving_count
                        .store(slots.starving.len(), Ordering::Relaxed);
                }
                return;
            }
        }
        let mut slots = self.lock_slots();
        slots.open = slots.open.saturating_sub(1);
    }

    /// A place freed for a pool that will take it itself right away.
    fn release_slot_quietly(&self) {
        let mut slots = self.lock_slots();
        slots.open = slots.open.saturating_sub(1);
    }

    fn has_starving(&self) -> bool {
        self.starving_count.load(Ordering::Relaxed) > 0
    }

    /// `pool` waits for room on the backend.
    fn starving(&self, pool: &Arc<Pool>) {
        let mut slots = self.lock_slots();
        if !slots
            .starving
            .iter()
            .any(|p| std::ptr::eq(p.as_ptr(), Arc::as_ptr(pool)))
        {
            slots.starving.push_back(Arc::downgrade(pool));
            self.starving_count
                .store(slots.starving.len(), Ordering::Relaxed);
        }
    }

    /// Closes one idle connection of another pool to make room for `pool` under `max_connections`.
    fn reclaim_idle(&self, pool: &Arc<Pool>) {
        for other in self.pools() {
            if !Arc::ptr_eq(&other, pool) && other.close_one_idle() {
                return;
            }
        }
    }

    pub fn last_error(&self) -> Option<String> {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_error
            .clone()
    }

    /// Records a connection attempt's outcome; failures are logged, at most once per ten seconds per backend.
    pub(crate) fn note_connect(&self, result: Result<(), &ConnectError>) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let Err(e) = result else {
            if h.last_error.take().is_some() {
                tracing::info!(backend = %self.name, "backend reachable again");
            }
            return;
        };
        h.last_error = Some(e.to_string());
        let due = h.logged.is_none_or(|t| t.elapsed() >= FAILURE_LOG_EVERY);
        if due {
            let suppressed = std::mem::take(&mut h.suppressed);
            h.logged = Some(Instant::now());
            tracing::warn!(backend = %self.name, error = %e, suppressed, "backend connection failed");
        } else {
            h.suppressed += 1;
        }
    }

    pub fn pools(&self) -> Vec<Arc<Pool>> {
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools.values().cloned().collect()
    }
}

/// All configured backends by name.
#[derive(Default)]
pub struct Backends {
    pub by_name: HashMap<BackendId, Arc<Backend>>,
}

impl Backends {
    pub fn get(&self, name: &str) -> Option<&Arc<Backend>> {
        self.by_name.get(name)
    }
}
