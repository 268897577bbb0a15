//! What the session does with each frame the client sends: forward it (after the gate admits a new
//! transaction), answer it (tenant statements, sessions without a tenant), or refuse it.

use bytes::Buf;

use super::boundary::Admission;
use super::session::{move_bytes, End, Session, SkipEnd, OUT_HIGH_WATER};
use crate::protocol::frame::Scan;
use crate::protocol::{inspect, messages, sql, sqlstate, PgError};

impl Session {
    /// Handles every frame the client has sent, until input runs out or a statement must wait.
    pub(super) async fn on_client_input(&mut self) -> Result<(), End> {
        // While a ReadyForQuery waits for the migration tee, input waits too (the client has not seen the end
        // of its transaction yet, and a move or a gate check now would judge the wrong moment).
        if self.tee_wait.is_some() {
            return Ok(());
        }
        // Stop while our own answers pile up unread: a client that never reads cannot grow them without bound.
        while !self.blocked && self.cout.len() < OUT_HIGH_WATER {
            let step = self
                .cscan
                .next(&self.cin, |t| matches!(t, b'Q' | b'P'))
                .map_err(|e| End::Fatal(PgError::protocol(e.to_string())))?;
            match step {
                Scan::NeedMore(n) => {
                    self.cin_need = n;
                    return Ok(());
                }
                Scan::Rest(n) => self.pass_client(n),
                Scan::Head { header, avail } => {
                    if !self.client_head(header.tag).await? {
                        // Not now: leave the frame where it is and read its header again later.
                        self.cscan.rewind();
                        return Ok(());
                    }
                    self.pass_client(avail);
                }
                Scan::Whole(h) => self.client_frame(h.tag, h.total).await?,
            }
        }
        Ok(())
    }

    /// The start of a frame too large to hold whole: it streams through uninspected, or is dropped when refused.
    /// `Ok(false)`: it must wait (the session is blocked until the backend owes nothing).
    async fn client_head(&mut self, tag: u8) -> Result<bool, End> {
        if self.skip.is_some() || self.discarding {
            return Ok(true);
        }
        if self.server.is_none() {
            self.unrouted(tag, None).await?;
            self.discarding = true;
            return Ok(true);
        }
        match self.begin_work(tag).await? {
            Admission::Go => self.count_request(tag, None),
            Admission::Wait => return Ok(false),
            Admission::Refuse(err) => {
                self.refuse(tag, err);
                self.discarding = true;
            }
        }
        Ok(true)
    }

    async fn client_frame(&mut self, tag: u8, total: usize) -> Result<(), End> {
        if tag == b'X' {
            return Err(End::Terminated);
        }
        if let Some(how) = self.skip {
            self.cin.advance(total);
            if tag == b'S' {
                self.end_skip(how);
            }
            return Ok(());
        }
        if self.server.is_none() {
            let frame = self.cin.split_to(total);
            return self.unrouted(tag, Some(&frame)).await;
        }
        let recognised = match tag {
            b'Q' => sql::recognise(inspect::query_text(&self.cin[..total]).unwrap_or_default()),
            b'P' => sql::recognise(
                inspect::parse_statement(&self.cin[..total]).map_or(&[][..], |(_, t)| t),
            ),
            _ => sql::Recognised::Pass,
        };
        match (tag, recognised) {
            (_, sql::Recognised::Pass) => match self.begin_work(tag).await? {
                Admission::Wait => {}
                Admission::Refuse(err) => {
                    self.cin.advance(total);
                    self.refuse(tag, err);
                }
                Admission::Go => {
                    self.count_request(tag, Some(total));
                    self.pass_client(total);
                }
            },
            (b'Q', r) => {
                if self.server.as_ref().is_some_and(|s| s.pending > 0) {
                    // Answer only after every reply the backend owes has reached the client.
                    self.blocked = true;
                    return Ok(());
                }
                self.cin.advance(total);
                self.answer_simple(r).await;
            }
            (_, _) => self.refuse_in_batch(tag, total).await?,
        }
        Ok(())
    }

    /// A tenant statement in the extended protocol is refused where it stands in its batch, as PostgreSQL
    /// would fail it: an Execute that must fail takes its place (so the batch's earlier statements are not
    /// committed by a bare Sync), its error is replaced by ours, and the rest is skipped up to the client's Sync,
    /// which the backend answers.
    async fn refuse_in_batch(&mut self, tag: u8, total: usize) -> Result<(), End> {
        let err = PgError::error(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "pgtenant.tenant statements are only accepted in the simple query protocol",
        );
        match self.begin_work(tag).await? {
            Admission::Wait => return Ok(()),
            Admission::Refuse(gate_err) => {
                self.cin.advance(total);
                self.refuse(tag, gate_err);
                return Ok(());
            }
            Admission::Go => {}
        }
        self.cin.advance(total);
        if let Some(s) = self.server.as_mut() {
            messages::execute_refused(&mut s.out);
            let owes = s.note_sent(b'E');
            s.replace_error = Some(err);
            self.state.on_client(b'E', None, owes);
        }
        self.skip = Some(SkipEnd::ForwardSync);
        Ok(())
    }

    /// Answers a frame that may not reach the backend (nothing of it was forwarded, and the backend owes
    /// nothing): the error, then ReadyForQuery now or at the client's Sync.
    pub(super) fn refuse(&mut self, tag: u8, err: PgError) {
        err.encode(&mut self.cout);
        match tag {
            b'Q' | b'F' => {
                let status = self.status();
                messages::ready_for_query(&mut self.cout, status);
            }
            _ => self.skip = Some(SkipEnd::Local),
        }
    }

    /// The client's Sync ends an error skip.
    fn end_skip(&mut self, how: SkipEnd) {
        self.skip = None;
        match (how, self.server.as_mut()) {
            (SkipEnd::ForwardSync, Some(s)) => {
                messages::sync(&mut s.out);
                let owes = s.note_sent(b'S');
                self.state.on_client(b'S', Some(b"S\0\0\0\x04"), owes);
            }
            _ => {
                let status = self.status();
                messages::ready_for_query(&mut self.cout, status);
            }
        }
    }

    /// Books a frame about to be forwarded (`total`: its length when it is held whole).
    fn count_request(&mut self, tag: u8, total: Option<usize>) {
        if let Some(s) = self.server.as_mut() {
            let owes = s.note_sent(tag);
            self.state
                .on_client(tag, total.map(|n| &self.cin[..n]), owes);
            if matches!(tag, b'Q' | b'E' | b'F') {
                self.queries += 1;
            }
        }
    }

    /// Moves `n` bytes from the client's input to the backend, or drops them when they go nowhere.
    pub(super) fn pass_client(&mut self, n: usize) {
        let drop = self.discarding || self.skip.is_some();
        match self.server.as_mut() {
            Some(s) if !drop => move_bytes(&mut self.cin, &mut s.out, n),
            _ => self.cin.advance(n),
        }
        if self.discarding && !self.cscan.mid_frame() {
            self.discarding = false;
        }
    }

    /// Why this session may not move to another backend connection now, if anything.
    pub(super) fn pin_reason(&self) -> Option<&'static str> {
        self.state.pin_reason()
    }
}
