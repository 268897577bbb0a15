//! `migrate finalize --drop-source-after SPAN`, `migrate drops`, `migrate cancel-drop`, and the scheduler step
//! that drops due sources. A due drop never destroys data a tenant is using: it waits while the tenant has a
//! migration running, and is cancelled (and audited) if the tenant's route points at that place again.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::admin::code::{AdminCode, AdminError};
use crate::context::Shared;
use crate::migration::drops::{due, SourceDrop};
use crate::migration::pg::Endpoint;
use crate::migration::record::{now_ms, Record};
use crate::migration::{capture, MigrateError};
use crate::quote::quote_ident;
use crate::tenant::TenantId;

/// The drop of `rec`'s source, `after_s` seconds from now.
pub(super) fn plan(rec: &Record, source: &Endpoint, after_s: u64) -> SourceDrop {
    let due_unix = now_ms() / 1000 + after_s;
    SourceDrop {
        tenant: rec.tenant.clone(),
        backend: source.backend.clone(),
        database: source.database.clone(),
        schema: source.schema.clone(),
        tenant_column: source.filter.as_ref().map(|f| f.column.clone()),
        tenant_key: source.filter.as_ref().map(|f| f.key.clone()),
        tables: rec.tables.clone(),
        due_unix,
        due: crate::state::audit::rfc3339_of(due_unix),
        scheduled_at: crate::state::audit::rfc3339_now(),
        attempts: 0,
        last_error: None,
        next_try_unix: 0,
    }
}

/// `migrate drops`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DropList {
    /// Soonest first.
    pub drops: Vec<SourceDrop>,
}

pub fn drops(shared: &Shared) -> DropList {
    DropList {
        drops: shared.migrations.drops.list(),
    }
}

/// `migrate cancel-drop T`: the source's copy stays for good (drop it by hand when wanted).
pub fn cancel_drop(shared: &Shared, tenant: &TenantId) -> Result<DropList, AdminError> {
    let cancelled = shared
        .migrations
        .drops
        .cancel(tenant)
        .map_err(AdminError::state_write)?;
    if cancelled.is_empty() {
        return Err(AdminError::new(
            AdminCode::InvalidState,
            format!("tenant {tenant} has no scheduled source drop"),
        ));
    }
    Ok(DropList { drops: cancelled })
}

/// Runs the due drops (called by the scheduler once a second).
pub async fn run_due(shared: &Arc<Shared>) {
    let now = now_ms() / 1000;
    for d in due(&shared.migrations.drops.list(), now) {
        let busy = shared
            .migrations
            .get(d.tenant.as_str())
            .is_some_and(|r| !r.state.is_final());
        if busy {
            continue;
        }
        let outcome = match lives_there(shared, &d) {
            true => Err(Outcome::Cancelled),
            false => drop_now(shared, &d).await.map_err(Outcome::Failed),
        };
        settle(shared, &d, outcome, now);
    }
}

enum Outcome {
    Cancelled,
    Failed(MigrateError),
}

/// The tenant's route points at the place the drop would empty.
fn lives_there(shared: &Shared, d: &SourceDrop) -> bool {
    shared
        .router
        .load()
        .get(d.tenant.as_str())
        .is_some_and(|r| {
            let database = r.database.clone().or_else(|| {
                shared
                    .backends
                    .load()
                    .get(&r.backend)
                    .and_then(|b| b.config.database.clone())
            });
            r.backend == d.backend
                && database.as_deref() == Some(d.database.as_str())
                && r.schema.as_deref().unwrap_or("public") == d.schema
        })
}

async fn drop_now(shared: &Shared, d: &SourceDrop) -> Result<(), MigrateError> {
    let backend = shared
        .backends
        .load()
        .get(&d.backend)
        .cloned()
        .ok_or_else(|| {
            MigrateError::Refused(format!("backend {} is no longer configured", d.backend))
        })?;
    let side = Endpoint {
        backend: d.backend.clone(),
        config: backend.config.clone(),
        database: d.database.clone(),
        schema: d.schema.clone(),
        filter: d
            .tenant_column
            .as_ref()
            .map(|column| crate::migration::pg::Filter {
                column: column.clone(),
                key: d.tenant_key.clone().unwrap_or_else(|| d.tenant.to_string()),
            }),
    };
    let src = side.connect().await?;
    src.batch_execute(&drop_tenant_sql(&side, &d.tables))
        .await
        .map_err(|e| MigrateError::pg("drop the tenant's data on the source", e))?;
    capture::remove_fence(&src, &d.tenant).await
}

fn settle(shared: &Shared, d: &SourceDrop, outcome: Result<(), Outcome>, now: u64) {
    let tenant = d.tenant.as_str();
    let result = match &outcome {
        Ok(()) => "ok".to_string(),
        Err(Outcome::Cancelled) => "cancelled: the tenant's route points there again".to_string(),
        Err(Outcome::Failed(e)) => format!("error: {e}"),
    };
    let kept = match outcome {
        Err(Outcome::Failed(e)) => shared.migrations.drops.failed(d, e.to_string(), now),
        _ => shared.migrations.drops.remove(d),
    };
    if let Err(e) = kept {
        tracing::warn!(%tenant, error = %e, "could not update the scheduled source drops");
    }
    tracing::info!(%tenant, backend = %d.backend, schema = %d.schema, %result, "scheduled source drop");
    let place =
        json!({"backend": d.backend.to_string(), "database": d.database, "schema": d.schema});
    if let Err(e) = shared.audit.append(
        "scheduler",
        "migrate.drop_source",
        Some(tenant),
        place,
        serde_json::Value::Null,
        &result,
    ) {
        shared
            .audit_ok
            .store(false, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(%tenant, error = %e, "audit write failed for a source drop");
    }
}

/// The SQL that removes the tenant's data from `side`: its schema, or its rows of the shared tables.
pub(super) fn drop_tenant_sql(side: &Endpoint, tables: &[String]) -> String {
    if side.filter.is_none() {
        return format!("DROP SCHEMA {} CASCADE", quote_ident(&side.schema));
    }
    let mut sql = String::from("BEGIN; SET LOCAL session_replication_role = replica;");
    for t in tables {
        sql.push_str(&format!(
            " DELETE FROM {}{};",
            side.qualified(t),
            side.tenant_where()
        ));
    }
    sql.push_str(" COMMIT;");
    sql
}
