//! What the session does with each frame the client sends: forward it (after the gate admits a new
//! transaction), answer it (tenant statements, sessions without a tenant), or refuse it.

use bytes::Buf;

use super::session::{move_bytes, End, Session, SkipEnd};
use crate::protocol::frame::Scan;
use crate::protocol::{inspect, messages, sql, sqlstate, PgError};

impl Session {
    /// Handles every frame the client has sent, until input runs out or a statement must wait.
    pub(super) async fn on_client_input(&mut self) -> Result<(), End> {
        while !self.blocked {
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
                    self.client_head(header.tag).await?;
                    self.pass_client(avail);
                }
                Scan::Whole(h) => self.client_frame(h.tag, h.total).await?,
            }
        }
        Ok(())
    }

    /// The start of a frame too large to hold whole: it streams through uninspected, or is dropped when refused.
    async fn client_head(&mut self, tag: u8) -> Result<(), End> {
        if self.skip.is_some() || self.discarding {
            return Ok(());
        }
        if self.server.is_none() {
            self.unrouted(tag, None).await?;
            self.discarding = true;
        } else if let Some(err) = self.begin_work(tag).await? {
            self.refuse(tag, err);
            self.discarding = true;
        } else {
            self.count_request(tag);
        }
        Ok(())
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
            (_, sql::Recognised::Pass) => {
                if let Some(err) = self.begin_work(tag).await? {
                    self.cin.advance(total);
                    self.refuse(tag, err);
                    return Ok(());
                }
                self.note_session_state(tag, total);
                self.count_request(tag);
                self.pass_client(total);
            }
            (b'Q', r) => {
                if self.server.as_ref().is_some_and(|s| s.pending > 0) {
                    // Answer only after every reply the backend owes has reached the client.
                    self.blocked = true;
                    return Ok(());
                }
                self.cin.advance(total);
                self.answer_simple(r).await;
            }
            (_, _) => {
                // A tenant statement in the extended protocol: refuse it and skip to Sync, as PostgreSQL does
                // after an error; the error goes out in order, just before the reply to that Sync.
                self.cin.advance(total);
                self.skip = Some(SkipEnd::ForwardSync);
                let owed = self.server.as_ref().map_or(0, |s| s.pending);
                self.inject = Some((
                    owed,
                    PgError::error(
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        "pgtenant.tenant statements are only accepted in the simple query protocol",
                    ),
                ));
            }
        }
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
                s.pending += 1;
                messages::sync(&mut s.out);
            }
            _ => {
                let status = self.status();
                messages::ready_for_query(&mut self.cout, status);
            }
        }
    }

    fn count_request(&mut self, tag: u8) {
        if let Some(s) = self.server.as_mut() {
            match tag {
                b'Q' | b'F' => {
                    s.pending += 1;
                    self.queries += 1;
                }
                b'S' => s.pending += 1,
                b'E' => self.queries += 1,
                _ => {}
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

    /// Notes session state that would not follow the session to another backend connection, so the session
    /// stays where it is when its tenant's route changes. (Statement names from Parse/Close, and a coarse check
    /// of simple-query text; exact tracking with replay replaces it.)
    fn note_session_state(&mut self, tag: u8, total: usize) {
        let frame = &self.cin[..total];
        match tag {
            b'P' => {
                if let Some((name, _)) =
                    inspect::parse_statement(frame).filter(|(n, _)| !n.is_empty())
                {
                    if self.statements.len() >= MAX_TRACKED_STATEMENTS {
                        self.pinned = Some("too many prepared statements to track");
                    } else {
                        self.statements.insert(name.into());
                    }
                }
            }
            b'C' => {
                if let Some(name) = frame
                    .get(5..)
                    .and_then(|b| b.strip_prefix(b"S"))
                    .and_then(|b| b.strip_suffix(&[0]))
                {
                    self.statements.remove(name);
                }
            }
            b'Q' if self.pinned.is_none() => {
                self.pinned = inspect::query_text(frame).and_then(sql::session_state_hint);
            }
            _ => {}
        }
    }

    /// Why this session may not move to another backend connection now, if anything.
    pub(super) fn pin_reason(&self) -> Option<&'static str> {
        self.pinned
            .or_else(|| (!self.statements.is_empty()).then_some("named prepared statement"))
    }
}

/// Beyond this many open named statements a session is simply pinned.
const MAX_TRACKED_STATEMENTS: usize = 10_000;
