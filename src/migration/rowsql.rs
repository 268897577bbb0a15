//! Row-image SQL: the statements that apply one change-log entry ([`Entry`]) to a table, exactly once (the
//! entry's id goes into the `pgtenant.applied` ledger in the same statement), and the pieces the batched forms
//! of `batch` share with them.

use super::catalog::Table;
use super::pg::Endpoint;
use super::MigrateError;
use crate::quote::quote_ident;

/// One change-log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: i64,
    pub table: String,
    pub op: i8,
    pub old_row: Option<String>,
    pub new_row: Option<String>,
}

/// A change-log row as an [`Entry`] (columns: id, tbl, op, old_row, new_row).
pub fn entry(r: &tokio_postgres::Row) -> Entry {
    Entry {
        id: r.get(0),
        table: r.get(1),
        op: r.get(2),
        old_row: r.get(3),
        new_row: r.get(4),
    }
}

/// `x.k1 = alias.k1 AND ...` over the table's primary key (`x` is the table being changed).
pub(super) fn key_match(table: &Table, alias: &str) -> String {
    table
        .key
        .iter()
        .map(|k| format!("x.{0} = {alias}.{0}", quote_ident(k)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// `c1 = r.c1, ...` for every column an UPDATE may assign (not `GENERATED ALWAYS AS IDENTITY`).
pub(super) fn assignments(table: &Table) -> String {
    table
        .columns
        .iter()
        .filter(|c| !table.identity_always.contains(c))
        .map(|c| format!("{0} = r.{0}", quote_ident(c)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The statement that applies one kind of row image to `table` on `side`, only if the entry's id is new to the
/// ledger ($1 tenant, $2 id, then the images). Rows are rebuilt from their JSON image with
/// `jsonb_populate_record`, so every column type round-trips through its own text form.
pub fn apply_sql(side: &Endpoint, table: &Table, op: u8) -> Result<String, MigrateError> {
    let q = side.qualified(&table.name);
    let cols: Vec<String> = table.columns.iter().map(|c| quote_ident(c)).collect();
    let list = cols.join(", ");
    let ledger = "WITH l AS (INSERT INTO pgtenant.applied (tenant, id) VALUES ($1, $2) \
                  ON CONFLICT DO NOTHING RETURNING 1)";
    let new = "EXISTS (SELECT 1 FROM l)";
    let image = |n: u8| format!("jsonb_populate_record(NULL::{q}, ${n}::text::jsonb)");
    let matches = |old: u8| -> String {
        if table.key.is_empty() {
            // Full-row identity: one row whose image equals the old image.
            // Compared as row text rendered here, on both sides, so the writer's session settings (time
            // zone, float digits) cannot make equal rows look different.
            format!(
                "x.ctid = (SELECT y.ctid FROM {q} y WHERE y::text = \
                 jsonb_populate_record(NULL::{q}, ${old}::text::jsonb)::text LIMIT 1)"
            )
        } else {
            key_match(table, "o")
        }
    };
    Ok(match op {
        b'I' => format!(
            "{ledger} INSERT INTO {q} ({list}) OVERRIDING SYSTEM VALUE SELECT {list} FROM {} WHERE {new}",
            image(3)
        ),
        b'U' => {
            let old = if table.key.is_empty() {
                String::new()
            } else {
                format!(", {} o", image(4))
            };
            format!(
                "{ledger} UPDATE {q} AS x SET {} FROM {} r{old} WHERE {} AND {new}{}",
                assignments(table),
                image(3),
                matches(4),
                side.tenant_and("x")
            )
        }
        b'D' => {
            if table.key.is_empty() {
                format!(
                    "{ledger} DELETE FROM {q} AS x WHERE {} AND {new}{}",
                    matches(3),
                    side.tenant_and("x")
                )
            } else {
                format!(
                    "{ledger} DELETE FROM {q} AS x USING {} o WHERE {} AND {new}{}",
                    image(3),
                    matches(3),
                    side.tenant_and("x")
                )
            }
        }
        // DELETE, not TRUNCATE: foreign keys from tables truncated alongside would refuse a lone TRUNCATE
        // (their own 'T' entries follow), while DELETE under the replica role does not check them.
        b'T' => format!("{ledger} DELETE FROM {q} AS x WHERE {new}{}", side.tenant_and("x")),
        other => {
            return Err(MigrateError::Refused(format!(
                "unknown change-log operation {:?}",
                other as char
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendConfig;

    fn side() -> Endpoint {
        Endpoint {
            backend: crate::routing::BackendId::parse("b").unwrap(),
            config: BackendConfig::new("h", 5432, "u"),
            database: "d".into(),
            schema: "Ten\"ant".into(),
            filter: None,
        }
    }

    fn table(key: &[&str]) -> Table {
        Table {
            name: "or'ders".into(),
            columns: vec!["id".into(), "Note".into()],
            identity_always: vec![],
            key: key.iter().map(|k| k.to_string()).collect(),
        }
    }

    #[test]
    fn statements_quote_names_and_check_the_ledger() {
        let s = side();
        let insert = apply_sql(&s, &table(&["id"]), b'I').unwrap();
        assert!(insert.starts_with("WITH l AS (INSERT INTO pgtenant.applied"));
        assert!(insert.contains(r#"INSERT INTO "Ten""ant"."or'ders" ("id", "Note")"#));
        assert!(insert.ends_with("WHERE EXISTS (SELECT 1 FROM l)"));
        let update = apply_sql(&s, &table(&["id"]), b'U').unwrap();
        assert!(update.contains(r#"x."id" = o."id""#));
        assert!(update.contains("$4::text::jsonb) o"));
        let delete = apply_sql(&s, &table(&[]), b'D').unwrap();
        assert!(delete.contains("y::text = jsonb_populate_record"));
        assert!(apply_sql(&s, &table(&[]), b'X').is_err());
    }

    #[test]
    fn identity_always_columns_are_not_assigned() {
        let mut t = table(&["id"]);
        t.identity_always = vec!["id".into()];
        let update = apply_sql(&side(), &t, b'U').unwrap();
        assert!(!update.contains(r#""id" = r."id""#), "{update}");
        assert!(update.contains(r#""Note" = r."Note""#));
    }
}
