//! Client timeouts in the relay: `client_idle_timeout_ms` (idle outside a transaction),
//! `idle_transaction_timeout_ms` (idle inside one: the transaction is rolled back and the tenant's gate pass
//! freed, so a client that vanished cannot hold up a `pause` or a cutover) and `query_timeout_ms` (a
//! statement that runs too long). One timer per session, re-armed lazily: an event only records the time, and
//! when the timer fires it is set again for whatever is left.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::time::Sleep;

use crate::config::ProxyConfig;
use crate::errors::ClientError;
use crate::protocol::PgError;

/// What the session is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// For the client, outside a transaction.
    Idle,
    /// For the client, inside a transaction.
    InTransaction,
    /// For the backend (a statement runs).
    Busy,
}

pub(super) struct Timeouts {
    idle: Option<Duration>,
    idle_tx: Option<Duration>,
    query: Option<Duration>,
    last_client: Instant,
    last_server: Instant,
    timer: Pin<Box<Sleep>>,
}

fn nonzero(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

impl Timeouts {
    /// The session's timeouts, `None` when all are off (then the relay pays nothing for them).
    pub fn new(proxy: &ProxyConfig) -> Option<Box<Timeouts>> {
        let idle = nonzero(proxy.client_idle_timeout_ms);
        let idle_tx = nonzero(proxy.idle_transaction_timeout_ms);
        let query = nonzero(proxy.query_timeout_ms);
        let first = [idle, idle_tx, query].into_iter().flatten().min()?;
        let now = Instant::now();
        Some(Box::new(Timeouts {
            idle,
            idle_tx,
            query,
            last_client: now,
            last_server: now,
            timer: Box::pin(tokio::time::sleep(first)),
        }))
    }

    pub fn client_event(&mut self) {
        self.last_client = Instant::now();
    }

    pub fn server_event(&mut self) {
        self.last_server = Instant::now();
    }

    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.timer.as_mut().poll(cx)
    }

    /// The timer fired: the error that ends the session if the timeout of `phase` has passed, else `None`
    /// (and the timer is set again for what is left).
    pub fn check(&mut self, phase: Phase) -> Option<PgError> {
        let now = Instant::now();
        let (limit, since) = match phase {
            Phase::Idle => (self.idle, self.last_client.max(self.last_server)),
            Phase::InTransaction => (self.idle_tx, self.last_client.max(self.last_server)),
            // A statement runs from the client's last message, whatever the backend streams meanwhile.
            Phase::Busy => (self.query, self.last_client),
        };
        let left = limit.map(|l| l.saturating_sub(now.duration_since(since)));
        if left == Some(Duration::ZERO) {
            return Some(expired(phase));
        }
        // Not yet, or this phase has no limit: look again when the nearest limit could pass.
        let next = left
            .or([self.idle, self.idle_tx, self.query]
                .into_iter()
                .flatten()
                .min())
            .unwrap_or(Duration::from_secs(3600));
        self.timer
            .as_mut()
            .reset(tokio::time::Instant::now() + next.max(Duration::from_millis(10)));
        None
    }
}

fn expired(phase: Phase) -> PgError {
    match phase {
        Phase::Idle => ClientError::IdleTimeout,
        Phase::InTransaction => ClientError::IdleInTransactionTimeout,
        Phase::Busy => ClientError::QueryTimeout,
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(idle: u64, idle_tx: u64, query: u64) -> ProxyConfig {
        let mut c: ProxyConfig = toml::from_str("").unwrap();
        c.client_idle_timeout_ms = idle;
        c.idle_transaction_timeout_ms = idle_tx;
        c.query_timeout_ms = query;
        c
    }

    #[tokio::test(start_paused = true)]
    async fn each_phase_has_its_own_limit() {
        assert!(Timeouts::new(&config(0, 0, 0)).is_none());
        let mut t = Timeouts::new(&config(0, 1000, 0)).unwrap();
        // Idle outside a transaction has no limit here.
        std::thread::sleep(Duration::from_millis(30));
        assert!(t.check(Phase::Idle).is_none());
        let mut t2 = Timeouts::new(&config(20, 0, 0)).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        let e = t2.check(Phase::Idle).unwrap();
        assert_eq!(e.code, crate::protocol::sqlstate::IDLE_SESSION_TIMEOUT);
        // A client event restarts the clock.
        t2.client_event();
        assert!(t2.check(Phase::Idle).is_none());
        t.client_event();
        assert!(t.check(Phase::InTransaction).is_none());
        let mut q = Timeouts::new(&config(0, 0, 20)).unwrap();
        q.client_event();
        std::thread::sleep(Duration::from_millis(30));
        // The backend streaming rows does not make a statement younger.
        q.server_event();
        assert_eq!(
            q.check(Phase::Busy).unwrap().code,
            crate::protocol::sqlstate::QUERY_CANCELED
        );
    }
}
