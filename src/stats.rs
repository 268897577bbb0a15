//! Per-tenant rates for `stats` and the console's `SHOW STATS`: every tenant's running totals are sampled each
//! [`PERIOD`] (PgBouncer's `stats_period`), and the rates are those of the last period.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::metrics::{Metrics, Totals};
use crate::tenant::TenantId;

pub const PERIOD: Duration = Duration::from_secs(5);

/// One tenant's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantStats {
    pub tenant: TenantId,
    pub total_xact_count: u64,
    pub total_query_count: u64,
    /// Microseconds in transactions (gate pass to end), summed.
    pub total_xact_time_us: u64,
    /// Microseconds the backend worked on queries (sent to ReadyForQuery), summed.
    pub total_query_time_us: u64,
    /// Microseconds transactions waited for the gate and a backend connection, summed.
    pub total_wait_time_us: u64,
    /// Bytes from clients, and to them.
    pub total_received: u64,
    pub total_sent: u64,
    pub total_errors: u64,
    /// Per second over the last period.
    pub xact_per_s: f64,
    pub query_per_s: f64,
    /// Averages over the last period, microseconds: per transaction, per query, and the wait per transaction.
    pub avg_xact_time_us: u64,
    pub avg_query_time_us: u64,
    pub avg_wait_time_us: u64,
    /// Bytes per second received from clients and sent to them over the last period.
    pub avg_recv: f64,
    pub avg_sent: f64,
    pub clients: i64,
}

#[derive(Clone, Copy, Default)]
struct Sample {
    xacts: u64,
    queries: u64,
    xact_us: u64,
    query_us: u64,
    wait_us: u64,
    received: u64,
    sent: u64,
}

impl Sample {
    fn of(t: &Totals) -> Sample {
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Sample {
            xacts: get(&t.transactions),
            queries: get(&t.queries),
            xact_us: get(&t.transaction_us),
            query_us: get(&t.query_us),
            wait_us: get(&t.wait_us),
            received: get(&t.received),
            sent: get(&t.sent),
        }
    }
}

/// The last period's figures of one tenant.
#[derive(Clone, Copy, Default)]
struct Rate {
    xacts_per_s: f64,
    queries_per_s: f64,
    xact_us: u64,
    query_us: u64,
    wait_us: u64,
    recv_per_s: f64,
    sent_per_s: f64,
}

impl Rate {
    fn between(before: Sample, now: Sample, secs: f64) -> Rate {
        let xacts = now.xacts.saturating_sub(before.xacts);
        let queries = now.queries.saturating_sub(before.queries);
        // An average over the period's transactions (or queries); 0 when there were none.
        let per = |a: u64, b: u64, n: u64| a.saturating_sub(b).checked_div(n).unwrap_or(0);
        let per_s = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
        Rate {
            xacts_per_s: xacts as f64 / secs,
            queries_per_s: queries as f64 / secs,
            xact_us: per(now.xact_us, before.xact_us, xacts),
            query_us: per(now.query_us, before.query_us, queries),
            wait_us: per(now.wait_us, before.wait_us, xacts),
            recv_per_s: per_s(now.received, before.received),
            sent_per_s: per_s(now.sent, before.sent),
        }
    }
}

#[derive(Default)]
pub struct Rates {
    last: Mutex<Option<(Instant, HashMap<TenantId, Sample>)>>,
    current: Mutex<Arc<HashMap<TenantId, Rate>>>,
}

impl Rates {
    /// Takes a sample of every tenant's totals and computes the rates since the previous one.
    pub fn sample(&self, metrics: &Metrics) {
        let now = Instant::now();
        let samples: HashMap<TenantId, Sample> = metrics
            .tenants()
            .into_iter()
            .map(|(t, m)| (t, Sample::of(&m.totals)))
            .collect();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, before)) = last.as_ref() {
            let secs = now.duration_since(*at).as_secs_f64().max(1e-3);
            let rates = samples
                .iter()
                .map(|(t, s)| {
                    let b = before.get(t).copied().unwrap_or_default();
                    (t.clone(), Rate::between(b, *s, secs))
                })
                .collect();
            *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(rates);
        }
        *last = Some((now, samples));
    }

    /// Every tenant with series, by name.
    pub fn all(&self, metrics: &Metrics) -> Vec<TenantStats> {
        let rates = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut out: Vec<TenantStats> = metrics
            .tenants()
            .into_iter()
            .map(|(t, m)| {
                let r = rates.get(&t).copied().unwrap_or_default();
                let s = Sample::of(&m.totals);
                TenantStats {
                    total_xact_count: s.xacts,
                    total_query_count: s.queries,
                    total_xact_time_us: s.xact_us,
                    total_query_time_us: s.query_us,
                    total_wait_time_us: s.wait_us,
                    total_received: s.received,
                    total_sent: s.sent,
                    total_errors: m.totals.errors.load(Ordering::Relaxed),
                    xact_per_s: r.xacts_per_s,
                    query_per_s: r.queries_per_s,
                    avg_xact_time_us: r.xact_us,
                    avg_query_time_us: r.query_us,
                    avg_wait_time_us: r.wait_us,
                    avg_recv: r.recv_per_s,
                    avg_sent: r.sent_per_s,
                    clients: m.clients_now(),
                    tenant: t,
                }
            })
            .collect();
        out.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_period_gives_rates_and_averages_per_transaction_and_query() {
        let before = Sample {
            xacts: 10,
            queries: 20,
            xact_us: 1_000,
            query_us: 500,
            wait_us: 100,
            received: 1_000,
            sent: 4_000,
        };
        let now = Sample {
            xacts: 20,
            queries: 40,
            xact_us: 3_000,
            query_us: 1_500,
            wait_us: 600,
            received: 3_000,
            sent: 12_000,
        };
        let r = Rate::between(before, now, 2.0);
        assert_eq!((r.xacts_per_s, r.queries_per_s), (5.0, 10.0));
        assert_eq!((r.xact_us, r.query_us, r.wait_us), (200, 50, 50));
        assert_eq!((r.recv_per_s, r.sent_per_s), (1_000.0, 4_000.0));
        // A quiet period averages to zero rather than dividing by zero.
        let quiet = Rate::between(now, now, 2.0);
        assert_eq!((quiet.xact_us, quiet.query_us, quiet.wait_us), (0, 0, 0));
    }
}
