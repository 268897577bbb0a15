//! What the session does with what the backend sends: forward it, noting on the way the transaction status
//! (ReadyForQuery), completions the proxy asked for itself (taken out), ParameterStatus (what the client has been
//! told), the start of COPY FROM, writes (for the migration tee), and ErrorResponses the proxy replaces.

use std::future::Future;
use std::pin::Pin;

use bytes::{Buf, BytesMut};
use tracing::debug;

use super::parts::{move_bytes, ClientSide, End, Txn};
use super::server::Server;
use super::session::Session;
use super::state::SessionState;
use super::statements::ClientStatements;
use crate::backend::statements::ServerStatements;
use crate::context::Shared;
use crate::errors::ClientError;
use crate::protocol::frame::Scan;
use crate::protocol::inspect;
use crate::protocol::tag::{backend as be, status};
use crate::tenant::TenantId;

/// The frames looked at whole; everything else streams through.
fn inspected(t: u8) -> bool {
    matches!(
        t,
        be::READY_FOR_QUERY
            | be::PARAMETER_STATUS
            | be::ERROR_RESPONSE
            | be::COPY_IN_RESPONSE
            | be::COMMAND_COMPLETE
            | be::PARSE_COMPLETE
            | be::CLOSE_COMPLETE
            | be::NOTICE_RESPONSE
    )
}

/// What becomes of one whole frame.
enum Next {
    /// Forwarded with the frames around it.
    Forward,
    /// Taken out of the stream (a reply to the proxy's own frame).
    Drop,
    /// Replaced by the proxy's error (already written).
    Replaced,
    /// The reply up to and including this frame waits for the migration tee.
    Hold(Pin<Box<dyn Future<Output = ()> + Send + Sync>>),
}

/// The parts of a session a backend frame may touch, borrowed apart from the backend connection.
struct Parts<'a> {
    client: &'a mut ClientSide,
    txn: &'a mut Txn,
    state: &'a mut SessionState,
    statements: &'a mut ClientStatements,
    shared: &'a Shared,
    tenant: Option<&'a TenantId>,
    /// A transaction (or a statement outside one) ended in this read.
    ended: bool,
    /// The clock as a ReadyForQuery of this read found it (for the query time), if one read it.
    now: Option<std::time::Instant>,
}

impl Session {
    /// Forwards what the backend sent, noting transaction status and parameter changes on the way.
    pub(super) fn on_server_input(&mut self) -> Result<(), End> {
        let Some(s) = self.server.as_mut() else {
            return Ok(());
        };
        let mut parts = Parts {
            client: &mut self.client,
            txn: &mut self.txn,
            state: &mut self.state,
            statements: &mut self.pooling.statements,
            shared: &self.shared,
            tenant: self.place.tenant.as_ref(),
            ended: false,
            now: None,
        };
        read_frames(s, &mut parts)?;
        let now = parts.now;
        if parts.ended {
            if self.txn.pass.is_some() {
                self.end_transaction(true);
            }
            self.park_at(now);
            // The registry shows whether the session is pinned (a cutover ends pinned sessions on the old
            // route); it changes rarely, so it is published only when it did.
            if self.pin_reason() != self.place.published_pin {
                self.publish_route();
            }
        }
        Ok(())
    }
}

/// Moves every complete frame of the backend's input towards the client (streaming large ones), stopping
/// early when a reply must wait for the tee.
fn read_frames(s: &mut Server, p: &mut Parts<'_>) -> Result<(), End> {
    let mut fwd = 0;
    loop {
        let buf = &s.conn.get().buf[fwd..];
        // Replies to the proxy's own Query are taken out whole, never streamed on to the client.
        let own = s.own_pending > 0;
        let step = s.scan.next(buf, |t| own || inspected(t)).map_err(|e| {
            debug!(error = %e, "backend sent a malformed frame");
            End::ServerGone
        })?;
        let (tag, total) = match step {
            Scan::NeedMore(_) => break,
            Scan::Rest(n) | Scan::Head { avail: n, .. } => {
                fwd += n;
                continue;
            }
            Scan::Whole(h) => (h.tag, h.total),
        };
        match backend_frame(s, fwd, tag, total, p) {
            Next::Forward => fwd += total,
            Next::Drop if s.own_failed => return Err(own_failed()),
            Next::Drop | Next::Replaced => fwd = 0,
            Next::Hold(wait) => {
                let conn = s.conn.get_mut();
                p.txn.hold(&mut conn.buf, fwd + total);
                p.txn.tee_wait = Some(wait);
                return Ok(());
            }
        }
    }
    move_bytes(&mut s.conn.get_mut().buf, &mut p.client.cout, fwd);
    Ok(())
}

/// One whole frame at `at + ..total` of the backend's input (what precedes it is being forwarded).
fn backend_frame(s: &mut Server, at: usize, tag: u8, total: usize, p: &mut Parts<'_>) -> Next {
    if s.own_pending > 0 && tag != be::PARAMETER_STATUS {
        return own_reply(s, at, tag, total, p);
    }
    let conn = s.conn.get_mut();
    let frame = &conn.buf[at..at + total];
    if matches!(tag, be::PARSE_COMPLETE | be::CLOSE_COMPLETE) && s.inflight.on_complete() {
        // The completion of a Parse or Close the proxy sent on its own.
        take_out(&mut conn.buf, &mut p.client.cout, at, total);
        return Next::Drop;
    }
    if matches!(
        tag,
        be::READY_FOR_QUERY
            | be::ERROR_RESPONSE
            | be::COMMAND_COMPLETE
            | be::PARSE_COMPLETE
            | be::CLOSE_COMPLETE
    ) {
        p.state.on_backend(tag, frame);
    }
    match tag {
        be::READY_FOR_QUERY => return ready_for_query(s, at, total, p),
        be::COMMAND_COMPLETE => {
            p.txn.wrote |= inspect::is_write_tag(frame);
            command_complete(
                frame,
                &mut conn.statements,
                &mut conn.route_path,
                p.statements,
            );
            if let Some(wait) = commit_wait(frame, &conn.buf[at + total..], p) {
                return Next::Hold(wait);
            }
        }
        be::PARAMETER_STATUS => {
            if let Some((k, v)) = inspect::parameter_status(frame) {
                let (k, v) = (k.to_owned(), v.to_owned());
                p.client.set_told(&k, &v);
                conn.set_param(&k, &v);
            }
        }
        be::COPY_IN_RESPONSE => copy_in_started(s, p),
        // A portal left suspended may be an `INSERT ... RETURNING` fetched a few rows at a time: PostgreSQL ran
        // the whole write at the first Execute, and a client that closes the portal early never sees its tag
        // (nor does the capture trigger send its notice, the statement being an INSERT). Counted as a write: a
        // suspended read then only costs its commit the tee's wait.
        be::PORTAL_SUSPENDED => p.txn.wrote = true,
        be::NOTICE_RESPONSE if inspect::is_capture_notice(frame) => {
            // The capture trigger's word that this transaction wrote: for the proxy, not the client.
            p.txn.wrote = true;
            take_out(&mut conn.buf, &mut p.client.cout, at, total);
            return Next::Drop;
        }
        be::ERROR_RESPONSE if s.replace_error.is_some() => {
            take_out(&mut conn.buf, &mut p.client.cout, at, total);
            if let Some(e) = s.replace_error.take() {
                e.encode(&mut p.client.cout);
            }
            return Next::Replaced;
        }
        _ => s.sent_fatal |= is_fatal(frame),
    }
    Next::Forward
}

/// A statement the proxy sent ahead of the client's frames to settle the connection failed on the backend.
/// PostgreSQL skipped the client's frames that followed (no Sync in between), so nothing of the client ran on
/// what the last user left; but the client is owed replies the backend will not send, so the session ends
/// with a clear error and the connection is closed. (Every statement in the reset is one PostgreSQL does not
/// refuse on an idle connection: it fails only when the backend itself is failing, or a cancel lands on it.)
fn own_failed() -> End {
    End::Fatal(
        ClientError::SettingsNotRecreated
            .fatal()
            .with_detail("the reset of a pooled connection failed; see the proxy's log"),
    )
}

/// A reply to a statement the proxy sent ahead of the client's frames: dropped (ParameterStatus frames are
/// handled as any other before this is reached: PostgreSQL reports what the reset changed just before the
/// ReadyForQuery of the client's statement, so the client hears the reset values, never the last user's); a
/// failure ends the session (see [`own_failed`]).
fn own_reply(s: &mut Server, at: usize, tag: u8, total: usize, p: &mut Parts<'_>) -> Next {
    let conn = s.conn.get_mut();
    match tag {
        be::COMMAND_COMPLETE => s.own_pending -= 1,
        be::ERROR_RESPONSE => {
            let frame = &conn.buf[at..at + total];
            let (_, code, message) = inspect::error_fields(frame).unwrap_or_default();
            tracing::warn!(
                code,
                message,
                "settling a pooled connection failed; it is closed"
            );
            s.own_failed = true;
        }
        // ParseComplete, BindComplete, a DataRow, the COMMIT's "no transaction in progress" notice.
        _ => {}
    }
    take_out(&mut conn.buf, &mut p.client.cout, at, total);
    Next::Drop
}

/// The frame at `at..at + total` of the backend's input leaves the stream: what precedes it goes on to the
/// client, the frame itself goes nowhere.
fn take_out(buf: &mut BytesMut, cout: &mut BytesMut, at: usize, total: usize) {
    move_bytes(buf, cout, at);
    buf.advance(total);
}

/// ReadyForQuery: the transaction status, replies owed, and at the end of a transaction that wrote, the wait
/// for the migration tee. The reply to the commit waits for the tee whole, CommandComplete included: an
/// asynchronous client (libpq's PQgetResult, as pgbench uses it) that saw the CommandComplete alone would
/// block its thread, every other connection of that thread with it, waiting for the ReadyForQuery.
fn ready_for_query(s: &mut Server, at: usize, total: usize, p: &mut Parts<'_>) -> Next {
    let conn = s.conn.get_mut();
    s.status = inspect::ready_status(&conn.buf[at..at + total]).unwrap_or(s.status);
    s.pending = s.pending.saturating_sub(1);
    s.inflight.on_ready(&mut conn.statements, p.statements);
    s.replace_error = None;
    if s.pending == 0 {
        p.txn.routed_at = None;
        if let Some(t) = p.txn.query_started.take() {
            let now = std::time::Instant::now();
            p.txn.tally.query_us += now.saturating_duration_since(t).as_micros() as u64;
            p.txn.settled_at = Some(now);
            p.now = Some(now);
        }
    }
    let end = s.pending == 0 && s.status == status::IDLE && !s.batch_open;
    p.ended |= end;
    // Every ReadyForQuery that says idle ends a transaction, also one inside a client's pipeline (more Syncs in
    // flight behind it): its commit is held for the tee as a lone one is.
    if s.status == status::IDLE && std::mem::take(&mut p.txn.wrote) {
        if let Some(wait) = tee_for(p.shared, p.tenant) {
            return Next::Hold(wait);
        }
    }
    Next::Forward
}

/// CommandComplete: after `DISCARD ALL` or `DEALLOCATE ALL` the connection has no prepared statements left,
/// nor has the client (a single SQL `DEALLOCATE` reaching the backend names one of the client's SQL-level
/// statements: the proxy refuses it for its own names); after `DISCARD ALL` or a `RESET` the schema the proxy
/// set per transaction may be gone, so it is set again next time.
fn command_complete(
    frame: &[u8],
    server: &mut ServerStatements,
    route_path: &mut Option<std::sync::Arc<str>>,
    client: &mut ClientStatements,
) {
    let done = frame.get(5..).unwrap_or_default();
    if done.starts_with(b"DISCARD ALL") || done.starts_with(b"DEALLOCATE ALL") {
        server.clear();
        client.clear();
    }
    if done.starts_with(b"DISCARD ALL") || done.starts_with(b"RESET") {
        *route_path = None;
    }
}

/// The wait for the tee at a COMMIT's CommandComplete, held from that frame on, for the commits no idle
/// ReadyForQuery follows: after `COMMIT AND CHAIN`, or a COMMIT followed by a BEGIN in one query string or one
/// pipeline, the session is in its next transaction when the ReadyForQuery comes. A COMMIT whose idle
/// ReadyForQuery is already here (`next`, the input after the frame) is left to that ReadyForQuery, which ends
/// the transaction first: in transaction pooling the connection goes back to the pool while the reply waits.
/// `COMMIT PREPARED` commits a transaction some session prepared earlier, of whichever tenant: it waits for
/// every running tee.
fn commit_wait(
    frame: &[u8],
    next: &[u8],
    p: &mut Parts<'_>,
) -> Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>> {
    match inspect::commit_tag(frame) {
        inspect::Commit::Commit if p.txn.wrote && !next.starts_with(IDLE_READY) => {
            p.txn.wrote = false;
            tee_for(p.shared, p.tenant)
        }
        inspect::Commit::Prepared => every_tee(p.shared),
        _ => None,
    }
}

/// A whole ReadyForQuery saying idle.
const IDLE_READY: &[u8] = &[be::READY_FOR_QUERY, 0, 0, 0, 5, status::IDLE];

/// CopyInResponse: the Syncs sent after the Execute that started this COPY reach a backend in copy-in mode,
/// which ignores them: no ReadyForQuery will answer them.
fn copy_in_started(s: &mut Server, p: &mut Parts<'_>) {
    s.copy_in = true;
    p.txn.wrote = true;
    p.state.syncs_ignored(s.syncs_since_exec);
    s.inflight.ignored(s.syncs_since_exec);
    s.pending = s.pending.saturating_sub(s.syncs_since_exec);
    s.syncs_since_exec = 0;
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

/// A wait for one pass of every running tee.
fn every_tee(shared: &Shared) -> Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>> {
    let tees = shared.migrations.tees.load();
    if tees.is_empty() {
        return None;
    }
    let all: Vec<_> = tees.values().cloned().collect();
    Some(Box::pin(async move {
        futures_util::future::join_all(all.iter().map(|t| t.after_commit())).await;
    }))
}

fn is_fatal(frame: &[u8]) -> bool {
    frame.first() == Some(&be::ERROR_RESPONSE)
        && inspect::error_fields(frame).is_some_and(|(sev, _, _)| sev == "FATAL" || sev == "PANIC")
}
