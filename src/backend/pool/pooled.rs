//! A connection checked out of a pool, and how it goes back: as it is, reset first, or closed.

use std::sync::Arc;
use std::time::Instant;

use super::super::conn::ServerConn;
use super::super::query::{run_simple, temp_schema_used};
use super::{ConnectError, Pool, ReleaseState, RESET_TIMEOUT};
use crate::tenant::TenantId;

/// A checked-out connection. Dropping it closes the connection; [`PooledConn::release`] returns it.
pub struct PooledConn {
    conn: Option<Box<ServerConn>>,
    pool: Arc<Pool>,
    tenant: Option<TenantId>,
}

impl PooledConn {
    pub(super) fn new(
        conn: Box<ServerConn>,
        pool: Arc<Pool>,
        tenant: Option<TenantId>,
    ) -> PooledConn {
        PooledConn {
            conn: Some(conn),
            pool,
            tenant,
        }
    }

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

    /// Gives the connection back: reset in the background, then idle; or closed when it is not clean, or when
    /// its session made temporary objects.
    pub fn release(self, state: ReleaseState) {
        self.release_at(state, None);
    }

    /// As [`PooledConn::release`], with the time now when the caller has just read the clock (a transaction's
    /// end in transaction pooling reads it for the query time): a clock read fewer per transaction.
    pub fn release_at(mut self, state: ReleaseState, now: Option<Instant>) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let (pool, tenant) = (self.pool.clone(), self.tenant.take());
        let statements: &'static [&'static str] = match state {
            ReleaseState::Keep => {
                pool.checkin(conn, tenant.as_ref(), now);
                return;
            }
            ReleaseState::Idle => &["DISCARD ALL"],
            ReleaseState::InTransaction => &["ROLLBACK", "DISCARD ALL"],
            ReleaseState::Dirty => {
                drop(conn);
                pool.forget(tenant.as_ref());
                return;
            }
        };
        tokio::spawn(async move {
            let name = pool.backend.name.clone();
            let reset = tokio::time::timeout(RESET_TIMEOUT, async {
                let status = run_simple(&name, &mut conn, statements).await?;
                let temp = temp_schema_used(&name, &mut conn).await?;
                Ok::<_, ConnectError>((status, temp))
            })
            .await;
            match reset {
                Ok(Ok((crate::protocol::tag::status::IDLE, false))) => {
                    // DISCARD ALL dropped every prepared statement and setting.
                    conn.statements.clear();
                    conn.applied_sets = 0;
                    conn.applied_role = false;
                    conn.owner = None;
                    conn.suspect = false;
                    conn.route_path = None;
                    pool.checkin(conn, tenant.as_ref(), None)
                }
                other => {
                    tracing::debug!(backend = %name, ?other, "reset failed or temporary objects were used; closing backend connection");
                    drop(conn);
                    pool.forget(tenant.as_ref());
                }
            }
        });
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        if self.conn.take().is_some() {
            self.pool.forget(self.tenant.as_ref());
        }
    }
}
