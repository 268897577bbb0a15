//! Routes (where a tenant lives) and the routing table (DESIGN section 3): an immutable snapshot with an epoch,
//! published through `ArcSwap` so that a lookup is one atomic load and a hash probe or two, with no lock.

use serde::{Deserialize, Serialize};
use std::borrow::Borrow;

use crate::config::{Isolation, TenantConfig};
pub use crate::ids::{BackendId, Epoch, InvalidBackendName};
use crate::tenant::TenantId;

/// Where a tenant lives (a backend, and optionally a database and a schema on it) and how it is kept apart
/// from the other tenants there. Optional fields are left out of `routes.json` when unset, so files written
/// before they existed read the same.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Route {
    pub backend: BackendId,
    pub database: Option<String>,
    pub schema: Option<String>,
    /// `role` or `shared`; none: the backend's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<Isolation>,
    /// Login role for role isolation; none: the backend's `tenant_role` template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The tenant's rows live in shared tables told apart by this column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_column: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_key: Option<String>,
}

impl From<&TenantConfig> for Route {
    fn from(t: &TenantConfig) -> Self {
        Route {
            backend: t.backend.clone(),
            database: t.database.clone(),
            schema: t.schema.clone(),
            isolation: t.isolation,
            role: t.role.clone(),
            tenant_column: t.tenant_column.clone(),
            tenant_key: t.tenant_key.clone(),
        }
    }
}

impl Route {
    /// A plain route: a backend, and optionally a database and schema on it.
    pub fn new(backend: BackendId, database: Option<String>, schema: Option<String>) -> Route {
        Route {
            backend,
            database,
            schema,
            ..Route::default()
        }
    }

    /// The route's isolation, with the backend's as the default.
    pub fn isolation(&self, backend: &crate::config::BackendConfig) -> Isolation {
        self.isolation.unwrap_or(backend.isolation)
    }

    /// The same place on another backend (what a migration's target looks like): everything but the place
    /// itself is kept.
    pub fn moved(
        &self,
        backend: &BackendId,
        database: Option<String>,
        schema: Option<String>,
    ) -> Route {
        Route {
            backend: backend.clone(),
            database,
            schema,
            ..self.clone()
        }
    }
}

impl Borrow<str> for TenantId {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

mod table;

pub use table::{Change, Changes, Router, RoutingTable};
