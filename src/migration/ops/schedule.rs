//! `migrate start --at`, `migrate queue` and `migrate cancel`: moves queued for later (see
//! [`crate::migration::queue`]).

use super::reply::{QueueView, QueuedMove};
use super::start::{plan, StartRequest};
use crate::admin::code::{AdminCode, AdminError};
use crate::context::Shared;
use crate::migration::queue::{parse_at, Queued};
use crate::migration::record::now_ms;
use crate::tenant::TenantId;

/// Queues `req` to start at its `--at` time. The route and backends are checked now; the preflight runs when
/// it starts.
pub fn enqueue(
    shared: &Shared,
    mut req: StartRequest,
    actor: &str,
) -> Result<QueuedMove, AdminError> {
    let now = now_ms() / 1000;
    let text = req.at.take().unwrap_or_default();
    let at_unix = parse_at(&text, now).ok_or_else(|| {
        AdminError::invalid(format!(
            "at {text:?} is not +30s/+5m/+2h, HH:MM (UTC) or YYYY-MM-DDTHH:MM[:SS]Z"
        ))
    })?;
    plan(shared, &req)?;
    let tenant = req.tenant.clone();
    if shared.migrations.queue.contains(&tenant) {
        return Err(AdminError::new(
            AdminCode::InvalidState,
            format!("tenant {tenant:?} already has a queued move (migrate cancel drops it)"),
        ));
    }
    let queued = Queued {
        at: crate::state::audit::rfc3339_of(at_unix),
        at_unix,
        priority: req.priority,
        request: req,
        queued_at: crate::state::audit::rfc3339_now(),
        queued_by: actor.to_owned(),
    };
    shared
        .migrations
        .queue
        .push(queued.clone())
        .map_err(AdminError::state_write)?;
    Ok(QueuedMove {
        tenant,
        state: "queued".into(),
        at: queued.at,
        starts_in_s: at_unix.saturating_sub(now),
        priority: queued.priority,
    })
}

pub fn queue(shared: &Shared) -> QueueView {
    QueueView {
        queued: shared.migrations.queue.list(),
    }
}

/// Drops the tenant's queued move.
pub fn cancel(shared: &Shared, tenant: &TenantId) -> Result<QueuedMove, AdminError> {
    let q = shared
        .migrations
        .queue
        .remove(tenant)
        .map_err(AdminError::state_write)?
        .ok_or_else(|| {
            AdminError::new(
                AdminCode::NoMigration,
                format!("tenant {tenant:?} has no queued move"),
            )
        })?;
    Ok(QueuedMove {
        tenant: tenant.clone(),
        state: "cancelled".into(),
        at: q.at,
        starts_in_s: 0,
        priority: q.priority,
    })
}
