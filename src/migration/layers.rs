//! A pass's batches as few statements: one per layer, where layer `n` holds the `n`-th batch of each table.
//!
//! Each statement of the per-batch form costs the target a Bind/Execute/Sync of its own and a ledger insert of
//! its own, and a pass of the usual shape (one run of updates or inserts per table) is several of them plus
//! `BEGIN`, the ledger trim and `COMMIT`. One statement whose data-modifying CTEs each change one table does
//! the same work: the ledger insert once for the layer, the trim of confirmed ledger rows in the first layer,
//! and a pass of one layer is one statement in its own implicit transaction. What makes it equal to the
//! per-batch form: CTEs of one statement all run on one snapshot and cannot see each other's changes, so a
//! layer never holds two batches of one table (a table's later batch goes to a later layer, a statement of its
//! own that sees the earlier ones); tables are independent because changes are applied under the replica role
//! (no foreign-key checks, no user triggers); the trimmed ledger ids were confirmed gone from the log before
//! this pass read it, so they are never among the ids the layer inserts. A layer comes in both forms of
//! [`Gate`]: the cheap one, tried first, and the gated one, used when the cheap one met a recorded id.

use std::collections::HashMap;

use tokio_postgres::types::ToSql;

use super::batch::{batch_dml, ledger_cte, Gate, Work};
use super::catalog::Table;
use super::pg::Endpoint;
use super::MigrateError;

/// What a layer's statement is made from: (table, batch kind) per batch, in order. Its prepared-statement key.
pub type Signature = Vec<(String, u8)>;

/// The batches of `work` in layers, or `None` when `work` holds an entry applied by itself (those keep their
/// own statements, in order). Within a layer batches are sorted by table (they are independent), so the same
/// tables make the same statement whatever order the pass met them in.
pub fn layers<'w, 'a>(work: &'w [Work<'a>]) -> Option<Vec<Vec<&'w Work<'a>>>> {
    let mut layers: Vec<Vec<&Work>> = Vec::new();
    let mut depth: HashMap<&str, usize> = HashMap::new();
    for w in work {
        let table = match w {
            Work::One(_) => return None,
            Work::Rows { table, .. } | Work::Updates { table, .. } => *table,
        };
        let n = depth.entry(table).or_insert(0);
        if layers.len() <= *n {
            layers.push(Vec::new());
        }
        layers[*n].push(w);
        *n += 1;
    }
    for layer in &mut layers {
        layer.sort_by(|a, b| table_of(a).cmp(table_of(b)));
    }
    Some(layers)
}

fn table_of<'a>(w: &Work<'a>) -> &'a str {
    match w {
        Work::Rows { table, .. } | Work::Updates { table, .. } => table,
        Work::One(e) => &e.table,
    }
}

pub fn signature(layer: &[&Work<'_>]) -> Signature {
    layer
        .iter()
        .map(|w| match w {
            Work::Rows { table, kind, .. } => ((*table).to_owned(), *kind),
            Work::Updates { table, .. } => ((*table).to_owned(), b'u'),
            Work::One(e) => (e.table.clone(), e.op as u8),
        })
        .collect()
}

/// The statement of a layer. Parameters: $1 tenant, $2 every id of the layer (for the ledger), $3 ledger ids
/// to trim, then per batch its gating ids and its images.
pub fn layer_sql(
    side: &Endpoint,
    tables: &HashMap<String, Table>,
    signature: &[(String, u8)],
    gate: Gate,
) -> Result<String, MigrateError> {
    let mut sql = format!(
        "WITH {}, t AS (DELETE FROM pgtenant.applied WHERE tenant = $1 AND id = ANY($3::bigint[]))",
        ledger_cte("$2", gate)
    );
    for (i, (name, kind)) in signature.iter().enumerate() {
        let table = tables.get(name).ok_or_else(|| {
            MigrateError::Refused(format!(
                "change log names table {name:?}, which is not part of the migration"
            ))
        })?;
        let (ids, images) = (format!("${}", 4 + 2 * i), format!("${}", 5 + 2 * i));
        let dml = batch_dml(side, table, *kind, &ids, &images, gate).ok_or_else(|| {
            MigrateError::Refused(format!(
                "no batch statement for {name:?} ({})",
                *kind as char
            ))
        })?;
        sql.push_str(&format!(", w{i} AS ({dml})"));
    }
    sql.push_str(" SELECT count(*) FROM l");
    Ok(sql)
}

/// The ledger ids of a layer ($2): every id of each batch.
pub fn layer_ids(layer: &[&Work<'_>]) -> Vec<i64> {
    let mut ids = Vec::new();
    for w in layer {
        match w {
            Work::Rows { ids: i, .. } | Work::Updates { ids: i, .. } => ids.extend_from_slice(i),
            Work::One(e) => ids.push(e.id),
        }
    }
    ids
}

/// A layer's parameters in [`layer_sql`]'s order, borrowing from the batches and the caller's arrays.
pub fn layer_params<'p>(
    tenant: &'p &'p str,
    all_ids: &'p Vec<i64>,
    trim: &'p Vec<i64>,
    layer: &[&'p Work<'_>],
) -> Vec<&'p (dyn ToSql + Sync)> {
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![tenant, all_ids, trim];
    for w in layer {
        match w {
            Work::Rows { ids, images, .. } => {
                params.push(ids);
                params.push(images);
            }
            Work::Updates {
                last_ids, images, ..
            } => {
                params.push(last_ids);
                params.push(images);
            }
            // Never in a layer (see [`layers`]).
            Work::One(_) => {}
        }
    }
    params
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::batch::plan;
    use crate::migration::batch::tests::{e, tables, upd};

    #[test]
    fn a_tables_later_batches_go_to_later_layers_sorted_by_table() {
        let entries = vec![
            upd(1, "a", r#"{"k":1,"v":1}"#, r#"{"k":1,"v":2}"#),
            e(2, "h", b'I', None, Some(r#"{"k":9,"v":0}"#)),
            e(3, "a", b'D', Some(r#"{"k":1,"v":2}"#), None),
            e(4, "b", b'I', None, Some(r#"{"k":1,"v":0}"#)),
            e(5, "a", b'I', None, Some(r#"{"k":1,"v":7}"#)),
        ];
        let work = plan(&entries, &tables());
        let layers = layers(&work).expect("only batches");
        let sigs: Vec<Signature> = layers.iter().map(|l| signature(l)).collect();
        let s = |t: &str, k: u8| (t.to_string(), k);
        assert_eq!(
            sigs,
            vec![
                vec![s("a", b'u'), s("b", b'i'), s("h", b'i')],
                vec![s("a", b'd')],
                vec![s("a", b'i')],
            ]
        );
        assert_eq!(layer_ids(&layers[0]), vec![1, 4, 2]);
        let (tenant, all, trim) = ("t", layer_ids(&layers[0]), vec![]);
        assert_eq!(
            layer_params(&tenant, &all, &trim, &layers[0]).len(),
            3 + 2 * 3
        );
    }

    #[test]
    fn an_entry_applied_by_itself_keeps_the_per_batch_form() {
        let entries = vec![
            upd(1, "a", r#"{"k":1,"v":1}"#, r#"{"k":1,"v":2}"#),
            upd(2, "h", r#"{"k":9,"v":0}"#, r#"{"k":9,"v":1}"#),
        ];
        let work = plan(&entries, &tables());
        assert!(layers(&work).is_none());
    }

    #[test]
    fn the_statement_numbers_each_batchs_arrays_after_the_fixed_ones() {
        let side = Endpoint {
            backend: crate::routing::BackendId::parse("b").expect("backend name"),
            config: crate::config::BackendConfig::new("h", 5432, "u"),
            database: "d".into(),
            schema: "s".into(),
            filter: None,
        };
        let sig = vec![("a".to_string(), b'u'), ("h".to_string(), b'i')];
        let sql = layer_sql(&side, &tables(), &sig, Gate::Ledger).expect("known tables");
        assert!(
            sql.starts_with("WITH l AS (INSERT INTO pgtenant.applied"),
            "{sql}"
        );
        assert!(sql.contains("unnest($2::bigint[])"), "{sql}");
        assert!(sql.contains("id = ANY($3::bigint[])"), "{sql}");
        assert!(sql.contains(r#"w0 AS (UPDATE "s"."a" AS x"#), "{sql}");
        assert!(sql.contains("unnest($4::bigint[], $5::text[])"), "{sql}");
        assert!(sql.contains(r#"w1 AS (INSERT INTO "s"."h""#), "{sql}");
        assert!(sql.contains("unnest($6::bigint[], $7::text[])"), "{sql}");
        let unknown = vec![("zz".to_string(), b'i')];
        let fail = layer_sql(&side, &tables(), &sig, Gate::Fail).expect("known tables");
        assert!(
            !fail.contains("ON CONFLICT") && !fail.contains("JOIN l"),
            "{fail}"
        );
        assert!(
            fail.contains("unnest($4::bigint[], $5::text[]) AS u(id, img) CROSS JOIN"),
            "{fail}"
        );
        assert!(layer_sql(&side, &tables(), &unknown, Gate::Ledger).is_err());
    }
}
