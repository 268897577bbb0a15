//! Taking a backup: one repeatable-read transaction on the tenant's backend exports its snapshot; `pg_dump`
//! reads the schema's definitions in that snapshot (before and after the data, as pg_dump's sections), and the
//! rows are read with `COPY ... TO STDOUT` in the same transaction, table by table, into the file.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::{pin_mut, StreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_postgres::Client;

use super::file::{Kind, Writer};
use super::{BackupError, Holds, Manifest, SequenceEntry, TableEntry, SUFFIX};
use crate::context::Shared;
use crate::migration::catalog::{self, Table};
use crate::migration::pg::Filter;
use crate::migration::pg::{dump_schema, Endpoint};
use crate::quote::quote_ident;
use crate::tenant::TenantId;

/// Row data per file record.
const CHUNK: usize = 1024 * 1024;
/// pg_dump's limit for one section.
const DUMP_TIMEOUT: Duration = Duration::from_secs(600);

/// `tenant backup`'s answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Taken {
    pub tenant: String,
    pub file: String,
    pub holds: Holds,
    pub tables: usize,
    pub rows: u64,
    pub size: u64,
    pub took_ms: u64,
}

/// Backs up `tenant` where its route points now, into `dir` (default `<state_dir>/backups`).
pub async fn take(
    shared: &Shared,
    tenant: &TenantId,
    dir: Option<&Path>,
) -> Result<Taken, BackupError> {
    let (side, holds) = endpoint_of(shared, tenant)?;
    let dir = dir.map_or_else(|| default_dir(shared), Path::to_owned);
    // Directories it makes are the proxy user's only, as the files are (`Writer::create`).
    tokio::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .await
        .map_err(|e| BackupError::io(&dir, e))?;
    let stamp: String = crate::state::audit::rfc3339_now()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    let path = dir.join(format!("{tenant}-{stamp}.{SUFFIX}"));
    let pg_dump = shared.config.load().migration.pg_dump.clone();
    let started = Instant::now();
    let mut out = Writer::create(&path).await?;
    let manifest = match write(&mut out, &pg_dump, tenant, &side, holds).await {
        Ok(m) => m,
        Err(e) => {
            out.discard().await;
            return Err(e);
        }
    };
    let manifest = Manifest {
        took_ms: started.elapsed().as_millis() as u64,
        ..manifest
    };
    let bytes = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| BackupError::Format(format!("manifest: {e}")))?;
    let size = out.finish(&bytes).await?;
    tracing::info!(%tenant, file = %path.display(), size, "backup taken");
    Ok(Taken {
        tenant: tenant.to_string(),
        file: path.display().to_string(),
        holds,
        tables: manifest.tables.len(),
        rows: manifest.tables.iter().map(|t| t.rows).sum(),
        size,
        took_ms: manifest.took_ms,
    })
}

/// Where backups go unless told: `<state_dir>/backups`.
pub fn default_dir(shared: &Shared) -> PathBuf {
    shared.store.dir().join("backups")
}

/// Where `tenant`'s data is now, as the migration coordinator would reach it.
pub fn endpoint_of(shared: &Shared, tenant: &TenantId) -> Result<(Endpoint, Holds), BackupError> {
    let route = shared
        .router
        .load()
        .get(tenant.as_str())
        .map(|r| (**r).clone())
        .ok_or_else(|| BackupError::Refused(format!("tenant {tenant} is not routed")))?;
    let backends = shared.backends.load();
    let backend = backends.get(&route.backend).ok_or_else(|| {
        BackupError::Refused(format!("backend {} is not configured", route.backend))
    })?;
    let database = route
        .database
        .clone()
        .or_else(|| backend.config.database.clone())
        .ok_or_else(|| {
            BackupError::Refused(format!(
                "tenant {tenant}'s route and backend {} name no database",
                route.backend
            ))
        })?;
    let filter = route.tenant_column.as_ref().map(|column| Filter {
        column: column.clone(),
        key: route
            .tenant_key
            .clone()
            .unwrap_or_else(|| tenant.to_string()),
    });
    let holds = if filter.is_some() {
        Holds::Rows
    } else {
        Holds::Schema
    };
    Ok((
        Endpoint {
            backend: route.backend.clone(),
            config: backend.config.clone(),
            database,
            schema: route.schema.clone().unwrap_or_else(|| "public".into()),
            filter,
        },
        holds,
    ))
}

/// Everything but the manifest's timing, written in one snapshot.
async fn write(
    out: &mut Writer,
    pg_dump: &str,
    tenant: &TenantId,
    side: &Endpoint,
    holds: Holds,
) -> Result<Manifest, BackupError> {
    let client = side.connect().await?;
    let snapshot = begin(&client).await?;
    let section = |s: &str| vec![format!("--section={s}"), format!("--snapshot={snapshot}")];
    if holds == Holds::Schema {
        let pre = dump_schema(pg_dump, side, &section("pre-data"), DUMP_TIMEOUT).await?;
        out.record(Kind::PreData, 0, pre.as_bytes()).await?;
    }
    let mut tables = catalog::tables(&client, &side.schema).await?;
    if let Some(f) = &side.filter {
        tables.retain(|t| t.columns.contains(&f.column));
    }
    let mut entries = Vec::with_capacity(tables.len());
    for (i, t) in tables.iter().enumerate() {
        entries.push(copy_table(&client, out, side, t, i as u32).await?);
    }
    let names: Vec<String> = tables.iter().map(|t| t.name.clone()).collect();
    let sequences = sequences(&client, side, &names).await?;
    if holds == Holds::Schema {
        let post = dump_schema(pg_dump, side, &section("post-data"), DUMP_TIMEOUT).await?;
        out.record(Kind::PostData, 0, post.as_bytes()).await?;
    }
    let version: String = client
        .query_one("SHOW server_version", &[])
        .await
        .map_err(|e| BackupError::pg("server version", e))?
        .get(0);
    client
        .batch_execute("COMMIT")
        .await
        .map_err(|e| BackupError::pg("end the snapshot", e))?;
    Ok(Manifest {
        format: 1,
        tenant: tenant.to_string(),
        taken_at: crate::state::audit::rfc3339_now(),
        holds,
        backend: side.backend.to_string(),
        database: side.database.clone(),
        schema: side.schema.clone(),
        tenant_column: side.filter.as_ref().map(|f| f.column.clone()),
        tenant_key: side.filter.as_ref().map(|f| f.key.clone()),
        server_version: version,
        data_bytes: entries.iter().map(|e| e.bytes).sum(),
        tables: entries,
        sequences,
        took_ms: 0,
    })
}

/// Opens the snapshot every read of the backup shares; its name, for pg_dump.
async fn begin(client: &Client) -> Result<String, BackupError> {
    client
        .batch_execute(
            "SET statement_timeout = 0; BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
        )
        .await
        .map_err(|e| BackupError::pg("open the backup's snapshot", e))?;
    Ok(client
        .query_one("SELECT pg_export_snapshot()", &[])
        .await
        .map_err(|e| BackupError::pg("export the snapshot", e))?
        .get(0))
}

fn column_list(columns: &[String]) -> String {
    columns
        .iter()
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One table's rows (the tenant's, for shared tables) as COPY text, in records of [`CHUNK`] bytes.
async fn copy_table(
    client: &Client,
    out: &mut Writer,
    side: &Endpoint,
    t: &Table,
    index: u32,
) -> Result<TableEntry, BackupError> {
    let cols = column_list(&t.columns);
    let sql = match &side.filter {
        None => format!("COPY {} ({cols}) TO STDOUT", side.qualified(&t.name)),
        Some(_) => format!(
            "COPY (SELECT {cols} FROM {}{}) TO STDOUT",
            side.qualified(&t.name),
            side.tenant_where()
        ),
    };
    let what = format!("read table {}", t.name);
    let stream = client
        .copy_out(&sql)
        .await
        .map_err(|e| BackupError::pg(&what, e))?;
    pin_mut!(stream);
    let (mut hash, mut rows, mut bytes) = (Sha256::new(), 0u64, 0u64);
    let mut buf = BytesMut::with_capacity(CHUNK);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| BackupError::pg(&what, e))?;
        buf.extend_from_slice(&chunk);
        if buf.len() >= CHUNK {
            flush(out, &mut buf, index, &mut hash, &mut rows, &mut bytes).await?;
        }
    }
    flush(out, &mut buf, index, &mut hash, &mut rows, &mut bytes).await?;
    Ok(TableEntry {
        name: t.name.clone(),
        columns: t.columns.clone(),
        rows,
        bytes,
        sha256: crate::state::hex(&hash.finalize()),
    })
}

async fn flush(
    out: &mut Writer,
    buf: &mut BytesMut,
    index: u32,
    hash: &mut Sha256,
    rows: &mut u64,
    bytes: &mut u64,
) -> Result<(), BackupError> {
    if buf.is_empty() {
        return Ok(());
    }
    hash.update(&buf[..]);
    // COPY text ends every row with a newline and escapes the ones inside values.
    *rows += memchr::memchr_iter(b'\n', buf).count() as u64;
    *bytes += buf.len() as u64;
    out.record(Kind::Data, index, buf).await?;
    buf.clear();
    Ok(())
}

/// The schema's sequences (for shared tables, those the tables own) with their current values.
async fn sequences(
    client: &Client,
    side: &Endpoint,
    tables: &[String],
) -> Result<Vec<SequenceEntry>, BackupError> {
    let mut out = Vec::new();
    for name in catalog::sequences_of(client, side, tables).await? {
        let row = client
            .query_one(
                &format!(
                    "SELECT last_value, is_called FROM {}",
                    side.qualified(&name)
                ),
                &[],
            )
            .await
            .map_err(|e| BackupError::pg("read a sequence", e))?;
        out.push(SequenceEntry {
            name,
            last_value: row.get(0),
            is_called: row.get(1),
        });
    }
    Ok(out)
}
