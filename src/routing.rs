//! The routing table (DESIGN section 3): an immutable snapshot with an epoch, published through `ArcSwap` so
//! that a lookup is one atomic load and a hash probe, with no lock.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use crate::config::TenantConfig;
use crate::tenant::TenantId;

/// A routing table version. Every change increases it, so a session can tell its backend is of an older route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where a tenant lives: a backend, and optionally a database and a schema on it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Route {
    pub backend: String,
    pub database: Option<String>,
    pub schema: Option<String>,
}

impl From<&TenantConfig> for Route {
    fn from(t: &TenantConfig) -> Self {
        Route {
            backend: t.backend.clone(),
            database: t.database.clone(),
            schema: t.schema.clone(),
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
    pub epoch: u64,
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
        RoutingTable { epoch: 1, routes }
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
            epoch: current.epoch + 1,
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
        let route = Arc::new(Route {
            backend: "b".into(),
            database: None,
            schema: None,
        });
        let t = router
            .update::<()>(
                |r| {
                    r.insert(acme.clone(), route.clone());
                    Ok(())
                },
                |_| Ok(()),
            )
            .unwrap();
        assert_eq!(t.epoch, 1);
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
        assert_eq!(router.load().epoch, 1);
    }
}
