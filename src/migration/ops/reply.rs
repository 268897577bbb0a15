//! What the `migrate.*` commands answer (typed, shared with `ctl`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::TeeMode;
use crate::migration::record::{CutoverMode, Record, VerifyLevel, VerifyReport};
use crate::routing::{BackendId, Route};
use crate::tenant::TenantId;

/// One side of a migration: backend, database and schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Place {
    pub backend: BackendId,
    pub database: String,
    pub schema: Option<String>,
}

impl Place {
    pub fn of(route: &Route, database: &str) -> Place {
        Place {
            backend: route.backend.clone(),
            database: database.to_owned(),
            schema: route.schema.clone(),
        }
    }

    pub fn source(rec: &Record) -> Place {
        Place::of(&rec.source, &rec.source_database)
    }

    pub fn target(rec: &Record) -> Place {
        Place::of(&rec.target, &rec.target_database)
    }
}

/// `migrate start`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Started {
    pub tenant: TenantId,
    pub state: String,
    pub tables: Vec<String>,
    /// Tables without a primary key (rows are matched on all their columns).
    pub full_row_identity: Vec<String>,
    pub created_target_schema: bool,
    pub source: Place,
    pub target: Place,
    /// The backup taken before the move (`--backup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
}

/// `migrate status T`, and each row of `migrate status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub tenant: TenantId,
    /// The state as operators see it (`failed` while failed).
    pub state: String,
    /// The state the driver is in (where a retry starts).
    pub phase: String,
    pub paused: bool,
    pub failed_in: Option<String>,
    pub source: Place,
    pub target: Place,
    pub progress_percent: f64,
    pub rows_copied: u64,
    pub rows_total: u64,
    pub tables: Vec<String>,
    pub tables_copied: usize,
    pub lag_events: u64,
    pub tee: Option<TeeView>,
    pub last_pause_ms: Option<f64>,
    pub cutover_attempts: u64,
    pub last_cutover_error: Option<String>,
    pub cutover: CutoverMode,
    /// The part of the day (UTC) the move may cut over in, if limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cutover_window: Option<crate::migration::window::CutoverWindow>,
    pub verify_level: VerifyLevel,
    pub verification: Option<VerifyReport>,
    pub last_error: Option<String>,
    pub started_at: String,
    pub updated_at: String,
    /// The states it went through and the seconds spent in each (the current one up to now).
    #[serde(default)]
    pub steps: Vec<crate::migration::history::Stay>,
}

/// The tee between the sides: direction, mode and its last error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeeView {
    /// `source_to_target` before the swap, `target_to_source` after.
    pub direction: String,
    pub mode: TeeMode,
    pub last_error: Option<String>,
}

/// `migrate status` without a tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusList {
    pub migrations: Vec<Status>,
}

/// `migrate start --at` and `migrate cancel`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueuedMove {
    pub tenant: TenantId,
    /// `queued` or `cancelled`.
    pub state: String,
    pub at: String,
    pub starts_in_s: u64,
    pub priority: i32,
}

/// `migrate queue`: queued moves in the order they would start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueView {
    pub queued: Vec<crate::migration::queue::Queued>,
}

/// `migrate estimate`: sizes, what the target lacks, and durations with the rates they come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub tenant: TenantId,
    pub source: Place,
    pub target: Place,
    /// The same checks as `start`; `problems` says what `start` would refuse.
    pub preflight_passed: bool,
    pub problems: Vec<String>,
    pub tables: Vec<TableEstimate>,
    pub rows: u64,
    pub bytes: u64,
    pub tables_without_primary_key: Vec<String>,
    pub sequences: u64,
    /// Extensions and types the target lacks.
    pub missing_on_target: Vec<String>,
    pub copy_rows_per_s: Figure,
    /// Fixed seconds per table of the copy (transaction, checkpoint), measured with the rate or the default.
    pub copy_per_table_s: f64,
    pub verify_rows_per_s: Figure,
    /// Inserted, updated and deleted rows per second on the source now (sampled for a second).
    pub source_writes_per_s: f64,
    pub copy_s: f64,
    /// Applying the changes written during the copy.
    pub catch_up_s: f64,
    pub verify_s: f64,
    pub total_s: f64,
    /// Median gate-closed time of earlier cutovers and rollbacks.
    pub expected_pause_ms: Option<f64>,
    pub pause_from_moves: usize,
}

/// A rate and where it comes from (measured on earlier moves, or a default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    pub value: f64,
    pub from: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableEstimate {
    pub table: String,
    pub rows: u64,
    /// Counted; else the planner's estimate (sampled for a shared table's tenant rows).
    pub rows_exact: bool,
    /// With indexes and TOAST; for shared tables the tenant's share.
    pub bytes: u64,
    pub primary_key: bool,
}

/// `migrate history`: the summary and the finished moves asked for, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryView {
    pub summary: crate::migration::history::Summary,
    pub entries: Vec<crate::migration::history::HistoryEntry>,
}

/// `migrate pause|resume T`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkPaused {
    pub tenant: TenantId,
    pub state: String,
    pub paused: bool,
    /// A failed migration was resumed: it retries from `state`.
    pub retried: bool,
}

/// `migrate cutover T`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CutOver {
    pub tenant: TenantId,
    pub state: String,
    /// Gate closed to gate open.
    pub pause_ms: f64,
    pub queued_during_pause: usize,
    pub pinned_sessions_ended: usize,
    /// Each cutover step's time.
    pub steps_ms: BTreeMap<String, f64>,
}

/// `migrate rollback T`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolledBack {
    pub tenant: TenantId,
    pub state: String,
    pub pause_ms: f64,
}

/// `migrate finalize T`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finalized {
    pub tenant: TenantId,
    pub state: String,
    pub source_dropped: bool,
    /// When the source's copy is dropped (`--drop-source-after`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_drop_due: Option<String>,
}

/// `migrate abort T`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Aborted {
    pub tenant: TenantId,
    pub state: String,
    /// Rows left on the target (none when its cleanup failed).
    pub target_rows_left: Option<u64>,
    pub target_dropped: bool,
    pub target_cleanup_error: Option<String>,
}

/// `migrate repair T`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Repaired {
    pub tenant: TenantId,
    pub ranges: usize,
    pub rows_copied: u64,
    pub verification: VerifyReport,
}

/// `migrate ddl T`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DdlApplied {
    pub tenant: TenantId,
    pub applied: Vec<String>,
    /// How long the tenant was held.
    pub held_ms: f64,
    pub tables: Vec<String>,
}
