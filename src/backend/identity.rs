//! Who a tenant's backend connections log in as: the tenant's own role (`isolation = "role"`), so the database
//! itself keeps tenants apart, or the backend's serving role (`isolation = "shared"`).

use thiserror::Error;

use crate::config::secret::derived_password;
use crate::config::{valid_pg_name, Config, Isolation, Secret};
use crate::routing::Route;
use crate::tenant::TenantId;

use super::Backend;

/// A backend login: role name and password (empty: the server trusts the connection).
#[derive(Clone, PartialEq, Eq)]
pub struct Login {
    pub user: String,
    pub password: Secret,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Login({})", self.user)
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("tenant \"{tenant}\": its role name \"{role}\" is longer than 63 bytes")]
    RoleName { tenant: String, role: String },
}

/// The login for `tenant`'s connections on `route` (served by `backend`).
pub fn login_for(
    config: &Config,
    backend: &Backend,
    route: &Route,
    tenant: &TenantId,
) -> Result<Login, IdentityError> {
    if route.isolation(&backend.config) == Isolation::Shared {
        return Ok(backend.serving_login());
    }
    let role = route
        .role
        .clone()
        .unwrap_or_else(|| backend.config.role_for(tenant.as_str()));
    if !valid_pg_name(&role) {
        return Err(IdentityError::RoleName {
            tenant: tenant.to_string(),
            role,
        });
    }
    let password = role_password(config, backend, tenant, &role);
    Ok(Login {
        user: role,
        password,
    })
}

/// The password of a tenant role: the tenant entry's own, else derived from the backend's key, else none.
pub fn role_password(config: &Config, backend: &Backend, tenant: &TenantId, role: &str) -> Secret {
    if let Some(s) = config
        .tenants
        .get(tenant.as_str())
        .and_then(|t| t.secret.clone())
    {
        return s;
    }
    match &backend.config.secrets.tenant_key {
        Some(key) => derived_password(key, role),
        None => Secret::default(),
    }
}
