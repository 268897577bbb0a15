//! Source drops scheduled by `migrate finalize --drop-source-after SPAN`, kept in `state_dir/source_drops.json`
//! so they survive restarts: the source's copy of a moved tenant stays (fenced) for a safety window, then the
//! scheduler drops it (`ops::drops`). `migrate cancel-drop` keeps it for good.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::routing::BackendId;
use crate::state::json_list::JsonList;
use crate::state::StateError;
use crate::tenant::TenantId;

const FILE: &str = "source_drops.json";

/// Where the old copy is and when it goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceDrop {
    pub tenant: TenantId,
    pub backend: BackendId,
    pub database: String,
    pub schema: String,
    /// Shared tables: only the tenant's rows (by this column and key) of `tables` go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_column: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_key: Option<String>,
    pub tables: Vec<String>,
    pub due_unix: u64,
    pub due: String,
    pub scheduled_at: String,
    /// Failed attempts so far (the next waits longer), and the last one's error.
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default)]
    pub next_try_unix: u64,
}

#[derive(Debug)]
pub struct Drops(JsonList<SourceDrop>);

impl Drops {
    pub fn open(dir: &Path) -> Result<Drops, StateError> {
        JsonList::open(dir, FILE).map(Drops)
    }

    /// Every scheduled drop, soonest first.
    pub fn list(&self) -> Vec<SourceDrop> {
        let mut all = self.0.all();
        all.sort_by_key(|d| d.due_unix);
        all
    }

    /// Schedules `d`, replacing an earlier schedule of the same tenant and place.
    pub fn schedule(&self, d: SourceDrop) -> Result<(), StateError> {
        self.0.remove(|o| same_place(o, &d))?;
        self.0.push(d)
    }

    /// Removes the tenant's scheduled drops; the removed ones.
    pub fn cancel(&self, tenant: &TenantId) -> Result<Vec<SourceDrop>, StateError> {
        let mut out = Vec::new();
        while let Some(d) = self.0.remove(|d| &d.tenant == tenant)? {
            out.push(d);
        }
        Ok(out)
    }

    pub fn remove(&self, d: &SourceDrop) -> Result<(), StateError> {
        self.0.remove(|o| o == d).map(|_| ())
    }

    /// Records a failed attempt; the next waits 1 min, doubling up to an hour.
    pub fn failed(&self, d: &SourceDrop, error: String, now: u64) -> Result<(), StateError> {
        self.0.update(
            |o| same_place(o, d),
            |o| {
                o.attempts += 1;
                o.next_try_unix = now + (60u64 << o.attempts.min(6)).min(3600);
                o.last_error = Some(error);
            },
        )
    }
}

fn same_place(a: &SourceDrop, b: &SourceDrop) -> bool {
    a.tenant == b.tenant
        && a.backend == b.backend
        && a.database == b.database
        && a.schema == b.schema
}

/// The drops to run at `now`: due and not waiting after a failure.
pub fn due(all: &[SourceDrop], now: u64) -> Vec<SourceDrop> {
    all.iter()
        .filter(|d| d.due_unix <= now && d.next_try_unix <= now)
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drop_of(tenant: &str, due_unix: u64) -> SourceDrop {
        SourceDrop {
            tenant: TenantId::parse(tenant).unwrap(),
            backend: BackendId::parse("b").unwrap(),
            database: "app".into(),
            schema: format!("s_{tenant}"),
            tenant_column: None,
            tenant_key: None,
            tables: vec!["t".into()],
            due_unix,
            due: String::new(),
            scheduled_at: String::new(),
            attempts: 0,
            last_error: None,
            next_try_unix: 0,
        }
    }

    #[test]
    fn drops_are_due_after_their_time_and_wait_after_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let drops = Drops::open(dir.path()).unwrap();
        drops.schedule(drop_of("a", 100)).unwrap();
        drops.schedule(drop_of("b", 50)).unwrap();
        drops.schedule(drop_of("a", 120)).unwrap();
        let all = drops.list();
        assert_eq!(
            all.len(),
            2,
            "a schedule of the same place replaces the earlier one"
        );
        assert!(due(&all, 99).iter().all(|d| d.tenant.as_str() == "b"));
        assert_eq!(due(&all, 120).len(), 2);
        drops.failed(&all[0], "refused".into(), 120).unwrap();
        let again = Drops::open(dir.path()).unwrap().list();
        assert_eq!(due(&again, 121).len(), 1, "b waits a minute after failing");
        assert_eq!(again[0].next_try_unix, 240);
        assert_eq!(
            drops.cancel(&TenantId::parse("a").unwrap()).unwrap().len(),
            1
        );
        assert_eq!(Drops::open(dir.path()).unwrap().list().len(), 1);
    }
}
