//! The backend side of a session: the pooled connection, what is buffered for it, and the bookkeeping that
//! says when the backend owes nothing (so the connection may be reset, reused or moved).

use bytes::BytesMut;

use super::statements::Inflight;
use crate::backend::pool::ReleaseState;
use crate::backend::PooledConn;
use crate::protocol::frame::WHOLE_FRAME_MAX;
use crate::protocol::frame::{Direction, Scanner};
use crate::protocol::tag::{frontend as fe, status};
use crate::protocol::PgError;

/// The backend side of a session.
pub struct Server {
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
    /// The client's messages made what the backend owes uncertain (a CopyDone or CopyFail sent before the
    /// backend's CopyInResponse): the connection is never handed to anyone else, and is closed at its release.
    pub desynced: bool,
    /// Syncs sent since the last Execute or Query: those the backend will ignore if that started a COPY.
    pub syncs_since_exec: u32,
    /// The backend's next ErrorResponse (before the next ReadyForQuery) is replaced by this one. Boxed: it is
    /// rare, and a checkout moves the whole `Server` several times (unboxed it made the struct 264 bytes, over
    /// the 256 up to which glibc copies a struct without a loop).
    pub replace_error: Option<Box<PgError>>,
    /// Parse and Close frames awaiting completion (transaction pool mode rewrites and adds some).
    pub inflight: Inflight,
    /// Transaction pool mode: the connection's session settings were made this session's, so what it holds
    /// when it goes back is this session's SETs.
    pub synced: bool,
    /// Statements the proxy sent ahead of the client's frames (settling a pooled connection), one Execute
    /// each, whose CommandComplete is still to be taken out of the stream.
    pub own_pending: u32,
    /// One of them failed: the connection is closed when it is given back.
    pub own_failed: bool,
    /// Transaction pool mode: the connection holds this session's unnamed statement (prepared on it since the
    /// checkout, and no simple Query since, which would have dropped it).
    pub unnamed_ours: bool,
}

impl Server {
    /// A freshly checked-out connection, with a spare output buffer and in-flight queue if there is one.
    pub fn new(conn: PooledConn, spare: Option<(BytesMut, Inflight)>) -> Server {
        let (out, inflight) = spare.unwrap_or_default();
        Server {
            conn,
            out,
            scan: Scanner::new(Direction::FromBackend, WHOLE_FRAME_MAX),
            flush: false,
            pending: 0,
            status: status::IDLE,
            sent_fatal: false,
            batch_open: false,
            copy_in: false,
            desynced: false,
            syncs_since_exec: 0,
            replace_error: None,
            inflight,
            synced: false,
            own_pending: 0,
            own_failed: false,
            unnamed_ours: false,
        }
    }

    /// Books a client frame sent to this backend: replies owed, batch and COPY state. Returns whether the
    /// backend will answer it with a ReadyForQuery.
    pub fn note_sent(&mut self, tag: u8) -> bool {
        match tag {
            fe::QUERY => {
                self.unnamed_ours = false;
                self.pending += 1;
                self.inflight.sent_ready();
                self.syncs_since_exec = 0;
                return true;
            }
            fe::FUNCTION_CALL => {
                self.pending += 1;
                self.inflight.sent_ready();
                return true;
            }
            fe::SYNC => {
                self.batch_open = false;
                // PostgreSQL ignores Sync during copy-in.
                if !self.copy_in {
                    self.pending += 1;
                    self.inflight.sent_ready();
                    self.syncs_since_exec += 1;
                    return true;
                }
            }
            fe::EXECUTE => {
                self.batch_open = true;
                self.syncs_since_exec = 0;
            }
            fe::PARSE | fe::BIND | fe::DESCRIBE | fe::CLOSE => self.batch_open = true,
            fe::COPY_DONE | fe::COPY_FAIL => {
                // Sent before the backend said COPY started (or with no COPY at all): PostgreSQL may already
                // have left COPY at it and answer Syncs the proxy counts as ignored (`copy_in_started`).
                self.desynced |= !self.copy_in;
                self.copy_in = false;
            }
            _ => {}
        }
        false
    }

    /// Nothing is owed, unsent, half-read or half-finished: the connection may be reset and reused.
    pub fn quiet(&self) -> bool {
        self.out.is_empty()
            && !self.desynced
            && self.pending == 0
            && self.own_pending == 0
            && !self.batch_open
            && !self.copy_in
            && !self.scan.mid_frame()
            && self.conn.get().buf.is_empty()
    }

    /// Idle outside a transaction with nothing owed or pending: a transaction-pool session may give it back.
    pub fn parkable(&self) -> bool {
        self.status == status::IDLE && self.replace_error.is_none() && self.quiet()
    }

    pub fn release_idle(self) {
        self.release(false)
    }

    pub fn release(self, broken: bool) {
        let clean = !broken && !self.own_failed && self.quiet();
        let state = match (clean, self.status) {
            (false, _) => ReleaseState::Dirty,
            (true, status::IDLE) => ReleaseState::Idle,
            (true, _) => ReleaseState::InTransaction,
        };
        self.conn.release(state);
    }
}

#[cfg(test)]
mod tests {
    /// A checkout moves `Server` through several steps: see `replace_error`.
    #[test]
    fn a_server_stays_small_enough_to_copy_without_a_loop() {
        assert!(std::mem::size_of::<super::Server>() <= 256);
    }
}
