//! Batching a pass's entries into few statements. Entries of different tables are independent (changes are
//! applied with `session_replication_role = replica`: no foreign-key checks, no user triggers), so each table's
//! entries are applied together, in log order within the table, as runs of one operation: a run of inserts or of
//! key deletes is one statement over arrays, and a run of key updates keeps only the last image per key (the
//! row's state after the run). Every entry id still goes through the ledger: in the gated form ([`Gate::Ledger`])
//! each image applies only if its entry is new to the ledger, so a pass re-read after a crash applies exactly
//! what was not applied yet; in the cheap form ([`Gate::Fail`]) an id the ledger has fails the whole pass,
//! which is then applied in the gated form.

use std::collections::HashMap;

use serde_json::value::RawValue;

use super::catalog::Table;
use super::pg::Endpoint;
use super::rowsql::{assignments, key_match, Entry};
use crate::quote::quote_ident;

/// One statement of a pass.
#[derive(Debug, PartialEq, Eq)]
pub enum Work<'a> {
    /// An entry applied by itself (see [`super::rowsql::apply_sql`]).
    One(&'a Entry),
    /// A run of inserts (`kind` b'i') or key deletes (b'd'): `(id, image)` pairs.
    Rows {
        table: &'a str,
        kind: u8,
        ids: Vec<i64>,
        images: Vec<&'a str>,
    },
    /// A run of key updates: every id of the run for the ledger; per key, the last entry's id and new image.
    Updates {
        table: &'a str,
        ids: Vec<i64>,
        last_ids: Vec<i64>,
        images: Vec<&'a str>,
    },
}

/// The statements for `entries` (in log order), by table, then by runs of one operation.
pub fn plan<'a>(entries: &'a [Entry], tables: &HashMap<String, Table>) -> Vec<Work<'a>> {
    let mut order: Vec<&str> = Vec::new();
    let mut by_table: HashMap<&str, Vec<&Entry>> = HashMap::new();
    for e in entries {
        by_table
            .entry(e.table.as_str())
            .or_insert_with(|| {
                order.push(e.table.as_str());
                Vec::new()
            })
            .push(e);
    }
    let mut work = Vec::new();
    for name in order {
        let list = &by_table[name];
        let key = tables.get(name).map(|t| t.key.as_slice()).unwrap_or(&[]);
        let mut i = 0;
        while i < list.len() {
            let op = list[i].op;
            let end = list[i..]
                .iter()
                .position(|e| e.op != op)
                .map_or(list.len(), |n| i + n);
            plan_run(name, key, &list[i..end], &mut work);
            i = end;
        }
    }
    work
}

fn plan_run<'a>(table: &'a str, key: &[String], run: &[&'a Entry], work: &mut Vec<Work<'a>>) {
    match (run[0].op as u8, key.is_empty()) {
        (b'I', _) => rows(table, b'i', run, |e| e.new_row.as_deref(), work),
        (b'D', false) => rows(table, b'd', run, |e| e.old_row.as_deref(), work),
        (b'U', false) => updates(table, key, run, work),
        _ => work.extend(run.iter().map(|e| Work::One(e))),
    }
}

fn rows<'a>(
    table: &'a str,
    kind: u8,
    run: &[&'a Entry],
    image: impl Fn(&'a Entry) -> Option<&'a str>,
    work: &mut Vec<Work<'a>>,
) {
    let (mut ids, mut images) = (Vec::new(), Vec::new());
    for e in run {
        match image(e) {
            Some(img) => {
                ids.push(e.id);
                images.push(img);
            }
            None => work.push(Work::One(e)),
        }
    }
    if !ids.is_empty() {
        work.push(Work::Rows {
            table,
            kind,
            ids,
            images,
        });
    }
}

/// Collapses a run of updates to the last image per key. An update that changes its key (or whose images cannot
/// be read) ends the batch and is applied by itself, so order around it is kept.
fn updates<'a>(table: &'a str, key: &[String], run: &[&'a Entry], work: &mut Vec<Work<'a>>) {
    let mut batch = Collapsed::default();
    for e in run {
        let keys = match (e.old_row.as_deref(), e.new_row.as_deref()) {
            (Some(old), Some(new)) => key_of(old, key).zip(key_of(new, key)).zip(Some(new)),
            _ => None,
        };
        match keys {
            Some(((old, new_key), img)) if old == new_key => batch.add(e.id, old, img),
            _ => {
                batch.flush(table, work);
                work.push(Work::One(e));
            }
        }
    }
    batch.flush(table, work);
}

#[derive(Default)]
struct Collapsed<'a> {
    ids: Vec<i64>,
    slot: HashMap<String, usize>,
    last_ids: Vec<i64>,
    images: Vec<&'a str>,
}

impl<'a> Collapsed<'a> {
    fn add(&mut self, id: i64, key: String, image: &'a str) {
        self.ids.push(id);
        match self.slot.get(&key) {
            Some(&i) => {
                self.last_ids[i] = id;
                self.images[i] = image;
            }
            None => {
                self.slot.insert(key, self.images.len());
                self.last_ids.push(id);
                self.images.push(image);
            }
        }
    }

    fn flush(&mut self, table: &'a str, work: &mut Vec<Work<'a>>) {
        if self.ids.is_empty() {
            return;
        }
        let done = std::mem::take(self);
        work.push(Work::Updates {
            table,
            ids: done.ids,
            last_ids: done.last_ids,
            images: done.images,
        });
    }
}

/// The key columns' values of a row image, as their raw JSON text (PostgreSQL renders each value one way, and
/// parsing numbers would round keys beyond 2^53 together).
fn key_of(image: &str, key: &[String]) -> Option<String> {
    // Borrowed from the image, no copy of each field (this runs for two images of every keyed update); a column
    // name whose JSON holds an escape cannot be borrowed and takes the owned form.
    if let Ok(row) = serde_json::from_str::<HashMap<&str, &RawValue>>(image) {
        return joined(key.iter().map(|k| row.get(k.as_str()).map(|v| v.get())));
    }
    let row: HashMap<String, Box<RawValue>> = serde_json::from_str(image).ok()?;
    joined(key.iter().map(|k| row.get(k).map(|v| v.get())))
}

/// The values joined, or `None` when one is missing.
fn joined<'a>(values: impl Iterator<Item = Option<&'a str>>) -> Option<String> {
    let values: Vec<&str> = values.collect::<Option<_>>()?;
    // A raw JSON text never holds a bare U+001F (JSON escapes control characters), so this join is unambiguous.
    Some(values.join("\u{1f}"))
}

/// The statement of a batch `kind` (b'i', b'd', b'u') for `table` on `side`. Parameters: $1 tenant, $2 every id
/// (for the ledger); for b'i'/b'd' $3 the images; for b'u' $3 the gating ids and $4 the images.
pub fn batch_sql(side: &Endpoint, table: &Table, kind: u8) -> Option<String> {
    let (ids, images) = if kind == b'u' {
        ("$3", "$4")
    } else {
        ("$2", "$3")
    };
    let dml = batch_dml(side, table, kind, ids, images, Gate::Ledger)?;
    Some(format!("WITH {} {dml}", ledger_cte("$2", Gate::Ledger)))
}

/// How a statement keeps an entry from being applied twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Gate {
    /// Each image applies only if its id was new to the ledger (`ON CONFLICT DO NOTHING`, joined per image).
    Ledger,
    /// The ledger insert fails the whole statement on an id already there (a unique violation), so the images
    /// apply unconditionally; the caller then tries again with [`Gate::Ledger`]. Cheaper: no speculative
    /// insertion, no join.
    Fail,
}

/// `l AS (...)`: records the ids of the array parameter `ids` in the ledger and yields those that were new.
pub fn ledger_cte(ids: &str, gate: Gate) -> String {
    let conflict = match gate {
        Gate::Ledger => " ON CONFLICT DO NOTHING",
        Gate::Fail => "",
    };
    format!(
        "l AS (INSERT INTO pgtenant.applied (tenant, id) SELECT $1, unnest({ids}::bigint[]){conflict} \
         RETURNING id)"
    )
}

/// The data change of a batch `kind` for `table` on `side`, without its ledger: it applies the images (array
/// parameter `images`) whose ids (array parameter `ids`, the same length) the ledger CTE `l` yields as new
/// ([`Gate::Ledger`]), or all of them ([`Gate::Fail`]).
pub fn batch_dml(
    side: &Endpoint,
    table: &Table,
    kind: u8,
    ids: &str,
    images: &str,
    gate: Gate,
) -> Option<String> {
    let q = side.qualified(&table.name);
    let join = match gate {
        Gate::Ledger => " JOIN l ON l.id = u.id",
        Gate::Fail => "",
    };
    let rows = |alias: &str| {
        format!(
            "unnest({ids}::bigint[], {images}::text[]) AS u(id, img){join} \
             CROSS JOIN LATERAL jsonb_populate_record(NULL::{q}, u.img::jsonb) AS {alias}"
        )
    };
    let cols: Vec<String> = table.columns.iter().map(|c| quote_ident(c)).collect();
    Some(match kind {
        b'i' => format!(
            "INSERT INTO {q} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM {}",
            cols.join(", "),
            cols.iter()
                .map(|c| format!("r.{c}"))
                .collect::<Vec<_>>()
                .join(", "),
            rows("r")
        ),
        b'd' if !table.key.is_empty() => format!(
            "DELETE FROM {q} AS x USING {} WHERE {}{}",
            rows("o"),
            key_match(table, "o"),
            side.tenant_and("x")
        ),
        b'u' if !table.key.is_empty() => format!(
            "UPDATE {q} AS x SET {} FROM {} WHERE {}{}",
            assignments(table),
            rows("r"),
            key_match(table, "r"),
            side.tenant_and("x")
        ),
        _ => return None,
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::migration) fn e(
        id: i64,
        table: &str,
        op: u8,
        old: Option<&str>,
        new: Option<&str>,
    ) -> Entry {
        Entry {
            id,
            table: table.into(),
            op: op as i8,
            old_row: old.map(String::from),
            new_row: new.map(String::from),
        }
    }

    /// An update entry with its old and new images.
    pub(in crate::migration) fn upd(id: i64, table: &str, old: &str, new: &str) -> Entry {
        e(id, table, b'U', Some(old), Some(new))
    }

    /// Tables `a` and `b` keyed by `k`, `h` without a key; columns `k` and `v`.
    pub(in crate::migration) fn tables() -> HashMap<String, Table> {
        let t = |name: &str, key: &[&str]| Table {
            name: name.into(),
            columns: vec!["k".into(), "v".into()],
            identity_always: vec![],
            key: key.iter().map(|s| s.to_string()).collect(),
        };
        [
            ("a", t("a", &["k"])),
            ("b", t("b", &["k"])),
            ("h", t("h", &[])),
        ]
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect()
    }

    #[test]
    fn updates_collapse_per_key_and_tables_batch_separately() {
        let entries = vec![
            upd(1, "a", r#"{"k":1,"v":1}"#, r#"{"k":1,"v":2}"#),
            e(2, "h", b'I', None, Some(r#"{"k":9,"v":0}"#)),
            upd(3, "a", r#"{"k":2,"v":1}"#, r#"{"k":2,"v":5}"#),
            upd(4, "a", r#"{"k":1,"v":2}"#, r#"{"k":1,"v":3}"#),
            e(5, "h", b'I', None, Some(r#"{"k":9,"v":1}"#)),
            e(6, "a", b'D', Some(r#"{"k":2,"v":5}"#), None),
        ];
        let work = plan(&entries, &tables());
        assert_eq!(
            work,
            vec![
                Work::Updates {
                    table: "a",
                    ids: vec![1, 3, 4],
                    last_ids: vec![4, 3],
                    images: vec![r#"{"k":1,"v":3}"#, r#"{"k":2,"v":5}"#],
                },
                Work::Rows {
                    table: "a",
                    kind: b'd',
                    ids: vec![6],
                    images: vec![r#"{"k":2,"v":5}"#],
                },
                Work::Rows {
                    table: "h",
                    kind: b'i',
                    ids: vec![2, 5],
                    images: vec![r#"{"k":9,"v":0}"#, r#"{"k":9,"v":1}"#],
                },
            ]
        );
    }

    #[test]
    fn keys_are_read_from_images_whatever_their_column_names() {
        let key = vec!["k".to_string(), "a\"b".to_string()];
        assert_eq!(
            key_of(r#"{"a\"b": "x", "k": 12345678901234567890, "v": 1}"#, &key).as_deref(),
            Some("12345678901234567890\u{1f}\"x\"")
        );
        assert_eq!(key_of(r#"{"k": 1}"#, &key), None);
        assert_eq!(key_of("not json", &key), None);
    }

    #[test]
    fn key_changes_and_tables_without_keys_go_one_by_one() {
        let entries = vec![
            upd(1, "a", r#"{"k":1,"v":1}"#, r#"{"k":1,"v":2}"#),
            upd(2, "a", r#"{"k":1,"v":2}"#, r#"{"k":7,"v":2}"#),
            upd(3, "a", r#"{"k":7,"v":2}"#, r#"{"k":7,"v":3}"#),
            upd(4, "h", r#"{"k":9,"v":0}"#, r#"{"k":9,"v":1}"#),
            e(5, "h", b'T', None, None),
        ];
        let work = plan(&entries, &tables());
        assert_eq!(work.len(), 5);
        assert!(matches!(&work[0], Work::Updates { ids, .. } if ids == &vec![1]));
        assert_eq!(work[1], Work::One(&entries[1]));
        assert!(matches!(&work[2], Work::Updates { ids, .. } if ids == &vec![3]));
        assert_eq!(work[3], Work::One(&entries[3]));
        assert_eq!(work[4], Work::One(&entries[4]));
    }
}
