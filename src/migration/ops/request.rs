//! The arguments of `migrate start` (and `migrate estimate`): what to move where, and how.

use serde::{Deserialize, Serialize};

use crate::admin::args::{is_default, or_default, Ident, TenantKey};
use crate::migration::record::{CutoverMode, VerifyLevel};
use crate::migration::window::CutoverWindow;
use crate::routing::BackendId;
use crate::tenant::TenantId;

/// What `migrate start` asks for (the `migrate.start` request's arguments).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// The tenant's name.
    pub tenant: TenantId,
    /// The backend to move the tenant to.
    #[arg(long)]
    pub to: BackendId,
    /// Database on the target (default: the target backend's, else the source's name).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<Ident>,
    /// Schema on the target (default: the source's).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Ident>,
    /// Verification that must pass before cutover: count, hash or full (a comma list takes the strongest).
    #[arg(long, default_value = "count")]
    #[serde(
        default,
        deserialize_with = "or_default",
        skip_serializing_if = "is_default"
    )]
    pub verify: VerifyLevel,
    /// auto: cut over once verified and caught up; manual: wait for `migrate cutover`.
    #[arg(long, value_enum, default_value = "manual")]
    #[serde(
        default,
        deserialize_with = "or_default",
        skip_serializing_if = "is_default"
    )]
    pub cutover: CutoverMode,
    /// Accept (and replace) rows the target already holds.
    #[arg(long)]
    #[serde(
        default,
        deserialize_with = "or_default",
        skip_serializing_if = "is_default"
    )]
    pub allow_existing: bool,
    /// Shared tables: the column naming each row's tenant (migrates the tenant's rows of the tables that
    /// have it, in the route's schema or public).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_column: Option<Ident>,
    /// The tenant's value in that column (default: the tenant's name).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_key: Option<TenantKey>,
    /// Cut over only inside this part of the day: `HH:MM-HH:MM` in UTC, or `HH:MM-HH:MM Europe/Berlin` in a
    /// zone (copy and dual_write run any time; a move ready outside it waits in dual_write).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cutover_window: Option<CutoverWindow>,
    /// Queue the move to start later: `+30s`, `+5m`, `+2h`, `HH:MM` (next occurrence, UTC) or
    /// `YYYY-MM-DDTHH:MM[:SS]Z`.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// Among queued moves due at once, higher starts first.
    #[arg(long, default_value_t = 0)]
    #[serde(
        default,
        deserialize_with = "or_default",
        skip_serializing_if = "is_default"
    )]
    pub priority: i32,
    /// Take a backup of the tenant (as `tenant backup`, into <state_dir>/backups) before anything is installed
    /// or copied; the move does not start if it fails.
    #[arg(long)]
    #[serde(
        default,
        deserialize_with = "or_default",
        skip_serializing_if = "is_default"
    )]
    pub backup: bool,
}
