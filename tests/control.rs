//! The control plane on real PostgreSQL: admin commands and their errors, live route changes, the per-tenant
//! gate, durable state and audit log, metrics, and reload.

mod common;

use std::time::{Duration, Instant};

use common::{
    admin_line, closes_within, code, eventually, http_get, psql, Harness, PgCluster, TestProxy,
    PASSWORD,
};
use serde_json::json;

use common::{show, two_clusters as clusters, Two};

fn harness(w: &Two) -> Harness {
    Harness::new()
        .backend_with("shared", &w.shared, "database = \"app\"")
        .backend_with("dedicated", &w.dedicated, "database = \"app\"")
        .tenant("acme", "shared", None, Some("tenant_acme"))
        .tenant("globex", "shared", None, Some("tenant_globex"))
}

async fn who(c: &tokio_postgres::Client) -> String {
    c.query_one("SELECT who FROM t", &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_and_their_errors() {
    let w = clusters();
    let p = harness(&w).start().await;
    let c = p.connect("app.acme", "app").await.unwrap();
    who(&c).await;

    let t = p.admin_ok(json!({"cmd": "tenants"})).await;
    assert_eq!(t["tenants"].as_array().unwrap().len(), 2);
    assert_eq!(t["tenants"][0]["tenant"], "acme");
    assert_eq!(t["tenants"][0]["sessions"], 1);
    let g = p
        .admin_ok(json!({"cmd": "tenant.get", "tenant": "acme"}))
        .await;
    assert_eq!(g["route"]["schema"], "tenant_acme");
    assert_eq!(g["sessions"][0]["on_current_route"], true);
    let b = p.admin_ok(json!({"cmd": "backends"})).await;
    assert_eq!(b["backends"][1]["backend"], "shared");
    // (The startup check of the serving role left one idle connection beside the session's.)
    assert_eq!(b["backends"][1]["pools"][0]["active"], 1);
    let s = p.admin_ok(json!({"cmd": "stats"})).await;
    assert_eq!(s["client_sessions"], 1);
    let set = p
        .admin_ok(json!({"cmd": "tenant.set", "tenant": "initech", "backend": "dedicated", "schema": "tenant_acme"}))
        .await;
    assert!(set["epoch"].as_u64().unwrap() > t["epoch"].as_u64().unwrap());
    let c2 = p.connect("app.initech", "app").await.unwrap();
    assert_eq!(who(&c2).await, "dedicated");
    p.admin_ok(json!({"cmd": "tenant.remove", "tenant": "initech"}))
        .await;
    assert_eq!(
        code(&p.connect("app.initech", "app").await.unwrap_err()),
        "3D000"
    );
    // The removed tenant's open session ends with a clear error at its next statement.
    let e = c2.query_one("SELECT 1", &[]).await.unwrap_err();
    assert!(common::message(&e).contains("was removed"), "{e}");
    p.admin_ok(json!({"cmd": "pause", "tenant": "globex", "timeout_ms": 100}))
        .await;
    p.admin_ok(json!({"cmd": "resume", "tenant": "globex"}))
        .await;

    // Every refusal has its stable code.
    assert_eq!(p.admin_err(json!({"cmd": "nope"})).await, "unknown_command");
    assert_eq!(
        p.admin_err(json!({"cmd": "tenant.get"})).await,
        "missing_argument"
    );
    assert_eq!(
        p.admin_err(json!({"cmd": "tenant.get", "tenant": "a b"}))
            .await,
        "invalid_argument"
    );
    assert_eq!(
        p.admin_err(json!({"cmd": "tenant.get", "tenant": "ghost"}))
            .await,
        "unknown_tenant"
    );
    assert_eq!(
        p.admin_err(json!({"cmd": "tenant.remove", "tenant": "ghost"}))
            .await,
        "unknown_tenant"
    );
    assert_eq!(
        p.admin_err(json!({"cmd": "pause", "tenant": "ghost"}))
            .await,
        "unknown_tenant"
    );
    assert_eq!(
        p.admin_err(json!({"cmd": "tenant.set", "tenant": "x", "backend": "ghost"}))
            .await,
        "unknown_backend"
    );
    assert_eq!(
        p.admin_err(json!({"cmd": "resume", "tenant": "acme"}))
            .await,
        "invalid_state"
    );
    assert_eq!(p.admin_err(json!({"cmd": "reload"})).await, "invalid_state");
    assert_eq!(
        p.admin_err(json!({"cmd": "audit", "tail": -3})).await,
        "invalid_argument"
    );

    // Raw lines on one connection: bad JSON, then a good request, on the same connection.
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let stream = tokio::net::UnixStream::connect(p.admin_socket())
        .await
        .unwrap();
    let (r, mut wr) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    wr.write_all(b"{not json\n{\"cmd\":\"tenants\"}\n")
        .await
        .unwrap();
    let first: serde_json::Value =
        serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    assert_eq!(first["error"]["code"], "bad_json");
    let second: serde_json::Value =
        serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    assert_eq!(second["ok"], true);
    let big = vec![b'x'; 70 * 1024];
    wr.write_all(&big).await.unwrap();
    let third: serde_json::Value =
        serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    assert_eq!(third["error"]["code"], "request_too_large");

    // The socket is the owner's only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(p.admin_socket())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_binary_prints_tables_json_and_exit_codes() {
    let w = clusters();
    let p = harness(&w).start().await;
    let sock = p.admin_socket();
    let ctl = move |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgtenant"))
            .arg("ctl")
            .args(args)
            .env("PGTENANT_ADMIN_SOCKET", &sock)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (status, out, _) = tokio::task::spawn_blocking(move || {
        let r = ctl(&["tenants"]);
        assert!(
            r.1.contains("TENANT") && r.1.contains("tenant_globex"),
            "{}",
            r.1
        );
        let j = ctl(&["--json", "tenant", "get", "acme"]);
        let v: serde_json::Value = serde_json::from_str(&j.1).unwrap();
        assert_eq!(v["route"]["backend"], "shared");
        let bad = ctl(&["tenant", "get", "ghost"]);
        assert_eq!(bad.0, 1);
        assert!(bad.2.contains("unknown_tenant"), "{}", bad.2);
        let unreachable = std::process::Command::new(env!("CARGO_BIN_EXE_pgtenant"))
            .args(["ctl", "--socket", "/nonexistent/pgtenant.sock", "stats"])
            .output()
            .unwrap();
        assert_eq!(unreachable.status.code(), Some(2));
        let set = ctl(&[
            "tenant",
            "set",
            "acme",
            "--backend",
            "dedicated",
            "--schema",
            "tenant_acme",
        ]);
        assert_eq!(set.0, 0, "{}", set.2);
        ctl(&["audit", "--tail", "5"])
    })
    .await
    .unwrap();
    assert_eq!(status, 0);
    assert!(
        out.contains("tenant.set") && out.contains("checksums verified"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_flip_moves_sessions_at_their_next_transaction() {
    let w = clusters();
    let p = harness(&w).start().await;
    let mover = p.connect("app.acme", "app").await.unwrap();
    let in_tx = p.connect("app.acme", "app").await.unwrap();
    let pinned = p.connect("app.acme", "app").await.unwrap();
    let other = p.connect("app.globex", "app").await.unwrap();
    assert_eq!(who(&mover).await, "tenant_acme");
    pinned.batch_execute("LISTEN jobs").await.unwrap();
    // A session with state the proxy carries: a SET, an SQL PREPARE, a protocol-level prepared statement,
    // and a SET made inside a rolled-back transaction (which must not come along).
    let stateful = p.connect("app.acme", "app").await.unwrap();
    stateful
        .batch_execute("SET work_mem = '8MB'")
        .await
        .unwrap();
    stateful
        .batch_execute("PREPARE q AS SELECT who FROM t")
        .await
        .unwrap();
    for step in ["BEGIN", "SET statement_timeout = '7s'", "ROLLBACK"] {
        stateful.batch_execute(step).await.unwrap();
    }
    stateful
        .batch_execute("SET LOCAL lock_timeout = '3s'")
        .await
        .unwrap();
    let kept = stateful.prepare("SELECT who || '!' FROM t").await.unwrap();
    in_tx.batch_execute("BEGIN").await.unwrap();
    assert_eq!(who(&in_tx).await, "tenant_acme");

    // A client looping on queries across the flip sees every query answered.
    let looper = p.connect("app.acme", "app").await.unwrap();
    let loop_task = tokio::spawn(async move {
        let mut seen = Vec::new();
        for _ in 0..200 {
            let w: String = looper
                .query_one("SELECT who FROM t", &[])
                .await
                .unwrap()
                .get(0);
            if seen.last() != Some(&w) {
                seen.push(w);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        seen
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    p.admin_ok(json!({"cmd": "tenant.set", "tenant": "acme", "backend": "dedicated", "schema": "tenant_acme"}))
        .await;
    assert_eq!(
        who(&mover).await,
        "dedicated",
        "the next transaction lands on the new route"
    );
    assert_eq!(
        who(&in_tx).await,
        "tenant_acme",
        "an open transaction finishes where it started"
    );
    in_tx.batch_execute("COMMIT").await.unwrap();
    assert_eq!(who(&in_tx).await, "dedicated");
    assert_eq!(
        who(&pinned).await,
        "tenant_acme",
        "LISTEN keeps a session on its old backend"
    );
    let started = std::time::Instant::now();
    assert_eq!(
        who(&stateful).await,
        "dedicated",
        "carried state does not hold a session back"
    );
    let with_move = started.elapsed();
    let started = std::time::Instant::now();
    who(&stateful).await;
    eprintln!(
        "move with state replay: first transaction after the flip {:?}, the next one {:?}",
        with_move,
        started.elapsed()
    );
    assert_eq!(show(&stateful, "work_mem").await, "8MB");
    assert_eq!(
        show(&stateful, "statement_timeout").await,
        "0",
        "a rolled-back SET is not carried"
    );
    assert_eq!(
        show(&stateful, "lock_timeout").await,
        "0",
        "SET LOCAL is not carried"
    );
    let prepared = stateful.simple_query("EXECUTE q").await.unwrap();
    let first = prepared.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(
        first.as_deref(),
        Some("dedicated"),
        "an SQL PREPAREd statement survives the move"
    );
    let row = stateful.query_one(&kept, &[]).await.unwrap();
    assert_eq!(
        row.get::<_, String>(0),
        "dedicated!",
        "a protocol-level prepared statement survives the move"
    );
    let seen = loop_task.await.unwrap();
    assert_eq!(
        seen,
        vec!["tenant_acme".to_string(), "dedicated".to_string()]
    );
    // Other tenants were never touched.
    assert_eq!(who(&other).await, "tenant_globex");
    let g = p
        .admin_ok(json!({"cmd": "tenant.get", "tenant": "acme"}))
        .await;
    let stale: Vec<_> = g["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["on_current_route"] == false)
        .collect();
    assert_eq!(stale.len(), 1, "{g}");
    assert_eq!(stale[0]["pinned"], "LISTEN");
    let t = p.admin_ok(json!({"cmd": "tenants"})).await;
    assert_eq!(t["tenants"][0]["sessions_on_old_route"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_new_transactions_and_resume_releases_them_in_order() {
    let w = clusters();
    let p = harness(&w).start().await;
    let setup = p.connect("app.acme", "app").await.unwrap();
    setup
        .batch_execute("CREATE TABLE log (id serial primary key, n int)")
        .await
        .unwrap();
    let open = p.connect("app.acme", "app").await.unwrap();
    open.batch_execute("BEGIN; INSERT INTO log (n) VALUES (-1)")
        .await
        .unwrap();

    // Pause waits for the open transaction, and reports it when the timeout passes first.
    let r = p
        .admin_ok(json!({"cmd": "pause", "tenant": "acme", "timeout_ms": 200}))
        .await;
    assert_eq!(
        (r["drained"].clone(), r["open_transactions"].clone()),
        (json!(false), json!(1))
    );
    assert_eq!(r["open_sessions"].as_array().unwrap().len(), 1);
    // The open transaction runs to its end while the gate is closed.
    open.batch_execute("INSERT INTO log (n) VALUES (0); COMMIT")
        .await
        .unwrap();
    let r = p
        .admin_ok(json!({"cmd": "pause", "tenant": "acme", "timeout_ms": 2000}))
        .await;
    assert_eq!(r["drained"], true);
    assert_eq!(r["already_paused"], true);

    // New work queues, in arrival order.
    let mut tasks = Vec::new();
    for n in 1..=5 {
        let c = p.connect("app.acme", "app").await.unwrap();
        tasks.push(tokio::spawn(async move {
            c.execute("INSERT INTO log (n) VALUES ($1)", &[&n])
                .await
                .unwrap();
        }));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let t = p
                .admin_ok(json!({"cmd": "tenant.get", "tenant": "acme"}))
                .await;
            if t["gate"]["queued"] == n {
                break;
            }
            assert!(Instant::now() < deadline, "request {n} never queued: {t}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let held: i64 = w
        .shared
        .psql("app", "SELECT count(*) FROM tenant_acme.log WHERE n > 0")
        .parse()
        .unwrap();
    assert_eq!(held, 0, "nothing of a queued request reaches the backend");
    let r = p.admin_ok(json!({"cmd": "resume", "tenant": "acme"})).await;
    assert_eq!(r["released"], 5);
    for t in tasks {
        t.await.unwrap();
    }
    // The gate wakes the queue in arrival order (see the gate's unit tests); once released, the five sessions
    // race each other to their own backend connections, so only the before/after order is checked here.
    let order = w.shared.psql(
        "app",
        "SELECT string_agg(n::text, ',' ORDER BY id) FROM tenant_acme.log",
    );
    assert!(order.starts_with("-1,0,"), "{order}");
    let mut rest: Vec<i32> = order
        .split(',')
        .skip(2)
        .map(|n| n.parse().unwrap())
        .collect();
    rest.sort();
    assert_eq!(rest, vec![1, 2, 3, 4, 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_and_wait_timeout_are_clear_errors() {
    let w = clusters();
    let p = harness(&w)
        .proxy("query_wait_timeout_ms = 400")
        .raw("[migration]\nmax_queued_per_tenant = 1\n")
        .start()
        .await;
    let a = p.connect("app.acme", "app").await.unwrap();
    let b = p.connect("app.acme", "app").await.unwrap();
    a.batch_execute("CREATE TABLE q (n int)").await.unwrap();
    p.admin_ok(json!({"cmd": "pause", "tenant": "acme"})).await;
    let started = Instant::now();
    let first = tokio::spawn(async move { a.execute("INSERT INTO q VALUES (1)", &[]).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let e = b
        .batch_execute("INSERT INTO q VALUES (2)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "57014", "{e}");
    assert!(common::message(&e).contains("queue is full"), "{e}");
    let e = first.await.unwrap().unwrap_err();
    assert_eq!(code(&e), "57014");
    assert!(common::message(&e).contains("paused"), "{e}");
    assert!(started.elapsed() >= Duration::from_millis(400));
    p.admin_ok(json!({"cmd": "resume", "tenant": "acme"})).await;
    assert_eq!(
        w.shared.psql("app", "SELECT count(*) FROM tenant_acme.q"),
        "0"
    );
    // The sessions go on after the refusals.
    b.batch_execute("INSERT INTO q VALUES (3)").await.unwrap();
    assert_eq!(
        w.shared.psql("app", "SELECT count(*) FROM tenant_acme.q"),
        "1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_tenant_never_delays_another() {
    let w = clusters();
    let p = harness(&w).start().await;
    let blocked = p.connect("app.acme", "app").await.unwrap();
    let other = p.connect("app.globex", "app").await.unwrap();
    p.admin_ok(json!({"cmd": "pause", "tenant": "acme"})).await;
    let waiting = tokio::spawn(async move { blocked.query_one("SELECT 1", &[]).await.map(|_| ()) });
    let until = Instant::now() + Duration::from_millis(800);
    let mut done = 0;
    while Instant::now() < until {
        assert_eq!(who(&other).await, "tenant_globex");
        done += 1;
    }
    assert!(!waiting.is_finished(), "acme stays held");
    assert!(
        done >= 20,
        "globex completed only {done} queries while acme was paused"
    );
    p.admin_ok(json!({"cmd": "resume", "tenant": "acme"})).await;
    waiting.await.unwrap().unwrap();
    eprintln!("globex completed {done} queries in 800 ms while acme was paused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_survive_a_restart_and_a_corrupt_state_file_is_refused() {
    let w = clusters();
    let h = harness(&w);
    let config = h.config();
    let TestProxy { proxy, state } = h.start().await;
    let p = TestProxy { proxy, state };
    p.admin_ok(json!({"cmd": "tenant.set", "tenant": "acme", "backend": "dedicated", "schema": "tenant_acme"}))
        .await;
    p.admin_ok(json!({"cmd": "tenant.remove", "tenant": "globex"}))
        .await;
    let epoch = p.admin_ok(json!({"cmd": "tenants"})).await["epoch"]
        .as_u64()
        .unwrap();
    let TestProxy { proxy, state } = p;
    proxy.close().await;

    // Same config, same state_dir: the persisted routes win over the config's.
    let restarted = pgtenant::server::Proxy::start(config.clone())
        .await
        .unwrap();
    let p = TestProxy {
        proxy: restarted,
        state,
    };
    let c = p.connect("app.acme", "app").await.unwrap();
    assert_eq!(who(&c).await, "dedicated");
    assert_eq!(
        code(&p.connect("app.globex", "app").await.unwrap_err()),
        "3D000"
    );
    let t = p.admin_ok(json!({"cmd": "tenants"})).await;
    assert_eq!(t["epoch"].as_u64().unwrap(), epoch);
    let TestProxy { proxy, state } = p;
    proxy.close().await;

    // The route change is a line of routes.log (after the routes.json snapshot): a changed line, a truncated
    // snapshot and a snapshot gone while the log holds changes all stop startup.
    let log = state.path().join("routes.log");
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("dedicated"), "{log_text}");
    std::fs::write(&log, log_text.replace("dedicated", "shared")).unwrap();
    let err = pgtenant::server::Proxy::start(config.clone())
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("corrupt"), "{err}");
    std::fs::write(&log, &log_text).unwrap();
    let routes = state.path().join("routes.json");
    let text = std::fs::read_to_string(&routes).unwrap();
    std::fs::write(&routes, &text[..text.len() - 20]).unwrap();
    let err = pgtenant::server::Proxy::start(config.clone())
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("corrupt"), "{err}");
    std::fs::remove_file(&routes).unwrap();
    let err = pgtenant::server::Proxy::start(config).await.err().unwrap();
    assert!(err.to_string().contains("routes.log"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_records_and_verifies_every_change() {
    let w = clusters();
    let p = harness(&w).start().await;
    p.admin_ok(json!({"cmd": "tenant.set", "tenant": "acme", "backend": "dedicated", "schema": "tenant_acme"}))
        .await;
    p.admin_ok(json!({"cmd": "pause", "tenant": "globex", "timeout_ms": 50}))
        .await;
    p.admin_ok(json!({"cmd": "resume", "tenant": "globex"}))
        .await;
    p.admin_err(json!({"cmd": "resume", "tenant": "globex"}))
        .await;
    p.admin_ok(json!({"cmd": "tenants"})).await;
    let a = p.admin_ok(json!({"cmd": "audit", "tail": 10})).await;
    assert_eq!(a["verified"], true);
    let entries = a["entries"].as_array().unwrap();
    let commands: Vec<&str> = entries
        .iter()
        .map(|e| e["command"].as_str().unwrap())
        .collect();
    assert_eq!(
        commands,
        vec!["tenant.set", "pause", "resume", "resume"],
        "reads are not audited"
    );
    assert_eq!(entries[0]["before"]["backend"], "shared");
    assert_eq!(entries[0]["after"]["backend"], "dedicated");
    assert!(entries[0]["actor"].as_str().unwrap().starts_with("uid:"));
    assert_eq!(entries[3]["result"], "error: invalid_state");
    // Tampering is detected.
    let path = p.state.path().join("audit.log");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replacen("dedicated", "elsewhere", 1)).unwrap();
    let a = p.admin_ok(json!({"cmd": "audit"})).await;
    assert_eq!(a["verified"], false);
    assert_eq!(a["broken_at_line"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_endpoints() {
    let w = clusters();
    let p = harness(&w)
        .proxy("metrics_listen = \"127.0.0.1:0\"")
        .start()
        .await;
    let addr = p.proxy.metrics_addr().unwrap();
    let c = p.connect("app.acme", "app").await.unwrap();
    for _ in 0..5 {
        who(&c).await;
    }
    c.batch_execute("BEGIN; SELECT 1; SELECT 2; COMMIT")
        .await
        .unwrap();
    let _ = common::connect(&format!(
        "host=127.0.0.1 port={} user=app.acme dbname=app password=bad",
        p.port()
    ))
    .await;
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    for series in [
        "pgtenant_client_connections{tenant=\"acme\"} 1",
        "pgtenant_transactions_total{tenant=\"acme\"}",
        "pgtenant_queries_total{tenant=\"acme\"}",
        "pgtenant_errors_total{tenant=\"acme\",kind=\"gate_timeout\"} 0",
        "pgtenant_pool_connections{backend=\"shared\",state=\"active\"} 1",
        "pgtenant_auth_failures_total 1",
        "cutover_attempts_total 0",
        "dual_write_sync_lag_events 0",
    ] {
        assert!(body.contains(series), "missing {series} in\n{body}");
    }
    let tx: f64 = body
        .lines()
        .find(|l| l.starts_with("pgtenant_transactions_total{tenant=\"acme\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(tx >= 6.0, "{tx}");
    assert!(!body.contains("tenant=\"ghost\""));
    let (status, body) = http_get(addr, "/health").await;
    assert_eq!(status, 200);
    assert!(body.contains("\"status\":\"ok\""), "{body}");
    assert_eq!(http_get(addr, "/nope").await.0, 404);
    // A state directory that is gone makes the proxy unhealthy.
    let moved = p.state.path().with_extension("moved");
    std::fs::rename(p.state.path(), &moved).unwrap();
    let (status, body) = http_get(addr, "/health").await;
    std::fs::rename(&moved, p.state.path()).unwrap();
    assert_eq!(status, 503, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_admin_listener_requires_the_token() {
    let w = clusters();
    let p = harness(&w)
        .proxy("admin_listen = \"127.0.0.1:0\"")
        .proxy("admin_token = \"0123456789abcdef-token\"")
        .start()
        .await;
    let addr = p.proxy.admin_tcp_addr().unwrap();
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let token = "0123456789abcdef-token";
    // Sends each request on one connection and returns each answer's code ("ok" for success; "closed" when
    // the proxy hung up instead of answering).
    async fn exchange(addr: std::net::SocketAddr, requests: &[serde_json::Value]) -> Vec<String> {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (r, mut wr) = stream.into_split();
        let mut lines = BufReader::new(r).lines();
        let mut got = Vec::new();
        for request in requests {
            if wr
                .write_all(format!("{request}\n").as_bytes())
                .await
                .is_err()
            {
                got.push("closed".to_string());
                continue;
            }
            let code = match lines.next_line().await {
                Ok(Some(line)) => {
                    let answer: serde_json::Value = serde_json::from_str(&line).unwrap();
                    if answer["ok"] == true {
                        "ok".to_string()
                    } else {
                        answer["error"]["code"].as_str().unwrap().to_string()
                    }
                }
                _ => "closed".to_string(),
            };
            got.push(code);
        }
        got
    }
    let bare = json!({"cmd": "tenants"});
    let wrong = json!({"cmd": "tenants", "token": "wrong"});
    let right = json!({"cmd": "tenants", "token": token});
    // Without the token on the first line, the connection is refused and closed.
    assert_eq!(
        exchange(addr, &[bare.clone(), right.clone()]).await,
        ["unauthorized", "closed"]
    );
    assert_eq!(
        exchange(addr, std::slice::from_ref(&wrong)).await,
        ["unauthorized"]
    );
    // With it, later requests may leave it out, but a wrong one is refused.
    assert_eq!(
        exchange(
            addr,
            &[right.clone(), bare.clone(), wrong.clone(), bare.clone()]
        )
        .await,
        ["ok", "ok", "unauthorized", "ok"]
    );
    // Silent connections cannot take the listener: 40 of them are open, yet an operator gets in, and a
    // silent one is closed after the first-line deadline.
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    assert_eq!(exchange(addr, std::slice::from_ref(&right)).await, ["ok"]);
    let mut last = silent.pop().unwrap();
    assert!(closes_within(&mut last, Duration::from_secs(4)).await);
    // A short token is refused by config validation.
    let bad = harness(&w)
        .proxy("admin_listen = \"127.0.0.1:0\"")
        .proxy("admin_token = \"short\"");
    let text = format!("{:?}", std::panic::catch_unwind(|| bad.config()).is_err());
    assert_eq!(text, "true");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_what_it_can_and_an_invalid_file_changes_nothing() {
    let w = clusters();
    let h = harness(&w);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgtenant.toml");
    let config = h.config();
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    let proxy = pgtenant::server::Proxy::start_with_path(config.clone(), Some(path.clone()))
        .await
        .unwrap();
    let p = TestProxy {
        proxy,
        state: tempfile::tempdir().unwrap(),
    };
    let sock = config.proxy.admin_socket.clone();
    let admin = |v: serde_json::Value| {
        let sock = sock.clone();
        async move { admin_line(&sock, &v).await }
    };

    let mut next = config.clone();
    next.proxy.listen = "127.0.0.1:1".into();
    next.backends.get_mut("shared").unwrap().pool_size = 3;
    next.tenants.insert(
        "hooli".into(),
        pgtenant::config::TenantConfig {
            backend: pgtenant::routing::BackendId::parse("dedicated").unwrap(),
            schema: Some("tenant_acme".into()),
            ..Default::default()
        },
    );
    next.users.push(pgtenant::config::UserConfig {
        name: "late".into(),
        password: Some("pw2".into()),
        scram_secret: None,
        auth: None,
        tenants: vec!["hooli".into()],
        networks: Vec::new(),
        require_tls: false,
        max_client_conn: None,
    });
    std::fs::write(&path, toml::to_string(&next).unwrap()).unwrap();
    let r = admin(json!({"cmd": "reload"})).await;
    assert_eq!(r["ok"], true, "{r}");
    let applied = r["result"]["applied"].to_string();
    assert!(
        applied.contains("tenants.hooli (new)") && applied.contains("backends.shared limits"),
        "{applied}"
    );
    assert_eq!(r["result"]["requires_restart"], json!(["proxy.listen"]));
    let c = common::connect(&format!(
        "host=127.0.0.1 port={} user=late.hooli dbname=app password=pw2",
        p.port()
    ))
    .await
    .unwrap();
    assert_eq!(who(&c).await, "dedicated");

    // An invalid file is refused whole.
    std::fs::write(&path, "[proxy]\nlisten = 5\n").unwrap();
    let r = admin(json!({"cmd": "reload"})).await;
    assert_eq!(r["error"]["code"], "reload_failed");
    let mut dangling = next.clone();
    dangling.tenants.insert(
        "broken".into(),
        pgtenant::config::TenantConfig {
            backend: pgtenant::routing::BackendId::parse("nope").unwrap(),
            ..Default::default()
        },
    );
    std::fs::write(
        &path,
        toml::to_string(&dangling)
            .unwrap()
            .replace("[backends.dedicated]", "[backends.gone]"),
    )
    .unwrap();
    let r = admin(json!({"cmd": "reload"})).await;
    assert_eq!(r["error"]["code"], "reload_failed", "{r}");
    let t = admin(json!({"cmd": "tenants"})).await;
    assert_eq!(
        t["result"]["tenants"].as_array().unwrap().len(),
        3,
        "nothing changed"
    );
    assert!(c.query_one("SELECT 1", &[]).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extended_protocol_copy_ends_its_transaction() {
    // tokio-postgres runs COPY through the extended protocol; the Sync it sends with the COPY is ignored by the
    // backend, so the proxy must not wait for a reply to it (or the tenant could never be paused again).
    use futures_util::SinkExt;
    let w = clusters();
    let p = harness(&w).start().await;
    let c = p.connect("app.acme", "app").await.unwrap();
    c.batch_execute("CREATE TABLE cp (n int)").await.unwrap();
    let sink = c.copy_in("COPY cp FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"1\n2\n3\n"))
        .await
        .unwrap();
    assert_eq!(sink.finish().await.unwrap(), 3);
    let r = p
        .admin_ok(json!({"cmd": "pause", "tenant": "acme", "timeout_ms": 1000}))
        .await;
    assert_eq!(r["drained"], true, "{r}");
    p.admin_ok(json!({"cmd": "resume", "tenant": "acme"})).await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM cp", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3);
    // And it still follows a route change.
    p.admin_ok(json!({"cmd": "tenant.set", "tenant": "acme", "backend": "dedicated", "schema": "tenant_acme"}))
        .await;
    assert_eq!(who(&c).await, "dedicated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_sessions_wait_or_are_disconnected_by_configuration() {
    let w = clusters();
    let p = harness(&w)
        .proxy("pinned_at_move = \"disconnect\"")
        .proxy("pinned_grace_ms = 300")
        .proxy("metrics_listen = \"127.0.0.1:0\"")
        .start()
        .await;
    let pinned = p.connect("app.acme", "app").await.unwrap();
    pinned
        .batch_execute("SELECT pg_advisory_lock(42)")
        .await
        .unwrap();
    let free = p.connect("app.acme", "app").await.unwrap();
    p.admin_ok(json!({"cmd": "tenant.set", "tenant": "acme", "backend": "dedicated", "schema": "tenant_acme"}))
        .await;
    // Within the grace period the pinned session stays where it is; a free one moves.
    assert_eq!(who(&pinned).await, "tenant_acme");
    assert_eq!(who(&free).await, "dedicated");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let e = pinned.query_one("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(code(&e), "57P01", "{e}");
    assert!(common::message(&e).contains("advisory lock"), "{e}");
    let (_, body) = http_get(p.proxy.metrics_addr().unwrap(), "/metrics").await;
    assert!(
        body.contains("pgtenant_pinned_sessions_waited_total 1"),
        "{body}"
    );
    assert!(
        body.contains("pgtenant_pinned_sessions_disconnected_total 1"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_psql_session_keeps_its_settings_and_prepared_statements_across_a_move() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let w = clusters();
    let p = harness(&w).start().await;
    let mut child = Command::new("psql")
        .args(["-X", "-A", "-t", "-q", &p.url("app.acme", "app")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"SET work_mem = '9MB';\nPREPARE p2 AS SELECT who FROM t;\nSELECT 'before', who FROM t;\n")
        .unwrap();
    stdin.flush().unwrap();
    // Wait until psql's session has run the PREPARE on the shared backend.
    let shared = &w.shared;
    assert!(
        common::eventually(Duration::from_secs(5), || {
            shared.psql(
                "app",
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT ''before''%' AND state = 'idle'",
            ) == "1"
        })
        .await
    );
    p.admin_ok(json!({"cmd": "tenant.set", "tenant": "acme", "backend": "dedicated", "schema": "tenant_acme"}))
        .await;
    stdin
        .write_all(b"SHOW work_mem;\nEXECUTE p2;\n\\q\n")
        .unwrap();
    drop(stdin);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        vec!["before|tenant_acme", "9MB", "dedicated"],
        "{text}"
    );
}

/// A second proxy on the same state_dir refuses to start, naming the first's pid; once the first is closed
/// it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_proxy_on_the_same_state_dir_refuses_to_start() {
    let pg = PgCluster::start();
    let h = Harness::new()
        .backend_with("shared", &pg, "database = \"app\"")
        .tenant("acme", "shared", None, None);
    let config = h.config();
    let first = h.start().await;
    let err = match pgtenant::server::Proxy::start(config.clone()).await {
        Ok(_) => panic!("a second proxy started on the same state_dir"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("in use by another pgtenant")
            && err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    let TestProxy { proxy, state } = first;
    proxy.close().await;
    let again = pgtenant::server::Proxy::start(config).await.unwrap();
    again.close().await;
    drop(state);
}

/// Under a low `ulimit -n`, clients beyond the descriptors get a clear 53300 instead of silence, the log says so
/// without flooding, and the proxy serves again once descriptors are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_refuses_clearly_and_recovers() {
    use tokio::io::AsyncReadExt;
    let pg = PgCluster::start();
    pg.tenant_schemas("app", &["tenant_acme"]);
    let port = common::free_port();
    let h = Harness::new()
        .backend_with("shared", &pg, "database = \"app\"")
        .tenant("acme", "shared", None, Some("tenant_acme"));
    let text = toml::to_string(&h.config())
        .unwrap()
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let config = h.state_dir().join("pgtenant.toml");
    std::fs::write(&config, text).unwrap();
    let log = h.state_dir().join("stderr.log");
    let mut child = std::process::Command::new("bash")
        .args([
            "-c",
            &format!(
                "ulimit -n 40 && exec {} serve --config {} 2> {}",
                env!("CARGO_BIN_EXE_pgtenant"),
                config.display(),
                log.display()
            ),
        ])
        .spawn()
        .unwrap();
    let url = format!("host=127.0.0.1 port={port} user=app.acme dbname=app password={PASSWORD}");
    assert!(
        eventually(Duration::from_secs(10), || psql(&url, &["-c", "SELECT 1"])
            .0)
        .await
    );
    // Far more idle sockets than descriptors.
    let mut idle = Vec::new();
    for _ in 0..80 {
        idle.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut told = 0;
    for s in idle.iter_mut() {
        let mut buf = vec![0u8; 512];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(20), s.read(&mut buf)).await {
            let text = String::from_utf8_lossy(&buf[..n]);
            if n > 0
                && buf[0] == b'E'
                && text.contains("53300")
                && text.contains("out of file descriptors")
            {
                told += 1;
            }
        }
    }
    assert!(told >= 1, "no waiting client was told why");
    drop(idle);
    assert!(
        eventually(Duration::from_secs(10), || psql(&url, &["-c", "SELECT 1"])
            .0)
        .await,
        "the proxy did not serve again"
    );
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let stderr = std::fs::read_to_string(&log).unwrap();
    let warnings = stderr.matches("out of file descriptors").count();
    assert!(
        (1..=3).contains(&warnings),
        "{warnings} warnings:\n{stderr}"
    );
    eprintln!("{told} waiting clients refused with 53300; {warnings} log line(s)");
}
