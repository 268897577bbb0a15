//! The `migrate.*` commands: dispatch to the migration operations, with the state before and after for the
//! audit log.

use std::sync::Arc;

use serde_json::{json, Value};

use super::super::code::AdminError;
use super::super::request::Request;
use super::{to_json, Done};
use crate::context::Shared;
use crate::migration::{ddl, ops};

fn state_of(shared: &Shared, req: &Request) -> Value {
    req.tenant()
        .and_then(|t| shared.migrations.get(t.as_str()))
        .map(|r| json!({"state": r.shown_state()}))
        .unwrap_or(Value::Null)
}

pub(super) async fn run(
    shared: &Arc<Shared>,
    req: Request,
    actor: &str,
) -> Result<Done, AdminError> {
    let before = state_of(shared, &req);
    let result = match &req {
        Request::MigrateStart(a) if a.at.is_some() => {
            to_json(&ops::enqueue(shared, a.clone(), actor)?)
        }
        Request::MigrateQueue(_) => to_json(&ops::queue(shared)),
        Request::MigrateCancel(a) => to_json(&ops::cancel(shared, &a.tenant)?),
        Request::MigrateStart(a) => to_json(&ops::start(shared, a.clone(), actor).await?),
        Request::MigrateStatus(a) => match &a.tenant {
            Some(t) => to_json(&ops::status_of(shared, t)?),
            None => to_json(&ops::status_all(shared)),
        },
        Request::MigrateHistory(a) => to_json(&ops::history(shared, a)?),
        Request::MigrateEstimate(a) => to_json(&ops::estimate(shared, a.clone()).await?),
        Request::MigrateCutover(a) => to_json(&ops::cutover_cmd(shared, &a.tenant).await?),
        Request::MigrateAbort(a) => to_json(&ops::abort(shared, &a.tenant, a.drop_target).await?),
        Request::MigratePause(a) => to_json(&ops::set_paused(shared, &a.tenant, true)?),
        Request::MigrateResume(a) => to_json(&ops::set_paused(shared, &a.tenant, false)?),
        Request::MigrateVerify(a) => to_json(&ops::verify_cmd(shared, &a.tenant, a.level).await?),
        Request::MigrateRepair(a) => to_json(&ops::repair(shared, &a.tenant).await?),
        Request::MigrateDdl(a) => to_json(&ddl::ddl(shared, &a.tenant, &a.sql).await?),
        Request::MigrateRollback(a) => to_json(&ops::rollback_cmd(shared, &a.tenant).await?),
        Request::MigrateFinalize(a) => {
            let after = match &a.drop_source_after {
                None => None,
                Some(s) => Some(crate::migration::clock::span(s).ok_or_else(|| {
                    AdminError::invalid(format!(
                        "drop_source_after: {s:?} is not a span such as 30d, 12h, 30m or 45s"
                    ))
                })?),
            };
            to_json(&ops::finalize(shared, &a.tenant, a.drop_source, after).await?)
        }
        Request::MigrateDrops(_) => to_json(&ops::drops(shared)),
        Request::MigrateCancelDrop(a) => to_json(&ops::cancel_drop(shared, &a.tenant)?),
        other => {
            return Err(AdminError::invalid(format!(
                "{} is not a migration command",
                other.command()
            )))
        }
    };
    let after = state_of(shared, &req);
    Ok(Done {
        result,
        before,
        after,
    })
}
