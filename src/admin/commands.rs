//! What each admin command does. Mutating commands are written to the audit log (fsynced) before the answer.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::protocol::{AdminError, Migrate, Request};
use super::Done;
use crate::context::Shared;
use crate::routing::Route;
use crate::tenant::TenantId;

/// Default `pause` wait for open transactions to finish.
const DEFAULT_PAUSE_TIMEOUT_MS: u64 = 10_000;

fn unknown_tenant(t: &TenantId) -> AdminError {
    AdminError::new("unknown_tenant", format!("tenant {t:?} is not routed"))
}

fn state_error(e: impl std::fmt::Display) -> AdminError {
    AdminError::new(
        "state_write_failed",
        format!("could not persist the change: {e}"),
    )
}

/// Runs one request on behalf of `actor`.
pub async fn execute(shared: &Arc<Shared>, req: Request, actor: &str) -> Result<Value, AdminError> {
    let command = req.command();
    let mutates = req.mutates();
    let tenant = match &req {
        Request::TenantGet { tenant }
        | Request::TenantSet { tenant, .. }
        | Request::TenantGrants { tenant, .. }
        | Request::TenantRemove { tenant }
        | Request::Pause { tenant, .. }
        | Request::Resume { tenant } => Some(tenant.to_string()),
        Request::Migrate(m) => m.tenant().map(|t| t.to_string()),
        _ => None,
    };
    // Route changes (and reload) run one at a time, with their audit entry written before the next starts, so
    // the log's order is the epochs' order and `removed` is never changed by two writers.
    let _serial = if req.changes_routes() {
        Some(shared.admin_lock.lock().await)
    } else {
        None
    };
    let outcome = run(shared, req).await;
    if !mutates {
        return outcome.map(|d| d.result);
    }
    let (before, after, result) = match &outcome {
        Ok(d) => (d.before.clone(), d.after.clone(), "ok".to_string()),
        Err(e) => (Value::Null, Value::Null, format!("error: {}", e.code)),
    };
    if let Err(e) = shared
        .audit
        .append(actor, command, tenant.as_deref(), before, after, &result)
    {
        shared
            .audit_ok
            .store(false, std::sync::atomic::Ordering::Relaxed);
        return Err(AdminError::new(
            "audit_write_failed",
            format!("the command ran ({result}) but could not be written to the audit log: {e}"),
        ));
    }
    outcome.map(|d| d.result)
}

async fn run(shared: &Arc<Shared>, req: Request) -> Result<Done, AdminError> {
    match req {
        Request::Tenants => Ok(Done::read(tenants(shared))),
        Request::TenantGet { tenant } => tenant_get(shared, &tenant).map(Done::read),
        Request::TenantSet { tenant, route } => tenant_set(shared, &tenant, route),
        Request::TenantGrants { tenant, apply } => tenant_grants(shared, &tenant, apply).await,
        Request::TenantRemove { tenant } => tenant_remove(shared, &tenant),
        Request::Backends => Ok(Done::read(backends(shared))),
        Request::Pause { tenant, timeout_ms } => pause(shared, &tenant, timeout_ms).await,
        Request::Resume { tenant } => resume(shared, &tenant),
        Request::Stats => Ok(Done::read(stats(shared))),
        Request::Reload => crate::admin::reload::reload(shared),
        Request::Audit { tail } => audit(shared, tail).map(Done::read),
        Request::Migrate(m) => migrate(shared, m).await,
    }
}

async fn migrate(shared: &Arc<Shared>, m: Migrate) -> Result<Done, AdminError> {
    use crate::migration::ops;
    let before = m
        .tenant()
        .and_then(|t| shared.migrations.get(t.as_str()))
        .map(|r| json!({"state": r.shown_state()}))
        .unwrap_or(Value::Null);
    let result = match &m {
        Migrate::Start(req) => ops::start(shared, req.clone()).await,
        Migrate::Status { tenant } => ops::status(shared, tenant.as_ref().map(|t| t.as_str())),
        Migrate::Cutover { tenant } => ops::cutover_cmd(shared, tenant.as_str()).await,
        Migrate::Abort {
            tenant,
            drop_target,
        } => ops::abort(shared, tenant.as_str(), *drop_target).await,
        Migrate::Pause { tenant } => ops::set_paused(shared, tenant.as_str(), true),
        Migrate::Resume { tenant } => ops::set_paused(shared, tenant.as_str(), false),
        Migrate::Verify { tenant, level } => ops::verify_cmd(shared, tenant.as_str(), *level).await,
        Migrate::Repair { tenant } => ops::repair(shared, tenant.as_str()).await,
        Migrate::Ddl { tenant, sql } => {
            crate::migration::ddl::ddl(shared, tenant.as_str(), sql).await
        }
        Migrate::Rollback { tenant } => ops::rollback_cmd(shared, tenant.as_str()).await,
        Migrate::Finalize {
            tenant,
            drop_source,
        } => ops::finalize(shared, tenant.as_str(), *drop_source).await,
    }
    .map_err(|e| AdminError::new(e.code, e.message))?;
    let after = m
        .tenant()
        .and_then(|t| shared.migrations.get(t.as_str()))
        .map(|r| json!({"state": r.shown_state()}))
        .unwrap_or(Value::Null);
    Ok(Done {
        result,
        before,
        after,
    })
}

/// A route change under a running migration would pull the tenant out from under it.
fn refuse_if_migrating(shared: &Shared, tenant: &TenantId) -> Result<(), AdminError> {
    match shared.migrations.get(tenant.as_str()) {
        Some(r) if !r.state.is_final() => Err(AdminError::new(
            "invalid_state",
            format!(
                "tenant {tenant:?} is being migrated ({}); finish or abort the migration first",
                r.shown_state()
            ),
        )),
        _ => Ok(()),
    }
}

fn route_json(r: &Route) -> Value {
    serde_json::to_value(r).unwrap_or(Value::Null)
}

/// `tenant grants`: the SQL for the tenant's role and grants, run on the backend with its admin credentials
/// when `apply`.
async fn tenant_grants(
    shared: &Shared,
    tenant: &TenantId,
    apply: bool,
) -> Result<Done, AdminError> {
    use super::grants::{plan, GrantError};
    let route = shared
        .router
        .load()
        .get(tenant.as_str())
        .cloned()
        .ok_or_else(|| unknown_tenant(tenant))?;
    let backend = shared
        .backends
        .load()
        .get(&route.backend)
        .cloned()
        .ok_or_else(|| {
            AdminError::new(
                "unknown_backend",
                format!("backend {:?} is not configured", route.backend),
            )
        })?;
    let config = shared.config.load();
    let grants = plan(&config, &backend, tenant, &route).map_err(|e| match e {
        GrantError::Shared(_) => AdminError::new("invalid_state", e.to_string()),
        _ => AdminError::new("invalid_argument", e.to_string()),
    })?;
    let sql = grants.sql();
    let result = json!({"tenant": tenant.as_str(), "role": grants.role, "database": grants.database, "sql": sql, "applied": apply});
    if apply {
        let side = crate::migration::pg::Endpoint {
            backend: backend.name.clone(),
            config: backend.config.clone(),
            database: grants.database.clone(),
            schema: "public".into(),
            filter: None,
        };
        let failed =
            |e: crate::migration::MigrateError| AdminError::new("grants_failed", e.to_string());
        let client = side.connect().await.map_err(failed)?;
        client
            .batch_execute(&format!("BEGIN;\n{sql}\nCOMMIT;"))
            .await
            .map_err(|e| failed(crate::migration::MigrateError::pg("apply grants", e)))?;
    }
    Ok(Done {
        before: Value::Null,
        after: json!({"role": grants.role, "applied": apply}),
        result,
    })
}

/// Sessions per tenant: (all, on an older route).
fn session_counts(shared: &Shared, epoch: u64) -> HashMap<String, (usize, usize)> {
    let mut counts: HashMap<String, (usize, usize)> = HashMap::new();
    for s in shared.sessions.all() {
        let r = s.route();
        if let Some(t) = r.tenant {
            let c = counts.entry(t.to_string()).or_default();
            c.0 += 1;
            c.1 += usize::from(r.epoch != epoch);
        }
    }
    counts
}

fn gate_json(shared: &Shared, tenant: &str) -> Value {
    match shared.gates.peek(tenant) {
        Some(g) => {
            json!({"paused": g.is_closed(), "queued": g.queued(), "open_transactions": g.active()})
        }
        None => json!({"paused": false, "queued": 0, "open_transactions": 0}),
    }
}

fn tenants(shared: &Shared) -> Value {
    let table = shared.router.snapshot();
    let counts = session_counts(shared, table.epoch);
    let mut rows: Vec<Value> = table
        .routes
        .iter()
        .map(|(t, r)| {
            let (sessions, stale) = counts.get(t.as_str()).copied().unwrap_or_default();
            let mut row = route_json(r);
            row["tenant"] = json!(t.as_str());
            row["sessions"] = json!(sessions);
            row["sessions_on_old_route"] = json!(stale);
            row["gate"] = gate_json(shared, t.as_str());
            row
        })
        .collect();
    rows.sort_by(|a, b| a["tenant"].as_str().cmp(&b["tenant"].as_str()));
    json!({"epoch": table.epoch, "tenants": rows})
}

fn tenant_get(shared: &Shared, tenant: &TenantId) -> Result<Value, AdminError> {
    let table = shared.router.snapshot();
    let route = table
        .get(tenant.as_str())
        .ok_or_else(|| unknown_tenant(tenant))?;
    let sessions: Vec<Value> = shared
        .sessions
        .of_tenant(tenant.as_str())
        .iter()
        .map(|s| s.to_json(table.epoch))
        .collect();
    Ok(json!({
        "tenant": tenant.as_str(),
        "epoch": table.epoch,
        "route": route_json(route),
        "gate": gate_json(shared, tenant.as_str()),
        "sessions": sessions,
    }))
}

fn tenant_set(shared: &Shared, tenant: &TenantId, route: Route) -> Result<Done, AdminError> {
    refuse_if_migrating(shared, tenant)?;
    if shared.backends.load().get(&route.backend).is_none() {
        return Err(AdminError::new(
            "unknown_backend",
            format!("backend {:?} is not configured", route.backend),
        ));
    }
    let before = shared
        .router
        .load()
        .get(tenant.as_str())
        .map(|r| route_json(r));
    let was_removed = shared
        .removed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(tenant.as_str());
    let new_route = Arc::new(route);
    let updated = shared.router.update(
        |routes| {
            routes.insert(tenant.clone(), new_route.clone());
            Ok(())
        },
        |table| shared.persist_routes(table).map_err(state_error),
    );
    let table = match updated {
        Ok(t) => t,
        Err(e) => {
            if was_removed {
                shared
                    .removed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(tenant.to_string());
            }
            return Err(e);
        }
    };
    let after = route_json(&new_route);
    Ok(Done {
        result: json!({"tenant": tenant.as_str(), "epoch": table.epoch, "route": after, "before": before}),
        before: before.unwrap_or(Value::Null),
        after,
    })
}

fn tenant_remove(shared: &Shared, tenant: &TenantId) -> Result<Done, AdminError> {
    refuse_if_migrating(shared, tenant)?;
    let before = shared
        .router
        .load()
        .get(tenant.as_str())
        .map(|r| route_json(r))
        .ok_or_else(|| unknown_tenant(tenant))?;
    shared
        .removed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(tenant.to_string());
    let updated = shared.router.update(
        |routes| {
            routes.remove(tenant.as_str());
            Ok(())
        },
        |table| shared.persist_routes(table).map_err(state_error),
    );
    let table = match updated {
        Ok(t) => t,
        Err(e) => {
            shared
                .removed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(tenant.as_str());
            return Err(e);
        }
    };
    // Requests queued for a removed tenant are let go; they end with a clear error at their boundary.
    if let Some(g) = shared.gates.peek(tenant.as_str()) {
        g.open();
    }
    Ok(Done {
        result: json!({"tenant": tenant.as_str(), "epoch": table.epoch, "removed": before}),
        before,
        after: Value::Null,
    })
}

fn backends(shared: &Shared) -> Value {
    let backends = shared.backends.load();
    let mut rows: Vec<Value> = backends
        .by_name
        .values()
        .map(|b| {
            let mut privileged_roles = Vec::new();
            let mut pools: Vec<Value> = b
                .pools()
                .iter()
                .map(|p| {
                    let (open, idle) = p.counts();
                    if p.privileged() == Some(true) {
                        privileged_roles.push(p.login.user.clone());
                    }
                    json!({
                        "database": p.database,
                        "role": p.login.user,
                        "open": open,
                        "idle": idle,
                        "active": open - idle.min(open),
                        "waiting": p.waiting(),
                        "privileged_role": p.privileged(),
                    })
                })
                .collect();
            pools.sort_by(|a, b| (a["database"].as_str(), a["role"].as_str()).cmp(&(b["database"].as_str(), b["role"].as_str())));
            privileged_roles.sort();
            let last_error = b.last_error();
            json!({
                "backend": b.name,
                "host": b.config.host,
                "port": b.config.port,
                "user": b.config.user,
                "admin_user": b.config.admin_user(),
                "isolation": b.config.isolation,
                "database": b.config.database,
                "sslmode": b.config.sslmode,
                "pool_size": b.pool_size(),
                "max_connections": b.max_connections(),
                "open": b.open(),
                "healthy": last_error.is_none(),
                "last_error": last_error,
                "warnings": privileged_roles.iter().map(|r| format!("serving role {r:?} is a superuser or has BYPASSRLS")).collect::<Vec<_>>(),
                "pools": pools,
            })
        })
        .collect();
    rows.sort_by(|a, b| a["backend"].as_str().cmp(&b["backend"].as_str()));
    json!({"backends": rows})
}

async fn pause(
    shared: &Shared,
    tenant: &TenantId,
    timeout_ms: Option<u64>,
) -> Result<Done, AdminError> {
    if shared.router.load().get(tenant.as_str()).is_none() {
        return Err(unknown_tenant(tenant));
    }
    let gate = shared.gates.get(tenant);
    let started = Instant::now();
    let newly = gate.close();
    if shared.router.load().get(tenant.as_str()).is_none() {
        // Removed meanwhile: do not leave a gate closed for a tenant that may be added back later.
        gate.open();
        return Err(unknown_tenant(tenant));
    }
    let timeout = Duration::from_millis(timeout_ms.unwrap_or(DEFAULT_PAUSE_TIMEOUT_MS));
    let drained = gate.wait_drained(timeout).await;
    let waited_ms = started.elapsed().as_secs_f64() * 1000.0;
    let still_open: Vec<u64> = shared
        .sessions
        .of_tenant(tenant.as_str())
        .iter()
        .filter(|s| s.in_transaction.load(std::sync::atomic::Ordering::Relaxed))
        .map(|s| s.id)
        .collect();
    let result = json!({
        "tenant": tenant.as_str(),
        "paused": true,
        "already_paused": !newly,
        "drained": drained,
        "drain_ms": waited_ms,
        "open_transactions": gate.active(),
        "open_sessions": if drained { Vec::new() } else { still_open },
        "queued": gate.queued(),
    });
    Ok(Done {
        after: json!({"paused": true, "drained": drained}),
        before: json!({"paused": !newly}),
        result,
    })
}

fn resume(shared: &Shared, tenant: &TenantId) -> Result<Done, AdminError> {
    let gate = shared
        .gates
        .peek(tenant.as_str())
        .filter(|g| g.is_closed())
        .ok_or_else(|| {
            AdminError::new("invalid_state", format!("tenant {tenant:?} is not paused"))
        })?;
    let released = gate.open();
    Ok(Done {
        result: json!({"tenant": tenant.as_str(), "paused": false, "released": released}),
        before: json!({"paused": true}),
        after: json!({"paused": false, "released": released}),
    })
}

/// Counters from the metrics registry, by series, for the `stats` command.
fn counters(shared: &Shared) -> BTreeMap<String, f64> {
    shared
        .metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("pgtenant_") && !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn stats(shared: &Shared) -> Value {
    let table = shared.router.snapshot();
    let paused: Vec<&str> = table
        .routes
        .keys()
        .filter(|t| shared.gates.peek(t.as_str()).is_some_and(|g| g.is_closed()))
        .map(|t| t.as_str())
        .collect();
    json!({
        "uptime_s": shared.started.elapsed().as_secs(),
        "epoch": table.epoch,
        "tenants": table.routes.len(),
        "client_sessions": shared.sessions.count(),
        "paused_tenants": paused,
        "counters": counters(shared),
        "backends": backends(shared)["backends"],
    })
}

fn audit(shared: &Shared, tail: usize) -> Result<Value, AdminError> {
    let (entries, broken_at) = shared
        .audit
        .tail(tail)
        .map_err(|e| AdminError::new("state_read_failed", e.to_string()))?;
    Ok(json!({"entries": entries, "verified": broken_at.is_none(), "broken_at_line": broken_at}))
}
