//! What each admin command does, one file per command group, behind the one [`Request`] enum. Every front end
//! (unix socket, TCP) calls [`execute`]. Mutating commands are written to the audit log (fsynced) before the
//! answer.

mod backends;
mod backup;
mod gate;
mod grants;
mod migrate;
mod reload;
mod route;
mod stats;
mod tenants;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use super::code::{AdminCode, AdminError};
use super::request::Request;
use crate::context::Shared;

/// A command's answer plus what the audit log records about it.
pub struct Done {
    pub result: Value,
    pub before: Value,
    pub after: Value,
}

impl Done {
    /// A change: its typed answer and the audit log's before and after.
    pub fn change(result: &impl Serialize, before: Value, after: Value) -> Done {
        Done {
            result: to_json(result),
            before,
            after,
        }
    }

    /// A read-only answer.
    pub fn read(result: &impl Serialize) -> Done {
        Done::change(result, Value::Null, Value::Null)
    }
}

/// Our own reply types always encode; `null` would only show a bug, never a secret.
pub fn to_json(v: &impl Serialize) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Runs one request on behalf of `actor`.
pub async fn execute(shared: &Arc<Shared>, req: Request, actor: &str) -> Result<Value, AdminError> {
    let command = req.command();
    let mutates = req.mutates();
    let tenant = req.tenant().map(|t| t.to_string());
    // Route changes (and reload) run one at a time, with their audit entry written before the next starts, so
    // the log's order is the epochs' order and `removed` is never changed by two writers.
    let _serial = if req.changes_routes() {
        Some(shared.admin_lock.lock().await)
    } else {
        None
    };
    let outcome = run(shared, req, actor).await;
    if !mutates {
        return outcome.map(|d| d.result);
    }
    let (before, after, result) = match &outcome {
        Ok(d) => (d.before.clone(), d.after.clone(), "ok".to_string()),
        Err(e) => (Value::Null, Value::Null, format!("error: {}", e.code)),
    };
    if let Err(e) = shared
        .audit
        .append(actor, command, tenant.as_deref(), before, after, &result)
    {
        shared.audit_ok.store(false, Ordering::Relaxed);
        return Err(AdminError::new(
            AdminCode::AuditWriteFailed,
            format!("the command ran ({result}) but could not be written to the audit log: {e}"),
        ));
    }
    outcome.map(|d| d.result)
}

/// Runs a command that writes the state directory (an fsync) on a blocking thread, not on one that serves
/// clients.
async fn off_thread(
    shared: &Arc<Shared>,
    command: impl FnOnce(&Arc<Shared>) -> Result<Done, AdminError> + Send + 'static,
) -> Result<Done, AdminError> {
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || command(&shared))
        .await
        .map_err(|e| AdminError::state_write(format!("the command's thread failed: {e}")))?
}

async fn run(shared: &Arc<Shared>, req: Request, actor: &str) -> Result<Done, AdminError> {
    match req {
        Request::Tenants(_) => Ok(Done::read(&tenants::list(shared))),
        Request::Clients(_) => Ok(Done::read(&tenants::clients(shared))),
        Request::Instances(_) => crate::cluster::instances(shared)
            .await
            .map(|v| Done::read(&v))
            .map_err(|e| AdminError::new(AdminCode::StateReadFailed, e.to_string())),
        Request::TenantGet(a) => tenants::get(shared, &a.tenant).map(|v| Done::read(&v)),
        Request::TenantSet(a) => {
            off_thread(shared, move |s| route::set(s, &a.tenant, a.route())).await
        }
        Request::TenantGrants(a) => grants::grants(shared, &a.tenant, a.apply).await,
        Request::TenantRemove(a) => off_thread(shared, move |s| route::remove(s, &a.tenant)).await,
        Request::TenantBackup(a) => backup::take(shared, &a).await,
        Request::TenantBackups(a) => backup::list(shared, &a).await,
        Request::TenantRestore(a) => backup::restore(shared, &a).await,
        Request::Backends(_) => Ok(Done::read(&backends::list(shared))),
        Request::Pause(a) => gate::pause(shared, &a.tenant, a.timeout_ms).await,
        Request::Resume(a) => gate::resume(shared, &a.tenant),
        Request::PauseAll(a) => gate::pause_all(shared, a.timeout_ms).await,
        Request::ResumeAll(_) => gate::resume_all(shared),
        Request::TenantKill(a) => gate::kill(shared, &a.tenant),
        Request::Stats(_) => Ok(Done::read(&stats::stats(shared))),
        Request::Reload(_) => off_thread(shared, reload::reload).await,
        Request::Audit(a) => stats::audit(shared, a.tail.get()).map(|v| Done::read(&v)),
        Request::WebhooksLog(a) => Ok(Done::read(&stats::webhooks_log(shared, a.tail.get()))),
        other => migrate::run(shared, other, actor).await,
    }
}
