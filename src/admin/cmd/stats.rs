//! `stats` and `audit`.

use std::collections::BTreeMap;

use super::super::code::{AdminCode, AdminError};
use super::super::reply::{AuditView, StatsView, WebhookLogView};
use crate::context::Shared;
use crate::tenant::TenantId;

/// Counters from the metrics registry, by series.
fn counters(shared: &Shared) -> BTreeMap<String, f64> {
    shared
        .metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("pgtenant_") && !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

pub(super) fn stats(shared: &Shared) -> StatsView {
    let table = shared.router.snapshot();
    let mut paused_tenants: Vec<TenantId> = table
        .tenants()
        .filter(|t| shared.gates.peek(t.as_str()).is_some_and(|g| g.is_closed()))
        .cloned()
        .collect();
    paused_tenants.sort();
    StatsView {
        uptime_s: shared.started.elapsed().as_secs(),
        epoch: table.epoch,
        tenants: table.len(),
        client_sessions: shared.sessions.count(),
        paused_tenants,
        paused_all: shared.gates.all_closed(),
        counters: counters(shared),
        backends: super::backends::list(shared).backends,
        tenant_stats: shared.rates.all(&shared.metrics),
    }
}

pub(super) fn audit(shared: &Shared, tail: usize) -> Result<AuditView, AdminError> {
    let (entries, broken_at) = shared
        .audit
        .tail(tail)
        .map_err(|e| AdminError::new(AdminCode::StateReadFailed, e.to_string()))?;
    Ok(AuditView {
        entries,
        verified: broken_at.is_none(),
        broken_at_line: broken_at,
    })
}

/// `webhooks log`: the last deliveries and how many receivers are configured.
pub(super) fn webhooks_log(shared: &Shared, tail: usize) -> WebhookLogView {
    WebhookLogView {
        receivers: shared.config.load().webhooks.len(),
        deliveries: shared.notifier.log.tail(tail),
    }
}
