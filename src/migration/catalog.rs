//! What the tenant's schema holds: tables (columns, primary key) and sequences.

use tokio_postgres::Client;

use super::MigrateError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub name: String,
    /// Columns a row image carries and an insert may write: not dropped, not generated, in attnum order.
    pub columns: Vec<String>,
    /// `GENERATED ALWAYS AS IDENTITY` columns (not assignable by UPDATE).
    pub identity_always: Vec<String>,
    /// Primary-key columns; empty for a table without one (full-row identity is used).
    pub key: Vec<String>,
}

const TABLES: &str = "
SELECT c.relname::text,
       array(SELECT a.attname::text FROM pg_attribute a
              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
              ORDER BY a.attnum),
       array(SELECT a.attname::text FROM pg_attribute a
              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attidentity = 'a'),
       array(SELECT a.attname::text
               FROM pg_index i, unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord), pg_attribute a
              WHERE i.indrelid = c.oid AND i.indisprimary AND a.attrelid = c.oid AND a.attnum = k.attnum
              ORDER BY k.ord)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = $1 AND c.relkind = 'r'
 ORDER BY c.relname";

pub async fn tables(client: &Client, schema: &str) -> Result<Vec<Table>, MigrateError> {
    let rows = client
        .query(TABLES, &[&schema])
        .await
        .map_err(|e| MigrateError::pg("list tables", e))?;
    Ok(rows
        .iter()
        .map(|r| Table {
            name: r.get(0),
            columns: r.get(1),
            identity_always: r.get(2),
            key: r.get(3),
        })
        .collect())
}

/// `table.column` of the given tables' columns that refer to large objects (type `oid`, or a domain over it
/// such as the `lo` extension's): the objects live in `pg_largeobject`, which a move does not copy.
pub async fn large_object_columns(
    client: &Client,
    schema: &str,
    tables: &[String],
) -> Result<Vec<String>, MigrateError> {
    let rows = client
        .query(
            "SELECT c.relname || '.' || a.attname FROM pg_attribute a \
               JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
               JOIN pg_type t ON t.oid = a.atttypid \
              WHERE n.nspname = $1 AND c.relname = ANY($2) AND a.attnum > 0 AND NOT a.attisdropped \
                AND 'oid'::regtype IN (t.oid, t.typbasetype) ORDER BY 1",
            &[&schema, &tables],
        )
        .await
        .map_err(|e| MigrateError::pg("look for large object columns", e))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

pub async fn sequences(client: &Client, schema: &str) -> Result<Vec<String>, MigrateError> {
    let rows = client
        .query(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE n.nspname = $1 AND c.relkind = 'S' ORDER BY 1",
            &[&schema],
        )
        .await
        .map_err(|e| MigrateError::pg("list sequences", e))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The sequences the cutover keeps in step on `side`: every sequence of the schema, or for shared tables only
/// those owned by the migrated tables (serial and identity columns; other sequences of a shared schema belong
/// to other tables and may not exist on the other side).
pub async fn sequences_of(
    client: &Client,
    side: &super::pg::Endpoint,
    tables: &[String],
) -> Result<Vec<String>, MigrateError> {
    if side.filter.is_none() {
        return sequences(client, &side.schema).await;
    }
    let rows = client
        .query(
            "SELECT DISTINCT s.relname::text FROM pg_class s \
               JOIN pg_namespace n ON n.oid = s.relnamespace \
               JOIN pg_depend d ON d.objid = s.oid AND d.classid = 'pg_class'::regclass \
                AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') \
               JOIN pg_class t ON t.oid = d.refobjid \
              WHERE n.nspname = $1 AND s.relkind = 'S' AND t.relname = ANY($2) ORDER BY 1",
            &[&side.schema, &tables],
        )
        .await
        .map_err(|e| MigrateError::pg("list sequences", e))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

pub async fn schema_exists(client: &Client, schema: &str) -> Result<bool, MigrateError> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&schema],
        )
        .await
        .map_err(|e| MigrateError::pg("look up schema", e))?;
    Ok(row.get(0))
}
