//! One applying link per tenant and target: the link's "to" connection holds a session advisory lock for as
//! long as it lives, and takes it before the link reads anything.
//!
//! Why: exactly-once rests on the ledger, and ledger rows are trimmed once their entries left the source's
//! log. A link that read entries, then stalled (a frozen coordinator thawing after another instance took the
//! migration over, a pass that timed out with its statement still on the wire), would apply them after the
//! next link had applied, confirmed and trimmed them: the ledger no longer knows those ids, so an old row image
//! would be written over newer ones. With the claim, a new link ends the old link's "to" session before it
//! takes the lock: whatever that session committed is visible to the new link's reads, and nothing it sends
//! afterwards reaches the target.
//!
//! With a control plane, a claim also carries the generation of the coordinator's lease on the move (each
//! takeover by another instance draws a higher one, see `cluster::leases`), recorded per lock in
//! `pgtenant.claim_generation` on the backend. A claim older than the one recorded is refused before it ends
//! anyone: a coordinator that thawed after its move was taken over cannot take the backend back from the taker,
//! however its own lease check went. Its sessions were ended by the taker's claim; it can only fail. (Equal
//! generations pass: they are the same coordinator's.)

use tokio_postgres::Client;
use tracing::warn;

use super::MigrateError;

/// The lock's key: a 64-bit hash of the tenant and the schema written into (advisory locks are per database;
/// a move and its rollback link write into different schemas or databases).
fn key_text(tenant: &str, schema: &str) -> String {
    format!("pgtenant apply {tenant} into {schema}")
}

const TRY: &str = "SELECT pg_try_advisory_lock(hashtextextended($1, 0))";

/// Ends the sessions of earlier links that hold the lock (in either mode); returns how many hold it and how many
/// were ended. Only the migration's own sessions (by their `application_name`, see `pg::Endpoint::connect`) are
/// ended: an application's lock that happens to share the hash is waited for instead, up to `lock_timeout`. A holder this
/// role may not signal (a superuser's session, another role's without `pg_signal_backend`) is counted, not
/// asked, as `pg_terminate_backend` would raise an error. A bigint key shows in `pg_locks` as its high half in
/// `classid`, its low half in `objid`, and `objsubid` 1.
const END_HOLDERS: &str = "SELECT count(*), count(*) FILTER (WHERE ended) FROM ( \
     SELECT CASE WHEN (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) \
                   OR (NOT coalesce((SELECT rolsuper FROM pg_roles r WHERE r.oid = a.usesysid), true) \
                       AND (pg_has_role(a.usesysid, 'MEMBER') OR pg_has_role('pg_signal_backend', 'MEMBER'))) \
            THEN pg_terminate_backend(l.pid) ELSE false END AS ended \
     FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.pid <> pg_backend_pid() \
     AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
     AND l.classid::bigint = (hashtextextended($1, 0) >> 32) & 4294967295 \
     AND l.objid::bigint = hashtextextended($1, 0) & 4294967295 \
     AND a.application_name = 'pgtenant-migration') h";

/// Waits for the lock; bounded by the session's `lock_timeout`, and an ended session releases it as it exits.
const WAIT: &str = "SELECT pg_advisory_lock(hashtextextended($1, 0))";

/// Takes the apply lock for `tenant` into `schema` on `to`, ending an earlier link's session that holds it.
pub async fn claim(
    to: &Client,
    tenant: &str,
    schema: &str,
    generation: Option<i64>,
) -> Result<(), MigrateError> {
    take(to, &key_text(tenant, schema), tenant, "apply", generation).await
}

/// The table of claims' generations, made here only where an older build set the migration's schema up
/// without it (`capture::setup` makes it).
const GENERATIONS: &str = "CREATE TABLE IF NOT EXISTS pgtenant.claim_generation ( \
     lock text PRIMARY KEY, generation bigint NOT NULL)";

/// The newest generation that claimed the lock here.
const NEWEST: &str = "SELECT generation FROM pgtenant.claim_generation WHERE lock = $1";

/// Records the claim's generation unless a newer one is recorded (no row: refused).
const RECORD_GENERATION: &str =
    "INSERT INTO pgtenant.claim_generation (lock, generation) VALUES ($1, $2) \
     ON CONFLICT (lock) DO UPDATE SET generation = excluded.generation \
     WHERE pgtenant.claim_generation.generation <= excluded.generation RETURNING 1";

const UNLOCK: &str = "SELECT pg_advisory_unlock(hashtextextended($1, 0))";

/// Takes the lock of `key` (a text hashed to the lock's 64-bit key) exclusively on `to`, ending the migration
/// sessions that hold it, shared or exclusive (see [`END_HOLDERS`]). `what` names the lock in messages. With a
/// `generation` (a control plane's lease), the claim is fenced by it (see the module's note): refused at once
/// when a newer generation is recorded, and, after the lock is taken, recorded unless a newer one was recorded
/// meanwhile, in which case the lock is let go and the claim refused. Each statement commits on its own, so a
/// claimer that freezes holds no row another claimer would wait for; one that records its generation while this
/// claim takes the lock then ends this session with its own claim.
pub async fn take(
    to: &Client,
    key: &str,
    tenant: &str,
    what: &str,
    generation: Option<i64>,
) -> Result<(), MigrateError> {
    let Some(generation) = generation else {
        return take_lock(to, key, tenant, what).await;
    };
    let newest = match to.query_opt(NEWEST, &[&key]).await {
        Ok(row) => row.map(|r| r.get::<_, i64>(0)),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
            to.batch_execute(GENERATIONS)
                .await
                .map_err(|e| MigrateError::pg("set up the claims' generations", e))?;
            None
        }
        Err(e) => {
            return Err(MigrateError::pg(
                &format!("read the {what} claim's generation"),
                e,
            ))
        }
    };
    if newest.is_some_and(|n| n > generation) {
        return Err(newer_claim(tenant, what, generation));
    }
    take_lock(to, key, tenant, what).await?;
    let recorded = to
        .query_opt(RECORD_GENERATION, &[&key, &generation])
        .await
        .map_err(|e| MigrateError::pg(&format!("record the {what} claim's generation"), e))?;
    if recorded.is_none() {
        to.execute(UNLOCK, &[&key])
            .await
            .map_err(|e| MigrateError::pg(&format!("let the {what} lock go"), e))?;
        return Err(newer_claim(tenant, what, generation));
    }
    Ok(())
}

fn newer_claim(tenant: &str, what: &str, generation: i64) -> MigrateError {
    MigrateError::Refused(format!(
        "tenant {tenant:?}'s {what} lock was claimed by a newer coordinator of the move than this one (lease \
         generation {generation}): another instance took the move over; this one stops"
    ))
}

/// The lock itself: tried, else its migration holders ended and waited for.
async fn take_lock(to: &Client, key: &str, tenant: &str, what: &str) -> Result<(), MigrateError> {
    let took: bool = to
        .query_one(TRY, &[&key])
        .await
        .map_err(|e| MigrateError::pg(&format!("take the {what} lock"), e))?
        .get(0);
    if took {
        return Ok(());
    }
    let row = to
        .query_one(END_HOLDERS, &[&key])
        .await
        .map_err(|e| MigrateError::pg(&format!("end the earlier {what} sessions"), e))?;
    let (holders, ended): (i64, i64) = (row.get(0), row.get(1));
    if ended < holders {
        return Err(MigrateError::Refused(format!(
            "tenant {tenant:?}'s {what} lock on the target is held by a migration session this role may not end \
             (another role's, or a superuser's); end it (pg_terminate_backend), or use the same admin_user on \
             every instance"
        )));
    }
    warn!(
        tenant,
        what, ended, "an earlier coordinator's sessions held the lock; they were ended"
    );
    to.query_one(WAIT, &[&key])
        .await
        .map_err(|e| MigrateError::pg(&format!("wait for the {what} lock"), e))?;
    Ok(())
}
