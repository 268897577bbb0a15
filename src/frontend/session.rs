//! A client session: who the client is ([`ClientInfo`]), the parts it is made of (see `parts`), how it starts
//! (attach the startup tenant's backend, the startup reply) and how it ends (last words, the backend connection
//! given back or closed). The relay loop is in `relay`.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tracing::debug;

use super::client_info::ClientInfo;
use super::parts::{ClientSide, End, Place, Pooling, Txn};
use super::resolve::connect_server;
use super::server::Server;
use super::state::SessionState;
use super::timeouts::Timeouts;
use crate::cancel::{synthetic_pid, CancelKey};
use crate::config::PoolMode;
use crate::context::Shared;
use crate::errors::ClientError;
use crate::metrics::ErrorKind;
use crate::net::Stream;
use crate::protocol::tag;
use crate::protocol::{messages, PgError};
use crate::sessions::SessionHandle;

/// How long a closing session may spend delivering its last messages.
const FINAL_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long frames a departed client left on their way to the backend get to be delivered and run (see
/// `deliver_last_frames`); the session's gate pass is held meanwhile, so a cutover waits for them.
const LAST_FRAMES_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Session {
    pub(super) shared: Arc<Shared>,
    pub(super) info: ClientInfo,
    pub(super) client: ClientSide,
    pub(super) server: Option<Server>,
    pub(super) txn: Txn,
    pub(super) pooling: Pooling,
    pub(super) place: Place,
    /// Session state to carry to another backend connection, or that pins the session to this one.
    pub(super) state: SessionState,
    pub(super) cancel: CancelKey,
    /// This session in the registry the admin socket reads.
    pub(super) handle: SessionHandle,
    /// Client timeouts (`None` when none is configured).
    pub(super) timeouts: Option<Box<Timeouts>>,
    /// The session runs on a single-threaded runtime, where the relay's reads may trust their last
    /// registration (see `rawio::poll_recv_armed`).
    pub(super) one_thread: bool,
}

impl Session {
    /// Attaches the startup tenant's backend (if any), registers the cancel key, and writes the startup reply.
    /// On failure the stream is handed back with the error to report.
    pub async fn start(
        shared: Arc<Shared>,
        client: Stream,
        cin: BytesMut,
        info: ClientInfo,
    ) -> Result<Session, (Stream, PgError)> {
        let attached = match &info.startup_tenant {
            Some(t) => match connect_server(&shared, &info, t).await {
                Ok(a) => Some(a),
                Err(mut e) => {
                    e.severity = messages::Severity::Fatal;
                    return Err((client, e));
                }
            },
            None => None,
        };
        let pid = attached
            .as_ref()
            .map(|a| a.server.conn.get().pid)
            .unwrap_or_else(synthetic_pid);
        let cancel = shared.cancels.register(pid);
        let told = match &attached {
            Some(a) => {
                shared.remember_params(&a.server.conn.get().params);
                a.server.conn.get().params.clone()
            }
            None => fallback_params(&shared, &info),
        };
        let handle = shared
            .sessions
            .register(&info.user_name, info.peer, cancel.slot.clone());
        let config = shared.config.load_full();
        let tx_mode = config.proxy.pool_mode == PoolMode::Transaction;
        let mut session = Session {
            client: ClientSide::new(client, cin, told),
            server: None,
            txn: Txn::default(),
            pooling: Pooling {
                tx_mode,
                ..Pooling::default()
            },
            place: Place::default(),
            state: SessionState::default(),
            cancel,
            handle,
            timeouts: Timeouts::new(&config.proxy),
            one_thread: crate::net::on_one_thread(),
            shared,
            info,
        };
        if tx_mode {
            session.state.set_pooled();
        }
        let tenant = session.info.startup_tenant.clone();
        session.install(tenant, attached);
        Box::pin(session.settle()).await;
        // Whatever settling told the client goes out as the startup reply's own parameters below: nothing may
        // precede AuthenticationOk.
        session.client.cout.clear();
        messages::auth_ok(&mut session.client.cout);
        for (k, v) in &session.client.told {
            messages::parameter_status(&mut session.client.cout, k, v);
        }
        messages::backend_key_data(
            &mut session.client.cout,
            session.cancel.pid,
            session.cancel.secret,
        );
        messages::ready_for_query(&mut session.client.cout, tag::status::IDLE);
        Ok(session)
    }

    /// Relays until either side ends, then says goodbye. The session is boxed: an async fn keeps its arguments
    /// twice in its state (rust-lang/rust#62958), and the session is most of a connection's task.
    pub async fn run(mut self: Box<Self>) {
        let info = self.handle.info.clone();
        // Shutdown fires every session's own end signal (see `shutdown::Terminate`); a session registered
        // after that sees the proxy's flag at its first relay step.
        let shutdown = info.end.fired();
        tokio::pin!(shutdown);
        let end = self.relay(shutdown).await;
        self.finish(end).await;
    }

    /// Delivers the last words, returns or closes the backend connection, and closes the client.
    async fn finish(&mut self, end: End) {
        let broken = matches!(end, End::ServerGone);
        // A reply held for the tee belongs to a transaction that did commit on the source: it goes out first.
        let held = std::mem::take(&mut self.txn.held);
        self.client.cout.extend_from_slice(&held);
        match &end {
            End::Fatal(e) => e.encode(&mut self.client.cout),
            End::ServerGone if !self.server.as_ref().is_some_and(|s| s.sent_fatal) => {
                ClientError::BackendClosed
                    .to_pg()
                    .encode(&mut self.client.cout)
            }
            End::Shutdown => ClientError::Shutdown.to_pg().encode(&mut self.client.cout),
            _ => {}
        }
        if let Some(mut server) = self.server.take() {
            // The key stops pointing at the connection before another session may get it.
            self.cancel.slot.set(None);
            // A client that died inside a frame left the backend holding part of it.
            let cut = broken || self.client.scan.mid_frame();
            // (Also when all was sent but replies are owed: closing with their input unread resets the
            // connection, which can drop what the kernel had not sent yet.)
            let underway = !server.out.is_empty() || server.pending > 0 || server.copy_in;
            if !cut && underway && matches!(end, End::Terminated | End::ClientGone) {
                deliver_last_frames(&mut server).await;
                server.release(true);
            } else {
                server.release(cut);
            }
        }
        self.end_transaction(false);
        if let Some(tm) = self.place.tm.take() {
            tm.add(&mut self.txn.tally);
            tm.client_left();
        }
        if matches!(end, End::ServerGone) {
            self.count_error(ErrorKind::ServerLost);
        }
        if !matches!(end, End::ClientGone) {
            let out = std::mem::take(&mut self.client.cout);
            let client = &mut self.client.stream;
            let _ = tokio::time::timeout(FINAL_WRITE_TIMEOUT, async move {
                client.write_all(&out).await?;
                client.flush().await?;
                client.shutdown().await
            })
            .await;
        }
        debug!(?end, "session ended");
    }

    /// The transaction status the client last saw.
    pub(super) fn status(&self) -> u8 {
        self.server.as_ref().map_or(tag::status::IDLE, |s| s.status)
    }
}

/// Frames the client sent before its Terminate (or before closing) that were still on their way to the backend:
/// PostgreSQL runs what it has read before it sees the Terminate or the end of the connection (a Query and a
/// Terminate sent together commit the Query's statement), so they are written before the connection is
/// closed. Its write side is then shut, and its replies read and dropped until the backend, done with them,
/// closes: closing a socket with unread input resets the connection, which can drop what was still queued
/// to send. Both steps are bounded; the connection is closed afterwards either way (its replies went nowhere).
async fn deliver_last_frames(server: &mut Server) {
    let out = std::mem::take(&mut server.out);
    let stream = &mut server.conn.get_mut().stream;
    let _ = tokio::time::timeout(LAST_FRAMES_TIMEOUT, async move {
        stream.write_all(&out).await?;
        stream.flush().await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 8192];
        while tokio::io::AsyncReadExt::read(stream, &mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// What a client that starts without a tenant is told: the parameters last seen from any backend, or plain
/// defaults before any backend was seen, with the client's own settings on top (a backend would echo them).
fn fallback_params(shared: &Shared, info: &ClientInfo) -> Vec<(String, String)> {
    let mut params = shared
        .last_params
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if params.is_empty() {
        for (k, v) in [
            ("server_version", "15.0"),
            ("server_encoding", "UTF8"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
            ("IntervalStyle", "postgres"),
            ("TimeZone", "UTC"),
            ("integer_datetimes", "on"),
            ("standard_conforming_strings", "on"),
            ("is_superuser", "off"),
        ] {
            params.push((k.into(), v.into()));
        }
    }
    super::parts::set_param(&mut params, "session_authorization", &info.user_name);
    for (k, v) in &info.params {
        if params.iter().any(|(name, _)| name == k) || k == "application_name" {
            super::parts::set_param(&mut params, k, v);
        }
    }
    params
}
