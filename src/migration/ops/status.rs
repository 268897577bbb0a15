//! `migrate status` and `migrate pause|resume`.

use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use super::{live_of, route_json, OpError};
use crate::context::Shared;
use crate::migration::machine::{set_state_gauge, transition, Event};
use crate::migration::record::{Record, State};
use crate::migration::registry::Direction;

/// `migrate status [T]`.
pub fn status(shared: &Shared, tenant: Option<&str>) -> Result<Value, OpError> {
    match tenant {
        Some(t) => {
            let rec = shared.migrations.get(t).ok_or_else(|| {
                OpError::new("no_migration", format!("tenant {t:?} has no migration"))
            })?;
            Ok(status_json(shared, &rec))
        }
        None => {
            let all: Vec<Value> = shared
                .migrations
                .all()
                .iter()
                .map(|r| status_json(shared, r))
                .collect();
            Ok(json!({"migrations": all}))
        }
    }
}

fn status_json(shared: &Shared, rec: &Record) -> Value {
    let live = shared.migrations.live(&rec.tenant);
    let partial = live
        .as_ref()
        .map_or(0, |l| l.partial_rows.load(Ordering::Relaxed));
    let tee = live.as_ref().and_then(|l| l.tee());
    let in_flight = if rec.state == State::BulkCopy {
        partial
    } else {
        0
    };
    let rows_copied = rec.rows_copied + in_flight;
    let progress = rec.progress_percent(in_flight);
    json!({
        "tenant": rec.tenant,
        "state": rec.shown_state(),
        "phase": rec.state.as_str(),
        "paused": rec.paused,
        "failed_in": rec.failed_in.map(State::as_str),
        "source": route_json(&rec.source, &rec.source_database),
        "target": route_json(&rec.target, &rec.target_database),
        "progress_percent": (progress * 10.0).round() / 10.0,
        "rows_copied": rows_copied,
        "rows_total": rec.rows_total,
        "tables": rec.tables,
        "tables_copied": rec.copied.len(),
        "lag_events": tee.as_ref().map_or(0, |(_, t)| t.lag()),
        "tee": tee.as_ref().map(|(d, t)| json!({
            "direction": if *d == Direction::Forward { "source_to_target" } else { "target_to_source" },
            "mode": shared.config.load().migration.tee,
            "last_error": t.last_error(),
        })),
        "last_pause_ms": rec.last_pause_ms,
        "cutover_attempts": rec.cutover_attempts,
        "last_cutover_error": rec.last_cutover_error,
        "cutover": rec.cutover,
        "verify_level": rec.verify,
        "verification": rec.verification,
        "last_error": rec.last_error,
        "started_at": rec.started_at,
        "updated_at": rec.updated_at,
    })
}

/// `migrate pause T` / `migrate resume T`: hold or restart copy and tee work (not the tenant's traffic). Resume
/// of a `failed` migration retries from the state it failed in.
pub fn set_paused(shared: &Shared, tenant: &str, paused: bool) -> Result<Value, OpError> {
    let (rec, live) = live_of(shared, tenant)?;
    if rec.state == State::Failed && !paused {
        let from = rec.failed_in.unwrap_or(State::Pending);
        transition(shared, tenant, Event::Retry(from), |r| {
            r.failed_in = None;
            r.paused = false;
        })?;
        return Ok(json!({"tenant": tenant, "state": from.as_str(), "retried": true}));
    }
    if !matches!(
        rec.state,
        State::Pending | State::BulkCopy | State::DualWrite | State::Migrated
    ) {
        return Err(OpError::new(
            "invalid_state",
            format!(
                "cannot pause or resume a migration in {}",
                rec.shown_state()
            ),
        ));
    }
    let rec = shared.migrations.update(tenant, |r| r.paused = paused)?;
    if let Some((_, t)) = live.tee() {
        t.set_paused(paused);
    }
    set_state_gauge(shared, &rec);
    Ok(json!({"tenant": tenant, "state": rec.shown_state(), "paused": paused}))
}
