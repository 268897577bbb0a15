//! Prometheus metrics (DESIGN section 8) and the `/metrics` + `/health` endpoint.
//!
//! The recorder is an instance owned by the proxy rather than the process-global one, so several proxies (the
//! tests run many in one process) never mix their figures. The hot path adds to per-tenant atomic totals once
//! per transaction, not per message; the exported per-tenant counters are set from those totals, and the pool
//! and connection gauges read, when scraped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::tenant::TenantId;

static META: Metadata<'static> = Metadata::new("pgtenant", Level::INFO, Some(module_path!()));

/// Why a client got an error from the proxy itself (the `kind` label of `pgtenant_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    GateTimeout,
    QueueFull,
    Forbidden,
    BackendUnavailable,
    ServerLost,
    Protocol,
    MoveFailed,
}

const KINDS: [(ErrorKind, &str); 7] = [
    (ErrorKind::GateTimeout, "gate_timeout"),
    (ErrorKind::QueueFull, "queue_full"),
    (ErrorKind::Forbidden, "forbidden"),
    (ErrorKind::BackendUnavailable, "backend_unavailable"),
    (ErrorKind::ServerLost, "server_lost"),
    (ErrorKind::Protocol, "protocol"),
    (ErrorKind::MoveFailed, "move_failed"),
];

/// One tenant's series.
pub struct TenantMetrics {
    /// Exported from `totals` when scraped (see `publish`).
    transactions: Counter,
    queries: Counter,
    /// Bytes from the tenant's clients, and to them.
    received: Counter,
    sent: Counter,
    pub clients: Gauge,
    errors: Vec<Counter>,
    /// The same counts, readable (Prometheus counters are write-only handles), for `stats` and `SHOW STATS`.
    pub totals: Totals,
}

/// What one session counted since its last flush into the tenant's totals: kept in the session so the hot
/// path touches no shared counter per message.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    /// Query, Execute and FunctionCall messages.
    pub queries: u64,
    pub query_us: u64,
    pub wait_us: u64,
    /// Bytes read from the client, and from the backend for the client.
    pub received: u64,
    pub sent: u64,
}

/// A tenant's running totals since start.
#[derive(Default)]
pub struct Totals {
    pub transactions: AtomicU64,
    pub queries: AtomicU64,
    /// Microseconds from each transaction's gate pass to its end.
    pub transaction_us: AtomicU64,
    /// Microseconds the backend worked on queries (a query or batch sent to its ReadyForQuery).
    pub query_us: AtomicU64,
    /// Microseconds transactions waited before a backend connection was theirs (the gate and the pool).
    pub wait_us: AtomicU64,
    pub received: AtomicU64,
    pub sent: AtomicU64,
    pub errors: AtomicU64,
    pub clients: AtomicI64,
}

impl TenantMetrics {
    pub fn client_came(&self) {
        self.clients.increment(1.0);
        self.totals.clients.fetch_add(1, Ordering::Relaxed);
    }

    pub fn client_left(&self) {
        self.clients.decrement(1.0);
        self.totals.clients.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn clients_now(&self) -> i64 {
        self.totals.clients.load(Ordering::Relaxed)
    }

    /// A transaction ended (at `ended`, now if unknown), begun at `started`, with the figures of `tally`
    /// (which it empties).
    pub fn finished(&self, tally: &mut Tally, started: Option<Instant>, ended: Option<Instant>) {
        self.totals.transactions.fetch_add(1, Ordering::Relaxed);
        if let Some(t) = started {
            let ended = ended.unwrap_or_else(Instant::now);
            self.totals.transaction_us.fetch_add(
                ended.saturating_duration_since(t).as_micros() as u64,
                Ordering::Relaxed,
            );
        }
        self.add(tally);
    }

    /// Adds what a session counted since its last flush (at a transaction's end, or when it ends).
    pub fn add(&self, tally: &mut Tally) {
        let t = std::mem::take(tally);
        let add = |a: &AtomicU64, n: u64| {
            if n > 0 {
                a.fetch_add(n, Ordering::Relaxed);
            }
        };
        add(&self.totals.queries, t.queries);
        add(&self.totals.query_us, t.query_us);
        add(&self.totals.wait_us, t.wait_us);
        add(&self.totals.received, t.received);
        add(&self.totals.sent, t.sent);
    }

    /// Brings the Prometheus counters up to the totals. The hot path bumps only the totals (each shared
    /// counter bumped costs atomic operations at every transaction's end); the exported series follow when
    /// scraped.
    fn publish(&self) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        self.transactions.absolute(get(&self.totals.transactions));
        self.queries.absolute(get(&self.totals.queries));
        self.received.absolute(get(&self.totals.received));
        self.sent.absolute(get(&self.totals.sent));
    }

    pub fn error(&self, kind: ErrorKind) {
        if let Some(i) = KINDS.iter().position(|(k, _)| *k == kind) {
            self.errors[i].increment(1);
            self.totals.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    tenants: Mutex<HashMap<TenantId, Arc<TenantMetrics>>>,
    pub auth_failures: Counter,
    pub moves: Counter,
    pub tenant_resets: Counter,
    pub pinned_waits: Counter,
    pub pinned_disconnects: Counter,
    pub cutover_pause: Histogram,
}

const DESCRIPTIONS: &[(&str, &str)] = &[
    (
        "pgtenant_client_connections",
        "Client connections by tenant",
    ),
    (
        "pgtenant_transactions_total",
        "Transactions (and statements outside one) completed, by tenant",
    ),
    (
        "pgtenant_queries_total",
        "Query and Execute messages relayed, by tenant",
    ),
    (
        "pgtenant_client_received_bytes_total",
        "Bytes received from client connections, by tenant",
    ),
    (
        "pgtenant_client_sent_bytes_total",
        "Bytes sent to client connections (the backends' replies), by tenant",
    ),
    (
        "pgtenant_errors_total",
        "Errors the proxy reported itself, by tenant and kind",
    ),
    (
        "pgtenant_pool_connections",
        "Backend connections by backend and state (idle, active)",
    ),
    (
        "pgtenant_auth_failures_total",
        "Failed client authentications",
    ),
    (
        "pgtenant_session_moves_total",
        "Sessions moved to a new route at a transaction boundary",
    ),
    (
        "pgtenant_pool_tenant_resets_total",
        "Full resets of a pooled backend connection before another tenant (or any session after code whose \
         effects the proxy cannot follow) used it, in transaction pooling",
    ),
    (
        "pgtenant_gate_queued",
        "Requests waiting at a closed tenant gate",
    ),
    ("migration_state", "Migration state (0 pending .. 8 paused)"),
    ("migration_progress_percent", "Bulk copy progress"),
    ("migration_events_copied_total", "Rows copied to the target"),
    ("migration_events_total", "Rows to copy"),
    (
        "dual_write_operations_total",
        "Change-log drains to the target, by status",
    ),
    (
        "dual_write_target_failures_total",
        "Target failures during dual write",
    ),
    (
        "dual_write_latency_seconds",
        "Time to drain the change log to the target after a commit",
    ),
    (
        "dual_write_sync_lag_events",
        "Change-log entries not yet applied to the target",
    ),
    (
        "cutover_pause_duration_seconds",
        "Time a tenant's gate was closed during cutover",
    ),
    (
        "cutover_blocked_writers",
        "Requests waiting during a cutover",
    ),
    ("cutover_attempts_total", "Cutover attempts"),
    (
        "cutover_timeout_total",
        "Cutover attempts that passed their timeout",
    ),
    ("verification_duration_seconds", "Verification run time"),
    (
        "verification_violations_total",
        "Verification mismatches found",
    ),
];

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let buckets = [
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ];
        let builder = PrometheusBuilder::new();
        let builder = builder
            .set_buckets(&buckets)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        for (name, help) in DESCRIPTIONS {
            let unit = name.ends_with("_seconds").then_some(Unit::Seconds);
            recorder.describe_counter((*name).into(), unit, (*help).into());
        }
        let handle = recorder.handle();
        let counter = |name: &'static str| recorder.register_counter(&Key::from_name(name), &META);
        let auth_failures = counter("pgtenant_auth_failures_total");
        let moves = counter("pgtenant_session_moves_total");
        let tenant_resets = counter("pgtenant_pool_tenant_resets_total");
        let pinned_waits = counter("pgtenant_pinned_sessions_waited_total");
        let pinned_disconnects = counter("pgtenant_pinned_sessions_disconnected_total");
        // Declared now so dashboards and alerts find them; the migration coordinator fills them.
        for name in [
            "migration_events_copied_total",
            "dual_write_target_failures_total",
            "cutover_attempts_total",
            "cutover_timeout_total",
            "verification_violations_total",
        ] {
            counter(name).increment(0);
        }
        let cutover_pause =
            recorder.register_histogram(&Key::from_name("cutover_pause_duration_seconds"), &META);
        let m = Metrics {
            auth_failures,
            moves,
            tenant_resets,
            pinned_waits,
            pinned_disconnects,
            cutover_pause,
            tenants: Mutex::new(HashMap::new()),
            handle,
            recorder,
        };
        for name in [
            "migration_progress_percent",
            "dual_write_sync_lag_events",
            "cutover_blocked_writers",
        ] {
            m.gauge(name, vec![]).set(0.0);
        }
        Arc::new(m)
    }

    pub fn counter(&self, name: &'static str, labels: Vec<Label>) -> Counter {
        self.recorder
            .register_counter(&Key::from_parts(name, labels), &META)
    }

    pub fn histogram(&self, name: &'static str, labels: Vec<Label>) -> Histogram {
        self.recorder
            .register_histogram(&Key::from_parts(name, labels), &META)
    }

    pub fn gauge(&self, name: &'static str, labels: Vec<Label>) -> Gauge {
        self.recorder
            .register_gauge(&Key::from_parts(name, labels), &META)
    }

    /// The series of a configured tenant (callers pass only tenants in the routing table, which bounds labels).
    pub fn tenant(&self, tenant: &TenantId) -> Arc<TenantMetrics> {
        let mut map = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(tenant.clone())
            .or_insert_with(|| {
                let label = || vec![Label::new("tenant", tenant.to_string())];
                let r = &self.recorder;
                Arc::new(TenantMetrics {
                    transactions: r.register_counter(
                        &Key::from_parts("pgtenant_transactions_total", label()),
                        &META,
                    ),
                    queries: r.register_counter(
                        &Key::from_parts("pgtenant_queries_total", label()),
                        &META,
                    ),
                    received: r.register_counter(
                        &Key::from_parts("pgtenant_client_received_bytes_total", label()),
                        &META,
                    ),
                    sent: r.register_counter(
                        &Key::from_parts("pgtenant_client_sent_bytes_total", label()),
                        &META,
                    ),
                    clients: r.register_gauge(
                        &Key::from_parts("pgtenant_client_connections", label()),
                        &META,
                    ),
                    errors: KINDS
                        .iter()
                        .map(|(_, kind)| {
                            let labels = vec![
                                Label::new("tenant", tenant.to_string()),
                                Label::new("kind", *kind),
                            ];
                            r.register_counter(
                                &Key::from_parts("pgtenant_errors_total", labels),
                                &META,
                            )
                        })
                        .collect(),
                    totals: Totals::default(),
                })
            })
            .clone()
    }

    /// Every tenant's series that exists (tenants that had a client since start).
    pub fn tenants(&self) -> Vec<(TenantId, Arc<TenantMetrics>)> {
        let map = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(t, m)| (t.clone(), m.clone())).collect()
    }

    pub fn render(&self) -> String {
        for (_, m) in self.tenants() {
            m.publish();
        }
        self.handle.render()
    }
}

/// What `/health` needs to know.
pub trait HealthSource: Send + Sync + 'static {
    /// `Ok` with a JSON body when healthy, `Err` with one when not.
    fn health(&self) -> Result<String, String>;
    /// Prometheus text, gauges refreshed.
    fn scrape(&self) -> String;
}
