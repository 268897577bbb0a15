//! `tenants` and `tenant get`: routes, gates and sessions.

use std::collections::HashMap;

use super::super::code::AdminError;
use super::super::reply::{ClientList, GateView, SessionView, TenantList, TenantRow, TenantView};
use crate::context::Shared;
use crate::routing::Epoch;
use crate::tenant::TenantId;

/// Sessions per tenant: (all, on an older route).
fn session_counts(shared: &Shared, epoch: Epoch) -> HashMap<TenantId, (usize, usize)> {
    let mut counts: HashMap<TenantId, (usize, usize)> = HashMap::new();
    for s in shared.sessions.all() {
        let r = s.route();
        if let Some(t) = r.tenant {
            let c = counts.entry(t).or_default();
            c.0 += 1;
            c.1 += usize::from(r.epoch != epoch);
        }
    }
    counts
}

pub(super) fn gate_view(shared: &Shared, tenant: &str) -> GateView {
    match shared.gates.peek(tenant) {
        Some(g) => GateView {
            paused: g.is_closed(),
            queued: g.queued(),
            open_transactions: g.active(),
        },
        None => GateView::default(),
    }
}

pub(super) fn list(shared: &Shared) -> TenantList {
    let table = shared.router.snapshot();
    let counts = session_counts(shared, table.epoch);
    let mut tenants: Vec<TenantRow> = table
        .iter()
        .map(|(t, r)| {
            let (sessions, stale) = counts.get(t).copied().unwrap_or_default();
            TenantRow {
                tenant: t.clone(),
                route: (**r).clone(),
                sessions,
                sessions_on_old_route: stale,
                gate: gate_view(shared, t.as_str()),
            }
        })
        .collect();
    tenants.sort_by(|a, b| a.tenant.cmp(&b.tenant));
    TenantList {
        epoch: table.epoch,
        tenants,
    }
}

pub(super) fn get(shared: &Shared, tenant: &TenantId) -> Result<TenantView, AdminError> {
    let table = shared.router.snapshot();
    let route = table
        .get(tenant.as_str())
        .ok_or_else(|| AdminError::unknown_tenant(tenant.as_str()))?;
    let sessions: Vec<SessionView> = shared
        .sessions
        .of_tenant(tenant.as_str())
        .iter()
        .map(|s| s.view(table.epoch))
        .collect();
    Ok(TenantView {
        tenant: tenant.clone(),
        epoch: table.epoch,
        route: (**route).clone(),
        gate: gate_view(shared, tenant.as_str()),
        sessions,
    })
}

/// `clients`: every client session, oldest first.
pub(super) fn clients(shared: &Shared) -> ClientList {
    let epoch = shared.router.load().epoch;
    let mut clients: Vec<SessionView> = shared
        .sessions
        .all()
        .iter()
        .map(|s| s.view(epoch))
        .collect();
    clients.sort_by_key(|c| c.id);
    ClientList { clients }
}
