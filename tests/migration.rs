//! Live migration end to end on real PostgreSQL: bulk copy, the exact tee under pgbench load, verification,
//! cutover, rollback, finalize and abort, restarts and failures at named failpoints.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
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

fn harness(shared: &PgCluster, dedicated: &PgCluster) -> Harness {
    Harness::new()
        .backend_with("shared", shared, "database = \"app\"\npool_size = 30")
        .backend_with("dedicated", dedicated, "database = \"app\"\npool_size = 30")
        .tenant("acme", "shared", None, Some("tenant_acme"))
        .tenant("beta", "shared", None, Some("tenant_beta"))
        .raw("[migration]\npg_dump = \"/usr/lib/postgresql/15/bin/pg_dump\"\ncopy_batch_rows = 1000\nverify_chunk_rows = 500\ncutover_timeout_ms = 3000")
}

async fn status(proxy: &TestProxy, tenant: &str) -> Value {
    proxy
        .admin_ok(json!({"cmd": "migrate.status", "tenant": tenant}))
        .await
}

async fn wait_state(proxy: &TestProxy, tenant: &str, state: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let s = status(proxy, tenant).await;
        if s["state"] == json!(state) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "migration did not reach {state}: {s:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Per table: row count and a digest of all rows (in key or text order), as one comparable string.
fn fingerprint(pg: &PgCluster, schema: &str) -> String {
    pg.psql(
        "app",
        &format!(
            "SELECT string_agg(relname || ':' || n || ':' || h, ' ' ORDER BY relname) FROM (
               SELECT c.relname, (xpath('/row/n/text()', query_to_xml(format('SELECT count(*) AS n FROM %I.%I', '{schema}', c.relname), false, true, '')))[1]::text AS n,
                      (xpath('/row/h/text()', query_to_xml(format('SELECT md5(string_agg(x::text, '','' ORDER BY x::text)) AS h FROM %I.%I x', '{schema}', c.relname), false, true, '')))[1]::text AS h
                 FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace
                WHERE s.nspname = '{schema}' AND c.relkind = 'r') f"
        ),
    )
}

fn pgbench(url: &str, args: &[&str]) -> String {
    let out = Command::new("pgbench")
        .args(args)
        .arg(url)
        .env("PGPASSWORD", PASSWORD)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pgbench {args:?} failed:\n{text}");
    text
}

fn acme_url(proxy: &TestProxy) -> String {
    format!(
        "host=127.0.0.1 port={} user=app.acme dbname=app",
        proxy.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrates_a_tenant_live_and_rolls_back() {
    let shared = PgCluster::start();
    let dedicated = PgCluster::start();
    shared.psql("app", SCHEMA);
    let proxy = harness(&shared, &dedicated).start().await;
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
    let port: i32 = c
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(port as u16, dedicated.port);
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
    let port: i32 = c
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(port as u16, shared.port);
    // Capture is gone from both sides.
    for pg in [&shared, &dedicated] {
        assert_eq!(
            pg.psql(
                "app",
                "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgtenant_%'"
            ),
            "0"
        );
        assert_eq!(
            pg.psql("app", "SELECT count(*) FROM pgtenant.change_log"),
            "0"
        );
    }
}

async fn wait_lag_zero(proxy: &TestProxy, tenant: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = status(proxy, tenant).await;
        if s["lag_events"] == json!(0) {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            if status(proxy, tenant).await["lag_events"] == json!(0) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "lag did not drain: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
