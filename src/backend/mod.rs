//! Backend servers: connecting and authenticating to them ([`connect`]), the connection type ([`conn`]), simple
//! control queries on a held connection ([`query`]) and the per-(database, user) pools ([`pool`]).

pub mod conn;
pub mod connect;
pub mod pool;
pub mod query;
pub mod statements;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_rustls::TlsConnector;

use crate::config::{BackendConfig, SslMode};
use crate::net::tls::{self, TlsError};

pub use conn::{ServerConn, StartupTag};
pub use connect::ConnectError;
pub use pool::{Pool, PoolError, PooledConn};

/// Most databases one backend serves pools for.
pub const MAX_POOLS_PER_BACKEND: usize = 256;

/// Timeouts every backend connection uses, from `[proxy]`.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub checkout: Duration,
    pub idle: Duration,
}

/// One configured backend server and its pools (one per database; the user is the backend's).
pub struct Backend {
    pub name: String,
    pub config: BackendConfig,
    /// Live pool size (reload may change it).
    pool_size: AtomicUsize,
    /// The last connection failure, cleared by the next success (shown by `pgtenant ctl backends`).
    last_error: Mutex<Option<String>>,
    /// SCRAM salted password for this backend's user, computed once.
    pub(crate) scram_cache: crate::auth::scram_client::SaltedPasswordCache,
    tls: Option<TlsConnector>,
    pools: Mutex<HashMap<String, Arc<Pool>>>,
    pub timeouts: Timeouts,
}

impl Backend {
    pub fn new(
        name: &str,
        config: BackendConfig,
        timeouts: Timeouts,
    ) -> Result<Arc<Backend>, TlsError> {
        let tls = match config.sslmode {
            SslMode::Disable => None,
            SslMode::Prefer | SslMode::Require => Some(tls::backend_connector()?),
        };
        Ok(Arc::new(Backend {
            name: name.to_owned(),
            pool_size: AtomicUsize::new(config.pool_size),
            last_error: Mutex::new(None),
            scram_cache: Default::default(),
            config,
            tls,
            pools: Mutex::new(HashMap::new()),
            timeouts,
        }))
    }

    /// The pool for `database`, created on first use. Database names can come from clients (when neither the
    /// route nor the backend names one), so the number of pools per backend is bounded.
    pub fn pool(self: &Arc<Self>, database: &str) -> Option<Arc<Pool>> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = pools.get(database) {
            return Some(p.clone());
        }
        if pools.len() >= MAX_POOLS_PER_BACKEND {
            return None;
        }
        let pool = Pool::new(self.clone(), database.to_owned());
        pools.insert(database.to_owned(), pool.clone());
        Some(pool)
    }

    pub fn pool_size(&self) -> usize {
        self.pool_size.load(Ordering::Relaxed)
    }

    pub fn set_pool_size(&self, n: usize) {
        self.pool_size.store(n, Ordering::Relaxed);
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn note_connect(&self, result: Result<(), String>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = result.err();
    }

    pub fn pools(&self) -> Vec<Arc<Pool>> {
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools.values().cloned().collect()
    }
}

/// All configured backends by name.
#[derive(Default)]
pub struct Backends {
    pub by_name: HashMap<String, Arc<Backend>>,
}

impl Backends {
    pub fn get(&self, name: &str) -> Option<&Arc<Backend>> {
        self.by_name.get(name)
    }
}
