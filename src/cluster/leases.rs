//! One coordinator per migration: the instance running a migration keeps its record in the store with a lease
//! (renewed each second, valid 5 s). When a coordinator dies, its lease runs out and another live instance takes
//! the migration over: it takes the lease, installs the record and resumes the move from it, as a restart does
//! (copy from its table checkpoints, the tee from the change log, a cutover interrupted before the swap falls
//! back, the swap itself being in the store or not). A coordinator that finds its lease taken (it was frozen
//! or cut off) stops its move at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::plane::ControlPlane;
use super::store::{pg, StoreError};
use crate::context::Shared;
use crate::migration::record::Record;
use crate::tenant::TenantId;

const LEASE: &str = "5 seconds";
/// This process holds the row's lease (in an upsert, `EXCLUDED` is this process's).
const SAME_HOLDER: &str = "pgtenant_cp.migrations.holder = EXCLUDED.holder \
     AND pgtenant_cp.migrations.incarnation = EXCLUDED.incarnation";
/// How long after a renewal was sent this instance still acts on the lease: well inside the 5 s the store gives
/// it, so the lease cannot have run out (and been taken) while a step it allows is running.
const TRUSTED: Duration = Duration::from_secs(3);

/// When each of this instance's leases was last renewed (the instant the renewal was sent). A coordinator cut off
/// from the store, or frozen past its lease, stops acting on its moves by itself: without this it would learn
/// that its lease was taken only from the store it cannot reach, and meanwhile take the target back from the
/// instance that took the move over (a new tee link or copy run ends the sessions of the one before).
///
/// Both clocks are read: the monotonic one does not move while the machine is suspended (a paused VM), the wall
/// clock does (and one that went back counts as expired).
#[derive(Default)]
pub struct LeaseClock(Mutex<HashMap<TenantId, Renewal>>);

/// A lease's last successful renewal: when it was sent, on both clocks, and the lease's generation.
#[derive(Debug, Clone, Copy)]
struct Renewal {
    at: Instant,
    wall: SystemTime,
    generation: i64,
}

impl LeaseClock {
    /// Whether this instance may act on `tenant`'s move now.
    pub fn holds(&self, tenant: &str) -> bool {
        self.held(tenant).is_some()
    }

    /// The generation of this instance's lease on `tenant`'s move while it may act on it (see [`Self::holds`]),
    /// which its claims on the backends carry: each takeover by another instance draws a higher one.
    pub fn held(&self, tenant: &str) -> Option<i64> {
        self.lock()
            .get(tenant)
            .filter(|r| r.at.elapsed() < TRUSTED && r.wall.elapsed().is_ok_and(|d| d < TRUSTED))
            .map(|r| r.generation)
    }

    fn renewed(&self, tenant: &TenantId, sent: (Instant, SystemTime), generation: i64) {
        let (at, wall) = sent;
        self.lock().insert(
            tenant.clone(),
            Renewal {
                at,
                wall,
                generation,
            },
        );
    }

    /// The generation of this instance's last renewal of `tenant`'s lease, however long ago.
    pub fn generation(&self, tenant: &str) -> Option<i64> {
        self.lock().get(tenant).map(|r| r.generation)
    }

    fn lost(&self, tenant: &str) {
        self.lock().remove(tenant);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TenantId, Renewal>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Draws the first generation of a lease row just written with none.
async fn first_generation(c: &tokio_postgres::Client, tenant: &str) -> Result<i64, StoreError> {
    let row = c
        .query_one(
            "UPDATE pgtenant_cp.migrations SET generation = pgtenant_cp.next_generation()
              WHERE tenant = $1 RETURNING generation",
            &[&tenant],
        )
        .await
        .map_err(pg("draw a lease generation"))?;
    Ok(row.get(0))
}

impl ControlPlane {
    /// Renews this instance's leases (mirroring the records), gives up finished ones, stops moves whose lease
    /// another instance took, and takes over moves whose coordinator's lease ran out.
    pub async fn tend_leases(&self, shared: &Arc<Shared>) -> Result<(), StoreError> {
        for rec in shared.migrations.all() {
            let running = shared.migrations.live(rec.tenant.as_str()).is_some();
            if rec.state.is_final() {
                self.release(&rec).await?;
            } else if running && !self.renew(&rec).await? {
                tracing::warn!(tenant = %rec.tenant, "another instance took this migration over; stopping it here");
                if let Some(live) = shared.migrations.live(rec.tenant.as_str()) {
                    live.halt().await;
                    // The tee runs on its own task: left running, it would go on applying and, each time it
                    // reconnects, end the new coordinator's applying session (the apply lock, `claim`), which
                    // would end its in turn.
                    crate::migration::sides::stop_tee(shared, &live).await;
                }
                shared.migrations.forget_live(rec.tenant.as_str());
            }
        }
        // A move being started here has no task yet, and its record is not yet among this instance's.
        for rec in shared.migrations.all_starting() {
            self.renew(&rec).await?;
        }
        let taken = self.take_expired(shared).await?;
        if !taken.is_empty() {
            // A swap its coordinator wrote before the lease was taken (its write locked the lease row, so it
            // committed first) is applied before the move is resumed from the route.
            self.sync(shared).await?;
        }
        for stored in taken {
            // After a restart this instance's own record may be newer than its last copy in the store.
            let rec = match shared.migrations.get(stored.tenant.as_str()) {
                Some(local) if local.updated_at >= stored.updated_at => local,
                _ => stored,
            };
            tracing::info!(tenant = %rec.tenant, state = rec.shown_state(), "taking over a migration whose coordinator is gone");
            if let Err(e) = shared.migrations.put(rec.clone()) {
                tracing::warn!(tenant = %rec.tenant, error = %e, "could not record the migration taken over");
                continue;
            }
            crate::migration::driver::resume(shared, &rec).await;
        }
        Ok(())
    }

    /// Takes the lease of a migration this instance starts, before any of its work: the other instances know
    /// its coordinator from the first moment (one dying in its first second is taken over like any other), and
    /// a move of the tenant another instance coordinates is refused (false).
    /// Taken under the route lock, with the start's checks ([`refuse_clashing_start`]), so a route change or a
    /// start on another instance is either seen here or sees this move.
    pub async fn lease_new(&self, rec: &Record) -> Result<bool, StoreError> {
        super::retry_busy(|| self.lease(rec, true)).await
    }

    /// Removes the lease `lease_new` took, for a move whose start failed after it.
    pub async fn unlease(&self, tenant: &crate::tenant::TenantId) -> Result<(), StoreError> {
        let (id, t, me) = (
            self.id.clone(),
            tenant.to_string(),
            self.incarnation.clone(),
        );
        self.with_client(async move |c| {
            c.execute(
                "DELETE FROM pgtenant_cp.migrations WHERE tenant = $1 AND holder = $2 AND incarnation = $3",
                &[&t, &id, &me],
            )
            .await
            .map_err(pg("remove a lease"))
            .map(|_| ())
        })
        .await
    }

    /// Writes the record now, with a fresh lease (a step another instance taking the move over must see);
    /// false when another instance holds the lease.
    pub async fn renew_now(&self, rec: &Record) -> Result<bool, StoreError> {
        self.renew(rec).await
    }

    /// Writes the record with a fresh lease; false when another instance holds it.
    async fn renew(&self, rec: &Record) -> Result<bool, StoreError> {
        self.lease(rec, false).await
    }

    /// [`ControlPlane::renew`], or with `first` the lease of a move starting here.
    async fn lease(&self, rec: &Record, first: bool) -> Result<bool, StoreError> {
        let json = serde_json::to_value(rec).map_err(|e| StoreError::Pg(e.to_string()))?;
        let sent = (Instant::now(), SystemTime::now());
        // The generation stays while this process holds the lease; a lease taken from another (or from a
        // process of the same id) draws a new one. Only a finished move's expired lease is written over (a new
        // move of the tenant): an unfinished one's is another process's to take over with the store's record
        // (`take_expired`), never to overwrite with this process's, which may be older than the taker's. This
        // process's own newer record (a cutover's start, written at once) is not put back by a renewal that
        // read the record before it.
        let (id, t, me) = (
            self.id.clone(),
            rec.tenant.to_string(),
            self.incarnation.clone(),
        );
        let starting = first.then(|| rec.clone());
        let held = self.with_client(async move |c| {
            let sql = format!(
                        "INSERT INTO pgtenant_cp.migrations (tenant, record, holder, incarnation, lease_until, generation)
                         VALUES ($1, $2, $3, $4, now() + interval '{LEASE}', 0)
                         ON CONFLICT (tenant) DO UPDATE SET record = CASE
                             WHEN {SAME_HOLDER} AND pgtenant_cp.migrations.record->>'updated_at' > EXCLUDED.record->>'updated_at'
                             THEN pgtenant_cp.migrations.record ELSE EXCLUDED.record END, holder = EXCLUDED.holder,
                           incarnation = EXCLUDED.incarnation, lease_until = EXCLUDED.lease_until, updated_at = now(),
                           generation = CASE WHEN {SAME_HOLDER} THEN pgtenant_cp.migrations.generation
                             ELSE pgtenant_cp.next_generation() END
                         WHERE {SAME_HOLDER} OR (pgtenant_cp.migrations.lease_until < now()
                           AND pgtenant_cp.migrations.record->>'state' IN ('completed', 'rolled_back'))
                         RETURNING generation");
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] = [&t, &json, &id, &me];
            // A renewal is one statement; a first lease takes the route lock and the start's checks with it.
            let row = match &starting {
                Some(rec) => {
                    let tx = c.transaction().await.map_err(pg("begin"))?;
                    super::store::lock_routes(&tx).await?;
                    refuse_clashing_start(&tx, rec).await?;
                    let row = tx.query_opt(&sql, &params).await.map_err(pg("take lease"))?;
                    tx.commit().await.map_err(pg("commit lease"))?;
                    row
                }
                None => c.query_opt(&sql, &params).await.map_err(pg("renew lease"))?,
            };
            match row.map(|r| r.get::<_, i64>(0)) {
                // A new row: its first generation is drawn now (drawing in VALUES would draw at every renewal).
                Some(0) => first_generation(c, &t).await.map(Some),
                held => Ok(held),
            }
        })
        .await?;
        if let Some(generation) = held {
            self.lease_clock.renewed(&rec.tenant, sent, generation);
        } else {
            self.lease_clock.lost(rec.tenant.as_str());
        }
        Ok(held.is_some())
    }

    /// A finished migration's record, written once more with its lease given up.
    async fn release(&self, rec: &Record) -> Result<(), StoreError> {
        let key = (rec.tenant.clone(), rec.updated_at.clone());
        if self
            .released
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&key)
        {
            return Ok(());
        }
        let json = serde_json::to_value(rec).map_err(|e| StoreError::Pg(e.to_string()))?;
        let (id, t, me) = (
            self.id.clone(),
            rec.tenant.to_string(),
            self.incarnation.clone(),
        );
        self.with_client(async move |c| {
            c.execute(
                "UPDATE pgtenant_cp.migrations SET record = $2, lease_until = now(), updated_at = now()
                  WHERE tenant = $1 AND holder = $3 AND incarnation = $4",
                &[&t, &json, &id, &me],
            )
            .await
            .map_err(pg("release lease"))
            .map(|_| ())
        })
        .await?;
        self.released
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key);
        Ok(())
    }

    /// Unfinished migrations whose lease ran out (or that this instance held before it restarted) and that do
    /// not run here, each taken with a fresh lease.
    async fn take_expired(&self, shared: &Shared) -> Result<Vec<Record>, StoreError> {
        let id = self.id.clone();
        let candidates: Vec<String> = self
            .with_client(async move |c| {
                let rows = c
                    .query(
                        "SELECT tenant FROM pgtenant_cp.migrations
                          WHERE (lease_until < now() OR holder = $1)
                            AND record->>'state' NOT IN ('completed', 'rolled_back')",
                        &[&id],
                    )
                    .await
                    .map_err(pg("look for migrations to take over"))?;
                Ok(rows.iter().map(|r| r.get(0)).collect())
            })
            .await?;
        let mut taken = Vec::new();
        for t in candidates.into_iter().filter(|t| !runs_here(shared, t)) {
            let (id, me) = (self.id.clone(), self.incarnation.clone());
            let sent = (Instant::now(), SystemTime::now());
            // Always a new generation: the move does not run in this process. A lease of this id but of
            // another process (this one before a restart, or a frozen one) is waited out like any other.
            let row: Option<(serde_json::Value, i64)> = self
                .with_client(async move |c| {
                    let row = c
                        .query_opt(
                            &format!(
                                "UPDATE pgtenant_cp.migrations SET holder = $1, incarnation = $3,
                                   lease_until = now() + interval '{LEASE}', generation = pgtenant_cp.next_generation()
                                  WHERE tenant = $2
                                    AND (lease_until < now() OR (holder = $1 AND incarnation = $3))
                                  RETURNING record, generation"
                            ),
                            &[&id, &t, &me],
                        )
                        .await
                        .map_err(pg("take over a migration"))?;
                    Ok(row.map(|r| (r.get(0), r.get(1))))
                })
                .await?;
            let Some((value, generation)) = row else {
                continue;
            };
            if let Ok(rec) = serde_json::from_value::<Record>(value) {
                self.lease_clock.renewed(&rec.tenant, sent, generation);
                taken.push(rec);
            }
        }
        Ok(taken)
    }
}

/// A move's start, under the route lock: refused ([`StoreError::Conflict`]) when the tenant's route in the
/// store is not the one the move read (changed on another instance since), or another instance's unfinished
/// move lands in the same place ([`Record::target_clashes`]).
async fn refuse_clashing_start(
    tx: &tokio_postgres::Transaction<'_>,
    rec: &Record,
) -> Result<(), StoreError> {
    let tenant = rec.tenant.as_str();
    let stored = super::store::latest_route(tx, &rec.tenant).await?;
    if stored.as_ref() != Some(&rec.source) {
        return Err(StoreError::Conflict(format!(
            "the route of tenant {tenant:?} in the control plane is not the one this move read (it changed on \
             another instance); start the move again"
        )));
    }
    let rows = tx
        .query(
            "SELECT record FROM pgtenant_cp.migrations
              WHERE tenant <> $1 AND record->>'state' NOT IN ('completed', 'rolled_back')",
            &[&tenant],
        )
        .await
        .map_err(pg("look up migrations"))?;
    let others = rows
        .into_iter()
        .filter_map(|r| serde_json::from_value::<Record>(r.get(0)).ok());
    if let Some(other) = others.clone().find(|o| rec.target_clashes(o)) {
        return Err(StoreError::Conflict(format!(
            "tenant {:?}'s move (on another instance) lands in the same place ({}, database {:?}, schema {:?})",
            other.tenant.as_str(),
            other.target.backend,
            other.target_database,
            other.target.schema.as_deref().unwrap_or("public")
        )));
    }
    Ok(())
}

/// Whether this instance runs `tenant`'s migration now (so it should not be taken over by itself again).
pub fn runs_here(shared: &Shared, tenant: &str) -> bool {
    shared.migrations.runs_or_starts(tenant)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_trusted_for_a_while_after_its_renewal_was_sent() {
        let clock = LeaseClock::default();
        let acme = TenantId::parse("acme").unwrap();
        assert!(!clock.holds("acme"), "never renewed");
        clock.renewed(&acme, (Instant::now(), SystemTime::now()), 1);
        assert!(clock.holds("acme"));
        assert!(!clock.holds("beta"));
        let long_ago = Duration::from_secs(4);
        let old = (Instant::now() - long_ago, SystemTime::now());
        clock.renewed(&acme, old, 1);
        assert!(
            !clock.holds("acme"),
            "monotonic clock past the trusted time"
        );
        // A machine suspended since: the monotonic clock stood still, the wall clock went on.
        clock.renewed(&acme, (Instant::now(), SystemTime::now() - long_ago), 1);
        assert!(!clock.holds("acme"), "wall clock past the trusted time");
        // A wall clock set back counts as expired.
        clock.renewed(&acme, (Instant::now(), SystemTime::now() + long_ago), 1);
        assert!(!clock.holds("acme"), "wall clock went back");
        clock.lost("acme");
        assert!(!clock.holds("acme"));
    }
}
