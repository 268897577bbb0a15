//! The cutover barrier across instances. The instance that cuts a tenant over (the coordinator) writes a
//! barrier row in phase `close`; every other live instance (heartbeat within 5 s) closes its own gate of the
//! tenant and acknowledges `drained` once its open transactions of the tenant have finished. Only when every
//! live instance has done so within the cutover timeout does the coordinator drain, fence and swap the route
//! (written through the store); it then sets the phase to `open`, and each instance applies the routes up to
//! the swap before it opens its gate (acknowledging `opened` with how long it held). A timeout sets `abort`:
//! gates reopen onto the source and the migration stays in dual_write. An instance that loses the control
//! plane while holding keeps its gate closed (its clients wait, then get the gate timeout) rather than guess.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::plane::ControlPlane;
use super::store::{pg, StoreError};
use crate::context::Shared;
use crate::tenant::TenantId;

async fn notify(c: &Client) -> Result<(), StoreError> {
    c.execute("SELECT pg_notify($1, 'barrier')", &[&super::store::CHANNEL])
        .await
        .map_err(pg("notify"))?;
    Ok(())
}

impl ControlPlane {
    /// A new barrier attempt's number (the caller keeps it, so the release names the attempt it ends even
    /// when the hold failed halfway).
    pub fn new_attempt() -> i64 {
        crate::migration::record::now_ms() as i64
    }

    /// Coordinator: asks every other live instance to hold `tenant` for barrier `attempt` and waits until each
    /// has drained, until `deadline`.
    pub async fn hold_everywhere(
        &self,
        tenant: &TenantId,
        attempt: i64,
        deadline: Instant,
    ) -> Result<(), StoreError> {
        let left_ms = deadline
            .saturating_duration_since(Instant::now())
            .as_millis() as f64;
        let (id, t) = (self.id.clone(), tenant.to_string());
        self.with_client(async move |c| {
            c.execute(
                "INSERT INTO pgtenant_cp.barriers (tenant, attempt, coordinator, phase, deadline)
                 VALUES ($1, $2, $3, 'close', now() + $4 * interval '1 millisecond')
                 ON CONFLICT (tenant) DO UPDATE SET attempt = EXCLUDED.attempt, coordinator = EXCLUDED.coordinator,
                   phase = 'close', deadline = EXCLUDED.deadline, created_at = now()",
                &[&t, &attempt, &id, &left_ms],
            )
            .await
            .map_err(pg("write barrier"))?;
            notify(c).await
        })
        .await?;
        loop {
            let (id, t) = (self.id.clone(), tenant.to_string());
            let missing: i64 = self
                .with_client(async move |c| {
                    Ok(c.query_one(
                        "SELECT count(*) FROM pgtenant_cp.instances i
                          WHERE i.heartbeat_at > now() - interval '5 seconds' AND i.id <> $1
                            AND NOT EXISTS (SELECT 1 FROM pgtenant_cp.barrier_acks a WHERE a.tenant = $2
                                 AND a.attempt = $3 AND a.instance = i.id AND a.state = 'drained')",
                        &[&id, &t, &attempt],
                    )
                    .await
                    .map_err(pg("read barrier acks"))?
                    .get(0))
                })
                .await?;
            if missing == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StoreError::Pg(format!(
                    "{missing} instance(s) did not hold tenant {tenant} within the cutover timeout"
                )));
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }

    /// Coordinator: ends barrier `attempt`: `open` after the swap (the route is in the store already), `abort`
    /// after a fallback. Only that attempt's row is changed, so a late retry never ends a newer barrier.
    pub async fn release_everywhere(
        &self,
        tenant: &TenantId,
        attempt: i64,
        phase: &'static str,
    ) -> Result<(), StoreError> {
        let (t, id) = (tenant.to_string(), self.id.clone());
        self.with_client(async move |c| {
            c.execute(
                "UPDATE pgtenant_cp.barriers SET phase = $3 WHERE tenant = $1 AND coordinator = $2 AND attempt = $4",
                &[&t, &id, &phase, &attempt],
            )
            .await
            .map_err(pg("release barrier"))?;
            notify(c).await
        })
        .await
    }

    /// The move's coordinator after a restart or a takeover (resumed at `resumed_ms`): ends `tenant`'s barrier
    /// still closed by an earlier coordinator, whichever instance and attempt it was (true if there was one).
    /// Only while this process holds the move's lease, and never a barrier this instance started since.
    pub async fn end_barrier(
        &self,
        tenant: &TenantId,
        phase: &'static str,
        resumed_ms: i64,
    ) -> Result<bool, StoreError> {
        let (t, id, me) = (
            tenant.to_string(),
            self.id.clone(),
            self.incarnation.clone(),
        );
        self.with_client(async move |c| {
            let n = c
                .execute(
                    "UPDATE pgtenant_cp.barriers SET phase = $2 WHERE tenant = $1 AND phase = 'close'
                       AND NOT (coordinator = $3 AND attempt >= $4)
                       AND EXISTS (SELECT 1 FROM pgtenant_cp.migrations m
                                    WHERE m.tenant = $1 AND m.holder = $3 AND m.incarnation = $5)",
                    &[&t, &phase, &id, &resumed_ms, &me],
                )
                .await
                .map_err(pg("end barrier"))?;
            if n > 0 {
                notify(c).await?;
            }
            Ok(n > 0)
        })
        .await
    }

    /// Every instance: follows the other coordinators' barriers (called on each notification and tick).
    pub async fn follow_barriers(&self, shared: &Arc<Shared>) -> Result<(), StoreError> {
        let id = self.id.clone();
        let rows: Vec<(String, i64, String, f64)> = self
            .with_client(async move |c| {
                let rows = c
                    .query(
                        "SELECT tenant, attempt, phase, extract(epoch FROM deadline - now())::float8
                           FROM pgtenant_cp.barriers WHERE coordinator <> $1",
                        &[&id],
                    )
                    .await
                    .map_err(pg("read barriers"))?;
                Ok(rows
                    .iter()
                    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
                    .collect())
            })
            .await?;
        let mut seen = Vec::new();
        for (tenant, attempt, phase, left_s) in rows {
            let Ok(tenant) = TenantId::parse(&tenant) else {
                continue;
            };
            seen.push(tenant.clone());
            match phase.as_str() {
                "close" => self.close_for(shared, &tenant, attempt, left_s),
                _ => self.open_for(shared, &tenant, attempt).await,
            }
        }
        // A barrier that is gone (its coordinator finished and cleaned up) holds nothing any more.
        let stale: Vec<(TenantId, i64)> = {
            let held = self.held.0.lock().unwrap_or_else(|p| p.into_inner());
            held.iter()
                .filter(|(t, _)| !seen.contains(t))
                .map(|(t, (a, _, _))| (t.clone(), *a))
                .collect()
        };
        for (t, a) in stale {
            self.open_for(shared, &t, a).await;
        }
        Ok(())
    }

    /// Closes this instance's gate of `tenant` for barrier `attempt` and acknowledges once drained.
    fn close_for(&self, shared: &Arc<Shared>, tenant: &TenantId, attempt: i64, left_s: f64) {
        let mut held = self.held.0.lock().unwrap_or_else(|p| p.into_inner());
        if held.get(tenant).is_some_and(|(a, _, _)| *a == attempt) || left_s <= 0.0 {
            return;
        }
        let gate = shared.gates.get(tenant);
        // A newer attempt over one still held (its release was late) inherits whether this instance closed the
        // gate, so its release opens it.
        let newly = gate.close() || held.get(tenant).is_some_and(|(_, _, ours)| *ours);
        held.insert(tenant.clone(), (attempt, Instant::now(), newly));
        let (shared, tenant) = (shared.clone(), tenant.clone());
        tokio::spawn(async move {
            if !gate.wait_drained(Duration::from_secs_f64(left_s)).await {
                return; // the coordinator times out and aborts
            }
            let Some(cp) = shared.control_plane.get() else {
                return;
            };
            let (id, t) = (cp.id.clone(), tenant.to_string());
            let r = cp
                .with_client(async move |c| {
                    c.execute(
                        "INSERT INTO pgtenant_cp.barrier_acks (tenant, attempt, instance, state)
                         VALUES ($1, $2, $3, 'drained') ON CONFLICT DO NOTHING",
                        &[&t, &attempt, &id],
                    )
                    .await
                    .map_err(pg("acknowledge barrier"))?;
                    notify(c).await
                })
                .await;
            if let Err(e) = r {
                tracing::warn!(%tenant, error = %e, "could not acknowledge the cutover barrier");
            }
        });
    }

    /// The barrier of `tenant` ended: apply the routes (the swap, if it happened), then open the gate this
    /// instance closed for it, and record how long it held.
    async fn open_for(&self, shared: &Arc<Shared>, tenant: &TenantId, attempt: i64) {
        let entry = {
            let held = self.held.0.lock().unwrap_or_else(|p| p.into_inner());
            held.get(tenant).copied().filter(|(a, _, _)| *a == attempt)
        };
        let Some((_, closed_at, newly)) = entry else {
            return;
        };
        if let Err(e) = self.sync(shared).await {
            tracing::warn!(%tenant, error = %e, "holding the tenant: the routes of the cutover could not be read");
            return;
        }
        if newly {
            shared.gates.get(tenant).open();
        }
        self.held
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tenant);
        let held_ms = closed_at.elapsed().as_secs_f64() * 1000.0;
        let (id, t) = (self.id.clone(), tenant.to_string());
        let _ = self
            .with_client(async move |c| {
                c.execute(
                    "INSERT INTO pgtenant_cp.barrier_acks (tenant, attempt, instance, state, held_ms)
                     VALUES ($1, $2, $3, 'opened', $4) ON CONFLICT DO NOTHING",
                    &[&t, &attempt, &id, &held_ms],
                )
                .await
                .map_err(pg("acknowledge barrier"))
                .map(|_| ())
            })
            .await;
        tracing::info!(%tenant, held_ms, "cutover barrier released");
    }
}
