//! The admin protocol's stable error codes (DESIGN section 6) and the refusal that carries one. Scripts match on
//! the code; the message is for people and may change.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Why a request was refused. The wire form is the snake_case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminCode {
    /// Not JSON, or not an object.
    BadJson,
    RequestTooLarge,
    UnknownCommand,
    MissingArgument,
    InvalidArgument,
    /// Wrong or missing token, or a peer that is not the proxy's user.
    Unauthorized,
    TooManyConnections,
    UnknownTenant,
    UnknownBackend,
    /// The command does not apply in the current state (of the tenant, its gate or its migration).
    InvalidState,
    NoMigration,
    /// A configured limit (such as concurrent migrations) is reached.
    LimitReached,
    PreflightFailed,
    VerificationFailed,
    MigrationFailed,
    /// A cutover attempt failed before the swap; the tenant stays on the source.
    CutoverFailed,
    DdlPartial,
    GrantsFailed,
    ReloadFailed,
    Timeout,
    StateWriteFailed,
    StateReadFailed,
    AuditWriteFailed,
    /// Taking or restoring a backup failed (the message says where).
    BackupFailed,
    /// A backup file failed its checksums; nothing was restored.
    BackupCorrupt,
}

impl AdminCode {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminCode::BadJson => "bad_json",
            AdminCode::RequestTooLarge => "request_too_large",
            AdminCode::UnknownCommand => "unknown_command",
            AdminCode::MissingArgument => "missing_argument",
            AdminCode::InvalidArgument => "invalid_argument",
            AdminCode::Unauthorized => "unauthorized",
            AdminCode::TooManyConnections => "too_many_connections",
            AdminCode::UnknownTenant => "unknown_tenant",
            AdminCode::UnknownBackend => "unknown_backend",
            AdminCode::InvalidState => "invalid_state",
            AdminCode::NoMigration => "no_migration",
            AdminCode::LimitReached => "limit_reached",
            AdminCode::PreflightFailed => "preflight_failed",
            AdminCode::VerificationFailed => "verification_failed",
            AdminCode::MigrationFailed => "migration_failed",
            AdminCode::CutoverFailed => "cutover_failed",
            AdminCode::DdlPartial => "ddl_partial",
            AdminCode::GrantsFailed => "grants_failed",
            AdminCode::ReloadFailed => "reload_failed",
            AdminCode::Timeout => "timeout",
            AdminCode::StateWriteFailed => "state_write_failed",
            AdminCode::StateReadFailed => "state_read_failed",
            AdminCode::AuditWriteFailed => "audit_write_failed",
            AdminCode::BackupFailed => "backup_failed",
            AdminCode::BackupCorrupt => "backup_corrupt",
        }
    }
}

impl std::fmt::Display for AdminCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused request: a stable code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
#[error("{code}: {message}")]
pub struct AdminError {
    pub code: AdminCode,
    pub message: String,
}

impl AdminError {
    pub fn new(code: AdminCode, message: impl Into<String>) -> AdminError {
        AdminError {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> AdminError {
        AdminError::new(AdminCode::InvalidArgument, message)
    }

    pub fn invalid_state(message: impl Into<String>) -> AdminError {
        AdminError::new(AdminCode::InvalidState, message)
    }

    pub fn unknown_tenant(tenant: &str) -> AdminError {
        AdminError::new(
            AdminCode::UnknownTenant,
            format!("tenant {tenant:?} is not routed"),
        )
    }

    pub fn unknown_backend(backend: &str) -> AdminError {
        AdminError::new(
            AdminCode::UnknownBackend,
            format!("backend {backend:?} is not configured"),
        )
    }

    pub fn no_migration(tenant: &str) -> AdminError {
        AdminError::new(
            AdminCode::NoMigration,
            format!("tenant {tenant:?} has no migration"),
        )
    }

    pub fn state_write(e: impl std::fmt::Display) -> AdminError {
        AdminError::new(
            AdminCode::StateWriteFailed,
            format!("could not persist the change: {e}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_match_as_str() {
        for code in [
            AdminCode::BadJson,
            AdminCode::UnknownCommand,
            AdminCode::InvalidState,
            AdminCode::DdlPartial,
            AdminCode::AuditWriteFailed,
        ] {
            assert_eq!(
                serde_json::to_value(code).unwrap(),
                serde_json::json!(code.as_str())
            );
        }
    }
}
