//! Several proxies, one tenant map (`control_plane = "postgres://..."`): the routes live in a PostgreSQL
//! database ([`store`]) as a log of changes with one global epoch. Every instance applies the log in epoch
//! order: on a `NOTIFY`, and at least once a second (a lost notification only delays). A route change made on
//! any instance (`tenant set/remove`, a reload's new tenants, a cutover's or rollback's swap) is written to the
//! store first and then applied from it, so every instance applies the same changes in the same order. Each
//! instance heartbeats its id, address, version and applied epoch (`ctl instances`). When the store is
//! unreachable, serving goes on with the routes last applied, changes are refused, and the instance reconnects.
//! Without `control_plane` none of this runs and `state_dir` alone holds the routes.

pub mod barrier;
pub mod leases;
pub mod plane;
pub mod store;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::context::Shared;
use crate::routing::Route;
use crate::tenant::TenantId;
pub use plane::ControlPlane;
use store::{InstanceRow, RouteChange, StoreError};

/// Attempts of a route write whose lock wait timed out.
const BUSY_TRIES: u32 = 3;
/// Changes read from the store per query.
const BATCH: i64 = 10_000;

/// Runs a store operation that takes the route lock, again when the store answered it busy (its wait for a
/// lock timed out: another instance's write or a move's swap held it past `lock_timeout`; or the statement was
/// cancelled): a few times before the caller is told the store is busy. The operations retried are one
/// transaction each, so a busy answer left nothing of theirs behind.
pub(crate) async fn retry_busy<T, F, Fut>(mut op: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut tries_left = BUSY_TRIES;
    loop {
        tries_left -= 1;
        match op().await {
            Err(StoreError::Busy(_)) if tries_left > 0 => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            done => return done,
        }
    }
}

/// `instances`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceList {
    /// This instance's id.
    pub this: String,
    pub control_plane: bool,
    pub instances: Vec<InstanceRow>,
}

impl ControlPlane {
    /// Writes `changes` to the store as `guard` allows ([`StoreError::Conflict`] when it refuses), then applies
    /// the log up to them (and anything before them).
    pub async fn write(
        &self,
        shared: &Shared,
        changes: Vec<(TenantId, Option<Route>)>,
        guard: store::Guard,
    ) -> Result<(), StoreError> {
        let changes = &changes;
        retry_busy(|| {
            let id = self.id.clone();
            self.with_client(async move |c| store::append(c, &id, changes, guard).await.map(|_| ()))
        })
        .await?;
        self.sync(shared).await
    }

    /// Writes a migration's route swap of `tenant` unless its route changed after `since` or the move's lease
    /// is not this process's ([`store::append_swap`]); it is applied here by the caller and elsewhere by the
    /// usual sync.
    pub async fn write_swap(
        &self,
        tenant: &TenantId,
        since: store::SwapBasis,
        route: &Route,
    ) -> Result<store::SwapWrite, StoreError> {
        let (id, me) = (self.id.clone(), self.incarnation.clone());
        let (t, r) = (tenant.clone(), route.clone());
        self.with_client(async move |c| store::append_swap(c, (&id, &me), &t, since, &r).await)
            .await
    }

    /// Applies every change after the applied epoch. A store whose epoch is behind the one applied (restored
    /// from a backup, or it lost commits) is read again whole.
    pub async fn sync(&self, shared: &Shared) -> Result<(), StoreError> {
        let _one = self.applying.lock().await;
        loop {
            let after = self.applied.load(Ordering::Acquire);
            let (changes, latest) = self
                .with_client(async move |c| {
                    let changes = store::changes_after(c, after, BATCH).await?;
                    let latest = match changes.is_empty() {
                        true => store::current(c).await.map(|(e, _)| e)?,
                        false => after,
                    };
                    Ok((changes, latest))
                })
                .await?;
            if latest < after {
                warn!(
                    store = latest,
                    applied = after,
                    "the control plane's epoch went back; reading every route again"
                );
                return self.reload(shared).await;
            }
            let Some(last) = changes.last().map(|c| c.epoch) else {
                return Ok(());
            };
            apply(shared, &changes, &[])?;
            self.applied.store(last, Ordering::Release);
        }
    }

    /// At start: seeds an empty store with this instance's routes, then replaces them with the store's.
    pub async fn bootstrap(&self, shared: &Shared) -> Result<(), StoreError> {
        let _one = self.applying.lock().await;
        self.reload(shared).await
    }

    /// Replaces the local routes with the store's (seeding an empty store first); `applying` is held.
    async fn reload(&self, shared: &Shared) -> Result<(), StoreError> {
        let (epoch, latest) = self.with_client(async |c| store::current(c).await).await?;
        if epoch == 0 {
            let table = shared.router.snapshot();
            let seed: Vec<(TenantId, Option<Route>)> = table
                .iter()
                .map(|(t, r)| (t.clone(), Some((**r).clone())))
                .collect();
            self.applied.store(0, Ordering::Release);
            if seed.is_empty() {
                return Ok(());
            }
            let id = self.id.clone();
            self.with_client(async move |c| {
                store::append(c, &id, &seed, store::Guard::None)
                    .await
                    .map(|_| ())
            })
            .await?;
            info!(
                tenants = table.len(),
                "control plane was empty: seeded with this instance's routes"
            );
            // Read back what is there now (the seed, or another instance's if it seeded first).
            return Box::pin(self.reload(shared)).await;
        }
        let known: std::collections::HashSet<&TenantId> =
            latest.iter().map(|c| &c.tenant).collect();
        let gone: Vec<TenantId> = shared
            .router
            .snapshot()
            .tenants()
            .filter(|t| !known.contains(t))
            .cloned()
            .collect();
        apply(shared, &latest, &gone)?;
        self.applied.store(epoch, Ordering::Release);
        info!(
            epoch,
            tenants = latest.len(),
            "routes loaded from the control plane"
        );
        Ok(())
    }

    /// Copies this instance's new audit entries to the store's shared audit table.
    pub async fn mirror_audit(&self, shared: &Shared) -> Result<(), StoreError> {
        let entries = shared.audit.take_outbox();
        if entries.is_empty() {
            return Ok(());
        }
        let id = self.id.clone();
        let copy = entries.clone();
        let r = self
            .with_client(async move |c| store::mirror_audit(c, &id, &copy).await)
            .await;
        if r.is_err() {
            shared.audit.return_outbox(entries);
        }
        r
    }

    pub async fn heartbeat(&self) -> Result<(), StoreError> {
        let (id, addr, started) = (self.id.clone(), self.address.clone(), self.started_unix);
        let applied = self.applied.load(Ordering::Acquire);
        self.with_client(async move |c| store::heartbeat(c, &id, &addr, started, applied).await)
            .await
    }

    pub async fn instances(&self) -> Result<Vec<InstanceRow>, StoreError> {
        self.with_client(async |c| store::instances(c).await).await
    }
}

/// Applies store changes (and removals of tenants the store does not have) to the local routing table, which
/// persists them in `state_dir` as its cache.
fn apply(shared: &Shared, changes: &[RouteChange], gone: &[TenantId]) -> Result<(), StoreError> {
    shared
        .router
        .update(
            |routes| {
                for c in changes {
                    match &c.route {
                        Some(r) => routes.insert(c.tenant.clone(), Arc::new(r.clone())),
                        None => routes.remove(&c.tenant),
                    };
                }
                for t in gone {
                    routes.remove(t);
                }
                Ok(())
            },
            |table, made| {
                shared
                    .persist_routes(table, made)
                    .map_err(|e| StoreError::Pg(format!("local state: {e}")))
            },
        )
        .map(|_| ())
}

/// Follows the store until the proxy stops: applies on each notification and every second, heartbeats every
/// second, reconnects (backing off to 1 s) when the store is unreachable.
pub async fn run(shared: Arc<Shared>) {
    let Some(cp) = shared.control_plane.get() else {
        return;
    };
    let Some(mut wake) = cp.wake_rx.lock().unwrap_or_else(|p| p.into_inner()).take() else {
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut backoff = Duration::from_millis(200);
    loop {
        tokio::select! {
            _ = shared.terminate.fired() => return,
            _ = wake.recv() => {}
            _ = tick.tick() => {
                if let Err(e) = cp.heartbeat().await {
                    warn!(error = %e, "control plane heartbeat failed; serving with the routes last applied");
                } else if let Err(e) = cp.tend_leases(&shared).await {
                    warn!(error = %e, "migration leases could not be renewed");
                } else if let Err(e) = cp.mirror_audit(&shared).await {
                    warn!(error = %e, "audit entries could not be copied to the control plane");
                }
            }
        }
        let synced = match cp.sync(&shared).await {
            Ok(()) => cp.follow_barriers(&shared).await,
            Err(e) => Err(e),
        };
        match synced {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(e) => {
                warn!(error = %e, "control plane unreachable; serving with the routes last applied");
                tokio::time::sleep(backoff).await;
                // Never past the second: this loop also renews the move leases, which are trusted for 3 s after
                // a renewal (see `leases::LeaseClock`); a sync failing with the store reachable (a local write
                // error) must not let them lapse.
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// `instances`: the members the store knows, or this one alone without a control plane.
pub async fn instances(shared: &Shared) -> Result<InstanceList, StoreError> {
    match shared.control_plane.get() {
        Some(cp) => Ok(InstanceList {
            this: cp.id.clone(),
            control_plane: true,
            instances: cp.instances().await?,
        }),
        None => Ok(InstanceList {
            this: "local".into(),
            control_plane: false,
            instances: Vec::new(),
        }),
    }
}
