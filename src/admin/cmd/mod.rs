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
    if !req.mutates() {
        return run(shared, req, actor, &mut None).await.map(|d| d.result);
    }
    // A change runs to its end in a task of its own: a requester that goes away (an HTTP client disconnecting
    // drops its handler's future) must not stop it halfway, between a tenant's gate closing and opening, or
    // between a route change and its audit line.
    let (shared, actor) = (shared.clone(), actor.to_owned());
    let task = async move { change(&shared, req, &actor).await };
    tokio::spawn(tracing::Instrument::in_current_span(task))
        .await
        .map_err(|e| AdminError::state_write(format!("the command's task failed: {e}")))?
}

/// A mutating command, then its audit line.
async fn change(shared: &Arc<Shared>, req: Request, actor: &str) -> Result<Value, AdminError> {
    // Route changes (and reload) run one at a time, with their audit entry written before the next starts, so
    // the log's order is the epochs' order and `removed` is never changed by two writers.
    let _serial = if req.changes_routes() {
        Some(shared.admin_lock.lock().await)
    } else {
        None
    };
    let mut line = Some(AuditLine {
        actor: actor.to_owned(),
        command: req.command(),
        tenant: req.tenant().map(|t| t.to_string()),
    });
    let outcome = run(shared, req, actor, &mut line).await;
    // A command run by `off_thread` wrote its line there already.
    let Some(line) = line else {
        return outcome.map(|d| d.result);
    };
    // The line's fdatasync runs off the threads that serve clients.
    let s = shared.clone();
    let (written, outcome) =
        match tokio::task::spawn_blocking(move || (line.write(&s, &outcome), outcome)).await {
            Ok(done) => done,
            Err(e) => {
                shared.audit_ok.store(false, Ordering::Relaxed);
                return Err(AdminError::new(
                    AdminCode::AuditWriteFailed,
                    format!("the command ran but its audit line's thread failed: {e}"),
                ));
            }
        };
    written?;
    outcome.map(|d| d.result)
}

/// What the audit log records about a mutating command, besides its outcome.
#[derive(Clone)]
struct AuditLine {
    actor: String,
    command: &'static str,
    tenant: Option<String>,
}

impl AuditLine {
    /// Appends the line for `outcome` (an fdatasync: call it off the serving threads).
    fn write(&self, shared: &Shared, outcome: &Result<Done, AdminError>) -> Result<(), AdminError> {
        let (before, after, result) = match outcome {
            Ok(d) => (d.before.clone(), d.after.clone(), "ok".to_string()),
            Err(e) => (Value::Null, Value::Null, format!("error: {}", e.code)),
        };
        let tenant = self.tenant.as_deref();
        if let Err(e) =
            shared
                .audit
                .append(&self.actor, self.command, tenant, before, after, &result)
        {
            shared.audit_ok.store(false, Ordering::Relaxed);
            return Err(AdminError::new(
                AdminCode::AuditWriteFailed,
                format!(
                    "the command ran ({result}) but could not be written to the audit log: {e}"
                ),
            ));
        }
        Ok(())
    }
}

/// Runs a command that writes the state directory (an fsync) on a blocking thread, not on one that serves
/// clients, and its audit line after it on the same thread (one hand-over instead of two). When the thread
/// fails, `line` is left for the caller to write.
async fn off_thread(
    shared: &Arc<Shared>,
    line: &mut Option<AuditLine>,
    command: impl FnOnce(&Arc<Shared>) -> Result<Done, AdminError> + Send + 'static,
) -> Result<Done, AdminError> {
    let (s, audit, span) = (shared.clone(), line.clone(), tracing::Span::current());
    let ran = tokio::task::spawn_blocking(move || {
        span.in_scope(|| {
            let outcome = command(&s);
            match &audit {
                Some(audit) => audit.write(&s, &outcome).and(outcome),
                None => outcome,
            }
        })
    })
    .await
    .map_err(|e| AdminError::state_write(format!("the command's thread failed: {e}")))?;
    *line = None;
    ran
}

async fn run(
    shared: &Arc<Shared>,
    req: Request,
    actor: &str,
    line: &mut Option<AuditLine>,
) -> Result<Done, AdminError> {
    match req {
        Request::Tenants(_) => Ok(Done::read(&tenants::list(shared))),
        Request::Clients(_) => Ok(Done::read(&tenants::clients(shared))),
        Request::Instances(_) => crate::cluster::instances(shared)
            .await
            .map(|v| Done::read(&v))
            .map_err(|e| AdminError::new(AdminCode::StateReadFailed, e.to_string())),
        Request::TenantGet(a) => tenants::get(shared, &a.tenant).map(|v| Done::read(&v)),
        Request::TenantSet(a) => {
            off_thread(shared, line, move |s| route::set(s, &a.tenant, a.route())).await
        }
        Request::TenantGrants(a) => grants::grants(shared, &a.tenant, a.apply).await,
        Request::TenantRemove(a) => {
            off_thread(shared, line, move |s| route::remove(s, &a.tenant)).await
        }
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
        Request::Reload(_) => off_thread(shared, line, reload::reload).await,
        // Off the runtime: it reads and verifies the whole chain, and any viewer may ask.
        Request::Audit(a) => {
            let tail = a.tail.get();
            off_thread(shared, line, move |s| {
                stats::audit(s, tail).map(|v| Done::read(&v))
            })
            .await
        }
        Request::WebhooksLog(a) => Ok(Done::read(&stats::webhooks_log(shared, a.tail.get()))),
        other => migrate::run(shared, other, actor).await,
    }
}
