//! `migrate start`: the plan, the preflight (both sides checked, the target schema made from the source's
//! definition when missing, the tenant's role granted on the target), and the record that starts the driver.

use std::sync::Arc;

use tokio_postgres::Client;

use crate::admin::code::{AdminCode, AdminError};
use crate::routing::Route;

use super::preflight;
use super::reply::{Place, Started};
use super::request::StartRequest;
use crate::context::Shared;
use crate::migration::catalog::{self, Table};
use crate::migration::driver;
use crate::migration::machine::set_state_gauge;
use crate::migration::pg::Endpoint;
use crate::migration::record::{Record, State};
use crate::migration::registry::Starting;
use crate::migration::sides::endpoints;
use crate::migration::MigrateError;
use crate::tenant::TenantId;

/// Preflight, then the record in `pending` and the task that drives it.
/// `migrate start` on behalf of `actor` (kept in the record for the history).
pub async fn start(
    shared: &Arc<Shared>,
    req: StartRequest,
    actor: &str,
) -> Result<Started, AdminError> {
    let tenant = req.tenant.as_str();
    if let Some(r) = shared
        .migrations
        .get(tenant)
        .filter(|r| !r.state.is_final())
    {
        return Err(AdminError::new(
            AdminCode::InvalidState,
            format!(
                "tenant {tenant:?} already has a migration ({})",
                r.shown_state()
            ),
        ));
    }
    let limit = shared.config.load().migration.max_concurrent;
    if shared.migrations.active_count() >= limit {
        return Err(AdminError::new(
            AdminCode::LimitReached,
            format!("{limit} migrations are running (migration.max_concurrent)"),
        ));
    }
    let rec = plan(shared, &req)?;
    // Until its driver runs, the lease loop must not take this move for one to resume.
    let starting = shared
        .migrations
        .starting(&rec)
        .map_err(|e| AdminError::new(AdminCode::InvalidState, e))?;
    // From here a route change of the tenant is refused; one made since the plan read the route would leave
    // the move copying from where the tenant no longer lives.
    let now = shared.router.load().get(tenant).map(|r| (**r).clone());
    if now.as_ref() != Some(&rec.source) {
        return Err(AdminError::new(
            AdminCode::InvalidState,
            format!(
                "the route of tenant {tenant:?} changed while the move was planned; start it again"
            ),
        ));
    }
    if let Err(e) = lease(shared, &rec).await {
        // The lease may be in the store all the same (a renewal of the starting move, an answer lost).
        unlease(shared, &req.tenant).await;
        return Err(e);
    }
    let started = begin(shared, &req, rec, actor, &starting).await;
    if started.is_err() {
        // A lease left in the store for a move that never started would be taken over and driven elsewhere.
        unlease(shared, &req.tenant).await;
    }
    started
}

/// The start's checks and side preparation under its lease, then the record and its driver.
async fn begin(
    shared: &Arc<Shared>,
    req: &StartRequest,
    rec: Record,
    actor: &str,
    starting: &Starting<'_>,
) -> Result<Started, AdminError> {
    let (source, target) = endpoints(shared, &rec).map_err(preflight)?;
    let backup_file = match req.backup {
        true => Some(
            crate::backup::take::take(shared, &req.tenant, None)
                .await
                .map_err(|e| preflight(format!("the backup before the move failed: {e}")))?
                .file,
        ),
        false => None,
    };
    let (tables, created) = check_sides(shared, &source, &target, req.allow_existing).await?;
    let model = crate::migration::history::copy_model(
        &shared.migrations.history.read().unwrap_or_default(),
    );
    let rec = Record {
        tables: tables.iter().map(|t| t.name.clone()).collect(),
        created_target_schema: created,
        post_data_pending: created,
        started_by: Some(actor.to_owned()),
        backup_file: backup_file.clone(),
        // What the copy is expected to take, for the history's estimate error.
        expected_copy_rows_per_s: Some(model.rows_per_s),
        expected_copy_per_table_s: Some(model.per_table_s),
        ..rec
    };
    // A schema the move makes gets its grants once its post-data (policies among it) is there, after the copy.
    if !created {
        grant_target(shared, &rec, &target).await?;
    }
    // A route change whose check passed just before this start registered may have published since.
    if shared.router.load().get(req.tenant.as_str()).map(|r| &**r) != Some(&rec.source) {
        return Err(AdminError::new(
            AdminCode::InvalidState,
            format!(
                "the route of tenant {:?} changed while the move started; start it again",
                req.tenant.as_str()
            ),
        ));
    }
    // The lease again, now with the whole record: an instance taking the move over from here reads this one.
    starting.set(&rec);
    lease(shared, &rec).await?;
    shared
        .migrations
        .put(rec.clone())
        .map_err(|e| AdminError::new(AdminCode::StateWriteFailed, e.to_string()))?;
    set_state_gauge(shared, &rec);
    crate::migration::events::started(shared, &rec);
    let live = shared.migrations.register_live(&req.tenant);
    *live.tables.lock().unwrap_or_else(|p| p.into_inner()) = tables.clone();
    driver::spawn(shared.clone(), live);
    Ok(Started {
        tenant: req.tenant.clone(),
        state: State::Pending.as_str().to_owned(),
        full_row_identity: tables
            .iter()
            .filter(|t| t.key.is_empty())
            .map(|t| t.name.clone())
            .collect(),
        created_target_schema: created,
        source: Place::source(&rec),
        target: Place::target(&rec),
        tables: rec.tables,
        backup: backup_file,
    })
}

/// The record a start would create, from the tenant's route and the request (no I/O).
pub(super) fn plan(shared: &Shared, req: &StartRequest) -> Result<Record, AdminError> {
    let route = shared
        .router
        .load()
        .get(req.tenant.as_str())
        .map(|r| (**r).clone())
        .ok_or_else(|| AdminError::unknown_tenant(&req.tenant))?;
    let (tenant_column, tenant_key) = rows_of(&route, req)?;
    // Schema routes move the whole schema; shared tables move the tenant's rows of the tables that have the
    // tenant column (in the route's schema, or public).
    let shared_tables = tenant_column.is_some();
    let schema = match (&route.schema, shared_tables) {
        (Some(s), _) => s.clone(),
        (None, true) => "public".to_owned(),
        (None, false) => {
            return Err(preflight(format!(
                "tenant {:?} has no schema in its route; to move its rows of shared tables, give its route a tenant column (tenant set --tenant-column)",
                req.tenant
            )))
        }
    };
    let (source_database, target_database) = databases(shared, &route, req)?;
    let target_schema = match (&req.schema, shared_tables) {
        (Some(s), _) => Some(String::from(s.clone())),
        // Shared tables: the same kind of route on the target (schema or none).
        (None, true) => route.schema.clone(),
        (None, false) => Some(schema.clone()),
    };
    let target = route.moved(&req.to, Some(target_database.clone()), target_schema);
    if target.backend == route.backend && target_database == source_database {
        // Capture objects are per database: source and target in one database would share them.
        return Err(AdminError::invalid(
            "the target must be another database or server than the source",
        ));
    }
    if !shared_tables {
        refuse_taken_place(shared, req, &target, &target_database)?;
    }
    Ok(Record {
        cutover_window: req.cutover_window.clone(),
        tenant_column,
        tenant_key,
        verify: req.verify,
        cutover: req.cutover,
        ..Record::pending(
            req.tenant.clone(),
            (route, source_database),
            (target, target_database),
            schema,
        )
    })
}

/// The tenant column and key a move of shared-table rows uses: the route's. A request may repeat them, not
/// change them: the column left out would move (then fence, and at `finalize --drop-source` drop) the whole
/// shared schema with every tenant's rows, another key another tenant's rows, and a column on a route without
/// one a part of what the route says is the tenant's alone.
fn rows_of(
    route: &Route,
    req: &StartRequest,
) -> Result<(Option<String>, Option<String>), AdminError> {
    let asked_column = req.tenant_column.clone().map(String::from);
    let asked_key = req.tenant_key.clone().map(String::from);
    let Some(column) = &route.tenant_column else {
        return match &asked_column {
            Some(asked) => Err(preflight(format!(
                "tenant {:?}'s route has no tenant column; set it on the route (tenant set --tenant-column {asked}) \
                 before moving its rows of shared tables",
                req.tenant
            ))),
            None => Ok((None, None)),
        };
    };
    let key = route
        .tenant_key
        .clone()
        .unwrap_or_else(|| req.tenant.to_string());
    if asked_column.as_ref().is_some_and(|c| c != column) {
        return Err(preflight(format!(
            "tenant {:?}'s route tells its rows apart by column {column:?}; a move cannot use another",
            req.tenant
        )));
    }
    if asked_key.as_ref().is_some_and(|k| *k != key) {
        return Err(preflight(format!(
            "tenant {:?}'s route has tenant key {key:?}; a move cannot take another key's rows",
            req.tenant
        )));
    }
    Ok((Some(column.clone()), route.tenant_key.clone()))
}

/// A whole-schema move may not land in a place another tenant's route uses (same backend, database and
/// schema; a route without a schema uses `public`): it would copy into, and an abort would empty, that
/// tenant's tables. (Two moves started at once into one empty place are not caught here.)
fn refuse_taken_place(
    shared: &Shared,
    req: &StartRequest,
    target: &Route,
    target_database: &str,
) -> Result<(), AdminError> {
    let backends = shared.backends.load();
    let database_of = |r: &Route| {
        r.database.clone().or_else(|| {
            backends
                .get(&r.backend)
                .and_then(|b| b.config.database.clone())
        })
    };
    let router = shared.router.load();
    let taken = router.iter().find(|(name, r)| {
        name.as_str() != req.tenant.as_str()
            && r.backend == target.backend
            && r.schema.as_deref().unwrap_or("public")
                == target.schema.as_deref().unwrap_or("public")
            && database_of(r).as_deref() == Some(target_database)
    });
    match taken {
        Some((other, _)) => Err(preflight(format!(
            "the target ({}, database {target_database:?}, schema {:?}) is tenant {other:?}'s",
            target.backend,
            target.schema.as_deref().unwrap_or("")
        ))),
        None => Ok(()),
    }
}

/// The source's database (the route's, else its backend's) and the target's (the request's, else the target
/// backend's, else the source's name).
fn databases(
    shared: &Shared,
    route: &Route,
    req: &StartRequest,
) -> Result<(String, String), AdminError> {
    let backends = shared.backends.load();
    let src_backend = backends
        .get(&route.backend)
        .ok_or_else(|| preflight(format!("backend {:?} is not configured", route.backend)))?;
    let to = backends
        .get(&req.to)
        .ok_or_else(|| AdminError::unknown_backend(&req.to))?;
    let source_database = route
        .database
        .clone()
        .or_else(|| src_backend.config.database.clone())
        .ok_or_else(|| preflight("the tenant's route and backend name no database"))?;
    let target_database = req
        .database
        .clone()
        .map(String::from)
        .or_else(|| to.config.database.clone())
        .unwrap_or_else(|| source_database.clone());
    Ok((source_database, target_database))
}

/// Checks both sides; creates the target schema from the source's definition when it is missing. Returns the
/// tables and whether the schema was created.
async fn check_sides(
    shared: &Shared,
    source: &Endpoint,
    target: &Endpoint,
    allow_existing: bool,
) -> Result<(Vec<Table>, bool), AdminError> {
    let src = source.connect().await.map_err(preflight)?;
    superuser(&src, &source.backend).await?;
    let tables = source_tables(&src, source).await?;
    let dst = target.connect().await.map_err(preflight)?;
    superuser(&dst, &target.backend).await?;
    let create = check_target(&dst, source, target, &tables, allow_existing).await?;
    if create {
        create_schema(shared, source, &dst).await?;
        check_target_tables(&dst, target, &tables, allow_existing).await?;
    }
    Ok((tables, create))
}

/// The target's checks: its schema exists and holds every table, with the same columns and (unless
/// `allow_existing`) without the tenant's rows; or it is missing and can be made from the source's definition
/// (then true: `start` makes it, `estimate` only says so).
pub(super) async fn check_target(
    dst: &Client,
    source: &Endpoint,
    target: &Endpoint,
    tables: &[Table],
    allow_existing: bool,
) -> Result<bool, AdminError> {
    if catalog::schema_exists(dst, &target.schema)
        .await
        .map_err(preflight)?
    {
        check_target_tables(dst, target, tables, allow_existing).await?;
        return Ok(false);
    }
    if target.schema != source.schema || target.filter.is_some() {
        return Err(preflight(format!(
            "target schema {:?} does not exist; create it with the tables' definitions first",
            target.schema
        )));
    }
    Ok(true)
}

/// The tables that migrate: the schema's, or for shared tables those with the tenant column.
pub(super) async fn source_tables(
    src: &Client,
    source: &Endpoint,
) -> Result<Vec<Table>, AdminError> {
    if !catalog::schema_exists(src, &source.schema)
        .await
        .map_err(preflight)?
    {
        return Err(preflight(format!(
            "schema {:?} does not exist on the source",
            source.schema
        )));
    }
    let mut tables = catalog::tables(src, &source.schema)
        .await
        .map_err(preflight)?;
    if let Some(f) = &source.filter {
        tables.retain(|t| t.columns.contains(&f.column));
    }
    if tables.is_empty() {
        return Err(preflight(match &source.filter {
            None => format!("schema {:?} has no tables to migrate", source.schema),
            Some(f) => format!(
                "no table in schema {:?} has the tenant column {:?}",
                source.schema, f.column
            ),
        }));
    }
    let names: Vec<String> = tables.iter().map(|t| t.name.clone()).collect();
    let references = catalog::large_object_columns(src, &source.schema, &names)
        .await
        .map_err(preflight)?;
    if !references.is_empty() {
        return Err(preflight(format!(
            "column(s) {} hold large object references (oid or lo): a move copies and captures table rows, \
             not the large objects they point at; store the data in bytea or move the tenant another way",
            references.join(", ")
        )));
    }
    Ok(tables)
}

/// Every table exists on the target with the same columns and, unless `allow_existing`, without the tenant's
/// rows.
async fn check_target_tables(
    dst: &Client,
    target: &Endpoint,
    tables: &[Table],
    allow_existing: bool,
) -> Result<(), AdminError> {
    let theirs = catalog::tables(dst, &target.schema)
        .await
        .map_err(preflight)?;
    for t in tables {
        let Some(other) = theirs.iter().find(|o| o.name == t.name) else {
            return Err(preflight(format!(
                "table {:?} is missing on the target",
                t.name
            )));
        };
        if other.columns != t.columns {
            return Err(preflight(format!(
                "table {:?} has columns {:?} on the source but {:?} on the target",
                t.name, t.columns, other.columns
            )));
        }
        let rows = dst
            .query_one(
                &format!("SELECT count(*) FROM {} x", target.rows(&t.name)),
                &[],
            )
            .await
            .map_err(|e| preflight(MigrateError::pg("count target rows", e)))?
            .get::<_, i64>(0);
        if rows > 0 && !allow_existing {
            return Err(preflight(format!(
                "table {:?} already holds {rows} rows on the target (--allow-existing replaces them)",
                t.name
            )));
        }
    }
    Ok(())
}

/// With role isolation on the target, the tenant's role and grants are made there before the swap (at start, or
/// for a schema the move makes, once its post-data is there after the copy), so the tenant's sessions can use
/// the target the moment the route swaps.
pub(crate) async fn grant_target(
    shared: &Shared,
    rec: &Record,
    target: &Endpoint,
) -> Result<(), AdminError> {
    let Some(backend) = shared.backends.load().get(&rec.target.backend).cloned() else {
        return Err(preflight(format!(
            "backend {:?} is not configured",
            rec.target.backend
        )));
    };
    let tenant = TenantId::parse(&rec.tenant).map_err(preflight)?;
    let config = shared.config.load();
    let mut route = rec.target.clone();
    route.database = Some(rec.target_database.clone());
    let plan = match crate::admin::grant_sql::plan(&config, &backend, &tenant, &route) {
        Ok(p) => p,
        Err(crate::admin::grant_sql::GrantError::Shared(_)) => return Ok(()),
        Err(e) => return Err(preflight(e)),
    };
    let client = target.connect().await.map_err(preflight)?;
    client
        .batch_execute(&format!("BEGIN;\n{}\nCOMMIT;", plan.sql()))
        .await
        .map_err(|e| preflight(MigrateError::pg("grant the tenant's role on the target", e)))
}

pub(super) async fn superuser(c: &Client, backend: &str) -> Result<(), AdminError> {
    let row = c
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(|e| preflight(MigrateError::pg("check role", e)))?;
    if !row.get::<_, bool>(0) {
        return Err(preflight(format!(
            "backend {backend:?}: migrations connect as the backend's admin_user (default: user), which must be a superuser to install capture triggers and event triggers; serving connections never need one"
        )));
    }
    Ok(())
}

/// `pg_dump --schema-only --section=pre-data` of the tenant's schema on the source (its tables without
/// indexes, constraints and triggers, which the copy's end makes: see [`crate::migration::post_data`]),
/// run on the target in one transaction.
async fn create_schema(shared: &Shared, source: &Endpoint, dst: &Client) -> Result<(), AdminError> {
    let pg_dump = shared.config.load().migration.pg_dump.clone();
    let (pre, post) = crate::migration::post_data::dump(&pg_dump, source)
        .await
        .map_err(|e| {
            preflight(format!(
                "the target schema is missing and could not be made: {e}"
            ))
        })?;
    crate::migration::post_data::create(dst, &pre, &post)
        .await
        .map_err(preflight)?;
    // pg_dump's script empties search_path for the session; put ours back.
    let _ = dst.batch_execute("RESET search_path").await;
    Ok(())
}

/// With a control plane, the new migration's lease, taken before anything of it is done (see
/// [`crate::cluster::ControlPlane::lease_new`]): a move another instance coordinates, or one the store cannot be
/// told about, is refused.
async fn lease(shared: &Shared, rec: &Record) -> Result<(), AdminError> {
    let Some(cp) = shared.control_plane.get() else {
        return Ok(());
    };
    match cp.lease_new(rec).await {
        Ok(true) => Ok(()),
        Err(crate::cluster::store::StoreError::Conflict(why)) => {
            Err(AdminError::new(AdminCode::InvalidState, why))
        }
        Ok(false) => Err(AdminError::new(
            AdminCode::InvalidState,
            format!(
                "tenant {:?} has a migration coordinated by another instance",
                rec.tenant.as_str()
            ),
        )),
        Err(e) => Err(preflight(format!(
            "the control plane did not take the migration's lease ({e}); with a control plane, a move starts \
             only once every instance can see who coordinates it"
        ))),
    }
}

/// Removes the lease [`lease`] took, for a start that failed after it.
async fn unlease(shared: &Shared, tenant: &TenantId) {
    let Some(cp) = shared.control_plane.get() else {
        return;
    };
    if let Err(e) = cp.unlease(tenant).await {
        tracing::warn!(%tenant, error = %e, "the lease of a move that did not start could not be removed");
    }
}
