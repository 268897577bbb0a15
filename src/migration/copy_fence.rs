//! One copying coordinator per tenant and target: a bulk copy's target sessions are fenced, as the applying
//! link is by [`super::claim`].
//!
//! Why: a coordinator that froze in the middle of a copy (a stopped VM, a long pause) while another instance
//! took the move over would, on thawing, go on writing the target: commit a table's copy made in its older
//! snapshot over the taker's (the tee's later changes to it lost), or next to it (rows twice). Its lease is seen
//! lost only at its next renewal, and its streams are already past that check.
//!
//! How: each run of the copy records itself as the target's copier (`pgtenant.copy_run`), after ending the
//! sessions of any earlier run. Those are found by a lock: every copy session holds the copy lock shared for
//! as long as it lives, and a new run takes it exclusively to record itself (ending the holders first, as a new
//! link does). Every copy transaction on the target starts by reading the recorded run with `FOR SHARE` and
//! fails unless it is its own: a session of an earlier run that connects after the takeover cannot write, and a
//! transaction that read its run before the takeover holds the row, so the new run's record waits for it to end.

use tokio_postgres::{Client, Transaction};

use super::pg::Endpoint;
use super::MigrateError;
use crate::cluster::leases::LeaseClock;

/// The copy lock's key text (hashed to 64 bits, as the apply lock's).
fn key_text(tenant: &str, schema: &str) -> String {
    format!("pgtenant copy {tenant} into {schema}")
}

const RECORD: &str = "INSERT INTO pgtenant.copy_run (tenant, dest, run) VALUES ($1, $2, $3) \
     ON CONFLICT (tenant, dest) DO UPDATE SET run = excluded.run";
const UNLOCK: &str = "SELECT pg_advisory_unlock(hashtextextended($1, 0))";
/// Bounded by the session's `lock_timeout`, as the exclusive lock is held only while a run records itself.
const JOIN: &str = "SELECT pg_advisory_lock_shared(hashtextextended($1, 0))";
const CHECK: &str = "SELECT run FROM pgtenant.copy_run WHERE tenant = $1 AND dest = $2 FOR SHARE";

/// This run of the copy of one tenant into one target schema.
#[derive(Debug)]
pub struct CopyRun {
    tenant: String,
    dest: String,
    run: String,
}

impl CopyRun {
    /// Takes the target's copy over for a new run: ends an earlier run's sessions, records this run. With a
    /// control plane, only while this instance's lease is confirmed, checked just before the takeover.
    pub async fn begin(
        target: &Endpoint,
        tenant: &str,
        lease: Option<&LeaseClock>,
    ) -> Result<CopyRun, MigrateError> {
        let me = CopyRun {
            tenant: tenant.to_owned(),
            dest: target.schema.clone(),
            run: format!("{:016x}", rand::random::<u64>()),
        };
        let owner = target.connect().await?;
        // The table, where an older build set up this target.
        super::capture::setup(&owner).await?;
        let key = key_text(&me.tenant, &me.dest);
        let generation = match lease.map(|l| l.held(tenant)) {
            Some(None) => return Err(super::tee::lease_unconfirmed()),
            Some(held) => held,
            None => None,
        };
        super::claim::take(&owner, &key, tenant, "copy", generation).await?;
        owner
            .execute(RECORD, &[&me.tenant, &me.dest, &me.run])
            .await
            .map_err(|e| MigrateError::pg("record the copy run", e))?;
        owner
            .execute(UNLOCK, &[&key])
            .await
            .map_err(|e| MigrateError::pg("release the copy lock", e))?;
        Ok(me)
    }

    /// Makes `target` one of this run's sessions: it holds the copy lock shared, so a later run finds and ends it.
    pub async fn join(&self, target: &Client) -> Result<(), MigrateError> {
        target
            .execute(JOIN, &[&key_text(&self.tenant, &self.dest)])
            .await
            .map_err(|e| MigrateError::pg("take the copy lock", e))?;
        Ok(())
    }

    /// The first statement of each copy transaction on the target: fails unless this run is still the copier.
    pub async fn check(&self, tx: &Transaction<'_>) -> Result<(), MigrateError> {
        let row = tx
            .query_opt(CHECK, &[&self.tenant, &self.dest])
            .await
            .map_err(|e| MigrateError::pg("read the copy run", e))?;
        match row.map(|r| r.get::<_, String>(0)) {
            Some(run) if run == self.run => Ok(()),
            _ => Err(MigrateError::Refused(format!(
                "tenant {:?}'s copy into {:?} was taken over by another run (another coordinator took the \
                 move over); this run stops",
                self.tenant, self.dest
            ))),
        }
    }
}
