//! Migration operations on real PostgreSQL: webhooks, tenant backups and restores, and the delayed drop of a
//! finalized move's source.

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::moves::*;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

/// What a receiver got: the headers that matter and the body.
#[derive(Clone, Debug)]
struct Got {
    event: String,
    signature: String,
    body: Vec<u8>,
}

/// A webhook receiver on hyper's HTTP/1 server: records every POST and answers 200.
async fn receiver() -> (u16, Arc<Mutex<Vec<Got>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let store = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let store = store.clone();
                    async move {
                        let header = |n: &str| {
                            req.headers()
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_owned()
                        };
                        let (event, signature) =
                            (header("x-pgtenant-event"), header("x-pgtenant-signature"));
                        let body = req.into_body().collect().await.unwrap().to_bytes().to_vec();
                        store.lock().unwrap().push(Got {
                            event,
                            signature,
                            body,
                        });
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (port, got)
}

/// Every event of a move reaches a live receiver in order with a valid signature, while a receiver that is
/// down (nothing listens on its port) neither slows nor fails the move; its failures are in the delivery log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_get_every_event_in_order_and_a_dead_receiver_changes_nothing() {
    let shared = PgCluster::start();
    let dedicated = PgCluster::start();
    small_schema(&shared);
    let (port, got) = receiver().await;
    let dead = free_port();
    let hooks = format!(
        "[[webhooks]]\nurl = \"http://127.0.0.1:{port}/hook?token=t\"\nsecret = \"hook-secret\"\n\
         [[webhooks]]\nurl = \"http://127.0.0.1:{dead}/hook\"\nsecret = \"other\"\nmax_attempts = 2\n\
         events = [\"migration.state\", \"migration.cutover\"]\n"
    );
    let proxy = up(harness(&shared, &dedicated).raw(&hooks)).await;
    start_acme(&proxy).await;
    wait_state(&proxy, "acme", "dual_write", Duration::from_secs(30)).await;
    wait_lag_zero(&proxy, "acme").await;
    let cut = proxy
        .admin_ok(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
        .await;
    let pause = cut["pause_ms"].as_f64().unwrap();
    common::held_briefly(pause, &cut);
    proxy
        .admin_ok(json!({"cmd": "migrate.finalize", "tenant": "acme"}))
        .await;
    let expected = [
        ("migration.state", "pending"),
        ("migration.state", "bulk_copy"),
        ("migration.state", "dual_write"),
        ("migration.verification", ""),
        ("migration.state", "cutover_paused"),
        ("migration.state", "migrated"),
        ("migration.cutover", ""),
        ("migration.state", "completed"),
    ];
    assert!(
        eventually(Duration::from_secs(10), || got.lock().unwrap().len()
            >= expected.len())
        .await,
        "{:?}",
        got.lock().unwrap()
    );
    let got = got.lock().unwrap().clone();
    let mut last_id = 0;
    for (g, (event, to)) in got.iter().zip(expected) {
        let body: Value = serde_json::from_slice(&g.body).unwrap();
        assert_eq!(g.event, event, "{body}");
        assert_eq!(body["event"], json!(event));
        assert_eq!(body["tenant"], json!("acme"));
        if !to.is_empty() {
            assert_eq!(body["data"]["to"], json!(to), "{body}");
        }
        if event == "migration.cutover" {
            assert_eq!(body["data"]["outcome"], json!("swapped"));
            assert_eq!(body["data"]["pause_ms"].as_f64(), Some(pause));
        }
        if event == "migration.verification" {
            assert_eq!(body["data"]["passed"], json!(true), "{body}");
        }
        assert_eq!(
            g.signature,
            pgtenant::notify::signature(b"hook-secret", &g.body),
            "{body}"
        );
        let id = body["id"].as_u64().unwrap();
        assert!(id > last_id, "ids increase");
        last_id = id;
    }
    assert_eq!(got.len(), expected.len(), "{got:?}");
    // The dead receiver's deliveries fail after their attempts, and say so in the log; the live one's URL is
    // logged without its query.
    let log = |proxy: &TestProxy| {
        let proxy = proxy.admin_socket();
        async move { admin_line(&proxy, &json!({"cmd": "webhooks.log", "tail": 100})).await }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let l = log(&proxy).await;
        let entries = l["result"]["deliveries"].as_array().unwrap().clone();
        let failed = entries
            .iter()
            .filter(|d| d["outcome"] == json!("failed"))
            .count();
        let ok = entries
            .iter()
            .filter(|d| d["outcome"] == json!("delivered"))
            .count();
        // A delivery is logged once its answer is in, a moment after the receiver has it.
        if failed >= 1 && ok >= expected.len() {
            let f = entries
                .iter()
                .find(|d| d["outcome"] == json!("failed"))
                .unwrap();
            assert_eq!(f["attempts"], json!(2), "{f}");
            // Host and port only: a receiver's path may carry its token, and API viewers read this log.
            assert_eq!(f["url"], json!(format!("http://127.0.0.1:{dead}")));
            assert!(f["error"].as_str().unwrap().contains("connect"), "{f}");
            assert_eq!(ok, expected.len(), "{l}");
            assert!(entries
                .iter()
                .all(|d| !d["url"].as_str().unwrap().contains("/hook")));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no failure, or not every delivery, logged: {l}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "webhooks: {} events delivered in order; cutover pause {pause:.1} ms with a dead receiver",
        got.len()
    );
}

/// A schema with the kinds of objects a restore must bring back: serial and identity keys, a generated column,
/// a foreign key, an index, a view, an enum and a trigger function.
const RICH: &str = "
CREATE SCHEMA tenant_acme;
SET search_path = tenant_acme;
CREATE TYPE mood AS ENUM ('ok', 'meh');
CREATE TABLE orders (id serial PRIMARY KEY, note text, mood mood DEFAULT 'ok');
CREATE TABLE items (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, order_id int NOT NULL REFERENCES orders(id), qty int, twice int GENERATED ALWAYS AS (qty * 2) STORED);
CREATE INDEX items_qty ON items (qty);
CREATE TABLE counters (k text PRIMARY KEY, v int NOT NULL, changes int NOT NULL DEFAULT 0);
CREATE FUNCTION bump() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.changes := OLD.changes + 1; RETURN NEW; END $$;
CREATE TRIGGER counters_bump BEFORE UPDATE ON counters FOR EACH ROW EXECUTE FUNCTION bump();
CREATE VIEW big_items AS SELECT * FROM items WHERE qty > 100;
INSERT INTO orders (note) SELECT 'o' || g || E'\\ttab\\nline' FROM generate_series(1, 1500) g;
INSERT INTO items (order_id, qty) SELECT (g % 1500) + 1, g FROM generate_series(1, 3000) g;
INSERT INTO counters (k, v) SELECT 'k' || g, g FROM generate_series(1, 20) g;
CREATE SCHEMA tenant_beta; CREATE TABLE tenant_beta.t (id int PRIMARY KEY);
";

/// A backup is a point in time of the tenant; it restores next to the live tenant under a new name (schema,
/// sequences, trigger, view and generated column working), and to another backend under the same name; a
/// restore never overwrites, and a backup with one changed byte is refused before anything is touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_restore_under_a_new_name_and_a_damaged_one_is_refused() {
    let shared = PgCluster::start();
    let dedicated = PgCluster::start();
    shared.psql("app", RICH);
    let proxy = up(harness(&shared, &dedicated)).await;
    let before = fingerprint(&shared, "tenant_acme");
    let taken = proxy
        .admin_ok(json!({"cmd": "tenant.backup", "tenant": "acme"}))
        .await;
    assert_eq!(taken["tables"], json!(3), "{taken}");
    assert_eq!(taken["rows"], json!(4520), "{taken}");
    let file = taken["file"].as_str().unwrap().to_owned();
    // Every row of the tenant: readable by the proxy's user only.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let path = std::path::Path::new(&file);
        assert_eq!(mode(path), 0o600, "{file}");
        assert_eq!(mode(path.parent().unwrap()), 0o700, "{file}");
    }
    // Later writes are not in the backup.
    let acme = proxy.connect("app.acme", "app").await.unwrap();
    acme.batch_execute("INSERT INTO orders (note) VALUES ('after the backup')")
        .await
        .unwrap();
    let listed = proxy
        .admin_ok(json!({"cmd": "tenant.backups", "tenant": "acme"}))
        .await;
    assert_eq!(listed["backups"][0]["file"], json!(file), "{listed}");
    assert_eq!(listed["backups"][0]["rows"], json!(4520));

    // Next to the live tenant, as acme2.
    let restored = proxy
        .admin_ok(json!({"cmd": "tenant.restore", "file": file, "to": "shared", "as": "acme2"}))
        .await;
    assert_eq!(restored["schema"], json!("tenant_acme2"), "{restored}");
    let notes = restored["notes"].to_string();
    assert!(notes.contains("tenant set acme2"), "{restored}");
    assert_eq!(fingerprint(&shared, "tenant_acme2"), before);
    assert_ne!(
        fingerprint(&shared, "tenant_acme"),
        before,
        "the live tenant kept its later row"
    );
    proxy
        .admin_ok(json!({"cmd": "tenant.set", "tenant": "acme2", "backend": "shared", "schema": "tenant_acme2"}))
        .await;
    grant(&proxy, &["acme2"]).await;
    let acme2 = proxy.connect("app.acme2", "app").await.unwrap();
    let row = acme2
        .query_one(
            "WITH o AS (INSERT INTO orders (note) VALUES ('new') RETURNING id)
             SELECT (SELECT id FROM o), (SELECT count(*) FROM big_items)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, i32>(0),
        1501,
        "the sequence continues where the backup was"
    );
    assert_eq!(row.get::<_, i64>(1), 2900);
    acme2
        .batch_execute("UPDATE counters SET v = v + 1 WHERE k = 'k1'")
        .await
        .unwrap();
    let changes: i32 = acme2
        .query_one("SELECT changes FROM counters WHERE k = 'k1'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(changes, 1, "the trigger came back");
    let twice: i32 = acme2
        .query_one("SELECT twice FROM items WHERE id = 7", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(twice, 14);

    // Never over existing data.
    let again = proxy
        .admin(json!({"cmd": "tenant.restore", "file": file, "to": "shared", "as": "acme2"}))
        .await;
    assert_eq!(again["error"]["code"], json!("invalid_state"), "{again}");
    assert!(again["error"]["message"]
        .as_str()
        .unwrap()
        .contains("already exists"));

    // Same name, another backend.
    let there = proxy
        .admin_ok(json!({"cmd": "tenant.restore", "file": file, "to": "dedicated"}))
        .await;
    assert_eq!(there["schema"], json!("tenant_acme"), "{there}");
    assert_eq!(fingerprint(&dedicated, "tenant_acme"), before);

    // One changed byte: refused, nothing made.
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    let damaged = format!("{file}.damaged.pgtbackup");
    std::fs::write(&damaged, &bytes).unwrap();
    let refused = proxy
        .admin(json!({"cmd": "tenant.restore", "file": damaged, "to": "shared", "as": "acme3"}))
        .await;
    assert_eq!(
        refused["error"]["code"],
        json!("backup_corrupt"),
        "{refused}"
    );
    assert_eq!(
        shared.psql(
            "app",
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_acme3'"
        ),
        "0"
    );
    eprintln!(
        "backup: {} bytes in {} ms; restore as acme2 {} ms",
        taken["size"], taken["took_ms"], restored["took_ms"]
    );
}

/// A tenant of shared tables: its rows only, restored under a new key on a backend whose tables hold other
/// tenants, foreign keys intact; a second restore is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_of_rows_in_shared_tables_restores_under_a_new_key() {
    const TABLES: &str = "
        CREATE TABLE accounts (id serial PRIMARY KEY, tenant text NOT NULL, name text);
        CREATE TABLE transfers (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, tenant text NOT NULL,
            account_id int NOT NULL REFERENCES accounts(id), amount int);
        CREATE TABLE settings (k text PRIMARY KEY, v text);";
    let shared = PgCluster::start();
    let dedicated = PgCluster::start();
    for pg in [&shared, &dedicated] {
        pg.psql("app", TABLES);
    }
    shared.psql(
        "app",
        "INSERT INTO accounts (tenant, name) SELECT CASE WHEN g % 2 = 0 THEN 'acme' ELSE 'globex' END, 'a' || g
           FROM generate_series(1, 400) g;
         INSERT INTO transfers (tenant, account_id, amount) SELECT a.tenant, a.id, g FROM accounts a, generate_series(1, 3) g;",
    );
    dedicated.psql(
        "app",
        "SELECT setval('accounts_id_seq', 1000000);
         INSERT INTO accounts (tenant, name) SELECT 'initech', 'i' || g FROM generate_series(1, 1000) g",
    );
    let proxy = Harness::new()
        .backend_with("shared", &shared, "database = \"app\"")
        .backend_with("dedicated", &dedicated, "database = \"app\"")
        .tenant("acme", "shared", None, None)
        .tenant_extra("tenant_column = \"tenant\"")
        .start()
        .await;
    let taken = proxy
        .admin_ok(json!({"cmd": "tenant.backup", "tenant": "acme"}))
        .await;
    assert_eq!(taken["holds"], json!("rows"), "{taken}");
    assert_eq!(
        taken["tables"],
        json!(2),
        "only tables with the tenant column: {taken}"
    );
    assert_eq!(taken["rows"], json!(800));
    let file = taken["file"].as_str().unwrap();
    let restored = proxy
        .admin_ok(json!({"cmd": "tenant.restore", "file": file, "to": "dedicated", "as": "acme2"}))
        .await;
    assert_eq!(restored["tenant_key"], json!("acme2"), "{restored}");
    let summary = |pg: &PgCluster, t: &str| {
        pg.psql(
            "app",
            &format!(
                "SELECT (SELECT count(*) || ':' || sum(id) FROM accounts WHERE tenant = '{t}') || ' ' ||
                        (SELECT count(*) || ':' || sum(amount) || ':' || sum(account_id) FROM transfers WHERE tenant = '{t}')"
            ),
        )
    };
    assert_eq!(summary(&dedicated, "acme2"), summary(&shared, "acme"));
    assert_eq!(
        dedicated.psql(
            "app",
            "SELECT count(*) FROM accounts WHERE tenant = 'initech'"
        ),
        "1000"
    );
    // New rows on the target take keys past the restored ones.
    let next: i32 = dedicated
        .psql(
            "app",
            "INSERT INTO accounts (tenant) VALUES ('x') RETURNING id",
        )
        .parse()
        .unwrap();
    assert!(next > 1_001_000, "{next}");
    let again = proxy
        .admin(json!({"cmd": "tenant.restore", "file": file, "to": "dedicated", "as": "acme2"}))
        .await;
    assert_eq!(again["error"]["code"], json!("invalid_state"), "{again}");
}

/// `migrate start --backup` takes a backup first; `finalize --drop-source-after` keeps the (fenced) source
/// copy through its window, across a restart, and drops it after; the drop is audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_is_dropped_after_its_window_and_not_before_across_a_restart() {
    let shared = PgCluster::start();
    let dedicated = PgCluster::start();
    small_schema(&shared);
    let h = harness(&shared, &dedicated);
    let config = h.config();
    let proxy = up(h).await;
    let started = proxy
        .admin_ok(json!({"cmd": "migrate.start", "tenant": "acme", "to": "dedicated", "verify": "hash", "backup": true}))
        .await;
    let backup = started["backup"].as_str().unwrap();
    assert!(std::path::Path::new(backup).exists(), "{started}");
    wait_state(&proxy, "acme", "dual_write", Duration::from_secs(30)).await;
    wait_lag_zero(&proxy, "acme").await;
    proxy
        .admin_ok(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
        .await;
    let refused = proxy
        .admin(json!({"cmd": "migrate.finalize", "tenant": "acme", "drop_source_after": "soon"}))
        .await;
    assert_eq!(
        refused["error"]["code"],
        json!("invalid_argument"),
        "{refused}"
    );
    let fin = proxy
        .admin_ok(json!({"cmd": "migrate.finalize", "tenant": "acme", "drop_source_after": "6s"}))
        .await;
    assert_eq!(fin["state"], json!("completed"), "{fin}");
    assert_eq!(fin["source_dropped"], json!(false));
    let listed = proxy.admin_ok(json!({"cmd": "migrate.drops"})).await;
    let due = listed["drops"][0]["due_unix"].as_u64().unwrap();
    assert_eq!(
        listed["drops"][0]["schema"],
        json!("tenant_acme"),
        "{listed}"
    );
    let source_left = || {
        shared.psql(
            "app",
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_acme'",
        )
    };
    assert_eq!(source_left(), "1");
    // A restart inside the window.
    let proxy = proxy.restart(&config).await;
    let unix = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    while unix() < due {
        assert_eq!(source_left(), "1", "dropped before its time");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        eventually(Duration::from_secs(15), || source_left() == "0").await,
        "the source was not dropped after its window"
    );
    assert!(unix() >= due);
    assert_eq!(
        shared.psql(
            "app",
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_beta'"
        ),
        "1"
    );
    let listed = proxy.admin_ok(json!({"cmd": "migrate.drops"})).await;
    assert_eq!(listed["drops"], json!([]), "{listed}");
    let audit = proxy.admin_ok(json!({"cmd": "audit", "tail": 50})).await;
    assert!(
        audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["command"] == json!("migrate.drop_source") && e["result"] == json!("ok")),
        "{audit}"
    );
    let none = proxy
        .admin(json!({"cmd": "migrate.cancel_drop", "tenant": "acme"}))
        .await;
    assert_eq!(none["error"]["code"], json!("invalid_state"), "{none}");
    // The tenant keeps working on its new home.
    let c = proxy.connect("app.acme", "app").await.unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM a", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2000);
}

/// The README's walk-through: a tenant goes from a schema in the shared database to a database of its own on
/// the same server, to a dedicated server, and back to a schema in the shared database; each hop estimated
/// first, the first one backed up first; the history has all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_walks_the_tiers_and_back() {
    let shared = PgCluster::start();
    let dedicated = PgCluster::start();
    small_schema(&shared);
    shared.psql("postgres", "CREATE DATABASE acme");
    let proxy = up(harness(&shared, &dedicated)).await;
    let count = |proxy: &TestProxy| {
        let url = proxy.url("app.acme", "app");
        async move {
            let c = connect(&url).await.unwrap();
            c.batch_execute("INSERT INTO a (v) VALUES (-1)")
                .await
                .unwrap();
            c.query_one("SELECT count(*) FROM a", &[])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    assert_eq!(count(&proxy).await, 2001);
    let hops = [
        json!({"to": "shared", "database": "acme", "backup": true}),
        json!({"to": "dedicated", "database": "app"}),
        json!({"to": "shared", "database": "app"}),
    ];
    for (i, hop) in hops.iter().enumerate() {
        let mut req = hop.as_object().unwrap().clone();
        req.insert("tenant".into(), json!("acme"));
        req.insert("verify".into(), json!("hash"));
        let mut ask = req.clone();
        ask.remove("backup");
        ask.insert("cmd".into(), json!("migrate.estimate"));
        let e = proxy.admin_ok(Value::Object(ask)).await;
        assert_eq!(e["preflight_passed"], json!(true), "hop {i}: {e}");
        req.insert("cmd".into(), json!("migrate.start"));
        proxy.admin_ok(Value::Object(req)).await;
        wait_state(&proxy, "acme", "dual_write", Duration::from_secs(30)).await;
        wait_lag_zero(&proxy, "acme").await;
        proxy
            .admin_ok(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
            .await;
        proxy
            .admin_ok(json!({"cmd": "migrate.finalize", "tenant": "acme", "drop_source": true}))
            .await;
        let route = proxy
            .admin_ok(json!({"cmd": "tenant.get", "tenant": "acme"}))
            .await;
        assert_eq!(route["route"]["backend"], hop["to"], "{route}");
        assert_eq!(route["route"]["database"], hop["database"], "{route}");
        assert_eq!(count(&proxy).await, 2002 + i as i64, "hop {i}");
    }
    assert_eq!(
        shared.psql(
            "acme",
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_acme'"
        ),
        "0",
        "the own-database copy was dropped when the tenant left it"
    );
    let h = proxy
        .admin_ok(json!({"cmd": "migrate.history", "tenant": "acme"}))
        .await;
    let hops_done: Vec<(String, String)> = h["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["outcome"].as_str().unwrap().to_owned(),
                format!(
                    "{}/{}",
                    e["target"]["backend"].as_str().unwrap(),
                    e["target"]["database"].as_str().unwrap()
                ),
            )
        })
        .collect();
    assert_eq!(
        hops_done,
        [
            ("completed".to_owned(), "shared/app".to_owned()),
            ("completed".to_owned(), "dedicated/app".to_owned()),
            ("completed".to_owned(), "shared/acme".to_owned()),
        ],
        "{h}"
    );
    let backups = proxy
        .admin_ok(json!({"cmd": "tenant.backups", "tenant": "acme"}))
        .await;
    assert_eq!(backups["backups"].as_array().unwrap().len(), 1, "{backups}");
}
