//! `pause` and `resume`: an operator's hold on a tenant's new transactions.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;

use super::super::args::PauseTimeout;
use super::super::code::AdminError;
use super::super::reply::{Paused, PausedAll, Resumed};
use super::Done;
use crate::context::Shared;
use crate::tenant::TenantId;

/// Default `pause` wait for open transactions to finish.
const DEFAULT_PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn pause(
    shared: &Shared,
    tenant: &TenantId,
    timeout: Option<PauseTimeout>,
) -> Result<Done, AdminError> {
    let unknown = || AdminError::unknown_tenant(tenant.as_str());
    if shared.router.load().get(tenant.as_str()).is_none() {
        return Err(unknown());
    }
    let gate = shared.gates.get(tenant);
    let started = Instant::now();
    let newly = gate.close();
    if shared.router.load().get(tenant.as_str()).is_none() {
        // Removed meanwhile: do not leave a gate closed for a tenant that may be added back later.
        gate.open();
        return Err(unknown());
    }
    let timeout = timeout.map_or(DEFAULT_PAUSE_TIMEOUT, PauseTimeout::duration);
    let drained = gate.wait_drained(timeout).await;
    let open_sessions = if drained {
        Vec::new()
    } else {
        shared
            .sessions
            .of_tenant(tenant.as_str())
            .iter()
            .filter(|s| s.in_transaction.load(Ordering::Relaxed))
            .map(|s| s.id)
            .collect()
    };
    let result = Paused {
        tenant: tenant.clone(),
        paused: true,
        already_paused: !newly,
        drained,
        drain_ms: started.elapsed().as_secs_f64() * 1000.0,
        open_transactions: gate.active(),
        open_sessions,
        queued: gate.queued(),
    };
    Ok(Done::change(
        &result,
        json!({"paused": !newly}),
        json!({"paused": true, "drained": drained}),
    ))
}

pub(super) fn resume(shared: &Shared, tenant: &TenantId) -> Result<Done, AdminError> {
    if shared.migrations.swap_pending(tenant.as_str()) {
        return Err(AdminError::invalid_state(format!(
            "tenant {tenant:?} is held until the control plane answers its move's route swap"
        )));
    }
    let gate = shared
        .gates
        .peek(tenant.as_str())
        .filter(|g| g.is_closed())
        .ok_or_else(|| AdminError::invalid_state(format!("tenant {tenant:?} is not paused")))?;
    let released = gate.open();
    let result = Resumed {
        tenant: tenant.clone(),
        paused: false,
        released,
    };
    Ok(Done::change(
        &result,
        json!({"paused": true}),
        json!({"paused": false, "released": released}),
    ))
}

/// `pause.all`: PgBouncer's global PAUSE, per tenant gate: every tenant's new transactions wait, the answer
/// comes when open ones have finished (or the timeout passed).
pub(super) async fn pause_all(
    shared: &Shared,
    timeout: Option<PauseTimeout>,
) -> Result<Done, AdminError> {
    let started = Instant::now();
    let table = shared.router.snapshot();
    let gates = shared.gates.close_all(table.tenants());
    let timeout = timeout.map_or(DEFAULT_PAUSE_TIMEOUT, PauseTimeout::duration);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut drained = true;
    for g in &gates {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        drained &= g.wait_drained(left).await;
    }
    let result = PausedAll {
        paused: true,
        tenants: gates.len(),
        drained,
        drain_ms: started.elapsed().as_secs_f64() * 1000.0,
        open_transactions: gates.iter().map(|g| g.active()).sum(),
    };
    Ok(Done::change(
        &result,
        json!({"paused_all": false}),
        json!({"paused_all": true, "drained": drained}),
    ))
}

/// `resume.all`: every gate opens (a global pause's and tenants' own).
pub(super) fn resume_all(shared: &Shared) -> Result<Done, AdminError> {
    let released = shared.gates.open_all();
    let result = json!({"paused": false, "released": released});
    Ok(Done::change(
        &result,
        json!({"paused_all": true}),
        result.clone(),
    ))
}

/// `tenant.kill`: ends the tenant's client sessions now (each gets `57P01` saying why).
pub(super) fn kill(shared: &Shared, tenant: &TenantId) -> Result<Done, AdminError> {
    if shared.router.load().get(tenant.as_str()).is_none() {
        return Err(AdminError::unknown_tenant(tenant.as_str()));
    }
    let sessions = shared.sessions.of_tenant(tenant.as_str());
    for s in &sessions {
        s.end_with(crate::protocol::messages::PgError::fatal(
            crate::protocol::sqlstate::ADMIN_SHUTDOWN,
            format!("terminating connection: an operator ended tenant {tenant}'s sessions"),
        ));
    }
    let result = json!({"tenant": tenant, "sessions_ended": sessions.len()});
    Ok(Done::change(
        &result,
        serde_json::Value::Null,
        result.clone(),
    ))
}
