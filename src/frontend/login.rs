//! From an accepted socket to a running session: handshake, authentication, tenant resolution, the first
//! backend connection and the startup reply.

use std::sync::Arc;

use bytes::BytesMut;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::Instrument;
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
use crate::errors::ClientError;
use crate::net::Stream;
use crate::protocol::startup::{split_options, take_setting, StartupMessage};
use crate::protocol::{messages, PgError};
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
    let _ = tcp.set_nodelay(true);
    crate::net::keepalive::apply(&tcp, shared.config.load().proxy.keepalive());
    serve_stream(shared, Stream::plain(tcp), ticket).await
}

/// Logs a client in on `stream` and runs its session (a TCP socket, or an in-process pipe in tests), inside a
/// `session` span: every log line of the connection names its peer, and once known its session id, user
/// and tenant.
pub async fn serve_stream(shared: Arc<Shared>, stream: Stream, ticket: LoginTicket) {
    let peer = stream.peer_addr();
    let span = tracing::info_span!(
        "session",
        id = tracing::field::Empty,
        ?peer,
        user = tracing::field::Empty,
        tenant = tracing::field::Empty,
    );
    serve_in_span(shared, stream, ticket, peer)
        .instrument(span)
        .await
}

async fn serve_in_span(
    shared: Arc<Shared>,
    stream: Stream,
    ticket: LoginTicket,
    peer: Option<std::net::SocketAddr>,
) {
    let timeout = shared.config.load().proxy.login_timeout();
    // Boxed: the login's state (handshake, TLS, SCRAM) is several KiB, and inline it would size this task for
    // the connection's whole life; on the heap it is freed once the session starts.
    let login = Box::pin(login(&shared, stream, &ticket));
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
        Ok(Ok(Some(Started::Console(stream, buf, login)))) => {
            return crate::console::serve(shared, stream, buf, login).await;
        }
        Ok(Ok(Some(Started::Session(session)))) => session,
    };
    let span = tracing::Span::current();
    span.record("id", session.handle.info.id);
    span.record("user", session.info.user_name.as_str());
    let (log_in, log_out) = {
        let p = &shared.config.load().proxy;
        (p.log_connections, p.log_disconnections)
    };
    let started = std::time::Instant::now();
    if log_in {
        info!(
            tenant = session.info.startup_tenant.as_deref().unwrap_or("-"),
            database = session.info.database.as_deref().unwrap_or("-"),
            "client connected"
        );
    }
    session.run().await;
    if log_out {
        info!(
            duration_ms = started.elapsed().as_millis() as u64,
            "client disconnected"
        );
    }
}

/// What a finished login goes on to.
enum Started {
    Session(Box<Session>),
    /// The admin console (its own loop, without the login's deadline).
    Console(Stream, BytesMut, crate::console::Login),
}

/// What `admit` let in.
enum Admitted {
    Tenant(ClientInfo, BytesMut),
    Console(crate::console::Login, BytesMut),
}

async fn login(
    shared: &Arc<Shared>,
    stream: Stream,
    ticket: &LoginTicket,
) -> Result<Option<Started>, LoginError> {
    let (mut stream, buf, message) = match handshake(stream, shared.tls.as_ref()).await? {
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
        Ok(Some(Admitted::Console(login, buf))) => Ok(Some(Started::Console(stream, buf, login))),
        Ok(Some(Admitted::Tenant(info, buf))) => {
            match Session::start(shared.clone(), stream, buf, info).await {
                Ok(session) => Ok(Some(Started::Session(Box::new(session)))),
                Err((mut stream, err)) => {
                    report(&mut stream, err).await;
                    Ok(None)
                }
            }
        }
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
) -> Result<Option<Admitted>, PgError> {
    let Ok(client_permit) = shared.client_permits.clone().try_acquire_owned() else {
        return Err(ClientError::TooManyClients(shared.config.load().proxy.max_client_conn).into());
    };
    check_packet(stream, message).await?;
    let raw_user = message
        .get("user")
        .filter(|u| !u.is_empty())
        .ok_or(ClientError::NoUser)?;
    let users = shared.users.load();
    let sep = shared.config.load().proxy.user_separator.chars().next();
    let sep = sep.unwrap_or('.');
    let (user, suffix) = tenant::split_user(raw_user, sep, |u| users.contains(u));
    let peer = stream.peer_addr();
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
        .ok_or_else(|| ClientError::TooManyUserClients {
            user: entry.name.clone(),
            limit: entry.max_client_conn.unwrap_or_default(),
        })?;
    if let Some(role) = console_role(shared, message, &entry.name)? {
        let login = crate::console::Login {
            user: entry.name.clone(),
            role,
            permits: Box::new((client_permit, user_slot)),
        };
        return Ok(Some(Admitted::Console(login, buf)));
    }
    let mut options = split_options(message.get("options").unwrap_or(""));
    let hints = StartupHints {
        user_suffix: suffix,
        options: take_setting(&mut options, "pgtenant.tenant"),
        database: message.get("database"),
    };
    let (tenant, fixed) = choose_tenant(shared, &entry, &hints)?;
    let params = session_params(message);
    let tenant_slot = match &tenant {
        Some(t) => Some(admit_tenant(shared, t, &params, &options)?),
        None => None,
    };
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
    Ok(Some(Admitted::Tenant(info, buf)))
}

/// Answers protocol options we do not know (NegotiateProtocolVersion) and refuses replication connections.
async fn check_packet(stream: &mut Stream, message: &StartupMessage) -> Result<(), PgError> {
    let unsupported = message.protocol_options();
    if message.minor > 0 || !unsupported.is_empty() {
        let mut out = BytesMut::new();
        messages::negotiate_protocol_version(&mut out, 0, &unsupported);
        stream
            .write_all(&out)
            .await
            .map_err(|_| PgError::from(ClientError::Protocol("client gone".into())))?;
    }
    if message
        .get("replication")
        .is_some_and(|r| !matches!(r, "false" | "off" | "no" | "0"))
    {
        return Err(ClientError::Replication.into());
    }
    Ok(())
}

/// The startup parameters a backend session is given (not the connection's own), sorted.
fn session_params(message: &StartupMessage) -> Vec<(String, String)> {
    let mut params: Vec<(String, String)> = message
        .params
        .iter()
        .filter(|(k, _)| !CONNECTION_PARAMS.contains(&k.as_str()) && !k.starts_with("_pq_."))
        .cloned()
        .collect();
    params.sort();
    params
}

/// The startup tenant's guards and client limit; refusals end the login (FATAL).
fn admit_tenant(
    shared: &Arc<Shared>,
    tenant: &TenantId,
    params: &[(String, String)],
    options: &[String],
) -> Result<TenantSlot, PgError> {
    if let Some(route) = shared.router.load().get(tenant.as_str()) {
        guards::check_startup(params, options, route, tenant.as_str()).map_err(fatal)?;
    }
    tenant_slot_for(shared, tenant).map_err(fatal)
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
        ClientError::TooManyTenantClients {
            tenant: tenant.clone(),
            limit: max.unwrap_or_default(),
        }
        .into()
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
        return Err(ClientError::TlsRequired(user.name.clone()).into());
    }
    if user.networks.is_empty() {
        return Ok(());
    }
    let allowed = peer.is_some_and(|p| user.networks.iter().any(|n| n.contains(p.ip())));
    if !allowed {
        warn!(user = %user.name, ?peer, "login from a network the user may not connect from");
        return Err(ClientError::NetworkRefused {
            user: user.name.clone(),
            peer: peer
                .map(|p| p.ip().to_string())
                .unwrap_or_else(|| "here".into()),
        }
        .into());
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
        TenantError::Conflict { .. } => ClientError::TenantConflict(e.to_string()).fatal(),
        TenantError::InvalidName(_) => ClientError::InvalidTenantName(e.to_string()).fatal(),
    })?;
    let (tenant, fixed) = match named {
        Some(t) => (t, true),
        None if !config.proxy.default_tenant.is_empty() => {
            match TenantId::parse(&config.proxy.default_tenant) {
                Ok(t) => (t, false),
                Err(e) => return Err(ClientError::InvalidTenantName(e.to_string()).fatal()),
            }
        }
        None if config.proxy.tenant_sources.contains(&TenantSource::Set) => {
            return Ok((None, false))
        }
        None => return Err(ClientError::NoTenantNamed.fatal()),
    };
    if table.get(tenant.as_str()).is_none() {
        return Err(ClientError::UnknownTenant(tenant.to_string()).fatal());
    }
    if !may_reach(&user.tenants, &tenant) {
        warn!(user = %user.name, %tenant, "user tried to reach a tenant it may not");
        return Err(ClientError::TenantLoginNotAllowed {
            user: user.name.clone(),
            tenant,
        }
        .fatal());
    }
    Ok((Some(tenant), fixed))
}

/// The console role of `user` when the client asked for the admin console's database; a user who may not use
/// it is refused (42501).
fn console_role(
    shared: &Shared,
    message: &StartupMessage,
    user: &str,
) -> Result<Option<crate::console::Role>, PgError> {
    let config = shared.config.load();
    if message.get("database") != Some(config.proxy.admin_database.as_str()) {
        return Ok(None);
    }
    crate::console::role_of(&config.proxy, user).map(Some).ok_or_else(|| {
        PgError::fatal(
            crate::protocol::sqlstate::INSUFFICIENT_PRIVILEGE,
            format!("user {user:?} may not use the admin console (proxy.admin_users, proxy.stats_users)"),
        )
    })
}
