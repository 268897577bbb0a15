//! The control-plane store on PostgreSQL (`control_plane = "postgres://..."`): route changes as an append-only
//! log with one global epoch, and instance membership. Every write is one transaction; a route change takes an
//! advisory lock so epochs are gap-free and in commit order, and announces itself with `NOTIFY`. The schema is
//! created and upgraded by the proxy (`pgtenant_cp.meta.schema_version`).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio_postgres::{Client, NoTls, Transaction};

use crate::routing::Route;
use crate::tenant::TenantId;

/// The channel route changes are announced on.
pub const CHANNEL: &str = "pgtenant_routes";
/// The schema version this build writes.
const VERSION: i32 = 1;
/// `pg_advisory_xact_lock` key of route writes (and schema creation).
const LOCK: i64 = 0x7067_7465_6e61_6e74; // "pgtenant"

const SCHEMA: &str = "
CREATE SCHEMA IF NOT EXISTS pgtenant_cp;
CREATE TABLE IF NOT EXISTS pgtenant_cp.meta (k text PRIMARY KEY, v text NOT NULL);
CREATE TABLE IF NOT EXISTS pgtenant_cp.route_changes (
    epoch bigint PRIMARY KEY, tenant text NOT NULL, route jsonb, instance text NOT NULL,
    at timestamptz NOT NULL DEFAULT now());
CREATE INDEX IF NOT EXISTS route_changes_tenant ON pgtenant_cp.route_changes (tenant, epoch DESC);
CREATE TABLE IF NOT EXISTS pgtenant_cp.instances (
    id text PRIMARY KEY, address text NOT NULL, version text NOT NULL, started_at timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL, applied_epoch bigint NOT NULL);
CREATE TABLE IF NOT EXISTS pgtenant_cp.audit (
    instance text NOT NULL, seq bigint NOT NULL, time text NOT NULL, actor text NOT NULL, command text NOT NULL,
    tenant text, result text NOT NULL, entry jsonb NOT NULL, PRIMARY KEY (instance, seq));
CREATE TABLE IF NOT EXISTS pgtenant_cp.migrations (
    tenant text PRIMARY KEY, record jsonb NOT NULL, holder text NOT NULL, lease_until timestamptz NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now());
-- Each taking of a move's lease by another instance draws a new generation, which the coordinator carries into
-- its claims on the backends (migration/claim.rs): an older coordinator's claim is refused there.
-- The last generation drawn; one row, so draws are serialised. A draw is above the last one and at least the
-- store's clock in microseconds, so a store recreated or restored from a backup does not hand out generations
-- below those its predecessor left recorded on the backends.
CREATE TABLE IF NOT EXISTS pgtenant_cp.lease_generation (
    one boolean PRIMARY KEY DEFAULT true CHECK (one), last bigint NOT NULL);
INSERT INTO pgtenant_cp.lease_generation (last) VALUES (0) ON CONFLICT DO NOTHING;
CREATE OR REPLACE FUNCTION pgtenant_cp.next_generation() RETURNS bigint LANGUAGE sql VOLATILE AS $$
    UPDATE pgtenant_cp.lease_generation
       SET last = greatest(last + 1, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)
    RETURNING last $$;
ALTER TABLE pgtenant_cp.migrations ADD COLUMN IF NOT EXISTS generation bigint NOT NULL DEFAULT 0;
ALTER TABLE pgtenant_cp.migrations ADD COLUMN IF NOT EXISTS incarnation text NOT NULL DEFAULT '';
CREATE TABLE IF NOT EXISTS pgtenant_cp.barriers (
    tenant text PRIMARY KEY, attempt bigint NOT NULL, coordinator text NOT NULL, phase text NOT NULL,
    deadline timestamptz NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS pgtenant_cp.barrier_acks (
    tenant text NOT NULL, attempt bigint NOT NULL, instance text NOT NULL, state text NOT NULL,
    held_ms float8, at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (tenant, attempt, instance, state));";

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("control plane: {0}")]
    Pg(String),
    #[error("control plane schema version {0} is newer than this pgtenant understands ({VERSION}); upgrade pgtenant")]
    TooNew(i32),
    /// The store refused the write for what it holds (another move, another route): not an outage.
    #[error("{0}")]
    Conflict(String),
    /// A lock stayed taken past `lock_timeout`: the store answered, try again later.
    #[error("control plane busy: {0}")]
    Busy(String),
    #[error("control plane: bad route for {tenant}: {reason}")]
    BadRoute { tenant: String, reason: String },
}

pub(super) fn pg(what: &str) -> impl Fn(tokio_postgres::Error) -> StoreError + '_ {
    move |e| {
        let detail = e
            .as_db_error()
            .map_or_else(|| e.to_string(), |d| d.message().to_owned());
        // A lock wait past `lock_timeout` is the store's answer (busy), not a broken connection.
        let busy = e.code().is_some_and(|c| {
            *c == tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE
                || *c == tokio_postgres::error::SqlState::QUERY_CANCELED
        });
        match busy {
            true => StoreError::Busy(format!("{what}: {detail}")),
            false => StoreError::Pg(format!("{what}: {detail}")),
        }
    }
}

/// One change: a tenant's new route, or `None` for removed.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteChange {
    pub epoch: i64,
    pub tenant: TenantId,
    pub route: Option<Route>,
}

/// One instance as `instances` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRow {
    pub id: String,
    pub address: String,
    pub version: String,
    pub started_at: String,
    /// Seconds since its last heartbeat.
    pub heartbeat_age_s: f64,
    pub applied_epoch: i64,
    /// Heartbeat within the last 5 s.
    pub alive: bool,
}

/// Connects (with a 5 s limit), drives the connection on its own task, and passes notifications to `notify`.
pub async fn connect(
    url: &str,
    notify: Option<tokio::sync::mpsc::UnboundedSender<()>>,
) -> Result<Client, StoreError> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| StoreError::Pg(format!("control_plane url: {e}")))?;
    config
        .connect_timeout(Duration::from_secs(5))
        .application_name("pgtenant-control-plane")
        // The store's writes are durable whatever the server's default: an epoch must never be lost. A
        // transaction left open by a frozen instance (a swap holds its move's lease row) ends by itself, and no
        // statement waits on a lock for longer than a few seconds: every instance's loop shares this store.
        .options(
            "-c synchronous_commit=on -c idle_in_transaction_session_timeout=10000 -c lock_timeout=5000",
        )
        .keepalives_idle(Duration::from_secs(10));
    let (client, mut conn) = config.connect(NoTls).await.map_err(pg("connect"))?;
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        use futures_util::StreamExt;
        while let Some(Ok(m)) = messages.next().await {
            if let (tokio_postgres::AsyncMessage::Notification(_), Some(tx)) = (m, &notify) {
                let _ = tx.send(());
            }
        }
    });
    Ok(client)
}

/// Creates or upgrades the schema, under the advisory lock (several instances may start at once).
pub async fn ensure_schema(c: &mut Client) -> Result<(), StoreError> {
    // Made by this very schema text already: nothing to take a lock for (the DDL below locks `migrations`
    // exclusively even when it changes nothing, which every reconnecting instance would otherwise do).
    let made = schema_hash();
    let current = c
        .query_opt(
            "SELECT v FROM pgtenant_cp.meta WHERE k = 'schema_hash'",
            &[],
        )
        .await;
    if let Ok(Some(row)) = current {
        if row.get::<_, String>(0) == made {
            return Ok(());
        }
    }
    let tx = c.transaction().await.map_err(pg("begin"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK])
        .await
        .map_err(pg("lock"))?;
    tx.batch_execute(SCHEMA)
        .await
        .map_err(pg("create schema"))?;
    let row = tx
        .query_opt(
            "SELECT v FROM pgtenant_cp.meta WHERE k = 'schema_version'",
            &[],
        )
        .await
        .map_err(pg("read schema version"))?;
    match row.map(|r| r.get::<_, String>(0).parse::<i32>().unwrap_or(0)) {
        Some(v) if v > VERSION => return Err(StoreError::TooNew(v)),
        Some(_) => {}
        None => {
            tx.execute(
                "INSERT INTO pgtenant_cp.meta VALUES ('schema_version', $1)",
                &[&VERSION.to_string()],
            )
            .await
            .map_err(pg("write schema version"))?;
        }
    }
    tx.execute(
        "INSERT INTO pgtenant_cp.meta VALUES ('schema_hash', $1) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v",
        &[&made],
    )
    .await
    .map_err(pg("write schema hash"))?;
    tx.commit().await.map_err(pg("commit schema"))
}

/// A fingerprint of [`SCHEMA`] (FNV-1a): the store records the one it was last made with.
fn schema_hash() -> String {
    let hash = SCHEMA.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// Takes the route lock for the rest of `tx`: route writes, and the starts of moves, one at a time.
pub async fn lock_routes(tx: &Transaction<'_>) -> Result<(), StoreError> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK])
        .await
        .map_err(pg("lock"))
        .map(|_| ())
}

/// The latest route of `tenant` in the store (none: no route, or removed).
pub async fn latest_route(
    tx: &Transaction<'_>,
    tenant: &TenantId,
) -> Result<Option<Route>, StoreError> {
    let row = tx
        .query_opt(
            "SELECT epoch, route FROM pgtenant_cp.route_changes WHERE tenant = $1 ORDER BY epoch DESC LIMIT 1",
            &[&tenant.as_str()],
        )
        .await
        .map_err(pg("read the tenant's route"))?;
    match row {
        Some(r) => Ok(change(r.get(0), tenant.to_string(), r.get(1))?.route),
        None => Ok(None),
    }
}

/// Refuses ([`StoreError::Conflict`]) a route change of a tenant with an unfinished move on any instance; under
/// the route lock, so a move starting at the same moment is either seen here or sees this change.
async fn refuse_moving(
    tx: &Transaction<'_>,
    changes: &[(TenantId, Option<Route>)],
) -> Result<(), StoreError> {
    let tenants: Vec<&str> = changes.iter().map(|(t, _)| t.as_str()).collect();
    let row = tx
        .query_opt(
            "SELECT tenant, record->>'state' FROM pgtenant_cp.migrations
              WHERE tenant = ANY($1) AND record->>'state' NOT IN ('completed', 'rolled_back') LIMIT 1",
            &[&tenants],
        )
        .await
        .map_err(pg("look up migrations"))?;
    match row {
        Some(r) => Err(StoreError::Conflict(format!(
            "tenant {:?} is being migrated ({}) by another instance; finish or abort the migration first",
            r.get::<_, String>(0),
            r.get::<_, String>(1)
        ))),
        None => Ok(()),
    }
}

/// What a route write may change, checked under the route lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// Anything (a seed of an empty store).
    None,
    /// Refused whole if one of the tenants has an unfinished move (an operator's route change).
    UnlessMoving,
    /// Only tenants with no route in the store (a reload's new tenants: an instance behind the store must not
    /// write its config's route over a newer one, a move's among them).
    IfAbsent,
}

/// Appends `changes` as the next epochs, in order, and announces them; the last epoch written.
pub async fn append(
    c: &mut Client,
    instance: &str,
    changes: &[(TenantId, Option<Route>)],
    guard: Guard,
) -> Result<i64, StoreError> {
    let tx = c.transaction().await.map_err(pg("begin"))?;
    lock_routes(&tx).await?;
    if guard == Guard::UnlessMoving {
        refuse_moving(&tx, changes).await?;
    }
    let mut absent = Vec::with_capacity(changes.len());
    for change in changes {
        if guard != Guard::IfAbsent || latest_route(&tx, &change.0).await?.is_none() {
            absent.push(change);
        }
    }
    let changes: Vec<_> = absent.iter().map(|(t, r)| (t, r.as_ref())).collect();
    write_changes(tx, instance, &changes).await
}

/// Writes `changes` as the next epochs, in order, announces them and commits `tx` (which holds the route lock);
/// the last epoch written.
async fn write_changes(
    tx: Transaction<'_>,
    instance: &str,
    changes: &[(&TenantId, Option<&Route>)],
) -> Result<i64, StoreError> {
    let mut epoch: i64 = tx
        .query_one(
            "SELECT coalesce(max(epoch), 0) FROM pgtenant_cp.route_changes",
            &[],
        )
        .await
        .map_err(pg("read epoch"))?
        .get(0);
    for (tenant, route) in changes {
        epoch += 1;
        let json = route
            .map(serde_json::to_value)
            .transpose()
            .map_err(|e| StoreError::Pg(e.to_string()))?;
        tx.execute(
            "INSERT INTO pgtenant_cp.route_changes (epoch, tenant, route, instance) VALUES ($1, $2, $3, $4)",
            &[&epoch, &tenant.as_str(), &json, &instance],
        )
        .await
        .map_err(pg("write route change"))?;
    }
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &epoch.to_string()])
        .await
        .map_err(pg("notify"))?;
    tx.commit().await.map_err(pg("commit route change"))?;
    Ok(epoch)
}

/// What a swap's write is conditional on, read when the tenant is held: the store's log as this instance had
/// applied it, and the generation of the move's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwapBasis {
    pub epoch: i64,
    pub generation: i64,
}

/// What [`append_swap`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum SwapWrite {
    /// The swap is written now.
    Written,
    /// The move's lease is not this process's (taken over): nothing is written.
    NotHolder,
    /// The tenant's route changed after `since`: to this route (an earlier attempt whose answer was lost), or
    /// to another one (a change this swap must not overwrite).
    Changed(Option<Route>),
}

/// Appends a migration's route swap of `tenant`, unless the tenant's route changed in the store after epoch
/// `since.epoch` (the epoch the coordinator had applied when it held the tenant), and only while the move's
/// lease is `holder`'s (instance id and process) with the generation it had then (`since.generation`; a lease
/// lost and taken again since is another coordinator's). Retrying it is safe: an attempt whose commit went through but whose
/// answer was lost is found, not written twice, and a newer route (an operator's, a rollback's) is never
/// written over. The lease row stays locked to the commit, so an instance taking the move over does so after
/// the swap is in, and finds it.
pub async fn append_swap(
    c: &mut Client,
    holder: (&str, &str),
    tenant: &TenantId,
    since: SwapBasis,
    route: &Route,
) -> Result<SwapWrite, StoreError> {
    let (instance, incarnation) = holder;
    let tx = c.transaction().await.map_err(pg("begin"))?;
    lock_routes(&tx).await?;
    let newer = tx
        .query_opt(
            "SELECT epoch, route FROM pgtenant_cp.route_changes WHERE tenant = $1 AND epoch > $2
              ORDER BY epoch DESC LIMIT 1",
            &[&tenant.as_str(), &since.epoch],
        )
        .await
        .map_err(pg("read the tenant's route"))?;
    if let Some(row) = newer {
        let found = change(row.get(0), tenant.to_string(), row.get(1))?;
        return Ok(SwapWrite::Changed(found.route));
    }
    let held = tx
        .query_opt(
            "SELECT 1 FROM pgtenant_cp.migrations
              WHERE tenant = $1 AND holder = $2 AND incarnation = $3 AND generation = $4 FOR UPDATE",
            &[&tenant.as_str(), &instance, &incarnation, &since.generation],
        )
        .await
        .map_err(pg("check the move's lease"))?;
    if held.is_none() {
        return Ok(SwapWrite::NotHolder);
    }
    write_changes(tx, instance, &[(tenant, Some(route))]).await?;
    Ok(SwapWrite::Written)
}

fn change(
    epoch: i64,
    tenant: String,
    route: Option<serde_json::Value>,
) -> Result<RouteChange, StoreError> {
    let bad = |reason: String| StoreError::BadRoute {
        tenant: tenant.clone(),
        reason,
    };
    let id = TenantId::parse(&tenant).map_err(|e| bad(e.to_string()))?;
    let route = match route {
        Some(v) => Some(serde_json::from_value(v).map_err(|e| bad(e.to_string()))?),
        None => None,
    };
    Ok(RouteChange {
        epoch,
        tenant: id,
        route,
    })
}

/// The changes after `epoch`, in epoch order (at most `limit`).
pub async fn changes_after(
    c: &Client,
    epoch: i64,
    limit: i64,
) -> Result<Vec<RouteChange>, StoreError> {
    let rows = c
        .query(
            "SELECT epoch, tenant, route FROM pgtenant_cp.route_changes WHERE epoch > $1 ORDER BY epoch LIMIT $2",
            &[&epoch, &limit],
        )
        .await
        .map_err(pg("read route changes"))?;
    rows.into_iter()
        .map(|r| change(r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Every tenant's latest route and the store's epoch: the whole table, for an instance that starts.
pub async fn current(c: &Client) -> Result<(i64, Vec<RouteChange>), StoreError> {
    let epoch: i64 = c
        .query_one(
            "SELECT coalesce(max(epoch), 0) FROM pgtenant_cp.route_changes",
            &[],
        )
        .await
        .map_err(pg("read epoch"))?
        .get(0);
    let rows = c
        .query(
            "SELECT DISTINCT ON (tenant) epoch, tenant, route FROM pgtenant_cp.route_changes \
              WHERE epoch <= $1 ORDER BY tenant, epoch DESC",
            &[&epoch],
        )
        .await
        .map_err(pg("read routes"))?;
    let latest = rows
        .into_iter()
        .map(|r| change(r.get(0), r.get(1), r.get(2)))
        .collect::<Result<_, _>>()?;
    Ok((epoch, latest))
}

/// Registers or refreshes this instance.
pub async fn heartbeat(
    c: &Client,
    id: &str,
    address: &str,
    started_unix: i64,
    applied: i64,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO pgtenant_cp.instances (id, address, version, started_at, heartbeat_at, applied_epoch)
         VALUES ($1, $2, $3, to_timestamp($4), now(), $5)
         ON CONFLICT (id) DO UPDATE SET address = EXCLUDED.address, version = EXCLUDED.version,
           started_at = EXCLUDED.started_at, heartbeat_at = now(), applied_epoch = EXCLUDED.applied_epoch",
        &[&id, &address, &env!("CARGO_PKG_VERSION"), &(started_unix as f64), &applied],
    )
    .await
    .map_err(pg("heartbeat"))?;
    Ok(())
}

pub async fn instances(c: &Client) -> Result<Vec<InstanceRow>, StoreError> {
    let rows = c
        .query(
            "SELECT id, address, version, to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    extract(epoch FROM now() - heartbeat_at)::float8, applied_epoch
               FROM pgtenant_cp.instances ORDER BY id",
            &[],
        )
        .await
        .map_err(pg("list instances"))?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let age: f64 = r.get(4);
            InstanceRow {
                id: r.get(0),
                address: r.get(1),
                version: r.get(2),
                started_at: r.get(3),
                heartbeat_age_s: (age * 10.0).round() / 10.0,
                applied_epoch: r.get(5),
                alive: age < 5.0,
            }
        })
        .collect())
}

/// Copies audit entries of `instance` into the shared audit table (entries already there are skipped).
pub async fn mirror_audit(
    c: &Client,
    instance: &str,
    entries: &[crate::state::audit::AuditEntry],
) -> Result<(), StoreError> {
    for e in entries {
        let json = serde_json::to_value(e).unwrap_or_default();
        c.execute(
            "INSERT INTO pgtenant_cp.audit (instance, seq, time, actor, command, tenant, result, entry)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
            &[&instance, &(e.seq as i64), &e.time, &e.actor, &e.command, &e.tenant, &e.result, &json],
        )
        .await
        .map_err(pg("mirror audit"))?;
    }
    Ok(())
}
