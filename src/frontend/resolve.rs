//! Where a tenant's transactions go: its route, the pool and login that serve it, and the startup parameters a
//! backend connection is opened with; checking a connection out for it.

use std::sync::Arc;

use bytes::BytesMut;
use tracing::debug;

use super::client_info::ClientInfo;
use super::server::Server;
use super::statements::Inflight;
use crate::backend::{Pool, StartupTag};
use crate::config::{Isolation, PoolMode};
use crate::context::Shared;
use crate::errors::ClientError;
use crate::protocol::startup::join_options;
use crate::protocol::PgError;
use crate::quote::quote_ident;
use crate::routing::{Epoch, Route};
use crate::tenant::TenantId;

/// The backend startup parameters for `info` on `route`: the client's session parameters, its options, and the
/// tenant's schema as `search_path` (in options, so `RESET search_path` and `DISCARD ALL` return to it).
pub(super) fn startup_tag(info: &ClientInfo, schema: Option<&str>) -> StartupTag {
    let mut params = info.params.clone();
    let mut options = info.options.clone();
    if let Some(schema) = schema {
        options.push("-c".into());
        options.push(format!("search_path={}", quote_ident(schema)));
    }
    if !options.is_empty() {
        params.push(("options".into(), join_options(&options)));
    }
    params.sort();
    StartupTag { params }
}

/// A backend connection and the route (and epoch) it was chosen under.
pub(super) struct Attached {
    pub server: Server,
    pub route: Arc<Route>,
    pub epoch: Epoch,
    pub route_path: Option<Arc<str>>,
}

/// Where a tenant's transactions go now: its route, the routing epoch, and the pool and startup parameters a
/// backend connection is drawn with. Kept by transaction-pool sessions while the epoch and backends stay.
#[derive(Clone)]
pub(super) struct Resolved {
    pub tenant: TenantId,
    pub route: Arc<Route>,
    pub epoch: Epoch,
    pub pool: Arc<Pool>,
    pub tag: Arc<StartupTag>,
    /// The generation of the backends table this was resolved against (a reload replaces it).
    pub backends: u64,
    /// The schema set per transaction (`SET search_path`) rather than at connect (see [`resolve`]).
    pub route_path: Option<Arc<str>>,
}

/// Looks up `tenant`'s current route and the pool serving it.
pub(super) fn resolve(
    shared: &Shared,
    info: &ClientInfo,
    tenant: &TenantId,
) -> Result<Resolved, PgError> {
    let (route, epoch) = {
        let table = shared.router.load();
        let route = table
            .get(tenant.as_str())
            .cloned()
            .ok_or_else(|| ClientError::UnknownTenant(tenant.to_string()))?;
        (route, table.epoch)
    };
    let (backends, generation) = shared.backends.load_with_generation();
    let backend =
        backends
            .get(&route.backend)
            .ok_or_else(|| ClientError::BackendNotConfigured {
                tenant: tenant.clone(),
                backend: route.backend.to_string(),
            })?;
    let database = route
        .database
        .clone()
        .or_else(|| backend.config.database.clone())
        .or_else(|| info.database.clone())
        .unwrap_or_else(|| info.user_name.clone());
    let config = shared.config.load();
    // Transaction pooling of a shared pool: the schema is applied per transaction (SET search_path), not at
    // connect, so one pool serves every schema tenant of the backend.
    let route_path = (config.proxy.pool_mode == PoolMode::Transaction
        && route.isolation(&backend.config) == Isolation::Shared)
        .then(|| route.schema.as_deref().map(Arc::<str>::from))
        .flatten();
    let tag_schema = if route_path.is_some() {
        None
    } else {
        route.schema.as_deref()
    };
    let login = crate::backend::identity::login_for(&config, backend, &route, tenant)
        .map_err(|e| ClientError::NoLogin(e.to_string()))?;
    drop(config);
    let pool = backend
        .pool(&database, &login)
        .ok_or_else(|| ClientError::TooManyPools {
            backend: backend.name.to_string(),
            pools: crate::backend::MAX_POOLS_PER_BACKEND,
        })?;
    let tag = pool.intern(startup_tag(info, tag_schema));
    Ok(Resolved {
        tenant: tenant.clone(),
        route,
        epoch,
        pool,
        tag,
        backends: generation,
        route_path,
    })
}

/// [`checkout`] when the pool has an idle connection for the session at hand (see `Pool::try_reuse`); `None`
/// takes nothing, not even the spare.
pub(super) fn checkout_now(
    resolved: &Resolved,
    tenant: &TenantId,
    spare: &mut Option<(BytesMut, Inflight)>,
) -> Option<Server> {
    let conn = resolved.pool.try_reuse(&resolved.tag, Some(tenant))?;
    Some(Server::new(conn, spare.take()))
}

/// Checks out a backend connection of `resolved`'s pool (with a spare output buffer and in-flight queue).
pub(super) async fn checkout(
    resolved: &Resolved,
    tenant: &TenantId,
    spare: Option<(BytesMut, Inflight)>,
) -> Result<Server, PgError> {
    let conn = resolved
        .pool
        .checkout(&resolved.tag, Some(tenant))
        .await
        .map_err(|e| {
            debug!(%tenant, error = %e, "backend checkout failed");
            e.to_client(false)
        })?;
    Ok(Server::new(conn, spare))
}

/// Checks out a backend connection for `tenant`'s current route.
pub(super) async fn connect_server(
    shared: &Shared,
    info: &ClientInfo,
    tenant: &TenantId,
) -> Result<Attached, PgError> {
    let resolved = resolve(shared, info, tenant)?;
    let server = checkout(&resolved, tenant, None).await?;
    Ok(Attached {
        server,
        route: resolved.route,
        epoch: resolved.epoch,
        route_path: resolved.route_path,
    })
}
