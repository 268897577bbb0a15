//! The TOML configuration (DESIGN section 7). Unknown keys are refused, every field has a default where one makes
//! sense, and `PGTENANT_<SECTION>_<KEY>` environment variables override scalar keys of `[proxy]`, `[tls]` and
//! `[migration]` (for example `PGTENANT_PROXY_LISTEN=0.0.0.0:6432`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::tenant::{valid_identifier, TenantId};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Parse(String),
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub proxy: ProxyConfig,
    /// Client-facing TLS. Not reloadable.
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub users: Vec<UserConfig>,
    #[serde(default)]
    pub backends: BTreeMap<String, BackendConfig>,
    /// Initial routes; persisted routes override them once the control plane has written any.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
    #[serde(default)]
    pub migration: MigrationConfig,
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TenantSource {
    UserSuffix,
    Options,
    Database,
    Set,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Client listener address. Not reloadable.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Admin unix socket path. Not reloadable.
    #[serde(default = "default_admin_socket")]
    pub admin_socket: PathBuf,
    /// Prometheus endpoint (`/metrics`, `/health`); empty disables it. Not reloadable.
    #[serde(default)]
    pub metrics_listen: String,
    /// Optional TCP admin listener (`host:port`); empty (the default) disables it. Needs `admin_token`.
    /// Not reloadable.
    #[serde(default)]
    pub admin_listen: String,
    /// The token every request on the TCP admin listener must carry (`"token": "..."`). Reloadable.
    #[serde(default)]
    pub admin_token: String,
    /// Where routes, migrations and the audit log live. Not reloadable.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
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
    /// Runtime worker threads; 0 means one per CPU core. Not reloadable.
    #[serde(default)]
    pub workers: usize,
    /// Client connections beyond this get `53300`. Not reloadable.
    #[serde(default = "default_max_client_conn")]
    pub max_client_conn: usize,
    /// A client must finish startup and authentication within this. Reloadable.
    #[serde(default = "default_login_timeout_ms")]
    pub client_login_timeout_ms: u64,
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
    /// On SIGTERM, sessions get this long to finish before they are closed. Reloadable.
    #[serde(default = "default_shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
    /// A session whose tenant moved but whose state cannot follow it yet: `wait` keeps it on the old backend,
    /// `disconnect` ends it (57P01) at its first statement after `pinned_grace_ms`. Reloadable.
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

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    Md5,
    Trust,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// Plain password; allows SCRAM (default) or md5.
    pub password: Option<String>,
    /// A stored SCRAM verifier (`SCRAM-SHA-256$iter:salt$stored:server`), as in `pg_authid`.
    pub scram_secret: Option<String>,
    /// `scram-sha-256` (default), `md5` (needs `password`) or `trust` (local development only).
    pub auth: Option<AuthMethod>,
    /// Tenants this user may reach: names, or `"*"` for all.
    #[serde(default)]
    pub tenants: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SslMode {
    #[default]
    Disable,
    Prefer,
    Require,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub host: String,
    #[serde(default = "default_pg_port")]
    pub port: u16,
    #[serde(default = "default_pg_user")]
    pub user: String,
    #[serde(default)]
    pub password: String,
    /// Database used on this backend unless the route names one.
    pub database: Option<String>,
    /// Connections per (database, user) pool. Reloadable.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// TLS to the backend: `disable`, `prefer` or `require` (encrypted, certificate not verified, as libpq).
    #[serde(default)]
    pub sslmode: SslMode,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub backend: String,
    pub database: Option<String>,
    pub schema: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationConfig {
    /// Longest the cutover may hold a tenant before it falls back to the source.
    #[serde(default = "default_cutover_timeout_ms")]
    pub cutover_timeout_ms: u64,
    /// Queued requests per paused tenant; more are refused.
    #[serde(default = "default_max_queued")]
    pub max_queued_per_tenant: usize,
    /// Rows per batch during bulk copy.
    #[serde(default = "default_copy_batch_rows")]
    pub copy_batch_rows: usize,
    /// `sync`: a COMMIT that wrote returns only after its changes are on the target (bounded by
    /// `tee_timeout_ms`); `async`: it returns at once and the target follows (lag instead of acknowledgement).
    #[serde(default)]
    pub tee: TeeMode,
    /// Longest a committing client waits for the tee before its ReadyForQuery is released anyway.
    #[serde(default = "default_tee_timeout_ms")]
    pub tee_timeout_ms: u64,
    /// Migrations running at once; more are refused.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: usize,
    /// Tables copied at once during bulk copy.
    #[serde(default = "default_copy_parallel")]
    pub copy_parallel_tables: usize,
    /// Rows per verification chunk (a hash mismatch names one chunk's key range).
    #[serde(default = "default_verify_chunk_rows")]
    pub verify_chunk_rows: usize,
    /// How often the background catch-up looks at the change log when no commit asked for a drain.
    #[serde(default = "default_catchup_interval_ms")]
    pub catchup_interval_ms: u64,
    /// The `pg_dump` used to create a missing target schema from the source's definition.
    #[serde(default = "default_pg_dump")]
    pub pg_dump: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TeeMode {
    #[default]
    Sync,
    Async,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        MigrationConfig {
            cutover_timeout_ms: default_cutover_timeout_ms(),
            max_queued_per_tenant: default_max_queued(),
            copy_batch_rows: default_copy_batch_rows(),
            tee: TeeMode::Sync,
            tee_timeout_ms: default_tee_timeout_ms(),
            max_concurrent: default_max_concurrent(),
            copy_parallel_tables: default_copy_parallel(),
            verify_chunk_rows: default_verify_chunk_rows(),
            catchup_interval_ms: default_catchup_interval_ms(),
            pg_dump: default_pg_dump(),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:6432".into()
}
fn default_admin_socket() -> PathBuf {
    "/tmp/pgtenant.sock".into()
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
fn default_login_timeout_ms() -> u64 {
    15_000
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
fn default_pg_port() -> u16 {
    5432
}
fn default_pg_user() -> String {
    "postgres".into()
}
fn default_pool_size() -> usize {
    20
}
fn default_cutover_timeout_ms() -> u64 {
    5_000
}
fn default_max_queued() -> usize {
    10_000
}
fn default_copy_batch_rows() -> usize {
    10_000
}
fn default_tee_timeout_ms() -> u64 {
    2_000
}
fn default_max_concurrent() -> usize {
    2
}
fn default_copy_parallel() -> usize {
    2
}
fn default_verify_chunk_rows() -> usize {
    10_000
}
fn default_catchup_interval_ms() -> u64 {
    100
}
fn default_pg_dump() -> String {
    "pg_dump".into()
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
}

impl Config {
    /// Reads, overrides from the environment, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text, std::env::vars())
    }

    /// Parses `text` with overrides from `env` (pairs of variable name and value).
    pub fn from_toml(
        text: &str,
        env: impl Iterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut value: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        apply_env(&mut value, env)?;
        let config: Config = toml::Value::Table(value)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.proxy.listen.parse().map_err(|_| {
            ConfigError::Invalid(format!(
                "proxy.listen {:?} is not host:port",
                self.proxy.listen
            ))
        })
    }

    /// Checks everything that deserialisation cannot: references between sections and identifier syntax.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        self.listen_addr()?;
        if self.proxy.user_separator.chars().count() != 1 {
            return bad("proxy.user_separator must be one character".into());
        }
        if !(1..=100_000).contains(&self.proxy.max_prepared_statements) {
            return bad("proxy.max_prepared_statements must be between 1 and 100000".into());
        }
        if !self.proxy.admin_listen.is_empty() {
            if self.proxy.admin_token.len() < 16 {
                return bad(
                    "proxy.admin_listen needs proxy.admin_token of at least 16 characters".into(),
                );
            }
            if self.proxy.admin_listen.parse::<SocketAddr>().is_err() {
                return bad(format!(
                    "proxy.admin_listen {:?} is not host:port",
                    self.proxy.admin_listen
                ));
            }
        }
        if !self.proxy.metrics_listen.is_empty()
            && self.proxy.metrics_listen.parse::<SocketAddr>().is_err()
        {
            return bad(format!(
                "proxy.metrics_listen {:?} is not host:port",
                self.proxy.metrics_listen
            ));
        }
        if !self.proxy.default_tenant.is_empty()
            && !self.tenants.contains_key(&self.proxy.default_tenant)
        {
            return bad(format!(
                "proxy.default_tenant {:?} is not a configured tenant",
                self.proxy.default_tenant
            ));
        }
        for (name, b) in &self.backends {
            if !valid_identifier(name) {
                return bad(format!(
                    "backend name {name:?} must match [A-Za-z0-9_-]{{1,63}}"
                ));
            }
            if b.pool_size == 0 {
                return bad(format!("backends.{name}.pool_size must be at least 1"));
            }
        }
        for (name, t) in &self.tenants {
            TenantId::parse(name)
                .map_err(|e| ConfigError::Invalid(format!("tenant {name:?}: {e}")))?;
            if !self.backends.contains_key(&t.backend) {
                return bad(format!(
                    "tenants.{name}.backend {:?} is not a configured backend",
                    t.backend
                ));
            }
            if let Some(s) = &t.schema {
                if s.is_empty() || s.len() > 63 || s.contains('\0') {
                    return bad(format!("tenants.{name}.schema must be 1 to 63 bytes"));
                }
            }
        }
        self.validate_users()
    }

    fn validate_users(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let mut seen = std::collections::HashSet::new();
        for u in &self.users {
            if u.name.is_empty() || !seen.insert(u.name.as_str()) {
                return bad(format!("user {:?} is empty or listed twice", u.name));
            }
            let auth = u.auth.unwrap_or(AuthMethod::ScramSha256);
            match (auth, &u.password, &u.scram_secret) {
                (AuthMethod::Trust, _, _) => {}
                (AuthMethod::ScramSha256, Some(_), None)
                | (AuthMethod::ScramSha256, None, Some(_)) => {}
                (AuthMethod::Md5, Some(_), None) => {}
                _ => {
                    return bad(format!(
                    "user {:?}: give exactly one of password / scram_secret (md5 needs password)",
                    u.name
                ))
                }
            }
            for t in &u.tenants {
                if t != "*" && TenantId::parse(t).is_err() {
                    return bad(format!(
                        "user {:?}: tenant {t:?} is not a valid tenant name",
                        u.name
                    ));
                }
            }
        }
        Ok(())
    }
}

/// `PGTENANT_PROXY_LISTEN=...` sets `[proxy] listen`. Values are read as TOML when they parse as such (numbers,
/// booleans, arrays), else as strings.
fn apply_env(
    table: &mut toml::Table,
    env: impl Iterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (key, raw) in env {
        let Some(rest) = key.strip_prefix("PGTENANT_") else {
            continue;
        };
        let Some((section, field)) = rest.split_once('_') else {
            continue;
        };
        let section = section.to_ascii_lowercase();
        if !["proxy", "tls", "migration"].contains(&section.as_str()) {
            continue;
        }
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(raw));
        let entry = table
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(t) = entry else {
            return Err(ConfigError::Invalid(format!("[{section}] is not a table")));
        };
        t.insert(field.to_ascii_lowercase(), value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[proxy]
listen = "127.0.0.1:6432"

[[users]]
name = "app"
password = "secret"
tenants = ["*"]

[backends.shared]
host = "127.0.0.1"
port = 5432

[tenants.acme]
backend = "shared"
schema = "tenant_acme"
"#;

    #[test]
    fn parses_and_defaults() {
        let c = Config::from_toml(EXAMPLE, std::iter::empty()).unwrap();
        assert_eq!(c.proxy.pool_mode, PoolMode::Session);
        assert_eq!(c.backends["shared"].pool_size, 20);
        assert_eq!(c.tenants["acme"].schema.as_deref(), Some("tenant_acme"));
    }

    #[test]
    fn env_overrides() {
        let env = vec![
            (
                "PGTENANT_PROXY_LISTEN".to_string(),
                "0.0.0.0:7000".to_string(),
            ),
            (
                "PGTENANT_PROXY_MAX_CLIENT_CONN".to_string(),
                "7".to_string(),
            ),
        ];
        let c = Config::from_toml(EXAMPLE, env.into_iter()).unwrap();
        assert_eq!(c.proxy.listen, "0.0.0.0:7000");
        assert_eq!(c.proxy.max_client_conn, 7);
    }

    #[test]
    fn refuses_bad_configs() {
        let unknown = EXAMPLE.replace("listen =", "lisen =");
        assert!(Config::from_toml(&unknown, std::iter::empty()).is_err());
        let dangling = EXAMPLE.replace("backend = \"shared\"", "backend = \"nope\"");
        assert!(Config::from_toml(&dangling, std::iter::empty()).is_err());
        let bad_tenant = EXAMPLE.replace("[tenants.acme]", "[tenants.\"a b\"]");
        assert!(Config::from_toml(&bad_tenant, std::iter::empty()).is_err());
    }
}

#[cfg(test)]
mod example_tests {
    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../config/pgtenant.example.toml");
        super::Config::from_toml(text, std::iter::empty()).unwrap();
    }
}
