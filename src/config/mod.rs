//! The TOML configuration (DESIGN section 7). Unknown keys are refused, every field has a default where one makes
//! sense, and `PGTENANT_<SECTION>_<KEY>` environment variables override scalar keys of `[proxy]`, `[tls]` and
//! `[migration]` (for example `PGTENANT_PROXY_LISTEN=0.0.0.0:6432`).

mod api;
mod backend;
mod migration;
mod proxy;
pub mod secret;
mod users;
mod webhook;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ids::BackendId;
use crate::net::cidr::Cidr;
use crate::tenant::TenantId;

pub use crate::tenant::TenantSource;
pub use api::{ApiRole, ApiToken};
pub use backend::{BackendConfig, BackendSecrets, Isolation, SslMode, TenantConfig};
pub use migration::{MigrationConfig, TeeMode};
pub use proxy::{admin_socket_for, Keepalive, PinnedAtMove, PoolMode, ProxyConfig};
pub use secret::Secret;
pub use users::{AuthMethod, TlsConfig, UserConfig};
pub use webhook::{WebhookConfig, EVENTS as WEBHOOK_EVENTS};

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
    pub backends: BTreeMap<BackendId, BackendConfig>,
    /// Initial routes; persisted routes override them once the control plane has written any. Once the
    /// routes are built, the running proxy keeps only the entries a login reads ([`Config::keep_login_settings`]).
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
    #[serde(default)]
    pub migration: MigrationConfig,
    /// Receivers of migration events.
    #[serde(default)]
    pub webhooks: Vec<WebhookConfig>,
    /// Bearer tokens of the HTTP API (on `proxy.metrics_listen`).
    #[serde(default)]
    pub api_tokens: Vec<ApiToken>,
    /// A PostgreSQL database several instances share their routes and membership in (`postgres://...`);
    /// none: `state_dir` alone. Not reloadable.
    #[serde(default)]
    pub control_plane: Option<String>,
}

impl Config {
    /// Reads, overrides from the environment, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        // The parse tree of a large config (100 000 tenants: ~200 MB) is garbage once the config is built, and
        // so are most tenant entries once the routes are (see `keep_login_settings`). Built on a thread of its
        // own, all of it sits in that thread's malloc arena, which a trim then gives back whole.
        std::thread::scope(|s| {
            s.spawn(|| Config::from_toml(&text, std::env::vars()))
                .join()
                .unwrap_or_else(|_| Err(ConfigError::Parse("the config parser panicked".into())))
        })
    }

    /// The config as the serving path keeps it once the routes are built: of `[tenants.*]`, only the entries a
    /// login reads (a password of the tenant's role, a client cap), copied into fresh allocations. Everything
    /// else about a tenant lives in its route, so 100 000 schema tenants are not held twice, and nothing of
    /// the parse is left to keep its memory from the system.
    pub fn keep_login_settings(&mut self) {
        self.tenants = self
            .tenants
            .iter()
            .filter(|(_, t)| t.secret.is_some() || t.max_client_conn.is_some())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
    }

    /// Every tenant's backend name becomes the backends map's own: one allocation per backend, not one per
    /// tenant (100 000 tenants: 4.8 MB), shared by the routes built from them.
    fn share_backend_names(&mut self) {
        for t in self.tenants.values_mut() {
            if let Some((shared, _)) = self.backends.get_key_value(&t.backend) {
                t.backend = shared.clone();
            }
        }
    }

    /// Parses `text` with overrides from `env` (pairs of variable name and value).
    pub fn from_toml(
        text: &str,
        env: impl Iterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let env: HashMap<String, String> = env.collect();
        let mut value: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        apply_env(&mut value, &env)?;
        let mut config: Config = toml::Value::Table(value)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        config.resolve_secrets(&env)?;
        config.share_backend_names();
        Ok(config)
    }

    /// Reads every password from where the config says it is (inline, file, environment).
    fn resolve_secrets(&mut self, env: &HashMap<String, String>) -> Result<(), ConfigError> {
        use secret::Source;
        for (name, b) in self.backends.iter_mut() {
            let password = Source {
                what: format!("backends.{name}.password"),
                inline: Some(&b.password),
                file: b.password_file.as_deref(),
                env_var: b.password_env.as_deref(),
            }
            .resolve(env)?;
            let admin = Source {
                what: format!("backends.{name}.admin_password"),
                inline: Some(&b.admin_password),
                file: b.admin_password_file.as_deref(),
                env_var: b.admin_password_env.as_deref(),
            }
            .resolve(env)?;
            let tenant_key = match &b.tenant_password_key_file {
                Some(path) => Some(secret::read_key(
                    path,
                    &format!("backends.{name}.tenant_password_key_file"),
                )?),
                None => None,
            };
            b.secrets = BackendSecrets {
                password: password.unwrap_or_default(),
                admin_password: admin.unwrap_or_default(),
                tenant_key,
            };
        }
        for (name, t) in self.tenants.iter_mut() {
            t.secret = Source {
                what: format!("tenants.{name}.password"),
                inline: t.password.as_deref(),
                file: t.password_file.as_deref(),
                env_var: t.password_env.as_deref(),
            }
            .resolve(env)?;
        }
        for (i, w) in self.webhooks.iter_mut().enumerate() {
            w.resolve(i, env)?;
        }
        let mut names = std::collections::HashSet::new();
        for t in self.api_tokens.iter_mut() {
            if !names.insert(t.name.clone()) {
                return Err(ConfigError::Invalid(format!(
                    "api_tokens: {} is named twice",
                    t.name
                )));
            }
            t.resolve(env)?;
        }
        Ok(())
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
        self.validate_proxy()?;
        self.validate_backends()?;
        self.validate_tenants()?;
        for (i, w) in self.webhooks.iter().enumerate() {
            w.validate(i)?;
        }
        self.validate_users()
    }

    fn validate_proxy(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let p = &self.proxy;
        self.listen_addr()?;
        if p.user_separator.chars().count() != 1 {
            return bad("proxy.user_separator must be one character".into());
        }
        if !(1..=100_000).contains(&p.max_prepared_statements) {
            return bad("proxy.max_prepared_statements must be between 1 and 100000".into());
        }
        if p.max_login_conn == 0 {
            return bad("proxy.max_login_conn must be at least 1".into());
        }
        if !p.admin_listen.is_empty() && p.admin_token.len() < 16 {
            return bad(
                "proxy.admin_listen needs proxy.admin_token of at least 16 characters".into(),
            );
        }
        for (key, value) in [
            ("admin_listen", &p.admin_listen),
            ("metrics_listen", &p.metrics_listen),
        ] {
            if !value.is_empty() && value.parse::<SocketAddr>().is_err() {
                return bad(format!("proxy.{key} {value:?} is not host:port"));
            }
        }
        if !p.default_tenant.is_empty() && !self.tenants.contains_key(&p.default_tenant) {
            return bad(format!(
                "proxy.default_tenant {:?} is not a configured tenant",
                p.default_tenant
            ));
        }
        Ok(())
    }

    /// Backend names are checked as they are read (BackendId); the rest here.
    fn validate_backends(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        for (name, b) in &self.backends {
            if b.pool_size == 0 {
                return bad(format!("backends.{name}.pool_size must be at least 1"));
            }
            if !valid_pg_name(&b.user) || b.admin_user.as_deref().is_some_and(|u| !valid_pg_name(u))
            {
                return bad(format!("backends.{name}: user names must be 1 to 63 bytes"));
            }
            if b.tenant_role.is_empty() || b.tenant_role.len() > 63 {
                return bad(format!("backends.{name}.tenant_role must be 1 to 63 bytes"));
            }
        }
        Ok(())
    }

    fn validate_tenants(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        for (name, t) in &self.tenants {
            TenantId::parse(name)
                .map_err(|e| ConfigError::Invalid(format!("tenant {name:?}: {e}")))?;
            if !self.backends.contains_key(&t.backend) {
                return bad(format!(
                    "tenants.{name}.backend {:?} is not a configured backend",
                    t.backend
                ));
            }
            let names = [
                ("schema", &t.schema),
                ("database", &t.database),
                ("role", &t.role),
                ("tenant_column", &t.tenant_column),
            ];
            for (key, value) in names {
                if value.as_deref().is_some_and(|v| !valid_pg_name(v)) {
                    return bad(format!("tenants.{name}.{key} must be 1 to 63 bytes"));
                }
            }
            if t.tenant_key
                .as_deref()
                .is_some_and(|k| k.is_empty() || k.len() > 256 || k.contains('\0'))
            {
                return bad(format!("tenants.{name}.tenant_key must be 1 to 256 bytes"));
            }
        }
        Ok(())
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
            for n in &u.networks {
                Cidr::parse(n).map_err(|e| {
                    ConfigError::Invalid(format!("user {:?}: network {n:?}: {e}", u.name))
                })?;
            }
            if u.max_client_conn == Some(0) {
                return bad(format!(
                    "user {:?}: max_client_conn must be at least 1",
                    u.name
                ));
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

/// A name PostgreSQL keeps whole: 1 to 63 bytes, no NUL (longer identifiers are silently truncated).
pub fn valid_pg_name(s: &str) -> bool {
    (1..=63).contains(&s.len()) && !s.contains('\0')
}

/// `PGTENANT_PROXY_LISTEN=...` sets `[proxy] listen`. Values are read as TOML when they parse as such (numbers,
/// booleans, arrays), else as strings.
fn apply_env(table: &mut toml::Table, env: &HashMap<String, String>) -> Result<(), ConfigError> {
    let mut keys: Vec<(&String, &String)> = env.iter().collect();
    keys.sort();
    for (key, raw) in keys {
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
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
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

    #[test]
    fn the_kept_config_holds_only_what_a_login_reads() {
        let text = format!(
            "{EXAMPLE}
[tenants.capped]
backend = \"shared\"
max_client_conn = 3
[tenants.secured]
backend = \"shared\"
isolation = \"role\"
password = \"pw\"
"
        );
        let mut c = Config::from_toml(&text, std::iter::empty()).unwrap();
        let backend = c.backends.keys().next().unwrap().clone();
        for t in c.tenants.values() {
            assert_eq!(t.backend, backend);
            // Every tenant's name is the backends map's own allocation.
            assert!(std::ptr::eq(t.backend.as_str(), backend.as_str()));
        }
        c.keep_login_settings();
        let kept: Vec<&str> = c.tenants.keys().map(String::as_str).collect();
        assert_eq!(kept, ["capped", "secured"]);
        assert_eq!(c.tenants["capped"].max_client_conn, Some(3));
        assert_eq!(c.tenants["secured"].secret.as_ref().unwrap().expose(), "pw");
    }
}

#[cfg(test)]
mod example_tests {
    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../../config/pgtenant.example.toml");
        super::Config::from_toml(text, std::iter::empty()).unwrap();
    }
}
