//! `reload` (and SIGHUP): re-read the config file, validate all of it, and apply what can change while running:
//! users, new backends, backend pool sizes, new tenants, and the session settings of `[proxy]`. What needs a
//! restart is reported. An invalid file changes nothing.

use std::sync::Arc;

use serde_json::Value;

use super::Done;
use crate::admin::code::{AdminCode, AdminError};
use crate::admin::reply::Reloaded;
use crate::auth::Users;
use crate::backend::{Backend, Backends};
use crate::cluster::store::Guard;
use crate::config::{BackendConfig, Config};
use crate::context::{timeouts, Shared};
use crate::routing::Route;
use crate::tenant::TenantId;

fn failed(msg: impl Into<String>) -> AdminError {
    AdminError::new(AdminCode::ReloadFailed, msg)
}

pub fn reload(shared: &Arc<Shared>) -> Result<Done, AdminError> {
    let path = shared.config_path.clone().ok_or_else(|| {
        AdminError::new(
            AdminCode::InvalidState,
            "pgtenant was not started from a config file",
        )
    })?;
    let new = Config::load(&path).map_err(|e| failed(e.to_string()))?;
    let old = shared.config.load_full();
    let mut restart = restart_only_changes(&old, &new);
    // What will be in force: the new file with the start-only settings still running. It must be valid as a
    // whole (e.g. a running TCP admin listener keeps needing a proper token).
    let mut merged = keep_restart_only(&old, new);
    merged.validate().map_err(|e| failed(e.to_string()))?;

    // Plan everything first; nothing changes until every check has passed and the routes are on disk.
    let users = Users::from_config(&merged.users).map_err(|e| failed(format!("users: {e}")))?;
    let plan = plan_backends(shared, &merged, &mut restart)?;
    let new_tenants = plan_tenants(shared, &merged, &plan.backends)?;
    let mut applied = plan.applied;
    if !new_tenants.is_empty() {
        add_tenants(shared, &new_tenants)?;
        applied.extend(
            new_tenants
                .iter()
                .map(|(t, _)| format!("tenants.{t} (new)")),
        );
    }
    for (backend, config) in plan.resize {
        backend.set_limits(&config);
    }
    shared.users.store(Arc::new(users));
    applied.push("users".into());
    shared.notifier.configure(&merged.webhooks);
    applied.push("webhooks".into());
    merged.keep_login_settings();
    shared.config.store(Arc::new(merged));
    applied.push("proxy session settings".into());
    // Last: storing the backends tells transaction-pool sessions that what they resolved (pool, login from the
    // config: a tenant's password) is stale, so everything it is resolved from must be in place before.
    shared.backends.store(Arc::new(plan.backends));
    let result = Reloaded {
        applied,
        requires_restart: restart,
    };
    let after = super::to_json(&result);
    Ok(Done::change(&result, Value::Null, after))
}

/// Settings that only take effect at start.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<String> {
    let (o, n) = (&old.proxy, &new.proxy);
    let mut changed = Vec::new();
    let checks = [
        ("proxy.listen", o.listen != n.listen),
        ("proxy.admin_socket", o.admin_socket != n.admin_socket),
        ("proxy.admin_listen", o.admin_listen != n.admin_listen),
        ("proxy.metrics_listen", o.metrics_listen != n.metrics_listen),
        ("proxy.state_dir", o.state_dir != n.state_dir),
        ("proxy.pool_mode", o.pool_mode != n.pool_mode),
        (
            "proxy.max_client_conn",
            o.max_client_conn != n.max_client_conn,
        ),
        (
            "tls",
            old.tls.as_ref().map(|t| (&t.cert, &t.key))
                != new.tls.as_ref().map(|t| (&t.cert, &t.key)),
        ),
    ];
    for (name, differs) in checks {
        if differs {
            changed.push(name.to_string());
        }
    }
    changed
}

/// The new config with the start-only settings of the running one, which stay in force until a restart.
fn keep_restart_only(old: &Config, mut new: Config) -> Config {
    new.proxy.listen = old.proxy.listen.clone();
    new.proxy.admin_socket = old.proxy.admin_socket.clone();
    new.proxy.admin_listen = old.proxy.admin_listen.clone();
    new.proxy.metrics_listen = old.proxy.metrics_listen.clone();
    new.proxy.state_dir = old.proxy.state_dir.clone();
    new.proxy.pool_mode = old.proxy.pool_mode;
    new.proxy.max_client_conn = old.proxy.max_client_conn;
    new.proxy.workers = old.proxy.workers;
    new.tls = old.tls.clone();
    new
}

/// What reload will do to the backends, decided before anything changes.
struct BackendPlan {
    backends: Backends,
    /// Limits to set once the reload is sure to go through.
    resize: Vec<(Arc<Backend>, BackendConfig)>,
    applied: Vec<String>,
}

/// The backend set after reload: unchanged and resized backends keep their pools; new ones are added; a backend
/// whose address or credentials changed keeps running as it was (restart needed); removing a backend that a
/// route uses is refused.
fn plan_backends(
    shared: &Shared,
    new: &Config,
    restart: &mut Vec<String>,
) -> Result<BackendPlan, AdminError> {
    let current = shared.backends.load();
    let table = shared.router.snapshot();
    let mut plan = BackendPlan {
        backends: Backends::default(),
        resize: Vec::new(),
        applied: Vec::new(),
    };
    for (name, cfg) in &new.backends {
        match current.get(name) {
            Some(b) => {
                if without_limits(&b.config) != without_limits(cfg) {
                    restart.push(format!(
                        "backends.{name} (address, credentials, roles or TLS)"
                    ));
                } else if limits(&b.config) != limits(cfg) {
                    plan.resize.push((b.clone(), cfg.clone()));
                    plan.applied.push(format!("backends.{name} limits"));
                }
                plan.backends.by_name.insert(name.clone(), b.clone());
            }
            None => {
                let b = Backend::new(name, cfg.clone(), timeouts(new))
                    .map_err(|e| failed(e.to_string()))?;
                plan.applied.push(format!("backends.{name} (new)"));
                plan.backends.by_name.insert(name.clone(), b);
            }
        }
    }
    for name in current
        .by_name
        .keys()
        .filter(|n| !new.backends.contains_key(*n))
    {
        if let Some((t, _)) = table.iter().find(|(_, r)| &r.backend == name) {
            return Err(failed(format!(
                "backend {name:?} is removed but tenant {t} still routes to it"
            )));
        }
        plan.applied.push(format!("backends.{name} (removed)"));
    }
    Ok(plan)
}

/// A backend's reloadable limits.
fn limits(c: &BackendConfig) -> (usize, usize, usize, usize, u64, (u64, u64)) {
    (
        c.pool_size,
        c.max_connections,
        c.max_tenant_connections,
        c.reserve_pool_size,
        c.reserve_pool_timeout_ms,
        (c.tenant_turn_ms, c.tenant_turn_linger_ms),
    )
}

/// A backend's config with its reloadable limits left out, to compare what needs a restart.
fn without_limits(c: &BackendConfig) -> BackendConfig {
    BackendConfig {
        pool_size: 0,
        max_connections: 0,
        max_tenant_connections: 0,
        reserve_pool_size: 0,
        reserve_pool_timeout_ms: 0,
        tenant_turn_ms: 0,
        tenant_turn_linger_ms: 0,
        ..c.clone()
    }
}

/// Tenants in the config that are neither routed nor removed through the admin socket.
fn plan_tenants(
    shared: &Shared,
    new: &Config,
    backends: &Backends,
) -> Result<Vec<(TenantId, Route)>, AdminError> {
    let table = shared.router.snapshot();
    let removed = shared
        .removed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut out = Vec::new();
    for (name, t) in &new.tenants {
        if table.get(name).is_some() || removed.contains(name) {
            continue;
        }
        let id = TenantId::parse(name).map_err(|e| failed(e.to_string()))?;
        if backends.get(&t.backend).is_none() {
            return Err(failed(format!(
                "tenant {name} routes to unknown backend {:?}",
                t.backend
            )));
        }
        out.push((id, Route::from(t)));
    }
    Ok(out)
}

/// Routes the config's new tenants (through the control plane when there is one).
fn add_tenants(shared: &Arc<Shared>, new_tenants: &[(TenantId, Route)]) -> Result<(), AdminError> {
    if let Some(cp) = shared.control_plane.get() {
        let changes = new_tenants
            .iter()
            .map(|(t, r)| (t.clone(), Some(r.clone())))
            .collect();
        return tokio::runtime::Handle::current()
            .block_on(cp.write(shared, changes, Guard::IfAbsent))
            .map_err(|e| failed(e.to_string()));
    }
    shared
        .router
        .update(
            |routes| {
                for (t, r) in new_tenants {
                    routes.insert_if_absent(t, || r.clone());
                }
                Ok(())
            },
            |table, changes| {
                shared
                    .persist_routes(table, changes)
                    .map_err(|e| AdminError::new(AdminCode::StateWriteFailed, e.to_string()))
            },
        )
        .map(|_| ())
        .map_err(|e| failed(e.message))
}
