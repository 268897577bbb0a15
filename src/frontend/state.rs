//! Session state the proxy carries when it moves a session to another backend connection: session-level
//! `SET`s, SQL `PREPARE`d statements and protocol-level named statements, counted only once the backend has
//! confirmed them (CommandComplete/ReadyForQuery without error, ParseComplete, CloseComplete; a SET inside a
//! transaction counts at COMMIT and is dropped at ROLLBACK). State that cannot be carried (LISTEN, temporary
//! tables, advisory locks, WITH HOLD cursors, statements the proxy could not follow) pins the session.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::protocol::inspect;
use crate::protocol::sql::{self, Effect};
use crate::protocol::tag::{backend as be, frontend as fe, status};

/// Bounds on what one session may make the proxy remember.
const MAX_SETS: usize = 256;
const MAX_TX_CHANGES: usize = 256;
const MAX_PREPARED: usize = 1_000;
const MAX_NAME: usize = 256;
const MAX_REPLAY_BYTES: usize = 4 << 20;
/// Bounds on what waits for the backend's replies (see [`SessionState::backlog_full`]): entries, and bytes of
/// the frames and statement texts they hold.
const MAX_BACKLOG: usize = 100_000;
const MAX_BACKLOG_BYTES: usize = 16 << 20;

pub const PIN_UNTRACKED: &str = "session state the proxy does not track";

/// A Parse or Close sent and not yet answered, with the number of the ReadyForQuery that ends its batch.
enum Awaiting {
    Parse {
        name: Option<Box<[u8]>>,
        frame: Bytes,
        batch: u64,
    },
    Close {
        name: Option<Box<[u8]>>,
        batch: u64,
    },
}

impl Awaiting {
    fn batch(&self) -> u64 {
        match self {
            Awaiting::Parse { batch, .. } | Awaiting::Close { batch, .. } => *batch,
        }
    }
}

#[derive(Default)]
pub struct SessionState {
    /// Confirmed session-level SETs, one per setting (the last one wins), in order.
    sets: Vec<(String, String)>,
    /// SETs made inside the current transaction block.
    tx_changes: Vec<Effect>,
    /// Confirmed SQL-level prepared statements.
    sql_prepared: Vec<(String, String)>,
    /// Confirmed named statements and the Parse frames that made them.
    parsed: Vec<(Box<[u8]>, Bytes)>,
    awaiting: VecDeque<Awaiting>,
    /// Effects of simple queries sent and not yet answered, with whether an error came back, and the bytes the
    /// entry counts in `backlog_bytes`.
    queries: VecDeque<(Effect, bool, usize)>,
    /// Bytes held by `awaiting` and `queries`.
    backlog_bytes: usize,
    /// ReadyForQuery replies asked for / received on the current connection.
    rfq_sent: u64,
    rfq_done: u64,
    /// A ROLLBACK was seen; at the next ReadyForQuery it either ended the block or was ROLLBACK TO SAVEPOINT.
    rollback_seen: bool,
    pins: Vec<&'static str>,
    /// Transaction pool mode: named statements are the pool's business (renamed and prepared per connection),
    /// so they are neither kept for a replay nor a reason to pin.
    pooled: bool,
    /// A `SET LOCAL` ran in the current transaction block.
    local_set: bool,
    /// A `DO` or `CALL` ran since the last [`SessionState::take_opaque`]: what it did to the session is not
    /// known.
    opaque: bool,
}

impl SessionState {
    /// Why the session cannot move, if anything.
    pub fn pin_reason(&self) -> Option<&'static str> {
        self.pins.first().copied()
    }

    fn pin(&mut self, reason: &'static str) {
        if !self.pins.contains(&reason) {
            self.pins.push(reason);
        }
    }

    fn unpin(&mut self, reason: &'static str) {
        self.pins.retain(|p| *p != reason);
    }

    /// A new backend connection: nothing is owed on it.
    pub fn new_connection(&mut self) {
        self.awaiting.clear();
        self.queries.clear();
        self.backlog_bytes = 0;
        self.rfq_sent = 0;
        self.rfq_done = 0;
    }

    /// Everything is forgotten (the session moved to another tenant, or sent DISCARD ALL).
    pub fn clear(&mut self) {
        *self = SessionState {
            pooled: self.pooled,
            opaque: self.opaque,
            ..SessionState::default()
        };
    }

    /// Transaction pool mode (see `pooled`).
    pub fn set_pooled(&mut self) {
        self.pooled = true;
    }

    /// A client frame was forwarded; `owes_ready` says whether the backend will answer it with ReadyForQuery
    /// (a Sync during COPY is ignored). `frame` is `None` for a frame too large to hold whole.
    pub fn on_client(&mut self, tag: u8, frame: Option<&[u8]>, owes_ready: bool) {
        self.on_client_words(tag, frame, owes_ready, None);
    }

    /// [`SessionState::on_client`] with the words of the frame's statement already searched (see
    /// `sql::Words`), when the caller has them.
    pub fn on_client_words(
        &mut self,
        tag: u8,
        frame: Option<&[u8]>,
        owes_ready: bool,
        words: Option<sql::Words>,
    ) {
        if owes_ready {
            self.rfq_sent += 1;
            // Every ReadyForQuery pops one entry, so Syncs and FunctionCalls get an empty one.
            if tag != fe::QUERY {
                self.push_query(Effect::None, 0);
            }
        }
        let Some(frame) = frame else {
            match tag {
                fe::QUERY => {
                    // Too large to read: whatever it does is not followed.
                    self.pin(PIN_UNTRACKED);
                    self.push_query(Effect::None, 0);
                }
                fe::PARSE => {
                    self.pin(PIN_UNTRACKED);
                    self.awaiting.push_back(Awaiting::Parse {
                        name: None,
                        frame: Bytes::new(),
                        batch: self.rfq_sent + 1,
                    });
                }
                _ => {}
            }
            return;
        };
        match tag {
            fe::QUERY => {
                let effect = inspect::query_text(frame).map_or(Effect::None, |text| {
                    sql::classify_with(text, words.unwrap_or_else(|| sql::Words::of(text)))
                });
                // (Counted as the frame's size: the effect may copy its text.)
                self.push_query(effect, frame.len());
            }
            fe::PARSE => self.on_parse(frame, words),
            fe::CLOSE => {
                let name = frame.get(5..).and_then(|b| match b.split_first() {
                    Some((b'S', rest)) => rest.strip_suffix(&[0]).filter(|n| !n.is_empty()),
                    _ => None,
                });
                self.awaiting.push_back(Awaiting::Close {
                    name: name.map(Into::into),
                    batch: self.rfq_sent + 1,
                });
            }
            _ => {}
        }
    }

    fn on_parse(&mut self, frame: &[u8], words: Option<sql::Words>) {
        let Some((name, text)) = inspect::parse_statement(frame) else {
            return;
        };
        // Statements that change session state through the extended protocol are not followed: pin instead.
        match sql::classify_with(text, words.unwrap_or_else(|| sql::Words::of(text))) {
            Effect::None => {}
            // Until the transaction ends, statements prepared now may resolve names differently.
            Effect::LocalSet => self.local_set = true,
            Effect::Opaque => self.opaque = true,
            _ => self.pin(PIN_UNTRACKED),
        }
        let name = (!name.is_empty()).then(|| Box::<[u8]>::from(name));
        if name.as_ref().is_some_and(|n| n.len() > MAX_NAME) {
            self.pin(PIN_UNTRACKED);
        }
        let frame = if name.is_some() {
            self.backlog_bytes += frame.len();
            Bytes::copy_from_slice(frame)
        } else {
            Bytes::new()
        };
        self.awaiting.push_back(Awaiting::Parse {
            name,
            frame,
            batch: self.rfq_sent + 1,
        });
    }

    /// More waits for the backend's replies than a session may make the proxy hold. A backend skipping to the
    /// next Sync after an error answers nothing, so a client that keeps sending Parse or Query frames without
    /// a Sync would otherwise grow these queues (and the frames they copy) without bound.
    pub fn backlog_full(&self) -> bool {
        self.awaiting.len() + self.queries.len() > MAX_BACKLOG
            || self.backlog_bytes > MAX_BACKLOG_BYTES
    }

    fn push_query(&mut self, effect: Effect, bytes: usize) {
        self.backlog_bytes += bytes;
        self.queries.push_back((effect, false, bytes));
    }

    fn pop_awaiting_front(&mut self) -> Option<Awaiting> {
        let a = self.awaiting.pop_front()?;
        if let Awaiting::Parse { frame, .. } = &a {
            self.backlog_bytes = self.backlog_bytes.saturating_sub(frame.len());
        }
        Some(a)
    }

    /// Syncs the backend ignored (sent during a COPY) will get no ReadyForQuery.
    pub fn syncs_ignored(&mut self, n: u32) {
        self.rfq_sent = self.rfq_sent.saturating_sub(u64::from(n));
    }

    /// A backend frame went to the client. `status` is the ReadyForQuery status for `Z`.
    pub fn on_backend(&mut self, tag: u8, frame: &[u8]) {
        match tag {
            be::PARSE_COMPLETE => {
                if let Some(Awaiting::Parse {
                    name: Some(name),
                    frame,
                    ..
                }) = self.pop_awaiting(true)
                {
                    self.add_parsed(name, frame);
                }
            }
            be::CLOSE_COMPLETE => {
                if let Some(Awaiting::Close {
                    name: Some(name), ..
                }) = self.pop_awaiting(false)
                {
                    self.forget_statement(&name);
                }
            }
            be::ERROR_RESPONSE => {
                if let Some(front) = self.queries.front_mut() {
                    front.1 = true;
                }
            }
            be::COMMAND_COMPLETE => {
                let tag = frame.get(5..).unwrap_or_default();
                if tag.starts_with(b"ROLLBACK") {
                    self.rollback_seen = true;
                } else if tag.starts_with(b"COMMIT") {
                    let changes = std::mem::take(&mut self.tx_changes);
                    for c in changes {
                        self.apply(c);
                    }
                }
            }
            be::READY_FOR_QUERY => {
                self.on_ready(inspect::ready_status(frame).unwrap_or(status::IDLE))
            }
            _ => {}
        }
    }

    /// The next awaited reply of this kind; entries before it were skipped by an error and are dropped.
    fn pop_awaiting(&mut self, parse: bool) -> Option<Awaiting> {
        while let Some(a) = self.pop_awaiting_front() {
            if matches!(a, Awaiting::Parse { .. }) == parse {
                return Some(a);
            }
        }
        None
    }

    fn on_ready(&mut self, status: u8) {
        self.rfq_done += 1;
        let done = self.rfq_done;
        // Parses and Closes of batches that are over and were not answered failed or were skipped.
        while self.awaiting.front().is_some_and(|a| a.batch() <= done) {
            self.pop_awaiting_front();
        }
        if self.rollback_seen && status == status::IN_BLOCK && !self.tx_changes.is_empty() {
            // ROLLBACK TO SAVEPOINT: which SETs survived is not followed.
            self.pin(PIN_UNTRACKED);
        }
        self.rollback_seen = false;
        if status == status::IDLE {
            // Out of the block: a COMMIT already applied its SETs; anything left (ROLLBACK, a failed COMMIT,
            // PREPARE TRANSACTION) did not take effect in this session.
            self.tx_changes.clear();
            self.local_set = false;
        }
        let Some((effect, failed, bytes)) = self.queries.pop_front() else {
            return;
        };
        self.backlog_bytes = self.backlog_bytes.saturating_sub(bytes);
        match effect {
            Effect::None => {}
            // Even a DO block that failed may have left something behind (a temporary namespace).
            Effect::Opaque => self.opaque = true,
            Effect::LocalSet => self.local_set = status != status::IDLE,
            // Locks taken, or untracked changes made, before a later statement of the query failed stay.
            Effect::Pin(_) | Effect::Untracked => self.apply(effect),
            _ if failed => {}
            Effect::Set { .. } | Effect::Reset { .. } | Effect::ResetAll
                if status == status::IN_BLOCK =>
            {
                if self.tx_changes.len() >= MAX_TX_CHANGES {
                    self.pin(PIN_UNTRACKED);
                } else {
                    self.tx_changes.push(effect);
                }
            }
            _ => self.apply(effect),
        }
    }

    /// SQL-level and protocol-level prepared statements share one namespace in PostgreSQL.
    pub fn forget_statement(&mut self, name: &[u8]) {
        self.parsed.retain(|(n, _)| &**n != name);
        self.sql_prepared.retain(|(n, _)| n.as_bytes() != name);
    }

    fn apply(&mut self, effect: Effect) {
        match effect {
            Effect::None | Effect::LocalSet => {}
            Effect::Opaque => self.opaque = true,
            Effect::Set { key, text } => {
                // A statement's name resolution depends on search_path and role at PREPARE time: changing them
                // after statements exist would make a replay resolve names differently.
                let resolves_names = matches!(
                    key.as_str(),
                    "search_path" | "role" | "session_authorization"
                );
                // (Pooled statements carry the resolution settings in their identity.)
                let parsed = !self.pooled && !self.parsed.is_empty();
                if resolves_names && (!self.sql_prepared.is_empty() || parsed) {
                    self.pin(PIN_UNTRACKED);
                }
                self.sets.retain(|(k, _)| *k != key);
                self.sets.push((key, text));
            }
            Effect::Reset { key } => self.sets.retain(|(k, _)| *k != key),
            // RESET ALL leaves the role and the session authorization alone.
            Effect::ResetAll => self
                .sets
                .retain(|(k, _)| k == "role" || k == "session_authorization"),
            Effect::Prepare { name, text } => {
                self.forget_statement(name.as_bytes());
                self.sql_prepared.push((name, text));
            }
            Effect::Deallocate { name } => self.forget_statement(name.as_bytes()),
            Effect::DeallocateAll => {
                self.sql_prepared.clear();
                self.parsed.clear();
            }
            Effect::DiscardAll => self.clear_all_but_counters(),
            Effect::DiscardTemp => self.unpin(sql::PIN_TEMP),
            Effect::Pin(p) => self.pin(p),
            Effect::Unpin(p) => self.unpin(p),
            Effect::Untracked => self.pin(PIN_UNTRACKED),
        }
        self.check_bounds();
    }

    /// Past the bounds the session is pinned and what would be replayed is dropped (it cannot move anyway).
    fn check_bounds(&mut self) {
        let bytes: usize = self.sets.iter().map(|(_, t)| t.len()).sum::<usize>()
            + self
                .sql_prepared
                .iter()
                .map(|(_, t)| t.len())
                .sum::<usize>()
            + self.parsed.iter().map(|(_, f)| f.len()).sum::<usize>();
        let too_many = self.sets.len() > MAX_SETS
            || self.sql_prepared.len() + self.parsed.len() > MAX_PREPARED;
        if too_many || bytes > MAX_REPLAY_BYTES {
            self.pin(PIN_UNTRACKED);
            self.sets.clear();
            self.sql_prepared.clear();
            self.parsed.clear();
        }
    }

    fn clear_all_but_counters(&mut self) {
        self.sets.clear();
        self.tx_changes.clear();
        self.sql_prepared.clear();
        self.parsed.clear();
        self.pins.clear();
    }

    fn add_parsed(&mut self, name: Box<[u8]>, frame: Bytes) {
        if self.pooled || self.pin_reason() == Some(PIN_UNTRACKED) {
            return;
        }
        self.forget_statement(&name);
        self.parsed.push((name, frame));
        self.check_bounds();
    }

    /// The session's state could not be recreated elsewhere: it stays where it is.
    pub fn replay_failed(&mut self) {
        self.pin(PIN_UNTRACKED);
    }

    /// What a new backend connection must run, in order, to hold this session's state: simple statements
    /// (SETs, then SQL PREPAREs) and Parse frames.
    pub fn replay(&self) -> (Vec<String>, Vec<Bytes>) {
        let mut simple: Vec<String> = self.sets.iter().map(|(_, t)| t.clone()).collect();
        simple.extend(self.sql_prepared.iter().map(|(_, t)| t.clone()));
        (simple, self.parsed.iter().map(|(_, f)| f.clone()).collect())
    }

    pub fn is_empty(&self) -> bool {
        self.sets.is_empty() && self.sql_prepared.is_empty() && self.parsed.is_empty()
    }

    /// The confirmed session `SET`s, in the order to replay them.
    pub fn set_statements(&self) -> impl Iterator<Item = &str> {
        self.sets.iter().map(|(_, t)| t.as_str())
    }

    /// Identifies the confirmed `SET`s (0 for none), and says whether one of them changes the role, which
    /// `RESET ALL` would not undo.
    pub fn sets_fingerprint(&self) -> (u64, bool) {
        use std::hash::{Hash, Hasher};
        if self.sets.is_empty() {
            return (0, false);
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.sets.hash(&mut h);
        let role = self
            .sets
            .iter()
            .any(|(k, _)| k == "role" || k == "session_authorization");
        // 0 stands for "no SETs", u64::MAX for "unknown".
        (h.finish().clamp(1, u64::MAX - 1), role)
    }

    /// The settings that decide how a statement's names resolve when it is prepared (`search_path`, role),
    /// as the SET texts in effect; part of a pooled statement's identity.
    pub fn resolution(&self) -> String {
        let mut out = String::new();
        for (k, t) in &self.sets {
            if matches!(k.as_str(), "search_path" | "role" | "session_authorization") {
                out.push_str(t);
                out.push('\0');
            }
        }
        // Inside a block whose SETs (LOCAL, or not yet committed) may change resolution, a statement's
        // meaning is this transaction's alone: a unique identity keeps anyone else from sharing it.
        if self.local_set || !self.tx_changes.is_empty() {
            static UNIQUE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = UNIQUE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            out.push_str(&format!("\0tx{n}"));
        }
        out
    }

    /// Whether a `DO` or `CALL` ran since the last call (the flag is cleared).
    pub fn take_opaque(&mut self) -> bool {
        std::mem::take(&mut self.opaque)
    }

    /// SQL-level prepared statements exist (they live under the client's own names on one backend connection).
    pub fn has_sql_prepared(&self) -> bool {
        !self.sql_prepared.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::test_frame as frame;

    fn q(s: &mut SessionState, sql: &str, replies: &[(u8, &[u8])]) {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        s.on_client(b'Q', Some(&frame(b'Q', &body)), true);
        for (t, b) in replies {
            s.on_backend(*t, &frame(*t, b));
        }
    }

    const OK_I: &[(u8, &[u8])] = &[(b'C', b"SET\0"), (b'Z', b"I")];

    /// A backend skipping to Sync answers nothing: named Parses and Queries piled up behind it are bounded by
    /// bytes and by count, and what their Sync's ReadyForQuery settles is no longer counted.
    #[test]
    fn unanswered_frames_are_bounded_and_counted_off_when_answered() {
        let mut s = SessionState::default();
        let mut body = b"s\0SELECT '".to_vec();
        body.extend(std::iter::repeat_n(b'x', 1 << 20));
        body.extend_from_slice(b"'\0\0\0");
        let big_parse = frame(b'P', &body);
        for i in 0..16 {
            assert!(!s.backlog_full(), "{i}");
            s.on_client(b'P', Some(&big_parse), false);
        }
        assert!(s.backlog_full());
        s.on_client(b'S', Some(&frame(b'S', b"")), true);
        s.on_backend(b'Z', &frame(b'Z', b"I"));
        assert!(!s.backlog_full());
        assert_eq!(s.backlog_bytes, 0);
        for _ in 0..=MAX_BACKLOG {
            s.on_client(b'Q', Some(&frame(b'Q', b"SELECT 1\0")), true);
        }
        assert!(s.backlog_full());
        s.new_connection();
        assert!(!s.backlog_full());
    }

    #[test]
    fn confirmed_sets_are_kept_and_local_or_rolled_back_ones_are_not() {
        let mut s = SessionState::default();
        q(&mut s, "SET work_mem = '8MB'", OK_I);
        assert_eq!(s.replay().0.len(), 1);
        q(&mut s, "SET LOCAL statement_timeout = 5", OK_I);
        q(&mut s, "BEGIN", &[(b'C', b"BEGIN\0"), (b'Z', b"T")]);
        q(
            &mut s,
            "SET search_path = x",
            &[(b'C', b"SET\0"), (b'Z', b"T")],
        );
        q(&mut s, "ROLLBACK", &[(b'C', b"ROLLBACK\0"), (b'Z', b"I")]);
        q(&mut s, "BEGIN", &[(b'C', b"BEGIN\0"), (b'Z', b"T")]);
        q(&mut s, "SET geqo = off", &[(b'C', b"SET\0"), (b'Z', b"T")]);
        q(&mut s, "COMMIT", &[(b'C', b"COMMIT\0"), (b'Z', b"I")]);
        q(
            &mut s,
            "SET nope = 1",
            &[(b'E', b"SERROR\0\0"), (b'Z', b"I")],
        );
        assert_eq!(s.replay().0, vec!["SET work_mem = '8MB'", "SET geqo = off"]);
        q(
            &mut s,
            "RESET work_mem",
            &[(b'C', b"RESET\0"), (b'Z', b"I")],
        );
        assert_eq!(s.replay().0, vec!["SET geqo = off"]);
        assert_eq!(s.pin_reason(), None);
        q(&mut s, "LISTEN x", &[(b'C', b"LISTEN\0"), (b'Z', b"I")]);
        assert_eq!(s.pin_reason(), Some("LISTEN"));
        q(
            &mut s,
            "DISCARD ALL",
            &[(b'C', b"DISCARD ALL\0"), (b'Z', b"I")],
        );
        assert_eq!(s.pin_reason(), None);
        assert!(s.is_empty());
    }

    #[test]
    fn named_statements_follow_parse_and_close_replies() {
        let mut s = SessionState::default();
        let parse = |name: &str| {
            let mut b = name.as_bytes().to_vec();
            b.extend_from_slice(b"\0select 1\0\0\0");
            frame(b'P', &b)
        };
        s.on_client(b'P', Some(&parse("s1")), false);
        s.on_client(b'P', Some(&parse("s2")), false);
        s.on_client(b'S', Some(&frame(b'S', b"")), true);
        s.on_backend(b'1', &frame(b'1', b""));
        s.on_backend(b'E', &frame(b'E', b"SERROR\0\0"));
        s.on_backend(b'Z', &frame(b'Z', b"I"));
        assert_eq!(s.replay().1.len(), 1, "only s1 was confirmed");
        let mut close = b"Ss1\0".to_vec();
        s.on_client(b'C', Some(&frame(b'C', &close)), false);
        s.on_client(b'S', Some(&frame(b'S', b"")), true);
        s.on_backend(b'3', &frame(b'3', b""));
        s.on_backend(b'Z', &frame(b'Z', b"I"));
        assert!(s.replay().1.is_empty());
        close.clear();
    }

    #[test]
    fn second_read_findings_stay_fixed() {
        // RESET ALL keeps the role.
        let mut s = SessionState::default();
        q(&mut s, "SET ROLE reader", OK_I);
        q(&mut s, "SET work_mem = '8MB'", OK_I);
        q(&mut s, "RESET ALL", &[(b'C', b"RESET\0"), (b'Z', b"I")]);
        assert_eq!(s.replay().0, vec!["SET ROLE reader"]);
        // A Sync's ReadyForQuery does not settle a simple query pipelined behind it.
        let mut s = SessionState::default();
        s.on_client(b'S', Some(&frame(b'S', b"")), true);
        s.on_client(b'Q', Some(&frame(b'Q', b"SET work_mem = 'bogus'\0")), true);
        s.on_backend(b'Z', &frame(b'Z', b"I"));
        s.on_backend(b'E', &frame(b'E', b"SERROR\0\0"));
        s.on_backend(b'Z', &frame(b'Z', b"I"));
        assert!(s.is_empty(), "the failed SET is not kept");
        // DEALLOCATE reaches statements made by Parse (one namespace).
        let mut s = SessionState::default();
        s.on_client(b'P', Some(&frame(b'P', b"s1\0select 1\0\0\0")), false);
        s.on_client(b'S', Some(&frame(b'S', b"")), true);
        s.on_backend(b'1', &frame(b'1', b""));
        s.on_backend(b'Z', &frame(b'Z', b"I"));
        assert_eq!(s.replay().1.len(), 1);
        q(
            &mut s,
            "DEALLOCATE s1",
            &[(b'C', b"DEALLOCATE\0"), (b'Z', b"I")],
        );
        assert!(s.is_empty());
        // A COMMIT that fails drops the block's SETs.
        let mut s = SessionState::default();
        q(&mut s, "BEGIN", &[(b'C', b"BEGIN\0"), (b'Z', b"T")]);
        q(&mut s, "SET geqo = off", &[(b'C', b"SET\0"), (b'Z', b"T")]);
        q(&mut s, "COMMIT", &[(b'E', b"SERROR\0\0"), (b'Z', b"I")]);
        q(&mut s, "BEGIN", &[(b'C', b"BEGIN\0"), (b'Z', b"T")]);
        q(&mut s, "COMMIT", &[(b'C', b"COMMIT\0"), (b'Z', b"I")]);
        assert!(s.is_empty());
        // A lock taken by a query that then failed still pins.
        let mut s = SessionState::default();
        q(
            &mut s,
            "SELECT pg_advisory_lock(1); SELECT 1/0",
            &[(b'E', b"SERROR\0\0"), (b'Z', b"I")],
        );
        assert_eq!(s.pin_reason(), Some("advisory lock"));
    }
}
