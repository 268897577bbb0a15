//! The registry of migrations: the persisted records (`state_dir/migrations.json`, written before any change
//! takes effect) and what runs for each one (its driving task, its tee, its table definitions).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::catalog::Table;
use super::failpoint::Failpoints;
use super::record::{Record, Store};
use super::tee::Tee;
use super::MigrateError;
use crate::routing::Epoch;
use crate::state::StateError;
use crate::tenant::TenantId;

/// Which way a tee runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Source to target (dual_write).
    Forward,
    /// Target back to source (after cutover).
    Reverse,
}

/// What a session waits for after a transaction of a migrating tenant that wrote, before the client hears
/// that it committed: the tee has the changes on the other side (or gave up waiting). A trait so the relay's
/// unit tests can hold a reply without a running migration.
pub trait CommitWait: Send + Sync {
    fn after_commit(&self) -> Pin<Box<dyn Future<Output = ()> + Send + Sync + '_>>;
}

impl CommitWait for Tee {
    fn after_commit(&self) -> Pin<Box<dyn Future<Output = ()> + Send + Sync + '_>> {
        Box::pin(Tee::after_commit(self))
    }
}

/// What runs for one migration.
pub struct Live {
    pub tenant: TenantId,
    /// One operation at a time (verify, cutover, rollback, finalize, abort, repair).
    pub lock: tokio::sync::Mutex<()>,
    pub stop: CancellationToken,
    /// Rows copied for tables not yet checkpointed.
    pub partial_rows: AtomicU64,
    pub tee: Mutex<Option<(Direction, Arc<Tee>)>>,
    pub tables: Mutex<Vec<Table>>,
    pub(super) task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The fences were found where the route says (checked once per run of a `migrated` move).
    pub fences_settled: std::sync::atomic::AtomicBool,
    /// A route swap whose outcome the store has not told yet (the tenant is held): nothing may change the
    /// tenant's fences, gate or record until it has.
    pub swap_pending: std::sync::atomic::AtomicBool,
}

impl Live {
    pub(super) fn new(tenant: &TenantId) -> Arc<Live> {
        Arc::new(Live {
            tenant: tenant.clone(),
            lock: tokio::sync::Mutex::new(()),
            stop: CancellationToken::new(),
            partial_rows: AtomicU64::new(0),
            tee: Mutex::new(None),
            tables: Mutex::new(Vec::new()),
            task: Mutex::new(None),
            fences_settled: std::sync::atomic::AtomicBool::new(false),
            swap_pending: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Stops the driving task and waits (bounded) until it has ended, so nothing it was doing (a capture
    /// install, a copy batch) can land after the caller's cleanup.
    pub async fn halt(&self) {
        self.stop.cancel();
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = task {
            if tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .is_err()
            {
                warn!(tenant = %self.tenant, "migration task did not stop within 60 s");
            }
        }
    }

    pub fn tee(&self) -> Option<(Direction, Arc<Tee>)> {
        self.tee.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn tables(&self) -> Vec<Table> {
        self.tables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

pub struct Migrations {
    store: Store,
    records: Mutex<BTreeMap<TenantId, Record>>,
    live: Mutex<HashMap<TenantId, Arc<Live>>>,
    /// The running tees by tenant; sessions look here after a transaction that wrote.
    pub tees: ArcSwap<HashMap<TenantId, Arc<dyn CommitWait>>>,
    pub failpoints: Arc<Failpoints>,
    /// The routing epoch at which a migration moved each tenant (cutover or rollback): a session still on an
    /// older route of the tenant is ended rather than left writing to the fenced old side.
    moved: Mutex<HashMap<TenantId, Epoch>>,
    /// Finished migrations.
    pub history: super::history::History,
    /// Moves queued for later.
    pub queue: super::queue::Queue,
    /// Source copies of finished moves waiting for their scheduled drop.
    pub drops: super::drops::Drops,
    /// Moves whose `migrate start` is between taking the lease and registering the driver: their lease is
    /// this instance's and no task runs them yet, which a takeover must not mistake for a move to resume.
    starting: Mutex<HashMap<TenantId, Record>>,
}

/// A tenant's place in [`Migrations::starting`], given up when dropped.
pub struct Starting<'a>(&'a Migrations, TenantId);

impl Starting<'_> {
    /// The record renewed from now on.
    pub fn set(&self, rec: &Record) {
        self.0
            .starting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.1.clone(), rec.clone());
    }
}

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        self.0
            .starting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
    }
}

impl Migrations {
    pub fn open(dir: &std::path::Path) -> Result<Migrations, StateError> {
        let store = Store::new(dir);
        let records = store.load()?;
        Ok(Migrations {
            store,
            records: Mutex::new(records),
            live: Mutex::new(HashMap::new()),
            tees: ArcSwap::from_pointee(HashMap::new()),
            failpoints: Arc::new(Failpoints::from_env()),
            moved: Mutex::new(HashMap::new()),
            history: super::history::History::new(dir),
            queue: super::queue::Queue::open(dir)?,
            drops: super::drops::Drops::open(dir)?,
            starting: Mutex::new(HashMap::new()),
        })
    }

    /// A migration swapped `tenant`'s route at routing epoch `epoch`.
    pub fn note_moved(&self, tenant: &TenantId, epoch: Epoch) {
        self.moved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.clone(), epoch);
    }

    /// The epoch at which a migration last moved `tenant`, if one did since the proxy started.
    pub fn moved_at(&self, tenant: &str) -> Option<Epoch> {
        self.moved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            .copied()
    }

    pub fn get(&self, tenant: &str) -> Option<Record> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            .cloned()
    }

    pub fn all(&self) -> Vec<Record> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Marks the move of `rec` as starting here until the returned guard is dropped (its lease is renewed
    /// meanwhile: a start with a backup takes longer than the lease). Refused (why) while another start of the
    /// tenant is under way, or another unfinished move here lands in the same place ([`Record::target_clashes`]):
    /// two starts at once both find the place free in the routes.
    pub fn starting(&self, rec: &Record) -> Result<Starting<'_>, String> {
        // The starting lock first: a move passing from starting to records meanwhile is seen in one or the
        // other (nothing takes these two locks the other way round).
        let mut starting = self.starting.lock().unwrap_or_else(|p| p.into_inner());
        let records = self.all();
        if starting.contains_key(&rec.tenant) {
            return Err(format!(
                "a move of tenant {:?} is being started",
                rec.tenant.as_str()
            ));
        }
        let unfinished = records.iter().filter(|r| !r.state.is_final());
        if let Some(other) = unfinished
            .chain(starting.values())
            .find(|r| rec.target_clashes(r))
        {
            return Err(format!(
                "tenant {:?}'s move lands in the same place ({}, database {:?}, schema {:?})",
                other.tenant.as_str(),
                other.target.backend,
                other.target_database,
                other.target.schema.as_deref().unwrap_or("public")
            ));
        }
        starting.insert(rec.tenant.clone(), rec.clone());
        Ok(Starting(self, rec.tenant.clone()))
    }

    /// Whether a move of `tenant` is being started here.
    pub fn is_starting(&self, tenant: &str) -> bool {
        self.starting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(tenant)
    }

    /// The records of the moves being started here.
    pub fn all_starting(&self) -> Vec<Record> {
        self.starting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Whether a move of `tenant` runs here or is being started here.
    pub fn runs_or_starts(&self, tenant: &str) -> bool {
        self.live(tenant).is_some()
            || self
                .starting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(tenant)
    }

    /// Whether `tenant`'s move waits for the store's answer to its route swap.
    pub fn swap_pending(&self, tenant: &str) -> bool {
        self.live(tenant)
            .is_some_and(|l| l.swap_pending.load(std::sync::atomic::Ordering::Acquire))
    }

    pub fn live(&self, tenant: &str) -> Option<Arc<Live>> {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            .cloned()
    }

    /// Migrations not yet ended.
    pub fn active_count(&self) -> usize {
        self.all().iter().filter(|r| !r.state.is_final()).count()
    }

    /// Writes `record` (new or changed) to disk, then makes it current. On a write failure nothing changes.
    pub fn put(&self, record: Record) -> Result<(), StateError> {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = records.clone();
        next.insert(record.tenant.clone(), record);
        self.store.save(&next)?;
        *records = next;
        Ok(())
    }

    /// Changes the record of `tenant` with `f` and persists it.
    pub fn update(
        &self,
        tenant: &str,
        f: impl FnOnce(&mut Record),
    ) -> Result<Record, MigrateError> {
        let mut rec = self
            .get(tenant)
            .ok_or_else(|| MigrateError::Refused(format!("no migration for tenant {tenant:?}")))?;
        f(&mut rec);
        rec.updated_at = crate::state::audit::rfc3339_now();
        self.put(rec.clone())?;
        Ok(rec)
    }

    pub(super) fn publish_tee(&self, tenant: &TenantId, tee: Option<Arc<Tee>>) {
        let mut map = (**self.tees.load()).clone();
        match tee {
            Some(t) => map.insert(tenant.clone(), t as Arc<dyn CommitWait>),
            None => map.remove(tenant),
        };
        self.tees.store(Arc::new(map));
    }

    pub fn register_live(&self, tenant: &TenantId) -> Arc<Live> {
        let live = Live::new(tenant);
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.clone(), live.clone());
        live
    }

    /// Stops every migration task and tee (the proxy is going away; records stay as they are on disk, and the
    /// next start resumes them).
    pub fn shutdown(&self) {
        self.failpoints.close();
        self.tees.store(Arc::new(HashMap::new()));
        let live: Vec<Arc<Live>> = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, l)| l)
            .collect();
        for l in live {
            l.stop.cancel();
            if let Some((_, t)) = l.tee.lock().unwrap_or_else(|p| p.into_inner()).take() {
                t.stop_now();
            }
        }
    }

    pub fn forget_live(&self, tenant: &str) {
        if let Some(live) = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tenant)
        {
            live.stop.cancel();
        }
    }
}
