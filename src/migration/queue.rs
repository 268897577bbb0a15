//! Moves queued for later (`migrate start --at TIME [--priority N]`), kept in `state_dir/migration_queue.json`
//! so they survive restarts. Once a second the scheduler starts the due ones, highest priority first, then the
//! earliest, as far as `migration.max_concurrent` allows; a due move waits while its tenant still has one.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ops::request::StartRequest;
use crate::state::json_list::JsonList;
use crate::state::StateError;
use crate::tenant::TenantId;

const FILE: &str = "migration_queue.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queued {
    pub request: StartRequest,
    /// Unix seconds at which it may start.
    pub at_unix: u64,
    pub at: String,
    pub priority: i32,
    pub queued_at: String,
    pub queued_by: String,
}

#[derive(Debug)]
pub struct Queue(JsonList<Queued>);

impl Queue {
    pub fn open(dir: &Path) -> Result<Queue, StateError> {
        JsonList::open(dir, FILE).map(Queue)
    }

    /// Every queued move, in the order they would start.
    pub fn list(&self) -> Vec<Queued> {
        let mut all = self.0.all();
        all.sort_by_key(|q| (-q.priority, q.at_unix));
        all
    }

    pub fn contains(&self, tenant: &TenantId) -> bool {
        self.0.any(|q| &q.request.tenant == tenant)
    }

    /// Adds `q` (durable when this returns).
    pub fn push(&self, q: Queued) -> Result<(), StateError> {
        self.0.push(q)
    }

    /// Removes and returns the tenant's queued move.
    pub fn remove(&self, tenant: &TenantId) -> Result<Option<Queued>, StateError> {
        self.0.remove(|q| &q.request.tenant == tenant)
    }
}

/// When `--at` means, in unix seconds: `+30s`/`+5m`/`+2h`, `HH:MM[:SS]` (its next occurrence, UTC) or
/// `YYYY-MM-DDTHH:MM[:SS]Z`.
pub fn parse_at(text: &str, now: u64) -> Option<u64> {
    use super::clock::{date, span, time_of_day};
    if let Some(rel) = text.strip_prefix('+') {
        return now.checked_add(span(rel)?);
    }
    match text.split_once('T') {
        Some((day, time)) => Some(date(day)? + u64::from(time_of_day(time.strip_suffix('Z')?)?)),
        None => {
            let today = now - now % 86_400 + u64::from(time_of_day(text)?);
            Some(if today > now { today } else { today + 86_400 })
        }
    }
}

/// The due moves to start now, in order: due, their tenant without a running migration, within the free slots.
pub fn due(
    queued: &[Queued],
    now: u64,
    free: usize,
    busy: impl Fn(&TenantId) -> bool,
) -> Vec<TenantId> {
    let mut ready: Vec<&Queued> = queued
        .iter()
        .filter(|q| q.at_unix <= now && !busy(&q.request.tenant))
        .collect();
    ready.sort_by_key(|q| (-q.priority, q.at_unix));
    ready
        .into_iter()
        .take(free)
        .map(|q| q.request.tenant.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(tenant: &str, at_unix: u64, priority: i32) -> Queued {
        let request: StartRequest =
            serde_json::from_value(serde_json::json!({"tenant": tenant, "to": "b"})).unwrap();
        Queued {
            request,
            at_unix,
            at: String::new(),
            priority,
            queued_at: String::new(),
            queued_by: "test".into(),
        }
    }

    #[test]
    fn due_moves_start_by_priority_then_time_within_the_free_slots() {
        let q = [
            queued("late", 200, 9),
            queued("low", 10, 0),
            queued("high", 50, 5),
            queued("busy", 5, 9),
            queued("early", 5, 0),
        ];
        let busy = |t: &TenantId| t.as_str() == "busy";
        let names = |v: Vec<TenantId>| v.iter().map(|t| t.to_string()).collect::<Vec<_>>();
        assert_eq!(names(due(&q, 100, 2, busy)), ["high", "early"]);
        assert_eq!(names(due(&q, 100, 5, busy)), ["high", "early", "low"]);
        assert!(due(&q, 100, 0, busy).is_empty());
        assert_eq!(names(due(&q, 300, 1, busy)), ["late"]);
    }

    #[test]
    fn at_takes_spans_times_of_day_and_dates() {
        let now = 20_000 * 86_400 + 10 * 3600;
        assert_eq!(parse_at("+30s", now), Some(now + 30));
        assert_eq!(parse_at("+2h", now), Some(now + 7200));
        assert_eq!(parse_at("11:00", now), Some(now + 3600));
        assert_eq!(parse_at("09:00", now), Some(now + 23 * 3600));
        assert_eq!(parse_at("2026-12-06T10:00:00Z", now), Some(1_796_551_200));
        for bad in ["", "+", "+5x", "25:00", "2026-12-06T10:00", "tomorrow"] {
            assert_eq!(parse_at(bad, now), None, "{bad}");
        }
    }

    #[test]
    fn the_queue_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Queue::open(dir.path()).unwrap();
        queue.push(queued("a", 10, 0)).unwrap();
        queue.push(queued("b", 5, 1)).unwrap();
        let again = Queue::open(dir.path()).unwrap();
        let order: Vec<String> = again
            .list()
            .iter()
            .map(|q| q.request.tenant.to_string())
            .collect();
        assert_eq!(order, ["b", "a"]);
        assert!(again
            .remove(&TenantId::parse("a").unwrap())
            .unwrap()
            .is_some());
        assert!(again
            .remove(&TenantId::parse("a").unwrap())
            .unwrap()
            .is_none());
        assert_eq!(Queue::open(dir.path()).unwrap().list().len(), 1);
    }
}
