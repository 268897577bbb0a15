//! Micro-benchmark of what the proxy does per tee pass besides waiting: planning the pass's batches and laying
//! them out as layer statements with their parameters (issue 16, the tee).

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use pgtenant::migration::batch::plan;
use pgtenant::migration::catalog::Table;
use pgtenant::migration::layers::{layer_ids, layer_params, layers, signature};
use pgtenant::migration::rowsql::Entry;

fn table(name: &str, columns: &[&str], key: &[&str]) -> Table {
    Table {
        name: name.into(),
        columns: columns.iter().map(|c| c.to_string()).collect(),
        identity_always: vec![],
        key: key.iter().map(|k| k.to_string()).collect(),
    }
}

/// Four TPC-B transactions as the change log has them: three keyed updates and an insert each.
fn tpcb_pass() -> (Vec<Entry>, HashMap<String, Table>) {
    let tables = [
        table(
            "pgbench_accounts",
            &["aid", "bid", "abalance", "filler"],
            &["aid"],
        ),
        table(
            "pgbench_tellers",
            &["tid", "bid", "tbalance", "filler"],
            &["tid"],
        ),
        table("pgbench_branches", &["bid", "bbalance", "filler"], &["bid"]),
        table(
            "pgbench_history",
            &["tid", "bid", "aid", "delta", "mtime", "filler"],
            &[],
        ),
    ];
    let filler = " ".repeat(84);
    let mut entries = Vec::new();
    let mut id = 1000;
    let mut push = |table: &str, op: u8, old: Option<String>, new: Option<String>| {
        id += 1;
        entries.push(Entry {
            id,
            table: table.into(),
            op: op as i8,
            old_row: old,
            new_row: new,
        });
    };
    for t in 0..4 {
        let (aid, tid, bid) = (4711 + t * 997, 3 + t, 1 + t % 2);
        let acc = |b: i32| {
            format!(r#"{{"aid": {aid}, "bid": {bid}, "abalance": {b}, "filler": "{filler}"}}"#)
        };
        push("pgbench_accounts", b'U', Some(acc(10)), Some(acc(-20)));
        let tel =
            |b: i32| format!(r#"{{"tid": {tid}, "bid": {bid}, "tbalance": {b}, "filler": null}}"#);
        push("pgbench_tellers", b'U', Some(tel(10)), Some(tel(-20)));
        let br = |b: i32| format!(r#"{{"bid": {bid}, "bbalance": {b}, "filler": null}}"#);
        push("pgbench_branches", b'U', Some(br(10)), Some(br(-20)));
        let hist = format!(
            r#"{{"tid": {tid}, "bid": {bid}, "aid": {aid}, "delta": -30, "mtime": "2026-12-06T18:00:00.123456", "filler": null}}"#
        );
        push("pgbench_history", b'I', None, Some(hist));
    }
    let tables = tables.into_iter().map(|t| (t.name.clone(), t)).collect();
    (entries, tables)
}

fn pass_planning(c: &mut Criterion) {
    let (entries, tables) = tpcb_pass();
    c.bench_function("tee_pass/plan_and_lay_out_16_entries", |b| {
        b.iter(|| {
            let work = plan(black_box(&entries), &tables);
            let layers = layers(&work).expect("batches only");
            let tenant = "acme";
            let trim: Vec<i64> = Vec::new();
            let mut n = 0;
            for layer in &layers {
                let sig = signature(layer);
                let ids = layer_ids(layer);
                n += sig.len() + layer_params(&tenant, &ids, &trim, layer).len();
            }
            black_box(n)
        })
    });
}

criterion_group!(benches, pass_planning);
criterion_main!(benches);
