//! Live migration end to end on real PostgreSQL: bulk copy, the exact tee under pgbench load, verification,
//! cutover, rollback, finalize and abort, restarts and failures at named failpoints.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::moves::*;
use common::*;
use pgtenant::migration::failpoint::Action;
use serde_json::{json, Value};

/// Tables that catch every way statement replay would diverge: serial and identity keys, now() and random()
/// defaults, a table without primary key, a cascading foreign key and a trigger-maintained column.
const SCHEMA: &str = "
CREATE SCHEMA tenant_acme;
SET search_path = tenant_acme;
CREATE TABLE orders (id serial PRIMARY KEY, created timestamptz NOT NULL DEFAULT now(), r float8 DEFAULT random(), note text);
CREATE TABLE items (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, order_id int NOT NULL REFERENCES orders(id) ON DELETE CASCADE, qty int, tag uuid DEFAULT gen_random_uuid());
CREATE TABLE events (at timestamptz DEFAULT clock_timestamp(), what text, data jsonb);
CREATE TABLE counters (k text PRIMARY KEY, v int NOT NULL, changes int NOT NULL DEFAULT 0, doubled int GENERATED ALWAYS AS (v * 2) STORED);
CREATE FUNCTION bump() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.changes := OLD.changes + 1; RETURN NEW; END $$;
CREATE TRIGGER counters_bump BEFORE UPDATE ON counters FOR EACH ROW EXECUTE FUNCTION bump();
INSERT INTO orders (note) SELECT 'o' || g FROM generate_series(1, 3000) g;
INSERT INTO items (order_id, qty) SELECT (g % 3000) + 1, g FROM generate_series(1, 6000) g;
INSERT INTO events (what, data) SELECT 'e' || g, jsonb_build_object('g', g, 'b', '\\x00ff'::bytea::text) FROM generate_series(1, 500) g;
INSERT INTO counters (k, v) SELECT 'k' || g, g FROM generate_series(1, 50) g;
CREATE SCHEMA tenant_beta;
CREATE TABLE tenant_beta.t (id int PRIMARY KEY, v int);
INSERT INTO tenant_beta.t SELECT g, g FROM generate_series(1, 100) g;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrates_a_tenant_live_and_rolls_back() {
    let shared = PgCluster::start();
    let dedicated = PgCluster::start();
    shared.psql("app", SCHEMA);
    let proxy = up(harness(&shared, &dedicated)).await;
    let url = acme_url(&proxy);
    pgbench(&url, &["-i", "-s", "1", "-q"]);
    let before_beta = fingerprint(&shared, "tenant_beta");

    // Load during the whole migration: pgbench on acme, and a client writing the odd tables.
    let bench_url = url.clone();
    let bench = tokio::task::spawn_blocking(move || {
        pgbench(
            &bench_url,
            &["-n", "-c", "8", "-j", "2", "-T", "14", "-M", "prepared"],
        )
    });
    let writer_proxy_url = proxy.url("app.acme", "app");
    let writer = tokio::spawn(async move {
        let c = connect(&writer_proxy_url).await.unwrap();
        let mut n = 0;
        let until = Instant::now() + Duration::from_secs(13);
        while Instant::now() < until {
            n += 1;
            c.batch_execute(&format!(
                "BEGIN; INSERT INTO orders (note) VALUES ('live {n}');
                 INSERT INTO items (order_id, qty) VALUES (currval('orders_id_seq'), {n});
                 UPDATE counters SET v = v + 1 WHERE k = 'k{}';
                 INSERT INTO events (what) VALUES ('w{n}');
                 DELETE FROM events WHERE what = 'e{n}';
                 DELETE FROM orders WHERE id = {n};
                 COMMIT;",
                n % 50 + 1
            ))
            .await
            .unwrap();
        }
        n
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = proxy
        .admin_ok(
            json!({"cmd": "migrate.start", "tenant": "acme", "to": "dedicated", "verify": "hash"}),
        )
        .await;
    assert_eq!(started["created_target_schema"], json!(true), "{started}");
    // Tables without a primary key are handled by full-row identity.
    assert_eq!(
        started["full_row_identity"],
        json!(["events", "pgbench_history"])
    );
    let s = wait_state(&proxy, "acme", "dual_write", Duration::from_secs(60)).await;
    assert!(s["rows_total"].as_u64().unwrap() > 100_000, "{s}");
    // Verification ran on entering dual_write, under load, and must pass.
    let deadline = Instant::now() + Duration::from_secs(60);
    let s = loop {
        let s = status(&proxy, "acme").await;
        if !s["verification"].is_null() {
            break s;
        }
        assert!(Instant::now() < deadline, "{s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(s["verification"]["passed"], json!(true), "{s:#}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cut = proxy
        .admin_ok(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
        .await;
    assert!(cut["pause_ms"].as_f64().unwrap() < 3000.0, "{cut}");
    let out = bench.await.unwrap();
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    let writes = writer.await.unwrap();
    assert!(writes > 10);
    // After cutover new work runs on the target; the source is kept in step by the reverse tee.
    let c = proxy.connect("app.acme", "app").await.unwrap();
    assert_eq!(server_port(&c).await, dedicated.port);
    c.batch_execute("INSERT INTO orders (note) VALUES ('after cutover')")
        .await
        .unwrap();
    let s = status(&proxy, "acme").await;
    assert_eq!(s["state"], json!("migrated"));
    assert!(s["last_pause_ms"].as_f64().is_some());
    wait_lag_zero(&proxy, "acme").await;
    assert_eq!(
        fingerprint(&shared, "tenant_acme"),
        fingerprint(&dedicated, "tenant_acme")
    );
    let inv = dedicated.psql(
        "app",
        "SET search_path = tenant_acme; SELECT (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT sum(delta) FROM pgbench_history) AND (SELECT sum(bbalance) FROM pgbench_branches) = (SELECT sum(delta) FROM pgbench_history)",
    );
    assert_eq!(inv.lines().last(), Some("t"));
    let v = proxy
        .admin_ok(json!({"cmd": "migrate.verify", "tenant": "acme", "level": "full"}))
        .await;
    assert_eq!(v["passed"], json!(true), "{v}");
    // The other tenant on the shared server never moved and never changed.
    assert_eq!(fingerprint(&shared, "tenant_beta"), before_beta);

    // Rollback: writes made on the target come back to the source.
    let rb = proxy
        .admin_ok(json!({"cmd": "migrate.rollback", "tenant": "acme"}))
        .await;
    assert_eq!(rb["state"], json!("rolled_back"));
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM orders WHERE note = 'after cutover'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    assert_eq!(server_port(&c).await, shared.port);
    // Capture is gone from both sides; the target's copy stays fenced (a write made there directly, not through
    // the proxy, would be lost), the source takes writes again.
    for pg in [&shared, &dedicated] {
        assert_eq!(capture_left(pg), "0/0");
    }
    assert_eq!(
        dedicated.psql(
            "app",
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'pgtenant_fence_acme'"
        ),
        shared.psql(
            "app",
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'tenant_acme'"
        )
    );
    let direct = connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=app",
        dedicated.port
    ))
    .await
    .unwrap();
    let e = direct
        .batch_execute("INSERT INTO tenant_acme.orders (note) VALUES ('stale')")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "55000", "{}", message(&e));
    shared.psql(
        "app",
        "INSERT INTO tenant_acme.orders (note) VALUES ('source is live again')",
    );
}

/// With the tee held, the reply to a committing write (CommandComplete as well as ReadyForQuery) is held until
/// the tee timeout: an asynchronous client must not see the CommandComplete alone (pgbench's libpq thread would
/// block on it, with every other connection of the thread).
async fn commit_reply_waits_for_the_tee_whole(proxy: &TestProxy) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fp = &proxy.proxy.shared.migrations.failpoints;
    fp.set("tee.before_pass", Some(Action::Hang));
    let mut s = raw_login(proxy.port(), &[("user", "dev.acme"), ("database", "app")]).await;
    s.write_all(&frame(b'Q', b"INSERT INTO a (v) VALUES (7000)\0"))
        .await
        .unwrap();
    let mut first = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(200), s.read_exact(&mut first)).await;
    assert!(early.is_err(), "a reply arrived before the tee timeout");
    s.read_exact(&mut first).await.unwrap();
    assert_eq!(first[0], b'C');
    let mut rest = [0u8; 4];
    s.read_exact(&mut rest).await.unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(rest) as usize - 4];
    s.read_exact(&mut body).await.unwrap();
    assert!(read_until(&mut s, b'Z').await.is_some());
    fp.set("tee.before_pass", None);
}

/// The port of the server the connection's queries run on.
async fn server_port(c: &tokio_postgres::Client) -> u16 {
    let port: i32 = c
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    port as u16
}

/// Starts acme's cutover with `failpoint` hanging, waits until the tenant is held, and restarts the proxy there.
async fn restart_in_cutover(
    proxy: TestProxy,
    config: &pgtenant::config::Config,
    failpoint: &str,
) -> TestProxy {
    proxy
        .proxy
        .shared
        .migrations
        .failpoints
        .set(failpoint, Some(Action::Hang));
    let socket = proxy.admin_socket();
    let cut = tokio::spawn(async move {
        try_admin_line(
            &socket,
            &json!({"cmd": "migrate.cutover", "tenant": "acme"}),
        )
        .await
    });
    wait_state(&proxy, "acme", "cutover_paused", Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let TestProxy { proxy: old, state } = proxy;
    old.close().await;
    let _ = cut.await;
    TestProxy {
        proxy: pgtenant::server::Proxy::start(config.clone())
            .await
            .unwrap(),
        state,
    }
}

/// Capture triggers left, '/', change-log rows left (or "none" without a pgtenant schema). Fence triggers are
/// not counted: they stay on a side the tenant moved away from, as long as its data does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_resume_copy_tee_and_a_swapped_cutover() {
    let shared = PgCluster::start();
    let dedicated = PgCluster::start();
    small_schema(&shared);
    let h = harness(&shared, &dedicated).raw("copy_parallel_tables = 1");
    let config = h.config();
    let proxy = up(h).await;
    let fp = &proxy.proxy.shared.migrations.failpoints;
    fp.set("copy.after_table", Some(Action::Hang));
    start_acme(&proxy).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while status(&proxy, "acme").await["tables_copied"] != json!(1) {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = proxy.connect("app.acme", "app").await.unwrap();
    c.batch_execute("UPDATE a SET v = -v WHERE id <= 10; INSERT INTO c VALUES (-1)")
        .await
        .unwrap();
    // Restart inside bulk_copy: the copied table keeps its checkpoint, the others are copied afterwards.
    proxy.proxy.terminate().await;
    let proxy = proxy.restart(&config).await;
    let s = wait_state(&proxy, "acme", "dual_write", Duration::from_secs(30)).await;
    assert_eq!(s["tables_copied"], json!(3), "{s}");
    let c = proxy.connect("app.acme", "app").await.unwrap();
    c.batch_execute("UPDATE b SET v = 0 WHERE id = 5; DELETE FROM c WHERE v = 2")
        .await
        .unwrap();
    // Restart in dual_write: the tee resumes; writes made while it was down are applied.
    let TestProxy { proxy: old, state } = proxy;
    old.close().await;
    shared.psql("app", "INSERT INTO tenant_acme.a (v) VALUES (77777)");
    let proxy = TestProxy {
        proxy: pgtenant::server::Proxy::start(config.clone())
            .await
            .unwrap(),
        state,
    };
    // The tee runs from the moment the proxy serves: a sync commit right away is on the target on return.
    assert!(
        proxy
            .proxy
            .shared
            .migrations
            .tees
            .load()
            .contains_key("acme"),
        "the proxy served before the resumed move's tee ran"
    );
    let c = proxy.connect("app.acme", "app").await.unwrap();
    c.batch_execute("INSERT INTO c VALUES (-77)").await.unwrap();
    assert_eq!(
        dedicated.psql("app", "SELECT count(*) FROM tenant_acme.c WHERE v = -77"),
        "1"
    );
    wait_state(&proxy, "acme", "dual_write", Duration::from_secs(5)).await;
    wait_lag_zero(&proxy, "acme").await;
    let v = proxy
        .admin_ok(json!({"cmd": "migrate.verify", "tenant": "acme", "level": "full"}))
        .await;
    assert_eq!(v["passed"], json!(true), "{v}");
    // Restart right after the route swap: the next start completes the cutover.
    let proxy = restart_in_cutover(proxy, &config, "cutover.after_swap").await;
    wait_state(&proxy, "acme", "migrated", Duration::from_secs(5)).await;
    let c = proxy.connect("app.acme", "app").await.unwrap();
    assert_eq!(server_port(&c).await, dedicated.port);
    let rows = c
        .query(
            "SELECT id, v FROM a WHERE v = 77777 OR v < 0 ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let rows: Vec<(i32, i32)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        rows.len(),
        11,
        "{rows:?}\n{}",
        shared.psql(
            "app",
            "SELECT id, v FROM tenant_acme.a WHERE v = 77777 OR v < 0 ORDER BY id"
        )
    );
    assert_eq!(
        fingerprint(&shared, "tenant_acme"),
        fingerprint(&dedicated, "tenant_acme")
    );
    // Finalize removes capture from both sides; the source is left as it was, fenced while its data is kept.
    let f = proxy
        .admin_ok(json!({"cmd": "migrate.finalize", "tenant": "acme"}))
        .await;
    assert_eq!(f["state"], json!("completed"));
    assert_eq!(capture_left(&shared), "0/0");
    assert_eq!(capture_left(&dedicated), "0/0");
    let e = connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=app",
        shared.port
    ))
    .await
    .unwrap()
    .batch_execute("UPDATE tenant_acme.a SET v = v + 1")
    .await
    .unwrap_err();
    assert_eq!(code(&e), "55000", "{}", message(&e));
    // DDL is allowed again once capture is gone.
    c.batch_execute("CREATE TABLE fresh (x int)").await.unwrap();
    // The finished move is in the history with its figures, across a restart.
    let h = proxy
        .admin_ok(json!({"cmd": "migrate.history", "since": "1d"}))
        .await;
    let e = &h["entries"][0];
    assert_eq!(e["outcome"], json!("completed"), "{h}");
    assert_eq!(
        (&e["source"]["backend"], &e["target"]["backend"]),
        (&json!("shared"), &json!("dedicated"))
    );
    assert!(e["rows_copied"].as_u64().unwrap() > 0, "{h}");
    assert!(e["bytes_copied"].as_u64().unwrap() > 0, "{h}");
    assert!(e["duration_s"].as_f64().unwrap() > 0.0, "{h}");
    assert_eq!(h["summary"]["completed_today"], json!(1), "{h}");
    let proxy = proxy.restart(&config).await;
    let again = proxy
        .admin_ok(json!({"cmd": "migrate.history", "tenant": "acme"}))
        .await;
    assert_eq!(again["entries"], h["entries"]);
    let bad = proxy
        .admin_err(json!({"cmd": "migrate.history", "since": "yesterday"}))
        .await;
    assert_eq!(bad, "invalid_argument");
}

/// Transaction pool mode: sessions park between transactions while their commits wait for the tee, and move
/// to the target at their next transaction after the cutover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrates_live_in_transaction_pool_mode() {
    let shared = PgCluster::start();
    let dedicated = PgCluster::start();
    shared.psql("app", "CREATE SCHEMA tenant_acme");
    // pgbench_accounts (13 MB) is copied as two block ranges at once, under the writes.
    let h = harness_with(&shared, &dedicated, "copy_split_mb = 1");
    let proxy = up(h.proxy("pool_mode = \"transaction\"")).await;
    let url = acme_url(&proxy);
    pgbench(&url, &["-i", "-s", "1", "-q"]);
    let bench_url = url.clone();
    let bench = tokio::task::spawn_blocking(move || {
        pgbench(
            &bench_url,
            &["-n", "-c", "8", "-j", "2", "-T", "10", "-M", "prepared"],
        )
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    proxy
        .admin_ok(
            json!({"cmd": "migrate.start", "tenant": "acme", "to": "dedicated", "verify": "count"}),
        )
        .await;
    wait_state(&proxy, "acme", "dual_write", Duration::from_secs(60)).await;
    // The source's capture triggers did not come along with its post-data (the target gets its own, reverse
    // ones at cutover).
    let ours = "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgtenant%'";
    assert_ne!(shared.psql("app", ours), "0");
    assert_eq!(dedicated.psql("app", ours), "0");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cut = proxy
        .admin_ok(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
        .await;
    assert_eq!(cut["state"], json!("migrated"), "{cut}");
    let out = bench.await.unwrap();
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    let invariant = "SET search_path = tenant_acme; SELECT (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT sum(delta) FROM pgbench_history)";
    assert_eq!(dedicated.psql("app", invariant).lines().last(), Some("t"));
    // The target's indexes and constraints were made after the copy (pg_dump's post-data), the same as the
    // source's.
    let indexes = "SELECT string_agg(indexdef, '; ' ORDER BY indexname) FROM pg_indexes WHERE schemaname = 'tenant_acme'";
    assert_eq!(dedicated.psql("app", indexes), shared.psql("app", indexes));
    assert!(dedicated
        .psql("app", indexes)
        .contains("pgbench_accounts_pkey"));

    wait_lag_zero(&proxy, "acme").await;
    assert_eq!(
        fingerprint(&dedicated, "tenant_acme"),
        fingerprint(&shared, "tenant_acme")
    );
    let c = proxy.connect("app.acme", "app").await.unwrap();
    assert_eq!(server_port(&c).await, dedicated.port);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_falls_back_behind_a_long_transaction_and_survives_a_dead_target() {
    let shared = PgCluster::start();
    let dedicated = PgCluster::start();
    small_schema(&shared);
    let proxy = up(harness(&shared, &dedicated)
        .raw("tee_timeout_ms = 300")
        .raw("[[users]]\nname = \"dev\"\nauth = \"trust\"\ntenants = [\"*\"]\n"))
    .await;
    start_acme(&proxy).await;
    wait_state(&proxy, "acme", "dual_write", Duration::from_secs(30)).await;
    commit_reply_waits_for_the_tee_whole(&proxy).await;
    let long = proxy.connect("app.acme", "app").await.unwrap();
    long.batch_execute("BEGIN; UPDATE a SET v = 4242 WHERE id = 1")
        .await
        .unwrap();
    let s = cutover_falls_back(&proxy, "still open").await;
    assert_eq!(s["cutover_attempts"], json!(1));
    // The gate is open again: the tenant works, on the source.
    let other = proxy.connect("app.acme", "app").await.unwrap();
    other
        .batch_execute("UPDATE b SET v = 1 WHERE id = 1")
        .await
        .unwrap();
    long.batch_execute("COMMIT").await.unwrap();

    // The target dies: client writes keep succeeding (the tee gives up after tee_timeout_ms), lag shows.
    dedicated.stop();
    for i in 0..5 {
        other
            .batch_execute(&format!("INSERT INTO a (v) VALUES ({})", 9000 + i))
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = status(&proxy, "acme").await;
        if s["lag_events"].as_u64().unwrap_or(0) >= 5 {
            assert!(!s["tee"]["last_error"].is_null(), "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "{s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    dedicated.restart();
    wait_lag_zero(&proxy, "acme").await;
    // The next attempt succeeds and nothing was lost.
    let cut = proxy
        .admin_ok(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
        .await;
    assert_eq!(cut["state"], json!("migrated"));
    let q = "SELECT string_agg(id || ':' || v, ',' ORDER BY id) FROM tenant_acme.a WHERE v = 4242 OR v >= 9000";
    assert_eq!(dedicated.psql("app", q), shared.psql("app", q));
    assert_eq!(
        dedicated.psql(
            "app",
            "SELECT count(*) FROM tenant_acme.a WHERE v = 4242 OR v >= 9000"
        ),
        "6"
    );
    assert_eq!(
        fingerprint(&shared, "tenant_acme"),
        fingerprint(&dedicated, "tenant_acme")
    );
    let metrics = proxy.proxy.shared.metrics.render();
    for series in [
        "cutover_attempts_total{tenant=\"acme\",result=\"failed\"} 1",
        "cutover_attempts_total{tenant=\"acme\",result=\"ok\"} 1",
        "cutover_pause_duration_seconds_count{tenant=\"acme\"} 1",
        "migration_state{tenant=\"acme\"} 4",
    ] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }
    assert!(metrics.contains("dual_write_target_failures_total{tenant=\"acme\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_works_from_every_state_before_the_swap() {
    let shared = PgCluster::start();
    let dedicated = PgCluster::start();
    small_schema(&shared);
    let proxy = up(harness(&shared, &dedicated)).await;
    let before = fingerprint(&shared, "tenant_acme");
    let fp = proxy.proxy.shared.migrations.failpoints.clone();
    let abort = |drop_target: bool| json!({"cmd": "migrate.abort", "tenant": "acme", "drop_target": drop_target});
    // pending
    fp.set("pending.before_capture", Some(Action::Hang));
    start_acme(&proxy).await;
    assert_eq!(status(&proxy, "acme").await["state"], json!("pending"));
    let r = proxy.admin_ok(abort(true)).await;
    assert_eq!(r["state"], json!("rolled_back"));
    fp.set("pending.before_capture", None);
    // bulk_copy
    fp.set("copy.after_table", Some(Action::Hang));
    start_acme(&proxy).await;
    wait_state(&proxy, "acme", "bulk_copy", Duration::from_secs(10)).await;
    let r = proxy.admin_ok(abort(false)).await;
    assert!(r["target_rows_left"].as_u64().is_some(), "{r}");
    fp.set("copy.after_table", None);
    // failed (a copy step that keeps failing)
    fp.set("copy.before_checkpoint", Some(Action::Error));
    proxy
        .admin_ok(json!({"cmd": "migrate.start", "tenant": "acme", "to": "dedicated", "allow_existing": true}))
        .await;
    let s = wait_state(&proxy, "acme", "failed", Duration::from_secs(30)).await;
    assert_eq!(s["failed_in"], json!("bulk_copy"));
    assert!(s["last_error"].as_str().unwrap().contains("failpoint"));
    fp.set("copy.before_checkpoint", None);
    // Resume retries from where it failed.
    proxy
        .admin_ok(json!({"cmd": "migrate.resume", "tenant": "acme"}))
        .await;
    wait_state(&proxy, "acme", "dual_write", Duration::from_secs(30)).await;
    // dual_write, with writes going on; then pause/resume of the work.
    let c = proxy.connect("app.acme", "app").await.unwrap();
    c.batch_execute("UPDATE a SET v = v + 1 WHERE id < 50")
        .await
        .unwrap();
    let p = proxy
        .admin_ok(json!({"cmd": "migrate.pause", "tenant": "acme"}))
        .await;
    assert_eq!(p["state"], json!("paused"));
    c.batch_execute("UPDATE a SET v = v + 1 WHERE id < 50")
        .await
        .unwrap();
    proxy
        .admin_ok(json!({"cmd": "migrate.resume", "tenant": "acme"}))
        .await;
    let r = proxy.admin_ok(abort(true)).await;
    assert_eq!(r["target_dropped"], json!(true));
    // The source is exactly as the application left it, and holds no capture.
    assert_eq!(capture_left(&shared), "0/0");
    assert_eq!(
        shared.psql("app", "SELECT sum(v) FROM tenant_acme.a WHERE id < 50"),
        (1..50).map(|v| v + 2).sum::<i64>().to_string()
    );
    let after = fingerprint(&shared, "tenant_acme");
    assert_ne!(before, after);
    c.batch_execute("UPDATE a SET v = v - 2 WHERE id < 50")
        .await
        .unwrap();
    assert_eq!(fingerprint(&shared, "tenant_acme"), before);
    // The audit log has every transition.
    let audit = proxy.admin_ok(json!({"cmd": "audit", "tail": 200})).await;
    let text = audit.to_string();
    for needle in [
        "migrate.start",
        "migrate.abort",
        "migrate.state",
        "\"failed\"",
        "\"rolled_back\"",
    ] {
        assert!(text.contains(needle), "{needle} not audited");
    }
    // Each abort is in the history, newest first; the last went through a failure and its retry.
    let h = proxy
        .admin_ok(json!({"cmd": "migrate.history", "tenant": "acme"}))
        .await;
    let entries = h["entries"].as_array().unwrap();
    let outcomes: Vec<&str> = entries
        .iter()
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["aborted"; 3], "{h}");
    let states: Vec<&str> = entries[0]["states"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        ["pending", "bulk_copy", "failed", "bulk_copy", "dual_write"],
        "{h}"
    );
    assert_eq!(h["summary"]["active"], json!(0), "{h}");
    assert!(
        entries[0]["started_by"]
            .as_str()
            .unwrap()
            .starts_with("uid:"),
        "{h}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_clearly_and_ddl_is_guarded() {
    let shared = PgCluster::start();
    let dedicated = PgCluster::start();
    small_schema(&shared);
    shared.psql(
        "app",
        "CREATE TABLE tenant_acme.u (id int PRIMARY KEY, pos int UNIQUE); INSERT INTO tenant_acme.u VALUES (1, 1), (2, 2)",
    );
    dedicated.psql(
        "app",
        "CREATE SCHEMA tenant_delta; CREATE TABLE tenant_delta.a (id serial PRIMARY KEY, v int)",
    );
    let proxy = up(harness(&shared, &dedicated)
        .tenant("gamma", "shared", None, None)
        .tenant("delta", "dedicated", None, Some("tenant_delta")))
    .await;
    // A table of the tenant's own (its role owns it).
    proxy
        .connect("app.acme", "app")
        .await
        .unwrap()
        .batch_execute("CREATE TABLE own (id int PRIMARY KEY)")
        .await
        .unwrap();
    let start = |extra: Value| {
        let mut r = json!({"cmd": "migrate.start", "tenant": "acme", "to": "dedicated"});
        for (k, v) in extra.as_object().unwrap() {
            r[k] = v.clone();
        }
        r
    };
    // Another tenant's schema on the target (its tables would take acme's rows, an abort would empty them).
    let preflight_says = |req: Value, why: &'static str| {
        let proxy = &proxy;
        async move {
            let r = proxy.admin(req).await;
            assert_eq!(r["error"]["code"], "preflight_failed", "{r}");
            assert!(r["error"]["message"].as_str().unwrap().contains(why), "{r}");
        }
    };
    preflight_says(
        start(json!({"schema": "tenant_delta", "allow_existing": true})),
        "tenant \"delta\"'s",
    )
    .await;
    // Large objects are not moved: a table that refers to them is refused rather than left pointing at nothing.
    shared.psql(
        "app",
        "CREATE TABLE tenant_acme.blobs (id int PRIMARY KEY, doc oid)",
    );
    preflight_says(start(json!({})), "blobs.doc").await;
    shared.psql("app", "DROP TABLE tenant_acme.blobs");
    for (req, code) in [
        (start(json!({"tenant": "nobody"})), "unknown_tenant"),
        (start(json!({"to": "elsewhere"})), "unknown_backend"),
        (start(json!({"to": "shared"})), "invalid_argument"),
        (start(json!({"tenant": "gamma"})), "preflight_failed"),
        (start(json!({"verify": "sha"})), "invalid_argument"),
        (start(json!({"cutover": "soon"})), "invalid_argument"),
        (start(json!({"allow_existing": "yes"})), "invalid_argument"),
        (start(json!({"tenant_column": ""})), "invalid_argument"),
        (start(json!({"tenant_key": ""})), "invalid_argument"),
        // A tenant column the route does not have: the route says gamma's database is its own.
        (
            start(json!({"tenant": "gamma", "tenant_column": "tenant_id"})),
            "preflight_failed",
        ),
        (
            json!({"cmd": "migrate.start", "tenant": "acme"}),
            "missing_argument",
        ),
        (
            json!({"cmd": "migrate.status", "tenant": "acme"}),
            "no_migration",
        ),
        (
            json!({"cmd": "migrate.cutover", "tenant": "acme"}),
            "no_migration",
        ),
        (
            json!({"cmd": "migrate.abort", "tenant": "a b"}),
            "invalid_argument",
        ),
        (
            json!({"cmd": "migrate.verify", "tenant": "acme", "level": "x"}),
            "invalid_argument",
        ),
        (
            json!({"cmd": "migrate.cutover", "tenant": "acme", "force": true}),
            "invalid_argument",
        ),
    ] {
        assert_eq!(proxy.admin_err(req.clone()).await, code, "{req}");
    }
    // A target that already holds rows is refused unless allowed.
    dedicated.psql(
        "app",
        "CREATE SCHEMA tenant_acme; CREATE TABLE tenant_acme.a (id serial PRIMARY KEY, v int);
         CREATE TABLE tenant_acme.b (id serial PRIMARY KEY, v int); CREATE TABLE tenant_acme.c (v int);
         CREATE TABLE tenant_acme.u (id int PRIMARY KEY, pos int UNIQUE);
         CREATE TABLE tenant_acme.own (id int PRIMARY KEY);
         INSERT INTO tenant_acme.c VALUES (1)",
    );
    let r = proxy.admin(start(json!({}))).await;
    assert_eq!(r["error"]["code"], json!("preflight_failed"), "{r}");
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("already holds 1 rows"));
    assert_eq!(
        capture_left(&shared),
        "0/none",
        "preflight installed nothing"
    );
    proxy
        .admin_ok(start(
            json!({"allow_existing": true, "verify": "count,hash"}),
        ))
        .await;
    assert_eq!(proxy.admin_err(start(json!({}))).await, "invalid_state");
    wait_state(&proxy, "acme", "dual_write", Duration::from_secs(30)).await;
    for (req, code) in [
        (
            json!({"cmd": "migrate.rollback", "tenant": "acme"}),
            "invalid_state",
        ),
        (
            json!({"cmd": "migrate.finalize", "tenant": "acme"}),
            "invalid_state",
        ),
        (
            json!({"cmd": "tenant.set", "tenant": "acme", "backend": "dedicated"}),
            "invalid_state",
        ),
        (
            json!({"cmd": "tenant.remove", "tenant": "acme"}),
            "invalid_state",
        ),
    ] {
        assert_eq!(proxy.admin_err(req.clone()).await, code, "{req}");
    }
    let c = proxy.connect("app.acme", "app").await.unwrap();
    // Two rows swapping a unique value in one transaction: collapsed into one UPDATE this would pass through a
    // duplicate; the applier falls back to one entry at a time.
    c.batch_execute(
        "BEGIN; UPDATE u SET pos = 99 WHERE id = 1; UPDATE u SET pos = 1 WHERE id = 2; UPDATE u SET pos = 2 WHERE id = 1; COMMIT",
    )
    .await
    .unwrap();
    assert_eq!(
        dedicated.psql(
            "app",
            "SELECT string_agg(id || ':' || pos, ',' ORDER BY id) FROM tenant_acme.u"
        ),
        "1:2,2:1"
    );
    // DDL on the migrating schema is refused, through the proxy and directly, even on a table the tenant owns
    // and even under session_replication_role = replica (which only an administrator can set); the tenant's
    // DML is not.
    for ddl in [
        "ALTER TABLE own ADD COLUMN x int",
        "DROP TRIGGER pgtenant_fence_acme ON own",
        "CREATE TABLE fresh (x int)",
    ] {
        let e = c.batch_execute(ddl).await.unwrap_err();
        assert_eq!(code(&e), "55000", "{ddl}: {}", message(&e));
        assert!(message(&e).contains("being migrated"), "{}", message(&e));
    }
    let admin = connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=app",
        shared.port
    ))
    .await
    .unwrap();
    let e = admin
        .batch_execute(
            "SET session_replication_role = replica; ALTER TABLE tenant_acme.a ADD COLUMN x int",
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), "55000", "{}", message(&e));
    c.batch_execute("INSERT INTO a (v) VALUES (1)")
        .await
        .unwrap();
    // The other tenant's DDL is not affected.
    let b = proxy.connect("app.beta", "app").await.unwrap();
    b.batch_execute("CREATE TABLE beta_own (y int); ALTER TABLE beta_own ADD COLUMN z int")
        .await
        .unwrap();
    // A row changed on the target behind the tee's back: hash verification names its range, cutover is refused
    // until `repair` re-copies that range.
    dedicated.psql("app", "UPDATE tenant_acme.a SET v = -999 WHERE id = 7");
    let v = proxy
        .admin_ok(json!({"cmd": "migrate.verify", "tenant": "acme", "level": "hash"}))
        .await;
    assert_eq!(v["passed"], json!(false), "{v}");
    let violation = v["violations"][0].as_str().unwrap();
    assert!(
        violation.starts_with("a: rows differ in key range [start, {\"id\": 501})"),
        "{violation}"
    );
    let full = proxy
        .admin_ok(json!({"cmd": "migrate.verify", "tenant": "acme", "level": "full"}))
        .await;
    assert!(
        full.to_string().contains("row {\\\"id\\\": 7} differs"),
        "{full}"
    );
    assert_eq!(
        proxy
            .admin_err(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
            .await,
        "verification_failed"
    );
    let r = proxy
        .admin_ok(json!({"cmd": "migrate.repair", "tenant": "acme"}))
        .await;
    assert_eq!(r["verification"]["passed"], json!(true), "{r}");
    assert_eq!(
        dedicated.psql("app", "SELECT v FROM tenant_acme.a WHERE id = 7"),
        "7"
    );
    // ctl: status table, JSON, and a refused command's exit code.
    let ctl = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_pgtenant"))
            .arg("ctl")
            .arg("--socket")
            .arg(proxy.admin_socket())
            .args(args)
            .output()
            .unwrap()
    };
    let out = ctl(&["migrate", "status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("TENANT") && text.contains("dual_write"),
        "{text}"
    );
    let out = ctl(&["migrate", "history", "--since", "7d"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("active 1, completed today 0") && text.contains("OUTCOME"),
        "{text}"
    );
    let out = ctl(&["migrate", "status", "acme", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["progress_percent"], json!(100.0));
    let out = ctl(&["migrate", "finalize", "acme"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid_state"));
    let out = ctl(&["migrate", "cutover", "acme"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ctl(&["migrate", "status", "acme", "--watch"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("migrated"));
    assert_eq!(
        proxy
            .admin_err(json!({"cmd": "migrate.abort", "tenant": "acme"}))
            .await,
        "invalid_state"
    );
}

/// Tenants whose rows live in shared tables with a tenant column: only the tenant's rows move (live, under
/// writes from it and from another tenant of the same tables), other tenants' rows on both sides are never
/// touched, and `finalize --drop-source` deletes only the tenant's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrates_a_tenants_rows_of_shared_tables() {
    const TABLES: &str = "
        CREATE TABLE accounts (id serial PRIMARY KEY, tenant text NOT NULL, name text, balance int NOT NULL DEFAULT 0);
        CREATE TABLE transfers (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, tenant text NOT NULL,
            account_id int NOT NULL REFERENCES accounts(id) ON DELETE CASCADE, amount int, at timestamptz DEFAULT now());
        CREATE TABLE notes (tenant text, body text);
        CREATE TABLE settings (k text PRIMARY KEY, v text);";
    let shared = PgCluster::start();
    let dedicated = PgCluster::start();
    shared.psql("app", TABLES);
    shared.psql(
        "app",
        "INSERT INTO accounts (tenant, name) SELECT CASE WHEN g % 2 = 0 THEN 'acme' ELSE 'globex' END, 'a' || g
           FROM generate_series(1, 4000) g;
         INSERT INTO transfers (tenant, account_id, amount) SELECT a.tenant, a.id, g FROM accounts a, generate_series(1, 3) g;
         INSERT INTO notes SELECT CASE WHEN g % 2 = 0 THEN 'acme' ELSE 'globex' END, 'n' || g FROM generate_series(1, 300) g;
         INSERT INTO settings VALUES ('shared', 'yes');",
    );
    // The target already serves another tenant in the same tables, its keys in ranges of their own: after the
    // cutover acme's new rows take keys from the target's sequences while globex keeps using the source's, and
    // the reverse tee carries acme's rows back to the source, so the two must not overlap.
    dedicated.psql("app", TABLES);
    dedicated.psql(
        "app",
        "SELECT setval('accounts_id_seq', 1000000);
         ALTER TABLE transfers ALTER COLUMN id RESTART WITH 5000000;
         INSERT INTO accounts (tenant, name) SELECT 'initech', 'i' || g FROM generate_series(1, 50) g;
         INSERT INTO notes VALUES ('initech', 'keep me');",
    );
    // Each tenant's sessions see only its rows (row-level security tied to its role).
    least_privilege(&shared);
    least_privilege(&dedicated);
    let backend =
        "admin_user = \"postgres\"\nisolation = \"role\"\ndatabase = \"app\"\npool_size = 20";
    let proxy = Harness::new()
        .backend_as("shared", &shared, "pgtenant_serve", backend)
        .backend_as("dedicated", &dedicated, "pgtenant_serve", backend)
        .tenant("acme", "shared", None, None)
        .tenant_extra("tenant_column = \"tenant\"")
        .tenant("globex", "shared", None, None)
        .tenant_extra("tenant_column = \"tenant\"")
        .raw("[migration]\ncopy_batch_rows = 500\nverify_chunk_rows = 300\ncutover_timeout_ms = 3000")
        .start()
        .await;
    grant(&proxy, &["acme", "globex"]).await;
    let rows = |pg: &PgCluster, tenant: &str| {
        pg.psql(
            "app",
            &format!(
                "SELECT (SELECT count(*) || ':' || md5(string_agg(x::text, ',' ORDER BY x::text)) FROM accounts x WHERE tenant = '{tenant}')
                  || ' ' || (SELECT count(*) || ':' || md5(string_agg(x::text, ',' ORDER BY x::text)) FROM transfers x WHERE tenant = '{tenant}')
                  || ' ' || (SELECT count(*) || ':' || md5(string_agg(x::text, ',' ORDER BY x::text)) FROM notes x WHERE tenant = '{tenant}')"
            ),
        )
    };
    let writer = |tenant: &'static str, secs: u64| {
        let url = proxy.url(&format!("app.{tenant}"), "app");
        tokio::spawn(async move {
            let c = connect(&url).await.unwrap();
            let until = Instant::now() + Duration::from_secs(secs);
            let mut n = 0;
            while Instant::now() < until {
                n += 1;
                c.batch_execute(&format!(
                    "BEGIN;
                     INSERT INTO accounts (tenant, name) VALUES ('{tenant}', 'live {n}');
                     INSERT INTO transfers (tenant, account_id, amount) VALUES ('{tenant}', currval('accounts_id_seq'), {n});
                     UPDATE accounts SET balance = balance + {n} WHERE tenant = '{tenant}' AND id = (SELECT min(id) FROM accounts WHERE tenant = '{tenant}');
                     DELETE FROM accounts WHERE tenant = '{tenant}' AND name = 'a{}';
                     INSERT INTO notes VALUES ('{tenant}', 'live {n}');
                     COMMIT;",
                    n * 2
                ))
                .await
                .unwrap();
            }
            n
        })
    };
    let acme = writer("acme", 12);
    let globex = writer("globex", 12);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // The rows are told apart as the route says: another column or another tenant's key is refused (the whole
    // shared schema, or globex's rows, would be moved, fenced and later dropped).
    for asked in [
        json!({"tenant_column": "name"}),
        json!({"tenant_key": "globex"}),
    ] {
        let mut req = json!({"cmd": "migrate.start", "tenant": "acme", "to": "dedicated"});
        for (k, v) in asked.as_object().unwrap() {
            req[k] = v.clone();
        }
        assert_eq!(proxy.admin_err(req).await, "preflight_failed", "{asked}");
    }
    let started = proxy
        .admin_ok(
            json!({"cmd": "migrate.start", "tenant": "acme", "to": "dedicated", "verify": "hash"}),
        )
        .await;
    // Tables without the tenant column are not the tenant's.
    assert_eq!(
        started["tables"],
        json!(["accounts", "notes", "transfers"]),
        "{started}"
    );
    assert_eq!(started["full_row_identity"], json!(["notes"]));
    wait_state(&proxy, "acme", "dual_write", Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(&proxy, "acme").await;
        if !s["verification"].is_null() {
            assert_eq!(s["verification"]["passed"], json!(true), "{s:#}");
            break;
        }
        assert!(Instant::now() < deadline, "{s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Rows that change tenant: one of acme's leaves it (a delete for acme), one of globex's joins it (an insert).
    // No tenant may give its rows away (row-level security), so an administrator moves them, on the source
    // directly: capture sees writes made outside the proxy too.
    let c = connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=app",
        shared.port
    ))
    .await
    .unwrap();
    c.batch_execute(
        "UPDATE accounts SET tenant = 'globex' WHERE id = 2; UPDATE accounts SET tenant = 'acme' WHERE id = 1;
         UPDATE notes SET tenant = 'globex' WHERE body = 'n2'; UPDATE notes SET tenant = 'acme' WHERE body = 'n1'",
    )
    .await
    .unwrap();
    proxy
        .admin_ok(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
        .await;
    assert!(acme.await.unwrap() > 5);
    assert!(globex.await.unwrap() > 5);
    wait_lag_zero(&proxy, "acme").await;
    // acme's rows are the same on both sides (the reverse tee keeps the source in step), globex never reached
    // the target, and the target's own tenant and the table without a tenant column are untouched.
    assert_eq!(rows(&shared, "acme"), rows(&dedicated, "acme"));
    let moved: u64 = rows(&dedicated, "acme")
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(moved > 1500, "{}", rows(&dedicated, "acme"));
    assert_eq!(
        dedicated.psql(
            "app",
            "SELECT count(*) FROM accounts WHERE tenant = 'globex'"
        ),
        "0"
    );
    assert_eq!(
        dedicated.psql(
            "app",
            "SELECT (SELECT count(*) FROM accounts WHERE tenant = 'initech') || ' ' || (SELECT count(*) FROM notes WHERE tenant = 'initech') || ' ' || (SELECT count(*) FROM settings)"
        ),
        "50 1 0"
    );
    let v = proxy
        .admin_ok(json!({"cmd": "migrate.verify", "tenant": "acme", "level": "full"}))
        .await;
    assert_eq!(v["passed"], json!(true), "{v}");
    // New acme work runs on the target, with keys from the target's sequence (past everything copied).
    let c = proxy.connect("app.acme", "app").await.unwrap();
    let id: i32 = c
        .query_one(
            "INSERT INTO accounts (tenant, name) VALUES ('acme', 'after') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(id > 1_000_000, "{id}");
    wait_lag_zero(&proxy, "acme").await;
    assert_eq!(rows(&shared, "acme"), rows(&dedicated, "acme"));
    let globex_before = rows(&shared, "globex");
    let fin = proxy
        .admin_ok(json!({"cmd": "migrate.finalize", "tenant": "acme", "drop_source": true}))
        .await;
    assert_eq!(fin["state"], json!("completed"), "{fin}");
    assert_eq!(
        shared.psql(
            "app",
            "SELECT (SELECT count(*) FROM accounts WHERE tenant = 'acme') + (SELECT count(*) FROM transfers WHERE tenant = 'acme') + (SELECT count(*) FROM notes WHERE tenant = 'acme')"
        ),
        "0"
    );
    assert_eq!(rows(&shared, "globex"), globex_before);
    assert_eq!(shared.psql("app", "SELECT count(*) FROM settings"), "1");
    for pg in [&shared, &dedicated] {
        assert_eq!(
            pg.psql(
                "app",
                "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgtenant_%'"
            ),
            "0"
        );
    }
}

/// `max_concurrent`, the asynchronous tee, a restart inside `cutover_paused` before the route swap (falls back
/// to dual_write, nothing lost, the next cutover succeeds) and `--cutover auto`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_async_tee_restart_before_swap_and_auto_cutover() {
    let shared = PgCluster::start();
    let dedicated = PgCluster::start();
    small_schema(&shared);
    shared.psql(
        "app",
        "INSERT INTO tenant_beta.t SELECT g FROM generate_series(1, 50) g",
    );
    let h = harness(&shared, &dedicated).raw("max_concurrent = 1\ntee = \"async\"");
    let config = h.config();
    let proxy = up(h).await;
    start_acme(&proxy).await;
    let refused = proxy
        .admin_err(json!({"cmd": "migrate.start", "tenant": "beta", "to": "dedicated"}))
        .await;
    assert_eq!(refused, "limit_reached");
    wait_state(&proxy, "acme", "dual_write", Duration::from_secs(30)).await;
    // The asynchronous tee: commits return at once, the target follows.
    let c = proxy.connect("app.acme", "app").await.unwrap();
    for i in 0..50 {
        c.batch_execute(&format!(
            "UPDATE a SET v = v + 1 WHERE id = {}; INSERT INTO b (v) VALUES ({i})",
            i + 1
        ))
        .await
        .unwrap();
    }
    wait_lag_zero(&proxy, "acme").await;
    assert_eq!(
        fingerprint(&shared, "tenant_acme"),
        fingerprint(&dedicated, "tenant_acme")
    );
    // A restart while the cutover holds the tenant, before the route swap: it falls back to dual_write.
    let proxy = restart_in_cutover(proxy, &config, "cutover.before_swap").await;
    wait_state(&proxy, "acme", "dual_write", Duration::from_secs(10)).await;
    let c = proxy.connect("app.acme", "app").await.unwrap();
    assert_eq!(server_port(&c).await, shared.port, "still on the source");
    assert!(
        capture_left(&dedicated).starts_with("0/"),
        "no reverse capture left on the target: {}",
        capture_left(&dedicated)
    );
    c.batch_execute("INSERT INTO b (v) VALUES (-5)")
        .await
        .unwrap();
    proxy
        .admin_ok(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
        .await;
    wait_lag_zero(&proxy, "acme").await;
    assert_eq!(
        fingerprint(&shared, "tenant_acme"),
        fingerprint(&dedicated, "tenant_acme")
    );
    proxy
        .admin_ok(json!({"cmd": "migrate.finalize", "tenant": "acme"}))
        .await;
    // With acme done, beta may start; --cutover auto switches it once verified and caught up.
    proxy
        .admin_ok(
            json!({"cmd": "migrate.start", "tenant": "beta", "to": "dedicated",
                         "verify": "count", "cutover": "auto"}),
        )
        .await;
    let s = wait_state(&proxy, "beta", "migrated", Duration::from_secs(30)).await;
    assert!(s["last_pause_ms"].as_f64().is_some(), "{s}");
    assert_eq!(
        dedicated.psql("app", "SELECT count(*) FROM tenant_beta.t"),
        "50"
    );
}

/// `migrate estimate`: sizes, the target's gaps and the preflight with nothing installed, rates by default
/// until a move has finished and from the history after; the history says how far the copy estimate was off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn estimate_sizes_a_move_and_learns_from_finished_ones() {
    let shared = PgCluster::start();
    let dedicated = PgCluster::start();
    small_schema(&shared);
    shared.psql(
        "app",
        "CREATE EXTENSION citext; CREATE TYPE tenant_acme.mood AS ENUM ('ok')",
    );
    let proxy = up(harness(&shared, &dedicated)).await;
    let ask = |to: &str| json!({"cmd": "migrate.estimate", "tenant": "acme", "to": to, "verify": "hash", "allow_existing": true});
    let e = proxy.admin_ok(ask("dedicated")).await;
    assert_eq!(e["preflight_passed"], json!(true), "{e}");
    assert_eq!(e["rows"], json!(4100), "{e}");
    let tables: Vec<(String, u64, bool)> = e["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["table"].as_str().unwrap().to_owned(),
                t["rows"].as_u64().unwrap(),
                t["rows_exact"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        tables,
        [
            ("a".to_owned(), 2000, true),
            ("b".to_owned(), 2000, true),
            ("c".to_owned(), 100, true)
        ]
    );
    assert!(e["bytes"].as_u64().unwrap() > 8192 * 3, "{e}");
    assert_eq!(e["tables_without_primary_key"], json!(["c"]));
    assert_eq!(e["sequences"], json!(2));
    assert_eq!(e["missing_on_target"], json!(["extension citext"]), "{e}");
    assert!(e["copy_rows_per_s"]["from"]
        .as_str()
        .unwrap()
        .starts_with("default"));
    assert_eq!(e["expected_pause_ms"], Value::Null);
    // Nothing was installed or created.
    assert_eq!(capture_left(&shared), "0/none");
    assert_eq!(
        dedicated.psql(
            "app",
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_acme'"
        ),
        "0"
    );
    // A preflight problem is reported, not raised: a target that already holds the rows, without
    // allow_existing, after the move below. First the move.
    start_acme(&proxy).await;
    wait_state(&proxy, "acme", "dual_write", Duration::from_secs(30)).await;
    wait_lag_zero(&proxy, "acme").await;
    let v = proxy
        .admin_ok(json!({"cmd": "migrate.verify", "tenant": "acme", "level": "hash"}))
        .await;
    assert_eq!(v["passed"], json!(true), "{v}");
    proxy
        .admin_ok(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
        .await;
    proxy
        .admin_ok(json!({"cmd": "migrate.finalize", "tenant": "acme"}))
        .await;
    let h = proxy
        .admin_ok(json!({"cmd": "migrate.history", "tenant": "acme"}))
        .await;
    let entry = &h["entries"][0];
    let error = entry["copy_estimate_error_percent"].as_f64();
    assert!(error.is_some(), "{h}");
    // Moving back: the rates now come from the finished move.
    let back = proxy.admin_ok(ask("shared")).await;
    assert!(
        back["copy_rows_per_s"]["from"]
            .as_str()
            .unwrap()
            .starts_with("measured"),
        "{back}"
    );
    assert!(back["expected_pause_ms"].as_f64().is_some(), "{back}");
    assert_eq!(back["pause_from_moves"], json!(1));
    let refused = proxy
        .admin_ok(json!({"cmd": "migrate.estimate", "tenant": "acme", "to": "shared"}))
        .await;
    assert_eq!(refused["preflight_passed"], json!(false), "{refused}");
    assert!(
        refused["problems"][0]
            .as_str()
            .unwrap()
            .contains("already holds"),
        "{refused}"
    );
    eprintln!(
        "estimate: copy {:.3} s at the default rate; the move's copy estimate was off by {:.0}%; \
         next estimate {:.3} s at {:.0} rows/s",
        e["copy_s"],
        error.unwrap_or_default(),
        back["copy_s"].as_f64().unwrap_or_default(),
        back["copy_rows_per_s"]["value"]
            .as_f64()
            .unwrap_or_default()
    );
}

/// A move with a cutover window waits in dual_write outside it (a manual cutover is refused, saying when the
/// window opens) and cuts over by itself once it opens, with the usual short pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cutover_window_holds_the_move_in_dual_write_until_it_opens() {
    let shared = PgCluster::start();
    let dedicated = PgCluster::start();
    small_schema(&shared);
    let proxy = up(harness(&shared, &dedicated)).await;
    let unix = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let hms = |t: u64| {
        format!(
            "{:02}:{:02}:{:02}",
            t % 86_400 / 3600,
            t % 3600 / 60,
            t % 60
        )
    };
    let opens = unix() + 8;
    // In a zone (India, UTC+05:30 all year): the window is written in the zone's local time.
    let local = opens + 5 * 3600 + 1800;
    let window = format!("{}-{} Asia/Kolkata", hms(local), hms(local + 600));
    proxy
        .admin_ok(
            json!({"cmd": "migrate.start", "tenant": "acme", "to": "dedicated",
            "cutover": "auto", "cutover_window": window}),
        )
        .await;
    let s = wait_state(&proxy, "acme", "dual_write", Duration::from_secs(30)).await;
    assert!(
        s["cutover_window"]
            .as_str()
            .unwrap()
            .ends_with("Asia/Kolkata"),
        "{s}"
    );
    let refused = proxy
        .admin(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
        .await;
    assert_eq!(
        refused["error"]["code"],
        json!("invalid_state"),
        "{refused}"
    );
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cutover window"),
        "{refused}"
    );
    // Verified and caught up, it still waits for the window.
    while unix() + 2 < opens {
        assert_eq!(status(&proxy, "acme").await["state"], json!("dual_write"));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let s = wait_state(&proxy, "acme", "migrated", Duration::from_secs(30)).await;
    assert!(unix() >= opens, "cut over before its window opened");
    let pause = s["last_pause_ms"].as_f64().unwrap();
    eprintln!("cut over inside its window after a pause of {pause:.1} ms");
    common::held_briefly(pause, &s);
    assert_eq!(
        fingerprint(&shared, "tenant_acme"),
        fingerprint(&dedicated, "tenant_acme")
    );
}

/// Moves queued with `--at` start when due, survive a restart, and a queued one can be cancelled; the queue
/// lists them in the order they would start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_moves_start_when_due_survive_a_restart_and_can_be_cancelled() {
    let shared = PgCluster::start();
    let dedicated = PgCluster::start();
    small_schema(&shared);
    let h = harness(&shared, &dedicated);
    let config = h.config();
    let proxy = up(h).await;
    let q = proxy
        .admin_ok(json!({"cmd": "migrate.start", "tenant": "acme", "to": "dedicated", "at": "+3s"}))
        .await;
    assert_eq!(q["state"], json!("queued"), "{q}");
    let later = proxy
        .admin_ok(json!({"cmd": "migrate.start", "tenant": "beta", "to": "dedicated", "at": "+1h", "priority": 5}))
        .await;
    assert!(later["starts_in_s"].as_u64().unwrap() > 3500, "{later}");
    assert_eq!(
        proxy
            .admin_err(
                json!({"cmd": "migrate.start", "tenant": "acme", "to": "dedicated", "at": "+1h"})
            )
            .await,
        "invalid_state"
    );
    assert_eq!(
        proxy
            .admin_err(
                json!({"cmd": "migrate.start", "tenant": "acme", "to": "dedicated", "at": "soon"})
            )
            .await,
        "invalid_argument"
    );
    let listed = proxy.admin_ok(json!({"cmd": "migrate.queue"})).await;
    let order: Vec<&str> = listed["queued"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["request"]["tenant"].as_str().unwrap())
        .collect();
    assert_eq!(order, ["beta", "acme"], "{listed}");
    // Not before its time; then by itself.
    assert_eq!(
        proxy
            .admin_err(json!({"cmd": "migrate.status", "tenant": "acme"}))
            .await,
        "no_migration"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while proxy
        .admin(json!({"cmd": "migrate.status", "tenant": "acme"}))
        .await["ok"]
        != json!(true)
    {
        assert!(Instant::now() < deadline, "the queued move never started");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_state(&proxy, "acme", "dual_write", Duration::from_secs(30)).await;
    let audit = proxy.admin_ok(json!({"cmd": "audit", "tail": 20})).await;
    assert!(
        audit.to_string().contains("scheduler (queued by"),
        "{audit}"
    );
    // The later one survives a restart, and is cancelled.
    let proxy = proxy.restart(&config).await;
    let listed = proxy.admin_ok(json!({"cmd": "migrate.queue"})).await;
    assert_eq!(listed["queued"].as_array().unwrap().len(), 1, "{listed}");
    let c = proxy
        .admin_ok(json!({"cmd": "migrate.cancel", "tenant": "beta"}))
        .await;
    assert_eq!(c["state"], json!("cancelled"));
    assert_eq!(
        proxy
            .admin_err(json!({"cmd": "migrate.cancel", "tenant": "beta"}))
            .await,
        "no_migration"
    );
    assert_eq!(
        proxy.admin_ok(json!({"cmd": "migrate.queue"})).await["queued"],
        json!([])
    );
}

/// A cutover of acme that fails and falls back to dual_write, saying `why`; the migration's status after it.
async fn cutover_falls_back(proxy: &TestProxy, why: &str) -> Value {
    let err = proxy
        .admin_err(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
        .await;
    assert_eq!(err, "cutover_failed");
    let s = status(proxy, "acme").await;
    assert_eq!(s["state"], json!("dual_write"), "{s}");
    assert!(
        s["last_cutover_error"].as_str().unwrap().contains(why),
        "{s}"
    );
    s
}

/// acme's move in dual_write with the synchronous tee (the default), `before` run on the source first, with a
/// client of acme through the proxy and a connection straight to the target (fields drop in this order).
struct DualWrite {
    client: tokio_postgres::Client,
    target: tokio_postgres::Client,
    proxy: TestProxy,
    shared: PgCluster,
    dedicated: PgCluster,
}

async fn in_dual_write(before: &str) -> DualWrite {
    let shared = PgCluster::start();
    let dedicated = PgCluster::start();
    small_schema(&shared);
    if !before.is_empty() {
        shared.psql("app", before);
    }
    let proxy = up(harness(&shared, &dedicated)).await;
    start_acme(&proxy).await;
    wait_state(&proxy, "acme", "dual_write", Duration::from_secs(30)).await;
    wait_lag_zero(&proxy, "acme").await;
    let client = proxy.connect("app.acme", "app").await.unwrap();
    let target = connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=app",
        dedicated.port
    ))
    .await
    .unwrap();
    DualWrite {
        client,
        target,
        proxy,
        shared,
        dedicated,
    }
}

/// Rows of `table` on `db` matching `cond`, whose `$1` is `v`.
async fn count_where(db: &tokio_postgres::Client, table: &str, cond: &str, v: i32) -> i64 {
    db.query_one(&format!("SELECT count(*) FROM {table} WHERE {cond}"), &[&v])
        .await
        .unwrap()
        .get(0)
}

/// The synchronous tee's promise holds for writes no command tag shows: a function called by a SELECT, a
/// procedure, a DO block (the capture trigger's notice tells the proxy the transaction wrote, and the client
/// never hears that notice), an `INSERT ... RETURNING` whose portal was closed early; and for commits no idle
/// ReadyForQuery follows (`COMMIT AND CHAIN`, `COMMIT; BEGIN`) or that commit another statement's writes
/// (`COMMIT PREPARED`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_hidden_in_functions_are_on_the_target_when_their_commit_returns() {
    let DualWrite {
        client: mut c,
        target,
        proxy,
        shared,
        dedicated,
    } = in_dual_write(
        "CREATE FUNCTION tenant_acme.add_a(x int) RETURNS int LANGUAGE sql \
           AS 'INSERT INTO tenant_acme.a (v) VALUES (x) RETURNING id';
         CREATE PROCEDURE tenant_acme.bump_b(i int) LANGUAGE sql \
           AS 'UPDATE tenant_acme.b SET v = v + 1 WHERE id = i';",
    )
    .await;
    for n in 0..10 {
        let v = 20_000 + n;
        c.batch_execute(&format!("SELECT add_a({v})"))
            .await
            .unwrap();
        let got = count_where(&target, "tenant_acme.a", "v = $1", v).await;
        assert_eq!(
            got, 1,
            "SELECT add_a({v}) returned before the target had it"
        );
        c.batch_execute(&format!("CALL bump_b({})", n + 1))
            .await
            .unwrap();
        let got = target
            .query_one("SELECT v FROM tenant_acme.b WHERE id = $1", &[&(n + 1)])
            .await
            .unwrap()
            .get::<_, i32>(0);
        assert_eq!(got, n + 2, "CALL bump_b returned before the target had it");
        c.batch_execute(&format!(
            "DO $$ BEGIN INSERT INTO tenant_acme.c VALUES ({}); END $$",
            30_000 + n
        ))
        .await
        .unwrap();
        let got = target
            .query_one("SELECT count(*) FROM tenant_acme.c WHERE v >= 30000", &[])
            .await
            .unwrap()
            .get::<_, i64>(0);
        assert_eq!(
            got,
            i64::from(n + 1),
            "DO returned before the target had it"
        );
    }
    // A write hidden in a function, in a Query whose text starts with an INSERT: the INSERT's transaction is
    // over (its COMMIT), so its tag does not speak for the function's. The target's table is locked, so the
    // reply can only come early if it is not held for the tee.
    let mut locker = connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=app",
        dedicated.port
    ))
    .await
    .unwrap();
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE tenant_acme.a IN EXCLUSIVE MODE")
        .await
        .unwrap();
    {
        let mut sent = std::pin::pin!(c.batch_execute(
            "INSERT INTO tenant_acme.c VALUES (70000); COMMIT; SELECT add_a(70001)"
        ));
        let early = tokio::time::timeout(Duration::from_millis(500), sent.as_mut()).await;
        assert!(
            early.is_err(),
            "a function's write after a COMMIT in the same Query returned before the target had it"
        );
        lock.rollback().await.unwrap();
        sent.await.unwrap();
    }
    assert_eq!(
        count_where(&target, "tenant_acme.a", "v = $1", 70001).await,
        1
    );
    // An INSERT ... RETURNING fetched one row at a time and closed early: PostgreSQL wrote all three rows at
    // the first Execute, and neither a command tag nor the capture trigger's notice says so.
    for n in 0..5 {
        let v = 50_000 + 10 * n;
        let tx = c.transaction().await.unwrap();
        let portal = tx
            .bind(
                "INSERT INTO tenant_acme.c SELECT g FROM generate_series($1::int, $1 + 2) g RETURNING v",
                &[&v],
            )
            .await
            .unwrap();
        assert_eq!(tx.query_portal(&portal, 1).await.unwrap().len(), 1);
        drop(portal);
        tx.commit().await.unwrap();
        let got = count_where(&target, "tenant_acme.c", "v BETWEEN $1 AND $1 + 2", v).await;
        assert_eq!(
            got, 3,
            "a commit after a suspended INSERT returned before the target had it"
        );
    }
    // A commit after which no idle ReadyForQuery comes (the session is in its next transaction at once), and
    // a transaction prepared, then committed by COMMIT PREPARED, whose writes no tag of that statement shows.
    for n in 0..5 {
        let v = 60_000 + 10 * n;
        c.batch_execute(&format!(
            "BEGIN; INSERT INTO tenant_acme.c VALUES ({v}); COMMIT AND CHAIN"
        ))
        .await
        .unwrap();
        assert_eq!(
            count_where(&target, "tenant_acme.c", "v = $1", v).await,
            1,
            "COMMIT AND CHAIN returned before the target had it"
        );
        c.batch_execute(&format!(
            "INSERT INTO tenant_acme.c VALUES ({}); COMMIT; BEGIN",
            v + 1
        ))
        .await
        .unwrap();
        assert_eq!(
            count_where(&target, "tenant_acme.c", "v = $1", v + 1).await,
            1,
            "COMMIT; BEGIN returned before the target had it"
        );
        c.batch_execute(&format!(
            "INSERT INTO tenant_acme.c VALUES ({}); PREPARE TRANSACTION 'p{n}'",
            v + 2
        ))
        .await
        .unwrap();
        c.batch_execute(&format!("COMMIT PREPARED 'p{n}'"))
            .await
            .unwrap();
        assert_eq!(
            count_where(&target, "tenant_acme.c", "v = $1", v + 2).await,
            1,
            "COMMIT PREPARED returned before the target had it"
        );
    }
    // psql prints every notice it hears: the capture trigger's is not among them.
    let (ok, out, err) = psql(
        &proxy.url("app.acme", "app"),
        &["-c", "SELECT add_a(1); CALL bump_b(1)"],
    );
    assert!(ok, "{err}");
    assert!(
        !err.contains("NOTICE") && !out.contains("NOTICE"),
        "{out} {err}"
    );
    assert_eq!(
        fingerprint(&dedicated, "tenant_acme"),
        fingerprint(&shared, "tenant_acme")
    );
}

/// The synchronous tee's promise inside a client's pipeline: two autocommit INSERTs sent back to back (each
/// with its Sync; the first sleeps, so the second is on the wire when the first commits). The reply to the
/// first is held for the tee although the second is still in flight behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_inside_a_pipeline_is_on_the_target_when_it_returns() {
    let m = in_dual_write("").await;
    let (c, target) = (std::sync::Arc::new(m.client), std::sync::Arc::new(m.target));
    for n in 0..5 {
        let (first, second) = (40_000 + 2 * n, 40_001 + 2 * n);
        let (c1, t1) = (c.clone(), target.clone());
        let one = tokio::spawn(async move {
            c1.execute(
                "INSERT INTO a (v) SELECT $1::int FROM pg_sleep(0.05)",
                &[&first],
            )
            .await
            .unwrap();
            t1.query_one("SELECT count(*) FROM tenant_acme.a WHERE v = $1", &[&first])
                .await
                .unwrap()
                .get::<_, i64>(0)
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        c.execute("INSERT INTO a (v) VALUES ($1)", &[&second])
            .await
            .unwrap();
        assert_eq!(
            one.await.unwrap(),
            1,
            "pipelined commit {n} returned before the target had it"
        );
    }
}

/// The synchronous tee's promise, one commit at a time: each write is on the target when its COMMIT returns.
/// With no commit waiting after it, the pass is confirmed at once: the source's change log and the target's
/// ledger are emptied without another write to push them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_commit_is_on_the_target_when_it_returns_and_is_confirmed_after() {
    let DualWrite {
        client: c,
        target,
        proxy: _proxy,
        shared,
        dedicated,
    } = in_dual_write("").await;
    for n in 0..20 {
        c.batch_execute(&format!(
            "BEGIN; INSERT INTO a (v) VALUES ({}); UPDATE b SET v = v + 1 WHERE id = {}; COMMIT;",
            10_000 + n,
            n + 1
        ))
        .await
        .unwrap();
        let row = target
            .query_one(
                "SELECT (SELECT count(*) FROM tenant_acme.a WHERE v = $1::int), \
                 (SELECT v FROM tenant_acme.b WHERE id = $2::int)",
                &[&(10_000 + n), &(n + 1)],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), 1, "commit {n} not on the target");
        assert_eq!(row.get::<_, i32>(1), n + 2, "commit {n} not on the target");
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let log = shared.psql(
            "app",
            "SELECT count(*) FROM pgtenant.change_log WHERE tenant = 'acme'",
        );
        let ledger = dedicated.psql(
            "app",
            "SELECT count(*) FROM pgtenant.applied WHERE tenant = 'acme'",
        );
        if log == "0" && ledger == "0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not confirmed: {log} log entries, {ledger} ledger rows"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        fingerprint(&dedicated, "tenant_acme"),
        fingerprint(&shared, "tenant_acme")
    );
}

/// Writes that passed the fence check before the fence went up are waited for, so they reach the target: a
/// statement checks the fence when it starts, and a transaction the proxy no longer counts (its client gone,
/// or a direct connection, as here) could commit on the source after the swap, where nothing copies it across.
/// A prepared transaction holding such a write makes the cutover fall back instead of leaving it behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_open_on_the_source_when_the_fence_goes_up_reach_the_target() {
    let w = in_dual_write("").await;
    let proxy = &w.proxy;
    let direct = connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=app",
        w.shared.port
    ))
    .await
    .unwrap();
    direct
        .batch_execute(
            "BEGIN; INSERT INTO tenant_acme.a (v) VALUES (777002); PREPARE TRANSACTION 'held'",
        )
        .await
        .unwrap();
    cutover_falls_back(proxy, "before the fence").await;
    direct
        .batch_execute("COMMIT PREPARED 'held'")
        .await
        .unwrap();
    wait_lag_zero(proxy, "acme").await;

    // A transaction that wrote before the fence, and a REPEATABLE READ one whose snapshot predates the fence
    // (it does not see it) and that writes only once the fence is up. Both commit while the cutover waits.
    let url = format!(
        "host=127.0.0.1 port={} user=postgres dbname=app",
        w.shared.port
    );
    let (repeatable, watcher) = (connect(&url).await.unwrap(), connect(&url).await.unwrap());
    direct
        .batch_execute("BEGIN; INSERT INTO tenant_acme.a (v) VALUES (777001)")
        .await
        .unwrap();
    repeatable
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM tenant_acme.b")
        .await
        .unwrap();
    let cutover = proxy.admin(json!({"cmd": "migrate.cutover", "tenant": "acme"}));
    let commit = async {
        let fenced = "SELECT count(*) FROM pgtenant.fenced WHERE tenant = 'acme'";
        let deadline = Instant::now() + Duration::from_secs(10);
        while watcher
            .query_one(fenced, &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 0
        {
            assert!(Instant::now() < deadline, "the fence never went up");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        direct.batch_execute("COMMIT").await.unwrap();
        // Only the REPEATABLE READ transaction is left; it holds no lock on the tenant's tables yet.
        tokio::time::sleep(Duration::from_millis(300)).await;
        repeatable
            .batch_execute("INSERT INTO tenant_acme.a (v) VALUES (777003); COMMIT")
            .await
            .unwrap();
    };
    let (cut, ()) = tokio::join!(cutover, commit);
    assert_eq!(cut["ok"], json!(true), "{cut}");
    for v in [777001, 777002, 777003] {
        assert_eq!(
            count_where(&w.target, "tenant_acme.a", "v = $1", v).await,
            1,
            "{v}"
        );
    }
}

/// The client's session settings do not change the row images the move applies: with `extra_float_digits = 0`
/// and `IntervalStyle = sql_standard`, the source stores 0.30000000000000004 and an all-negative interval, and
/// the target must hold the same, also after an UPDATE of a table without a key (matched on the old image).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_settings_do_not_change_the_values_the_target_gets() {
    let w = in_dual_write(
        "CREATE TABLE tenant_acme.f (id serial PRIMARY KEY, x float8, i interval);
         CREATE TABLE tenant_acme.g (x float8)",
    )
    .await;
    w.client
        .batch_execute(
            "SET extra_float_digits = 0; SET IntervalStyle = sql_standard;
             INSERT INTO f (x, i) VALUES (0.1::float8 + 0.2, '-1 days -2 hours');
             INSERT INTO g VALUES (0.1::float8 + 0.2);
             UPDATE g SET x = x * 3",
        )
        .await
        .unwrap();
    let image = "SELECT (SELECT string_agg(x::text || ' ' || i::text, ',') FROM tenant_acme.f) || ' / ' || \
                 (SELECT string_agg(x::text, ',') FROM tenant_acme.g)";
    let source = w.shared.psql("app", image);
    assert_eq!(
        source,
        "0.30000000000000004 -1 days -02:00:00 / 0.9000000000000001"
    );
    let target: String = w.target.query_one(image, &[]).await.unwrap().get(0);
    assert_eq!(target, source);
}
