//! The routing table (DESIGN section 3): an immutable snapshot with an epoch, published through `ArcSwap` so
//! that a lookup is one atomic load and a hash probe, with no lock.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

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

#[derive(Debug, Clone, Default)]
pub struct RoutingTable {
    pub epoch: Epoch,
    pub routes: HashMap<TenantId, Arc<Route>>,
}

impl RoutingTable {
    pub fn get(&self, tenant: &str) -> Option<&Arc<Route>> {
        self.routes.get(tenant)
    }

    /// Builds the first table from the config's `[tenants.*]` (names were validated with the config).
    pub fn from_config<'a>(
        tenants: impl Iterator<Item = (&'a String, &'a TenantConfig)>,
    ) -> RoutingTable {
        let routes = tenants
            .filter_map(|(name, t)| Some((TenantId::parse(name).ok()?, Arc::new(Route::from(t)))))
            .collect();
        RoutingTable {
            epoch: Epoch(1),
            routes,
        }
    }
}

/// The published table. Readers `load()`; writers go through [`Router::update`], one at a time.
#[derive(Debug)]
pub struct Router {
    table: ArcSwap<RoutingTable>,
    writer: Mutex<()>,
}

impl Router {
    pub fn new(table: RoutingTable) -> Router {
        Router {
            table: ArcSwap::from_pointee(table),
            writer: Mutex::new(()),
        }
    }

    /// The current snapshot. Hold it for one transaction at most.
    pub fn load(&self) -> arc_swap::Guard<Arc<RoutingTable>> {
        self.table.load()
    }

    pub fn snapshot(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    /// Builds a new table from the current one with `change`, gives it the next epoch, lets `persist` write it
    /// (it becomes visible only if that succeeds), then publishes it.
    pub fn update<E>(
        &self,
        change: impl FnOnce(&mut HashMap<TenantId, Arc<Route>>) -> Result<(), E>,
        persist: impl FnOnce(&RoutingTable) -> Result<(), E>,
    ) -> Result<Arc<RoutingTable>, E> {
        let _one_writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.table.load_full();
        let mut routes = current.routes.clone();
        change(&mut routes)?;
        let next = Arc::new(RoutingTable {
            epoch: current.epoch.next(),
            routes,
        });
        persist(&next)?;
        self.table.store(next.clone());
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_bumps_epoch_and_persist_failure_hides_change() {
        let router = Router::new(RoutingTable::default());
        let acme = TenantId::parse("acme").unwrap();
        let route = Arc::new(Route::new(
            crate::routing::BackendId::parse("b").unwrap(),
            None,
            None,
        ));
        let t = router
            .update::<()>(
                |r| {
                    r.insert(acme.clone(), route.clone());
                    Ok(())
                },
                |_| Ok(()),
            )
            .unwrap();
        assert_eq!(t.epoch, Epoch(1));
        assert!(router.load().get("acme").is_some());
        let failed = router.update(
            |r| {
                r.remove("acme");
                Ok(())
            },
            |_| Err("disk full"),
        );
        assert_eq!(failed.unwrap_err(), "disk full");
        assert!(router.load().get("acme").is_some());
        assert_eq!(router.load().epoch, Epoch(1));
    }
}
