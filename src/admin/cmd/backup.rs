//! `tenant backup`, `tenant backups` and `tenant restore` (the work is in [`crate::backup`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::{to_json, Done};
use crate::admin::code::{AdminCode, AdminError};
use crate::admin::reply::BackupList;
use crate::admin::request::{BackupArgs, BackupsArgs, RestoreArgs};
use crate::backup::restore::{restore as run_restore, Destination};
use crate::backup::{self, BackupError};
use crate::config::Isolation;
use crate::context::Shared;

impl From<BackupError> for AdminError {
    fn from(e: BackupError) -> AdminError {
        let code = match &e {
            BackupError::Corrupt(_) => AdminCode::BackupCorrupt,
            BackupError::Refused(_) => AdminCode::InvalidState,
            _ => AdminCode::BackupFailed,
        };
        AdminError::new(code, e.to_string())
    }
}

pub(super) async fn take(shared: &Arc<Shared>, a: &BackupArgs) -> Result<Done, AdminError> {
    let dir = a.to.as_ref().map(|d| PathBuf::from(&**d));
    let taken = backup::take::take(shared, &a.tenant, dir.as_deref()).await?;
    Ok(Done::change(&taken, Value::Null, to_json(&taken)))
}

pub(super) async fn list(shared: &Arc<Shared>, a: &BackupsArgs) -> Result<Done, AdminError> {
    let dir = a.dir.as_ref().map_or_else(
        || backup::take::default_dir(shared),
        |d| PathBuf::from(&**d),
    );
    let backups = backup::list(&dir, &a.tenant).await?;
    Ok(Done::read(&BackupList {
        tenant: a.tenant.clone(),
        dir: dir.display().to_string(),
        backups,
    }))
}

pub(super) async fn restore(shared: &Arc<Shared>, a: &RestoreArgs) -> Result<Done, AdminError> {
    let backend = shared
        .backends
        .load()
        .get(&a.to)
        .cloned()
        .ok_or_else(|| AdminError::unknown_backend(&a.to))?;
    let to = Destination {
        backend: a.to.clone(),
        config: backend.config.clone(),
        database: a.database.clone().map(String::from),
        schema: a.schema.clone().map(String::from),
        tenant: a.as_tenant.clone(),
        tenant_key: a.tenant_key.clone().map(String::from),
    };
    let mut done = run_restore(Path::new(&*a.file), to).await?;
    next_steps(shared, &mut done, backend.config.isolation);
    Ok(Done::change(&done, Value::Null, to_json(&done)))
}

/// A restore does not change routes (route changes go through `tenant set`); it says what is left.
fn next_steps(shared: &Shared, done: &mut backup::restore::Restored, isolation: Isolation) {
    let routed = shared
        .router
        .load()
        .get(&done.tenant)
        .map(|r| (**r).clone());
    let here = routed.as_ref().is_some_and(|r| {
        r.backend.as_str() == done.backend && r.schema.as_deref().unwrap_or("public") == done.schema
    });
    if !here {
        let mut cmd = format!(
            "pgtenant ctl tenant set {} --backend {} --database {} --schema {}",
            done.tenant, done.backend, done.database, done.schema
        );
        if let (Some(key), Some(col)) = (&done.tenant_key, &done.tenant_column) {
            cmd.push_str(&format!(" --tenant-column {col} --tenant-key {key}"));
        }
        let what = if routed.is_some() {
            "its route points elsewhere"
        } else {
            "it is not routed"
        };
        done.notes.push(format!(
            "tenant {} reaches the restored data once routed here ({what}): {cmd}",
            done.tenant
        ));
    }
    if isolation == Isolation::Role {
        done.notes.push(format!(
            "the backend isolates tenants by role: then run pgtenant ctl tenant grants {} --apply",
            done.tenant
        ));
    }
}
