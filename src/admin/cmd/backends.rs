//! `backends`: pool figures, health and serving-role warnings per backend.

use super::super::reply::{BackendList, BackendView, PoolView};
use crate::backend::Backend;
use crate::context::Shared;

pub(super) fn list(shared: &Shared) -> BackendList {
    let backends = shared.backends.load();
    let mut rows: Vec<BackendView> = backends.by_name.values().map(|b| view(b)).collect();
    rows.sort_by(|a, b| a.backend.cmp(&b.backend));
    BackendList { backends: rows }
}

fn view(b: &Backend) -> BackendView {
    let mut pools: Vec<PoolView> = b
        .pools()
        .iter()
        .map(|p| {
            let (open, idle) = p.counts();
            PoolView {
                database: p.database.clone(),
                role: p.login.user.clone(),
                open,
                idle,
                active: open - idle.min(open),
                waiting: p.waiting(),
                privileged_role: p.privileged(),
                idle_servers: p.idle_list(),
            }
        })
        .collect();
    pools.sort_by(|a, b| (&a.database, &a.role).cmp(&(&b.database, &b.role)));
    let last_error = b.last_error();
    BackendView {
        backend: b.name.to_string(),
        host: b.config.host.clone(),
        port: b.config.port,
        user: b.config.user.clone(),
        admin_user: b.config.admin_user().to_owned(),
        isolation: b.config.isolation,
        database: b.config.database.clone(),
        sslmode: b.config.sslmode,
        pool_size: b.pool_size(),
        max_connections: b.max_connections(),
        open: b.open(),
        healthy: last_error.is_none(),
        last_error,
        warnings: pools
            .iter()
            .filter(|p| p.privileged_role == Some(true))
            .map(|p| format!("serving role {:?} is a superuser or has BYPASSRLS", p.role))
            .collect(),
        pools,
    }
}
