//! The relay: one task per client that moves raw frames both ways at once and looks only at what it must.
//!
//! Reads and writes on both sockets are polled together in one future ([`Session::poll_io`]), so a backend
//! that streams a large result while the client is still pipelining input never deadlocks the relay, and no
//! locks or extra tasks sit on the path. Flow control: a side is not read while the other side's outgoing
//! buffer is above [`OUT_HIGH_WATER`].
//!
//! What is inspected: from the client, the tag of every frame (to count the ReadyForQuery replies owed), and the
//! text of `Query`/`Parse` (where a `SET pgtenant.tenant` may hide); from the backend, ReadyForQuery (transaction
//! status), ParameterStatus (what the client has been told), and the severity of ErrorResponse.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::io::poll_read_buf;
use tracing::debug;

use super::state::SessionState;
use super::statements::{ClientStatements, Inflight};
use super::timeouts::{Phase, Timeouts};
use crate::auth::UserEntry;
use crate::backend::pool::ReleaseState;
use crate::backend::{Backends, Pool, PooledConn, StartupTag};
use crate::cancel::{synthetic_pid, CancelKey};
use crate::config::{Isolation, PoolMode};
use crate::context::Shared;
use crate::gate::{Gate, GatePass};
use crate::metrics::{ErrorKind, TenantMetrics};
use crate::net::Stream;
use crate::protocol::frame::{Direction, Scan, Scanner};
use crate::protocol::startup::join_options;
use crate::protocol::{inspect, messages, sqlstate, PgError};
use crate::routing::Route;
use crate::sessions::SessionHandle;
use crate::tenant::{quote_ident, TenantId};

/// Frames the proxy must see whole are waited for up to this size; larger ones stream through uninspected.
pub const WHOLE_FRAME_MAX: usize = 1 << 20;
/// Stop reading a side while the buffer towards the other side holds more than this.
pub const OUT_HIGH_WATER: usize = 256 * 1024;
/// Reads stop once this much client input is waiting to be handled (unless a whole frame needs more).
const CLIENT_IN_MAX: usize = 64 * 1024;
/// Capacity of the held-reply buffer kept across transactions.
const HELD_KEEP: usize = 4 * 1024;
/// An idle session's read buffers stay this small; they double while reads keep filling them.
const READ_MIN: usize = 1024;
/// How long a closing session may spend delivering its last messages.
const FINAL_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// The places a logged-in client holds under the client limits; given back when the session ends.
pub struct Admission {
    pub(super) _client: tokio::sync::OwnedSemaphorePermit,
    pub(super) _user: super::limits::UserSlot,
    /// Changes when `SET pgtenant.tenant` moves the session.
    pub(super) tenant: Option<super::limits::TenantSlot>,
}

/// Who the client is and what it asked for at startup; fixed for the session's life.
pub struct ClientInfo {
    pub admission: Admission,
    pub user: Arc<UserEntry>,
    /// Configured user name (without tenant suffix).
    pub user_name: String,
    pub database: Option<String>,
    /// Session parameters from the startup packet (sorted), passed to backends.
    pub params: Vec<(String, String)>,
    /// The client's `options` arguments, `pgtenant.tenant` removed.
    pub options: Vec<String>,
    pub startup_tenant: Option<TenantId>,
    /// True when the client named its tenant at startup; then SET may not move it to another.
    pub tenant_fixed: bool,
    pub peer: Option<std::net::SocketAddr>,
}

/// How an error skip ends at the client's Sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SkipEnd {
    /// Nothing of the batch reached a backend: answer the Sync ourselves.
    Local,
    /// Part of the batch went to the backend: send it the Sync; the backend answers it.
    ForwardSync,
}

/// The backend side of a session.
pub(super) struct Server {
    pub conn: PooledConn,
    pub out: BytesMut,
    pub scan: Scanner,
    pub flush: bool,
    /// ReadyForQuery replies still owed for Query, Sync and FunctionCall frames sent.
    pub pending: u32,
    /// Transaction status from the last ReadyForQuery.
    pub status: u8,
    /// The backend already told the client it is ending (FATAL), so we need not.
    pub sent_fatal: bool,
    /// Extended-protocol messages were sent since the last Sync: the batch is not finished.
    pub batch_open: bool,
    /// The backend is in copy-in mode (it ignores Sync there).
    pub copy_in: bool,
    /// Syncs sent since the last Execute or Query: those the backend will ignore if that started a COPY.
    pub syncs_since_exec: u32,
    /// The backend's next ErrorResponse (before the next ReadyForQuery) is replaced by this one.
    pub replace_error: Option<PgError>,
    /// Parse and Close frames awaiting completion (transaction pool mode rewrites and adds some).
    pub inflight: Inflight,
    /// Transaction pool mode: the connection's session settings were made this session's, so what it holds
    /// when it goes back is this session's SETs.
    pub synced: bool,
}

impl Server {
    /// Books a client frame sent to this backend: replies owed, batch and COPY state. Returns whether the
    /// backend will answer it with a ReadyForQuery.
    pub(super) fn note_sent(&mut self, tag: u8) -> bool {
        match tag {
            b'Q' => {
                self.pending += 1;
                self.inflight.sent_ready();
                self.syncs_since_exec = 0;
                return true;
            }
            b'F' => {
                self.pending += 1;
                self.inflight.sent_ready();
                return true;
            }
            b'S' => {
                self.batch_open = false;
                // PostgreSQL ignores Sync during copy-in.
                if !self.copy_in {
                    self.pending += 1;
                    self.inflight.sent_ready();
                    self.syncs_since_exec += 1;
                    return true;
                }
            }
            b'E' => {
                self.batch_open = true;
                self.syncs_since_exec = 0;
            }
            b'P' | b'B' | b'D' | b'C' => self.batch_open = true,
            b'c' | b'f' => self.copy_in = false,
            _ => {}
        }
        false
    }

    /// Nothing is owed, unsent, half-read or half-finished: the connection may be reset and reused.
    fn quiet(&self) -> bool {
        self.out.is_empty()
            && self.pending == 0
            && !self.batch_open
            && !self.copy_in
            && !self.scan.mid_frame()
            && self.conn.get().buf.is_empty()
    }

    /// Idle outside a transaction with nothing owed or pending: a transaction-pool session may give it back.
    pub(super) fn parkable(&self) -> bool {
        self.status == b'I' && self.replace_error.is_none() && self.quiet()
    }

    pub(super) fn release_idle(self) {
        self.release(false)
    }

    pub(super) fn release(self, broken: bool) {
        let clean = !broken && self.quiet();
        let state = match (clean, self.status) {
            (false, _) => ReleaseState::Dirty,
            (true, b'I') => ReleaseState::Idle,
            (true, _) => ReleaseState::InTransaction,
        };
        self.conn.release(state);
    }
}

/// Why a session ended.
#[derive(Debug)]
pub(super) enum End {
    ClientGone,
    /// The client sent Terminate.
    Terminated,
    ServerGone,
    Shutdown,
    Fatal(PgError),
}

enum Ev {
    ClientIn,
    ServerIn,
    ClientOut(usize),
    ServerOut(usize),
    ClientFlushed,
    ServerFlushed,
    Shutdown,
    /// The migration tee has the transaction's changes on the target (or gave up waiting).
    TeeDone,
    /// A client timeout may have passed.
    Timer,
}

pub struct Session {
    pub(super) shared: Arc<Shared>,
    pub(super) info: ClientInfo,
    pub(super) client: Stream,
    pub(super) cin: BytesMut,
    pub(super) cout: BytesMut,
    cflush: bool,
    /// Bytes `cin` must hold before the next frame can be judged.
    pub(super) cin_need: usize,
    pub(super) server: Option<Server>,
    pub(super) tenant: Option<TenantId>,
    /// ParameterStatus values the client has been told.
    pub(super) told: Vec<(String, String)>,
    pub(super) cancel: CancelKey,
    /// After an error in the extended protocol, client messages are dropped up to Sync (as PostgreSQL does).
    pub(super) skip: Option<SkipEnd>,
    /// The rest of a refused streamed frame is dropped.
    pub(super) discarding: bool,
    pub(super) cscan: Scanner,
    /// This session in the registry the admin socket reads.
    pub(super) handle: SessionHandle,
    /// The tenant's gate, and the pass held from the start of a transaction to its end.
    pub(super) gate: Option<Arc<Gate>>,
    pub(super) pass: Option<GatePass>,
    /// The route and routing epoch the backend connection was chosen under.
    pub(super) route: Option<Arc<Route>>,
    pub(super) epoch: u64,
    /// Why the session may not move to another backend (state that would not follow it), if anything.
    /// Session state to carry to another backend connection, or that pins the session to this one.
    pub(super) state: SessionState,
    /// Since when a route change has been waiting for this pinned session to unpin.
    pub(super) stale_since: Option<std::time::Instant>,
    pub(super) tm: Option<Arc<TenantMetrics>>,
    /// Query/Execute messages in the current transaction, added to the tenant's counter when it ends.
    pub(super) queries: u64,
    /// A statement the proxy answers itself waits at the head of `cin` until the backend owes nothing.
    pub(super) blocked: bool,
    /// The current transaction changed rows (judged from CommandComplete tags and COPY FROM).
    pub(super) wrote: bool,
    /// While a migration tee drains this transaction's changes to the target, the reply that ends it (what the
    /// backend sent up to its ReadyForQuery in that read) waits in `held` and neither side is processed further.
    pub(super) tee_wait: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
    pub(super) held: BytesMut,
    /// Transaction pool mode: the backend connection is held only from the start of a transaction to its end.
    pub(super) tx_mode: bool,
    /// Transaction pool mode: the client's named statements, prepared on each connection as needed.
    pub(super) statements: ClientStatements,
    /// Transaction pool mode: where the tenant's transactions went last (reused while nothing changed).
    pub(super) resolved: Option<Resolved>,
    /// Transaction pool mode: the output buffer and in-flight queue of the last backend connection, kept for
    /// the next one (buffers swap between the client's input and the backend's output; dropping them at every
    /// park would cost an allocation per transaction).
    pub(super) spare: Option<(BytesMut, Inflight)>,
    /// Client timeouts (`None` when none is configured).
    pub(super) timeouts: Option<Box<Timeouts>>,
    /// Transaction pooling of a shared pool: the tenant's schema, set per transaction (see [`resolve`]).
    pub(super) route_path: Option<Arc<str>>,
    /// The pin reason the session registry was last told.
    pub(super) published_pin: Option<&'static str>,
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
        let handle = shared.sessions.register(&info.user_name, info.peer);
        let mut session = Session {
            tenant: None,
            shared,
            info,
            client,
            cin,
            cout: BytesMut::new(),
            cscan: Scanner::new(Direction::FromClient, WHOLE_FRAME_MAX),
            cflush: false,
            cin_need: 0,
            server: None,
            told,
            cancel,
            skip: None,
            discarding: false,
            blocked: false,
            handle,
            gate: None,
            pass: None,
            route: None,
            epoch: 0,
            state: SessionState::default(),
            stale_since: None,
            tm: None,
            queries: 0,
            wrote: false,
            tee_wait: None,
            held: BytesMut::new(),
            tx_mode: false,
            statements: ClientStatements::default(),
            resolved: None,
            spare: None,
            timeouts: None,
            route_path: None,
            published_pin: None,
        };
        session.timeouts = Timeouts::new(&session.shared.config.load().proxy);
        session.tx_mode = session.shared.config.load().proxy.pool_mode == PoolMode::Transaction;
        if session.tx_mode {
            session.state.set_pooled();
        }
        let tenant = session.info.startup_tenant.clone();
        session.install(tenant, attached);
        Box::pin(session.settle()).await;
        // Whatever settling told the client goes out as the startup reply's own parameters below: nothing may
        // precede AuthenticationOk.
        session.cout.clear();
        messages::auth_ok(&mut session.cout);
        for (k, v) in &session.told {
            messages::parameter_status(&mut session.cout, k, v);
        }
        messages::backend_key_data(&mut session.cout, session.cancel.pid, session.cancel.secret);
        messages::ready_for_query(&mut session.cout, b'I');
        Ok(session)
    }

    /// Relays until either side ends, then says goodbye. The session is boxed: an async fn keeps its arguments
    /// twice in its state (rust-lang/rust#62958), and the session is most of a connection's task.
    pub async fn run(mut self: Box<Self>) {
        let shared = self.shared.clone();
        let info = self.handle.info.clone();
        // Either the whole proxy ends every session, or this one is told to end.
        let shutdown = async {
            tokio::select! {
                _ = shared.terminate.fired() => {}
                _ = info.end.fired() => {}
            }
        };
        tokio::pin!(shutdown);
        let end = self.relay(shutdown).await;
        self.finish(end).await;
    }

    /// Why the session stops on a shutdown wake-up: told to end on its own (with its reason), or with the
    /// proxy.
    pub(super) fn shutdown_end(&self) -> End {
        match self.handle.info.take_end_reason() {
            Some(reason) => End::Fatal(reason),
            None => End::Shutdown,
        }
    }

    /// The session's client timeout fired: end it if the current phase's limit passed.
    fn on_timer(&mut self) -> Result<(), End> {
        let phase =
            if self.tee_wait.is_some() || self.server.as_ref().is_some_and(|s| s.pending > 0) {
                Phase::Busy
            } else if self.status() != b'I' {
                Phase::InTransaction
            } else {
                Phase::Idle
            };
        let Some(t) = self.timeouts.as_mut() else {
            return Ok(());
        };
        let Some(err) = t.check(phase) else {
            return Ok(());
        };
        tracing::info!(phase = ?phase, tenant = ?self.tenant, "client timeout; ending the session");
        if phase == Phase::Busy {
            // Stop the statement on the server too; the connection is closed either way.
            if let Some(target) = self.server.as_ref().map(|s| s.conn.get().cancel_target()) {
                tokio::spawn(async move {
                    let _ = crate::cancel::forward(target).await;
                });
            }
        }
        Err(End::Fatal(err))
    }

    async fn relay(&mut self, mut shutdown: Pin<&mut impl Future<Output = ()>>) -> End {
        if let Err(end) = self.on_client_input().await {
            return end;
        }
        loop {
            let ev = poll_fn(|cx| self.poll_io(cx, shutdown.as_mut())).await;
            let step = match ev {
                Ok(Ev::ClientOut(n)) => {
                    self.cout.advance(n);
                    trim(&mut self.cout);
                    // Plain TCP writes go straight to the socket; only TLS buffers and needs a flush.
                    self.cflush = self.client.is_tls();
                    // Input held back while our answers piled up can go on now.
                    if self.cout.len() < OUT_HIGH_WATER && !self.cin.is_empty() {
                        self.on_client_input().await
                    } else {
                        Ok(())
                    }
                }
                Ok(Ev::ServerOut(n)) => {
                    if let Some(s) = self.server.as_mut() {
                        s.out.advance(n);
                        trim(&mut s.out);
                        s.flush = s.conn.get().stream.is_tls();
                    }
                    Ok(())
                }
                Ok(Ev::ClientFlushed) => {
                    self.cflush = false;
                    Ok(())
                }
                Ok(Ev::ServerFlushed) => {
                    if let Some(s) = self.server.as_mut() {
                        s.flush = false;
                    }
                    Ok(())
                }
                Ok(Ev::ClientIn) => {
                    if let Some(t) = self.timeouts.as_mut() {
                        t.client_event();
                    }
                    self.on_client_input().await
                }
                Ok(Ev::ServerIn) => {
                    if let Some(t) = self.timeouts.as_mut() {
                        t.server_event();
                    }
                    self.after_server_input().await
                }
                Ok(Ev::Timer) => self.on_timer(),
                Ok(Ev::TeeDone) => self.after_tee().await,
                Ok(Ev::Shutdown) => Err(self.shutdown_end()),
                Err(end) => Err(end),
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Polls every socket operation that is wanted now and reports the first that is ready.
    fn poll_io(
        &mut self,
        cx: &mut Context<'_>,
        shutdown: Pin<&mut impl Future<Output = ()>>,
    ) -> Poll<Result<Ev, End>> {
        if self.shared.terminate.is_fired() || self.handle.info.end.is_fired() {
            return Poll::Ready(Ok(Ev::Shutdown));
        }
        if let Some(wait) = self.tee_wait.as_mut() {
            if wait.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(Ev::TeeDone));
            }
        }
        if let Poll::Ready(r) = poll_write_side(cx, &mut self.client, &self.cout, self.cflush) {
            return Poll::Ready(r.map(|w| w.client()).map_err(|_| End::ClientGone));
        }
        if let Some(s) = self.server.as_mut() {
            if let Poll::Ready(r) =
                poll_write_side(cx, &mut s.conn.get_mut().stream, &s.out, s.flush)
            {
                return Poll::Ready(r.map(|w| w.server()).map_err(|_| End::ServerGone));
            }
        }
        let server_out = self.server.as_ref().map_or(0, |s| s.out.len());
        if self.cin.len() < self.cin_need.max(CLIENT_IN_MAX)
            && server_out < OUT_HIGH_WATER
            && self.cout.len() < OUT_HIGH_WATER
        {
            read_space(&mut self.cin);
            match poll_read_buf(Pin::new(&mut self.client), cx, &mut self.cin) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    return Poll::Ready(Err(End::ClientGone))
                }
                Poll::Ready(Ok(_)) => return Poll::Ready(Ok(Ev::ClientIn)),
                Poll::Pending => {}
            }
        }
        if self.cout.len() < OUT_HIGH_WATER && self.tee_wait.is_none() {
            if let Some(s) = self.server.as_mut() {
                let conn = s.conn.get_mut();
                read_space(&mut conn.buf);
                match poll_read_buf(Pin::new(&mut conn.stream), cx, &mut conn.buf) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        return Poll::Ready(Err(End::ServerGone))
                    }
                    Poll::Ready(Ok(_)) => return Poll::Ready(Ok(Ev::ServerIn)),
                    Poll::Pending => {}
                }
            }
        }
        // Registering for the shutdown and timer wake-ups only on the way to sleep keeps them off the busy path.
        if shutdown.poll(cx).is_ready() {
            return Poll::Ready(Ok(Ev::Shutdown));
        }
        if let Some(t) = self.timeouts.as_mut() {
            if t.poll(cx).is_ready() {
                return Poll::Ready(Ok(Ev::Timer));
            }
        }
        Poll::Pending
    }

    /// The tee released a held reply: deliver it and go on with whatever arrived meanwhile.
    async fn after_tee(&mut self) -> Result<(), End> {
        self.tee_wait = None;
        self.cout.extend_from_slice(&self.held);
        self.held.clear();
        // A reply held with a large result before it does not keep its buffer in an idle session.
        if self.held.capacity() > HELD_KEEP {
            self.held = BytesMut::new();
        }
        if self
            .server
            .as_ref()
            .is_some_and(|s| !s.conn.get().buf.is_empty())
        {
            self.after_server_input().await?;
        }
        if self.tee_wait.is_none() && !self.cin.is_empty() {
            self.on_client_input().await?;
        }
        Ok(())
    }

    async fn after_server_input(&mut self) -> Result<(), End> {
        if self.tee_wait.is_some() {
            return Ok(());
        }
        self.on_server_input()?;
        if self.blocked && self.server.as_ref().is_none_or(|s| s.pending == 0) {
            self.blocked = false;
            self.on_client_input().await?;
        }
        Ok(())
    }

    /// Forwards what the backend sent, noting transaction status and parameter changes on the way.
    fn on_server_input(&mut self) -> Result<(), End> {
        let Session {
            server,
            cout,
            told,
            state,
            wrote,
            shared,
            tenant,
            held,
            tee_wait,
            statements,
            ..
        } = self;
        let Some(s) = server.as_mut() else {
            return Ok(());
        };
        let conn = s.conn.get_mut();
        let mut fwd = 0;
        let mut ended = false;
        loop {
            let buf = &conn.buf[fwd..];
            let step = s
                .scan
                .next(buf, |t| {
                    matches!(t, b'Z' | b'S' | b'E' | b'G' | b'C' | b'1' | b'3')
                })
                .map_err(|e| {
                    debug!(error = %e, "backend sent a malformed frame");
                    End::ServerGone
                })?;
            match step {
                Scan::NeedMore(_) => break,
                Scan::Rest(n) | Scan::Head { avail: n, .. } => fwd += n,
                Scan::Whole(h) => {
                    let frame = &buf[..h.total];
                    if matches!(h.tag, b'1' | b'3') && s.inflight.on_complete() {
                        // The completion of a Parse or Close the proxy sent on its own.
                        move_bytes(&mut conn.buf, cout, fwd);
                        conn.buf.advance(h.total);
                        fwd = 0;
                        continue;
                    }
                    if matches!(h.tag, b'Z' | b'E' | b'C' | b'1' | b'3') {
                        state.on_backend(h.tag, frame);
                    }
                    match h.tag {
                        b'Z' => {
                            s.status = inspect::ready_status(frame).unwrap_or(s.status);
                            s.pending = s.pending.saturating_sub(1);
                            s.inflight.on_ready(&mut conn.statements, statements);
                            s.replace_error = None;
                            let end = s.pending == 0 && s.status == b'I' && !s.batch_open;
                            ended |= end;
                            if end && std::mem::take(wrote) {
                                if let Some(wait) = tee_for(shared, tenant.as_ref()) {
                                    // The reply to the commit waits for the tee whole, CommandComplete
                                    // included: an asynchronous client (libpq's PQgetResult, as pgbench uses
                                    // it) that saw the CommandComplete alone would block its thread, every
                                    // other connection of that thread with it, waiting for the ReadyForQuery.
                                    held.extend_from_slice(&conn.buf[..fwd + h.total]);
                                    conn.buf.advance(fwd + h.total);
                                    fwd = 0;
                                    *tee_wait = Some(wait);
                                    break;
                                }
                            }
                        }
                        b'C' => {
                            *wrote |= inspect::is_write_tag(frame);
                            match frame.get(5) {
                                Some(b'D') => {
                                    forget_statements(frame, &mut conn.statements, statements);
                                    if frame[5..].starts_with(b"DISCARD ALL") {
                                        conn.route_path = None;
                                    }
                                }
                                // A RESET may have put search_path back: the schema is set again next time.
                                Some(b'R') if frame[5..].starts_with(b"RESET") => {
                                    conn.route_path = None
                                }
                                _ => {}
                            }
                        }
                        b'S' => {
                            if let Some((k, v)) = inspect::parameter_status(frame) {
                                set_param(told, k, v);
                                let (k, v) = (k.to_owned(), v.to_owned());
                                conn.set_param(&k, &v);
                            }
                        }
                        b'G' => {
                            // The Syncs sent after the Execute that started this COPY reach a backend in
                            // copy-in mode, which ignores them: no ReadyForQuery will answer them.
                            s.copy_in = true;
                            *wrote = true;
                            state.syncs_ignored(s.syncs_since_exec);
                            s.inflight.ignored(s.syncs_since_exec);
                            s.pending = s.pending.saturating_sub(s.syncs_since_exec);
                            s.syncs_since_exec = 0;
                        }
                        b'E' if s.replace_error.is_some() => {
                            move_bytes(&mut conn.buf, cout, fwd);
                            conn.buf.advance(h.total);
                            fwd = 0;
                            if let Some(e) = s.replace_error.take() {
                                e.encode(cout);
                            }
                            continue;
                        }
                        _ => s.sent_fatal |= is_fatal(frame),
                    }
                    fwd += h.total;
                }
            }
        }
        move_bytes(&mut conn.buf, cout, fwd);
        if ended {
            if self.pass.is_some() {
                self.end_transaction(true);
            }
            self.park();
            // The registry shows whether the session is pinned (a cutover ends pinned sessions on the old
            // route); it changes rarely, so it is published only when it did.
            if self.pin_reason() != self.published_pin {
                self.publish_route();
            }
        }
        Ok(())
    }

    /// Delivers the last words, returns or closes the backend connection, and closes the client.
    async fn finish(&mut self, end: End) {
        let broken = matches!(end, End::ServerGone);
        // A reply held for the tee belongs to a transaction that did commit on the source: it goes out first.
        let held = std::mem::take(&mut self.held);
        self.cout.extend_from_slice(&held);
        match &end {
            End::Fatal(e) => e.encode(&mut self.cout),
            End::ServerGone if !self.server.as_ref().is_some_and(|s| s.sent_fatal) => {
                PgError::fatal(
                    sqlstate::CONNECTION_FAILURE,
                    "pgtenant: the tenant's backend closed the connection unexpectedly",
                )
                .encode(&mut self.cout)
            }
            End::Shutdown => PgError::fatal(
                sqlstate::ADMIN_SHUTDOWN,
                "terminating connection due to administrator command",
            )
            .encode(&mut self.cout),
            _ => {}
        }
        if let Some(server) = self.server.take() {
            // A client that died inside a frame left the backend holding part of it.
            server.release(broken || self.cscan.mid_frame());
        }
        self.end_transaction(false);
        if let Some(tm) = self.tm.take() {
            tm.clients.decrement(1.0);
        }
        if matches!(end, End::ServerGone) {
            self.count_error(ErrorKind::ServerLost);
        }
        if !matches!(end, End::ClientGone) {
            let out = std::mem::take(&mut self.cout);
            let client = &mut self.client;
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
        self.server.as_ref().map_or(b'I', |s| s.status)
    }
}

enum Wrote {
    Bytes(usize),
    Flushed,
}

impl Wrote {
    fn client(self) -> Ev {
        match self {
            Wrote::Bytes(n) => Ev::ClientOut(n),
            Wrote::Flushed => Ev::ClientFlushed,
        }
    }
    fn server(self) -> Ev {
        match self {
            Wrote::Bytes(n) => Ev::ServerOut(n),
            Wrote::Flushed => Ev::ServerFlushed,
        }
    }
}

/// Makes room for a read without holding big buffers for idle sessions: at least 512 bytes free, growing
/// geometrically while reads keep filling the buffer.
fn read_space(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 512 {
        buf.reserve(buf.capacity().max(READ_MIN));
    }
}

/// Gives back the memory of a buffer that grew for a burst once it is empty again.
fn trim(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > OUT_HIGH_WATER {
        *buf = BytesMut::new();
    }
}

/// Writes what is buffered for one side, or flushes it once the buffer is empty (TLS keeps its own buffer).
fn poll_write_side(
    cx: &mut Context<'_>,
    stream: &mut Stream,
    out: &BytesMut,
    flush: bool,
) -> Poll<std::io::Result<Wrote>> {
    if !out.is_empty() {
        return match Pin::new(stream).poll_write(cx, out) {
            Poll::Ready(Ok(0)) => Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
            Poll::Ready(r) => Poll::Ready(r.map(Wrote::Bytes)),
            Poll::Pending => Poll::Pending,
        };
    }
    if flush {
        return Pin::new(stream)
            .poll_flush(cx)
            .map(|r| r.map(|_| Wrote::Flushed));
    }
    Poll::Pending
}

/// Moves the first `n` bytes of `from` to the end of `to`; when that is all of `from` and `to` is empty the
/// buffers are swapped instead of copied.
pub(super) fn move_bytes(from: &mut BytesMut, to: &mut BytesMut, n: usize) {
    if n == 0 {
        return;
    }
    if to.is_empty() && n == from.len() {
        std::mem::swap(from, to);
    } else {
        to.extend_from_slice(&from[..n]);
        from.advance(n);
    }
}

/// The wait for the migration tee of `tenant`, when one is running.
fn tee_for(
    shared: &Shared,
    tenant: Option<&TenantId>,
) -> Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>> {
    let tees = shared.migrations.tees.load();
    if tees.is_empty() {
        return None;
    }
    let tee = tees.get(tenant?.as_str())?.clone();
    Some(Box::pin(async move { tee.after_commit().await }))
}

/// A CommandComplete starting with `D`: after `DISCARD ALL` or `DEALLOCATE ALL` the connection has no prepared
/// statements left, nor has the client. (A single SQL `DEALLOCATE` reaching the backend names one of the
/// client's SQL-level statements: the proxy refuses it for its own names.)
fn forget_statements(
    frame: &[u8],
    server: &mut crate::backend::statements::ServerStatements,
    client: &mut ClientStatements,
) {
    let tag = &frame[5..];
    if tag.starts_with(b"DISCARD ALL") || tag.starts_with(b"DEALLOCATE ALL") {
        server.clear();
        client.clear();
    }
}

fn set_param(params: &mut Vec<(String, String)>, name: &str, value: &str) {
    match params.iter_mut().find(|(k, _)| k == name) {
        Some((_, v)) => {
            if v != value {
                *v = value.to_owned()
            }
        }
        None => params.push((name.to_owned(), value.to_owned())),
    }
}

fn is_fatal(frame: &[u8]) -> bool {
    frame.first() == Some(&b'E')
        && inspect::error_fields(frame).is_some_and(|(sev, _, _)| sev == "FATAL" || sev == "PANIC")
}

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
    pub epoch: u64,
    pub route_path: Option<Arc<str>>,
}

/// Where a tenant's transactions go now: its route, the routing epoch, and the pool and startup parameters a
/// backend connection is drawn with. Kept by transaction-pool sessions while the epoch and backends stay.
#[derive(Clone)]
pub(super) struct Resolved {
    pub tenant: TenantId,
    pub route: Arc<Route>,
    pub epoch: u64,
    pub pool: Arc<Pool>,
    pub tag: Arc<StartupTag>,
    /// The backends table this was resolved against (a reload replaces it).
    pub backends: Arc<Backends>,
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
        let route = table.get(tenant.as_str()).cloned().ok_or_else(|| {
            PgError::error(
                sqlstate::INVALID_CATALOG_NAME,
                format!("tenant \"{tenant}\" does not exist"),
            )
        })?;
        (route, table.epoch)
    };
    let backends = shared.backends.load_full();
    let backend = backends.get(&route.backend).ok_or_else(|| {
        PgError::error(
            sqlstate::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
            format!(
                "tenant \"{tenant}\" routes to backend \"{}\", which is not configured",
                route.backend
            ),
        )
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
    let tag = Arc::new(startup_tag(info, tag_schema));
    let login =
        crate::backend::identity::login_for(&config, backend, &route, tenant).map_err(|e| {
            PgError::error(
                sqlstate::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                e.to_string(),
            )
        })?;
    drop(config);
    let pool = backend.pool(&database, &login).ok_or_else(|| {
        PgError::error(
            sqlstate::TOO_MANY_CONNECTIONS,
            format!(
                "pgtenant: backend \"{}\" already serves {} pools",
                backend.name,
                crate::backend::MAX_POOLS_PER_BACKEND
            ),
        )
    })?;
    Ok(Resolved {
        tenant: tenant.clone(),
        route,
        epoch,
        pool,
        tag,
        backends,
        route_path,
    })
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
    let (out, inflight) = spare.unwrap_or_default();
    Ok(Server {
        conn,
        out,
        scan: Scanner::new(Direction::FromBackend, WHOLE_FRAME_MAX),
        flush: false,
        pending: 0,
        status: b'I',
        sent_fatal: false,
        batch_open: false,
        copy_in: false,
        syncs_since_exec: 0,
        replace_error: None,
        inflight,
        synced: false,
    })
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
    set_param(&mut params, "session_authorization", &info.user_name);
    for (k, v) in &info.params {
        if params.iter().any(|(name, _)| name == k) || k == "application_name" {
            set_param(&mut params, k, v);
        }
    }
    params
}
