//! The `migrate.*` operations the admin socket runs: start (with its preflight), status, pause/resume, verify,
//! repair, cutover, rollback, finalize and abort.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_postgres::Client;

use super::capture;
use super::catalog::{self, Table};
use super::coordinator::{self, endpoints, set_state_gauge, stop_tee, transition, Direction, Live};
use super::pg::Endpoint;
use super::record::{CutoverMode, Record, State, VerifyLevel, VerifyReport};
use super::verify::{self, Sides};
use super::{cutover, MigrateError};
use crate::context::Shared;
use crate::quote::quote_ident;
use crate::routing::Route;
use crate::tenant::TenantId;

/// What `migrate start` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartRequest {
    pub tenant: TenantId,
    pub to: String,
    pub database: Option<String>,
    pub schema: Option<String>,
    pub verify: VerifyLevel,
    pub cutover: CutoverMode,
    pub allow_existing: bool,
    /// Shared tables: the tenant column, and the tenant's value in it (default: the tenant's name).
    pub tenant_column: Option<String>,
    pub tenant_key: Option<String>,
}

/// An operation's refusal: a stable code and a message.
#[derive(Debug)]
pub struct OpError {
    pub code: &'static str,
    pub message: String,
}

impl OpError {
    pub(super) fn new(code: &'static str, message: impl Into<String>) -> OpError {
        OpError {
            code,
            message: message.into(),
        }
    }
}

impl From<MigrateError> for OpError {
    fn from(e: MigrateError) -> OpError {
        let code = match &e {
            MigrateError::Refused(_) => "invalid_state",
            MigrateError::Timeout(_) => "timeout",
            MigrateError::State(_) => "state_write_failed",
            _ => "migration_failed",
        };
        OpError::new(code, e.to_string())
    }
}

fn preflight(e: impl std::fmt::Display) -> OpError {
    OpError::new("preflight_failed", e.to_string())
}

pub(super) fn live_of(shared: &Shared, tenant: &str) -> Result<(Record, Arc<Live>), OpError> {
    let rec = shared.migrations.get(tenant).ok_or_else(|| {
        OpError::new(
            "no_migration",
            format!("tenant {tenant:?} has no migration"),
        )
    })?;
    let live = shared.migrations.live(tenant).ok_or_else(|| {
        OpError::new(
            "invalid_state",
            format!(
                "the migration of {tenant:?} has ended ({})",
                rec.state.as_str()
            ),
        )
    })?;
    Ok((rec, live))
}

/// Preflight, then the record in `pending` and the task that drives it.
pub async fn start(shared: &Arc<Shared>, req: StartRequest) -> Result<Value, OpError> {
    let tenant = req.tenant.as_str();
    if let Some(r) = shared
        .migrations
        .get(tenant)
        .filter(|r| !r.state.is_final())
    {
        return Err(OpError::new(
            "invalid_state",
            format!(
                "tenant {tenant:?} already has a migration ({})",
                r.shown_state()
            ),
        ));
    }
    let limit = shared.config.load().migration.max_concurrent;
    if shared.migrations.active_count() >= limit {
        return Err(OpError::new(
            "limit_reached",
            format!("{limit} migrations are running (migration.max_concurrent)"),
        ));
    }
    let rec = plan(shared, &req)?;
    let (source, target) = endpoints(shared, &rec).map_err(preflight)?;
    let (tables, created) = check_sides(shared, &source, &target, req.allow_existing).await?;
    let rec = Record {
        tables: tables.iter().map(|t| t.name.clone()).collect(),
        created_target_schema: created,
        ..rec
    };
    grant_target(shared, &rec, &target).await?;
    shared
        .migrations
        .put(rec.clone())
        .map_err(|e| OpError::new("state_write_failed", e.to_string()))?;
    set_state_gauge(shared, &rec);
    let live = shared.migrations.register_live(tenant);
    *live.tables.lock().unwrap_or_else(|p| p.into_inner()) = tables.clone();
    coordinator::spawn(shared.clone(), live);
    let no_key: Vec<&str> = tables
        .iter()
        .filter(|t| t.key.is_empty())
        .map(|t| t.name.as_str())
        .collect();
    Ok(json!({
        "tenant": tenant,
        "state": "pending",
        "tables": rec.tables,
        "full_row_identity": no_key,
        "created_target_schema": created,
        "source": route_json(&rec.source, &rec.source_database),
        "target": route_json(&rec.target, &rec.target_database),
    }))
}

fn route_json(r: &Route, database: &str) -> Value {
    json!({"backend": r.backend, "database": database, "schema": r.schema})
}

/// The record a start would create, from the tenant's route and the request (no I/O).
fn plan(shared: &Shared, req: &StartRequest) -> Result<Record, OpError> {
    let tenant = req.tenant.as_str();
    let route = shared
        .router
        .load()
        .get(tenant)
        .map(|r| (**r).clone())
        .ok_or_else(|| {
            OpError::new("unknown_tenant", format!("tenant {tenant:?} is not routed"))
        })?;
    // Schema routes move the whole schema; shared tables move the tenant's rows of the tables that have the
    // tenant column (in the route's schema, or public).
    let shared_tables = req.tenant_column.is_some();
    let schema = match (&route.schema, shared_tables) {
        (Some(s), _) => s.clone(),
        (None, true) => "public".to_owned(),
        (None, false) => {
            return Err(preflight(format!(
                "tenant {tenant:?} has no schema in its route; give --tenant-column to migrate its rows of shared tables"
            )))
        }
    };
    let backends = shared.backends.load();
    let src_backend = backends
        .get(&route.backend)
        .ok_or_else(|| preflight(format!("backend {:?} is not configured", route.backend)))?;
    let to = backends.get(&req.to).ok_or_else(|| {
        OpError::new(
            "unknown_backend",
            format!("backend {:?} is not configured", req.to),
        )
    })?;
    let source_database = route
        .database
        .clone()
        .or_else(|| src_backend.config.database.clone())
        .ok_or_else(|| preflight("the tenant's route and backend name no database"))?;
    let target_database = req
        .database
        .clone()
        .or_else(|| to.config.database.clone())
        .unwrap_or_else(|| source_database.clone());
    let target = route.moved(
        &req.to,
        Some(target_database.clone()),
        match (&req.schema, shared_tables) {
            (Some(s), _) => Some(s.clone()),
            // Shared tables: the same kind of route on the target (schema or none).
            (None, true) => route.schema.clone(),
            (None, false) => Some(schema.clone()),
        },
    );
    if target.backend == route.backend && target_database == source_database {
        // Capture objects are per database: source and target in one database would share them.
        return Err(OpError::new(
            "invalid_argument",
            "the target must be another database or server than the source",
        ));
    }
    let now = crate::state::audit::rfc3339_now();
    Ok(Record {
        tenant: tenant.to_owned(),
        state: State::Pending,
        paused: false,
        failed_in: None,
        source: route,
        target,
        schema,
        tenant_column: req.tenant_column.clone(),
        tenant_key: req.tenant_key.clone(),
        source_database,
        target_database,
        verify: req.verify,
        cutover: req.cutover,
        created_target_schema: false,
        tables: Vec::new(),
        copied: Default::default(),
        rows_total: 0,
        rows_copied: 0,
        last_pause_ms: None,
        cutover_attempts: 0,
        last_cutover_error: None,
        verification: None,
        last_error: None,
        started_at: now.clone(),
        updated_at: now,
    })
}

/// Checks both sides; creates the target schema from the source's definition when it is missing. Returns the
/// tables and whether the schema was created.
async fn check_sides(
    shared: &Shared,
    source: &Endpoint,
    target: &Endpoint,
    allow_existing: bool,
) -> Result<(Vec<Table>, bool), OpError> {
    let src = source.connect().await.map_err(preflight)?;
    superuser(&src, &source.backend).await?;
    if !catalog::schema_exists(&src, &source.schema)
        .await
        .map_err(preflight)?
    {
        return Err(preflight(format!(
            "schema {:?} does not exist on the source",
            source.schema
        )));
    }
    let mut tables = catalog::tables(&src, &source.schema)
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
    let dst = target.connect().await.map_err(preflight)?;
    superuser(&dst, &target.backend).await?;
    let mut created = false;
    if !catalog::schema_exists(&dst, &target.schema)
        .await
        .map_err(preflight)?
    {
        if target.schema != source.schema || target.filter.is_some() {
            return Err(preflight(format!(
                "target schema {:?} does not exist; create it with the tables' definitions first",
                target.schema
            )));
        }
        create_schema(shared, source, &dst).await?;
        created = true;
    }
    let theirs = catalog::tables(&dst, &target.schema)
        .await
        .map_err(preflight)?;
    for t in &tables {
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
    // Leftovers of an earlier migration of this tenant (abort removes them; a crash may not have).
    Ok((tables, created))
}

/// With role isolation on the target, the tenant's role and grants are made there before anything is copied,
/// so the tenant's sessions can use the target the moment the route swaps.
async fn grant_target(shared: &Shared, rec: &Record, target: &Endpoint) -> Result<(), OpError> {
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
    let plan = match crate::admin::grants::plan(&config, &backend, &tenant, &route) {
        Ok(p) => p,
        Err(crate::admin::grants::GrantError::Shared(_)) => return Ok(()),
        Err(e) => return Err(preflight(e)),
    };
    let client = target.connect().await.map_err(preflight)?;
    client
        .batch_execute(&format!("BEGIN;\n{}\nCOMMIT;", plan.sql()))
        .await
        .map_err(|e| preflight(MigrateError::pg("grant the tenant's role on the target", e)))
}

async fn superuser(c: &Client, backend: &str) -> Result<(), OpError> {
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

/// `pg_dump --schema-only` of the tenant's schema on the source, run on the target in one transaction.
async fn create_schema(shared: &Shared, source: &Endpoint, dst: &Client) -> Result<(), OpError> {
    let pg_dump = shared.config.load().migration.pg_dump.clone();
    let mut cmd = tokio::process::Command::new(&pg_dump);
    cmd.arg("--schema-only")
        .arg("--no-owner")
        .arg("--no-privileges")
        .arg(format!("--schema={}", source.schema))
        .arg(format!("--host={}", source.config.host))
        .arg(format!("--port={}", source.config.port))
        .arg(format!("--username={}", source.config.admin_user()))
        .arg(format!("--dbname={}", source.database))
        .env("PGPASSWORD", source.config.admin_password())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .map_err(|_| preflight("pg_dump --schema-only took over 120 s"))?
        .map_err(|e| {
            preflight(format!(
                "the target schema is missing and {pg_dump:?} could not run ({e}); install pg_dump, set migration.pg_dump, or create the schema on the target first"
            ))
        })?;
    if !out.status.success() {
        return Err(preflight(format!(
            "pg_dump --schema-only failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    // psql meta-commands (\restrict in newer dumps) are not SQL.
    let sql: String = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('\\'))
        .collect::<Vec<_>>()
        .join("\n");
    let wrapped = format!("BEGIN;\n{sql}\nCOMMIT;");
    if let Err(e) = dst.batch_execute(&wrapped).await {
        let _ = dst.batch_execute("ROLLBACK").await;
        return Err(preflight(MigrateError::pg(
            "create the target schema from pg_dump",
            e,
        )));
    }
    // pg_dump's script empties search_path for the session; put ours back.
    let _ = dst.batch_execute("RESET search_path").await;
    Ok(())
}

/// `migrate status [T]`.
pub fn status(shared: &Shared, tenant: Option<&str>) -> Result<Value, OpError> {
    match tenant {
        Some(t) => {
            let rec = shared.migrations.get(t).ok_or_else(|| {
                OpError::new("no_migration", format!("tenant {t:?} has no migration"))
            })?;
            Ok(status_json(shared, &rec))
        }
        None => {
            let all: Vec<Value> = shared
                .migrations
                .all()
                .iter()
                .map(|r| status_json(shared, r))
                .collect();
            Ok(json!({"migrations": all}))
        }
    }
}

fn status_json(shared: &Shared, rec: &Record) -> Value {
    let live = shared.migrations.live(&rec.tenant);
    let partial = live
        .as_ref()
        .map_or(0, |l| l.partial_rows.load(Ordering::Relaxed));
    let tee = live.as_ref().and_then(|l| l.tee());
    let in_flight = if rec.state == State::BulkCopy {
        partial
    } else {
        0
    };
    let rows_copied = rec.rows_copied + in_flight;
    let progress = rec.progress_percent(in_flight);
    json!({
        "tenant": rec.tenant,
        "state": rec.shown_state(),
        "phase": rec.state.as_str(),
        "paused": rec.paused,
        "failed_in": rec.failed_in.map(State::as_str),
        "source": route_json(&rec.source, &rec.source_database),
        "target": route_json(&rec.target, &rec.target_database),
        "progress_percent": (progress * 10.0).round() / 10.0,
        "rows_copied": rows_copied,
        "rows_total": rec.rows_total,
        "tables": rec.tables,
        "tables_copied": rec.copied.len(),
        "lag_events": tee.as_ref().map_or(0, |(_, t)| t.lag()),
        "tee": tee.as_ref().map(|(d, t)| json!({
            "direction": if *d == Direction::Forward { "source_to_target" } else { "target_to_source" },
            "mode": shared.config.load().migration.tee,
            "last_error": t.last_error(),
        })),
        "last_pause_ms": rec.last_pause_ms,
        "cutover_attempts": rec.cutover_attempts,
        "last_cutover_error": rec.last_cutover_error,
        "cutover": rec.cutover,
        "verify_level": rec.verify,
        "verification": rec.verification,
        "last_error": rec.last_error,
        "started_at": rec.started_at,
        "updated_at": rec.updated_at,
    })
}

/// `migrate pause T` / `migrate resume T`: hold or restart copy and tee work (not the tenant's traffic). Resume
/// of a `failed` migration retries from the state it failed in.
pub fn set_paused(shared: &Shared, tenant: &str, paused: bool) -> Result<Value, OpError> {
    let (rec, live) = live_of(shared, tenant)?;
    if rec.state == State::Failed && !paused {
        let from = rec.failed_in.unwrap_or(State::Pending);
        transition(shared, tenant, from, |r| {
            r.failed_in = None;
            r.paused = false;
        })?;
        return Ok(json!({"tenant": tenant, "state": from.as_str(), "retried": true}));
    }
    if !matches!(
        rec.state,
        State::Pending | State::BulkCopy | State::DualWrite | State::Migrated
    ) {
        return Err(OpError::new(
            "invalid_state",
            format!(
                "cannot pause or resume a migration in {}",
                rec.shown_state()
            ),
        ));
    }
    let rec = shared.migrations.update(tenant, |r| r.paused = paused)?;
    if let Some((_, t)) = live.tee() {
        t.set_paused(paused);
    }
    set_state_gauge(shared, &rec);
    Ok(json!({"tenant": tenant, "state": rec.shown_state(), "paused": paused}))
}

/// Runs a verification at `level` now and records it. Waits for `live.lock`.
pub async fn verify_now(
    shared: &Arc<Shared>,
    live: &Arc<Live>,
    level: VerifyLevel,
) -> Result<VerifyReport, MigrateError> {
    let _one = live.lock.lock().await;
    verify_locked(shared, live, level).await
}

/// Verification with `live.lock` held by the caller.
pub async fn verify_locked(
    shared: &Arc<Shared>,
    live: &Arc<Live>,
    level: VerifyLevel,
) -> Result<VerifyReport, MigrateError> {
    let rec = shared
        .migrations
        .get(&live.tenant)
        .ok_or(MigrateError::Cancelled)?;
    if matches!(rec.state, State::DualWrite | State::Migrated) && !rec.paused {
        coordinator::ensure_tee(shared, live, &rec).await?;
    }
    let (tee_dir, tee) = live.tee().ok_or_else(|| {
        MigrateError::Refused(format!(
            "verification needs dual_write or migrated; the migration is {}",
            rec.shown_state()
        ))
    })?;
    let (source, target) = endpoints(shared, &rec)?;
    // After cutover the target is authoritative: compare it against the (frozen) source.
    let (a, b) = match tee_dir {
        Direction::Forward => (&source, &target),
        Direction::Reverse => (&target, &source),
    };
    let tables = live.tables();
    let sides = Sides {
        tenant: &rec.tenant,
        source: a,
        target: b,
        tables: &tables,
        chunk_rows: shared.config.load().migration.verify_chunk_rows,
    };
    let started = Instant::now();
    let (src, dst) = {
        let mut guard = tee.hold(Instant::now() + Duration::from_secs(60)).await?;
        let link = guard.as_mut().ok_or(MigrateError::Cancelled)?;
        verify::aligned(&sides, link).await?
    };
    let report = verify::compare(&sides, &src, &dst, level).await?;
    let m = &shared.metrics;
    let l = vec![metrics::Label::new("tenant", rec.tenant.clone())];
    m.histogram("verification_duration_seconds", l.clone())
        .record(started.elapsed().as_secs_f64());
    m.counter("verification_violations_total", l)
        .increment(report.violations.len() as u64);
    let report2 = report.clone();
    shared
        .migrations
        .update(&rec.tenant, |r| r.verification = Some(report2))?;
    Ok(report)
}

/// `migrate verify T [--level L]`.
pub async fn verify_cmd(
    shared: &Arc<Shared>,
    tenant: &str,
    level: Option<VerifyLevel>,
) -> Result<Value, OpError> {
    let (rec, live) = live_of(shared, tenant)?;
    let report = verify_now(shared, &live, level.unwrap_or(rec.verify)).await?;
    Ok(serde_json::to_value(report).unwrap_or(Value::Null))
}

/// `migrate cutover T`: verification at the migration's level must pass first (run now if it has not).
pub async fn cutover_cmd(shared: &Arc<Shared>, tenant: &str) -> Result<Value, OpError> {
    let (rec, live) = live_of(shared, tenant)?;
    if rec.state != State::DualWrite || rec.paused {
        return Err(OpError::new(
            "invalid_state",
            format!(
                "cutover needs state dual_write (not paused); the migration is {}",
                rec.shown_state()
            ),
        ));
    }
    let _one = live.lock.lock().await;
    coordinator::ensure_tee(shared, &live, &rec).await?;
    let passed = rec
        .verification
        .as_ref()
        .is_some_and(|v| v.passed && v.level.is_some_and(|l| l >= rec.verify));
    if !passed {
        let report = verify_locked(shared, &live, rec.verify).await?;
        if !report.passed {
            return Err(OpError::new(
                "verification_failed",
                format!(
                    "verification ({:?}) found {} mismatch(es): {}",
                    rec.verify,
                    report.violations.len(),
                    report
                        .violations
                        .iter()
                        .take(5)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            ));
        }
    }
    cutover::cutover(shared, &live).await.map_err(|e| {
        let mut err = OpError::from(e);
        if err.code == "migration_failed" || err.code == "timeout" {
            err.code = "cutover_failed";
        }
        err
    })
}

/// `migrate rollback T`.
pub async fn rollback_cmd(shared: &Arc<Shared>, tenant: &str) -> Result<Value, OpError> {
    let (rec, live) = live_of(shared, tenant)?;
    let _one = live.lock.lock().await;
    if rec.state == State::Migrated {
        coordinator::ensure_tee(shared, &live, &rec).await?;
    }
    Ok(cutover::rollback(shared, &live).await?)
}

/// `migrate finalize T [--drop-source]`.
pub async fn finalize(
    shared: &Arc<Shared>,
    tenant: &str,
    drop_source: bool,
) -> Result<Value, OpError> {
    let (rec, live) = live_of(shared, tenant)?;
    if rec.state != State::Migrated {
        return Err(OpError::new(
            "invalid_state",
            format!(
                "finalize needs state migrated; the migration is {}",
                rec.shown_state()
            ),
        ));
    }
    // The task first (it may be waiting for the lock), then the lock.
    if !on_route(shared, &rec.target, tenant) {
        return Err(OpError::new(
            "invalid_state",
            "the tenant's route is not the target's (a rollback did not finish); run migrate rollback again",
        ));
    }
    live.halt().await;
    let _one = live.lock.lock().await;
    if let Some((_, tee)) = live.tee() {
        // The source gets every change made so far, so it is a consistent (frozen) copy when capture goes.
        tee.drain_to_empty(Instant::now() + Duration::from_secs(30))
            .await?;
    }
    stop_tee(shared, &live).await;
    let (source, target) = endpoints(shared, &rec)?;
    let (src, dst) = (source.connect().await?, target.connect().await?);
    capture::remove(&dst, tenant).await?;
    // On the source the fence stays as long as the data does.
    capture::remove(&src, tenant).await?;
    if drop_source {
        src.batch_execute(&drop_tenant_sql(&source, &rec.tables))
            .await
            .map_err(|e| MigrateError::pg("drop the tenant's data on the source", e))?;
        capture::remove_fence(&src, tenant).await?;
    }
    transition(shared, tenant, State::Completed, |_| {})?;
    shared.migrations.forget_live(tenant);
    Ok(json!({"tenant": tenant, "state": "completed", "source_dropped": drop_source}))
}

/// `migrate abort T [--drop-target]`: from any state before the swap, back to how the source was.
pub async fn abort(
    shared: &Arc<Shared>,
    tenant: &str,
    drop_target: bool,
) -> Result<Value, OpError> {
    let rec = shared.migrations.get(tenant).ok_or_else(|| {
        OpError::new(
            "no_migration",
            format!("tenant {tenant:?} has no migration"),
        )
    })?;
    if !rec.state.before_swap() {
        return Err(OpError::new(
            "invalid_state",
            format!(
                "abort works before cutover; the migration is {} (use rollback)",
                rec.shown_state()
            ),
        ));
    }
    let live = shared.migrations.live(tenant);
    let _one = match &live {
        Some(l) => {
            l.halt().await;
            Some(l.lock.lock().await)
        }
        None => None,
    };
    // A cutover that held the lock may have swapped the route meanwhile: then it is too late to abort.
    let rec = shared.migrations.get(tenant).unwrap_or(rec);
    if !rec.state.before_swap() || on_route(shared, &rec.target, tenant) {
        if let Some(l) = &live {
            respawn(shared, l);
        }
        return Err(OpError::new(
            "invalid_state",
            format!(
                "the migration reached {} while abort waited; use rollback",
                rec.shown_state()
            ),
        ));
    }
    if let Some(l) = &live {
        stop_tee(shared, l).await;
    }
    // From here on cutover must not trust an earlier verification: capture is going away.
    shared
        .migrations
        .update(tenant, |r| r.verification = None)?;
    let (source, target) = endpoints(shared, &rec)?;
    // The source must end clean; if it cannot be reached the abort fails (the migration goes on) and can be
    // repeated.
    let cleaned = match source.connect().await {
        Ok(c) => capture::remove(&c, tenant).await,
        Err(e) => Err(e),
    };
    if let Err(e) = cleaned {
        if let Some(l) = &live {
            respawn(shared, l);
        }
        return Err(e.into());
    }
    // The target's leftovers (ledger rows, copied data) are cleaned best-effort: a dead target is a common reason
    // to abort, and its leftovers are removed by name at the next migration of this tenant.
    let target_cleanup = abort_target(&target, &rec, tenant, drop_target).await;
    transition(shared, tenant, State::RolledBack, |r| r.paused = false)?;
    shared.migrations.forget_live(tenant);
    let (left, error) = match target_cleanup {
        Ok(left) => (Some(left), None),
        Err(e) => (None, Some(e.to_string())),
    };
    Ok(json!({
        "tenant": tenant,
        "state": "rolled_back",
        "target_rows_left": left,
        "target_dropped": drop_target && error.is_none(),
        "target_cleanup_error": error,
    }))
}

/// Removes the migration's objects from the target and, with `drop_target`, the copied data. Returns the rows
/// left on the target.
async fn abort_target(
    target: &Endpoint,
    rec: &Record,
    tenant: &str,
    drop_target: bool,
) -> Result<u64, MigrateError> {
    let dst = target.connect().await?;
    capture::remove(&dst, tenant).await?;
    if !drop_target {
        return Ok(target_rows(&dst, target, &rec.tables).await);
    }
    let sql = if rec.created_target_schema {
        format!("DROP SCHEMA {} CASCADE", quote_ident(&target.schema))
    } else if target.filter.is_some() {
        drop_tenant_sql(target, &rec.tables)
    } else {
        let list: Vec<String> = rec.tables.iter().map(|t| target.qualified(t)).collect();
        format!("TRUNCATE {}", list.join(", "))
    };
    dst.batch_execute(&sql)
        .await
        .map_err(|e| MigrateError::pg("drop the target copy", e))?;
    Ok(0)
}

/// Deletes the tenant's data on `side`: its schema, or for shared tables its rows (in one transaction, foreign
/// keys not checked: every table of the tenant loses the tenant's rows together).
fn drop_tenant_sql(side: &Endpoint, tables: &[String]) -> String {
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

/// A fresh task for a migration whose task was halted (its token is cancelled for good), taking over the tee.
fn respawn(shared: &Arc<Shared>, old: &Live) {
    let fresh = shared.migrations.register_live(&old.tenant);
    *fresh.tables.lock().unwrap_or_else(|p| p.into_inner()) = old.tables();
    *fresh.tee.lock().unwrap_or_else(|p| p.into_inner()) =
        old.tee.lock().unwrap_or_else(|p| p.into_inner()).take();
    coordinator::spawn(shared.clone(), fresh);
}

/// The tenant's current route is `route`.
fn on_route(shared: &Shared, route: &Route, tenant: &str) -> bool {
    shared
        .router
        .load()
        .get(tenant)
        .is_some_and(|r| **r == *route)
}

async fn target_rows(dst: &Client, target: &Endpoint, tables: &[String]) -> u64 {
    let mut n = 0;
    for t in tables {
        if let Ok(r) = dst
            .query_one(&format!("SELECT count(*) FROM {} x", target.rows(t)), &[])
            .await
        {
            n += r.get::<_, i64>(0).max(0) as u64;
        }
    }
    n
}

/// `migrate repair T`: re-copies the key ranges the last verification found different, under the tee's drain
/// lock and in one source snapshot (so the ranges end exactly as the source had them), then verifies again.
pub async fn repair(shared: &Arc<Shared>, tenant: &str) -> Result<Value, OpError> {
    let (rec, live) = live_of(shared, tenant)?;
    if rec.state != State::DualWrite {
        return Err(OpError::new(
            "invalid_state",
            format!(
                "repair needs dual_write; the migration is {}",
                rec.shown_state()
            ),
        ));
    }
    let ranges = rec
        .verification
        .as_ref()
        .map(|v| v.ranges.clone())
        .unwrap_or_default();
    if ranges.is_empty() {
        return Err(OpError::new(
            "invalid_state",
            "the last verification found nothing to repair (run migrate verify --level hash)",
        ));
    }
    let _one = live.lock.lock().await;
    let (source, target) = endpoints(shared, &rec)?;
    let tables = live.tables();
    let (_, tee) = live
        .tee()
        .ok_or_else(|| OpError::new("invalid_state", "the tee is not running"))?;
    let sides = Sides {
        tenant,
        source: &source,
        target: &target,
        tables: &tables,
        chunk_rows: 1,
    };
    let mut repaired = 0u64;
    {
        let mut guard = tee.hold(Instant::now() + Duration::from_secs(60)).await?;
        let link = guard.as_mut().ok_or(MigrateError::Cancelled)?;
        let (src, _dst) = verify::aligned(&sides, link).await?;
        for range in &ranges {
            let Some(t) = range
                .get("table")
                .and_then(Value::as_str)
                .and_then(|n| tables.iter().find(|t| t.name == n))
            else {
                continue;
            };
            repaired += repair_range(&src, &mut link.to, &source, &target, t, range).await?;
        }
    }
    let report = verify_locked(shared, &live, VerifyLevel::Hash).await?;
    Ok(
        json!({"tenant": tenant, "ranges": ranges.len(), "rows_copied": repaired, "verification": report}),
    )
}

async fn repair_range(
    src: &Client,
    dst: &mut Client,
    source: &Endpoint,
    target: &Endpoint,
    t: &Table,
    range: &Value,
) -> Result<u64, MigrateError> {
    let cols: Vec<String> = t.columns.iter().map(|c| quote_ident(c)).collect();
    let list = cols.join(", ");
    let tx = dst
        .transaction()
        .await
        .map_err(|e| MigrateError::pg("begin repair", e))?;
    tx.batch_execute(&format!(
        "SET LOCAL session_replication_role = replica; DELETE FROM {} x {}{}",
        target.qualified(&t.name),
        verify::range_filter(target, t, range),
        target.tenant_and("x")
    ))
    .await
    .map_err(|e| MigrateError::pg("clear range", e))?;
    let rows = src
        .query(
            &format!(
                "SELECT to_jsonb(x)::text FROM {} x {}",
                source.rows(&t.name),
                verify::range_filter(source, t, range)
            ),
            &[],
        )
        .await
        .map_err(|e| MigrateError::pg("read range", e))?;
    let q = target.qualified(&t.name);
    let insert = format!(
        "INSERT INTO {q} ({list}) OVERRIDING SYSTEM VALUE SELECT {list} FROM jsonb_populate_record(NULL::{q}, $1::text::jsonb)"
    );
    let stmt = tx
        .prepare(&insert)
        .await
        .map_err(|e| MigrateError::pg("prepare repair", e))?;
    for r in &rows {
        let v: String = r.get(0);
        tx.execute(&stmt, &[&v])
            .await
            .map_err(|e| MigrateError::pg("copy range", e))?;
    }
    tx.commit()
        .await
        .map_err(|e| MigrateError::pg("commit repair", e))?;
    Ok(rows.len() as u64)
}
