//! A pool of connections to one backend database as the backend's configured user.
//!
//! Connections remember the startup parameters they were opened with ([`StartupTag`]); a checkout prefers an
//! idle connection with the same tag, and when the pool is full of idle connections with other tags it closes one
//! and opens a fresh one rather than hand out a connection whose session defaults differ from what the client
//! asked for. Returned connections are reset (`DISCARD ALL`, after `ROLLBACK` when the client left mid-transaction)
//! before anyone else may use them; a connection left mid-query or mid-COPY is closed instead.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use thiserror::Error;
use tokio::io::Interest;
use tokio::sync::Notify;

use super::conn::{ServerConn, StartupTag};
use super::connect::{connect, ConnectError};
use super::query::run_simple;
use super::Backend;
use crate::protocol::{sqlstate, PgError};

/// Bound on the reset a returned connection gets before it is trusted again.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum PoolError {
    #[error("no connection to backend {backend} database {database} became free in time")]
    Timeout { backend: String, database: String },
    #[error(transparent)]
    Connect(#[from] ConnectError),
}

impl PoolError {
    pub fn to_client(&self, severity_fatal: bool) -> PgError {
        let e = match self {
            PoolError::Timeout { .. } => PgError::error(
                sqlstate::TOO_MANY_CONNECTIONS,
                "pgtenant: timed out waiting for a backend connection (pool is full)",
            ),
            PoolError::Connect(c) => c.to_client(),
        };
        if severity_fatal {
            PgError {
                severity: crate::protocol::messages::Severity::Fatal,
                ..e
            }
        } else {
            PgError {
                severity: crate::protocol::messages::Severity::Error,
                ..e
            }
        }
    }
}

/// How a client left its backend connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseState {
    /// Idle outside a transaction, nothing in flight.
    Idle,
    /// Idle inside a (possibly failed) transaction, nothing in flight.
    InTransaction,
    /// A reply still owed, a COPY unfinished, or the stream broken: close it.
    Dirty,
    /// Idle outside a transaction at the end of a transaction-pool transaction: back to the pool as it is, its
    /// prepared statements and settings tracked by the proxy (no reset, no round trip).
    Keep,
}

#[derive(Default)]
struct Inner {
    idle: Vec<ServerConn>,
    /// Open connections, idle or not, plus connections being opened.
    total: usize,
}

pub struct Pool {
    pub backend: Arc<Backend>,
    pub database: String,
    inner: Mutex<Inner>,
    freed: Notify,
}

// Short-lived, on the stack: boxing the connection would cost an allocation per checkout.
#[allow(clippy::large_enum_variant)]
enum Step {
    Reuse(ServerConn),
    Open,
    Wait,
}

impl Pool {
    pub fn new(backend: Arc<Backend>, database: String) -> Arc<Pool> {
        Arc::new(Pool {
            backend,
            database,
            inner: Mutex::new(Inner::default()),
            freed: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// (open connections, idle connections).
    pub fn counts(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.total, inner.idle.len())
    }

    fn max(&self) -> usize {
        self.backend.pool_size()
    }

    /// A connection with `tag`'s startup parameters, waiting up to the checkout timeout when the pool is full.
    pub async fn checkout(
        self: &Arc<Self>,
        tag: &Arc<StartupTag>,
    ) -> Result<PooledConn, PoolError> {
        let deadline = tokio::time::Instant::now() + self.backend.timeouts.checkout;
        loop {
            // The common case (a free connection) takes one lock; the wake-up is registered only before a
            // second look, so a connection freed in between is not missed.
            let (mut step, mut evicted) = self.choose(tag);
            let notified = self.freed.notified();
            tokio::pin!(notified);
            if matches!(step, Step::Wait) {
                notified.as_mut().enable();
                (step, evicted) = self.choose(tag);
            }
            drop(evicted);
            match step {
                Step::Reuse(conn) if alive(&conn) => return Ok(self.wrap(conn)),
                Step::Reuse(dead) => {
                    drop(dead);
                    self.forget();
                }
                Step::Open => {
                    // Boxed: a connection attempt (TCP, TLS, authentication) is a large state that would
                    // otherwise be part of every session task that may check out, for the session's life.
                    let opening = Box::pin(connect(&self.backend, &self.database, tag.clone()));
                    return match opening.await {
                        Ok(conn) => {
                            self.backend.note_connect(Ok(()));
                            Ok(self.wrap(conn))
                        }
                        Err(e) => {
                            self.backend.note_connect(Err(e.to_string()));
                            self.forget();
                            Err(e.into())
                        }
                    };
                }
                Step::Wait => {
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        return Err(PoolError::Timeout {
                            backend: self.backend.name.clone(),
                            database: self.database.clone(),
                        });
                    }
                }
            }
        }
    }

    /// Picks what a checkout does, under the lock; an evicted connection is returned to be closed outside it.
    fn choose(&self, tag: &Arc<StartupTag>) -> (Step, Option<ServerConn>) {
        let mut inner = self.lock();
        // Sessions share their tag's Arc, so the pointer comparison settles almost every check.
        if let Some(i) = inner
            .idle
            .iter()
            .rposition(|c| Arc::ptr_eq(&c.tag, tag) || c.tag == *tag)
        {
            return (Step::Reuse(inner.idle.swap_remove(i)), None);
        }
        if inner.total < self.max() {
            inner.total += 1;
            return (Step::Open, None);
        }
        if !inner.idle.is_empty() {
            // Full, but some idle connection has other startup parameters: replace the oldest one.
            let old = inner.idle.remove(0);
            return (Step::Open, Some(old));
        }
        (Step::Wait, None)
    }

    fn wrap(self: &Arc<Self>, conn: ServerConn) -> PooledConn {
        PooledConn {
            conn: Some(conn),
            pool: self.clone(),
        }
    }

    /// A connection is gone for good.
    fn forget(&self) {
        let mut inner = self.lock();
        inner.total = inner.total.saturating_sub(1);
        drop(inner);
        self.freed.notify_one();
    }

    fn checkin(&self, mut conn: ServerConn) {
        conn.idle_since = Instant::now();
        let mut inner = self.lock();
        if inner.total > self.max() {
            // The pool shrank on reload; let this one go.
            inner.total -= 1;
        } else {
            inner.idle.push(conn);
        }
        drop(inner);
        self.freed.notify_one();
    }

    /// Closes idle connections that have not been used for `max_idle`.
    pub fn reap_idle(&self, max_idle: Duration) {
        let now = Instant::now();
        let mut inner = self.lock();
        let before = inner.idle.len();
        let (keep, old): (Vec<_>, Vec<_>) = std::mem::take(&mut inner.idle)
            .into_iter()
            .partition(|c| now.duration_since(c.idle_since) < max_idle);
        inner.idle = keep;
        inner.total -= before - inner.idle.len();
        drop(inner);
        drop(old);
    }
}

/// An idle backend has nothing to say; if its socket is readable it sent an error (shutdown, terminate) or closed.
fn alive(conn: &ServerConn) -> bool {
    if !conn.buf.is_empty() {
        return false;
    }
    match conn.stream.tcp().ready(Interest::READABLE).now_or_never() {
        Some(Ok(r)) => !(r.is_readable() || r.is_read_closed() || r.is_error()),
        Some(Err(_)) => false,
        None => true,
    }
}

/// A checked-out connection. Dropping it closes the connection; [`PooledConn::release`] returns it.
pub struct PooledConn {
    conn: Option<ServerConn>,
    pool: Arc<Pool>,
}

impl PooledConn {
    pub fn get(&self) -> &ServerConn {
        self.conn
            .as_ref()
            .unwrap_or_else(|| unreachable!("present until release or drop"))
    }

    pub fn get_mut(&mut self) -> &mut ServerConn {
        self.conn
            .as_mut()
            .unwrap_or_else(|| unreachable!("present until release or drop"))
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Gives the connection back: reset in the background, then idle; or closed when it is not clean.
    pub fn release(mut self, state: ReleaseState) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let pool = self.pool.clone();
        let statements: &'static [&'static str] = match state {
            ReleaseState::Keep => {
                pool.checkin(conn);
                return;
            }
            ReleaseState::Idle => &["DISCARD ALL"],
            ReleaseState::InTransaction => &["ROLLBACK", "DISCARD ALL"],
            ReleaseState::Dirty => {
                drop(conn);
                pool.forget();
                return;
            }
        };
        tokio::spawn(async move {
            let name = pool.backend.name.clone();
            let reset =
                tokio::time::timeout(RESET_TIMEOUT, run_simple(&name, &mut conn, statements)).await;
            match reset {
                Ok(Ok(b'I')) => {
                    // DISCARD ALL dropped every prepared statement and setting.
                    conn.statements.clear();
                    conn.applied_sets = 0;
                    conn.applied_role = false;
                    pool.checkin(conn)
                }
                other => {
                    tracing::debug!(backend = %name, ?other, "reset failed; closing backend connection");
                    drop(conn);
                    pool.forget();
                }
            }
        });
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        if self.conn.take().is_some() {
            self.pool.forget();
        }
    }
}
