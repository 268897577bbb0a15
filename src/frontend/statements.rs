//! Named prepared statements in transaction pool mode, where a client's transactions land on whichever backend
//! connection is free.
//!
//! A client's named statement is known to the proxy by its Parse frame; on the backend it exists under a name
//! derived from what defines it ([`crate::backend::statements`]), prepared on each connection the first time a
//! Bind or Describe needs it there. The proxy therefore rewrites the statement name in Parse, Bind, Describe and
//! Close, and sends Parse (and Close, to keep each connection's bound) frames of its own whose completions it
//! must take out of the reply stream: [`Inflight`] pairs every ParseComplete/CloseComplete with the frame that
//! asked for it, in order, and undoes the bookkeeping of frames the backend skipped after an error.

use std::collections::{HashMap, VecDeque};

use bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};

use crate::backend::statements::{server_name, ServerStatements, StatementId, SERVER_NAME_LEN};
use crate::errors::ClientError;
use crate::protocol::tag::frontend as fe;
use crate::protocol::PgError;

/// A statement name no one uses: Close of it is a no-op that still answers CloseComplete in order, and a Parse
/// under it (closed right after) answers ParseComplete for a statement the connection already has.
const NOOP_NAME: &[u8] = b"pgtenant_noop";
/// Most named statements one client may keep in transaction pool mode, and most bytes of their Parse frames.
pub const MAX_CLIENT_STATEMENTS: usize = 10_000;
pub const MAX_CLIENT_BYTES: usize = 16 << 20;
/// Most Parse/Close frames awaiting completion on one connection (a client sending Close after Close without a
/// Sync cannot grow it without bound).
pub const MAX_INFLIGHT: usize = 100_000;
/// Longest portal or statement name accepted at the head of a Bind or Parse that streams through.
pub const MAX_HEAD_NAMES: usize = 4096;

/// A client's statement: its identity and the Parse frame that prepares it under its server name.
#[derive(Clone)]
struct ClientStatement {
    id: StatementId,
    parse: Bytes,
}

/// What the proxy must undo when the backend skipped (or failed) a Parse or Close it was sent.
enum Undo {
    Nothing,
    /// An unnamed Parse got no ParseComplete (skipped after an earlier error, or failed): what the proxy kept
    /// of the client's unnamed statement is no longer known to be right.
    Unnamed,
    /// The connection does not have this statement after all.
    Forget(StatementId),
    /// The connection still has this statement (its eviction was skipped).
    Restore(StatementId),
    /// The client's Parse (`made`: the id it defined) or Close (`made`: None) of `name` did not happen: the name
    /// means what it meant before, unless a later frame changed it again; a Parse sent for real also leaves the
    /// connection without the statement (`forget`).
    Client {
        name: Box<[u8]>,
        made: Option<StatementId>,
        before: Option<ClientStatement>,
        forget: Option<StatementId>,
    },
}

struct Entry {
    /// Number of the ReadyForQuery that ends the batch this frame belongs to.
    batch: u64,
    /// The proxy's own frame: its completion does not reach the client.
    swallow: bool,
    undo: Undo,
}

/// Parse and Close frames sent on one backend connection and not yet answered, in order.
#[derive(Default)]
pub struct Inflight {
    queue: VecDeque<Entry>,
    /// ReadyForQuery replies asked for / received.
    sent: u64,
    done: u64,
}

impl Inflight {
    /// A frame that the backend answers with ReadyForQuery was sent.
    pub fn sent_ready(&mut self) {
        self.sent += 1;
    }

    /// Syncs sent during a COPY get no ReadyForQuery.
    pub fn ignored(&mut self, n: u32) {
        self.sent = self.sent.saturating_sub(u64::from(n));
    }

    fn push(&mut self, swallow: bool, undo: Undo) {
        self.queue.push_back(Entry {
            batch: self.sent + 1,
            swallow,
            undo,
        });
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Empty and counting from zero, for the next connection (the queue keeps its memory).
    pub fn reset(&mut self) {
        self.queue.clear();
        self.sent = 0;
        self.done = 0;
    }

    /// A ParseComplete or CloseComplete arrived: true when it answers the proxy's own frame (drop it).
    pub fn on_complete(&mut self) -> bool {
        self.queue.pop_front().is_some_and(|e| e.swallow)
    }

    /// A ReadyForQuery arrived: frames of the batch it ends that got no completion were skipped or failed.
    pub fn on_ready(&mut self, server: &mut ServerStatements, client: &mut ClientStatements) {
        self.done += 1;
        if self.queue.front().is_none_or(|e| e.batch > self.done) {
            return;
        }
        let mut stale = Vec::new();
        while self.queue.front().is_some_and(|e| e.batch <= self.done) {
            stale.extend(self.queue.pop_front());
        }
        // Newest first, so each undo restores what was true before its frame.
        for e in stale.into_iter().rev() {
            match e.undo {
                Undo::Nothing => {}
                Undo::Unnamed => client.forget_unnamed(),
                Undo::Forget(id) => server.remove(id),
                Undo::Restore(id) => server.restore(id),
                Undo::Client {
                    name,
                    made,
                    before,
                    forget,
                } => {
                    if let Some(id) = forget {
                        server.remove(id);
                    }
                    if client.map.get(&name).map(|c| c.id) == made {
                        match before {
                            Some(b) => client.insert(name, b),
                            None => client.remove(&name),
                        };
                    }
                }
            }
        }
    }
}

/// Where rewritten frames go: the backend's output buffer and what the proxy knows about that connection.
pub struct Target<'a> {
    pub out: &'a mut BytesMut,
    pub inflight: &'a mut Inflight,
    pub statements: &'a mut ServerStatements,
    /// `max_prepared_statements`.
    pub limit: usize,
    /// The connection has this session's unnamed statement.
    pub unnamed_ours: &'a mut bool,
}

/// One client's named statements.
#[derive(Default)]
pub struct ClientStatements {
    map: HashMap<Box<[u8]>, ClientStatement>,
    /// Bytes of the Parse frames kept.
    bytes: usize,
    /// The client's last unnamed Parse, as sent (empty: none, or too large to keep). In transaction pooling the
    /// next transaction may run on another connection, where it is prepared again before a Bind or Describe
    /// of the unnamed statement (libpq's `PQsendPrepare(conn, "", ...)` then `PQsendQueryPrepared`). The
    /// buffer is reused, so a Parse per query costs a copy, not an allocation.
    unnamed: BytesMut,
}

/// Longest unnamed Parse kept for preparing again elsewhere (larger ones stream through and are not kept).
const MAX_UNNAMED_KEPT: usize = 64 * 1024;

impl ClientStatements {
    /// Forwards a whole Parse, Bind, Describe or Close frame under server names. `resolution` gives the
    /// settings that decide name resolution (asked only for a named Parse). A Parse refused here (too many
    /// statements) sends nothing.
    pub fn forward(
        &mut self,
        frame: &[u8],
        resolution: impl FnOnce() -> String,
        mut t: Target<'_>,
    ) -> Result<(), PgError> {
        let body = &frame[5..];
        match frame[0] {
            fe::PARSE => return self.parse(frame, resolution, t),
            fe::BIND => match split_names(body) {
                Some((portal, stmt, rest)) if !stmt.is_empty() => match self.ensure(stmt, &mut t) {
                    Some(id) => put_frame(
                        t.out,
                        fe::BIND,
                        &[portal, b"\0", &server_name(id), b"\0", rest],
                    ),
                    None => t.out.extend_from_slice(frame),
                },
                Some(_) => {
                    self.ensure_unnamed(&mut t);
                    t.out.extend_from_slice(frame);
                }
                None => t.out.extend_from_slice(frame),
            },
            // Describe of the unnamed statement.
            fe::DESCRIBE if body == b"S\0" => {
                self.ensure_unnamed(&mut t);
                t.out.extend_from_slice(frame);
            }
            fe::DESCRIBE => match statement_target(body).and_then(|stmt| self.ensure(stmt, &mut t))
            {
                Some(id) => put_frame(t.out, fe::DESCRIBE, &[b"S", &server_name(id), b"\0"]),
                None => t.out.extend_from_slice(frame),
            },
            fe::CLOSE => {
                match statement_target(body) {
                    Some(stmt) => {
                        // The client's name goes; the server statement stays for others. Closing a name nobody
                        // uses answers CloseComplete in the right place.
                        let before = self.remove(stmt);
                        put_frame(t.out, fe::CLOSE, &[b"S", NOOP_NAME, b"\0"]);
                        t.inflight.push(
                            false,
                            Undo::Client {
                                name: stmt.into(),
                                made: None,
                                before,
                                forget: None,
                            },
                        );
                    }
                    None => {
                        if body == b"S\0" {
                            // The client closes its unnamed statement: nothing to prepare again elsewhere.
                            self.forget_unnamed();
                            *t.unnamed_ours = false;
                        }
                        t.out.extend_from_slice(frame);
                        t.inflight.push(false, Undo::Nothing);
                    }
                }
            }
            _ => t.out.extend_from_slice(frame),
        }
        Ok(())
    }

    /// Whether [`ClientStatements::forward`] would send this whole Bind or Describe as it is and change nothing:
    /// it names the unnamed statement while the connection holds this session's own (`unnamed_ours`), or
    /// describes a portal. The relay then forwards it in one run with the frames around it (pgbench
    /// `-M extended` sends Parse, Bind, Describe, Execute and Sync per statement, all unnamed).
    pub fn passes_unchanged(frame: &[u8], unnamed_ours: bool) -> bool {
        let body = frame.get(5..).unwrap_or_default();
        match frame.first() {
            Some(&fe::BIND) => {
                unnamed_ours && split_names(body).is_some_and(|(_, stmt, _)| stmt.is_empty())
            }
            Some(&fe::DESCRIBE) => body.first() == Some(&b'P') || unnamed_ours && body == b"S\0",
            _ => false,
        }
    }

    /// Registers a client's named Parse without sending it anywhere. `Ok(false)`: unnamed (or malformed), it
    /// must go to a backend.
    pub fn register(
        &mut self,
        frame: &[u8],
        resolution: impl FnOnce() -> String,
    ) -> Result<bool, PgError> {
        match split_cstr(&frame[5..]) {
            Some((name, definition)) if !name.is_empty() => {
                self.define(name, definition, resolution)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Records `name` as the client's statement `definition`; returns its id, its Parse frame, and what the name
    /// meant before.
    fn define(
        &mut self,
        name: &[u8],
        definition: &[u8],
        resolution: impl FnOnce() -> String,
    ) -> Result<(StatementId, Bytes, Option<ClientStatement>), PgError> {
        let size = 5 + SERVER_NAME_LEN + 1 + definition.len();
        if (self.map.len() >= MAX_CLIENT_STATEMENTS || self.bytes + size > MAX_CLIENT_BYTES)
            && !self.map.contains_key(name)
        {
            return Err(ClientError::TooManyStatements {
                count: MAX_CLIENT_STATEMENTS,
                mib: MAX_CLIENT_BYTES >> 20,
            }
            .into());
        }
        let id = statement_id(definition, &resolution());
        let mut parse = BytesMut::with_capacity(size);
        put_frame(
            &mut parse,
            fe::PARSE,
            &[&server_name(id), b"\0", definition],
        );
        let parse = parse.freeze();
        // Re-preparing a name replaces it (PostgreSQL would refuse with 42P05; the replacement is harmless).
        let before = self.insert(
            name.into(),
            ClientStatement {
                id,
                parse: parse.clone(),
            },
        );
        Ok((id, parse, before))
    }

    fn insert(&mut self, name: Box<[u8]>, stmt: ClientStatement) -> Option<ClientStatement> {
        self.bytes += stmt.parse.len();
        let old = self.map.insert(name, stmt);
        if let Some(o) = &old {
            self.bytes -= o.parse.len();
        }
        old
    }

    fn remove(&mut self, name: &[u8]) -> Option<ClientStatement> {
        let old = self.map.remove(name);
        if let Some(o) = &old {
            self.bytes -= o.parse.len();
        }
        old
    }

    /// A client's Parse: unnamed ones pass as they are; a named one is registered and prepared under its server
    /// name, or, when the connection already has that statement, answered by a throwaway Parse (closed at once)
    /// so its ParseComplete, or its error, arrives where the client expects it.
    fn parse(
        &mut self,
        frame: &[u8],
        resolution: impl FnOnce() -> String,
        t: Target<'_>,
    ) -> Result<(), PgError> {
        let Some((name, definition)) = split_cstr(&frame[5..]) else {
            // Malformed: the backend reports it.
            t.out.extend_from_slice(frame);
            t.inflight.push(false, Undo::Nothing);
            return Ok(());
        };
        if name.is_empty() {
            self.note_unnamed_parse(frame, t.statements, t.unnamed_ours, t.inflight);
            t.out.extend_from_slice(frame);
            return Ok(());
        }
        let (id, parse, before) = self.define(name, definition, resolution)?;
        let undo = |forget| Undo::Client {
            name: name.into(),
            made: Some(id),
            before,
            forget,
        };
        if t.statements.touch(id) {
            // Closing first makes the throwaway Parse safe whatever an earlier, skipped frame left behind.
            close_own(t.out, t.inflight, NOOP_NAME, Undo::Nothing);
            put_frame(t.out, fe::PARSE, &[NOOP_NAME, b"\0", definition]);
            t.inflight.push(false, undo(None));
            close_own(t.out, t.inflight, NOOP_NAME, Undo::Nothing);
        } else {
            record_prepared(id, t.statements, t.out, t.inflight, t.limit);
            close_own(t.out, t.inflight, &server_name(id), Undo::Nothing);
            t.out.extend_from_slice(&parse);
            t.inflight.push(false, undo(Some(id)));
        }
        Ok(())
    }

    /// Makes sure the connection has the statement the client calls `name`, preparing it there first when it
    /// does not, and gives its identity. `None` when the client has no such statement (the frame goes as it is;
    /// the backend reports it).
    fn ensure(&mut self, name: &[u8], t: &mut Target<'_>) -> Option<StatementId> {
        let stmt = self.map.get(name)?;
        if !t.statements.touch(stmt.id) {
            record_prepared(stmt.id, t.statements, t.out, t.inflight, t.limit);
            // A Close first: after frames the backend skipped, the proxy may believe a statement is gone that
            // is still there; preparing it again must not fail for that.
            close_own(t.out, t.inflight, &server_name(stmt.id), Undo::Nothing);
            t.out.extend_from_slice(&stmt.parse);
            t.inflight.push(true, Undo::Forget(stmt.id));
        }
        Some(stmt.id)
    }

    /// What a Parse of the unnamed statement, sent as it is, changes: the client's kept copy, the connection's
    /// unnamed statement (now this session's) and the ParseComplete awaited.
    pub fn note_unnamed_parse(
        &mut self,
        frame: &[u8],
        server: &mut ServerStatements,
        unnamed_ours: &mut bool,
        inflight: &mut Inflight,
    ) {
        self.keep_unnamed(frame);
        server.unnamed = true;
        *unnamed_ours = true;
        inflight.push(false, Undo::Unnamed);
    }

    /// A well-formed Parse of the unnamed statement (its name is empty).
    pub fn parses_unnamed(frame: &[u8]) -> bool {
        frame.first() == Some(&fe::PARSE) && frame.get(5) == Some(&0)
    }

    /// Remembers the client's unnamed Parse (or forgets it when it is too large to keep).
    fn keep_unnamed(&mut self, frame: &[u8]) {
        self.unnamed.clear();
        if frame.len() <= MAX_UNNAMED_KEPT {
            self.unnamed.extend_from_slice(frame);
        }
    }

    /// The client's unnamed statement is gone or no longer known (a Parse too large to keep replaced it, a
    /// simple Query or a Close dropped it, a Parse of it was skipped).
    pub fn forget_unnamed(&mut self) {
        self.unnamed.clear();
    }

    /// Before a Bind or Describe of the unnamed statement on a connection that does not have the client's:
    /// its Parse again, whose completion the client does not see.
    fn ensure_unnamed(&mut self, t: &mut Target<'_>) {
        if *t.unnamed_ours || self.unnamed.is_empty() {
            return;
        }
        t.out.extend_from_slice(&self.unnamed);
        t.inflight.push(true, Undo::Nothing);
        t.statements.unnamed = true;
        *t.unnamed_ours = true;
    }

    /// The head of a Bind too large to hold whole: when its names are all in `head`, writes the rewritten
    /// beginning (header with the new length, portal, server statement name) and returns how many bytes of
    /// `head` it replaced; the rest of the frame streams through unchanged. `None`: the names are not all there
    /// yet.
    pub fn bind_head(&mut self, head: &[u8], total: usize, mut t: Target<'_>) -> Option<usize> {
        let (portal, stmt, _) = split_names(head.get(5..)?)?;
        let consumed = 5 + portal.len() + 1 + stmt.len() + 1;
        let known = if stmt.is_empty() {
            self.ensure_unnamed(&mut t);
            None
        } else {
            self.ensure(stmt, &mut t)
        };
        let Some(id) = known else {
            t.out.extend_from_slice(&head[..consumed]);
            return Some(consumed);
        };
        let len = total - 1 - stmt.len() + SERVER_NAME_LEN;
        t.out.put_u8(fe::BIND);
        t.out.put_u32(len as u32);
        t.out.extend_from_slice(portal);
        t.out.put_u8(0);
        t.out.extend_from_slice(&server_name(id));
        t.out.put_u8(0);
        Some(consumed)
    }

    /// Forgets every statement (the client ran DISCARD ALL or DEALLOCATE ALL).
    pub fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
        self.unnamed.clear();
    }

    /// SQL `DEALLOCATE name` of a statement the client prepared through the protocol: true when it was one.
    pub fn deallocate(&mut self, name: &[u8]) -> bool {
        self.remove(name).is_some()
    }

    /// Closes the unnamed statement a connection's previous user left, taking the CloseComplete out.
    pub fn close_unnamed(out: &mut BytesMut, inflight: &mut Inflight) {
        close_own(out, inflight, b"", Undo::Nothing);
    }

    #[cfg(test)]
    fn contains(&self, name: &[u8]) -> bool {
        self.map.contains_key(name)
    }

    /// Records that a Parse the client sent unrewritten (unnamed, too large to hold whole) is awaiting its
    /// completion.
    pub fn passed(inflight: &mut Inflight) {
        inflight.push(false, Undo::Nothing);
    }
}

/// A Close of statement `name` of the proxy's own; its CloseComplete does not reach the client.
fn close_own(out: &mut BytesMut, inflight: &mut Inflight, name: &[u8], undo: Undo) {
    put_frame(out, fe::CLOSE, &[b"S", name, b"\0"]);
    inflight.push(true, undo);
}

/// Records `id` on the connection, closing the least recently used statement there first when that is over the
/// bound.
fn record_prepared(
    id: StatementId,
    statements: &mut ServerStatements,
    out: &mut BytesMut,
    inflight: &mut Inflight,
    limit: usize,
) {
    if let Some(old) = statements.insert(id, limit) {
        close_own(out, inflight, &server_name(old), Undo::Restore(old));
    }
}

/// A statement's identity: its text and parameter types (the Parse frame after the name), and the settings that
/// decide how its names resolve.
fn statement_id(definition: &[u8], resolution: &str) -> StatementId {
    let mut h = Sha256::new();
    h.update((definition.len() as u64).to_be_bytes());
    h.update(definition);
    h.update(resolution.as_bytes());
    let digest = h.finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    u128::from_be_bytes(id)
}

/// The statement a Describe or Close body names (`S` and a non-empty name).
fn statement_target(body: &[u8]) -> Option<&[u8]> {
    match body.split_first() {
        Some((b'S', rest)) => split_cstr(rest)
            .map(|(name, _)| name)
            .filter(|n| !n.is_empty()),
        _ => None,
    }
}

/// A NUL-terminated string and what follows it.
fn split_cstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = memchr::memchr(0, b)?;
    Some((&b[..end], &b[end + 1..]))
}

/// Portal name, statement name and the rest of a Bind body.
fn split_names(body: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let (portal, rest) = split_cstr(body)?;
    let (stmt, rest) = split_cstr(rest)?;
    Some((portal, stmt, rest))
}

/// Writes a frame: tag, length, then the parts.
fn put_frame(out: &mut BytesMut, tag: u8, parts: &[&[u8]]) {
    let len: usize = 4 + parts.iter().map(|p| p.len()).sum::<usize>();
    out.reserve(1 + len);
    out.put_u8(tag);
    out.put_u32(len as u32);
    for p in parts {
        out.extend_from_slice(p);
    }
}

#[cfg(test)]
#[path = "statements_tests.rs"]
mod tests;
