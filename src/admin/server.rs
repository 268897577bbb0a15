//! Admin listeners. The unix socket is created with mode 0600; a stale socket file (no one listening) is
//! replaced, a live one is an error. Each connection carries any number of requests, one JSON line each; an
//! error answer leaves the connection usable. The TCP listener requires the token on a connection's first
//! request (and any later request that carries one must carry the right one).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::Semaphore;
use tracing::Instrument;
use tracing::{info, warn};

use super::cmd::execute;
use super::code::{AdminCode, AdminError};
use super::reply::Response;
use super::request::{self, MAX_REQUEST_BYTES};
use crate::auth::scram::constant_time_eq;
use crate::context::Shared;
use crate::frontend::limits::LoginSlots;

/// Admin connections served at once; more wait for a free slot (unix) or are closed (TCP).
const MAX_ADMIN_CONNECTIONS: usize = 16;
/// A TCP admin connection must send its first (token-carrying) request within this.
const FIRST_LINE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// An admin connection that sends nothing for this long is closed.
const ADMIN_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum AdminServerError {
    #[error("admin socket {path}: another pgtenant is listening there")]
    InUse { path: String },
    #[error("admin socket {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Binds the unix socket, replacing a stale file, and restricts it to the owner.
pub fn bind_unix(path: &Path) -> Result<UnixListener, AdminServerError> {
    let shown = path.display().to_string();
    let io = |source| AdminServerError::Io {
        path: shown.clone(),
        source,
    };
    if let Some(dir) = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        // A directory of our own, closed to everyone else: nobody can take the socket's name before we bind.
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    if path.exists() {
        // A socket that accepts a connection has a live owner. Asked three times: a process that forked while
        // an earlier listener of ours was still open holds its descriptor until it execs, and may answer once.
        let live = (0..3).all(|i| {
            if i > 0 {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            std::os::unix::net::UnixStream::connect(path).is_ok()
        });
        if live {
            return Err(AdminServerError::InUse { path: shown });
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

pub async fn serve_unix(listener: UnixListener, shared: Arc<Shared>) {
    use std::os::unix::fs::MetadataExt;
    let slots = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    // Only the socket's owner (and root) may administer; this also covers the moment between bind and chmod.
    let owner = std::fs::metadata(shared.config.load().proxy.admin_socket_path())
        .map(|m| m.uid())
        .ok();
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let uid = stream.peer_cred().ok().map(|c| c.uid());
        if uid.is_none() || (uid != Some(0) && uid != owner) {
            warn!(?uid, "admin connection from another user refused");
            let mut answer = Response::refusal(AdminError::new(
                AdminCode::Unauthorized,
                "not the proxy's user",
            ));
            answer.push('\n');
            let _ = stream.write_all(answer.as_bytes()).await;
            continue;
        }
        let actor = format!("uid:{}", uid.unwrap_or_default());
        let (shared, slots) = (shared.clone(), slots.clone());
        tokio::spawn(async move {
            let Ok(_slot) = slots.acquire_owned().await else {
                return;
            };
            connection(stream, shared, actor, None, Vec::new()).await;
        });
    }
}

/// The TCP listener: a connection must send a request carrying the right token as its first line within
/// [`FIRST_LINE_TIMEOUT`]; until then it holds one of a few places of its own (the oldest silent one is closed
/// when they run out), and only an authenticated connection takes one of the served places. Surplus
/// connections are closed at once, never queued.
pub async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>) {
    let served = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    let unauthenticated = LoginSlots::new(MAX_ADMIN_CONNECTIONS);
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let Some(ticket) = unauthenticated.enter() else {
            continue;
        };
        let (shared, served) = (shared.clone(), served.clone());
        tokio::spawn(async move {
            let actor = format!("tcp:{peer}");
            let first = tokio::select! {
                r = tokio::time::timeout(FIRST_LINE_TIMEOUT, first_line(stream)) => r,
                _ = ticket.evicted() => return,
            };
            let Ok(Some((mut stream, line, rest))) = first else {
                return;
            };
            drop(ticket);
            let token = shared.config.load().proxy.admin_token.clone();
            let authenticated = request::parse(&line)
                .ok()
                .and_then(|(_, given)| given)
                .is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes()));
            if !authenticated {
                warn!(
                    actor,
                    "admin connection without the right token on its first line"
                );
                let mut answer = Response::refusal(AdminError::new(
                    AdminCode::Unauthorized,
                    "missing or wrong admin token",
                ));
                answer.push('\n');
                let _ = stream.write_all(answer.as_bytes()).await;
                return;
            }
            let Ok(_slot) = served.try_acquire_owned() else {
                let mut answer = Response::refusal(AdminError::new(
                    AdminCode::TooManyConnections,
                    format!("at most {MAX_ADMIN_CONNECTIONS} admin connections at once"),
                ));
                answer.push('\n');
                let _ = stream.write_all(answer.as_bytes()).await;
                return;
            };
            let mut pending = line;
            pending.push(b'\n');
            pending.extend_from_slice(&rest);
            connection(stream, shared, actor, Some(token), pending).await;
        });
    }
}

/// Reads up to the first newline (bounded); returns the stream, the line and whatever followed it.
async fn first_line(mut stream: TcpStream) -> Option<(TcpStream, Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let rest = buf.split_off(end + 1);
            buf.truncate(end);
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return Some((stream, buf, rest));
        }
        if buf.len() > MAX_REQUEST_BYTES {
            return None;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Serves requests on one connection until it closes or sends an over-long line.
async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    shared: Arc<Shared>,
    actor: String,
    token: Option<String>,
    mut buf: Vec<u8>,
) {
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let line = line.strip_suffix(b"\n").unwrap_or(&line);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let mut answer = answer(&shared, line, &actor, token.as_deref()).await;
            answer.push('\n');
            if stream.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
        if buf.len() > MAX_REQUEST_BYTES {
            let mut answer = Response::refusal(AdminError::new(
                AdminCode::RequestTooLarge,
                format!("requests are limited to {MAX_REQUEST_BYTES} bytes"),
            ));
            answer.push('\n');
            let _ = stream.write_all(answer.as_bytes()).await;
            return;
        }
        match tokio::time::timeout(ADMIN_IDLE_TIMEOUT, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn answer(shared: &Arc<Shared>, line: &[u8], actor: &str, token: Option<&str>) -> String {
    let (request, given) = match request::parse(line) {
        Ok(r) => r,
        Err(e) => return Response::refusal(e),
    };
    // The connection proved the token on its first line; a later request may leave it out, but one it gives
    // must be right.
    if let (Some(expected), Some(given)) = (token, given.as_deref()) {
        if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
            warn!(actor, "admin request with a missing or wrong token");
            return Response::refusal(AdminError::new(
                AdminCode::Unauthorized,
                "missing or wrong admin token",
            ));
        }
    }
    let command = request.command();
    let span = tracing::info_span!("admin", actor, command);
    match execute(shared, request, actor).instrument(span).await {
        Ok(result) => {
            info!(actor, command, "admin command");
            Response::line(Ok(result))
        }
        Err(e) => {
            info!(
                actor,
                command,
                code = e.code.as_str(),
                "admin command refused"
            );
            Response::refusal(e)
        }
    }
}
