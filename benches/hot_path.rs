//! Micro-benchmarks of what the relay does per frame and per transaction: scanning frames, looking up a route,
//! checking query text for tenant statements, and tracking session state.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pgtenant::frontend::state::SessionState;
use pgtenant::protocol::frame::{Direction, Scan, Scanner};
use pgtenant::protocol::inspect;
use pgtenant::protocol::sql;
use pgtenant::routing::{BackendId, Epoch, Route, Router, RoutingTable};
use pgtenant::tenant::TenantId;

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// A backend reply like pgbench -S gets, repeated: RowDescription-sized, DataRow, CommandComplete, ReadyForQuery.
fn backend_stream(replies: usize) -> Vec<u8> {
    let mut one = frame(b'T', &[0u8; 27]);
    one.extend(frame(b'D', &[0u8; 14]));
    one.extend(frame(b'C', b"SELECT 1\0"));
    one.extend(frame(b'Z', b"I"));
    one.repeat(replies)
}

fn scan_all(buf: &[u8]) -> usize {
    let mut s = Scanner::new(Direction::FromBackend, 1 << 20);
    let mut at = 0;
    let mut frames = 0;
    while let Ok(step) = s.next(&buf[at..], |t| matches!(t, b'Z' | b'S' | b'E')) {
        let n = match step {
            Scan::Whole(h) => {
                frames += 1;
                h.total
            }
            Scan::Head { avail, .. } => avail,
            Scan::Rest(n) => n,
            Scan::NeedMore(_) => break,
        };
        at += n;
    }
    frames
}

fn frames(c: &mut Criterion) {
    let buf = backend_stream(1000);
    let mut g = c.benchmark_group("frame_scan");
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.bench_function("backend_replies", |b| b.iter(|| scan_all(black_box(&buf))));
    let big = frame(b'D', &vec![7u8; 4 << 20]);
    g.throughput(Throughput::Bytes(big.len() as u64));
    g.bench_function("one_4MiB_datarow", |b| b.iter(|| scan_all(black_box(&big))));
    g.finish();
}

fn table_of(n: usize) -> RoutingTable {
    let mut routes = std::collections::HashMap::new();
    for i in 0..n {
        let id = TenantId::parse(&format!("tenant{i}")).unwrap_or_else(|_| unreachable!());
        let route = Route::new(BackendId::parse("b").unwrap(), None, Some(format!("s{i}")));
        routes.insert(id, Arc::new(route));
    }
    RoutingTable::new(Epoch(1), routes)
}

/// Sets tenant `i`'s route to a new schema (nothing persisted): the in-memory part of `tenant set`.
fn change(router: &Arc<Router>, i: usize) {
    let id = TenantId::parse(&format!("tenant{i}")).unwrap_or_else(|_| unreachable!());
    let route = Arc::new(Route::new(
        BackendId::parse("b").unwrap(),
        None,
        Some(format!("x{i}")),
    ));
    let _ = router.update::<()>(
        |c| {
            c.insert(id, route);
            Ok(())
        },
        |_, _| Ok(()),
    );
}

fn routing(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_lookup");
    for n in [1usize, 10_000, 1_000_000] {
        let router = Router::new(table_of(n));
        let probe = format!("tenant{}", n / 2);
        g.bench_with_input(BenchmarkId::from_parameter(n), &probe, |b, probe| {
            b.iter(|| router.load().get(black_box(probe)).map(|r| r.backend.len()))
        });
    }
    // With changes made since the table's base was built: a changed tenant and an unchanged one.
    let router = Arc::new(Router::new(table_of(100_000)));
    for i in 0..1000 {
        change(&router, i * 7);
    }
    for probe in ["tenant700", "tenant701"] {
        g.bench_with_input(
            BenchmarkId::new("100000_after_1000_changes", probe),
            &probe,
            |b, probe| b.iter(|| router.load().get(black_box(probe)).map(|r| r.backend.len())),
        );
    }
    g.finish();
    // A route change is linear in the changes since the last fold, not in the tenants.
    let mut g = c.benchmark_group("route_change");
    for n in [10_000usize, 100_000] {
        let router = Arc::new(Router::new(table_of(n)));
        let mut i = 0;
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                i = (i + 7919) % n;
                change(&router, i)
            })
        });
    }
    g.finish();
}

fn recogniser(c: &mut Criterion) {
    let mut g = c.benchmark_group("tenant_statement");
    let ordinary = b"UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2";
    g.bench_function("ordinary_query", |b| {
        b.iter(|| sql::recognise(black_box(ordinary)))
    });
    let set = b"SET pgtenant.tenant = 'acme'";
    g.bench_function("set_statement", |b| {
        b.iter(|| sql::recognise(black_box(set)))
    });
    g.finish();
    // The one pass both checks start from (`sql::Words`): every Query and Parse.
    let mut g = c.benchmark_group("statement_words");
    g.bench_function("ordinary_query", |b| {
        b.iter(|| sql::Words::of(black_box(ordinary)))
    });
    let long =
        "SELECT o.id, o.total, c.name FROM orders o JOIN customers c ON c.id = o.customer_id "
            .repeat(12);
    g.bench_function("query_of_1_kib", |b| {
        b.iter(|| sql::Words::of(black_box(long.as_bytes())))
    });
    g.finish();
    // Session-state tracking looks at every simple query the client sends.
    let mut g = c.benchmark_group("session_state_classify");
    g.bench_function("ordinary_query", |b| {
        b.iter(|| sql::classify(black_box(ordinary)))
    });
    let tracked = b"SET work_mem = '64MB'";
    g.bench_function("session_set", |b| {
        b.iter(|| sql::classify(black_box(tracked)))
    });
    g.finish();
}

/// Session-state tracking, per round trip: what the relay books for each client frame it forwards and each
/// backend frame it passes on (pgbench's statements, unnamed, as -M simple and -M extended send them).
fn session_state(c: &mut Criterion) {
    let text = b"UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2\0";
    let query = frame(b'Q', text);
    let mut parse_body = vec![0u8];
    parse_body.extend_from_slice(text);
    parse_body.extend_from_slice(&[0, 0]);
    let parse = frame(b'P', &parse_body);
    let sync = frame(b'S', b"");
    let complete = frame(b'C', b"UPDATE 1\0");
    let ready = frame(b'Z', b"I");
    let parsed = frame(b'1', b"");
    let mut g = c.benchmark_group("session_state_track");
    let mut st = SessionState::default();
    g.bench_function("simple_query_round_trip", |b| {
        b.iter(|| {
            st.on_client(b'Q', Some(black_box(&query)), true);
            st.on_backend(b'C', black_box(&complete));
            st.on_backend(b'Z', black_box(&ready));
        })
    });
    let mut st = SessionState::default();
    g.bench_function("extended_statement_round_trip", |b| {
        b.iter(|| {
            st.on_client(b'P', Some(black_box(&parse)), false);
            for tag in [b'B', b'D', b'E'] {
                st.on_client(tag, None, false);
            }
            st.on_client(b'S', Some(black_box(&sync)), true);
            st.on_backend(b'1', black_box(&parsed));
            st.on_backend(b'C', black_box(&complete));
            st.on_backend(b'Z', black_box(&ready));
        })
    });
    g.finish();
}

/// A NoticeResponse's body: its fields (type byte, value, NUL), then the closing NUL.
fn notice(fields: &[(u8, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (t, v) in fields {
        body.push(*t);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    frame(b'N', &body)
}

/// What the relay reads of backend replies for the migration tee: every CommandComplete's tag (did the
/// transaction write, is it a commit), every NoticeResponse's code and severity (the capture trigger's word).
fn reply_inspection(c: &mut Criterion) {
    let mut g = c.benchmark_group("reply_inspection");
    let update = frame(b'C', b"UPDATE 1\0");
    let select = frame(b'C', b"SELECT 1\0");
    g.bench_function("write_tag_update", |b| {
        b.iter(|| inspect::is_write_tag(black_box(&update)))
    });
    g.bench_function("write_tag_select", |b| {
        b.iter(|| inspect::is_write_tag(black_box(&select)))
    });
    let commit = frame(b'C', b"COMMIT\0");
    g.bench_function("commit_tag_commit", |b| {
        b.iter(|| inspect::commit_tag(black_box(&commit)))
    });
    g.bench_function("commit_tag_update", |b| {
        b.iter(|| inspect::commit_tag(black_box(&update)))
    });
    let capture = notice(&[
        (b'S', "NOTICE"),
        (b'V', "NOTICE"),
        (b'C', "PT001"),
        (
            b'M',
            "pgtenant: change captured for a tenant being migrated",
        ),
        (b'W', "PL/pgSQL function pgtenant.note() line 3 at RAISE"),
        (b'F', "pl_exec.c"),
        (b'L', "3893"),
        (b'R', "exec_stmt_raise"),
    ]);
    let other = notice(&[
        (b'S', "NOTICE"),
        (b'V', "NOTICE"),
        (b'C', "00000"),
        (b'M', "relation \"t\" already exists, skipping"),
        (b'F', "parse_utilcmd.c"),
        (b'L', "207"),
        (b'R', "transformCreateStmt"),
    ]);
    g.bench_function("capture_notice", |b| {
        b.iter(|| inspect::is_capture_notice(black_box(&capture)))
    });
    g.bench_function("application_notice", |b| {
        b.iter(|| inspect::is_capture_notice(black_box(&other)))
    });
    g.finish();
}

criterion_group!(
    benches,
    frames,
    routing,
    recogniser,
    session_state,
    reply_inspection
);
criterion_main!(benches);
