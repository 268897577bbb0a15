//! `migrate start --at`, `migrate queue` and `migrate cancel`: moves queued for later (see
//! [`crate::migration::queue`]).

use std::sync::Arc;
use std::time::Duration;

use super::reply::{QueueView, QueuedMove};
use super::request::StartRequest;
use super::start::plan;
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

/// Starts due moves once a second until the proxy stops.
pub async fn run_queue(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shared.terminate.fired() => return,
            _ = tick.tick() => {}
        }
        let limit = shared.config.load().migration.max_concurrent;
        let free = limit.saturating_sub(shared.migrations.active_count());
        let busy = |t: &TenantId| {
            shared
                .migrations
                .get(t.as_str())
                .is_some_and(|r| !r.state.is_final())
        };
        super::run_due_drops(&shared).await;
        let now = now_ms() / 1000;
        for tenant in crate::migration::queue::due(&shared.migrations.queue.list(), now, free, busy)
        {
            start_one(&shared, &tenant).await;
        }
    }
}

async fn start_one(shared: &Arc<Shared>, tenant: &TenantId) {
    let q = match shared.migrations.queue.remove(tenant) {
        Ok(Some(q)) => q,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(%tenant, error = %e, "could not take a queued move off the queue");
            return;
        }
    };
    let actor = format!("scheduler (queued by {})", q.queued_by);
    let outcome = super::start(shared, q.request.clone(), &actor).await;
    let result = match &outcome {
        Ok(_) => {
            tracing::info!(%tenant, "queued move started");
            "ok".to_string()
        }
        Err(e) => {
            tracing::warn!(%tenant, code = e.code.as_str(), error = %e.message, "queued move could not start");
            format!("error: {}: {}", e.code.as_str(), e.message)
        }
    };
    let request = serde_json::to_value(&q).unwrap_or_default();
    if let Err(e) = shared.audit.append(
        &actor,
        "migrate.start",
        Some(tenant.as_str()),
        request,
        serde_json::Value::Null,
        &result,
    ) {
        shared
            .audit_ok
            .store(false, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(%tenant, error = %e, "audit write failed for a queued start");
    }
}
