//! The listener: accepts clients up to `max_client_conn`, one task per client, and shuts down in two stages
//! (stop accepting and let sessions finish; then end them).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::server::{bind_unix, serve_tcp, serve_unix, AdminServerError};
use crate::config::{Config, ConfigError};
use crate::context::{ContextError, Shared};
use crate::frontend::serve_client;
use crate::metrics::HealthSource;

#[derive(Debug, Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Admin(#[from] AdminServerError),
    #[error(transparent)]
    Lock(#[from] crate::state::lock::LockError),
}

/// A running proxy.
pub struct Proxy {
    pub shared: Arc<Shared>,
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    admin_tcp_addr: Option<SocketAddr>,
    stop_accepting: CancellationToken,
    sessions: TaskTracker,
    /// Admin, metrics and housekeeping tasks, stopped when the proxy is dropped.
    background: Vec<tokio::task::JoinHandle<()>>,
    /// The exclusive lock on `state_dir`, released when the proxy is closed or dropped.
    state_lock: Option<crate::state::lock::StateLock>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop_accepting.cancel();
        self.shared.migrations.shutdown();
        for task in &self.background {
            task.abort();
        }
    }
}

impl Proxy {
    /// Binds the listener and starts accepting.
    pub async fn start(config: Config) -> Result<Proxy, ServerError> {
        Proxy::start_with_path(config, None).await
    }

    /// Like [`Proxy::start`], remembering the config file for `reload`.
    pub async fn start_with_path(
        config: Config,
        path: Option<std::path::PathBuf>,
    ) -> Result<Proxy, ServerError> {
        let state_lock = crate::state::lock::StateLock::acquire(&config.proxy.state_dir).await?;
        let addr = config.listen_addr()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| ServerError::Bind { addr, source })?;
        let admin = bind_unix(&config.proxy.admin_socket_path())?;
        let admin_tcp = bind_optional(&config.proxy.admin_listen).await?;
        let metrics_listener = bind_optional(&config.proxy.metrics_listen).await?;
        let shared = Shared::new(config, path)?;
        let mut proxy = Proxy {
            shared: shared.clone(),
            local_addr,
            metrics_addr: metrics_listener.as_ref().and_then(|l| l.local_addr().ok()),
            admin_tcp_addr: admin_tcp.as_ref().and_then(|l| l.local_addr().ok()),
            stop_accepting: CancellationToken::new(),
            sessions: TaskTracker::new(),
            background: Vec::new(),
            state_lock: Some(state_lock),
        };
        shared.notifier.configure(&shared.config.load().webhooks);
        join_control_plane(&shared, local_addr).await;
        proxy.background.extend(housekeeping(&shared));
        // Unfinished migrations continue from their persisted state; with a control plane, from the store once
        // their lease is this instance's (see cluster::leases).
        if shared.control_plane.get().is_none() {
            crate::migration::driver::resume_all(&shared).await;
        }
        proxy
            .background
            .push(tokio::spawn(serve_unix(admin, shared.clone())));
        if let Some(l) = admin_tcp {
            proxy
                .background
                .push(tokio::spawn(serve_tcp(l, shared.clone())));
        }
        if let Some(l) = metrics_listener {
            proxy.background.push(serve_http(&shared, l)?);
        }
        proxy.background.push(tokio::spawn(accept_loop(
            listener,
            shared,
            proxy.stop_accepting.clone(),
            proxy.sessions.clone(),
        )));
        info!(%local_addr, "pgtenant listening");
        Ok(proxy)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where the metrics endpoint listens, if it does (useful with port 0).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Where the TCP admin listener listens, if it does.
    pub fn admin_tcp_addr(&self) -> Option<SocketAddr> {
        self.admin_tcp_addr
    }

    /// Stops accepting, gives sessions `grace` to finish, then ends the rest.
    pub async fn shutdown(&self, grace: Duration) {
        self.stop_accepting.cancel();
        self.sessions.close();
        if tokio::time::timeout(grace, self.sessions.wait())
            .await
            .is_err()
        {
            warn!(
                remaining = self.sessions.len(),
                "shutdown grace period over; closing sessions"
            );
        }
        self.terminate().await;
    }

    /// Ends every session and stops every listener; returns when they are gone (the admin socket is free).
    pub async fn close(mut self) {
        self.terminate().await;
        for task in std::mem::take(&mut self.background) {
            task.abort();
            let _ = task.await;
        }
        let _ = std::fs::remove_file(self.shared.config.load().proxy.admin_socket_path());
        self.state_lock.take();
    }

    /// Ends every session now (each client gets a 57P01 error).
    pub async fn terminate(&self) {
        self.stop_accepting.cancel();
        self.sessions.close();
        // The flag first: a session registered after the sweep below sees it at its first relay step.
        self.shared.terminate.fire();
        for s in self.shared.sessions.all() {
            s.end.fire();
        }
        self.shared.migrations.shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.sessions.wait()).await;
    }
}

/// Opens one connection per backend as its serving role, at start: a backend that cannot be reached or refuses
/// the login is logged now rather than at the first client, and a serving role that is a superuser (or
/// bypasses row-level security) is warned about (see `Pool::privileged`).
async fn check_serving_roles(shared: Arc<Shared>) {
    let backends = shared.backends.load_full();
    for backend in backends.by_name.values() {
        let database = backend.config.database.as_deref().unwrap_or("postgres");
        let Some(pool) = backend.pool(database, &backend.serving_login()) else {
            continue;
        };
        let tag = Arc::new(crate::backend::StartupTag::default());
        if let Ok(conn) = pool.checkout(&tag, None).await {
            conn.release(crate::backend::pool::ReleaseState::Idle);
        }
    }
}

/// Binds `addr` unless it is empty.
async fn bind_optional(addr: &str) -> Result<Option<TcpListener>, ServerError> {
    if addr.is_empty() {
        return Ok(None);
    }
    let parsed: SocketAddr = addr
        .parse()
        .map_err(|_| ConfigError::Invalid(format!("{addr:?} is not host:port")))?;
    let l = TcpListener::bind(parsed)
        .await
        .map_err(|source| ServerError::Bind {
            addr: parsed,
            source,
        })?;
    Ok(Some(l))
}

/// `/health` and `/metrics` for a running proxy.
struct Health(Arc<Shared>);

impl HealthSource for Health {
    fn health(&self) -> Result<String, String> {
        let s = &self.0;
        let state_ok =
            s.state_ok.load(std::sync::atomic::Ordering::Relaxed) && s.store.dir().is_dir();
        let body = serde_json::json!({
            "status": if state_ok { "ok" } else { "degraded" },
            "listener": !s.terminate.is_fired(),
            "state_store": state_ok,
            "sessions": s.sessions.count(),
            "epoch": s.router.load().epoch,
        })
        .to_string();
        if state_ok && !s.terminate.is_fired() {
            Ok(body)
        } else {
            Err(body)
        }
    }

    fn scrape(&self) -> String {
        let s = &self.0;
        // Per backend (summed over its databases): database names can come from clients, labels must not.
        for backend in s.backends.load().by_name.values() {
            let (mut open, mut idle) = (0, 0);
            for pool in backend.pools() {
                let (o, i) = pool.counts();
                open += o;
                idle += i;
                if pool.privileged() == Some(true) {
                    let labels = vec![
                        ::metrics::Label::new("backend", backend.name.to_string()),
                        ::metrics::Label::new("role", pool.login.user.clone()),
                    ];
                    s.metrics
                        .gauge("pgtenant_serving_role_privileged", labels)
                        .set(1.0);
                }
            }
            for (state, n) in [("idle", idle), ("active", open - idle.min(open))] {
                let labels = vec![
                    ::metrics::Label::new("backend", backend.name.to_string()),
                    ::metrics::Label::new("state", state),
                ];
                s.metrics
                    .gauge("pgtenant_pool_connections", labels)
                    .set(n as f64);
            }
        }
        for t in s.router.load().tenants() {
            if let Some(g) = s.gates.peek(t.as_str()) {
                let labels = vec![::metrics::Label::new("tenant", t.to_string())];
                s.metrics
                    .gauge("pgtenant_gate_queued", labels)
                    .set(g.queued() as f64);
            }
        }
        s.metrics.render()
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
    sessions: TaskTracker,
) {
    let mut shortage = crate::net::fds::Shortage::default();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => {
                shortage.over();
                tcp
            }
            Err(e) if crate::net::fds::exhausted(&e) => {
                shortage.hit(&listener, "ulimit -n").await;
                continue;
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Connections still logging in have a budget of their own; when it is full the oldest one that has not
        // sent its startup packet makes room, so idle sockets cannot lock real clients out. The client limit
        // (`max_client_conn`) is taken once a client has said who it is.
        let Some(ticket) = shared.logins.enter() else {
            tracing::debug!("login budget full of clients mid-authentication; connection closed");
            continue;
        };
        let shared = shared.clone();
        sessions.spawn(serve_client(shared, tcp, ticket));
    }
}

/// With `control_plane`, registers this instance and loads the routes from the store. An unreachable store is
/// not fatal: the instance serves with the routes it last applied (its `state_dir`) and keeps trying.
async fn join_control_plane(shared: &Arc<Shared>, local: SocketAddr) {
    let Some(url) = shared.config.load().control_plane.clone() else {
        return;
    };
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "pgtenant".into());
    let cp = crate::cluster::ControlPlane::new(
        &url,
        format!("{host}:{}", local.port()),
        local.to_string(),
    );
    if shared.control_plane.set(cp).is_err() {
        return;
    }
    shared.audit.start_mirror();
    if let Some(cp) = shared.control_plane.get() {
        if let Err(e) = cp.bootstrap(shared).await {
            warn!(error = %e, "control plane unreachable at start; serving with the routes in state_dir");
        }
    }
}

/// Samples the per-tenant rates every stats period until the proxy stops.
async fn sample_rates(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(crate::stats::PERIOD);
    loop {
        tokio::select! {
            _ = shared.terminate.fired() => return,
            _ = tick.tick() => shared.rates.sample(&shared.metrics),
        }
    }
}

/// The background tasks every proxy runs: idle-connection reaping, rate sampling, the control plane, the
/// migration queue, and the first look at the serving roles.
fn housekeeping(shared: &Arc<Shared>) -> Vec<tokio::task::JoinHandle<()>> {
    vec![
        tokio::spawn(shared.clone().reap_idle_loop()),
        tokio::spawn(sample_rates(shared.clone())),
        tokio::spawn(crate::cluster::run(shared.clone())),
        tokio::spawn(crate::migration::ops::run_queue(shared.clone())),
        tokio::spawn(check_serving_roles(shared.clone())),
    ]
}

/// The HTTP listener (metrics, health, API, panel), over TLS with `metrics_tls`.
fn serve_http(
    shared: &Arc<Shared>,
    listener: TcpListener,
) -> Result<tokio::task::JoinHandle<()>, ServerError> {
    let api = Arc::new(crate::api::Api {
        shared: shared.clone(),
        health: Arc::new(Health(shared.clone())),
    });
    let tls = match shared.config.load().proxy.metrics_tls {
        true => Some(shared.tls.clone().ok_or_else(|| {
            ConfigError::Invalid("proxy.metrics_tls needs a [tls] certificate".into())
        })?),
        false => None,
    };
    Ok(tokio::spawn(crate::api::serve(listener, api, tls)))
}
