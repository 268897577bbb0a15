//! `tenant grants T [--apply]`: the SQL that gives the tenant's role exactly its data, run with the backend's
//! admin credentials when applied.

use serde_json::json;

use super::super::code::{AdminCode, AdminError};
use super::super::grant_sql::{plan, GrantError};
use super::super::reply::GrantsView;
use super::Done;
use crate::context::Shared;
use crate::migration::pg::Endpoint;
use crate::migration::MigrateError;
use crate::tenant::TenantId;

pub(super) async fn grants(
    shared: &Shared,
    tenant: &TenantId,
    apply: bool,
) -> Result<Done, AdminError> {
    let route = shared
        .router
        .load()
        .get(tenant.as_str())
        .cloned()
        .ok_or_else(|| AdminError::unknown_tenant(tenant.as_str()))?;
    let backend = shared
        .backends
        .load()
        .get(&route.backend)
        .cloned()
        .ok_or_else(|| AdminError::unknown_backend(&route.backend))?;
    let config = shared.config.load();
    let grants = plan(&config, &backend, tenant, &route).map_err(|e| match e {
        GrantError::Shared(_) => AdminError::invalid_state(e.to_string()),
        _ => AdminError::invalid(e.to_string()),
    })?;
    let sql = grants.sql();
    if apply {
        let side = Endpoint {
            backend: backend.name.clone(),
            config: backend.config.clone(),
            database: grants.database.clone(),
            schema: "public".into(),
            filter: None,
        };
        let failed = |e: MigrateError| AdminError::new(AdminCode::GrantsFailed, e.to_string());
        let client = side.connect().await.map_err(failed)?;
        client
            .batch_execute(&format!("BEGIN;\n{sql}\nCOMMIT;"))
            .await
            .map_err(|e| failed(MigrateError::pg("apply grants", e)))?;
    }
    let after = json!({"role": grants.role, "applied": apply});
    let result = GrantsView {
        tenant: tenant.clone(),
        role: grants.role,
        database: grants.database,
        sql,
        applied: apply,
    };
    Ok(Done::change(&result, serde_json::Value::Null, after))
}
