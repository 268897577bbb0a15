//! Per-tenant rates for `stats` and the console's `SHOW STATS`: every tenant's running totals are sampled each
//! [`PERIOD`] (PgBouncer's `stats_period`), and the rates are those of the last period.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;
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
    pub total_errors: u64,
    /// Per second over the last period.
    pub xact_per_s: f64,
    pub query_per_s: f64,
    /// Average transaction time over the last period, microseconds.
    pub avg_xact_time_us: u64,
    pub clients: i64,
}

#[derive(Clone, Copy, Default)]
struct Sample {
    xacts: u64,
    queries: u64,
    xact_us: u64,
}

/// Transactions and queries per second, and the average transaction time (µs), of the last period.
type Rate = (f64, f64, u64);

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
            .map(|(t, m)| {
                let s = Sample {
                    xacts: m.totals.transactions.load(Ordering::Relaxed),
                    queries: m.totals.queries.load(Ordering::Relaxed),
                    xact_us: m.totals.transaction_us.load(Ordering::Relaxed),
                };
                (t, s)
            })
            .collect();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, before)) = last.as_ref() {
            let secs = now.duration_since(*at).as_secs_f64().max(1e-3);
            let rates = samples
                .iter()
                .map(|(t, s)| {
                    let b = before.get(t).copied().unwrap_or_default();
                    let xacts = s.xacts.saturating_sub(b.xacts);
                    let avg = s
                        .xact_us
                        .saturating_sub(b.xact_us)
                        .checked_div(xacts)
                        .unwrap_or(0);
                    let q = s.queries.saturating_sub(b.queries) as f64 / secs;
                    (t.clone(), (xacts as f64 / secs, q, avg))
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
                let (xact_per_s, query_per_s, avg) = rates.get(&t).copied().unwrap_or_default();
                TenantStats {
                    total_xact_count: m.totals.transactions.load(Ordering::Relaxed),
                    total_query_count: m.totals.queries.load(Ordering::Relaxed),
                    total_xact_time_us: m.totals.transaction_us.load(Ordering::Relaxed),
                    total_errors: m.totals.errors.load(Ordering::Relaxed),
                    xact_per_s,
                    query_per_s,
                    avg_xact_time_us: avg,
                    clients: m.clients_now(),
                    tenant: t,
                }
            })
            .collect();
        out.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        out
    }
}
