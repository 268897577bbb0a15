//! `[[users]]` (who may log in to the proxy, from where, and which tenants they may reach) and `[tls]`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

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
    /// Addresses the user may connect from (`10.0.0.0/8`, `::1`, `192.168.1.7/32`); empty: any. Checked after
    /// the password, so the answer tells nothing to someone who does not know it.
    #[serde(default)]
    pub networks: Vec<String>,
    /// Only over TLS.
    #[serde(default)]
    pub require_tls: bool,
    /// Client connections of this user beyond this get `53300`; none: no per-user limit.
    pub max_client_conn: Option<usize>,
}
