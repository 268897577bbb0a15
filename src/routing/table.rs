//! The routing table and its one writer. A route change must not cost time in the number of tenants (100 000
//! tenants on one proxy are expected), so a table is a large shared `base` plus the few changes made since it
//! was built (`recent`): a change copies `recent` only. When `recent` grows past [`RECENT_MAX`], a background
//! thread folds it into a new base and the writer swaps that in, keeping the changes made meanwhile.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::Route;
use crate::config::TenantConfig;
use crate::ids::Epoch;
use crate::tenant::TenantId;

/// Changes kept beside the base before they are folded into a new one. A lookup of a changed tenant is one
/// hash probe more; a change copies at most this many entries.
const RECENT_MAX: usize = 2048;

/// A change since the base was built: the epoch that made it and the new route (`None`: removed).
type Recent = (Epoch, Option<Arc<Route>>);

/// A snapshot of every tenant's route at one epoch.
#[derive(Debug, Clone, Default)]
pub struct RoutingTable {
    pub epoch: Epoch,
    base: Arc<HashMap<TenantId, Arc<Route>>>,
    /// Changes since `base` was built, with the epoch that made each (`None`: removed).
    recent: Arc<HashMap<TenantId, Recent>>,
    len: usize,
}

impl RoutingTable {
    pub fn new(epoch: Epoch, routes: HashMap<TenantId, Arc<Route>>) -> RoutingTable {
        RoutingTable {
            epoch,
            len: routes.len(),
            base: Arc::new(routes),
            recent: Arc::default(),
        }
    }

    pub fn get(&self, tenant: &str) -> Option<&Arc<Route>> {
        if !self.recent.is_empty() {
            if let Some((_, changed)) = self.recent.get(tenant) {
                return changed.as_ref();
            }
        }
        self.base.get(tenant)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every routed tenant, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&TenantId, &Arc<Route>)> {
        let recent = &self.recent;
        let kept = self
            .base
            .iter()
            .filter(move |(t, _)| !recent.contains_key(t.as_str()));
        let changed = recent
            .iter()
            .filter_map(|(t, (_, r))| r.as_ref().map(|r| (t, r)));
        kept.chain(changed)
    }

    pub fn tenants(&self) -> impl Iterator<Item = &TenantId> {
        self.iter().map(|(t, _)| t)
    }

    /// Builds the first table from the config's `[tenants.*]` (names were validated with the config).
    pub fn from_config<'a>(
        tenants: impl Iterator<Item = (&'a String, &'a TenantConfig)>,
    ) -> RoutingTable {
        let routes = tenants
            .filter_map(|(name, t)| Some((TenantId::parse(name).ok()?, Arc::new(Route::from(t)))))
            .collect();
        RoutingTable::new(Epoch(1), routes)
    }

    /// The same routes with `recent` folded into the base: the work that is linear in the tenants.
    fn folded(&self) -> RoutingTable {
        let mut base = (*self.base).clone();
        for (t, (_, r)) in self.recent.iter() {
            match r {
                Some(r) => base.insert(t.clone(), r.clone()),
                None => base.remove(t.as_str()),
            };
        }
        RoutingTable::new(self.epoch, base)
    }
}

/// One tenant's new route (`None`: removed).
#[derive(Debug, Clone)]
pub struct Change {
    pub tenant: TenantId,
    pub route: Option<Arc<Route>>,
}

/// The changes a writer makes to the table: reads see them at once, and they become the next epoch.
pub struct Changes<'a> {
    table: &'a RoutingTable,
    made: Vec<Change>,
    /// The last change of each tenant in `made` (a reload adds many tenants in one update).
    last: HashMap<TenantId, usize>,
}

impl Changes<'_> {
    pub fn get(&self, tenant: &str) -> Option<&Arc<Route>> {
        match self.last.get(tenant) {
            Some(&i) => self.made[i].route.as_ref(),
            None => self.table.get(tenant),
        }
    }

    fn push(&mut self, tenant: TenantId, route: Option<Arc<Route>>) {
        self.last.insert(tenant.clone(), self.made.len());
        self.made.push(Change { tenant, route });
    }

    pub fn insert(&mut self, tenant: TenantId, route: Arc<Route>) {
        self.push(tenant, Some(route));
    }

    pub fn remove(&mut self, tenant: &TenantId) {
        self.push(tenant.clone(), None);
    }

    /// Sets the route unless the tenant has one.
    pub fn insert_if_absent(&mut self, tenant: &TenantId, route: impl FnOnce() -> Route) {
        if self.get(tenant.as_str()).is_none() {
            self.insert(tenant.clone(), Arc::new(route()));
        }
    }
}

/// The published table. Readers `load()`; writers go through [`Router::update`], one at a time.
#[derive(Debug)]
pub struct Router {
    table: ArcSwap<RoutingTable>,
    /// The epoch of the table last stored, stored after it: a session that kept a route from an earlier
    /// table checks it is still current with one atomic load (see [`Router::epoch`]).
    published: AtomicU64,
    writer: Mutex<Folding>,
}

/// Whether a fold of `recent` into a new base is under way (only one at a time).
#[derive(Debug, Default)]
struct Folding {
    running: bool,
}

impl Router {
    pub fn new(table: RoutingTable) -> Router {
        Router {
            published: AtomicU64::new(table.epoch.0),
            table: ArcSwap::from_pointee(table),
            writer: Mutex::new(Folding::default()),
        }
    }

    /// The current snapshot. Hold it for one transaction at most.
    pub fn load(&self) -> arc_swap::Guard<Arc<RoutingTable>> {
        self.table.load()
    }

    /// The epoch of the current snapshot, without loading it. Stored after the snapshot is, so a reader that
    /// sees the old epoch may only miss a change still under way (as if it had read just before it). A
    /// cutover opens the tenant's gate after `update` returned, so a transaction admitted after it sees the
    /// new epoch.
    pub fn epoch(&self) -> Epoch {
        Epoch(self.published.load(Ordering::Acquire))
    }

    pub fn snapshot(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    /// Builds the next table from the current one with `change`, gives it the next epoch, lets `persist` write
    /// the changes (they become visible only if that succeeds), then publishes it. Time is linear in the
    /// changes made, not in the tenants.
    pub fn update<E>(
        self: &Arc<Self>,
        change: impl FnOnce(&mut Changes<'_>) -> Result<(), E>,
        persist: impl FnOnce(&RoutingTable, &[Change]) -> Result<(), E>,
    ) -> Result<Arc<RoutingTable>, E> {
        let mut folding = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.table.load_full();
        let mut changes = Changes {
            table: &current,
            made: Vec::new(),
            last: HashMap::new(),
        };
        change(&mut changes)?;
        let made = changes.made;
        let epoch = current.epoch.next();
        let mut recent = (*current.recent).clone();
        let mut len = current.len;
        for c in &made {
            let before = recent
                .get(c.tenant.as_str())
                .map(|(_, r)| r.is_some())
                .unwrap_or_else(|| current.base.contains_key(c.tenant.as_str()));
            len = len + usize::from(c.route.is_some()) - usize::from(before);
            recent.insert(c.tenant.clone(), (epoch, c.route.clone()));
        }
        let next = Arc::new(RoutingTable {
            epoch,
            base: current.base.clone(),
            recent: Arc::new(recent),
            len,
        });
        persist(&next, &made)?;
        self.table.store(next.clone());
        self.published.store(epoch.0, Ordering::Release);
        if next.recent.len() > RECENT_MAX && !folding.running {
            folding.running = self.fold_in_background(next.clone());
        }
        Ok(next)
    }

    /// Folds `at`'s recent changes into a new base on a thread of its own, then swaps it in with the changes
    /// made since `at` kept on top. Called with the writer lock held; false when no thread could be started.
    fn fold_in_background(self: &Arc<Self>, at: Arc<RoutingTable>) -> bool {
        let router = self.clone();
        let spawned = std::thread::Builder::new()
            .name("pgtenant-routes".into())
            .spawn(move || {
                let folded = at.folded();
                let mut folding = router.writer.lock().unwrap_or_else(|p| p.into_inner());
                let current = router.table.load_full();
                let newer: HashMap<_, _> = current
                    .recent
                    .iter()
                    .filter(|(_, (epoch, _))| *epoch > at.epoch)
                    .map(|(t, v)| (t.clone(), v.clone()))
                    .collect();
                router.table.store(Arc::new(RoutingTable {
                    epoch: current.epoch,
                    base: folded.base,
                    recent: Arc::new(newer),
                    len: current.len,
                }));
                folding.running = false;
                drop((folding, current, at));
                // The old base goes when its last reader does; what this thread's arena holds goes now.
                crate::heap::trim();
            });
        match spawned {
            Ok(_) => true,
            Err(e) => {
                // The table stays correct, only lookups of changed tenants stay one probe longer; the next
                // change tries again.
                tracing::warn!(error = %e, "could not start the routing-table fold");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::BackendId;

    fn route(schema: &str) -> Arc<Route> {
        Arc::new(Route::new(
            BackendId::parse("b").unwrap(),
            None,
            Some(schema.into()),
        ))
    }

    fn id(name: &str) -> TenantId {
        TenantId::parse(name).unwrap()
    }

    fn set(router: &Arc<Router>, tenant: &str, r: Option<Arc<Route>>) -> Arc<RoutingTable> {
        router
            .update::<()>(
                |c| {
                    match r {
                        Some(r) => c.insert(id(tenant), r),
                        None => c.remove(&id(tenant)),
                    }
                    Ok(())
                },
                |_, _| Ok(()),
            )
            .unwrap()
    }

    #[test]
    fn update_bumps_epoch_and_persist_failure_hides_change() {
        let router = Arc::new(Router::new(RoutingTable::default()));
        assert_eq!(router.epoch(), Epoch(0));
        let t = set(&router, "acme", Some(route("s")));
        assert_eq!((t.epoch, router.epoch()), (Epoch(1), Epoch(1)));
        assert!(router.load().get("acme").is_some());
        let failed = router.update(
            |c| {
                c.remove(&id("acme"));
                Ok(())
            },
            |_, _| Err("disk full"),
        );
        assert_eq!(failed.unwrap_err(), "disk full");
        assert!(router.load().get("acme").is_some());
        assert_eq!(router.load().epoch, Epoch(1));
        assert_eq!(router.epoch(), Epoch(1));
    }

    #[test]
    fn persist_gets_exactly_the_changes_and_reads_see_them() {
        let mut base = HashMap::new();
        base.insert(id("a"), route("a"));
        base.insert(id("b"), route("b"));
        let router = Arc::new(Router::new(RoutingTable::new(Epoch(5), base)));
        let mut seen = Vec::new();
        let t = router
            .update::<()>(
                |c| {
                    c.remove(&id("a"));
                    c.insert_if_absent(&id("b"), || unreachable!("b has a route"));
                    c.insert_if_absent(&id("c"), || (*route("c")).clone());
                    assert!(c.get("a").is_none());
                    assert!(c.get("c").is_some());
                    Ok(())
                },
                |table, changes| {
                    seen = changes
                        .iter()
                        .map(|c| (c.tenant.to_string(), c.route.is_some()))
                        .collect();
                    assert_eq!(table.epoch, Epoch(6));
                    Ok(())
                },
            )
            .unwrap();
        assert_eq!(seen, [("a".to_string(), false), ("c".to_string(), true)]);
        assert!(t.get("a").is_none());
        assert_eq!(t.get("b").unwrap().schema.as_deref(), Some("b"));
        assert_eq!(t.len(), 2);
        let mut names: Vec<_> = t.tenants().map(|t| t.to_string()).collect();
        names.sort();
        assert_eq!(names, ["b", "c"]);
    }

    /// Many changes (more than `recent` keeps) against a model map: the background fold loses nothing, also
    /// of the changes made while it runs, and `recent` stays bounded.
    #[test]
    fn folding_keeps_every_change() {
        let router = Arc::new(Router::new(RoutingTable::default()));
        let mut model: HashMap<String, Option<String>> = HashMap::new();
        for i in 0..(RECENT_MAX * 3) {
            let name = format!("t{}", i % (RECENT_MAX + 500));
            let r = (i % 7 != 3).then(|| format!("s{i}"));
            set(&router, &name, r.as_deref().map(route));
            model.insert(name, r);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while router.load().recent.len() > RECENT_MAX {
            assert!(std::time::Instant::now() < deadline, "no fold");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let table = router.snapshot();
        for (name, r) in &model {
            let got = table.get(name).and_then(|r| r.schema.clone());
            assert_eq!(&got, r, "{name}");
        }
        assert_eq!(table.len(), model.values().filter(|r| r.is_some()).count());
        assert_eq!(table.iter().count(), table.len());
        assert_eq!(table.epoch, Epoch(RECENT_MAX as u64 * 3));
        // A fold publishes the same routes under the same epoch.
        assert_eq!(router.epoch(), table.epoch);
    }
}
