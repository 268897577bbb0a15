//! The migration record (DESIGN section 5): what a migration is, where it stands, and what it has done. Records
//! are written to `state_dir/migrations.json` before every transition, so a restarted proxy resumes from them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::routing::Route;
use crate::state::{atomic, StateError};
use crate::tenant::TenantId;

const FILE: &str = "migrations.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Pending,
    BulkCopy,
    DualWrite,
    CutoverPaused,
    Migrated,
    Completed,
    Failed,
    RolledBack,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::BulkCopy => "bulk_copy",
            State::DualWrite => "dual_write",
            State::CutoverPaused => "cutover_paused",
            State::Migrated => "migrated",
            State::Completed => "completed",
            State::Failed => "failed",
            State::RolledBack => "rolled_back",
        }
    }

    /// The `migration_state` gauge value (the order of the DESIGN table; 8 is `paused`).
    pub fn code(self) -> f64 {
        match self {
            State::Pending => 0.0,
            State::BulkCopy => 1.0,
            State::DualWrite => 2.0,
            State::CutoverPaused => 3.0,
            State::Migrated => 4.0,
            State::Completed => 5.0,
            State::Failed => 6.0,
            State::RolledBack => 7.0,
        }
    }

    /// Ended migrations hold nothing (no capture, no tee) and no longer block a new one for the tenant.
    pub fn is_final(self) -> bool {
        matches!(self, State::Completed | State::RolledBack)
    }

    /// The route swap has not happened: the source is authoritative and `abort` is allowed.
    pub fn before_swap(self) -> bool {
        matches!(
            self,
            State::Pending
                | State::BulkCopy
                | State::DualWrite
                | State::CutoverPaused
                | State::Failed
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum CutoverMode {
    #[default]
    Manual,
    Auto,
}

/// Read from `count`, `hash` or `full`, or a comma list of them (the strongest counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", try_from = "String")]
pub enum VerifyLevel {
    #[default]
    Count,
    Hash,
    Full,
}

impl TryFrom<String> for VerifyLevel {
    type Error = String;
    fn try_from(list: String) -> Result<VerifyLevel, String> {
        list.split(',')
            .map(|part| VerifyLevel::parse(part.trim()).ok_or("must be count, hash or full"))
            .try_fold(None, |best: Option<VerifyLevel>, l| {
                l.map(|l| best.max(Some(l)))
            })?
            .ok_or_else(|| "must be count, hash or full".to_string())
    }
}

impl std::str::FromStr for VerifyLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<VerifyLevel, String> {
        VerifyLevel::try_from(s.to_owned())
    }
}

impl VerifyLevel {
    pub fn parse(s: &str) -> Option<VerifyLevel> {
        match s {
            "count" => Some(VerifyLevel::Count),
            "hash" => Some(VerifyLevel::Hash),
            "full" => Some(VerifyLevel::Full),
            _ => None,
        }
    }
}

/// One table's copy checkpoint: done, with the snapshot it was read in (change-log entries visible in that
/// snapshot are already in the copy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableCheckpoint {
    pub rows: u64,
    /// Bytes of the table's binary COPY stream.
    #[serde(default)]
    pub bytes: u64,
    pub snapshot: String,
}

/// The last verification's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct VerifyReport {
    pub level: Option<VerifyLevel>,
    pub passed: bool,
    pub at: String,
    pub duration_ms: u64,
    pub tables: u64,
    pub rows: u64,
    /// Human-readable mismatches: table, key range, counts or keys.
    pub violations: Vec<String>,
    /// Mismatching key ranges, for `repair`.
    #[serde(default)]
    pub ranges: Vec<KeyRange>,
}

/// A key range of one table (keys as JSON text; none: open on that side).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRange {
    pub table: String,
    pub from: Option<String>,
    pub to: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub tenant: TenantId,
    pub state: State,
    /// Copy/tee work paused by the operator (the tenant's traffic is not).
    #[serde(default)]
    pub paused: bool,
    /// The state a `failed` migration failed in (resume retries from there).
    #[serde(default)]
    pub failed_in: Option<State>,
    pub source: Route,
    pub target: Route,
    /// The schema the tenant's tables are in, on both sides.
    pub schema: String,
    /// Shared tables: the column that says which tenant a row belongs to, and the tenant's value in it (the
    /// tenant's name unless given). Only tables with that column migrate, and only the tenant's rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_column: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_key: Option<String>,
    pub source_database: String,
    pub target_database: String,
    pub verify: VerifyLevel,
    pub cutover: CutoverMode,
    /// Cut over only inside this part of the day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cutover_window: Option<super::window::CutoverWindow>,
    /// Target schema made by this migration (dropped by `abort --drop-target`).
    #[serde(default)]
    pub created_target_schema: bool,
    /// The target schema was made without its indexes, constraints and triggers (pg_dump's post-data): they
    /// are made once the copy is done, as a restore does, because rows load much faster into bare tables.
    #[serde(default)]
    pub post_data_pending: bool,
    pub tables: Vec<String>,
    #[serde(default)]
    pub copied: BTreeMap<String, TableCheckpoint>,
    pub rows_total: u64,
    pub rows_copied: u64,
    #[serde(default)]
    pub bytes_copied: u64,
    /// When the migration entered each state it went through (unix ms), for the history's per-state times.
    #[serde(default)]
    pub entered: Vec<(State, u64)>,
    /// The bulk-copy rate (rows/s) the estimate used when the move started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_copy_rows_per_s: Option<f64>,
    /// And the fixed cost per table it used (seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_copy_per_table_s: Option<f64>,
    /// The admin actor that started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_by: Option<String>,
    /// The backup taken before the move (`--backup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_file: Option<String>,
    #[serde(default)]
    pub last_pause_ms: Option<f64>,
    #[serde(default)]
    pub cutover_attempts: u64,
    #[serde(default)]
    pub last_cutover_error: Option<String>,
    #[serde(default)]
    pub verification: Option<VerifyReport>,
    #[serde(default)]
    pub last_error: Option<String>,
    pub started_at: String,
    pub updated_at: String,
}

/// Milliseconds since the Unix epoch (state entry times).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

impl Record {
    /// Whether this move and `other` land in one place (backend, database and schema; none is `public`) where
    /// at least one of them moves a whole schema: they would copy into, and an abort would empty, the same
    /// tables. Moves of shared-table rows into one shared schema do not clash.
    pub fn target_clashes(&self, other: &Record) -> bool {
        let place = |r: &Record| {
            (
                r.target.backend.clone(),
                r.target_database.clone(),
                r.target
                    .schema
                    .clone()
                    .unwrap_or_else(|| "public".to_owned()),
            )
        };
        self.tenant != other.tenant
            && (self.tenant_column.is_none() || other.tenant_column.is_none())
            && place(self) == place(other)
    }

    /// A new migration in `pending`: `tenant` moving from `source` to `target`, its tables in `schema`.
    pub fn pending(
        tenant: TenantId,
        (source, source_database): (Route, String),
        (target, target_database): (Route, String),
        schema: String,
    ) -> Record {
        let now = crate::state::audit::rfc3339_now();
        Record {
            tenant,
            state: State::Pending,
            paused: false,
            failed_in: None,
            source,
            target,
            schema,
            tenant_column: None,
            tenant_key: None,
            source_database,
            target_database,
            verify: VerifyLevel::Count,
            cutover: CutoverMode::Manual,
            cutover_window: None,
            created_target_schema: false,
            post_data_pending: false,
            tables: Vec::new(),
            copied: BTreeMap::new(),
            rows_total: 0,
            rows_copied: 0,
            bytes_copied: 0,
            entered: vec![(State::Pending, now_ms())],
            started_by: None,
            backup_file: None,
            expected_copy_rows_per_s: None,
            expected_copy_per_table_s: None,
            last_pause_ms: None,
            cutover_attempts: 0,
            last_cutover_error: None,
            verification: None,
            last_error: None,
            started_at: now.clone(),
            updated_at: now,
        }
    }

    /// A record in `pending` of `tenant`, moving schema `s` from backend `a` to `b` (for unit tests).
    #[cfg(test)]
    pub fn for_tests(tenant: &str) -> Record {
        let side = |b: &str| {
            let route = Route::new(
                crate::routing::BackendId::parse(b).unwrap(),
                Some("app".into()),
                Some("s".into()),
            );
            (route, "app".to_string())
        };
        Record::pending(
            TenantId::parse(tenant).unwrap(),
            side("a"),
            side("b"),
            "s".into(),
        )
    }

    /// Copy progress; `in_flight` rows are copied but their table has no checkpoint yet.
    pub fn progress_percent(&self, in_flight: u64) -> f64 {
        let share = |cap: f64| {
            if self.rows_total == 0 {
                0.0
            } else {
                ((self.rows_copied + in_flight) as f64 * 100.0 / self.rows_total as f64).min(cap)
            }
        };
        match self.state {
            State::Pending => 0.0,
            State::BulkCopy => share(99.9),
            State::Failed | State::RolledBack => share(100.0),
            _ => 100.0,
        }
    }

    /// The state reported to operators (`paused` while copy/tee work is held).
    pub fn shown_state(&self) -> &'static str {
        if self.paused && !self.state.is_final() {
            "paused"
        } else {
            self.state.as_str()
        }
    }

    pub fn copied_tables(&self) -> BTreeSet<&str> {
        self.copied.keys().map(String::as_str).collect()
    }
}

/// Format of `migrations.json`: 2 added shared-table migrations (`tenant_column`, `tenant_key`).
const VERSION: u32 = 2;

#[derive(Debug, Serialize, Deserialize, Default)]
struct File {
    version: u32,
    migrations: BTreeMap<TenantId, Record>,
}

/// `migrations.json` in the state directory.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
}

impl Store {
    pub fn new(dir: &Path) -> Store {
        Store {
            path: dir.join(FILE),
        }
    }

    pub fn load(&self) -> Result<BTreeMap<TenantId, Record>, StateError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(StateError::io(&self.path, e)),
        };
        let json = crate::state::unseal(&self.path, &text)?;
        let file: File = serde_json::from_str(json).map_err(|e| StateError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        // A newer pgtenant's records may carry what this one would misread (a shared-table migration read as a
        // whole-schema one could drop the schema at finalize): refuse rather than guess.
        if file.version > VERSION {
            return Err(StateError::Corrupt {
                path: self.path.clone(),
                reason: format!(
                    "written by a newer pgtenant (format {}; this one reads up to {VERSION})",
                    file.version
                ),
            });
        }
        Ok(file.migrations)
    }

    pub fn save(&self, records: &BTreeMap<TenantId, Record>) -> Result<(), StateError> {
        let file = serde_json::json!({"version": VERSION, "migrations": records});
        let json = serde_json::to_string_pretty(&file).map_err(|e| StateError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        atomic::write(&self.path, crate::state::seal(&json).as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_format_is_refused_and_older_ones_load() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        for (version, ok) in [(1, true), (2, true), (3, false)] {
            let json = format!("{{\"version\": {version}, \"migrations\": {{}}}}");
            std::fs::write(dir.path().join(FILE), crate::state::seal(&json)).unwrap();
            assert_eq!(store.load().is_ok(), ok, "version {version}");
        }
        store.save(&BTreeMap::new()).unwrap();
        assert!(store.load().unwrap().is_empty());
    }
}
