//! `[proxy]`: listeners, pool mode, tenant sources, client limits and timeouts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::tenant::TenantSource;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolMode {
    Session,
    Transaction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PinnedAtMove {
    Wait,
    Disconnect,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Client listener address. Not reloadable.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Admin unix socket path; empty (the default) means `run/admin.sock` under `state_dir`, in a directory only
    /// the proxy's user may enter. Not reloadable.
    #[serde(default)]
    pub admin_socket: PathBuf,
    /// Prometheus endpoint (`/metrics`, `/health`); empty disables it. Not reloadable.
    #[serde(default)]
    pub metrics_listen: String,
    /// Optional TCP admin listener (`host:port`); empty (the default) disables it. Needs `admin_token`.
    /// Not reloadable.
    #[serde(default)]
    pub admin_listen: String,
    /// Serve the HTTP listener (`metrics_listen`: metrics, API, panel) over TLS with the `[tls]` certificate.
    /// Not reloadable.
    #[serde(default)]
    pub metrics_tls: bool,
    /// The virtual database of the psql admin console (`psql -p 6432 -U admin pgtenant -c 'SHOW POOLS'`).
    /// Reloadable.
    #[serde(default = "default_admin_database")]
    pub admin_database: String,
    /// Users (of `[[users]]`, logging in with their password) who may run every console command. Reloadable.
    #[serde(default)]
    pub admin_users: Vec<String>,
    /// Users who may run the console's `SHOW` commands only. Reloadable.
    #[serde(default)]
    pub stats_users: Vec<String>,
    /// Log each client login (user, tenant, database, peer) and each end (with its duration). Reloadable.
    #[serde(default)]
    pub log_connections: bool,
    #[serde(default)]
    pub log_disconnections: bool,
    /// The token the first request of every TCP admin connection must carry (`"token": "..."`). Reloadable.
    #[serde(default)]
    pub admin_token: String,
    /// Where routes, migrations and the audit log live. Not reloadable.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The key that signs the audit chain and seeds the fake SCRAM salts of unknown users (32 random bytes,
    /// created with mode 0600 when missing). Empty: `<state_dir>.key` beside the state directory, outside it, so
    /// whoever can write the state directory cannot also re-sign the audit log. Not reloadable.
    #[serde(default)]
    pub key_file: PathBuf,
    /// `session` or `transaction`. Not reloadable.
    #[serde(default = "default_pool_mode")]
    pub pool_mode: PoolMode,
    /// Where a connection's tenant may come from, in order. Reloadable.
    #[serde(default = "default_sources")]
    pub tenant_sources: Vec<TenantSource>,
    /// Separates user and tenant in a user name (`app.acme`). Reloadable.
    #[serde(default = "default_separator")]
    pub user_separator: String,
    /// Tenant for connections that name none; empty means none. Reloadable.
    #[serde(default)]
    pub default_tenant: String,
    /// Runtime worker threads; 0 chooses from the core count (one thread up to two cores, else one per core).
    /// Not reloadable.
    #[serde(default)]
    pub workers: usize,
    /// Logged-in client connections beyond this get `53300`. Not reloadable.
    #[serde(default = "default_max_client_conn")]
    pub max_client_conn: usize,
    /// Client connections of one tenant beyond this get `53300`; 0: no limit. Reloadable.
    #[serde(default)]
    pub max_client_conn_per_tenant: usize,
    /// Connections still in their handshake or authentication. When full, a new connection closes the oldest
    /// one that has not sent its startup packet yet, so sockets that connect and say nothing cannot lock real
    /// clients out. Not reloadable.
    #[serde(default = "default_max_login_conn")]
    pub max_login_conn: usize,
    /// A client must finish startup and authentication within this. Reloadable.
    #[serde(default = "default_login_timeout_ms")]
    pub client_login_timeout_ms: u64,
    /// A client idle outside a transaction for this long is disconnected (`57P05`); 0: never. Reloadable.
    #[serde(default)]
    pub client_idle_timeout_ms: u64,
    /// A client idle inside a transaction for this long is disconnected (`25P03`): its transaction is rolled
    /// back and its tenant's gate pass freed. 0: never. Reloadable.
    #[serde(default)]
    pub idle_transaction_timeout_ms: u64,
    /// A statement that runs this long is cancelled on its backend and the client disconnected (`57014`);
    /// 0: never. Reloadable.
    #[serde(default)]
    pub query_timeout_ms: u64,
    /// TCP keepalive on client and backend sockets: seconds of silence before the first probe (0: off), then
    /// `tcp_keepalive_interval_s` between probes, `tcp_keepalive_count` unanswered probes drop the peer.
    /// Reloadable (new connections).
    #[serde(default = "default_keepalive_idle_s")]
    pub tcp_keepalive_idle_s: u64,
    #[serde(default = "default_keepalive_interval_s")]
    pub tcp_keepalive_interval_s: u64,
    #[serde(default = "default_keepalive_count")]
    pub tcp_keepalive_count: u32,
    /// After a failed login, the answer from the same address waits this long, doubled with every further
    /// failure up to 2 s (a success resets it). 0: no delay. Reloadable.
    #[serde(default = "default_auth_failure_delay_ms")]
    pub auth_failure_delay_ms: u64,
    /// How long a client waits for a backend connection from a full pool before `53300`. Reloadable.
    #[serde(default = "default_checkout_timeout_ms")]
    pub pool_checkout_timeout_ms: u64,
    /// Connect plus startup plus authentication to a backend. Reloadable.
    #[serde(default = "default_connect_timeout_ms")]
    pub server_connect_timeout_ms: u64,
    /// A request queued at a paused tenant's gate gives up after this (`57014`). Reloadable.
    #[serde(default = "default_query_wait_timeout_ms")]
    pub query_wait_timeout_ms: u64,
    /// Idle pooled backend connections older than this are closed. Reloadable.
    #[serde(default = "default_server_idle_timeout_ms")]
    pub server_idle_timeout_ms: u64,
    /// A backend connection older than this is closed once it is idle (within 5 s), so connections are renewed
    /// (PgBouncer's `server_lifetime`); 0: never. Reloadable.
    #[serde(default = "default_server_lifetime_ms")]
    pub server_lifetime_ms: u64,
    /// On SIGTERM, sessions get this long to finish before they are closed. Reloadable.
    #[serde(default = "default_shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
    /// A session whose tenant moved (a route change, not a migration: a migration's cutover always ends such
    /// sessions) but whose state cannot follow it yet: `wait` keeps it on the old backend, `disconnect` ends it
    /// (57P01) at its first statement after `pinned_grace_ms`. Reloadable.
    #[serde(default = "default_pinned_at_move")]
    pub pinned_at_move: PinnedAtMove,
    /// Grace period for `pinned_at_move = "disconnect"`. Reloadable.
    #[serde(default = "default_pinned_grace_ms")]
    pub pinned_grace_ms: u64,
    /// Transaction pool mode: named prepared statements kept per backend connection (least recently used are
    /// closed beyond it), like PgBouncer's setting of the same name. Reloadable.
    #[serde(default = "default_max_prepared_statements")]
    pub max_prepared_statements: usize,
}

fn default_listen() -> String {
    "127.0.0.1:6432".into()
}
fn default_state_dir() -> PathBuf {
    "./pgtenant-state".into()
}
fn default_pool_mode() -> PoolMode {
    PoolMode::Session
}
fn default_sources() -> Vec<TenantSource> {
    vec![
        TenantSource::UserSuffix,
        TenantSource::Options,
        TenantSource::Database,
        TenantSource::Set,
    ]
}
fn default_separator() -> String {
    ".".into()
}
fn default_max_client_conn() -> usize {
    1000
}
fn default_max_login_conn() -> usize {
    100
}
fn default_login_timeout_ms() -> u64 {
    15_000
}
fn default_keepalive_idle_s() -> u64 {
    60
}
fn default_keepalive_interval_s() -> u64 {
    10
}
fn default_keepalive_count() -> u32 {
    6
}
fn default_auth_failure_delay_ms() -> u64 {
    250
}
fn default_checkout_timeout_ms() -> u64 {
    5_000
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_query_wait_timeout_ms() -> u64 {
    30_000
}
fn default_server_idle_timeout_ms() -> u64 {
    600_000
}
fn default_shutdown_timeout_ms() -> u64 {
    30_000
}
fn default_pinned_at_move() -> PinnedAtMove {
    PinnedAtMove::Wait
}
fn default_pinned_grace_ms() -> u64 {
    30_000
}
fn default_max_prepared_statements() -> usize {
    200
}

/// The admin socket for these settings: `admin_socket`, else `run/admin.sock` under `state_dir`.
pub fn admin_socket_for(admin_socket: &Path, state_dir: &Path) -> PathBuf {
    if admin_socket.as_os_str().is_empty() {
        state_dir.join("run").join("admin.sock")
    } else {
        admin_socket.to_path_buf()
    }
}

/// The keepalive settings of `[proxy]`, ready for a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub idle: Duration,
    pub interval: Duration,
    pub count: u32,
}

impl ProxyConfig {
    pub fn login_timeout(&self) -> Duration {
        Duration::from_millis(self.client_login_timeout_ms)
    }
    pub fn checkout_timeout(&self) -> Duration {
        Duration::from_millis(self.pool_checkout_timeout_ms)
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.server_connect_timeout_ms)
    }
    pub fn query_wait_timeout(&self) -> Duration {
        Duration::from_millis(self.query_wait_timeout_ms)
    }
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }

    /// TCP keepalive for new sockets, `None` when off.
    pub fn keepalive(&self) -> Option<Keepalive> {
        (self.tcp_keepalive_idle_s > 0).then(|| Keepalive {
            idle: Duration::from_secs(self.tcp_keepalive_idle_s),
            interval: Duration::from_secs(self.tcp_keepalive_interval_s.max(1)),
            count: self.tcp_keepalive_count.max(1),
        })
    }

    /// The admin socket: the configured path, else `run/admin.sock` under the state directory.
    pub fn admin_socket_path(&self) -> PathBuf {
        admin_socket_for(&self.admin_socket, &self.state_dir)
    }

    /// The key file: the configured path, else `<state_dir>.key` beside the state directory.
    pub fn key_file_path(&self) -> PathBuf {
        if !self.key_file.as_os_str().is_empty() {
            return self.key_file.clone();
        }
        let parent = self
            .state_dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = self
            .state_dir
            .file_name()
            .map(|n| format!("{}.key", n.to_string_lossy()))
            .unwrap_or_else(|| "pgtenant.key".into());
        parent.join(name)
    }
}

fn default_admin_database() -> String {
    "pgtenant".into()
}

fn default_server_lifetime_ms() -> u64 {
    3_600_000
}
