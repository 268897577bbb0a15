//! `[backends.NAME]` and `[tenants.NAME]`: where tenants live, how the proxy logs in there, and how a tenant is
//! kept apart from the others on a shared server.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::secret::Secret;
use crate::ids::BackendId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SslMode {
    #[default]
    Disable,
    Prefer,
    Require,
}

/// How a tenant's backend connections are kept apart from other tenants' (README "Security model").
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// The backend connection logs in as the tenant's own role, so the database enforces the boundary; one
    /// pool per role.
    Role,
    /// One pool for the backend's tenants, logged in as the backend's serving user: the application is
    /// trusted to stay in its schema or rows.
    #[default]
    Shared,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub host: String,
    #[serde(default = "default_pg_port")]
    pub port: u16,
    /// The serving role (`isolation = "shared"` routes log in as it). Never needs to be a superuser.
    #[serde(default = "default_pg_user")]
    pub user: String,
    /// The serving role's password: inline, from a file (its first line), or from an environment variable.
    #[serde(default)]
    pub password: String,
    pub password_file: Option<PathBuf>,
    pub password_env: Option<String>,
    /// Credentials for migrations and `tenant grants --apply` only (they need a superuser); default: `user`.
    pub admin_user: Option<String>,
    #[serde(default)]
    pub admin_password: String,
    pub admin_password_file: Option<PathBuf>,
    pub admin_password_env: Option<String>,
    /// Database used on this backend unless the route names one.
    pub database: Option<String>,
    /// Connections per (database, login role) pool. Reloadable.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Extra connections a pool may open for a client that has waited `reserve_pool_timeout_ms`. Reloadable.
    #[serde(default)]
    pub reserve_pool_size: usize,
    #[serde(default = "default_reserve_pool_timeout_ms")]
    pub reserve_pool_timeout_ms: u64,
    /// Connections to this server over all its pools (idle ones of other pools are closed to make room);
    /// 0: no cap beyond each pool's size. Reloadable.
    #[serde(default)]
    pub max_connections: usize,
    /// Connections one tenant may hold at once in a shared pool; 0: no per-tenant cap. Reloadable.
    #[serde(default)]
    pub max_tenant_connections: usize,
    /// Transaction pooling of a shared pool with clients waiting: how long a connection stays with the tenant
    /// whose transaction just used it before it goes round-robin to another tenant (which then pays a full
    /// reset); 0: no turns. Reloadable.
    #[serde(default = "default_tenant_turn_ms")]
    pub tenant_turn_ms: u64,
    /// Within a turn, how long a returned connection waits idle for its tenant's next transaction when that
    /// tenant has no client waiting. Reloadable.
    #[serde(default = "default_tenant_turn_linger_ms")]
    pub tenant_turn_linger_ms: u64,
    /// TLS to the backend: `disable`, `prefer` or `require` (encrypted, certificate not verified, as libpq).
    #[serde(default)]
    pub sslmode: SslMode,
    /// Isolation of routes to this backend that do not set their own.
    #[serde(default)]
    pub isolation: Isolation,
    /// The role an `isolation = "role"` route logs in as unless it names one; `{tenant}` is the tenant's name.
    #[serde(default = "default_tenant_role")]
    pub tenant_role: String,
    /// A file holding a secret from which every tenant role's password is derived (HMAC-SHA-256 of the role
    /// name), so 100 000 tenants need no 100 000 passwords in the config; `tenant grants --apply` sets the
    /// same password. Tenant entries with their own password win.
    pub tenant_password_key_file: Option<PathBuf>,
    /// Resolved secrets (filled by [`super::Config::from_toml`], never written back).
    #[serde(skip)]
    pub secrets: BackendSecrets,
}

/// The backend's passwords after their sources were read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BackendSecrets {
    pub password: Secret,
    pub admin_password: Secret,
    /// Key material for derived tenant-role passwords.
    pub tenant_key: Option<Secret>,
}

impl BackendConfig {
    /// A backend at `host:port` logged in to as `user` (no password), every other setting at its default.
    pub fn new(host: &str, port: u16, user: &str) -> BackendConfig {
        BackendConfig {
            host: host.to_owned(),
            port,
            user: user.to_owned(),
            password: String::new(),
            password_file: None,
            password_env: None,
            admin_user: None,
            admin_password: String::new(),
            admin_password_file: None,
            admin_password_env: None,
            database: None,
            pool_size: default_pool_size(),
            reserve_pool_size: 0,
            reserve_pool_timeout_ms: default_reserve_pool_timeout_ms(),
            max_connections: 0,
            max_tenant_connections: 0,
            tenant_turn_ms: default_tenant_turn_ms(),
            tenant_turn_linger_ms: default_tenant_turn_linger_ms(),
            sslmode: SslMode::Disable,
            isolation: Isolation::Shared,
            tenant_role: default_tenant_role(),
            tenant_password_key_file: None,
            secrets: BackendSecrets::default(),
        }
    }

    /// The user migrations and grants connect as.
    pub fn admin_user(&self) -> &str {
        self.admin_user.as_deref().unwrap_or(&self.user)
    }

    /// The admin user's password (the serving password when no admin user is set).
    pub fn admin_password(&self) -> &str {
        if self.admin_user.is_some() {
            self.secrets.admin_password.expose()
        } else {
            self.secrets.password.expose()
        }
    }

    /// The role an `isolation = "role"` route of `tenant` logs in as, when the route names none.
    pub fn role_for(&self, tenant: &str) -> String {
        self.tenant_role.replace("{tenant}", tenant)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub backend: BackendId,
    pub database: Option<String>,
    pub schema: Option<String>,
    /// `role` or `shared`; default: the backend's.
    pub isolation: Option<Isolation>,
    /// Login role for `isolation = "role"`; default: the backend's `tenant_role` template.
    pub role: Option<String>,
    /// The role's password: inline, from a file or an environment variable; default: derived from the
    /// backend's `tenant_password_key_file`, else none (trust).
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub password_env: Option<String>,
    /// The tenant's rows live in shared tables, told apart by this column (row-level security and migration
    /// of shared tables use it).
    pub tenant_column: Option<String>,
    /// The tenant's value in `tenant_column` (default: the tenant's name).
    pub tenant_key: Option<String>,
    /// Client connections of this tenant beyond this get `53300` (overrides `max_client_conn_per_tenant`).
    pub max_client_conn: Option<usize>,
    #[serde(skip)]
    pub secret: Option<Secret>,
}

fn default_pg_port() -> u16 {
    5432
}
fn default_pg_user() -> String {
    "postgres".into()
}
fn default_pool_size() -> usize {
    20
}
fn default_reserve_pool_timeout_ms() -> u64 {
    3_000
}
fn default_tenant_turn_ms() -> u64 {
    5
}
fn default_tenant_turn_linger_ms() -> u64 {
    1
}
fn default_tenant_role() -> String {
    "t_{tenant}".into()
}
