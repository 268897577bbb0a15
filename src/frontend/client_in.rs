//! What the session does with each frame the client sends: forward it (after the gate admits a new
//! transaction), answer it (tenant statements, sessions without a tenant), or refuse it.

use bytes::Buf;

use super::boundary::Admission;
use super::parts::{move_bytes, End, SkipEnd, Txn, OUT_HIGH_WATER};
use super::server::Server;
use super::session::Session;
use super::state::SessionState;
use super::statements::{ClientStatements, MAX_INFLIGHT};
use crate::errors::ClientError;
use crate::protocol::frame::{parse_header, Direction, Header, Scan};
use crate::protocol::tag::frontend as fe;
use crate::protocol::{inspect, messages, sql, PgError};

/// What happens to the head of a frame too large to hold whole.
enum HeadStep {
    /// Forward (or drop, when refused) what has arrived of it.
    Pass,
    /// Already forwarded or dropped.
    Handled,
    /// Not yet.
    Later,
}

impl Session {
    /// Handles every frame the client has sent, until input runs out or a statement must wait.
    pub(super) async fn on_client_input(&mut self) -> Result<(), End> {
        // While a ReadyForQuery waits for the migration tee, input waits too (the client has not seen the end
        // of its transaction yet, and a move or a gate check now would judge the wrong moment).
        if self.txn.tee_wait.is_some() {
            return Ok(());
        }
        // Stop while our own answers pile up unread: a client that never reads cannot grow them without bound.
        while !self.txn.blocked && self.client.cout.len() < OUT_HIGH_WATER {
            if self.state.backlog_full() {
                return Err(End::Fatal(PgError::from(ClientError::Protocol(
                    String::from(
                        "too many messages waiting for the server's replies without a Sync",
                    ),
                ))));
            }
            self.pass_admitted_run();
            // The run stops behind a batch that went after the proxy's own reset (or forwards nothing when
            // one already has): the frame after it waits, whichever path would take it.
            if self.behind_own_reset() {
                self.txn.own_wait = true;
                return Ok(());
            }
            // Transaction pool mode renames statements in Bind, Describe and Close: those are read whole too (a
            // Bind over 1 MiB is renamed at its head). A Terminate is read whole so that one with a body never
            // starts work or reaches the backend.
            let tx = self.pooling.tx_mode;
            let step = self
                .client
                .scan
                .next(&self.client.cin, |t| {
                    matches!(t, fe::QUERY | fe::PARSE | fe::TERMINATE)
                        || tx && matches!(t, fe::BIND | fe::DESCRIBE | fe::CLOSE)
                })
                .map_err(|e| End::Fatal(PgError::from(ClientError::Protocol(e.to_string()))))?;
            match step {
                Scan::NeedMore(n) => {
                    self.client.need = n;
                    return Ok(());
                }
                Scan::Rest(n) => self.pass_client(n),
                Scan::Head { header, avail } => match self.client_head(header, avail).await? {
                    HeadStep::Pass => self.pass_client(avail),
                    HeadStep::Handled => {}
                    HeadStep::Later => {
                        // Not now: leave the frame where it is and read its header again later.
                        self.client.scan.rewind();
                        return Ok(());
                    }
                },
                Scan::Whole(h) => self.client_frame(h.tag, h.total).await?,
            }
        }
        Ok(())
    }

    /// The proxy's reset went ahead of the client's frames with no Sync between (see pooling's
    /// `pipeline_reset`), and a frame that ends a batch (Sync, Query, FunctionCall) has followed it: should
    /// the reset fail, PostgreSQL skips up to that frame and runs whatever comes next. So nothing more goes
    /// until the reset's replies are in (at a frame boundary: a frame being streamed is finished first).
    fn behind_own_reset(&self) -> bool {
        self.server
            .as_ref()
            .is_some_and(|s| s.own_pending > 0 && s.pending > 0)
            && !self.client.scan.mid_frame()
    }

    /// Forwards, with one move for the lot, the run of whole frames at the head of the input that need nothing
    /// but booking: every frame of a statement inside a transaction the gate already admitted, and Syncs. This
    /// is what `client_frame` would do with each of them (no gate, no route, no answer of ours), without its
    /// per-frame steps and copies: pgbench -M extended sends five frames per statement. The first frame that
    /// needs more ends the run and takes the ordinary path: a new transaction, a tenant statement, COPY data,
    /// a Terminate, and in transaction pool mode any Close, a named statement's Parse, Bind or Describe, the
    /// unnamed statement's while the connection does not hold this session's, and a Parse past the in-flight
    /// limit.
    fn pass_admitted_run(&mut self) {
        if self.client.skip.is_some() || self.client.discarding || self.client.scan.mid_frame() {
            return;
        }
        let Some(s) = self.server.as_mut() else {
            return;
        };
        let admitted = self.txn.pass.is_some();
        let mut run = 0;
        while let Ok(Some(h)) = parse_header(&self.client.cin[run..], Direction::FromClient) {
            // One batch at most behind the proxy's own reset (see `behind_own_reset`).
            if s.own_pending > 0 && s.pending > 0 {
                break;
            }
            let Some(frame) = self.client.cin.get(run..run + h.total) else {
                break;
            };
            // The statement's words, searched once for both the tenant-statement check and the booking.
            let mut words = None;
            let mut pass = |tag: u8, frame: &[u8]| {
                let (r, w) = recognise_frame(tag, frame);
                words = w;
                matches!(r, sql::Recognised::Pass)
            };
            let plain = match h.tag {
                fe::SYNC | fe::FLUSH => true,
                fe::EXECUTE => admitted,
                // Transaction pooling renames statements in these, except where nothing needs renaming.
                fe::BIND | fe::DESCRIBE if self.pooling.tx_mode => {
                    admitted && ClientStatements::passes_unchanged(frame, s.unnamed_ours)
                }
                fe::BIND | fe::DESCRIBE | fe::CLOSE => admitted && !self.pooling.tx_mode,
                // An unnamed Parse goes as it is in transaction pooling too, with its bookkeeping below.
                fe::PARSE if self.pooling.tx_mode => {
                    admitted
                        && ClientStatements::parses_unnamed(frame)
                        && s.inflight.len() < MAX_INFLIGHT
                        && pass(h.tag, frame)
                }
                fe::QUERY | fe::PARSE => admitted && !self.pooling.tx_mode && pass(h.tag, frame),
                _ => false,
            };
            if !plain {
                break;
            }
            book(s, &mut self.state, &mut self.txn, h.tag, Some(frame), words);
            if h.tag == fe::PARSE && self.pooling.tx_mode {
                let conn = s.conn.get_mut();
                self.pooling.statements.note_unnamed_parse(
                    frame,
                    &mut conn.statements,
                    &mut s.unnamed_ours,
                    &mut s.inflight,
                );
            }
            run += h.total;
        }
        move_bytes(&mut self.client.cin, &mut s.out, run);
    }

    /// The start of a frame too large to hold whole: it streams through uninspected (renamed, for a Bind in
    /// transaction pool mode), or is dropped when refused.
    async fn client_head(&mut self, header: Header, avail: usize) -> Result<HeadStep, End> {
        let tag = header.tag;
        if self.client.skip.is_some() || self.client.discarding {
            return Ok(HeadStep::Pass);
        }
        if self.server.is_none() && self.place.tenant.is_none() {
            self.unrouted(tag, None).await?;
            self.client.discarding = true;
            return Ok(HeadStep::Pass);
        }
        match self.begin_work(tag).await? {
            Admission::Go if self.pooling.tx_mode && matches!(tag, fe::PARSE | fe::BIND) => {
                // The names must be read before anything is booked; until they arrive the frame waits.
                match self.forward_statement_head(tag, header.total, avail) {
                    Ok(false) => return Ok(HeadStep::Later),
                    Ok(true) => {}
                    Err(e) => return Err(End::Fatal(e)),
                }
                if !self.client.discarding {
                    self.count_request(tag, None, None);
                }
                return Ok(HeadStep::Handled);
            }
            Admission::Go => self.count_request(tag, None, None),
            // The session is blocked until the backend owes nothing.
            Admission::Wait => return Ok(HeadStep::Later),
            Admission::Refuse(err) => {
                self.refuse(tag, err);
                self.client.discarding = true;
            }
        }
        Ok(HeadStep::Pass)
    }

    async fn client_frame(&mut self, tag: u8, total: usize) -> Result<(), End> {
        if tag == fe::TERMINATE {
            return Err(End::Terminated);
        }
        if let Some(how) = self.client.skip {
            self.client.cin.advance(total);
            if tag == fe::SYNC {
                self.end_skip(how);
            }
            return Ok(());
        }
        if self.server.is_none() {
            if self.place.tenant.is_none() {
                let frame = self.client.cin.split_to(total);
                return self.unrouted(tag, Some(&frame)).await;
            }
            if self.parked_frame(tag, total) || (tag == fe::PARSE && self.parse_locally(total)) {
                return Ok(());
            }
        }
        // (Not in the middle of an unsynced batch, whose replies could come after a local answer.)
        if self.pooling.tx_mode
            && tag == fe::QUERY
            && !self.server.as_ref().is_some_and(|s| s.batch_open)
            && self.is_deallocate(total)
        {
            if self.server.as_ref().is_some_and(|s| s.pending > 0) {
                // Answered here only after every reply the backend owes has reached the client.
                self.txn.blocked = true;
                return Ok(());
            }
            if self.deallocate_locally(total) {
                return Ok(());
            }
        }
        let (recognised, words) = recognise_frame(tag, &self.client.cin[..total]);
        match (tag, recognised) {
            (_, sql::Recognised::Pass) => match self.begin_work(tag).await? {
                Admission::Wait => {}
                Admission::Refuse(err) => {
                    self.client.cin.advance(total);
                    self.refuse(tag, err);
                }
                Admission::Go => {
                    self.count_request(tag, Some(total), words);
                    if self.pooling.tx_mode
                        && matches!(tag, fe::PARSE | fe::BIND | fe::DESCRIBE | fe::CLOSE)
                    {
                        self.forward_statement(total).map_err(End::Fatal)?;
                    } else {
                        if tag == fe::QUERY {
                            // PostgreSQL drops the unnamed statement at a simple Query.
                            self.pooling.statements.forget_unnamed();
                        }
                        self.pass_client(total);
                    }
                }
            },
            (fe::QUERY, r) if self.server.as_ref().is_some_and(|s| s.batch_open) => {
                self.refuse_query_in_batch(total, r)
            }
            (fe::QUERY, r) => {
                if self.server.as_ref().is_some_and(|s| s.pending > 0) {
                    // Answer only after every reply the backend owes has reached the client.
                    self.txn.blocked = true;
                    return Ok(());
                }
                self.client.cin.advance(total);
                self.answer_simple(r).await;
            }
            (_, r) => self.refuse_in_batch(tag, total, r).await?,
        }
        Ok(())
    }

    /// A tenant statement in the extended protocol is refused where it stands in its batch, as PostgreSQL
    /// would fail it: an Execute that must fail takes its place (so the batch's earlier statements are not
    /// committed by a bare Sync), its error is replaced by ours, and the rest is skipped up to the client's Sync,
    /// which the backend answers.
    async fn refuse_in_batch(
        &mut self,
        tag: u8,
        total: usize,
        why: sql::Recognised,
    ) -> Result<(), End> {
        let err = match why {
            sql::Recognised::Forbidden(msg) => ClientError::Forbidden(msg),
            _ => ClientError::TenantStatementNotSimple,
        }
        .to_pg();
        if self
            .server
            .as_ref()
            .is_some_and(|s| s.replace_error.is_some())
        {
            // As in `refuse_query_in_batch`: after the earlier refusal's ReadyForQuery.
            self.txn.blocked = true;
            return Ok(());
        }
        match self.begin_work(tag).await? {
            Admission::Wait => return Ok(()),
            Admission::Refuse(gate_err) => {
                self.client.cin.advance(total);
                self.refuse(tag, gate_err);
                return Ok(());
            }
            Admission::Go => {}
        }
        self.client.cin.advance(total);
        self.fail_in_batch(err);
        Ok(())
    }

    /// A tenant statement sent as a simple Query while an extended-protocol batch is unfinished (no Sync yet):
    /// a local answer would overtake the batch's replies, and a tenant switch would drop its work along with
    /// its connection. PostgreSQL runs such a Query in the batch's implicit transaction and ends it with a
    /// ReadyForQuery, so it is refused the same way: the batch fails where it stands (an error in it rolls its
    /// work back) and a Sync in the Query's place brings that ReadyForQuery. The client's own Sync, when it
    /// comes, gets its own, as on PostgreSQL.
    fn refuse_query_in_batch(&mut self, total: usize, why: sql::Recognised) {
        // One refusal at a time: a second would take the first's place in `replace_error` before the backend
        // answered; it waits for the first's ReadyForQuery.
        if self
            .server
            .as_ref()
            .is_some_and(|s| s.replace_error.is_some())
        {
            self.txn.blocked = true;
            return;
        }
        let err = match why {
            sql::Recognised::Forbidden(msg) => ClientError::Forbidden(msg),
            _ => ClientError::TenantStatementInBatch,
        };
        self.client.cin.advance(total);
        self.fail_in_batch(err.to_pg());
        self.end_skip(SkipEnd::ForwardSync);
    }

    /// Fails the extended-protocol batch in progress where it stands: an Execute that must fail takes the place
    /// of the refused frame (so a bare Sync does not commit the batch's earlier work), its error is replaced by
    /// `err`, and the rest is skipped up to the client's Sync, which the backend answers.
    pub(super) fn fail_in_batch(&mut self, err: PgError) {
        if let Some(s) = self.server.as_mut() {
            messages::execute_refused(&mut s.out);
            let owes = s.note_sent(fe::EXECUTE);
            s.replace_error = Some(Box::new(err));
            self.state.on_client(fe::EXECUTE, None, owes);
        }
        self.client.skip = Some(SkipEnd::ForwardSync);
    }

    /// Answers a frame that may not reach the backend (nothing of it was forwarded, and the backend owes
    /// nothing): the error, then ReadyForQuery now or at the client's Sync.
    pub(super) fn refuse(&mut self, tag: u8, err: PgError) {
        let status = self.status();
        self.client.refuse(tag, err, status);
    }

    /// The client's Sync ends an error skip.
    fn end_skip(&mut self, how: SkipEnd) {
        self.client.skip = None;
        match (how, self.server.as_mut()) {
            (SkipEnd::ForwardSync, Some(s)) => {
                messages::sync(&mut s.out);
                let owes = s.note_sent(fe::SYNC);
                self.state.on_client(fe::SYNC, Some(b"S\0\0\0\x04"), owes);
            }
            _ => {
                let status = self.status();
                messages::ready_for_query(&mut self.client.cout, status);
            }
        }
    }

    /// Books a frame about to be forwarded (`total`: its length when it is held whole).
    fn count_request(&mut self, tag: u8, total: Option<usize>, words: Option<sql::Words>) {
        if let Some(s) = self.server.as_mut() {
            let frame = total.map(|n| &self.client.cin[..n]);
            book(s, &mut self.state, &mut self.txn, tag, frame, words);
        }
    }

    /// Moves `n` bytes from the client's input to the backend, or drops them when they go nowhere.
    pub(super) fn pass_client(&mut self, n: usize) {
        let drop = self.client.discarding || self.client.skip.is_some();
        match self.server.as_mut() {
            Some(s) if !drop => move_bytes(&mut self.client.cin, &mut s.out, n),
            _ => self.client.cin.advance(n),
        }
        if self.client.discarding && !self.client.scan.mid_frame() {
            self.client.discarding = false;
        }
    }
}

/// Books a client frame forwarded to `server`: what the backend will owe for it, the session state it may
/// change, and the query count (`frame`: the frame when it is held whole; `words`: its statement's, when
/// searched already).
fn book(
    server: &mut Server,
    state: &mut SessionState,
    txn: &mut Txn,
    tag: u8,
    frame: Option<&[u8]>,
    words: Option<sql::Words>,
) {
    let owes = server.note_sent(tag);
    state.on_client_words(tag, frame, owes, words);
    if matches!(tag, fe::QUERY | fe::EXECUTE | fe::FUNCTION_CALL) {
        txn.tally.queries += 1;
        // The query time runs from the first query sent while the backend owed nothing to the ReadyForQuery
        // that settles everything owed (a pipelined batch counts once, as the backend works it).
        if txn.query_started.is_none() {
            let now = txn.routed_at.take();
            txn.query_started = Some(now.unwrap_or_else(std::time::Instant::now));
        }
    }
}

/// Whether a whole Query or Parse frame is a tenant statement (other frames pass), with its statement's words.
fn recognise_frame(tag: u8, frame: &[u8]) -> (sql::Recognised, Option<sql::Words>) {
    let text = match tag {
        fe::QUERY => inspect::query_text(frame).unwrap_or_default(),
        fe::PARSE => inspect::parse_statement(frame).map_or(&[][..], |(_, t)| t),
        _ => return (sql::Recognised::Pass, None),
    };
    let words = sql::Words::of(text);
    (sql::recognise_with(text, words), Some(words))
}
