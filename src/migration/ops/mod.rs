//! The `migrate.*` operations the admin socket runs: start (with its preflight), status, pause/resume, verify,
//! repair, cutover, rollback, finalize and abort.

mod lifecycle;
mod repair;
mod start;
mod status;

use std::sync::Arc;

use serde_json::{json, Value};

use super::record::Record;
use super::registry::Live;
use super::MigrateError;
use crate::context::Shared;
use crate::routing::Route;

pub use lifecycle::{abort, cutover_cmd, finalize, rollback_cmd, verify_cmd};
pub use repair::repair;
pub use start::{start, StartRequest};
pub use status::{set_paused, status};

/// An operation's refusal: a stable code and a message.
#[derive(Debug)]
pub struct OpError {
    pub code: &'static str,
    pub message: String,
}

impl OpError {
    pub(crate) fn new(code: &'static str, message: impl Into<String>) -> OpError {
        OpError {
            code,
            message: message.into(),
        }
    }
}

impl From<MigrateError> for OpError {
    fn from(e: MigrateError) -> OpError {
        let code = match &e {
            MigrateError::Refused(_) => "invalid_state",
            MigrateError::Timeout(_) => "timeout",
            MigrateError::State(_) => "state_write_failed",
            _ => "migration_failed",
        };
        OpError::new(code, e.to_string())
    }
}

pub(super) fn preflight(e: impl std::fmt::Display) -> OpError {
    OpError::new("preflight_failed", e.to_string())
}

pub(crate) fn live_of(shared: &Shared, tenant: &str) -> Result<(Record, Arc<Live>), OpError> {
    let rec = shared.migrations.get(tenant).ok_or_else(|| {
        OpError::new(
            "no_migration",
            format!("tenant {tenant:?} has no migration"),
        )
    })?;
    let live = shared.migrations.live(tenant).ok_or_else(|| {
        OpError::new(
            "invalid_state",
            format!(
                "the migration of {tenant:?} has ended ({})",
                rec.state.as_str()
            ),
        )
    })?;
    Ok((rec, live))
}

pub(super) fn route_json(r: &Route, database: &str) -> Value {
    json!({"backend": r.backend, "database": database, "schema": r.schema})
}
