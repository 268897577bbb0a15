//! `migrate status` and `migrate pause|resume`.

use std::sync::atomic::Ordering;

use super::live_of;
use super::reply::{Place, Status, StatusList, TeeView, WorkPaused};
use crate::admin::code::AdminError;
use crate::context::Shared;
use crate::migration::machine::{set_state_gauge, transition, Event};
use crate::migration::record::{Record, State};
use crate::migration::registry::Direction;
use crate::tenant::TenantId;

/// `migrate status T`.
pub fn status_of(shared: &Shared, tenant: &TenantId) -> Result<Status, AdminError> {
    let rec = shared
        .migrations
        .get(tenant.as_str())
        .ok_or_else(|| AdminError::no_migration(tenant.as_str()))?;
    Ok(status(shared, &rec))
}

/// `migrate status`.
pub fn status_all(shared: &Shared) -> StatusList {
    StatusList {
        migrations: shared
            .migrations
            .all()
            .iter()
            .map(|r| status(shared, r))
            .collect(),
    }
}

fn status(shared: &Shared, rec: &Record) -> Status {
    let live = shared.migrations.live(rec.tenant.as_str());
    let partial = live
        .as_ref()
        .map_or(0, |l| l.partial_rows.load(Ordering::Relaxed));
    let tee = live.as_ref().and_then(|l| l.tee());
    let in_flight = if rec.state == State::BulkCopy {
        partial
    } else {
        0
    };
    let progress = rec.progress_percent(in_flight);
    Status {
        tenant: rec.tenant.clone(),
        state: rec.shown_state().to_owned(),
        phase: rec.state.as_str().to_owned(),
        paused: rec.paused,
        failed_in: rec.failed_in.map(|s| s.as_str().to_owned()),
        source: Place::source(rec),
        target: Place::target(rec),
        progress_percent: (progress * 10.0).round() / 10.0,
        rows_copied: rec.rows_copied + in_flight,
        rows_total: rec.rows_total,
        tables: rec.tables.clone(),
        tables_copied: rec.copied.len(),
        lag_events: tee.as_ref().map_or(0, |(_, t)| t.lag()),
        tee: tee.as_ref().map(|(d, t)| TeeView {
            direction: match d {
                Direction::Forward => "source_to_target",
                _ => "target_to_source",
            }
            .to_owned(),
            mode: shared.config.load().migration.tee,
            last_error: t.last_error(),
        }),
        cutover_window: rec.cutover_window.clone(),
        last_pause_ms: rec.last_pause_ms,
        cutover_attempts: rec.cutover_attempts,
        last_cutover_error: rec.last_cutover_error.clone(),
        cutover: rec.cutover,
        verify_level: rec.verify,
        verification: rec.verification.clone(),
        last_error: rec.last_error.clone(),
        started_at: rec.started_at.clone(),
        updated_at: rec.updated_at.clone(),
        steps: steps(rec),
    }
}

/// Time in each state so far: closed stays from the record's entry times, the current one up to now.
fn steps(rec: &Record) -> Vec<crate::migration::history::Stay> {
    // A finished move's last state has no duration.
    let now = match rec.entered.last() {
        Some((_, t)) if rec.state.is_final() => *t,
        _ => crate::migration::record::now_ms(),
    };
    let ends = rec
        .entered
        .iter()
        .skip(1)
        .map(|(_, t)| *t)
        .chain(std::iter::once(now));
    rec.entered
        .iter()
        .zip(ends)
        .map(|((state, from), to)| crate::migration::history::Stay {
            state: *state,
            seconds: to.saturating_sub(*from) as f64 / 1000.0,
        })
        .collect()
}

/// `migrate pause T` / `migrate resume T`: hold or restart copy and tee work (not the tenant's traffic). Resume
/// of a `failed` migration retries from the state it failed in.
pub fn set_paused(
    shared: &Shared,
    tenant: &TenantId,
    paused: bool,
) -> Result<WorkPaused, AdminError> {
    let (rec, live) = live_of(shared, tenant)?;
    if rec.state == State::Failed && !paused {
        let from = rec.failed_in.unwrap_or(State::Pending);
        transition(shared, tenant, Event::Retry(from), |r| {
            r.failed_in = None;
            r.paused = false;
        })?;
        return Ok(WorkPaused {
            tenant: tenant.clone(),
            state: from.as_str().to_owned(),
            paused: false,
            retried: true,
        });
    }
    if !matches!(
        rec.state,
        State::Pending | State::BulkCopy | State::DualWrite | State::Migrated
    ) {
        return Err(AdminError::invalid_state(format!(
            "cannot pause or resume a migration in {}",
            rec.shown_state()
        )));
    }
    let rec = shared
        .migrations
        .update(tenant.as_str(), |r| r.paused = paused)?;
    if let Some((_, t)) = live.tee() {
        t.set_paused(paused);
    }
    set_state_gauge(shared, &rec);
    Ok(WorkPaused {
        tenant: tenant.clone(),
        state: rec.shown_state().to_owned(),
        paused,
        retried: false,
    })
}

/// `migrate history [--tenant T] [--since D] [--limit N]`: finished moves, newest first, with the summary over
/// everything kept.
pub fn history(
    shared: &Shared,
    args: &crate::admin::request::HistoryArgs,
) -> Result<super::reply::HistoryView, AdminError> {
    use crate::migration::history::{parse_since, Summary};
    let now = crate::migration::history::now_ms() / 1000;
    let since = match &args.since {
        Some(text) => Some(parse_since(text, now).ok_or_else(|| {
            AdminError::invalid(format!(
                "since {text:?} is neither a date (2026-12-01) nor a span back from now (7d, 12h, 30m)"
            ))
        })?),
        None => None,
    };
    let all = shared.migrations.history.read().map_err(|e| {
        AdminError::new(
            crate::admin::code::AdminCode::StateReadFailed,
            e.to_string(),
        )
    })?;
    let active = shared
        .migrations
        .all()
        .iter()
        .filter(|r| !r.state.is_final())
        .count();
    let summary = Summary::of(&all, active, now);
    let entries = all
        .into_iter()
        .rev()
        .filter(|e| args.tenant.as_ref().is_none_or(|t| &e.tenant == t))
        .filter(|e| since.is_none_or(|s| e.ended_unix >= s))
        .take(args.limit.unwrap_or(100))
        .collect();
    Ok(super::reply::HistoryView { summary, entries })
}
