//! `migrate ddl T --sql "..."`: a schema change during a move, approved by an operator and applied on both
//! sides in order. The tenant's DDL is refused while capture is on (a column added on one side only would make
//! the copy and the tee diverge), so an application that must deploy a change mid-move asks for it here:
//!
//! 1. the tenant's gate closes and its open transactions finish (bounded by `cutover_timeout_ms`);
//! 2. the tee drains the change log to empty, so both sides hold the same rows;
//! 3. the statement runs on the authoritative side (the source before cutover, the target after), then on the
//!    other, each in a transaction, with the tenant's schema as `search_path`, as the migration's own
//!    connection (which the DDL guard lets through);
//! 4. the table list is read again (capture goes on new tables of the schema) and the tee restarts with the
//!    new columns;
//! 5. the gate opens.
//!
//! If the second side refuses a statement the first accepted, the migration is paused (its tee holds) and the
//! answer says exactly what happened, for an operator to put right.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ops::reply::DdlApplied;

use super::capture;
use super::pg::Endpoint;
use super::record::State;
use super::sides::{endpoints, ensure_tee, load_tables, stop_tee};
use super::MigrateError;
use crate::admin::code::{AdminCode, AdminError};
use crate::context::Shared;
use crate::quote::quote_ident;
use crate::tenant::TenantId;

/// Longest DDL text accepted.
pub const MAX_DDL_BYTES: usize = 64 * 1024;

/// Runs `sql` on both sides of `tenant`'s migration.
pub async fn ddl(
    shared: &Arc<Shared>,
    tenant: &TenantId,
    sql: &str,
) -> Result<DdlApplied, AdminError> {
    let (rec, live) = super::ops::live_of(shared, tenant)?;
    if !matches!(rec.state, State::DualWrite | State::Migrated) {
        return Err(AdminError::new(AdminCode::InvalidState,
            format!(
                "migrate ddl needs dual_write or migrated; the migration is {} (before that, abort and start again after the change)",
                rec.shown_state()
            ),
        ));
    }
    let _one = live.lock.lock().await;
    let tee = ensure_tee(shared, &live, &rec).await?;
    let gate = shared.gates.get(tenant);
    if gate.is_closed() {
        return Err(AdminError::new(
            AdminCode::InvalidState,
            format!("tenant {tenant:?} is paused by an operator; resume it first"),
        ));
    }
    let timeout = Duration::from_millis(shared.config.load().migration.cutover_timeout_ms);
    let closed_at = Instant::now();
    gate.close();
    let result = async {
        if !gate.wait_drained(timeout).await {
            return Err(MigrateError::Timeout(format!(
                "{} transaction(s) of the tenant still open",
                gate.active()
            )));
        }
        tee.drain_to_empty(Instant::now() + timeout).await?;
        let (source, target) = endpoints(shared, &rec)?;
        let (first, second) = match rec.state {
            State::Migrated => (target, source),
            _ => (source, target),
        };
        apply_both(&first, &second, sql).await
    }
    .await;
    let held_ms = closed_at.elapsed().as_secs_f64() * 1000.0;
    let outcome = match result {
        Ok(()) => refresh(shared, &live, tenant)
            .await
            .map(|tables| DdlApplied {
                tenant: tenant.clone(),
                applied: vec!["source".into(), "target".into()],
                held_ms,
                tables,
            }),
        Err(e) => Err(e),
    };
    gate.open();
    if let Err(MigrateError::Refused(_)) = &outcome {
        // The sides differ now: nothing more is applied until an operator has looked.
        super::ops::set_paused(shared, tenant, true)?;
    }
    outcome.map_err(|e| match e {
        MigrateError::Refused(m) => AdminError::new(AdminCode::DdlPartial, m),
        MigrateError::Timeout(m) => AdminError::new(AdminCode::Timeout, m),
        other => AdminError::from(other),
    })
}

/// The statement on `first`, then on `second`; a refusal on `second` after `first` committed pauses the
/// migration (returned as `Refused` with the details).
async fn apply_both(first: &Endpoint, second: &Endpoint, sql: &str) -> Result<(), MigrateError> {
    let wrap = |side: &Endpoint| {
        format!(
            "BEGIN; SET LOCAL search_path = {}; {sql}\n; COMMIT;",
            quote_ident(&side.schema)
        )
    };
    let a = first.connect().await?;
    let b = second.connect().await?;
    if let Err(e) = a.batch_execute(&wrap(first)).await {
        let _ = a.batch_execute("ROLLBACK").await;
        return Err(MigrateError::pg(
            &format!("the statement on {} (nothing was changed)", first.backend),
            e,
        ));
    }
    if let Err(e) = b.batch_execute(&wrap(second)).await {
        let _ = b.batch_execute("ROLLBACK").await;
        return Err(MigrateError::Refused(format!(
            "the statement ran on {} but {} refused it ({}); the migration's tee is paused: make the two sides \
             alike by hand, then `migrate resume`",
            first.backend,
            second.backend,
            MigrateError::pg("", e)
        )));
    }
    Ok(())
}

/// After the change: the tables read again, capture on any new table of the schema, the tee restarted with
/// the new definitions. Returns the tables.
async fn refresh(
    shared: &Arc<Shared>,
    live: &Arc<super::registry::Live>,
    tenant: &str,
) -> Result<Vec<String>, MigrateError> {
    let rec = shared
        .migrations
        .get(tenant)
        .ok_or(MigrateError::Cancelled)?;
    let (source, target) = endpoints(shared, &rec)?;
    let authoritative = if rec.state == State::Migrated {
        &target
    } else {
        &source
    };
    let client = authoritative.connect().await?;
    let mut names: Vec<String> = super::catalog::tables(&client, &authoritative.schema)
        .await?
        .into_iter()
        .filter(|t| {
            authoritative
                .filter
                .as_ref()
                .is_none_or(|f| t.columns.contains(&f.column))
        })
        .map(|t| t.name)
        .collect();
    names.sort();
    if names != rec.tables {
        capture::install(&client, authoritative, tenant, &names, &live.stop).await?;
        if rec.state == State::Migrated {
            // The old side needs the fence on its new tables too.
            let old = source.connect().await?;
            capture::install(&old, &source, tenant, &names, &live.stop).await?;
        }
        shared
            .migrations
            .update(tenant, |r| r.tables = names.clone())?;
    }
    let rec = shared
        .migrations
        .get(tenant)
        .ok_or(MigrateError::Cancelled)?;
    load_tables(shared, live, &rec).await?;
    stop_tee(shared, live).await;
    ensure_tee(shared, live, &rec).await?;
    Ok(names)
}
