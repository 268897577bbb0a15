//! The delivery log: the last deliveries' outcomes, in memory and bounded (`ctl webhooks log`).

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Entries kept; older ones fall off.
pub const LOG_KEEP: usize = 1_000;

/// How one event's delivery to one receiver ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub at: String,
    /// The receiver's URL without its query (which may hold a token).
    pub url: String,
    pub event: String,
    pub tenant: String,
    /// The event's id (its `X-Pgtenant-Delivery` header).
    pub id: u64,
    /// `delivered`, `failed` (every attempt failed) or `dropped` (the receiver's queue was full).
    pub outcome: String,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// From the first attempt to the outcome.
    pub duration_ms: u64,
}

#[derive(Default)]
pub struct DeliveryLog {
    entries: Mutex<VecDeque<Delivery>>,
}

impl DeliveryLog {
    pub fn push(&self, d: Delivery) {
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if e.len() == LOG_KEEP {
            e.pop_front();
        }
        e.push_back(d);
    }

    /// The last `tail` entries, oldest first.
    pub fn tail(&self, tail: usize) -> Vec<Delivery> {
        let e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.iter()
            .skip(e.len().saturating_sub(tail))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(id: u64) -> Delivery {
        Delivery {
            at: String::new(),
            url: String::new(),
            event: "migration.state".into(),
            tenant: "acme".into(),
            id,
            outcome: "delivered".into(),
            attempts: 1,
            status: Some(200),
            error: None,
            duration_ms: 1,
        }
    }

    #[test]
    fn the_log_keeps_the_newest_entries() {
        let log = DeliveryLog::default();
        for i in 0..(LOG_KEEP as u64 + 5) {
            log.push(d(i));
        }
        let all = log.tail(usize::MAX);
        assert_eq!(all.len(), LOG_KEEP);
        assert_eq!(all[0].id, 5);
        assert_eq!(
            log.tail(2).iter().map(|d| d.id).collect::<Vec<_>>(),
            [LOG_KEEP as u64 + 3, LOG_KEEP as u64 + 4]
        );
    }
}
