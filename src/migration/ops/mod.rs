//! The `migrate.*` operations the admin socket runs: start (with its preflight), status, pause/resume, verify,
//! repair, cutover, rollback, finalize and abort. Each answers with a typed reply ([`reply`]) or an
//! [`AdminError`] with a stable code.

mod drops;
mod estimate;
mod lifecycle;
mod repair;
pub mod reply;
pub mod request;
mod schedule;
mod start;
mod status;

use std::sync::Arc;

use super::record::Record;
use super::registry::Live;
use super::MigrateError;
use crate::admin::code::{AdminCode, AdminError};
use crate::context::Shared;
use crate::tenant::TenantId;

pub use drops::{cancel_drop, drops, run_due as run_due_drops, DropList};
pub use estimate::estimate;
pub use lifecycle::{abort, cutover_cmd, finalize, rollback_cmd, verify_cmd};
pub use repair::repair;
pub use request::StartRequest;
pub use schedule::run_queue;
pub use schedule::{cancel, enqueue, queue};
pub(crate) use start::grant_target;
pub use start::start;
pub use status::{history, set_paused, status_all, status_of};

impl From<MigrateError> for AdminError {
    fn from(e: MigrateError) -> AdminError {
        let code = match &e {
            MigrateError::Refused(_) => AdminCode::InvalidState,
            MigrateError::Timeout(_) => AdminCode::Timeout,
            MigrateError::State(_) => AdminCode::StateWriteFailed,
            _ => AdminCode::MigrationFailed,
        };
        AdminError::new(code, e.to_string())
    }
}

pub(super) fn preflight(e: impl std::fmt::Display) -> AdminError {
    AdminError::new(AdminCode::PreflightFailed, e.to_string())
}

pub(crate) fn live_of(
    shared: &Shared,
    tenant: &TenantId,
) -> Result<(Record, Arc<Live>), AdminError> {
    let rec = shared
        .migrations
        .get(tenant.as_str())
        .ok_or_else(|| AdminError::no_migration(tenant.as_str()))?;
    let live = shared.migrations.live(tenant.as_str()).ok_or_else(|| {
        AdminError::invalid_state(format!(
            "the migration of {tenant:?} has ended ({})",
            rec.state.as_str()
        ))
    })?;
    lease_confirmed(shared, tenant)?;
    Ok((rec, live))
}

/// With a control plane, a command acts on a move only while this instance's lease on it is confirmed (see
/// [`crate::cluster::leases::LeaseClock`]): one cut off from the store may have been replaced by now.
pub(crate) fn lease_confirmed(shared: &Shared, tenant: &TenantId) -> Result<(), AdminError> {
    if crate::migration::sides::lease_held(shared, tenant.as_str()) {
        return Ok(());
    }
    Err(AdminError::invalid_state(format!(
        "this instance's lease on the move of {tenant:?} is not confirmed (the control plane has not renewed it \
         for 3 s, or another instance took the move over); try again when the control plane answers, or on the \
         instance that coordinates the move"
    )))
}
