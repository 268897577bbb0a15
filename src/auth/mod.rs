//! Client authentication data: who may log in, with what, and which tenants they may reach. The exchange itself
//! (reading password messages) lives in `frontend::auth`; the SCRAM server arithmetic is in [`scram`].

pub mod channel_binding;
pub mod scram;
pub mod scram_client;
pub mod throttle;

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{AuthMethod, UserConfig};
use crate::net::cidr::Cidr;

pub use scram::{ScramError, ScramVerifier};

#[derive(Debug)]
pub enum Credential {
    Trust,
    Md5 { password: String },
    Scram(ScramVerifier),
}

#[derive(Debug)]
pub struct UserEntry {
    pub name: String,
    pub credential: Credential,
    /// Tenant names or `"*"`.
    pub tenants: Vec<String>,
    /// Where the user may connect from (empty: anywhere).
    pub networks: Vec<Cidr>,
    pub require_tls: bool,
    pub max_client_conn: Option<usize>,
}

/// The configured users, by name. Replaced whole on reload.
#[derive(Debug, Default)]
pub struct Users {
    by_name: HashMap<String, Arc<UserEntry>>,
}

impl Users {
    /// Builds the user table; plain passwords get a SCRAM verifier computed once here (4096 PBKDF2 rounds).
    pub fn from_config(users: &[UserConfig]) -> Result<Users, ScramError> {
        let mut by_name = HashMap::new();
        for u in users {
            let credential = match (
                u.auth.unwrap_or(AuthMethod::ScramSha256),
                &u.password,
                &u.scram_secret,
            ) {
                (AuthMethod::Trust, _, _) => Credential::Trust,
                (AuthMethod::Md5, Some(p), _) => Credential::Md5 {
                    password: p.clone(),
                },
                (_, _, Some(secret)) => Credential::Scram(ScramVerifier::parse(secret)?),
                (_, Some(p), None) => Credential::Scram(ScramVerifier::from_password(p)?),
                (_, None, None) => return Err(ScramError::Secret),
            };
            let entry = UserEntry {
                name: u.name.clone(),
                credential,
                tenants: u.tenants.clone(),
                // Validated with the config.
                networks: u
                    .networks
                    .iter()
                    .filter_map(|n| Cidr::parse(n).ok())
                    .collect(),
                require_tls: u.require_tls,
                max_client_conn: u.max_client_conn,
            };
            by_name.insert(u.name.clone(), Arc::new(entry));
        }
        Ok(Users { by_name })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<UserEntry>> {
        self.by_name.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }
}
