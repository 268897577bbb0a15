//! Restoring a backup: the whole file is read once to check its checksums, then its definitions and rows go
//! to the target in one transaction, under the same or a new tenant name. A restore never overwrites: the
//! target schema must not exist (schema backups), or the target's shared tables must hold no rows of the
//! tenant (row backups).
//!
//! A schema backup's definitions name its original schema (pg_dump qualifies every name). To restore it under
//! another name, the definitions are run as they are, creating the original name, and the schema is renamed
//! before commit; references between its objects are by OID, so they follow. If the original name is taken
//! on the target (restoring next to the live tenant), that schema is renamed aside for the transaction and
//! back before commit: other sessions never see either rename. Function bodies are text and keep naming the
//! original schema; the answer says so when the backup has any.

use std::path::Path;
use std::time::Instant;

use bytes::Bytes;
use futures_util::SinkExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_postgres::{Client, CopyInSink};

use super::file::{Kind, Reader};
use super::{BackupError, Holds, Manifest};
use crate::config::BackendConfig;
use crate::migration::catalog;
use crate::migration::pg::{Endpoint, Filter};
use crate::quote::{quote_ident, quote_literal};
use crate::routing::BackendId;
use crate::tenant::TenantId;

/// Where a restore goes.
#[derive(Debug, Clone)]
pub struct Destination {
    pub backend: BackendId,
    pub config: BackendConfig,
    /// Default: the backend's database, else the backup's.
    pub database: Option<String>,
    /// Default: the backup's schema, with the tenant's name in it replaced by the new one.
    pub schema: Option<String>,
    /// The tenant the rows are restored as (default: the backup's).
    pub tenant: Option<TenantId>,
    /// Row backups: the new tenant's value in the tenant column (default: its name).
    pub tenant_key: Option<String>,
}

/// `tenant restore`'s answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Restored {
    pub tenant: String,
    pub from_tenant: String,
    pub file: String,
    pub holds: Holds,
    pub backend: String,
    pub database: String,
    pub schema: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_column: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_key: Option<String>,
    pub tables: usize,
    pub rows: u64,
    pub took_ms: u64,
    /// What is left to do (a route, grants) and what to know (function bodies naming the old schema).
    pub notes: Vec<String>,
}

/// Reads the whole file, checks the end checksum and every table's checksum and row count; the manifest.
pub async fn verify(path: &Path) -> Result<Manifest, BackupError> {
    let mut r = Reader::open(path).await?;
    let mut tables: Vec<(Sha256, u64)> = Vec::new();
    let mut manifest = None;
    while let Some(rec) = r.next().await? {
        match rec.kind {
            Kind::Data => {
                let i = rec.index as usize;
                if i >= 100_000 {
                    return Err(corrupt(path, "a table index is out of range"));
                }
                if tables.len() <= i {
                    tables.resize_with(i + 1, || (Sha256::new(), 0));
                }
                tables[i].0.update(&rec.data);
                tables[i].1 += memchr::memchr_iter(b'\n', &rec.data).count() as u64;
            }
            Kind::Manifest => manifest = Some(rec.data),
            Kind::PreData | Kind::PostData => {}
        }
    }
    let bytes = manifest.ok_or_else(|| corrupt(path, "no manifest"))?;
    let m: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| corrupt(path, &format!("manifest: {e}")))?;
    tables.resize_with(m.tables.len().max(tables.len()), || (Sha256::new(), 0));
    if tables.len() != m.tables.len() {
        return Err(corrupt(path, "rows of a table the manifest does not list"));
    }
    for (t, (hash, rows)) in m.tables.iter().zip(tables) {
        if crate::state::hex(&hash.finalize()) != t.sha256 || rows != t.rows {
            return Err(corrupt(
                path,
                &format!("table {}'s rows do not match their checksum", t.name),
            ));
        }
    }
    Ok(m)
}

fn corrupt(path: &Path, why: &str) -> BackupError {
    BackupError::Corrupt(format!("{}: {why}", path.display()))
}

/// Restores the backup at `path` to `to`.
pub async fn restore(path: &Path, to: Destination) -> Result<Restored, BackupError> {
    let started = Instant::now();
    let m = verify(path).await?;
    let plan = Plan::of(&m, to)?;
    let client = plan.side.connect().await?;
    client
        .batch_execute("SET statement_timeout = 0")
        .await
        .map_err(|e| BackupError::pg("session setup", e))?;
    match m.holds {
        Holds::Schema => plan.check_schema_free(&client).await?,
        Holds::Rows => plan.check_rows_free(&client, &m).await?,
    }
    let mut notes = Vec::new();
    if let Err(e) = plan.load(&client, path, &m, &mut notes).await {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(e);
    }
    tracing::info!(file = %path.display(), tenant = %plan.tenant, backend = %plan.side.backend, "backup restored");
    Ok(Restored {
        tenant: plan.tenant.to_string(),
        from_tenant: m.tenant.clone(),
        file: path.display().to_string(),
        holds: m.holds,
        backend: plan.side.backend.to_string(),
        database: plan.side.database.clone(),
        schema: plan.side.schema.clone(),
        tenant_column: m.tenant_column.clone(),
        tenant_key: plan.side.filter.as_ref().map(|f| f.key.clone()),
        tables: m.tables.len(),
        rows: m.tables.iter().map(|t| t.rows).sum(),
        took_ms: started.elapsed().as_millis() as u64,
        notes,
    })
}

/// The restore's target, worked out from the manifest and the request.
struct Plan {
    tenant: TenantId,
    side: Endpoint,
}

impl Plan {
    fn of(m: &Manifest, to: Destination) -> Result<Plan, BackupError> {
        let original = TenantId::parse(&m.tenant)
            .map_err(|e| BackupError::Format(format!("manifest tenant: {e}")))?;
        let tenant = to.tenant.unwrap_or_else(|| original.clone());
        let database = to
            .database
            .or_else(|| to.config.database.clone())
            .unwrap_or_else(|| m.database.clone());
        let schema = match (to.schema, m.holds) {
            (Some(s), _) => s,
            (None, Holds::Rows) => m.schema.clone(),
            (None, Holds::Schema) if tenant == original => m.schema.clone(),
            (None, Holds::Schema) if m.schema.contains(original.as_str()) => {
                m.schema.replace(original.as_str(), tenant.as_str())
            }
            (None, Holds::Schema) => {
                return Err(BackupError::Refused(format!(
                    "the backup's schema {:?} does not contain the tenant's name; give --schema for {tenant}",
                    m.schema
                )))
            }
        };
        let filter = m.tenant_column.as_ref().map(|column| Filter {
            column: column.clone(),
            key: match (&to.tenant_key, tenant == original) {
                (Some(k), _) => k.clone(),
                (None, true) => m.tenant_key.clone().unwrap_or_else(|| tenant.to_string()),
                (None, false) => tenant.to_string(),
            },
        });
        Ok(Plan {
            tenant,
            side: Endpoint {
                backend: to.backend,
                config: to.config,
                database,
                schema,
                filter,
            },
        })
    }

    async fn check_schema_free(&self, c: &Client) -> Result<(), BackupError> {
        if catalog::schema_exists(c, &self.side.schema).await? {
            return Err(BackupError::Refused(format!(
                "schema {:?} already exists in database {:?} on backend {}; a restore never overwrites (drop it, or restore with another --schema or --as)",
                self.side.schema, self.side.database, self.side.backend
            )));
        }
        Ok(())
    }

    /// Every table of a row backup is on the target with its columns, and holds none of the tenant's rows.
    async fn check_rows_free(&self, c: &Client, m: &Manifest) -> Result<(), BackupError> {
        let have = catalog::tables(c, &self.side.schema).await?;
        for t in &m.tables {
            let Some(target) = have.iter().find(|h| h.name == t.name) else {
                return Err(BackupError::Refused(format!(
                    "table {}.{} is not in database {:?} on backend {}; create the shared tables first",
                    self.side.schema, t.name, self.side.database, self.side.backend
                )));
            };
            if let Some(col) = t.columns.iter().find(|c| !target.columns.contains(c)) {
                return Err(BackupError::Refused(format!(
                    "table {}.{} on the target has no column {col:?}",
                    self.side.schema, t.name
                )));
            }
            let sql = format!(
                "SELECT EXISTS (SELECT 1 FROM {}{})",
                self.side.qualified(&t.name),
                self.side.tenant_where()
            );
            let taken: bool = c
                .query_one(&sql, &[])
                .await
                .map_err(|e| BackupError::pg("look for the tenant's rows", e))?
                .get(0);
            if taken {
                return Err(BackupError::Refused(format!(
                    "table {}.{} already holds rows of tenant {}; a restore never overwrites",
                    self.side.schema, t.name, self.tenant
                )));
            }
        }
        Ok(())
    }

    /// The one transaction that restores everything.
    async fn load(
        &self,
        c: &Client,
        path: &Path,
        m: &Manifest,
        notes: &mut Vec<String>,
    ) -> Result<(), BackupError> {
        c.batch_execute("BEGIN")
            .await
            .map_err(|e| BackupError::pg("begin", e))?;
        let mut names = SchemaNames::of(m, &self.side.schema);
        if m.holds == Holds::Schema {
            names.before(c).await?;
        } else {
            c.batch_execute("SET LOCAL session_replication_role = replica")
                .await
                .map_err(|e| BackupError::pg("disable triggers for the load", e))?;
        }
        let mut r = Reader::open(path).await?;
        let mut rows = RowLoad::new(self, m);
        while let Some(rec) = r.next().await? {
            match rec.kind {
                Kind::PreData => run_sql(c, &rec.data, m, "the schema's definitions").await?,
                Kind::Data => rows.chunk(c, rec.index as usize, rec.data).await?,
                Kind::PostData => {
                    rows.finish(c).await?;
                    run_sql(c, &rec.data, m, "the schema's indexes and constraints").await?;
                }
                Kind::Manifest => {}
            }
        }
        rows.finish(c).await?;
        self.sequences(c, m, &names.load_schema).await?;
        if m.holds == Holds::Schema {
            drop_capture_triggers(c, &names.load_schema).await?;
            if has_functions(c, &names.load_schema).await? && names.load_schema != self.side.schema
            {
                notes.push(format!(
                    "the schema has functions; their bodies are text and still name schema {:?} where they name it",
                    m.schema
                ));
            }
            names.after(c).await?;
        }
        c.batch_execute("COMMIT")
            .await
            .map_err(|e| BackupError::pg("commit the restore", e))?;
        Ok(())
    }

    /// Schema backups get their sequences' exact values; row backups only move shared sequences forward, past
    /// the restored keys, never back.
    async fn sequences(&self, c: &Client, m: &Manifest, schema: &str) -> Result<(), BackupError> {
        for s in &m.sequences {
            let name = quote_literal(&format!("{}.{}", quote_ident(schema), quote_ident(&s.name)));
            let sql = match m.holds {
                Holds::Schema => {
                    format!("SELECT setval({name}, {}, {})", s.last_value, s.is_called)
                }
                Holds::Rows => format!(
                    "SELECT setval({name}, GREATEST({}, (SELECT last_value FROM {}.{})))",
                    s.last_value,
                    quote_ident(schema),
                    quote_ident(&s.name)
                ),
            };
            c.batch_execute(&sql)
                .await
                .map_err(|e| BackupError::pg(&format!("set sequence {}", s.name), e))?;
        }
        Ok(())
    }
}

/// Schema renames around a schema restore: the definitions create `load_schema` (the backup's name); `target`
/// is what it is called at commit; `aside` is what a live schema of the backup's name is called meanwhile.
struct SchemaNames {
    load_schema: String,
    target: String,
    aside: Option<String>,
}

impl SchemaNames {
    fn of(m: &Manifest, target: &str) -> SchemaNames {
        SchemaNames {
            load_schema: match m.holds {
                Holds::Schema => m.schema.clone(),
                Holds::Rows => target.to_owned(),
            },
            target: target.to_owned(),
            aside: None,
        }
    }

    async fn before(&mut self, c: &Client) -> Result<(), BackupError> {
        if self.load_schema != self.target && catalog::schema_exists(c, &self.load_schema).await? {
            let aside = format!("pgtenant_restore_{}", std::process::id());
            rename(c, &self.load_schema, &aside).await?;
            self.aside = Some(aside);
        }
        Ok(())
    }

    async fn after(&self, c: &Client) -> Result<(), BackupError> {
        if self.load_schema != self.target {
            rename(c, &self.load_schema, &self.target).await?;
        }
        if let Some(aside) = &self.aside {
            rename(c, aside, &self.load_schema).await?;
        }
        Ok(())
    }
}

async fn rename(c: &Client, from: &str, to: &str) -> Result<(), BackupError> {
    c.batch_execute(&format!(
        "ALTER SCHEMA {} RENAME TO {}",
        quote_ident(from),
        quote_ident(to)
    ))
    .await
    .map_err(|e| BackupError::pg(&format!("rename schema {from} to {to}"), e))
}

/// Runs pg_dump's SQL; it empties search_path for the session, which is put back afterwards. `public`, which
/// every database has, is not created again.
async fn run_sql(c: &Client, sql: &[u8], m: &Manifest, what: &str) -> Result<(), BackupError> {
    let text = String::from_utf8_lossy(sql);
    let text = if m.schema == "public" {
        text.lines()
            .filter(|l| l.trim() != "CREATE SCHEMA public;")
            .collect::<Vec<_>>()
            .join("\n")
    } else {
        text.into_owned()
    };
    c.batch_execute(&text)
        .await
        .map_err(|e| BackupError::pg(&format!("restore {what}"), e))?;
    c.batch_execute("SET LOCAL search_path = DEFAULT")
        .await
        .map_err(|e| BackupError::pg("reset search_path", e))
}

/// Triggers of pgtenant's own (capture, fence) that came with a backup taken during a move.
async fn drop_capture_triggers(c: &Client, schema: &str) -> Result<(), BackupError> {
    let rows = c
        .query(
            "SELECT t.tgname::text, r.relname::text FROM pg_trigger t JOIN pg_class r ON r.oid = t.tgrelid \
               JOIN pg_namespace n ON n.oid = r.relnamespace \
              WHERE n.nspname = $1 AND t.tgname LIKE 'pgtenant\\_%' AND NOT t.tgisinternal",
            &[&schema],
        )
        .await
        .map_err(|e| BackupError::pg("list triggers", e))?;
    for row in rows {
        let (trigger, table): (String, String) = (row.get(0), row.get(1));
        c.batch_execute(&format!(
            "DROP TRIGGER {} ON {}.{}",
            quote_ident(&trigger),
            quote_ident(schema),
            quote_ident(&table)
        ))
        .await
        .map_err(|e| BackupError::pg("drop a capture trigger", e))?;
    }
    Ok(())
}

async fn has_functions(c: &Client, schema: &str) -> Result<bool, BackupError> {
    Ok(c.query_one(
        "SELECT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = $1)",
        &[&schema],
    )
    .await
    .map_err(|e| BackupError::pg("list functions", e))?
    .get(0))
}

/// The rows of the backup going into their tables, one COPY per table as its chunks arrive.
struct RowLoad<'a> {
    plan: &'a Plan,
    m: &'a Manifest,
    current: Option<(usize, std::pin::Pin<Box<CopyInSink<Bytes>>>)>,
    /// Row backups under a new key go through a temporary table whose tenant column is then rewritten.
    rekey: bool,
}

impl<'a> RowLoad<'a> {
    fn new(plan: &'a Plan, m: &'a Manifest) -> RowLoad<'a> {
        let rekey = match (&plan.side.filter, &m.tenant_key) {
            (Some(f), Some(old)) => &f.key != old,
            _ => false,
        };
        RowLoad {
            plan,
            m,
            current: None,
            rekey,
        }
    }

    fn staging(i: usize) -> String {
        format!("pgtenant_restore_{i}")
    }

    async fn chunk(&mut self, c: &Client, i: usize, data: Vec<u8>) -> Result<(), BackupError> {
        if self.current.as_ref().is_none_or(|(at, _)| *at != i) {
            self.finish(c).await?;
            let t = self
                .m
                .tables
                .get(i)
                .ok_or_else(|| BackupError::Format(format!("no table {i} in the manifest")))?;
            let cols = t
                .columns
                .iter()
                .map(|c| quote_ident(c))
                .collect::<Vec<_>>()
                .join(", ");
            let into = if self.rekey {
                c.batch_execute(&format!(
                    "CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {cols} FROM {}.{} WITH NO DATA",
                    Self::staging(i),
                    quote_ident(&self.plan.side.schema),
                    quote_ident(&t.name)
                ))
                .await
                .map_err(|e| BackupError::pg("make a staging table", e))?;
                Self::staging(i)
            } else {
                format!(
                    "{}.{}",
                    quote_ident(&self.schema_for_rows()),
                    quote_ident(&t.name)
                )
            };
            let sink = c
                .copy_in(&format!("COPY {into} ({cols}) FROM STDIN"))
                .await
                .map_err(|e| BackupError::pg(&format!("load table {}", t.name), e))?;
            self.current = Some((i, Box::pin(sink)));
        }
        if let Some((_, sink)) = self.current.as_mut() {
            sink.send(Bytes::from(data))
                .await
                .map_err(|e| BackupError::pg("load rows", e))?;
        }
        Ok(())
    }

    /// Schema backups load into the backup's schema name (renamed at the end); row backups into the target's.
    fn schema_for_rows(&self) -> String {
        match self.m.holds {
            Holds::Schema => self.m.schema.clone(),
            Holds::Rows => self.plan.side.schema.clone(),
        }
    }

    async fn finish(&mut self, c: &Client) -> Result<(), BackupError> {
        let Some((i, mut sink)) = self.current.take() else {
            return Ok(());
        };
        sink.as_mut()
            .finish()
            .await
            .map_err(|e| BackupError::pg("load rows", e))?;
        if self.rekey {
            self.move_staged(c, i).await?;
        }
        Ok(())
    }

    /// Rewrites the staged rows' tenant column to the new key and moves them into the shared table.
    async fn move_staged(&self, c: &Client, i: usize) -> Result<(), BackupError> {
        let (Some(t), Some(f)) = (self.m.tables.get(i), &self.plan.side.filter) else {
            return Ok(());
        };
        let cols = t
            .columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "UPDATE {s} SET {col} = {key}; INSERT INTO {target} ({cols}) OVERRIDING SYSTEM VALUE SELECT {cols} FROM {s}",
            s = Self::staging(i),
            col = quote_ident(&f.column),
            key = quote_literal(&f.key),
            target = self.plan.side.qualified(&t.name),
        );
        c.batch_execute(&sql)
            .await
            .map_err(|e| BackupError::pg(&format!("move rows into {}", t.name), e))
    }
}
