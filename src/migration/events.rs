//! What a migration tells webhook receivers (`crate::notify`): every state change, failures, cutover attempts
//! with their pause, and verification results.

use serde_json::{json, Value};

use super::record::{Record, State, VerifyReport};
use crate::context::Shared;

fn sides(rec: &Record) -> Value {
    json!({
        "source": {"backend": rec.source.backend.to_string(), "database": rec.source_database},
        "target": {"backend": rec.target.backend.to_string(), "database": rec.target_database},
        "schema": rec.schema,
    })
}

/// A migration was created (in `pending`).
pub fn started(shared: &Shared, rec: &Record) {
    shared.notifier.emit(
        "migration.state",
        rec.tenant.as_str(),
        json!({
            "from": null,
            "to": rec.state.as_str(),
            "event": "started",
            "migration": sides(rec),
            "started_by": rec.started_by,
        }),
    );
}

/// After `rec` moved from `from` by `event`.
pub fn state_changed(shared: &Shared, rec: &Record, from: State, event: &'static str) {
    let n = &shared.notifier;
    let tenant = rec.tenant.as_str();
    n.emit(
        "migration.state",
        tenant,
        json!({
            "from": from.as_str(),
            "to": rec.state.as_str(),
            "event": event,
            "migration": sides(rec),
            "rows_total": rec.rows_total,
            "rows_copied": rec.rows_copied,
            "bytes_copied": rec.bytes_copied,
        }),
    );
    if rec.state == State::Failed {
        n.emit(
            "migration.failed",
            tenant,
            json!({
                "failed_in": rec.failed_in.map(State::as_str),
                "error": rec.last_error,
                "migration": sides(rec),
            }),
        );
    }
    let outcome = match event {
        "swapped" => "swapped",
        "fell_back" => "fell_back",
        _ => return,
    };
    n.emit(
        "migration.cutover",
        tenant,
        json!({
            "outcome": outcome,
            "pause_ms": rec.last_pause_ms,
            "attempt": rec.cutover_attempts,
            "error": if event == "fell_back" { rec.last_cutover_error.clone() } else { None },
            "migration": sides(rec),
        }),
    );
}

/// After a verification of `tenant`'s migration.
pub fn verified(shared: &Shared, tenant: &str, report: &VerifyReport) {
    shared.notifier.emit(
        "migration.verification",
        tenant,
        json!({
            "level": report.level,
            "passed": report.passed,
            "tables": report.tables,
            "rows": report.rows,
            "duration_ms": report.duration_ms,
            "violations": report.violations.len(),
            "first_violations": report.violations.iter().take(5).collect::<Vec<_>>(),
        }),
    );
}
