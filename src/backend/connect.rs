//! Opening a backend connection: TCP, optional TLS, the startup packet and authentication (trust, cleartext,
//! md5, SCRAM-SHA-256), then ParameterStatus and BackendKeyData up to the first ReadyForQuery.

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::SCRAM_SHA_256;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use rustls::pki_types::ServerName;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::conn::{ServerConn, StartupTag};
use super::{Backend, Pool};
use crate::auth::scram_client::ScramClient;
use crate::config::SslMode;
use crate::errors::ClientError;
use crate::net::Stream;
use crate::protocol::tag::field;
use crate::routing::BackendId;

/// Handshake messages larger than this end the attempt.
const MAX_HANDSHAKE_BUFFER: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("connecting to backend {backend}: {source}")]
    Io {
        backend: BackendId,
        source: std::io::Error,
    },
    #[error("backend {0} did not answer in time")]
    Timeout(BackendId),
    #[error("backend {0} refused TLS but sslmode is require")]
    TlsRefused(BackendId),
    #[error("backend {backend} authentication: {reason}")]
    Auth { backend: BackendId, reason: String },
    #[error("backend {backend} refused the connection: {code} {message}")]
    Server {
        backend: BackendId,
        code: String,
        message: String,
    },
    #[error("backend {backend} protocol error: {reason}")]
    Protocol { backend: BackendId, reason: String },
}

impl ConnectError {
    /// What the client is told. Server refusals keep their SQLSTATE and text (as PgBouncer does); our own
    /// failures say which backend without internal detail.
    pub fn to_client(&self) -> ClientError {
        match self {
            ConnectError::Server { code, message, .. } => ClientError::BackendRefused {
                code: code.clone(),
                message: message.clone(),
            },
            other => ClientError::BackendUnreachable {
                detail: match other {
                    ConnectError::Timeout(b) => format!("backend {b} did not answer in time"),
                    ConnectError::Io { backend, .. } => format!("backend {backend} is unreachable"),
                    ConnectError::Auth { backend, .. } => {
                        format!("pgtenant could not log in to backend {backend}")
                    }
                    _ => "backend handshake failed".to_string(),
                },
            },
        }
    }
}

/// Opens and authenticates a connection for `pool` (its backend, database and login) with the startup
/// parameters in `tag`.
pub async fn connect(pool: &Pool, tag: Arc<StartupTag>) -> Result<ServerConn, ConnectError> {
    let backend = &pool.backend;
    let timeout = backend.timeouts.connect;
    match tokio::time::timeout(timeout, connect_inner(pool, tag)).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout(backend.name.clone())),
    }
}

async fn connect_inner(pool: &Pool, tag: Arc<StartupTag>) -> Result<ServerConn, ConnectError> {
    let backend = &*pool.backend;
    let database = pool.database.as_str();
    let cfg = &backend.config;
    let io = |source| ConnectError::Io {
        backend: backend.name.clone(),
        source,
    };
    let mut stream = match backend.dialer.get() {
        Some(dial) => Stream::Memory(dial()),
        None => {
            let tcp = TcpStream::connect((cfg.host.as_str(), cfg.port))
                .await
                .map_err(io)?;
            tcp.set_nodelay(true).map_err(io)?;
            crate::net::keepalive::apply(&tcp, backend.timeouts.keepalive);
            negotiate_tls(backend, tcp).await?
        }
    };

    let mut buf = BytesMut::with_capacity(1024);
    let mut params: Vec<(&str, &str)> =
        vec![("user", pool.login.user.as_str()), ("database", database)];
    params.extend(tag.params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    frontend::startup_message(params, &mut buf).map_err(io)?;
    stream.write_all(&buf).await.map_err(io)?;
    buf.clear();

    let mut conn = ServerConn {
        stream,
        buf,
        pid: 0,
        secret: 0,
        params: Vec::new(),
        tag,
        host: cfg.host.as_str().into(),
        port: cfg.port,
        idle_since: Instant::now(),
        born: Instant::now(),
        statements: Default::default(),
        applied_sets: 0,
        applied_role: false,
        owner: None,
        suspect: false,
        turn_since: None,
        kept_until: None,
        route_path: None,
    };
    authenticate(pool, &mut conn).await?;
    Ok(conn)
}

async fn negotiate_tls(backend: &Backend, mut tcp: TcpStream) -> Result<Stream, ConnectError> {
    let Some(connector) = &backend.tls else {
        return Ok(Stream::plain(tcp));
    };
    let io = |source| ConnectError::Io {
        backend: backend.name.clone(),
        source,
    };
    let mut req = BytesMut::new();
    frontend::ssl_request(&mut req);
    tcp.write_all(&req).await.map_err(io)?;
    let answer = tcp.read_u8().await.map_err(io)?;
    match answer {
        b'S' => {
            let name = ServerName::try_from(backend.config.host.clone()).map_err(|e| {
                ConnectError::Protocol {
                    backend: backend.name.clone(),
                    reason: format!("host is not a valid TLS server name: {e}"),
                }
            })?;
            let tls = connector.connect(name, tcp).await.map_err(io)?;
            Ok(Stream::ClientTls(Box::new(tls)))
        }
        b'N' if backend.config.sslmode == SslMode::Prefer => Ok(Stream::plain(tcp)),
        b'N' => Err(ConnectError::TlsRefused(backend.name.clone())),
        _ => Err(ConnectError::Protocol {
            backend: backend.name.clone(),
            reason: "unexpected answer to SSLRequest".into(),
        }),
    }
}

/// Reads one backend message, reading more bytes as needed.
pub(super) async fn next_message(
    backend: &BackendId,
    conn: &mut ServerConn,
) -> Result<Message, ConnectError> {
    loop {
        let parsed = Message::parse(&mut conn.buf).map_err(|e| ConnectError::Protocol {
            backend: backend.clone(),
            reason: e.to_string(),
        })?;
        if let Some(m) = parsed {
            return Ok(m);
        }
        if conn.buf.len() > MAX_HANDSHAKE_BUFFER {
            return Err(ConnectError::Protocol {
                backend: backend.clone(),
                reason: "handshake message too large".into(),
            });
        }
        conn.buf.reserve(4096);
        let n = conn
            .stream
            .read_buf(&mut conn.buf)
            .await
            .map_err(|source| ConnectError::Io {
                backend: backend.clone(),
                source,
            })?;
        if n == 0 {
            return Err(ConnectError::Io {
                backend: backend.clone(),
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
    }
}

pub(super) fn server_error(
    backend: &BackendId,
    fields: postgres_protocol::message::backend::ErrorFields<'_>,
) -> ConnectError {
    use fallible_iterator::FallibleIterator;
    let (mut code, mut message) = (String::new(), String::new());
    let mut it = fields;
    while let Ok(Some(f)) = it.next() {
        let value = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            field::CODE => code = value,
            field::MESSAGE => message = value,
            _ => {}
        }
    }
    ConnectError::Server {
        backend: backend.clone(),
        code,
        message,
    }
}

async fn send(backend: &Backend, conn: &mut ServerConn, msg: &[u8]) -> Result<(), ConnectError> {
    conn.stream
        .write_all(msg)
        .await
        .map_err(|source| ConnectError::Io {
            backend: backend.name.clone(),
            source,
        })
}

async fn authenticate(pool: &Pool, conn: &mut ServerConn) -> Result<(), ConnectError> {
    let name = &pool.backend.name;
    let mut auth = Auth {
        pool,
        scram: None,
        authenticated: false,
    };
    let mut out = BytesMut::new();
    loop {
        out.clear();
        match next_message(name, conn).await? {
            Message::ParameterStatus(body) => {
                if let (Ok(k), Ok(v)) = (body.name(), body.value()) {
                    conn.set_param(k, v);
                }
            }
            Message::BackendKeyData(body) => {
                conn.pid = body.process_id();
                conn.secret = body.secret_key();
            }
            Message::NoticeResponse(_) => {}
            // Before AuthenticationOk an error is about our credentials, not the client's: do not pass its
            // 28P01 on as if the client's password were wrong.
            Message::ErrorResponse(body) if !auth.authenticated => {
                return Err(auth.failed(format!("{:?}", server_error(name, body.fields()))))
            }
            Message::ErrorResponse(body) => return Err(server_error(name, body.fields())),
            Message::ReadyForQuery(_) => return Ok(()),
            other => {
                auth.step(other, &mut out)?;
                if !out.is_empty() {
                    send(&pool.backend, conn, &out).await?;
                }
            }
        }
    }
}

/// Our side of the backend's authentication exchange (password, MD5 or SCRAM-SHA-256).
struct Auth<'a> {
    pool: &'a Pool,
    scram: Option<ScramClient>,
    authenticated: bool,
}

impl Auth<'_> {
    fn failed(&self, reason: String) -> ConnectError {
        ConnectError::Auth {
            backend: self.pool.backend.name.clone(),
            reason,
        }
    }

    /// Answers one authentication message into `out` (left empty when there is nothing to send).
    fn step(&mut self, msg: Message, out: &mut BytesMut) -> Result<(), ConnectError> {
        let (user, password) = (
            self.pool.login.user.as_str(),
            self.pool.login.password.expose(),
        );
        let pool = self.pool;
        let failed = |e: &dyn std::fmt::Display| ConnectError::Auth {
            backend: pool.backend.name.clone(),
            reason: e.to_string(),
        };
        match msg {
            Message::AuthenticationOk => self.authenticated = true,
            Message::AuthenticationCleartextPassword => {
                frontend::password_message(password.as_bytes(), out).map_err(|e| failed(&e))?
            }
            Message::AuthenticationMd5Password(body) => {
                let hash = postgres_protocol::authentication::md5_hash(
                    user.as_bytes(),
                    password.as_bytes(),
                    body.salt(),
                );
                frontend::password_message(hash.as_bytes(), out).map_err(|e| failed(&e))?;
            }
            Message::AuthenticationSasl(body) => {
                use fallible_iterator::FallibleIterator;
                let mut mechanisms = body.mechanisms();
                let mut has_scram = false;
                while let Ok(Some(m)) = mechanisms.next() {
                    has_scram |= m == SCRAM_SHA_256;
                }
                if !has_scram {
                    return Err(failed(&"server offers no SCRAM-SHA-256"));
                }
                let s = ScramClient::new(password);
                frontend::sasl_initial_response(SCRAM_SHA_256, &s.initial(), out)
                    .map_err(|e| failed(&e))?;
                self.scram = Some(s);
            }
            Message::AuthenticationSaslContinue(body) => {
                let s = self
                    .scram
                    .as_mut()
                    .ok_or_else(|| failed(&"unexpected SASL continue"))?;
                let answer = s
                    .respond(body.data(), &pool.scram_cache)
                    .map_err(|e| failed(&e))?;
                frontend::sasl_response(&answer, out).map_err(|e| failed(&e))?;
            }
            Message::AuthenticationSaslFinal(body) => {
                let s = self
                    .scram
                    .as_ref()
                    .ok_or_else(|| failed(&"unexpected SASL final"))?;
                s.verify(body.data()).map_err(|e| failed(&e))?;
            }
            _ => {
                return Err(ConnectError::Protocol {
                    backend: self.pool.backend.name.clone(),
                    reason: "unexpected message during startup".into(),
                })
            }
        }
        Ok(())
    }
}
