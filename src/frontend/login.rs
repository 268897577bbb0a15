//! From an accepted socket to a running session: handshake, authentication, tenant resolution, the first
//! backend connection and the startup reply.

use std::sync::Arc;

use bytes::BytesMut;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::auth::{authenticate, AuthFailure};
use super::session::{ClientInfo, Session};
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

/// Handles one accepted client connection to its end. `admitted` is false when the client limit is reached:
/// such a client is told so (53300) after its startup packet, like PostgreSQL does.
pub async fn serve_client(shared: Arc<Shared>, tcp: TcpStream, admitted: bool) {
    let peer = tcp.peer_addr().ok();
    let _ = tcp.set_nodelay(true);
    let timeout = shared.config.load().proxy.login_timeout();
    // Boxed: the login's state (handshake, TLS, SCRAM) is several KiB, and inline it would size this task for
    // the connection's whole life; on the heap it is freed once the session starts.
    let login = Box::pin(login(&shared, tcp, admitted));
    let session = match tokio::time::timeout(timeout, login).await {
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
    admitted: bool,
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
    match admit(shared, &mut stream, buf, &message, admitted).await {
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
    admitted: bool,
) -> Result<Option<(ClientInfo, BytesMut)>, PgError> {
    if !admitted {
        return Err(PgError::fatal(
            sqlstate::TOO_MANY_CONNECTIONS,
            "sorry, too many clients already",
        ));
    }
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

    let entry = match authenticate(stream, &mut buf, &users, user, raw_user).await {
        Ok(e) => e,
        Err(AuthFailure::Closed) => return Ok(None),
        Err(AuthFailure::Refused(e)) => {
            info!(user = raw_user, "client authentication failed");
            shared.metrics.auth_failures.increment(1);
            return Err(e);
        }
    };

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
    let info = ClientInfo {
        user: entry,
        user_name: user.to_owned(),
        database: message.get("database").map(str::to_owned),
        params,
        options,
        startup_tenant: tenant,
        tenant_fixed: fixed,
        peer: stream.tcp().peer_addr().ok(),
    };
    Ok(Some((info, buf)))
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
