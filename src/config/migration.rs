//! `[migration]`: live migration limits and timing.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationConfig {
    /// Longest the cutover may hold a tenant before it falls back to the source.
    #[serde(default = "default_cutover_timeout_ms")]
    pub cutover_timeout_ms: u64,
    /// Queued requests per paused tenant; more are refused.
    #[serde(default = "default_max_queued")]
    pub max_queued_per_tenant: usize,
    /// Rows per batch during bulk copy.
    #[serde(default = "default_copy_batch_rows")]
    pub copy_batch_rows: usize,
    /// `sync`: a COMMIT that wrote returns only after its changes are on the target (bounded by
    /// `tee_timeout_ms`); `async`: it returns at once and the target follows (lag instead of acknowledgement).
    #[serde(default)]
    pub tee: TeeMode,
    /// Longest a committing client waits for the tee before its ReadyForQuery is released anyway.
    #[serde(default = "default_tee_timeout_ms")]
    pub tee_timeout_ms: u64,
    /// Migrations running at once; more are refused.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: usize,
    /// Tables copied at once during bulk copy.
    #[serde(default = "default_copy_parallel")]
    pub copy_parallel_tables: usize,
    /// A table at least this large (MiB on the source) is copied as `copy_parallel_tables` block ranges at
    /// once, all in the one snapshot; 0: never split.
    #[serde(default = "default_copy_split_mb")]
    pub copy_split_mb: u64,
    /// Rows per verification chunk (a hash mismatch names one chunk's key range).
    #[serde(default = "default_verify_chunk_rows")]
    pub verify_chunk_rows: usize,
    /// How often the background catch-up looks at the change log when no commit asked for a drain.
    #[serde(default = "default_catchup_interval_ms")]
    pub catchup_interval_ms: u64,
    /// The `pg_dump` used to create a missing target schema from the source's definition.
    #[serde(default = "default_pg_dump")]
    pub pg_dump: String,
    /// Finished migrations kept in the history (`migrate history`); the oldest go beyond it.
    #[serde(default = "default_history_keep")]
    pub history_keep: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TeeMode {
    #[default]
    Sync,
    Async,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        MigrationConfig {
            cutover_timeout_ms: default_cutover_timeout_ms(),
            max_queued_per_tenant: default_max_queued(),
            copy_batch_rows: default_copy_batch_rows(),
            tee: TeeMode::Sync,
            tee_timeout_ms: default_tee_timeout_ms(),
            max_concurrent: default_max_concurrent(),
            copy_parallel_tables: default_copy_parallel(),
            copy_split_mb: default_copy_split_mb(),
            verify_chunk_rows: default_verify_chunk_rows(),
            catchup_interval_ms: default_catchup_interval_ms(),
            pg_dump: default_pg_dump(),
            history_keep: default_history_keep(),
        }
    }
}

fn default_cutover_timeout_ms() -> u64 {
    5_000
}
fn default_max_queued() -> usize {
    10_000
}
fn default_copy_batch_rows() -> usize {
    10_000
}
fn default_tee_timeout_ms() -> u64 {
    2_000
}
fn default_max_concurrent() -> usize {
    2
}
fn default_history_keep() -> usize {
    1000
}
fn default_copy_parallel() -> usize {
    2
}
fn default_copy_split_mb() -> u64 {
    64
}
fn default_verify_chunk_rows() -> usize {
    10_000
}
fn default_catchup_interval_ms() -> u64 {
    100
}
fn default_pg_dump() -> String {
    "pg_dump".into()
}
