//! The listener: accepts clients up to `max_client_conn`, one task per client, and shuts down in two stages
//! (stop accepting and let sessions finish; then end them).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Config, ConfigError};
use crate::context::{ContextError, Shared};
use crate::frontend::serve_client;

/// Clients over the limit still get a proper `53300` error; this many at most may be in that state at once,
/// beyond which connections are closed straight away.
const MAX_REJECTING: usize = 64;

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
}

/// A running proxy.
pub struct Proxy {
    pub shared: Arc<Shared>,
    local_addr: SocketAddr,
    stop_accepting: CancellationToken,
    sessions: TaskTracker,
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
        let addr = config.listen_addr()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| ServerError::Bind { addr, source })?;
        let max_clients = config.proxy.max_client_conn;
        let shared = Shared::new(config, path)?;
        let proxy = Proxy {
            shared: shared.clone(),
            local_addr,
            stop_accepting: CancellationToken::new(),
            sessions: TaskTracker::new(),
        };
        tokio::spawn(shared.clone().reap_idle_loop());
        tokio::spawn(accept_loop(
            listener,
            shared,
            max_clients,
            proxy.stop_accepting.clone(),
            proxy.sessions.clone(),
        ));
        info!(%local_addr, "pgtenant listening");
        Ok(proxy)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
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

    /// Ends every session now (each client gets a 57P01 error).
    pub async fn terminate(&self) {
        self.stop_accepting.cancel();
        self.sessions.close();
        self.shared.terminate.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.sessions.wait()).await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    max_clients: usize,
    stop: CancellationToken,
    sessions: TaskTracker,
) {
    let admitted = Arc::new(Semaphore::new(max_clients));
    let rejecting = Arc::new(Semaphore::new(MAX_REJECTING));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        match admitted.clone().try_acquire_owned() {
            Ok(permit) => {
                sessions.spawn(async move {
                    serve_client(shared, tcp, true).await;
                    drop(permit);
                });
            }
            Err(_) => {
                let Ok(permit) = rejecting.clone().try_acquire_owned() else {
                    continue;
                };
                sessions.spawn(async move {
                    serve_client(shared, tcp, false).await;
                    drop(permit);
                });
            }
        }
    }
}
