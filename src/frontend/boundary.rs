//! Transaction boundaries: where a session passes its tenant's gate, follows a changed route to a new backend
//! connection, and takes on or gives up a backend connection.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::parts::End;
use super::resolve::{connect_server, Attached};
use super::session::Session;
use crate::config::PinnedAtMove;
use crate::errors::ClientError;
use crate::gate::{Gate, GateError, GatePass};
use crate::metrics::ErrorKind;
use crate::protocol::tag::frontend as fe;
use crate::protocol::PgError;
use crate::routing::Epoch;
use crate::sessions::SessionRoute;
use crate::tenant::TenantId;

/// The error a session pinned to a tenant's old backend gets when a migration moved the tenant.
pub fn moved_away(tenant: &TenantId, reason: &str) -> PgError {
    ClientError::MovedAway {
        tenant: tenant.clone(),
        reason: reason.to_owned(),
    }
    .into()
}

/// Whether a frame that may start new work can go to the backend now.
pub(super) enum Admission {
    Go,
    /// Refuse the frame with this error; nothing of it reaches the backend.
    Refuse(PgError),
    /// Not yet: the backend still owes replies to earlier frames. The session blocks until it does not.
    Wait,
}

/// Why work could not start.
pub(super) enum Refusal {
    /// This statement fails; the session goes on.
    Statement(PgError),
    /// The session ends.
    Session(PgError),
}

impl Session {
    /// Called before forwarding a frame. At an idle boundary it waits at the tenant's gate and follows a changed
    /// route. New work starts only once the backend owes nothing (a Sync the proxy forwarded on its own, or an
    /// exempt frame, may still be answered), so a refusal or a move never overtakes owed replies.
    pub(super) async fn begin_work(&mut self, tag: u8) -> Result<Admission, End> {
        // A transaction-pool session holding a pass but no connection has nothing open on any backend: its
        // frames would go nowhere, so the transaction starts over (gate, connection) instead.
        if self.txn.pass.is_some() && self.pooling.tx_mode && self.server.is_none() {
            self.end_transaction(false);
        }
        // Sync, Flush and stray copy messages start nothing.
        if self.txn.pass.is_some()
            || matches!(
                tag,
                fe::SYNC | fe::FLUSH | fe::COPY_DATA | fe::COPY_DONE | fe::COPY_FAIL
            )
        {
            return Ok(Admission::Go);
        }
        if self.server.as_ref().is_some_and(|s| s.pending > 0) {
            self.txn.blocked = true;
            return Ok(Admission::Wait);
        }
        let Some(gate) = self.txn.gate.take() else {
            return Ok(Admission::Go);
        };
        // Clock reads are counted on this path (a few per transaction add up at tens of thousands a second):
        // a pass taken at once starts the transaction when it arrived.
        let arrived = std::time::Instant::now();
        let (entered, started) = match gate.try_pass() {
            Ok(pass) => (Ok(pass), arrived),
            // Rare (the gate is closed): boxed, so its state is not part of every session's task.
            Err(gate) => (
                Box::pin(self.wait_at_gate(gate)).await?,
                std::time::Instant::now(),
            ),
        };
        match entered {
            Ok(pass) => {
                self.txn.pass = Some(pass);
                self.txn.started = Some(started);
                // Only this transaction's own ReadyForQuery may end it.
                self.txn.settled_at = None;
            }
            Err((gate, e)) => {
                self.txn.gate = Some(gate);
                self.count_error(match e {
                    GateError::QueueFull(_) => ErrorKind::QueueFull,
                    GateError::WaitTimeout(..) => ErrorKind::GateTimeout,
                });
                return Ok(Admission::Refuse(ClientError::Held(e.to_string()).into()));
            }
        }
        self.handle
            .info
            .in_transaction
            .store(true, Ordering::Relaxed);
        if self.pooling.tx_mode {
            // A connection kept past the last transaction (say, a late notice was still unread) goes back now if
            // nothing pins the session (reset, or closed if it cannot be), so the next one comes from the pool
            // the transaction-pool way. Only pinned sessions keep theirs (and never replay anything).
            self.park();
            if self.pin_reason().is_none() {
                if let Some(old) = self.server.take() {
                    self.cancel.slot.set(None);
                    old.release_idle();
                }
            }
        }
        let (routed, waited) = if self.pooling.tx_mode && self.server.is_none() {
            // A connection taken without an await waited for nothing, and reads no clock for it.
            match self.unpark_now() {
                Ok(Some(rest)) => (Box::pin(self.unpark_later(rest)).await, true),
                other => (other.map(|_| ()), false),
            }
        } else if self.route_changed() {
            // Rare: boxed, so its state does not sit in every idle session's task.
            (Box::pin(self.follow_route()).await, true)
        } else {
            (Ok(()), false)
        };
        match routed {
            // As PgBouncer's wait time: counted for transactions that got their connection. A session that
            // kept its connection, or took an idle one at once, waited for nothing.
            Ok(()) => {
                // `started` is `arrived` unless the session waited at a closed gate (read after that wait).
                let now = if waited {
                    std::time::Instant::now()
                } else {
                    started
                };
                self.txn.tally.wait_us += now.saturating_duration_since(arrived).as_micros() as u64;
                // Lent to the query time of the query about to go (client_in's `book`), so that reads no clock.
                self.txn.routed_at = Some(now);
                Ok(Admission::Go)
            }
            Err(Refusal::Statement(e)) => {
                self.end_transaction(false);
                Ok(Admission::Refuse(e))
            }
            Err(Refusal::Session(e)) => Err(End::Fatal(e)),
        }
    }

    /// The slow path: the gate is closed, so wait in its queue (or until the proxy shuts down).
    async fn wait_at_gate(
        &mut self,
        gate: Arc<Gate>,
    ) -> Result<Result<GatePass, (Arc<Gate>, GateError)>, End> {
        let (max_queued, wait) = {
            let c = self.shared.config.load();
            (
                c.migration.max_queued_per_tenant,
                c.proxy.query_wait_timeout(),
            )
        };
        let fallback = gate.clone();
        let info = self.handle.info.clone();
        tokio::select! {
            r = gate.enter(max_queued, wait) => Ok(r),
            _ = info.end.fired() => {
                self.txn.gate = Some(fallback);
                Err(self.shutdown_end())
            }
        }
    }

    /// The current transaction is over: give back the gate pass and count it.
    pub(super) fn end_transaction(&mut self, completed: bool) {
        let Some(pass) = self.txn.pass.take() else {
            return;
        };
        self.txn.gate = pass.leave();
        self.txn.query_started = None;
        self.txn.routed_at = None;
        self.handle
            .info
            .in_transaction
            .store(false, Ordering::Relaxed);
        let started = self.txn.started.take();
        let ended = self.txn.settled_at.take();
        match &self.place.tm {
            Some(tm) if completed => tm.finished(&mut self.txn.tally, started, ended),
            Some(tm) => tm.add(&mut self.txn.tally),
            None => self.txn.tally = Default::default(),
        }
    }

    /// The routing table changed since this session's backend was chosen (only then can the route differ).
    fn route_changed(&self) -> bool {
        self.place.tenant.is_some() && self.shared.router.epoch() != self.place.epoch
    }

    /// When the routing table changed since this session's backend was chosen and the tenant's route is now
    /// different, moves the session to a backend connection of the new route (unless state pins it).
    async fn follow_route(&mut self) -> Result<(), Refusal> {
        let Some(tenant) = self.place.tenant.clone() else {
            return Ok(());
        };
        let (epoch, route) = {
            let table = self.shared.router.load();
            if table.epoch == self.place.epoch {
                return Ok(());
            }
            (table.epoch, table.get(tenant.as_str()).cloned())
        };
        let Some(route) = route else {
            return Err(Refusal::Session(
                ClientError::TenantRemoved(tenant.clone()).into(),
            ));
        };
        if self.place.route.as_deref() == Some(&*route) {
            self.place.epoch = epoch;
            self.place.stale_since = None;
            self.publish_route();
            return Ok(());
        }
        if let Some(reason) = self.pin_reason() {
            return self.pinned_on_old_route(&tenant, reason);
        }
        self.place.stale_since = None;
        // A new route on the same backend and database draws from the same pool: give the old connection back
        // first, or a full pool would refuse every move. Without a connection the session cannot go on if the
        // checkout then fails.
        let same_pool = self
            .place
            .route
            .as_ref()
            .is_some_and(|old| old.backend == route.backend && old.database == route.database);
        if same_pool {
            self.cancel.slot.set(None);
            if let Some(old) = self.server.take() {
                old.release_idle();
            }
        }
        let fail = |e: PgError| {
            if same_pool {
                Refusal::Session(PgError {
                    severity: crate::protocol::messages::Severity::Fatal,
                    ..e
                })
            } else {
                Refusal::Statement(e)
            }
        };
        let mut attached = match connect_server(&self.shared, &self.info, &tenant).await {
            Ok(a) => a,
            Err(e) => {
                self.count_error(ErrorKind::MoveFailed);
                return Err(fail(e));
            }
        };
        if let Err(e) = self.replay_state(&mut attached).await {
            self.count_error(ErrorKind::MoveFailed);
            attached.server.release(true);
            if same_pool {
                return Err(fail(e));
            }
            // The state cannot be recreated there: the session stays where its state is, as a pinned session
            // (so `pinned_at_move` decides), instead of failing every statement from now on.
            self.state.replay_failed();
            let reason = self
                .pin_reason()
                .unwrap_or("session state could not be replayed");
            return self.pinned_on_old_route(&tenant, reason);
        }
        self.install(Some(tenant), Some(attached));
        self.shared.metrics.moves.increment(1);
        Ok(())
    }

    /// Recreates the session's tracked state (SETs, SQL PREPAREs, named statements) on a new backend connection,
    /// invisibly to the client. Any failure is the move's failure: the session does not drift silently.
    async fn replay_state(&self, attached: &mut Attached) -> Result<(), PgError> {
        if self.state.is_empty() {
            return Ok(());
        }
        let (simple, parses) = self.state.replay();
        let conn = attached.server.conn.get_mut();
        let backend = attached.route.backend.clone();
        let statements: Vec<&str> = simple.iter().map(String::as_str).collect();
        let replay = async {
            if !statements.is_empty() {
                crate::backend::query::run_simple(&backend, conn, &statements).await?;
            }
            crate::backend::query::run_parses(&backend, conn, &parses).await
        };
        replay.await.map_err(|e| {
            tracing::warn!(error = %e, "could not carry session state to the new backend");
            ClientError::StateNotRecreated
                .to_pg()
                .with_detail(e.to_string())
        })
    }

    /// The tenant moved but this session's state cannot follow it yet: keep it on the old backend, or end it
    /// after the grace period, as configured. Both are counted.
    fn pinned_on_old_route(
        &mut self,
        tenant: &TenantId,
        reason: &'static str,
    ) -> Result<(), Refusal> {
        let (policy, grace) = {
            let c = self.shared.config.load();
            (
                c.proxy.pinned_at_move,
                std::time::Duration::from_millis(c.proxy.pinned_grace_ms),
            )
        };
        // A migration moved the tenant: its old side is fenced, so a session left there could only fail.
        if self
            .shared
            .migrations
            .moved_at(tenant.as_str())
            .is_some_and(|at| at > self.place.epoch)
        {
            self.shared.metrics.pinned_disconnects.increment(1);
            return Err(Refusal::Session(moved_away(tenant, reason)));
        }
        let since = *self.place.stale_since.get_or_insert_with(|| {
            self.shared.metrics.pinned_waits.increment(1);
            std::time::Instant::now()
        });
        self.publish_route();
        if policy == PinnedAtMove::Disconnect && since.elapsed() >= grace {
            self.shared.metrics.pinned_disconnects.increment(1);
            return Err(Refusal::Session(
                ClientError::PinnedTooLong {
                    tenant: tenant.clone(),
                    reason: reason.to_owned(),
                }
                .into(),
            ));
        }
        Ok(())
    }

    /// Makes `attached` the session's backend (returning the old one to its pool) for `tenant`: tells the
    /// client about changed parameters, points the cancel key at the new backend, and updates the gate,
    /// metrics and registry.
    pub(super) fn install(&mut self, tenant: Option<TenantId>, attached: Option<Attached>) {
        let (server, route, epoch) = match attached {
            Some(a) => {
                self.pooling.route_path = a.route_path;
                (Some(a.server), Some(a.route), a.epoch)
            }
            None => {
                self.pooling.route_path = None;
                (None, None, Epoch::default())
            }
        };
        if let Some(new) = &server {
            self.client.tell(&new.conn.get().params);
        }
        self.cancel
            .slot
            .set(server.as_ref().map(|s| s.conn.get().cancel_target()));
        if let Some(old) = std::mem::replace(&mut self.server, server) {
            old.release_idle();
        }
        if tenant != self.place.tenant {
            if let Some(tm) = self.place.tm.take() {
                tm.add(&mut self.txn.tally);
                tm.client_left();
            }
            self.place.tm = tenant.as_ref().map(|t| self.shared.metrics.tenant(t));
            if let Some(tm) = &self.place.tm {
                tm.client_came();
            }
            self.txn.gate = tenant.as_ref().map(|t| self.shared.gates.get(t));
            if let Some(t) = &tenant {
                tracing::Span::current().record("tenant", t.as_str());
            }
            self.place.tenant = tenant;
        }
        self.place.route = route;
        self.place.epoch = epoch;
        self.state.new_connection();
        self.publish_route();
    }

    /// Tells the registry where this session is now.
    pub(super) fn publish_route(&mut self) {
        self.place.published_pin = self.pin_reason();
        self.handle.info.set_route(SessionRoute {
            tenant: self.place.tenant.clone(),
            backend: self.place.route.as_ref().map(|r| r.backend.clone()),
            database: self.place.route.as_ref().and_then(|r| r.database.clone()),
            epoch: self.place.epoch,
            pinned: self.pin_reason(),
            role: self
                .server
                .as_ref()
                .map(|s| s.conn.pool().login.user.clone()),
        });
    }

    pub(super) fn count_error(&self, kind: ErrorKind) {
        if let Some(tm) = &self.place.tm {
            tm.error(kind);
        }
    }
}
