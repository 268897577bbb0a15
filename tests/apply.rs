//! The exactly-once applier on real PostgreSQL, below the proxy: passes of a [`Link`] between two databases,
//! with the layered statements, the unique-value fallback and a pass repeated by a second link after the
//! first one stopped before confirming; and the bulk copy's fence between two runs of it.

mod common;

use common::*;
use pgtenant::config::BackendConfig;
use pgtenant::migration::apply::Link;
use pgtenant::migration::failpoint::{Action, Failpoints};
use pgtenant::migration::pg::Endpoint;
use pgtenant::migration::{capture, catalog, copy, copy_fence};
use pgtenant::routing::BackendId;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

const SCHEMA: &str = "
CREATE SCHEMA t;
CREATE TABLE t.k (id int PRIMARY KEY, v text, u int UNIQUE);
CREATE TABLE t.h (n int, note text);
";

fn side(pg: &PgCluster, db: &str) -> Endpoint {
    Endpoint {
        backend: BackendId::parse(db).expect("backend name"),
        config: BackendConfig::new("127.0.0.1", pg.port, "postgres"),
        database: db.into(),
        schema: "t".into(),
        filter: None,
    }
}

async fn link(from: &Endpoint, to: &Endpoint) -> Link {
    let from_client = from.connect().await.expect("connect source");
    let to_client = to.connect().await.expect("connect target");
    capture::setup(&to_client)
        .await
        .expect("ledger on the target");
    let tables = catalog::tables(&from_client, "t").await.expect("tables");
    Link::new(from_client, to_client, to.clone(), tables)
}

/// Passes until the log is empty; returns how many entries they read.
async fn drain(link: &mut Link) -> usize {
    let mut total = 0;
    loop {
        let pass = link.pass("acme").await.expect("pass");
        if pass.read == 0 {
            return total;
        }
        total += pass.read;
    }
}

fn rows(pg: &PgCluster, db: &str) -> String {
    pg.psql(
        db,
        "SELECT string_agg(format('%s/%s/%s', id, v, u), ' ' ORDER BY id) FROM t.k \
         UNION ALL SELECT string_agg(format('%s/%s', n, note), ' ' ORDER BY n, note) FROM t.h",
    )
}

/// A cluster with databases `app` (the source, capture installed) and `dst` (the target), both holding two rows
/// of `t.k`, and an application connection to `app`.
async fn setup() -> (PgCluster, Endpoint, Endpoint, tokio_postgres::Client) {
    let pg = PgCluster::start();
    pg.psql("postgres", "CREATE DATABASE dst");
    for db in ["app", "dst"] {
        pg.psql(db, SCHEMA);
        pg.psql(db, "INSERT INTO t.k VALUES (1, 'a', 1), (2, 'b', 2)");
    }
    let (src, dst) = (side(&pg, "app"), side(&pg, "dst"));
    let admin = src.connect().await.expect("admin");
    let tables = ["k".to_string(), "h".to_string()];
    capture::install(&admin, &src, "acme", &tables, &CancellationToken::new())
        .await
        .expect("capture");
    let app = connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=app",
        pg.port
    ))
    .await
    .expect("application connection");
    (pg, src, dst, app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_apply_each_entry_once_in_log_order() {
    let (pg, src, dst, app) = setup().await;

    // Two equal rows into the table without a key and an update of the other: one statement.
    app.batch_execute(
        "INSERT INTO t.h VALUES (1, 'x'), (1, 'x'); UPDATE t.k SET v = 'a2' WHERE id = 1;",
    )
    .await
    .expect("writes");
    // A link applies the pass and stops before confirming it (the entries stay in the source's log).
    let mut first = link(&src, &dst).await;
    assert_eq!(first.pass("acme").await.expect("first pass").read, 3);
    drop(first);
    assert_eq!(rows(&pg, "dst"), rows(&pg, "app"));
    // Another link reads the same entries again with a new one: the cheap form's ledger insert fails on the
    // old ids, and the gated form applies the new entry only.
    app.batch_execute("INSERT INTO t.h VALUES (2, 'w')")
        .await
        .expect("a new entry");
    let mut second = link(&src, &dst).await;
    assert_eq!(drain(&mut second).await, 4);
    assert_eq!(rows(&pg, "dst"), rows(&pg, "app"));
    assert_eq!(pg.psql("dst", "SELECT count(*) FROM t.h"), "3");
    assert_eq!(
        (second.regated(), second.fallbacks()),
        (1, 0),
        "gated once, in layers"
    );

    // Two rows trading unique values through a third: collapsed per key, that is one UPDATE which fails on the
    // unique index, and the pass is applied entry by entry instead.
    app.batch_execute(
        "BEGIN; UPDATE t.k SET u = 3 WHERE id = 1; UPDATE t.k SET u = 1 WHERE id = 2;
                UPDATE t.k SET u = 2 WHERE id = 1; COMMIT;",
    )
    .await
    .expect("unique values traded");
    assert_eq!(drain(&mut second).await, 3);
    assert_eq!(rows(&pg, "dst"), rows(&pg, "app"));

    assert_eq!(
        second.fallbacks(),
        1,
        "the traded values went entry by entry"
    );

    // One pass with a table's delete, insert and update of one key (three layers) among another table's
    // insert, left unconfirmed: its ledger rows stay until the next pass.
    app.batch_execute(
        "BEGIN; DELETE FROM t.k WHERE id = 2; INSERT INTO t.k VALUES (2, 'c', 5);
                INSERT INTO t.h VALUES (3, 'y'); UPDATE t.k SET v = 'd' WHERE id = 2; COMMIT;",
    )
    .await
    .expect("three layers");
    assert_eq!(second.pass("acme").await.expect("pass").read, 4);
    assert_eq!(rows(&pg, "dst"), rows(&pg, "app"));
    assert_eq!(ledger(&pg), logged(&pg));
    // The next pass confirms it (the source's delete, then the ledger trim inside the next layered statement).
    app.batch_execute("INSERT INTO t.h VALUES (4, 'z')")
        .await
        .expect("one insert");
    assert_eq!(second.pass("acme").await.expect("pass").read, 1);
    assert_eq!(
        ledger(&pg),
        logged(&pg),
        "the ledger holds the last pass only"
    );
    assert_eq!(
        (second.regated(), second.fallbacks()),
        (1, 1),
        "no violation in these"
    );

    // Two layers whose second meets a unique violation while a trim is pending: the pass goes entry by entry,
    // and the trim with it.
    app.batch_execute(
        "BEGIN; INSERT INTO t.k VALUES (3, 'e', 7); UPDATE t.k SET u = 9 WHERE id = 1;
                UPDATE t.k SET u = 2 WHERE id = 2; UPDATE t.k SET u = 5 WHERE id = 1; COMMIT;",
    )
    .await
    .expect("values traded after an insert");
    assert_eq!(second.pass("acme").await.expect("pass").read, 4);
    assert_eq!(
        (second.regated(), second.fallbacks()),
        (1, 2),
        "no ledger retry"
    );
    assert_eq!(rows(&pg, "dst"), rows(&pg, "app"));
    assert_eq!(
        ledger(&pg),
        logged(&pg),
        "the ledger holds the last pass only"
    );
    assert_eq!(
        rows(&pg, "dst"),
        "1/a2/5 2/d/2 3/e/7\n1/x 1/x 2/w 3/y 4/z",
        "the target holds the source's rows"
    );

    // Confirmed outside a pass: the entries leave the log, then their ledger rows leave the target.
    second.tidy("acme").await.expect("tidy");
    assert_eq!(logged(&pg), "");
    assert_ne!(ledger(&pg), "");
    second.tidy("acme").await.expect("tidy");
    assert_eq!(ledger(&pg), "");
    assert_eq!(drain(&mut second).await, 0);
}

/// The ids in the target's ledger and in the source's change log.
fn ledger(pg: &PgCluster) -> String {
    pg.psql(
        "dst",
        "SELECT string_agg(id::text, ',' ORDER BY id) FROM pgtenant.applied",
    )
}

fn logged(pg: &PgCluster) -> String {
    pg.psql(
        "app",
        "SELECT string_agg(id::text, ',' ORDER BY id) FROM pgtenant.change_log",
    )
}

/// A pass of two layers whose second was applied and recorded while its first was not (source ids commit out
/// of order): the cheap form applies the first layer, fails on the second, and its transaction takes the first
/// back; the gated form then applies the first layer only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_recorded_in_part_is_applied_once() {
    let (pg, src, dst, app) = setup().await;
    // Layer 0: an insert into `h` and an update of `k`; layer 1: an insert into `k` (its second run).
    app.batch_execute(
        "BEGIN; INSERT INTO t.h VALUES (5, 'm'); UPDATE t.k SET v = 'p' WHERE id = 1;
                INSERT INTO t.k VALUES (4, 'q', 11); COMMIT;",
    )
    .await
    .expect("writes");
    let mut first = link(&src, &dst).await;
    assert_eq!(first.pass("acme").await.expect("first pass").read, 3);
    drop(first);
    // Undo layer 0 on the target, ledger rows and all, so only layer 1 stands applied.
    let layer1 = pg.psql(
        "app",
        "SELECT id FROM pgtenant.change_log WHERE tbl = 'k' AND op = 'I'",
    );
    pg.psql(
        "dst",
        &format!(
            "DELETE FROM pgtenant.applied WHERE id <> {layer1}; DELETE FROM t.h; \
             UPDATE t.k SET v = 'a' WHERE id = 1"
        ),
    );
    assert_eq!(ledger(&pg), layer1);

    let mut second = link(&src, &dst).await;
    assert_eq!(drain(&mut second).await, 3);
    assert_eq!((second.regated(), second.fallbacks()), (1, 0));
    assert_eq!(rows(&pg, "dst"), rows(&pg, "app"));
    assert_eq!(rows(&pg, "dst"), "1/p/1 2/b/2 4/q/11\n5/m");
}

/// A link that read entries and stalled (a frozen coordinator, a pass timed out with its statement still on the
/// wire) while the next link applied, confirmed and trimmed them: its late apply must not write the old row
/// image over the newer one. The next link's claim ended the stalled link's target session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_link_cannot_apply_after_the_next_one_took_over() {
    let (pg, src, dst, app) = setup().await;
    let mut stalled = link(&src, &dst).await;
    assert_eq!(stalled.pass("acme").await.expect("claiming pass").read, 0);
    app.batch_execute("UPDATE t.k SET v = 'old' WHERE id = 1")
        .await
        .expect("first write");
    // What the stalled link read before it stalled.
    let reader = src.connect().await.expect("reader");
    let read: Vec<_> = reader
        .query(
            "SELECT id, tbl, op, old_row::text, new_row::text FROM pgtenant.change_log ORDER BY id",
            &[],
        )
        .await
        .expect("read the log")
        .iter()
        .map(pgtenant::migration::rowsql::entry)
        .collect();
    assert_eq!(read.len(), 1);

    let mut next = link(&src, &dst).await;
    assert_eq!(drain(&mut next).await, 1);
    app.batch_execute("UPDATE t.k SET v = 'new' WHERE id = 1")
        .await
        .expect("second write");
    assert_eq!(drain(&mut next).await, 1);
    next.tidy("acme").await.expect("tidy");
    assert_eq!(ledger(&pg), "", "the first entry's ledger row is trimmed");
    assert_eq!(rows(&pg, "dst"), "1/new/1 2/b/2");

    let late = stalled.apply("acme", &read).await;
    assert!(late.is_err(), "the stalled link applied after the takeover");
    assert_eq!(rows(&pg, "dst"), rows(&pg, "app"));
    assert_eq!(rows(&pg, "dst"), "1/new/1 2/b/2");
    // The link that holds the target goes on.
    app.batch_execute("UPDATE t.k SET v = 'newer' WHERE id = 2")
        .await
        .expect("third write");
    assert_eq!(drain(&mut next).await, 1);
    assert_eq!(rows(&pg, "dst"), rows(&pg, "app"));
}

/// Lease generations fence the claim: a link of an older coordinator (lower generation) that comes back after a
/// newer one claimed the target is refused before it ends anyone, and the newer link goes on applying; a still
/// newer one takes the target over as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_of_an_older_lease_generation_is_refused() {
    let (pg, src, dst, app) = setup().await;
    let mut taker = link(&src, &dst).await;
    taker.generation = Some(7);
    assert_eq!(taker.pass("acme").await.expect("taker claims").read, 0);
    let mut thawed = link(&src, &dst).await;
    thawed.generation = Some(6);
    let refused = thawed.pass("acme").await;
    assert!(
        matches!(&refused, Err(e) if e.to_string().contains("newer coordinator")),
        "{refused:?}"
    );
    // Without generations the claim would have ended the taker's session; it still applies.
    app.batch_execute("UPDATE t.k SET v = 'kept' WHERE id = 1")
        .await
        .expect("write");
    assert_eq!(drain(&mut taker).await, 1);
    assert_eq!(rows(&pg, "dst"), rows(&pg, "app"));
    assert_eq!(
        pg.psql(
            "dst",
            "SELECT lock, generation FROM pgtenant.claim_generation"
        ),
        "pgtenant apply acme into t|7"
    );
    // A newer coordinator's link takes over, ending the taker's session.
    let mut newer = link(&src, &dst).await;
    newer.generation = Some(8);
    assert_eq!(newer.pass("acme").await.expect("newer claims").read, 0);
    app.batch_execute("UPDATE t.k SET v = 'newer' WHERE id = 2")
        .await
        .expect("write");
    assert!(
        taker.pass("acme").await.is_err(),
        "the taker's session was ended"
    );
    assert_eq!(drain(&mut newer).await, 1);
    assert_eq!(rows(&pg, "dst"), rows(&pg, "app"));
}

/// A copy's progress, unrecorded.
struct Quiet;

impl copy::CopyProgress for Quiet {
    fn rows(&self, _: u64) {}
    fn table_done(
        &self,
        _: &str,
        _: pgtenant::migration::record::TableCheckpoint,
    ) -> Result<(), pgtenant::migration::MigrateError> {
        Ok(())
    }
    fn stopped(&self) -> bool {
        false
    }
}

/// A run of the copy of `t.h` from `src` into `dst`, stopping at the failpoint `hang_at` (if any) until cleared.
async fn copy_run(
    src: &Endpoint,
    dst: &Endpoint,
    hang_at: Option<&str>,
) -> (
    Arc<Failpoints>,
    tokio::task::JoinHandle<Result<(), pgtenant::migration::MigrateError>>,
) {
    let failpoints = Arc::new(Failpoints::default());
    if let Some(name) = hang_at {
        failpoints.set(name, Some(Action::Hang));
    }
    let client = src.connect().await.expect("catalog");
    let tables = catalog::tables(&client, "t").await.expect("tables");
    let job = copy::CopyJob {
        tenant: pgtenant::tenant::TenantId::parse("acme").expect("tenant"),
        source: src.clone(),
        target: dst.clone(),
        tables: tables.into_iter().filter(|t| t.name == "h").collect(),
        batch_rows: 1000,
        parallel: 1,
        split_bytes: 0,
        failpoints: failpoints.clone(),
        stop: CancellationToken::new(),
        lease: None,
    };
    (failpoints, tokio::spawn(copy::run(job, Arc::new(Quiet))))
}

/// Polls `sql` on `db` until it answers `want` (up to 20 s).
async fn until(pg: &PgCluster, db: &str, sql: &str, want: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while pg.psql(db, sql) != want {
        assert!(
            std::time::Instant::now() < deadline,
            "{sql} never gave {want}; sessions: {}",
            pg.psql(
                db,
                "SELECT string_agg(application_name || ':' || state || ':' || query, E'\\n') \
                 FROM pg_stat_activity"
            )
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A coordinator that stalls in the middle of a bulk copy (a frozen process) while another takes the move
/// over and copies again: when it resumes, it writes nothing on the target. Stalled with its table's rows
/// sent and not committed, its commit fails (the new run ended its session): without the fence, the table
/// held each row twice. Stalled before its first stream connected, its streams refuse to write: without the
/// fence, its copy replaced the taker's, and what the tee had applied since was gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_copy_cannot_write_after_another_run_took_over() {
    let (pg, src, dst, app) = setup().await;
    app.batch_execute("INSERT INTO t.h SELECT g, 'row' FROM generate_series(1, 100) g")
        .await
        .expect("rows");
    let count = "SELECT count(*) FROM t.h";

    let (stalled, first) = copy_run(&src, &dst, Some("copy.before_commit")).await;
    until(
        &pg,
        "dst",
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgtenant-migration' \
         AND datname = 'dst' AND state = 'idle in transaction' AND query LIKE 'COPY%'",
        "1",
    )
    .await;
    let (_, second) = copy_run(&src, &dst, None).await;
    second.await.expect("task").expect("the second run copies");
    assert_eq!(pg.psql("dst", count), "100");
    stalled.set("copy.before_commit", None);
    assert!(
        first.await.expect("task").is_err(),
        "the stalled commit went through"
    );
    assert_eq!(pg.psql("dst", count), "100", "rows copied twice");

    let run = "SELECT run FROM pgtenant.copy_run";
    let before = pg.psql("dst", run);
    let (stalled, first) = copy_run(&src, &dst, Some("copy.after_claim")).await;
    until(
        &pg,
        "dst",
        &format!("SELECT run <> '{before}' FROM pgtenant.copy_run"),
        "t",
    )
    .await;
    let (_, second) = copy_run(&src, &dst, None).await;
    second.await.expect("task").expect("the third run copies");
    // What the tee applies once the copy is done.
    pg.psql("dst", "INSERT INTO t.h VALUES (101, 'applied later')");
    stalled.set("copy.after_claim", None);
    let late = first.await.expect("task");
    assert!(
        matches!(&late, Err(e) if e.to_string().contains("taken over")),
        "{late:?}"
    );
    assert_eq!(pg.psql("dst", count), "101", "the stalled run copied again");
    // An instance whose lease on the move is not confirmed takes nothing over.
    let recorded = pg.psql("dst", run);
    let stale = pgtenant::cluster::leases::LeaseClock::default();
    let refused = copy_fence::CopyRun::begin(&dst, "acme", Some(&stale)).await;
    assert!(
        matches!(&refused, Err(e) if e.to_string().contains("lease")),
        "{refused:?}"
    );
    assert_eq!(pg.psql("dst", run), recorded);
}
