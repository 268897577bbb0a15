//! `tenant set` and `tenant remove`: route changes, persisted before they are published.

use std::sync::Arc;

use serde_json::Value;

use super::super::code::AdminError;
use super::super::reply::{RouteRemoved, RouteSet};
use super::{to_json, Done};
use crate::cluster::store::{Guard, StoreError};
use crate::context::Shared;
use crate::routing::{Route, RoutingTable};
use crate::tenant::TenantId;

/// A route change under a running migration would pull the tenant out from under it.
fn refuse_if_migrating(shared: &Shared, tenant: &TenantId) -> Result<(), AdminError> {
    if shared.migrations.is_starting(tenant.as_str()) {
        return Err(AdminError::invalid_state(format!(
            "a migration of tenant {tenant:?} is starting; finish or abort it first"
        )));
    }
    match shared.migrations.get(tenant.as_str()) {
        Some(r) if !r.state.is_final() => Err(AdminError::invalid_state(format!(
            "tenant {tenant:?} is being migrated ({}); finish or abort the migration first",
            r.shown_state()
        ))),
        _ => Ok(()),
    }
}

/// Marks `tenant` removed (or not); a removed tenant given by the config is not added back by a reload.
fn mark_removed(shared: &Shared, tenant: &TenantId, removed: bool) -> bool {
    let mut set = shared.removed.lock().unwrap_or_else(|p| p.into_inner());
    if removed {
        set.insert(tenant.to_string())
    } else {
        set.remove(tenant.as_str())
    }
}

/// Sets (or, with `None`, removes) the tenant's route in a new routing table, persisted before it is published.
/// With a control plane the change goes to the store first and comes back from it (so every instance applies
/// the same changes in the same order); called on a blocking thread.
fn publish(
    shared: &Shared,
    tenant: &TenantId,
    route: Option<Arc<Route>>,
) -> Result<Arc<RoutingTable>, AdminError> {
    if let Some(cp) = shared.control_plane.get() {
        let change = vec![(tenant.clone(), route.as_deref().cloned())];
        let runtime = tokio::runtime::Handle::current();
        // The store refuses a change of a tenant another instance moves, under the lock a move's start takes.
        runtime
            .block_on(cp.write(shared, change, Guard::UnlessMoving))
            .map_err(|e| match e {
                StoreError::Conflict(why) => AdminError::invalid_state(why),
                e => AdminError::state_write(format!("{e}; the route is unchanged")),
            })?;
        return Ok(shared.router.snapshot());
    }
    shared.router.update(
        |routes| {
            match &route {
                Some(r) => routes.insert(tenant.clone(), r.clone()),
                None => routes.remove(tenant),
            };
            Ok(())
        },
        |table, changes| {
            shared
                .persist_routes(table, changes)
                .map_err(AdminError::state_write)
        },
    )
}

pub(super) fn set(shared: &Shared, tenant: &TenantId, route: Route) -> Result<Done, AdminError> {
    refuse_if_migrating(shared, tenant)?;
    if shared.backends.load().get(&route.backend).is_none() {
        return Err(AdminError::unknown_backend(&route.backend));
    }
    let before = shared
        .router
        .load()
        .get(tenant.as_str())
        .map(|r| (**r).clone());
    let was_removed = mark_removed(shared, tenant, false);
    let new_route = Arc::new(route);
    let table = publish(shared, tenant, Some(new_route.clone())).inspect_err(|_| {
        if was_removed {
            mark_removed(shared, tenant, true);
        }
    })?;
    let (before_json, after) = (to_json(&before), to_json(&*new_route));
    let result = RouteSet {
        tenant: tenant.clone(),
        epoch: table.epoch,
        route: (*new_route).clone(),
        before,
    };
    Ok(Done::change(&result, before_json, after))
}

pub(super) fn remove(shared: &Shared, tenant: &TenantId) -> Result<Done, AdminError> {
    refuse_if_migrating(shared, tenant)?;
    let before = shared
        .router
        .load()
        .get(tenant.as_str())
        .map(|r| (**r).clone())
        .ok_or_else(|| AdminError::unknown_tenant(tenant.as_str()))?;
    mark_removed(shared, tenant, true);
    let table = publish(shared, tenant, None).inspect_err(|_| {
        mark_removed(shared, tenant, false);
    })?;
    // Requests queued for a removed tenant are let go; they end with a clear error at their boundary.
    if let Some(g) = shared.gates.peek(tenant.as_str()) {
        g.open();
    }
    let before_json = to_json(&before);
    let result = RouteRemoved {
        tenant: tenant.clone(),
        epoch: table.epoch,
        removed: before,
    };
    Ok(Done::change(&result, before_json, Value::Null))
}
