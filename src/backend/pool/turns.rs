//! Tenants' turns on a shared pool's connections (`tenant_turn_ms`, `tenant_turn_linger_ms`): while clients
//! wait, a returned connection stays with the tenant that just used it for a while instead of going round-robin
//! to another tenant, which would first pay a full reset. Kept connections sit in the idle list with
//! `kept_until` set; they are ended lazily by checkouts and checkins, and by [`sweep`] when the pool is quiet.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Notify;

use super::super::conn::ServerConn;
use super::super::waiters::Grant;
use super::{note_held, take_idle, Inner, Pool};
use crate::tenant::TenantId;

impl Pool {
    /// Turns: in transaction pooling of a shared pool with clients waiting, a connection stays with the tenant
    /// that just used it for up to `turn`, given to that tenant's next waiter or kept idle for its next
    /// transaction for up to `linger`, instead of going round-robin to another tenant's waiter. Another tenant
    /// gets it only after a full reset (`DISCARD ALL`, a third of a point select's backend cost): with one
    /// client per tenant and more tenants than connections, round-robin alone made almost every transaction
    /// pay one. The turn bounds how long other tenants wait for it. Returns the connection when the turn is over
    /// (or none runs): it then goes round-robin.
    pub(super) fn keep_turn(
        self: &Arc<Self>,
        inner: &mut Inner,
        mut conn: Box<ServerConn>,
        tenant: Option<&TenantId>,
        now: Instant,
        cap: usize,
    ) -> Option<Box<ServerConn>> {
        let turns = self.backend.turns();
        let own = tenant.filter(|t| conn.owner.as_ref() == Some(*t));
        let (Some(t), Some((turn, linger))) = (own, turns) else {
            conn.turn_since = None;
            return Some(conn);
        };
        // Turns exist only while clients wait. (No runtime: nothing could end a kept connection's time; only
        // unit tests check in without one.)
        let runtime = match inner.waiting.is_empty() || self.backend.has_starving() {
            true => None,
            false => tokio::runtime::Handle::try_current().ok(),
        };
        let Some(runtime) = runtime else {
            conn.turn_since = None;
            return Some(conn);
        };
        let since = *conn.turn_since.get_or_insert(now);
        // A suspect connection needs a full reset even for its own tenant: keeping it saves nothing.
        if now.duration_since(since) >= turn || conn.suspect {
            conn.turn_since = None;
            return Some(conn);
        }
        let held = &inner.held;
        let eligible = |x: Option<&TenantId>| {
            cap == 0 || x.is_none_or(|x| held.get(x).copied().unwrap_or(0) < cap)
        };
        if !eligible(Some(t)) {
            conn.turn_since = None;
            return Some(conn);
        }
        match inner.waiting.hand_out_to(t, Grant::Conn(conn)) {
            Ok(()) => {
                note_held(inner, Some(t), cap);
                return None;
            }
            Err(Grant::Conn(back)) => conn = back,
            Err(Grant::Open) => return None,
        }
        if inner.waiting.is_empty() {
            // Its tenant's waiters had all given up, and nobody else waits: an ordinary idle connection.
            conn.turn_since = None;
            return Some(conn);
        }
        // The turn's end bounds the linger too.
        let until = (now + linger).min(since + turn);
        conn.kept_until = Some(until);
        inner.kept += 1;
        inner.idle.push(conn);
        match inner.sweep_at {
            None => {
                inner.sweep_at = Some(until);
                runtime.spawn(sweep(Arc::downgrade(self), self.sweep_sooner.clone()));
            }
            Some(at) if until < at => {
                inner.sweep_at = Some(until);
                self.sweep_sooner.notify_one();
            }
            Some(_) => {}
        }
        None
    }

    /// Ends the keeping of idle connections whose time ran out; each goes to a waiter, if one may take it. One
    /// nobody takes while another pool of the backend waits for room is returned to be closed (`for_others`),
    /// as a checkin would close it; the caller closes it outside the lock ([`Pool::closed`]). (Connections stay
    /// boxed for their life, see `Inner::idle`.)
    #[allow(clippy::vec_box)]
    pub(super) fn end_kept(
        &self,
        inner: &mut Inner,
        now: Instant,
        cap: usize,
        for_others: bool,
    ) -> Vec<Box<ServerConn>> {
        let mut closed = Vec::new();
        let mut i = 0;
        while i < inner.idle.len() {
            let due = inner.idle[i].kept_until.is_some_and(|u| u <= now);
            if !due {
                i += 1;
                continue;
            }
            let mut conn = take_idle(inner, i);
            conn.turn_since = None;
            match self.give(inner, Grant::Conn(conn), cap) {
                None => {}
                Some(Grant::Conn(conn)) if for_others && self.backend.has_starving() => {
                    inner.total -= 1;
                    closed.push(conn);
                }
                Some(Grant::Conn(conn)) => {
                    inner.idle.insert(i, conn);
                    i += 1;
                }
                Some(Grant::Open) => {}
            }
        }
        closed
    }

    /// Closes connections taken out of the pool (and its count) and offers their places on the backend.
    #[allow(clippy::vec_box)]
    pub(super) fn closed(&self, conns: Vec<Box<ServerConn>>) {
        for conn in conns {
            drop(conn);
            self.backend.free_slot();
        }
    }
}

/// Ends kept connections' time when no checkout or checkin comes to do it (a pool gone quiet with clients
/// still waiting); runs while any connection is kept, waking at the earliest end (at the timer's resolution).
/// Its wake-up is `Inner::sweep_at`; a connection kept until before it moves it and wakes the task, which
/// then sleeps again until the new time. Holds no strong reference while asleep, so a dropped pool ends it.
async fn sweep(pool: std::sync::Weak<Pool>, sooner: Arc<Notify>) {
    loop {
        let at = {
            let Some(pool) = pool.upgrade() else {
                return;
            };
            let Some(at) = pool.lock().sweep_at else {
                return;
            };
            at
        };
        let woken_sooner = sooner.notified();
        tokio::select! {
            _ = tokio::time::sleep_until(at.into()) => {}
            _ = woken_sooner => continue,
        }
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let mut inner = pool.lock();
        let cap = pool.backend.max_tenant_connections();
        let closed = pool.end_kept(&mut inner, Instant::now(), cap, true);
        inner.sweep_at = inner.idle.iter().filter_map(|c| c.kept_until).min();
        let done = inner.sweep_at.is_none();
        drop(inner);
        pool.closed(closed);
        if done {
            return;
        }
    }
}
