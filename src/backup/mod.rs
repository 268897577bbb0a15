//! Tenant backups: a consistent snapshot of one tenant (its schema, or its rows of shared tables) in one file
//! with a manifest and checksums ([`file`]); taken with `pg_dump` for the definitions and `COPY` for the rows,
//! all in one exported snapshot ([`take`]); restored to any backend, under the same or a new tenant name
//! ([`restore`]), after the whole file's checksum has been checked.

pub mod file;
pub mod restore;
pub mod take;

use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::migration::MigrateError;
use crate::tenant::TenantId;

/// File name suffix of backups.
pub const SUFFIX: &str = "pgtbackup";

#[derive(Debug, Error)]
pub enum BackupError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Format(String),
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Migrate(#[from] MigrateError),
}

impl BackupError {
    pub fn io(path: &Path, source: std::io::Error) -> BackupError {
        BackupError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    fn pg(what: &str, e: tokio_postgres::Error) -> BackupError {
        BackupError::Migrate(MigrateError::pg(what, e))
    }
}

/// What a backup holds: a whole schema (definitions and rows) or a tenant's rows of shared tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Holds {
    Schema,
    Rows,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableEntry {
    pub name: String,
    /// The columns the rows carry, in order (generated columns are left out and recomputed on restore).
    pub columns: Vec<String>,
    pub rows: u64,
    pub bytes: u64,
    /// SHA-256 of the table's COPY text.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceEntry {
    pub name: String,
    pub last_value: i64,
    pub is_called: bool,
}

/// The manifest, the backup file's last record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub tenant: String,
    pub taken_at: String,
    pub holds: Holds,
    pub backend: String,
    pub database: String,
    pub schema: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_column: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_key: Option<String>,
    pub server_version: String,
    pub tables: Vec<TableEntry>,
    pub sequences: Vec<SequenceEntry>,
    /// Bytes of row data (COPY text) over all tables.
    pub data_bytes: u64,
    pub took_ms: u64,
}

/// One backup as `tenant backups` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Listed {
    pub file: String,
    pub size: u64,
    pub taken_at: String,
    pub holds: Holds,
    pub backend: String,
    pub database: String,
    pub schema: String,
    pub tables: usize,
    pub rows: u64,
}

/// `tenant`'s backups in `dir`, newest first (a file whose manifest cannot be read is listed as damaged in the
/// log and left out).
pub async fn list(dir: &Path, tenant: &TenantId) -> Result<Vec<Listed>, BackupError> {
    let mut out = Vec::new();
    let mut entries = match tokio::fs::read_dir(dir).await {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(BackupError::io(dir, e)),
    };
    let prefix = format!("{tenant}-");
    while let Some(e) = entries
        .next_entry()
        .await
        .map_err(|e| BackupError::io(dir, e))?
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&prefix) || !name.ends_with(SUFFIX) {
            continue;
        }
        let path = e.path();
        let manifest = match file::manifest_bytes(&path).await.and_then(|b| {
            serde_json::from_slice::<Manifest>(&b)
                .map_err(|e| BackupError::Corrupt(format!("{}: manifest: {e}", path.display())))
        }) {
            Ok(m) if m.tenant == tenant.as_str() => m,
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "unreadable backup");
                continue;
            }
        };
        out.push(Listed {
            file: path.display().to_string(),
            size: e.metadata().await.map(|m| m.len()).unwrap_or_default(),
            taken_at: manifest.taken_at.clone(),
            holds: manifest.holds,
            backend: manifest.backend.clone(),
            database: manifest.database.clone(),
            schema: manifest.schema.clone(),
            tables: manifest.tables.len(),
            rows: manifest.tables.iter().map(|t| t.rows).sum(),
        });
    }
    out.sort_by(|a, b| b.taken_at.cmp(&a.taken_at).then(b.file.cmp(&a.file)));
    Ok(out)
}
