//! The two sides of a migration and the tee between them: connecting to each side as the migration, the tee
//! started and stopped in the direction the state calls for, and the tables' definitions.

use std::sync::Arc;
use std::time::Duration;

use metrics::Label;

use super::catalog;
use super::machine::labels;
use super::pg::{Endpoint, Filter};
use super::record::{Record, State};
use super::registry::{Direction, Live};
use super::tee::{Tee, TeeMetrics, TeeSpec};
use super::MigrateError;
use crate::context::Shared;
use crate::routing::BackendId;

/// The two endpoints of a record, from the configured backends.
pub fn endpoints(shared: &Shared, rec: &Record) -> Result<(Endpoint, Endpoint), MigrateError> {
    let backends = shared.backends.load();
    let side = |backend: &BackendId, database: &str, schema: &str| {
        let b = backends.get(backend).ok_or_else(|| {
            MigrateError::Refused(format!("backend {backend:?} is no longer configured"))
        })?;
        Ok::<_, MigrateError>(Endpoint {
            backend: backend.clone(),
            config: b.config.clone(),
            database: database.to_owned(),
            schema: schema.to_owned(),
            filter: rec.tenant_column.as_ref().map(|column| Filter {
                column: column.clone(),
                key: rec
                    .tenant_key
                    .clone()
                    .unwrap_or_else(|| rec.tenant.to_string()),
            }),
        })
    };
    let target_schema = rec.target.schema.as_deref().unwrap_or(&rec.schema);
    Ok((
        side(&rec.source.backend, &rec.source_database, &rec.schema)?,
        side(&rec.target.backend, &rec.target_database, target_schema)?,
    ))
}

/// Starts (or replaces) the tee of `live` in `dir`, and publishes it to sessions.
pub async fn start_tee(
    shared: &Arc<Shared>,
    live: &Live,
    rec: &Record,
    dir: Direction,
) -> Result<Arc<Tee>, MigrateError> {
    if let Some((d, t)) = live.tee() {
        if d == dir {
            return Ok(t);
        }
        stop_tee(shared, live).await;
    }
    let (source, target) = endpoints(shared, rec)?;
    let (from, to) = match dir {
        Direction::Forward => (source, target),
        Direction::Reverse => (target, source),
    };
    let cfg = shared.config.load();
    let m = &shared.metrics;
    let t = &rec.tenant;
    let status = |s: &str| {
        vec![
            Label::new("tenant", t.to_string()),
            Label::new("status", s.to_owned()),
        ]
    };
    let metrics = TeeMetrics {
        ok: m.counter("dual_write_operations_total", status("ok")),
        failed: m.counter("dual_write_operations_total", status("failed")),
        target_failures: m.counter("dual_write_target_failures_total", labels(t)),
        latency: m.histogram("dual_write_latency_seconds", labels(t)),
        lag: m.gauge("dual_write_sync_lag_events", labels(t)),
    };
    let spec = TeeSpec {
        tenant: rec.tenant.clone(),
        from,
        to,
        tables: live.tables(),
        mode: cfg.migration.tee,
        timeout: Duration::from_millis(cfg.migration.tee_timeout_ms),
        interval: Duration::from_millis(cfg.migration.catchup_interval_ms.max(10)),
        failpoints: shared.migrations.failpoints.clone(),
        lease: shared.control_plane.get().map(|cp| cp.lease_clock.clone()),
    };
    let tee = Tee::start(spec, metrics, rec.paused);
    *live.tee.lock().unwrap_or_else(|p| p.into_inner()) = Some((dir, tee.clone()));
    shared
        .migrations
        .publish_tee(&rec.tenant, Some(tee.clone()));
    Ok(tee)
}

/// Unpublishes and stops the tee of `live`; returns once no pass of it is in flight.
pub async fn stop_tee(shared: &Shared, live: &Live) {
    shared.migrations.publish_tee(&live.tenant, None);
    let tee = live.tee.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some((_, t)) = tee {
        t.stop().await;
    }
}

/// Loads the source tables of `rec` into `live`.
pub async fn load_tables(shared: &Shared, live: &Live, rec: &Record) -> Result<(), MigrateError> {
    let (source, _) = endpoints(shared, rec)?;
    let client = source.connect().await?;
    let mut tables = catalog::tables(&client, &source.schema).await?;
    tables.retain(|t| rec.tables.contains(&t.name));
    *live.tables.lock().unwrap_or_else(|p| p.into_inner()) = tables;
    Ok(())
}

/// The tee of the migration's running state, started now if the driver has not yet (a command right after a
/// restart must not be refused because the driver's first tick has not come). Call under `live.lock`.
pub async fn ensure_tee(
    shared: &Arc<Shared>,
    live: &Live,
    rec: &Record,
) -> Result<Arc<Tee>, MigrateError> {
    let dir = match rec.state {
        State::DualWrite | State::CutoverPaused => Direction::Forward,
        State::Migrated => Direction::Reverse,
        _ => {
            return Err(MigrateError::Refused(format!(
                "the tee runs in dual_write and migrated; the migration is {}",
                rec.shown_state()
            )))
        }
    };
    if live.tables().is_empty() {
        load_tables(shared, live, rec).await?;
    }
    start_tee(shared, live, rec, dir).await
}

/// Whether this instance may act on `tenant`'s move: always without a control plane; with one, while its lease
/// is confirmed (see [`crate::cluster::leases::LeaseClock`]).
pub fn lease_held(shared: &Shared, tenant: &str) -> bool {
    shared
        .control_plane
        .get()
        .is_none_or(|cp| cp.lease_clock.holds(tenant))
}
