//! The migration state machine (DESIGN section 5): the states, the events that move between them, and the one
//! table of legal transitions ([`next`]). [`transition`] is the only way a record's state changes: it checks
//! the table, writes the record to disk (before anything acts on the new state: a failed write is an error the
//! caller must handle, never ignored), then audits it and updates the gauge.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use metrics::Label;
use serde_json::json;
use thiserror::Error;
use tracing::{info, warn};

use super::record::{Record, State};
use super::MigrateError;
use crate::context::Shared;

/// What happened, as far as the migration's state is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Capture is installed on the source: the copy may start.
    CaptureInstalled,
    /// Every table is copied: the tee keeps the target in step from here.
    Copied,
    /// A copy or capture step kept failing.
    StepFailed,
    /// An operator resumed a failed migration, back into the state it failed in.
    Retry(State),
    /// The cutover starts (the tenant is about to be held).
    CutoverStarted,
    /// The route swapped to the target: the point of no return.
    Swapped,
    /// The cutover gave up before the swap: back to dual_write.
    FellBack,
    /// A rollback swapped the route back and cleaned up.
    RolledBack,
    /// The migration ended on the target (`finalize`).
    Finalized,
    /// The migration was abandoned before the swap (`abort`).
    Aborted,
}

impl Event {
    /// The event's name in notifications.
    pub fn name(self) -> &'static str {
        match self {
            Event::CaptureInstalled => "capture_installed",
            Event::Copied => "copied",
            Event::StepFailed => "step_failed",
            Event::Retry(_) => "retry",
            Event::CutoverStarted => "cutover_started",
            Event::Swapped => "swapped",
            Event::FellBack => "fell_back",
            Event::RolledBack => "rolled_back",
            Event::Finalized => "finalized",
            Event::Aborted => "aborted",
        }
    }
}

/// An event that is not legal in a state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("{event:?} is not possible in state {}", state.as_str())]
pub struct Refused {
    pub state: State,
    pub event: Event,
}

/// The transition table: the state `event` leads to from `state`.
pub fn next(state: State, event: Event) -> Result<State, Refused> {
    use Event as E;
    use State as S;
    let to = match (state, event) {
        (S::Pending, E::CaptureInstalled) => S::BulkCopy,
        (S::BulkCopy, E::Copied) => S::DualWrite,
        (S::Pending | S::BulkCopy, E::StepFailed) => S::Failed,
        (S::Failed, E::Retry(to @ (S::Pending | S::BulkCopy))) => to,
        (S::DualWrite, E::CutoverStarted) => S::CutoverPaused,
        (S::CutoverPaused, E::Swapped) => S::Migrated,
        (S::CutoverPaused, E::FellBack) => S::DualWrite,
        (S::Migrated, E::RolledBack) => S::RolledBack,
        (S::Migrated, E::Finalized) => S::Completed,
        (S::Pending | S::BulkCopy | S::DualWrite | S::CutoverPaused | S::Failed, E::Aborted) => {
            S::RolledBack
        }
        _ => return Err(Refused { state, event }),
    };
    Ok(to)
}

/// [`transition`] on a blocking thread. Its writes (the record, the audit line, the history) each end in an
/// fsync, which on a busy disk can take tens of milliseconds; the cutover runs on a thread that serves every
/// tenant's clients (the only one on small machines), and the tenant's own held transactions, released just
/// before, would wait behind them.
pub async fn transition_off_thread(
    shared: &Arc<Shared>,
    tenant: &str,
    event: Event,
    f: impl FnOnce(&mut Record) + Send + 'static,
) -> Result<Record, MigrateError> {
    let (shared, tenant, span) = (shared.clone(), tenant.to_owned(), tracing::Span::current());
    tokio::task::spawn_blocking(move || span.in_scope(|| transition(&shared, &tenant, event, f)))
        .await
        .map_err(|e| MigrateError::state_thread("state write", e))?
}

/// Moves `tenant`'s migration by `event` (checked against [`next`]), applying `f` to the record on the way;
/// persisted, then audited.
pub fn transition(
    shared: &Shared,
    tenant: &str,
    event: Event,
    f: impl FnOnce(&mut Record),
) -> Result<Record, MigrateError> {
    let before = shared
        .migrations
        .get(tenant)
        .ok_or_else(|| MigrateError::Refused(format!("no migration for tenant {tenant:?}")))?
        .state;
    let to = next(before, event).map_err(|e| MigrateError::Refused(e.to_string()))?;
    let rec = shared.migrations.update(tenant, |r| {
        r.state = to;
        r.entered.push((to, super::record::now_ms()));
        f(r)
    })?;
    info!(%tenant, from = before.as_str(), to = to.as_str(), ?event, "migration state");
    if let Err(e) = shared.audit.append(
        "migration",
        "migrate.state",
        Some(tenant),
        json!({"state": before.as_str()}),
        json!({"state": to.as_str()}),
        "ok",
    ) {
        shared.audit_ok.store(false, Ordering::Relaxed);
        warn!(%tenant, error = %e, "audit write failed for a migration transition");
    }
    set_state_gauge(shared, &rec);
    super::events::state_changed(shared, &rec, before, event.name());
    if to.is_final() {
        let keep = shared.config.load().migration.history_keep;
        if let Err(e) = shared.migrations.history.append(
            &super::history::HistoryEntry::of(&rec, outcome(event, &rec)),
            keep,
        ) {
            // The move itself is done and recorded; only its line in the history is missing.
            warn!(%tenant, error = %e, "could not add the migration to the history");
        }
    }
    Ok(rec)
}

/// How a migration that `event` brought to a final state ended: an abort of a failed one is a failure.
fn outcome(event: Event, rec: &Record) -> super::history::Outcome {
    use super::history::Outcome;
    let from = rec.entered.iter().rev().nth(1).map(|(s, _)| *s);
    match event {
        Event::Finalized => Outcome::Completed,
        Event::RolledBack => Outcome::RolledBack,
        _ if from == Some(State::Failed) => Outcome::Failed,
        _ => Outcome::Aborted,
    }
}

pub(super) fn labels(tenant: &str) -> Vec<Label> {
    vec![Label::new("tenant", tenant.to_owned())]
}

pub fn set_state_gauge(shared: &Shared, rec: &Record) {
    let m = &shared.metrics;
    let state = if rec.paused && !rec.state.is_final() {
        8.0
    } else {
        rec.state.code()
    };
    m.gauge("migration_state", labels(&rec.tenant)).set(state);
    m.gauge("migration_progress_percent", labels(&rec.tenant))
        .set(rec.progress_percent(0));
    m.gauge("migration_events_total", labels(&rec.tenant))
        .set(rec.rows_total as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATES: [State; 8] = [
        State::Pending,
        State::BulkCopy,
        State::DualWrite,
        State::CutoverPaused,
        State::Migrated,
        State::Completed,
        State::Failed,
        State::RolledBack,
    ];

    fn events() -> Vec<Event> {
        let mut v = vec![
            Event::CaptureInstalled,
            Event::Copied,
            Event::StepFailed,
            Event::CutoverStarted,
            Event::Swapped,
            Event::FellBack,
            Event::RolledBack,
            Event::Finalized,
            Event::Aborted,
        ];
        v.extend(STATES.iter().map(|s| Event::Retry(*s)));
        v
    }

    /// Every legal transition, and nothing else.
    const LEGAL: &[(State, Event, State)] = &[
        (State::Pending, Event::CaptureInstalled, State::BulkCopy),
        (State::BulkCopy, Event::Copied, State::DualWrite),
        (State::Pending, Event::StepFailed, State::Failed),
        (State::BulkCopy, Event::StepFailed, State::Failed),
        (State::Failed, Event::Retry(State::Pending), State::Pending),
        (
            State::Failed,
            Event::Retry(State::BulkCopy),
            State::BulkCopy,
        ),
        (
            State::DualWrite,
            Event::CutoverStarted,
            State::CutoverPaused,
        ),
        (State::CutoverPaused, Event::Swapped, State::Migrated),
        (State::CutoverPaused, Event::FellBack, State::DualWrite),
        (State::Migrated, Event::RolledBack, State::RolledBack),
        (State::Migrated, Event::Finalized, State::Completed),
        (State::Pending, Event::Aborted, State::RolledBack),
        (State::BulkCopy, Event::Aborted, State::RolledBack),
        (State::DualWrite, Event::Aborted, State::RolledBack),
        (State::CutoverPaused, Event::Aborted, State::RolledBack),
        (State::Failed, Event::Aborted, State::RolledBack),
    ];

    #[test]
    fn every_legal_transition_leads_where_the_table_says() {
        for (from, event, to) in LEGAL {
            assert_eq!(next(*from, *event), Ok(*to), "{from:?} {event:?}");
        }
    }

    #[test]
    fn every_other_pair_is_refused() {
        let mut refused = 0;
        for state in STATES {
            for event in events() {
                if LEGAL.iter().any(|(f, e, _)| *f == state && *e == event) {
                    continue;
                }
                assert_eq!(next(state, event), Err(Refused { state, event }));
                refused += 1;
            }
        }
        // 8 states x 17 events, less the legal ones.
        assert_eq!(refused, 8 * 17 - LEGAL.len());
    }

    #[test]
    fn ended_migrations_take_no_event() {
        for state in [State::Completed, State::RolledBack] {
            assert!(events().iter().all(|e| next(state, *e).is_err()));
        }
    }

    #[test]
    fn a_finished_migration_is_named_by_how_it_ended() {
        use crate::migration::history::Outcome;
        let mut rec = Record::for_tests("acme");
        rec.entered = vec![
            (State::Pending, 0),
            (State::Failed, 5),
            (State::RolledBack, 9),
        ];
        assert_eq!(outcome(Event::Aborted, &rec), Outcome::Failed);
        rec.entered = vec![
            (State::Pending, 0),
            (State::DualWrite, 5),
            (State::RolledBack, 9),
        ];
        assert_eq!(outcome(Event::Aborted, &rec), Outcome::Aborted);
        assert_eq!(outcome(Event::RolledBack, &rec), Outcome::RolledBack);
        assert_eq!(outcome(Event::Finalized, &rec), Outcome::Completed);
    }
}
