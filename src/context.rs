//! What every session shares: config, users, routes, backends, the cancel registry, TLS and shutdown signals.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use thiserror::Error;
use tokio_rustls::TlsAcceptor;

use crate::auth::throttle::AuthThrottle;
use crate::auth::{ScramError, Users};
use crate::backend::{Backend, Backends, Timeouts};
use crate::cancel::CancelRegistry;
use crate::config::Config;
use crate::frontend::limits::{ClientCounts, LoginSlots};
use crate::gate::Gates;
use crate::metrics::Metrics;
use crate::net::tls::{self, TlsError};
use crate::routing::{Change, Router, RoutingTable};
use crate::sessions::Sessions;
pub use crate::shutdown::Terminate;
use crate::state::{AuditLog, RoutesFile, StateError, StateStore};

#[derive(Debug, Error)]
pub enum ContextError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("user credentials: {0}")]
    Users(#[from] ScramError),
    #[error(transparent)]
    State(#[from] StateError),
}

pub struct Shared {
    pub config: ArcSwap<Config>,
    pub users: ArcSwap<Users>,
    pub router: Arc<Router>,
    pub backends: crate::published::Published<Backends>,
    pub cancels: Arc<CancelRegistry>,
    pub tls: Option<TlsAcceptor>,
    /// `tls-server-end-point` binding data of the TLS certificate (SCRAM-SHA-256-PLUS).
    pub tls_end_point: Option<Vec<u8>>,
    /// ParameterStatus values last seen from a backend, told to clients that start without a tenant.
    pub last_params: Mutex<Vec<(String, String)>>,
    /// Fired when sessions must end now (SIGINT, or the SIGTERM grace period ran out).
    pub terminate: Terminate,
    pub gates: Gates,
    pub sessions: Arc<Sessions>,
    pub metrics: Arc<Metrics>,
    pub store: StateStore,
    pub audit: AuditLog,
    /// Tenants removed through the admin socket (persisted with the routes).
    pub removed: Mutex<BTreeSet<String>>,
    /// The file `reload` re-reads; `None` when the config did not come from a file.
    pub config_path: Option<PathBuf>,
    /// False after the routes file could not be written (reported by `/health`).
    pub state_ok: AtomicBool,
    /// False after an audit entry could not be written (reported by `/health` until restart).
    pub audit_ok: AtomicBool,
    /// Serialises the commands that change routes (tenant set/remove, reload).
    pub admin_lock: tokio::sync::Mutex<()>,
    pub started: Instant,
    /// Live migrations: records, running tees, failpoints.
    pub migrations: crate::migration::Migrations,
    /// Logged-in clients under `max_client_conn`.
    pub client_permits: Arc<tokio::sync::Semaphore>,
    /// Connections still logging in (`max_login_conn`).
    pub logins: Arc<LoginSlots>,
    /// Logged-in clients per user and tenant.
    pub clients: Arc<ClientCounts>,
    pub auth_throttle: AuthThrottle,
    /// The key signing the audit chain and seeding fake SCRAM salts (`proxy.key_file`).
    pub key: crate::state::key::ProxyKey,
    /// Webhook receivers of migration events.
    pub notifier: crate::notify::Notifier,
    /// Per-tenant rates of the last stats period.
    pub rates: crate::stats::Rates,
    /// The shared control plane (`control_plane`), set once the listener is bound.
    pub control_plane: std::sync::OnceLock<crate::cluster::plane::ControlPlane>,
}

impl Shared {
    /// Builds the shared state. Routes come from `state_dir` when they were ever persisted (the config only
    /// seeds them); a corrupt state file is an error.
    pub fn new(
        mut config: Config,
        config_path: Option<PathBuf>,
    ) -> Result<Arc<Shared>, ContextError> {
        let (tls, tls_end_point) = match &config.tls {
            Some(t) => {
                let server = tls::acceptor(&t.cert, &t.key)?;
                (Some(server.acceptor), server.end_point)
            }
            None => (None, None),
        };
        let users = Users::from_config(&config.users)?;
        let backends = build_backends(&config)?;
        let mut store = StateStore::open(&config.proxy.state_dir)?;
        let key = crate::state::key::ProxyKey::load_or_create(&config.proxy.key_file_path())?;
        let audit = AuditLog::open(&store.audit_path(), key.clone())?;
        let migrations = crate::migration::Migrations::open(store.dir())?;
        let (table, removed) = match store.load_routes()? {
            Some(file) => {
                let table = file.to_table().map_err(|reason| StateError::Corrupt {
                    path: store.dir().join("routes.json"),
                    reason,
                })?;
                (table, file.removed)
            }
            None => {
                let table = RoutingTable::from_config(config.tenants.iter());
                store.save_routes(&RoutesFile::from_table(&table, BTreeSet::new()))?;
                (table, BTreeSet::new())
            }
        };
        config.keep_login_settings();
        let metrics = Metrics::new();
        Ok(Arc::new(Shared {
            notifier: crate::notify::Notifier::new(metrics.clone()),
            rates: crate::stats::Rates::default(),
            control_plane: std::sync::OnceLock::new(),
            client_permits: Arc::new(tokio::sync::Semaphore::new(config.proxy.max_client_conn)),
            logins: LoginSlots::new(config.proxy.max_login_conn),
            clients: Arc::new(ClientCounts::default()),
            auth_throttle: AuthThrottle::new(config.proxy.auth_failure_delay_ms),
            key,
            gates: Gates::default(),
            sessions: Arc::new(Sessions::default()),
            metrics,
            store,
            audit,
            removed: Mutex::new(removed),
            config_path,
            state_ok: AtomicBool::new(true),
            audit_ok: AtomicBool::new(true),
            admin_lock: tokio::sync::Mutex::new(()),
            started: Instant::now(),
            migrations,
            config: ArcSwap::from_pointee(config),
            users: ArcSwap::from_pointee(users),
            router: Arc::new(Router::new(table)),
            backends: crate::published::Published::new(backends),
            cancels: Arc::new(CancelRegistry::default()),
            tls,
            tls_end_point,
            last_params: Mutex::new(Vec::new()),
            terminate: Terminate::default(),
        }))
    }

    /// Persists the `changes` that made `table` (with each tenant's removed mark); the `persist` step of
    /// [`Router::update`].
    pub fn persist_routes(
        &self,
        table: &RoutingTable,
        changes: &[Change],
    ) -> Result<(), StateError> {
        let removed = self.removed.lock().unwrap_or_else(|p| p.into_inner());
        let r = self.store.record_routes(table, changes, &removed);
        self.state_ok.store(r.is_ok(), Ordering::Relaxed);
        r
    }

    pub fn remember_params(&self, params: &[(String, String)]) {
        let mut last = self.last_params.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_slice() != params {
            *last = params.to_vec();
        }
    }

    /// Closes pooled connections idle for longer than the configured limit, or older than `server_lifetime_ms`;
    /// runs until `terminate`.
    pub async fn reap_idle_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = self.terminate.fired() => return,
                _ = tick.tick() => {}
            }
            let (max_idle, lifetime) = {
                let p = &self.config.load().proxy;
                (
                    Duration::from_millis(p.server_idle_timeout_ms),
                    Duration::from_millis(p.server_lifetime_ms),
                )
            };
            for backend in self.backends.load().by_name.values() {
                for pool in backend.pools() {
                    pool.reap_idle(max_idle, lifetime);
                }
            }
        }
    }
}

pub fn timeouts(config: &Config) -> Timeouts {
    Timeouts {
        connect: config.proxy.connect_timeout(),
        checkout: config.proxy.checkout_timeout(),
        idle: Duration::from_millis(config.proxy.server_idle_timeout_ms),
        keepalive: config.proxy.keepalive(),
    }
}

fn build_backends(config: &Config) -> Result<Backends, TlsError> {
    let t = timeouts(config);
    let mut by_name = HashMap::new();
    for (name, b) in &config.backends {
        by_name.insert(name.clone(), Backend::new(name, b.clone(), t)?);
    }
    Ok(Backends { by_name })
}
