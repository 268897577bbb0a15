//! Admin answers: the envelope (`{"ok":true,"result":...}` or `{"ok":false,"error":{...}}`) and the typed
//! result of each command. The server builds these and `ctl` reads them back, so both sides share one
//! definition of every field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::code::AdminError;
use crate::config::{Isolation, SslMode};
use crate::routing::{BackendId, Epoch, Route};
use crate::state::audit::AuditEntry;
use crate::tenant::TenantId;

/// One answer line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<AdminError>,
}

impl Response {
    pub fn line(outcome: Result<Value, AdminError>) -> String {
        let response = match outcome {
            Ok(result) => Response {
                ok: true,
                result: Some(result),
                error: None,
            },
            Err(e) => Response {
                ok: false,
                result: None,
                error: Some(e),
            },
        };
        serde_json::to_string(&response).unwrap_or_else(|_| {
            r#"{"ok":false,"error":{"code":"bad_json","message":"unencodable answer"}}"#.into()
        })
    }

    pub fn refusal(e: AdminError) -> String {
        Response::line(Err(e))
    }
}

/// A tenant's gate: held or open, with its queue and its transactions in progress.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GateView {
    pub paused: bool,
    pub queued: usize,
    pub open_transactions: usize,
}

/// `tenants`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantList {
    pub epoch: Epoch,
    pub tenants: Vec<TenantRow>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantRow {
    pub tenant: TenantId,
    #[serde(flatten)]
    pub route: Route,
    pub sessions: usize,
    pub sessions_on_old_route: usize,
    pub gate: GateView,
}

/// One client session as `tenant get` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionView {
    pub id: u64,
    pub user: String,
    pub peer: Option<String>,
    pub tenant: Option<TenantId>,
    pub backend: Option<BackendId>,
    pub database: Option<String>,
    pub epoch: Epoch,
    pub on_current_route: bool,
    /// What keeps the session on an older route, if anything.
    pub pinned: Option<String>,
    pub in_transaction: bool,
    pub connected_s: u64,
    /// The backend connection the session holds now (none between transactions in transaction pooling):
    /// its process id, address and login role.
    #[serde(default)]
    pub server_pid: Option<i32>,
    #[serde(default)]
    pub server_addr: Option<String>,
    #[serde(default)]
    pub server_role: Option<String>,
}

/// `clients`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientList {
    pub clients: Vec<SessionView>,
}

/// `tenant get`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantView {
    pub tenant: TenantId,
    pub epoch: Epoch,
    pub route: Route,
    pub gate: GateView,
    pub sessions: Vec<SessionView>,
}

/// `tenant set`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteSet {
    pub tenant: TenantId,
    pub epoch: Epoch,
    pub route: Route,
    pub before: Option<Route>,
}

/// `tenant remove`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteRemoved {
    pub tenant: TenantId,
    pub epoch: Epoch,
    pub removed: Route,
}

/// `tenant grants`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrantsView {
    pub tenant: TenantId,
    pub role: String,
    pub database: String,
    pub sql: String,
    pub applied: bool,
}

/// `backends`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendList {
    pub backends: Vec<BackendView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendView {
    pub backend: String,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub admin_user: String,
    pub isolation: Isolation,
    pub database: Option<String>,
    pub sslmode: SslMode,
    pub pool_size: usize,
    pub max_connections: usize,
    pub open: usize,
    pub healthy: bool,
    pub last_error: Option<String>,
    pub warnings: Vec<String>,
    pub pools: Vec<PoolView>,
}

/// One (database, role) pool of a backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolView {
    pub database: String,
    pub role: String,
    pub open: usize,
    pub idle: usize,
    pub active: usize,
    pub waiting: usize,
    /// Whether the serving role is a superuser or has BYPASSRLS (unknown until a first connection).
    pub privileged_role: Option<bool>,
    /// The idle connections, one by one (the active ones are the clients' `server_pid`s).
    #[serde(default)]
    pub idle_servers: Vec<crate::backend::pool::IdleServer>,
}

/// `pause.all`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PausedAll {
    pub paused: bool,
    /// Tenant gates closed.
    pub tenants: usize,
    pub drained: bool,
    pub drain_ms: f64,
    pub open_transactions: usize,
}

/// `pause`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Paused {
    pub tenant: TenantId,
    pub paused: bool,
    pub already_paused: bool,
    /// All open transactions ended within the timeout.
    pub drained: bool,
    pub drain_ms: f64,
    pub open_transactions: usize,
    /// Sessions still in a transaction when the wait ended (empty when drained).
    pub open_sessions: Vec<u64>,
    pub queued: usize,
}

/// `resume`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resumed {
    pub tenant: TenantId,
    pub paused: bool,
    pub released: usize,
}

/// `stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsView {
    pub uptime_s: u64,
    pub epoch: Epoch,
    pub tenants: usize,
    pub client_sessions: usize,
    pub paused_tenants: Vec<TenantId>,
    /// A global pause (`pause-all`) is in force.
    #[serde(default)]
    pub paused_all: bool,
    /// Every `pgtenant_*` series of the metrics registry and its value.
    pub counters: BTreeMap<String, f64>,
    pub backends: Vec<BackendView>,
    /// Tenants that had clients since start: totals and the last period's rates.
    #[serde(default)]
    pub tenant_stats: Vec<crate::stats::TenantStats>,
}

/// `audit`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditView {
    pub entries: Vec<AuditEntry>,
    /// The keyed checksum chain holds over the whole file.
    pub verified: bool,
    pub broken_at_line: Option<usize>,
}

/// `tenant backups`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupList {
    pub tenant: crate::tenant::TenantId,
    pub dir: String,
    /// Newest first.
    pub backups: Vec<crate::backup::Listed>,
}

/// `webhooks log`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookLogView {
    pub receivers: usize,
    /// Oldest first.
    pub deliveries: Vec<crate::notify::log::Delivery>,
}

/// `reload`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reloaded {
    pub applied: Vec<String>,
    pub requires_restart: Vec<String>,
}
