//! From an accepted socket to a running session: handshake, authentication, tenant resolution, the first
//! backend connection and the startup reply.

use std::sync::Arc;

use bytes::BytesMut;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::auth::{authenticate, AuthFailure};
use super::client_info::{Admission, ClientInfo};
use super::guards;
use super::limits::{LoginTicket, TenantSlot};
use super::session::Session;
use super::startup::{handshake, report, HandshakeError, Hello};
use crate::auth::UserEntry;
use crate::config::TenantSource;
use crate::context::Shared;
use crate::net::Stream;
use crate::protocol::startup::{split_options, take_setting, StartupMessage};
use crate::protocol::{messages, sqlstate, PgError};
use crate::tenant::{self, may_reach, StartupHints, TenantError, TenantId};

/// Startup parameters that are about the connection itself, not session settings for the backend.
const CONNECTION_PARAMS: &[&str] = &["user", "database", "options", "replication"];

#[derive(Debug, Error)]
pub enum LoginError {
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("client i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Handles one accepted client connection to its end. `ticket` is its place among connections logging in,
/// given up once the session starts (or taken by a newer connection while this one has not spoken yet).
pub async fn serve_client(shared: Arc<Shared>, tcp: TcpStream, ticket: LoginTicket) {
    let peer = tcp.peer_addr().ok();
    let _ = tcp.set_nodelay(true);
    let (timeout, keepalive) = {
        let c = shared.config.load();
        (c.proxy.login_timeout(), c.proxy.keepalive())
    };
    crate::net::keepalive::apply(&tcp, keepalive);
    // Boxed: the login's state (handshake, TLS, SCRAM) is several KiB, and inline it would size this task for
    // the connection's whole life; on the heap it is freed once the session starts.
    let login = Box::pin(login(&shared, tcp, &ticket));
    let outcome = tokio::select! {
        r = tokio::time::timeout(timeout, login) => r,
        _ = ticket.evicted() => {
            debug!(?peer, "silent connection closed to make room for a new one");
            return;
        }
    };
    drop(ticket);
    let session = match outcome {
        Err(_) => {
            debug!(?peer, "client did not finish startup in time");
            return;
        }
        Ok(Err(e)) => {
            debug!(?peer, error = %e, "client startup failed");
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Ok(Some(session))) => session,
    };
    Box::new(session).run().await;
}

async fn login(
    shared: &Arc<Shared>,
    tcp: TcpStream,
    ticket: &LoginTicket,
) -> Result<Option<Session>, LoginError> {
    let (mut stream, buf, message) = match handshake(tcp, shared.tls.as_ref()).await? {
        None => return Ok(None),
        Some(Hello::Cancel { pid, secret }) => {
            forward_cancel(shared, pid, secret).await;
            return Ok(None);
        }
        Some(Hello::Startup {
            stream,
            buf,
            message,
        }) => (stream, buf, message),
    };
    ticket.spoke();
    match admit(shared, &mut stream, buf, &message).await {
        Ok(Some((info, buf))) => match Session::start(shared.clone(), stream, buf, info).await {
            Ok(session) => Ok(Some(session)),
            Err((mut stream, err)) => {
                report(&mut stream, err).await;
                Ok(None)
            }
        },
        Ok(None) => Ok(None),
        Err(err) => {
            report(&mut stream, err).await;
            Ok(None)
        }
    }
}

async fn forward_cancel(shared: &Shared, pid: i32, secret: i32) {
    match shared.cancels.lookup(pid, secret) {
        Some(target) => {
            if let Err(e) = crate::cancel::forward(target).await {
                warn!(error = %e, "could not forward cancel request");
            }
        }
        None => debug!(pid, "cancel request for an unknown key ignored"),
    }
}

/// Checks the startup packet, authenticates, and resolves the tenant. `Ok(None)`: the client went away.
async fn admit(
    shared: &Arc<Shared>,
    stream: &mut Stream,
    mut buf: BytesMut,
    message: &StartupMessage,
) -> Result<Option<(ClientInfo, BytesMut)>, PgError> {
    let Ok(client_permit) = shared.client_permits.clone().try_acquire_owned() else {
        return Err(PgError::fatal(
            sqlstate::TOO_MANY_CONNECTIONS,
            format!(
                "sorry, too many clients already (pgtenant max_client_conn = {})",
                shared.config.load().proxy.max_client_conn
            ),
        ));
    };
    let unsupported = message.protocol_options();
    if message.minor > 0 || !unsupported.is_empty() {
        let mut out = BytesMut::new();
        messages::negotiate_protocol_version(&mut out, 0, &unsupported);
        stream
            .write_all(&out)
            .await
            .map_err(|_| PgError::protocol("client gone"))?;
    }
    if message
        .get("replication")
        .is_some_and(|r| !matches!(r, "false" | "off" | "no" | "0"))
    {
        return Err(PgError::fatal(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "pgtenant does not proxy replication connections",
        ));
    }
    let raw_user = message
        .get("user")
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            PgError::fatal(
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                "no PostgreSQL user name specified in startup packet",
            )
        })?;
    let config = shared.config.load();
    let users = shared.users.load();
    let sep = config.proxy.user_separator.chars().next().unwrap_or('.');
    let (user, suffix) = tenant::split_user(raw_user, sep, |u| users.contains(u));

    let peer = stream.tcp().peer_addr().ok();
    let entry = match authenticate(shared, stream, &mut buf, &users, user, raw_user).await {
        Ok(e) => e,
        Err(AuthFailure::Closed) => return Ok(None),
        Err(AuthFailure::Refused(e)) => {
            info!(user = raw_user, ?peer, "client authentication failed");
            shared.metrics.auth_failures.increment(1);
            shared.auth_throttle.failed(peer.map(|p| p.ip())).await;
            return Err(e);
        }
    };
    shared.auth_throttle.succeeded(peer.map(|p| p.ip()));
    check_origin(&entry, peer, stream.is_tls())?;
    let user_slot = shared
        .clients
        .user(&entry.name, entry.max_client_conn)
        .ok_or_else(|| {
            PgError::fatal(
                sqlstate::TOO_MANY_CONNECTIONS,
                format!(
                    "too many connections for user \"{}\" (its max_client_conn = {})",
                    entry.name,
                    entry.max_client_conn.unwrap_or_default()
                ),
            )
        })?;

    let mut options = split_options(message.get("options").unwrap_or(""));
    let hints = StartupHints {
        user_suffix: suffix,
        options: take_setting(&mut options, "pgtenant.tenant"),
        database: message.get("database"),
    };
    let (tenant, fixed) = choose_tenant(shared, &entry, &hints)?;
    let mut params: Vec<(String, String)> = message
        .params
        .iter()
        .filter(|(k, _)| !CONNECTION_PARAMS.contains(&k.as_str()) && !k.starts_with("_pq_."))
        .cloned()
        .collect();
    params.sort();
    let mut tenant_slot = None;
    if let Some(t) = &tenant {
        if let Some(route) = shared.router.load().get(t.as_str()) {
            guards::check_startup(&params, &options, route, t.as_str()).map_err(fatal)?;
        }
        tenant_slot = Some(tenant_slot_for(shared, t).map_err(fatal)?);
    }
    let info = ClientInfo {
        admission: Admission {
            _client: client_permit,
            _user: user_slot,
            tenant: tenant_slot,
        },
        user: entry,
        user_name: user.to_owned(),
        database: message.get("database").map(str::to_owned),
        params,
        options,
        startup_tenant: tenant,
        tenant_fixed: fixed,
        peer,
    };
    Ok(Some((info, buf)))
}

/// A client of `tenant` counted against the tenant's client limit (its own `max_client_conn`, else
/// `proxy.max_client_conn_per_tenant`).
pub(super) fn tenant_slot_for(
    shared: &Arc<Shared>,
    tenant: &TenantId,
) -> Result<TenantSlot, PgError> {
    let config = shared.config.load();
    let max = config
        .tenants
        .get(tenant.as_str())
        .and_then(|t| t.max_client_conn)
        .or((config.proxy.max_client_conn_per_tenant > 0)
            .then_some(config.proxy.max_client_conn_per_tenant));
    shared.clients.tenant(tenant, max).ok_or_else(|| {
        PgError::error(
            sqlstate::TOO_MANY_CONNECTIONS,
            format!(
                "too many connections for tenant \"{tenant}\" (max_client_conn for the tenant = {})",
                max.unwrap_or_default()
            ),
        )
    })
}

/// After the password: the user's allowed networks and its TLS requirement. Checked only now, so someone who
/// does not know the password learns nothing from the answer.
fn check_origin(
    user: &UserEntry,
    peer: Option<std::net::SocketAddr>,
    tls: bool,
) -> Result<(), PgError> {
    if user.require_tls && !tls {
        return Err(PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            format!(
                "user \"{}\" must connect over TLS (sslmode=require)",
                user.name
            ),
        ));
    }
    if user.networks.is_empty() {
        return Ok(());
    }
    let allowed = peer.is_some_and(|p| user.networks.iter().any(|n| n.contains(p.ip())));
    if !allowed {
        warn!(user = %user.name, ?peer, "login from a network the user may not connect from");
        return Err(PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            format!(
                "user \"{}\" may not connect from {}",
                user.name,
                peer.map(|p| p.ip().to_string())
                    .unwrap_or_else(|| "here".into())
            ),
        ));
    }
    Ok(())
}

fn fatal(e: PgError) -> PgError {
    PgError {
        severity: messages::Severity::Fatal,
        ..e
    }
}

/// Resolves the startup tenant and checks the user may reach it. Returns the tenant (or none) and whether the
/// client named it explicitly (then `SET pgtenant.tenant` may not move the session elsewhere).
fn choose_tenant(
    shared: &Shared,
    user: &UserEntry,
    hints: &StartupHints<'_>,
) -> Result<(Option<TenantId>, bool), PgError> {
    let config = shared.config.load();
    let table = shared.router.load();
    let named = tenant::resolve(&config.proxy.tenant_sources, hints, |d| {
        table.get(d).is_some()
    })
    .map_err(|e| match e {
        TenantError::Conflict { .. } => PgError::fatal(
            sqlstate::SQLSERVER_REJECTED_ESTABLISHMENT_OF_SQLCONNECTION,
            e.to_string(),
        ),
        TenantError::InvalidName(_) => {
            PgError::fatal(sqlstate::INVALID_CATALOG_NAME, e.to_string())
        }
    })?;
    let (tenant, fixed) = match named {
        Some(t) => (t, true),
        None if !config.proxy.default_tenant.is_empty() => match TenantId::parse(&config.proxy.default_tenant) {
            Ok(t) => (t, false),
            Err(e) => return Err(PgError::fatal(sqlstate::INVALID_CATALOG_NAME, e.to_string())),
        },
        None if config.proxy.tenant_sources.contains(&TenantSource::Set) => return Ok((None, false)),
        None => {
            return Err(PgError::fatal(
                sqlstate::SQLSERVER_REJECTED_ESTABLISHMENT_OF_SQLCONNECTION,
                "no tenant named: use a user name suffix (user.tenant), options=-c pgtenant.tenant=NAME or a tenant database",
            ))
        }
    };
    if table.get(tenant.as_str()).is_none() {
        return Err(PgError::fatal(
            sqlstate::INVALID_CATALOG_NAME,
            format!("tenant \"{tenant}\" does not exist"),
        ));
    }
    if !may_reach(&user.tenants, &tenant) {
        warn!(user = %user.name, %tenant, "user tried to reach a tenant it may not");
        return Err(PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            format!(
                "user \"{}\" may not connect to tenant \"{tenant}\"",
                user.name
            ),
        ));
    }
    Ok((Some(tenant), fixed))
}
