//! Transaction pool mode: a session holds a backend connection only from the first message of a transaction
//! (or of a statement or extended-protocol batch outside one) until the ReadyForQuery that ends it, unless
//! state that cannot move pins it there. Between transactions the session is *parked*: no backend connection.
//!
//! Each connection remembers which session `SET`s are in effect on it (as a fingerprint); a session that lands
//! on a connection with other settings first gets `RESET ALL` and its own SETs, in one round trip, invisibly.
//! Named prepared statements follow the session through [`super::statements`].

use bytes::Buf;

use super::boundary::Refusal;
use super::parts::move_bytes;
use super::resolve::{checkout, checkout_now, resolve, Resolved};
use super::server::Server;
use super::session::Session;
use super::statements::{ClientStatements, Target, MAX_HEAD_NAMES, MAX_INFLIGHT};
use crate::backend::pool::ReleaseState;
use crate::errors::ClientError;
use crate::metrics::ErrorKind;
use crate::protocol::tag::{backend as be, frontend as fe, status};
use crate::protocol::{messages, sql, PgError};
use crate::quote::quote_ident;
use crate::routing::BackendId;

/// Why a session in transaction pool mode keeps its backend connection although it is idle.
const PIN_SQL_PREPARE: &str = "SQL PREPARE (transaction pool mode)";
/// A connection's settings fingerprint when nobody knows what it holds (never equal to a session's).
const UNKNOWN_SETS: u64 = u64::MAX;
/// What a pooled connection needs before this session's settings go on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reset {
    /// Everything any session may have left (another tenant's, or after code the proxy cannot follow): one
    /// `DISCARD ALL`, prepared statements included. The proxy's statements on a connection are shared by the
    /// sessions that use it, but it cannot see what a session's code does to them: a function or `DO` block
    /// may `DEALLOCATE` one and `PREPARE` its own SQL under the same name, which the next tenant's Bind would
    /// run. So no statement outlives a change of tenant; the next tenant's are prepared again.
    Full,
    /// The same tenant's: only the SETs, when they differ.
    Sets,
}

/// A transaction's checkout that must wait, open a connection or apply settings in a round trip of their own
/// (see [`Session::unpark_now`]).
pub(super) struct Unparking {
    tenant: crate::tenant::TenantId,
    resolved: Resolved,
    /// A connection taken that needs this reset applied first.
    taken: Option<(Server, Reset)>,
}

/// Why a pooled connection could not be made this session's.
pub(super) struct Unsettled(PgError);

impl Unsettled {
    pub(super) fn into_error(self) -> PgError {
        self.0
    }
}

impl Session {
    /// Why this session may not leave its backend connection (or move to another), if anything.
    pub(super) fn pin_reason(&self) -> Option<&'static str> {
        // SQL-level statements live under the client's own names, on one connection.
        self.state.pin_reason().or_else(|| {
            (self.pooling.tx_mode && self.state.has_sql_prepared()).then_some(PIN_SQL_PREPARE)
        })
    }

    /// At the end of a transaction: gives the backend connection back to the pool when the session is in
    /// transaction pool mode and nothing ties it to this connection.
    pub(super) fn park(&mut self) {
        self.park_at(None);
    }

    /// As [`Session::park`], at `now` when the caller has just read the clock: a transaction's end reads it
    /// for the query time, and the checkin then needs no read of its own.
    pub(super) fn park_at(&mut self, now: Option<std::time::Instant>) {
        if !self.pooling.tx_mode || !self.server.as_ref().is_some_and(|s| s.parkable()) {
            return;
        }
        if self.pin_reason().is_some() {
            return;
        }
        let Some(mut server) = self.server.take() else {
            return;
        };
        self.cancel.slot.set(None);
        let conn = server.conn.get_mut();
        (conn.applied_sets, conn.applied_role) = if server.synced {
            self.state.sets_fingerprint()
        } else {
            // Settings of unknown origin: whoever comes next starts with a full reset.
            (UNKNOWN_SETS, true)
        };
        // Who used it, and whether they ran code whose effects are unknown: decides the next user's reset.
        conn.owner = self.place.tenant.clone();
        conn.suspect |= self.state.take_opaque() || !server.synced;
        let (out, mut inflight) = (
            std::mem::take(&mut server.out),
            std::mem::take(&mut server.inflight),
        );
        server.conn.release_at(ReleaseState::Keep, now);
        // A parked session holds no large buffers: one that grew for a burst goes.
        if out.capacity() <= 8 * 1024 {
            inflight.reset();
            self.pooling.spare = Some((out, inflight));
        }
    }

    /// A connection checked out outside [`Session::unpark_now`] (at login, or for `SET pgtenant.tenant`) in
    /// transaction pool mode: make its settings the session's, then park.
    pub(super) async fn settle(&mut self) {
        if !self.pooling.tx_mode {
            return;
        }
        if let Some(mut server) = self.server.take() {
            let backend = self
                .place
                .route
                .as_ref()
                .map(|r| r.backend.clone())
                .unwrap_or_default();
            match self.settle_settings(&mut server, &backend, false).await {
                Ok(()) => self.server = Some(server),
                Err(e) => {
                    tracing::debug!(error = %e.into_error().message, "could not settle a pooled connection");
                    self.cancel.slot.set(None);
                    server.release(true);
                }
            }
        }
        self.park();
    }

    /// At the start of a transaction of a parked session: a backend connection of the tenant's current route
    /// (a route changed since the last transaction is how a transaction-pool session moves), holding the
    /// session's settings. Done here without an `await` when an idle connection needs no round trip, as most
    /// transactions find one; otherwise what is left is returned for [`Session::unpark_later`].
    pub(super) fn unpark_now(&mut self) -> Result<Option<Unparking>, Refusal> {
        let Some(tenant) = self.place.tenant.clone() else {
            return Ok(None);
        };
        let resolved = match self.pooling.resolved.take() {
            Some(r) if r.tenant == tenant && self.fresh(&r) => r,
            _ => resolve(&self.shared, &self.info, &tenant).map_err(Refusal::Statement)?,
        };
        self.pooling.route_path = resolved.route_path.clone();
        let Some(mut server) = checkout_now(&resolved, &tenant, &mut self.pooling.spare) else {
            return Ok(Some(Unparking {
                tenant,
                resolved,
                taken: None,
            }));
        };
        if let Some(reset) = self.settle_now(&mut server, true) {
            return Ok(Some(Unparking {
                tenant,
                resolved,
                taken: Some((server, reset)),
            }));
        }
        self.attach_unparked(server, resolved);
        Ok(None)
    }

    /// The rest of [`Session::unpark_now`]: a checkout that waits or opens a connection, or settings applied in
    /// a round trip of their own.
    pub(super) async fn unpark_later(&mut self, job: Unparking) -> Result<(), Refusal> {
        let Unparking {
            tenant,
            resolved,
            taken,
        } = job;
        let server = match taken {
            Some((server, reset)) => {
                self.settle_later(server, &resolved.route.backend, reset)
                    .await?
            }
            None => self.checkout_settled(&resolved, &tenant).await?,
        };
        self.attach_unparked(server, resolved);
        Ok(())
    }

    /// Makes a settled connection the session's.
    fn attach_unparked(&mut self, mut server: Server, resolved: Resolved) {
        // The unnamed statement is not the pool's: one left by the connection's last user is closed first (its
        // CloseComplete is taken out of the replies).
        let conn = server.conn.get_mut();
        if std::mem::take(&mut conn.statements.unnamed) {
            ClientStatements::close_unnamed(&mut server.out, &mut server.inflight);
        }
        self.cancel.slot.attach(server.conn.get());
        self.server = Some(server);
        if self.place.epoch != resolved.epoch {
            if self
                .place
                .route
                .as_ref()
                .is_some_and(|r| **r != *resolved.route)
            {
                self.shared.metrics.moves.increment(1);
            }
            self.place.route = Some(resolved.route.clone());
            self.place.epoch = resolved.epoch;
            self.publish_route();
        }
        self.pooling.resolved = Some(resolved);
    }

    /// A connection of `resolved`'s pool holding this session's settings.
    async fn checkout_settled(
        &mut self,
        resolved: &Resolved,
        tenant: &crate::tenant::TenantId,
    ) -> Result<Server, Refusal> {
        let mut server = match checkout(resolved, tenant, self.pooling.spare.take()).await {
            Ok(s) => s,
            Err(e) => {
                self.count_error(ErrorKind::BackendUnavailable);
                return Err(Refusal::Statement(e));
            }
        };
        match self.settle_now(&mut server, true) {
            None => Ok(server),
            Some(reset) => {
                Box::pin(self.settle_later(server, &resolved.route.backend, reset)).await
            }
        }
    }

    /// A checked-out connection that needs its own round trip to hold the session's settings (see
    /// [`Session::settle_now`]); released, as broken, when they cannot be applied.
    async fn settle_later(
        &mut self,
        mut server: Server,
        backend: &BackendId,
        reset: Reset,
    ) -> Result<Server, Refusal> {
        match self.apply_settings(&mut server, backend, reset).await {
            Ok(()) => {
                server.synced = true;
                Ok(server)
            }
            Err(e) => {
                self.count_error(ErrorKind::MoveFailed);
                server.release(true);
                Err(Refusal::Statement(e.into_error()))
            }
        }
    }

    /// A cached resolution still holds: same routing epoch, same backends (two atomic loads).
    fn fresh(&self, r: &Resolved) -> bool {
        self.shared.router.epoch() == r.epoch && self.shared.backends.is_current(r.backends)
    }

    /// Makes the connection this session's: its settings, its tenant's schema (shared pools) and, when
    /// another tenant used it last or its last user ran code whose effects are unknown (`DO`, `CALL`), a full
    /// reset first. The connection usually needs nothing. `ahead`: client frames follow at once (a transaction
    /// starting), so a session with no SETs of its own gets the proxy's part pipelined in front of them (see
    /// [`Session::pipeline_reset`]); otherwise, and at login (where nothing follows, and a pipelined reply would
    /// hold the connection until the client's next statement), it takes a round trip of its own, boxed so its
    /// state does not sit in every session's task.
    async fn settle_settings(
        &mut self,
        server: &mut Server,
        backend: &BackendId,
        ahead: bool,
    ) -> Result<(), Unsettled> {
        if let Some(reset) = self.settle_now(server, ahead) {
            Box::pin(self.apply_settings(server, backend, reset)).await?;
            server.synced = true;
        }
        Ok(())
    }

    /// What `settle_settings` does without a round trip: nothing needed, or the proxy's part pipelined ahead
    /// (the connection is then synced). `Some`: the reset that a round trip of its own must apply.
    fn settle_now(&mut self, server: &mut Server, ahead: bool) -> Option<Reset> {
        let conn = server.conn.get();
        let foreign = conn.owner.is_some() && conn.owner != self.place.tenant;
        let reset = if foreign || conn.suspect {
            self.shared.metrics.tenant_resets.increment(1);
            Reset::Full
        } else {
            Reset::Sets
        };
        let (fingerprint, _) = self.state.sets_fingerprint();
        let needed = reset != Reset::Sets
            || conn.route_path != self.pooling.route_path
            || conn.applied_sets != fingerprint;
        if needed && ahead && fingerprint == 0 {
            self.pipeline_reset(server, reset);
        } else if needed {
            return Some(reset);
        }
        server.synced = true;
        None
    }

    /// The proxy's part (the reset `reset` calls for, then the tenant's schema) sent ahead of the client's
    /// frames, each statement an extended-protocol Execute, with no Sync. Without a Sync, an error in any of
    /// them (a cancel landing on it included) makes PostgreSQL skip every message up to the next Sync, so none
    /// of the client's statements runs on what the last user left; the session then ends (see server_in's
    /// `own_failed`). They run in a transaction of their own that is committed before the client's frames, so
    /// a client's `ROLLBACK` cannot undo them and the client's statements run as if sent alone (`VACUUM`
    /// included, which PostgreSQL refuses inside a pipeline). Their replies are taken out as they arrive.
    ///
    /// Measured straight on PostgreSQL in front of a point select (BENCHMARKS.md), the statement count is the
    /// cost: a full reset is one `DISCARD ALL` (which PostgreSQL
    /// commits at once as the first statement of a pipeline), and the schema set in an explicit `BEGIN` ...
    /// `COMMIT` (an implicit transaction ended by `COMMIT` warns, and the warning alone cost a third of the
    /// throughput).
    fn pipeline_reset(&mut self, server: &mut Server, reset: Reset) {
        let conn = server.conn.get_mut();
        let discard_all = reset == Reset::Full;
        let reset_sql = match (reset, conn.applied_sets != 0, conn.applied_role) {
            (Reset::Full, _, _) => "",
            (Reset::Sets, true, true) => "RESET ALL; RESET SESSION AUTHORIZATION; RESET ROLE",
            (Reset::Sets, true, false) => "RESET ALL",
            (Reset::Sets, false, _) => "",
        };
        let path = match self.pooling.route_path.as_deref() {
            Some(p) => Some(format!("SET search_path = {}", quote_ident(p))),
            // After DISCARD ALL the schema is the login's already.
            None if discard_all => None,
            None => Some(String::from("RESET search_path")),
        };
        let mut sent = 0;
        let mut send = |out: &mut bytes::BytesMut, sql: &str| {
            messages::execute_unnamed(out, sql);
            sent += 1;
        };
        if discard_all {
            send(&mut server.out, "DISCARD ALL");
            conn.statements.clear();
        }
        if !reset_sql.is_empty() || path.is_some() {
            send(&mut server.out, "BEGIN");
            for statement in reset_sql.split("; ").filter(|s| !s.is_empty()) {
                send(&mut server.out, statement);
            }
            if let Some(path) = &path {
                send(&mut server.out, path);
            }
            send(&mut server.out, "COMMIT");
        }
        server.own_pending += sent;
        // The backend's unnamed statement is now our last one: closed by `attach_unparked` like any user's, so a
        // client's Bind of an unnamed statement it never prepared here fails as on PostgreSQL instead of
        // running our COMMIT.
        conn.statements.unnamed |= sent > 0;
        (conn.applied_sets, conn.applied_role) = (0, false);
        conn.route_path = self.pooling.route_path.clone();
        conn.owner = self.place.tenant.clone();
        conn.suspect = false;
    }

    /// Brings the connection's session to this session's: a full reset when `full` (anything another
    /// session may have left: settings, role, cursors, listeners, advisory locks, sequences' cached values;
    /// a connection whose session made temporary objects is refused, to be closed), else `RESET ALL`; then
    /// the tenant's schema and this session's SETs. One round trip. Tells the client about parameters that
    /// differ from what it was told.
    async fn apply_settings(
        &mut self,
        server: &mut Server,
        backend: &BackendId,
        reset: Reset,
    ) -> Result<(), Unsettled> {
        let (fingerprint, role) = self.state.sets_fingerprint();
        let conn = server.conn.get_mut();
        // The proxy's own part (a full reset's `DISCARD ALL`, which may not share a Query; the SETs' reset and
        // the tenant's schema) comes first; the client's SETs follow one each, so a SET the backend refuses fails
        // alone, as it did when the client sent it.
        let mut own = String::from(match (reset, conn.applied_role) {
            (Reset::Full, _) => "",
            (Reset::Sets, true) => "RESET ALL; RESET SESSION AUTHORIZATION; RESET ROLE",
            (Reset::Sets, false) => "RESET ALL",
        });
        if let Some(p) = &self.pooling.route_path {
            if !own.is_empty() {
                own.push_str("; ");
            }
            own.push_str("SET search_path = ");
            own.push_str(&quote_ident(p));
        }
        let mut statements: Vec<&str> = Vec::new();
        if reset == Reset::Full {
            statements.push("DISCARD ALL");
            // Whatever happens next, the statements the connection held are gone or unknown.
            conn.statements.clear();
        }
        if !own.is_empty() {
            statements.push(&own);
        }
        statements.extend(self.state.set_statements());
        crate::backend::query::run_collect(backend, conn, &statements)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "could not apply session settings on a pooled connection");
                Unsettled(
                    ClientError::SettingsNotRecreated
                        .to_pg()
                        .with_detail(e.to_string()),
                )
            })?;
        (conn.applied_sets, conn.applied_role) = (fingerprint, role);
        conn.route_path = self.pooling.route_path.clone();
        conn.owner = self.place.tenant.clone();
        conn.suspect = false;
        self.client.tell(&conn.params);
        Ok(())
    }

    /// A frame that needs no backend connection while parked: a lone Sync is answered (nothing is open), Flush
    /// and copy messages outside COPY are ignored, as PostgreSQL does. False: the frame starts work.
    pub(super) fn parked_frame(&mut self, tag: u8, total: usize) -> bool {
        match tag {
            fe::SYNC => messages::ready_for_query(&mut self.client.cout, status::IDLE),
            fe::FLUSH | fe::COPY_DATA | fe::COPY_DONE | fe::COPY_FAIL => {}
            _ => return false,
        }
        self.client.cin.advance(total);
        true
    }

    /// A named Parse while parked is answered here: the statement is prepared on a backend connection when a
    /// Bind or Describe first needs it there. Holding no connection for it matters: a client that prepares
    /// synchronously (libpq's PQprepare, as pgbench -M prepared does) while other clients of the same thread
    /// hold every connection in open transactions would otherwise wait for them, and they for it. An error in
    /// the statement is reported when it is first used. False: not such a Parse.
    pub(super) fn parse_locally(&mut self, total: usize) -> bool {
        let frame = &self.client.cin[..total];
        // A tenant statement is refused where it is used, like any other.
        let text = crate::protocol::inspect::parse_statement(frame).map_or(&[][..], |(_, t)| t);
        if !matches!(sql::recognise(text), sql::Recognised::Pass) {
            return false;
        }
        let (state, path) = (&self.state, self.pooling.route_path.as_deref());
        match self
            .pooling
            .statements
            .register(frame, || resolution(state, path))
        {
            Ok(false) => return false,
            Ok(true) => {
                // The session state sees the Parse and its completion, as if a backend had answered.
                self.state.on_client(fe::PARSE, Some(frame), false);
                self.state.on_backend(be::PARSE_COMPLETE, b"1\0\0\0\x04");
                messages::parse_complete(&mut self.client.cout);
            }
            Err(e) => self.refuse(fe::PARSE, e),
        }
        self.client.cin.advance(total);
        true
    }

    /// Forwards a whole Parse, Bind, Describe or Close under server statement names (transaction pool mode).
    pub(super) fn forward_statement(&mut self, total: usize) -> Result<(), PgError> {
        let limit = self.shared.config.load().proxy.max_prepared_statements;
        let Some(s) = self.server.as_mut() else {
            self.client.cin.advance(total);
            return Ok(());
        };
        if s.inflight.len() >= MAX_INFLIGHT {
            return Err(PgError::from(ClientError::Protocol(String::from(
                "too many Parse and Close messages without a Sync",
            ))));
        }
        let (state, path) = (&self.state, self.pooling.route_path.as_deref());
        let conn = s.conn.get_mut();
        let result = self.pooling.statements.forward(
            &self.client.cin[..total],
            || resolution(state, path),
            Target {
                out: &mut s.out,
                inflight: &mut s.inflight,
                statements: &mut conn.statements,
                limit,
                unnamed_ours: &mut s.unnamed_ours,
            },
        );
        self.client.cin.advance(total);
        if let Err(e) = result {
            self.fail_in_batch(e);
        }
        Ok(())
    }

    /// The head of a Parse or Bind too large to hold whole, in transaction pool mode. `Ok(false)`: its names
    /// have not all arrived yet. An unnamed Parse streams through; a named one cannot be prepared elsewhere and
    /// is refused.
    pub(super) fn forward_statement_head(
        &mut self,
        tag: u8,
        total: usize,
        avail: usize,
    ) -> Result<bool, PgError> {
        let limit = self.shared.config.load().proxy.max_prepared_statements;
        let Some(s) = self.server.as_mut() else {
            return Ok(true);
        };
        let head = &self.client.cin[..avail];
        let names_end = head
            .get(5..)
            .and_then(|b| memchr::memchr(0, b))
            .map(|n| 5 + n);
        let Some(name_end) = names_end else {
            return names_pending(avail, total);
        };
        if tag == fe::PARSE {
            if name_end > 5 {
                self.client.discarding = true;
                self.client.cin.advance(avail);
                self.fail_in_batch(ClientError::StatementTooLarge.into());
                return Ok(true);
            }
            ClientStatements::passed(&mut s.inflight);
            s.conn.get_mut().statements.unnamed = true;
            s.unnamed_ours = true;
            self.pooling.statements.forget_unnamed();
            move_bytes(&mut self.client.cin, &mut s.out, avail);
            return Ok(true);
        }
        let conn = s.conn.get_mut();
        let target = Target {
            out: &mut s.out,
            inflight: &mut s.inflight,
            statements: &mut conn.statements,
            limit,
            unnamed_ours: &mut s.unnamed_ours,
        };
        match self.pooling.statements.bind_head(head, total, target) {
            Some(consumed) => {
                self.client.cin.advance(consumed);
                move_bytes(&mut self.client.cin, &mut s.out, avail - consumed);
                Ok(true)
            }
            None => names_pending(avail, total),
        }
    }

    /// A simple query that starts with DEALLOCATE (a cheap look before the proxy takes a closer one). Comments
    /// before it count as white space, as they do to PostgreSQL: `/**/DEALLOCATE pgtenant_...` would otherwise
    /// reach the backend and drop a statement other sessions use.
    pub(super) fn is_deallocate(&self, total: usize) -> bool {
        let text =
            crate::protocol::inspect::query_text(&self.client.cin[..total]).unwrap_or_default();
        let text = text.trim_ascii_start();
        // Lexing the first word costs a transaction about 3% of the session's work (instructions.sh), so only
        // a statement that starts with a comment is lexed.
        if text.starts_with(b"/*") || text.starts_with(b"--") {
            return sql::starts_with_word(text, b"deallocate");
        }
        text.get(..10)
            .is_some_and(|w| w.eq_ignore_ascii_case(b"deallocate"))
    }

    /// SQL `DEALLOCATE name` in transaction pool mode. Of a statement the client prepared through the protocol
    /// (older psycopg does this), it is answered here: the server statement may be shared and stays. Of one of
    /// the proxy's own names, it is refused (other sessions rely on it). True when answered.
    pub(super) fn deallocate_locally(&mut self, total: usize) -> bool {
        let text =
            crate::protocol::inspect::query_text(&self.client.cin[..total]).unwrap_or_default();
        let sql::Effect::Deallocate { name } = sql::classify(text) else {
            return false;
        };
        // In a failed transaction PostgreSQL refuses it; let the backend say so.
        if self.status() == status::FAILED {
            return false;
        }
        if name.starts_with("pgtenant_") {
            self.client.cin.advance(total);
            ClientError::ReservedStatement(name.to_owned())
                .to_pg()
                .encode(&mut self.client.cout);
        } else if self.pooling.statements.deallocate(name.as_bytes()) {
            self.state.forget_statement(name.as_bytes());
            self.client.cin.advance(total);
            messages::command_complete(&mut self.client.cout, "DEALLOCATE");
        } else {
            return false;
        }
        let status = self.status();
        messages::ready_for_query(&mut self.client.cout, status);
        true
    }
}

/// What decides how a statement's names resolve when it is prepared: the tenant's schema where the proxy
/// sets it per transaction (one connection serves several schema tenants, and a plan made for one schema must
/// never be reused for another), then the session's own `search_path`/role SETs.
fn resolution(state: &super::state::SessionState, route_path: Option<&str>) -> String {
    let own = state.resolution();
    match route_path {
        Some(p) => format!("route:{p}\0{own}"),
        None => own,
    }
}

/// Names not complete in the head of a streamed frame: wait for more, within a bound.
fn names_pending(avail: usize, total: usize) -> Result<bool, PgError> {
    if avail >= total || avail >= MAX_HEAD_NAMES {
        return Err(PgError::from(ClientError::Protocol(String::from(
            "statement or portal name too long or not terminated",
        ))));
    }
    Ok(false)
}
