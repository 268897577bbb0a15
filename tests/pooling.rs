//! Transaction pool mode on real PostgreSQL: many clients on a few backend connections, session settings and
//! named prepared statements following each client from connection to connection, pins holding a connection,
//! and a route flip between two transactions.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::{cancelled_midway, code, python, Harness, PgCluster, TestProxy};
use postgres_protocol::message::frontend;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::{show, two_clusters as clusters, Two};

fn harness(w: &Two, pool_size: usize) -> Harness {
    Harness::new()
        .proxy("pool_mode = \"transaction\"")
        .backend_with(
            "shared",
            &w.shared,
            &format!("database = \"app\"\npool_size = {pool_size}"),
        )
        .backend_with(
            "dedicated",
            &w.dedicated,
            &format!("database = \"app\"\npool_size = {pool_size}"),
        )
        .tenant("acme", "shared", None, Some("tenant_acme"))
        .tenant("globex", "shared", None, Some("tenant_globex"))
        .raw("[[users]]\nname = \"dev\"\nauth = \"trust\"\ntenants = [\"*\"]\n")
}

async fn who_is(c: &tokio_postgres::Client) -> Result<String, tokio_postgres::Error> {
    c.query_one("SELECT who FROM t", &[])
        .await
        .map(|r| r.get::<_, String>(0))
}

/// Client connections the proxy holds open to `pg`'s database `app`.
fn backend_connections(pg: &PgCluster) -> usize {
    pg.psql(
        "app",
        "SELECT count(*) FROM pg_stat_activity WHERE datname = 'app' AND pid <> pg_backend_pid() \
         AND backend_type = 'client backend'",
    )
    .trim()
    .parse()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_pgbench_clients_share_five_connections_without_a_failure() {
    let w = clusters();
    let p = harness(&w, 5).start().await;
    let url = p.url("app.acme", "app");
    common::pgbench(&url, &["-i", "-q", "-s", "1"]);
    for mode in ["prepared", "extended", "simple"] {
        let out = common::pgbench(
            &url,
            &[
                "-n",
                "-c",
                "50",
                "-j",
                "2",
                "-T",
                "4",
                "-M",
                mode,
                "--max-tries",
                "1",
            ],
        );
        let failed = out
            .lines()
            .find(|l| l.starts_with("number of failed transactions"))
            .unwrap_or_else(|| panic!("no failure count in:\n{out}"));
        assert!(failed.contains(": 0 "), "-M {mode}: {failed}\n{out}");
        let done = out
            .lines()
            .find(|l| l.starts_with("number of transactions actually processed"))
            .unwrap();
        assert!(!done.contains(": 0/"), "-M {mode} ran nothing: {out}");
        assert!(
            backend_connections(&w.shared) <= 5,
            "pool of 5 exceeded after -M {mode}"
        );
    }
    // pgbench's own invariant: the balances moved exactly as the history says.
    let check = w.shared.psql(
        "app",
        "SELECT (SELECT sum(abalance) FROM tenant_acme.pgbench_accounts) = \
                (SELECT coalesce(sum(delta), 0) FROM tenant_acme.pgbench_history)",
    );
    assert_eq!(check.trim(), "t");
    // -C: a new client connection per transaction, on the same five backend connections.
    let out = common::pgbench(&url, &["-n", "-c", "8", "-j", "2", "-T", "2", "-C", "-S"]);
    assert!(out.contains("number of failed transactions: 0 "), "{out}");
    assert!(backend_connections(&w.shared) <= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_follow_each_client_and_never_leak_to_another() {
    let w = clusters();
    let p = harness(&w, 2).start().await;
    let setter = p.connect("app.acme", "app").await.unwrap();
    let plain = p.connect("app.acme", "app").await.unwrap();
    let local = p.connect("app.acme", "app").await.unwrap();
    let role = p.connect("app.acme", "app").await.unwrap();
    let path = p.connect("app.acme", "app").await.unwrap();
    setter.batch_execute("SET work_mem = '3MB'").await.unwrap();
    setter
        .batch_execute("SET application_name = 'setter'")
        .await
        .unwrap();
    // SET LOCAL, and a SET inside a transaction that rolls back, change nothing after the transaction.
    local
        .batch_execute("BEGIN; SET LOCAL work_mem = '5MB'; COMMIT")
        .await
        .unwrap();
    local
        .batch_execute("BEGIN; SET work_mem = '6MB'; ROLLBACK")
        .await
        .unwrap();
    w.shared.psql("app", "CREATE ROLE helper; GRANT ALL ON SCHEMA tenant_acme, tenant_globex TO helper; GRANT ALL ON ALL TABLES IN SCHEMA tenant_acme, tenant_globex TO helper");
    role.batch_execute("SET ROLE helper").await.unwrap();
    path.batch_execute("SET search_path = tenant_globex")
        .await
        .unwrap();
    // Two connections for five clients: every round lands each client on whichever connection is free.
    for round in 0..30 {
        let (a, b, c, d, e) = tokio::join!(
            show(&setter, "work_mem"),
            show(&plain, "work_mem"),
            show(&local, "work_mem"),
            show(&role, "role"),
            path.query_one("SELECT current_schema()::text, who FROM t", &[]),
        );
        assert_eq!(a, "3MB", "round {round}");
        assert_eq!(b, "4MB", "round {round}");
        assert_eq!(c, "4MB", "round {round}");
        assert_eq!(d, "helper", "round {round}");
        let e = e.unwrap();
        assert_eq!(e.get::<_, String>(0), "tenant_globex");
        assert_eq!(e.get::<_, String>(1), "tenant_globex");
        assert_eq!(show(&plain, "application_name").await, "");
        assert_eq!(show(&plain, "role").await, "none");
        let schema: String = plain
            .query_one("SELECT current_schema()::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(schema, "tenant_acme");
    }
    assert_eq!(show(&setter, "application_name").await, "setter");
    // A client that logs in takes a connection for its startup and gives it back: whatever another client's SETs
    // left there is reset before anyone without them uses it.
    for _ in 0..4 {
        let late = p.connect("app.acme", "app").await.unwrap();
        let (a, b, c) = tokio::join!(
            show(&late, "role"),
            show(&plain, "role"),
            show(&role, "role")
        );
        assert_eq!(
            (a.as_str(), b.as_str(), c.as_str()),
            ("none", "none", "helper")
        );
        assert_eq!(show(&late, "work_mem").await, "4MB");
    }
    // RESET ALL forgets them.
    setter.batch_execute("RESET ALL").await.unwrap();
    for _ in 0..5 {
        let (a, _) = tokio::join!(show(&setter, "work_mem"), show(&plain, "work_mem"));
        assert_eq!(a, "4MB");
    }
    assert!(backend_connections(&w.shared) <= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_work_on_every_connection() {
    let w = clusters();
    let p = harness(&w, 2).start().await;
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(p.connect("app.acme", "app").await.unwrap());
    }
    // Each client prepares its own statements (some with the same text as other clients').
    let mut stmts = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let own = c
            .prepare(&format!("SELECT $1::int + {i}, who FROM t"))
            .await
            .unwrap();
        let shared = c.prepare("SELECT $1::int * 2").await.unwrap();
        stmts.push((own, shared));
    }
    for round in 0..20i32 {
        let mut tasks = Vec::new();
        for (i, (c, (own, shared))) in clients.iter().zip(&stmts).enumerate() {
            tasks.push(async move {
                let r = c.query_one(own, &[&round]).await.unwrap();
                assert_eq!(r.get::<_, i32>(0), round + i as i32);
                assert_eq!(r.get::<_, String>(1), "tenant_acme");
                let r = c.query_one(shared, &[&round]).await.unwrap();
                assert_eq!(r.get::<_, i32>(0), round * 2);
                // Inside a transaction too.
                c.simple_query("BEGIN").await.unwrap();
                let r = c.query_one(own, &[&1i32]).await.unwrap();
                assert_eq!(r.get::<_, i32>(0), 1 + i as i32);
                c.simple_query("COMMIT").await.unwrap();
            });
        }
        futures_util::future::join_all(tasks).await;
    }
    assert!(backend_connections(&w.shared) <= 2);
    // A statement that stops working on a connection fails cleanly, and the session goes on.
    let bad = clients[0].prepare("SELECT who FROM t").await.unwrap();
    w.shared
        .psql("app", "ALTER TABLE tenant_acme.t RENAME COLUMN who TO whom");
    let mut failures = 0;
    for _ in 0..4 {
        if let Err(e) = clients[0].query(&bad, &[]).await {
            failures += 1;
            assert!(["0A000", "42703"].contains(&code(&e).as_str()), "{e:?}");
        }
    }
    assert!(failures > 0);
    let r: i32 = clients[0]
        .query_one("SELECT 41 + 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(r, 42);
}

/// Parse, Bind and Execute of `sql` as the unnamed statement and portal, without parameters (no Sync).
fn unnamed_execute(sql: &str, out: &mut BytesMut) {
    frontend::parse("", sql, std::iter::empty(), out).unwrap();
    frontend::bind(
        "",
        "",
        std::iter::empty::<i16>(),
        std::iter::empty::<&str>(),
        |_, _| Ok(postgres_protocol::IsNull::No),
        std::iter::empty::<i16>(),
        out,
    )
    .map_err(|_| ())
    .unwrap();
    frontend::execute("", 0, out).unwrap();
}

/// A raw protocol client, to send exactly the frames a test needs.
struct Raw {
    s: TcpStream,
}

impl Raw {
    async fn connect(p: &TestProxy) -> Raw {
        Raw::connect_as(p, "dev.acme").await
    }

    async fn connect_as(p: &TestProxy, user: &str) -> Raw {
        let s = common::raw_login(p.port(), &[("user", user), ("database", "app")]).await;
        Raw { s }
    }

    async fn send(&mut self, build: impl FnOnce(&mut BytesMut)) {
        let mut buf = BytesMut::new();
        build(&mut buf);
        self.s.write_all(&buf).await.unwrap();
    }

    /// Reads frames up to ReadyForQuery; returns their tags and the text of data rows and errors.
    async fn replies(&mut self) -> (String, Vec<String>) {
        let mut tags = String::new();
        let mut texts = Vec::new();
        loop {
            let mut head = [0u8; 5];
            tokio::time::timeout(Duration::from_secs(10), self.s.read_exact(&mut head))
                .await
                .expect("reply within 10 s")
                .unwrap();
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            let mut body = vec![0u8; len - 4];
            self.s.read_exact(&mut body).await.unwrap();
            tags.push(head[0] as char);
            match head[0] {
                b'D' => {
                    // One text column.
                    let n = i32::from_be_bytes([body[2], body[3], body[4], body[5]]);
                    texts.push(String::from_utf8_lossy(&body[6..6 + n as usize]).into_owned());
                }
                b'E' => {
                    let code = body
                        .split(|b| *b == 0)
                        .find(|f| f.first() == Some(&b'C'))
                        .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
                        .unwrap_or_default();
                    texts.push(code);
                }
                b'Z' => return (tags, texts),
                _ => {}
            }
        }
    }

    async fn parse(&mut self, name: &str, sql: &str) -> (String, Vec<String>) {
        self.send(|b| {
            frontend::parse(name, sql, std::iter::empty(), b).unwrap();
            frontend::sync(b);
        })
        .await;
        self.replies().await
    }

    async fn execute(&mut self, name: &str, arg: &str) -> (String, Vec<String>) {
        self.send(|b| {
            frontend::bind(
                "",
                name,
                std::iter::once(0i16),
                std::iter::once(arg),
                |a, buf| {
                    buf.extend_from_slice(a.as_bytes());
                    Ok(postgres_protocol::IsNull::No)
                },
                std::iter::once(0i16),
                b,
            )
            .map_err(|_| ())
            .unwrap();
            frontend::execute("", 0, b).unwrap();
            frontend::sync(b);
        })
        .await;
        self.replies().await
    }

    async fn simple(&mut self, sql: &str) -> (String, Vec<String>) {
        self.send(|b| frontend::query(sql, b).unwrap()).await;
        self.replies().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_names_never_collide_and_follow_a_route_flip() {
    let w = clusters();
    let p = harness(&w, 1).start().await;
    let mut a = Raw::connect(&p).await;
    let mut b = Raw::connect(&p).await;
    // The same name, different statements, one backend connection.
    assert_eq!(a.parse("s1", "SELECT 'a:' || $1::text").await.0, "1Z");
    assert_eq!(b.parse("s1", "SELECT 'b:' || $1::text").await.0, "1Z");
    // The same text under another name shares the server statement; the reply sequence is unchanged.
    assert_eq!(b.parse("other", "SELECT 'a:' || $1::text").await.0, "1Z");
    for i in 0..5 {
        let arg = i.to_string();
        assert_eq!(a.execute("s1", &arg).await.1, vec![format!("a:{i}")]);
        assert_eq!(b.execute("s1", &arg).await.1, vec![format!("b:{i}")]);
        assert_eq!(b.execute("other", &arg).await.1, vec![format!("a:{i}")]);
    }
    // Preparing a name twice in a row is answered in order, once.
    let (tags, _) = a.simple("SELECT 1").await;
    assert_eq!(tags, "TDCZ");

    // Flip acme to the other cluster between two transactions: the statement is prepared there on first use,
    // and Describe of it works without any extra reply reaching the client.
    let steady = std::time::Instant::now();
    a.simple("SELECT 1").await;
    let steady = steady.elapsed();
    let flip = std::time::Instant::now();
    p.admin_ok(json!({"cmd": "tenant.set", "tenant": "acme", "backend": "dedicated", "schema": "tenant_acme"}))
        .await;
    // (Reported, not asserted: the cost of a move in transaction pool mode.)
    let (_, who) = b.simple("SELECT who FROM t").await;
    eprintln!(
        "move: route flip to the next transaction done {:?} (a transaction before it: {steady:?})",
        flip.elapsed()
    );
    assert_eq!(who, vec!["dedicated".to_string()]);
    a.send(|buf| {
        frontend::describe(b'S', "s1", buf).unwrap();
        frontend::sync(buf);
    })
    .await;
    assert_eq!(a.replies().await.0, "tTZ");
    assert_eq!(a.execute("s1", "x").await.1, vec!["a:x".to_string()]);
    let (_, who) = a.simple("SELECT who FROM t").await;
    assert_eq!(who, vec!["dedicated".to_string()]);
    assert_eq!(backend_connections(&w.dedicated), 1);

    // Close removes the client's name only; the other client's statement of the same text still works.
    a.send(|buf| {
        frontend::close(b'S', "s1", buf).unwrap();
        frontend::sync(buf);
    })
    .await;
    assert_eq!(a.replies().await.0, "3Z");
    let (tags, codes) = a.execute("s1", "1").await;
    assert_eq!(tags, "EZ");
    assert_eq!(codes, vec!["26000".to_string()]);
    assert_eq!(b.execute("other", "z").await.1, vec!["a:z".to_string()]);
    // SQL DEALLOCATE of a protocol-level statement (what older psycopg does) is answered by the proxy.
    assert_eq!(b.simple("DEALLOCATE other").await.0, "CZ");
    // One of the proxy's own names is refused, with a comment in front of the DEALLOCATE too.
    for sql in ["DEALLOCATE pgtenant_0", "/* x */ DEALLOCATE pgtenant_0"] {
        let (tags, codes) = b.simple(sql).await;
        assert_eq!(
            (tags.as_str(), codes),
            ("EZ", vec!["42501".to_string()]),
            "{sql}"
        );
    }
    assert_eq!(b.execute("other", "z").await.1, vec!["26000".to_string()]);
    assert_eq!(b.execute("s1", "z").await.1, vec!["b:z".to_string()]);
    // The unnamed statement does not outlive its user's transaction on a pooled connection.
    a.send(|buf| {
        frontend::parse("", "SELECT 'private'", std::iter::empty(), buf).unwrap();
        frontend::sync(buf);
    })
    .await;
    assert_eq!(a.replies().await.0, "1Z");
    let (tags, codes) = b.execute("", "x").await;
    assert_eq!((tags.as_str(), codes[0].as_str()), ("EZ", "26000"));
    // Its own user keeps it across transactions (libpq's PQsendPrepare(conn, "", ...), a Sync, then
    // PQsendQueryPrepared(conn, "", ...)): it is prepared again on the connection the next transaction gets,
    // and only the client's own replies reach it.
    assert_eq!(a.parse("", "SELECT 'mine:' || $1::text").await.0, "1Z");
    assert_eq!(b.simple("SELECT 1").await.0, "TDCZ");
    assert_eq!(
        a.execute("", "x").await,
        ("2DCZ".to_string(), vec!["mine:x".to_string()])
    );
    assert_eq!(a.execute("", "y").await.1, vec!["mine:y".to_string()]);
    a.send(|buf| {
        frontend::describe(b'S', "", buf).unwrap();
        frontend::sync(buf);
    })
    .await;
    assert_eq!(a.replies().await.0, "tTZ");
    // A Parse outside a transaction is answered without a backend connection; an error in the statement is
    // reported where it is used, every time, and the session goes on.
    assert_eq!(b.parse("broken", "SELEC nothing").await.0, "1Z");
    for _ in 0..2 {
        let (tags, codes) = b.execute("broken", "1").await;
        assert_eq!((tags.as_str(), codes[0].as_str()), ("EZ", "42601"));
    }
    assert_eq!(b.execute("s1", "ok").await.1, vec!["b:ok".to_string()]);
    // Inside a transaction, the Parse goes to the backend and fails there, leaving no name behind.
    assert_eq!(b.simple("BEGIN").await.0, "CZ");
    let (tags, codes) = b.parse("broken2", "SELEC nothing").await;
    assert_eq!((tags.as_str(), codes[0].as_str()), ("EZ", "42601"));
    assert_eq!(b.simple("ROLLBACK").await.0, "CZ");
    assert_eq!(b.execute("broken2", "1").await.1, vec!["26000".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_statement_bound_evicts_and_prepares_again() {
    let w = clusters();
    let p = harness(&w, 1)
        .proxy("max_prepared_statements = 2")
        .start()
        .await;
    let mut a = Raw::connect(&p).await;
    for i in 0..6 {
        assert_eq!(
            a.parse(&format!("q{i}"), &format!("SELECT '{i}' || $1::text"))
                .await
                .0,
            "1Z"
        );
    }
    for round in 0..3 {
        for i in 0..6 {
            assert_eq!(
                a.execute(&format!("q{i}"), "r").await.1,
                vec![format!("{i}r")],
                "round {round}"
            );
        }
    }
    let (_, n) = a
        .simple("SELECT count(*)::text FROM pg_prepared_statements")
        .await;
    let n: usize = n[0].parse().unwrap();
    assert!(n <= 2, "{n} statements held on the connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_sessions_keep_their_connection_until_they_unpin() {
    let w = clusters();
    let p = harness(&w, 1)
        .proxy("pool_checkout_timeout_ms = 500")
        .start()
        .await;
    let pinned = p.connect("app.acme", "app").await.unwrap();
    let other = p.connect("app.acme", "app").await.unwrap();
    let pins: [(&[&str], &str); 5] = [
        (&["LISTEN jobs"], "UNLISTEN *"),
        (&["CREATE TEMP TABLE scratch (x int)"], "DISCARD TEMP"),
        (
            &["SELECT pg_advisory_lock(7)"],
            "SELECT pg_advisory_unlock_all()",
        ),
        (&["PREPARE sqlp AS SELECT 1"], "DEALLOCATE sqlp"),
        (
            &["BEGIN", "DECLARE c CURSOR WITH HOLD FOR SELECT 1", "COMMIT"],
            "CLOSE ALL",
        ),
    ];
    for (steps, unpin) in pins {
        for step in steps {
            pinned.batch_execute(step).await.unwrap();
        }
        let pin = steps.join("; ");
        // The only connection stays with the pinned session: another client waits and times out.
        let e = other.simple_query("SELECT 1").await.unwrap_err();
        assert_eq!(code(&e), "53300", "{pin}: {e:?}");
        // The pinned session keeps its state across transactions.
        let pid1: i32 = pinned
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        let pid2: i32 = pinned
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(pid1, pid2, "{pin}");
        pinned.batch_execute(unpin).await.unwrap();
        if let Err(e) = other.simple_query("SELECT 1").await {
            panic!("after {unpin}: {e:?}");
        }
    }
    // An open transaction holds the connection too, until it ends.
    pinned.batch_execute("BEGIN").await.unwrap();
    assert_eq!(
        code(&other.simple_query("SELECT 1").await.unwrap_err()),
        "53300"
    );
    pinned.batch_execute("COMMIT").await.unwrap();
    other.simple_query("SELECT 1").await.unwrap();
}

#[test]
fn psycopg_prepares_automatically_in_both_pool_modes() {
    if !common::psycopg_available() {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let w = clusters();
    for (mode, pool) in [("transaction", 2), ("session", 6)] {
        let p = rt.block_on(
            harness(&w, pool)
                .proxy(&format!("pool_mode = \"{mode}\""))
                .start(),
        );
        let (ok, text) = python("psycopg_pool.py", &[&p.url("app.acme", "app")]);
        assert!(ok, "{mode}: {text}");
        assert!(text.contains("psycopg pool ok"), "{mode}: {text}");
        rt.block_on(async { drop(p) });
    }
}

/// Sessions holding each kind of state that cannot move, in either pool mode: under `wait` they stay on the old
/// backend until the state is gone and then move; under `disconnect` they end with 57P01 naming the state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pin_kind_waits_or_disconnects_at_a_move() {
    let w = clusters();
    let pins: [(&[&str], &str, &str); 5] = [
        (&["LISTEN jobs"], "UNLISTEN *", "LISTEN"),
        (
            &["CREATE TEMP TABLE scratch (x int)"],
            "DISCARD TEMP",
            "temporary table",
        ),
        (
            &["SELECT pg_advisory_lock(7)"],
            "SELECT pg_advisory_unlock_all()",
            "advisory lock",
        ),
        (
            &["BEGIN", "DECLARE c CURSOR WITH HOLD FOR SELECT 1", "COMMIT"],
            "CLOSE ALL",
            "WITH HOLD",
        ),
        (
            &["SELECT 1; SET work_mem = '9MB'"],
            "DISCARD ALL",
            "does not track",
        ),
    ];
    for mode in ["session", "transaction"] {
        for policy in ["wait", "disconnect"] {
            let p = harness(&w, 10)
                .proxy(&format!("pool_mode = \"{mode}\""))
                .proxy(&format!("pinned_at_move = \"{policy}\""))
                .proxy("pinned_grace_ms = 300")
                .start()
                .await;
            let mut sessions = Vec::new();
            for (steps, _, _) in &pins {
                let c = p.connect("app.acme", "app").await.unwrap();
                for step in *steps {
                    c.batch_execute(step).await.unwrap();
                }
                sessions.push(c);
            }
            let free = p.connect("app.acme", "app").await.unwrap();
            let label = format!("{mode}/{policy}");
            p.admin_ok(json!({"cmd": "tenant.set", "tenant": "acme", "backend": "dedicated", "schema": "tenant_acme"}))
                .await;
            assert_eq!(who_is(&free).await.unwrap(), "dedicated", "{label}");
            for c in &sessions {
                assert_eq!(who_is(c).await.unwrap(), "tenant_acme", "{label}");
            }
            if policy == "wait" {
                for ((_, unpin, reason), c) in pins.iter().zip(&sessions) {
                    c.batch_execute(unpin).await.unwrap();
                    assert_eq!(who_is(c).await.unwrap(), "dedicated", "{label} {reason}");
                }
            } else {
                tokio::time::sleep(Duration::from_millis(400)).await;
                for ((_, _, reason), c) in pins.iter().zip(&sessions) {
                    let e = who_is(c).await.unwrap_err();
                    assert_eq!(code(&e), "57P01", "{label} {reason}: {e}");
                    assert!(
                        common::message(&e).contains(reason),
                        "{label} {reason}: {e}"
                    );
                }
            }
            p.admin_ok(json!({"cmd": "tenant.set", "tenant": "acme", "backend": "shared", "schema": "tenant_acme"}))
                .await;
        }
    }
}

/// `server_lifetime_ms`: a backend connection past its lifetime is closed once idle and the next client gets a
/// fresh one; within it, the same connection is reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_connections_are_renewed_after_their_lifetime() {
    let pg = common::PgCluster::start();
    pg.tenant_schemas("app", &["tenant_acme"]);
    let proxy = common::Harness::new()
        .proxy("server_lifetime_ms = 1500")
        .backend_with("shared", &pg, "database = \"app\"")
        .tenant("acme", "shared", None, Some("tenant_acme"))
        .start()
        .await;
    let pid = || async {
        let c = proxy.connect("app.acme", "app").await.unwrap();
        let pid: i32 = c
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        drop(c);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        pid
    };
    let first = pid().await;
    assert_eq!(pid().await, first, "reused within its lifetime");
    tokio::time::sleep(std::time::Duration::from_millis(6500)).await;
    assert_ne!(pid().await, first, "renewed after its lifetime");
}

/// The reset between tenants goes ahead of the next tenant's statements with no Sync between them, so when the
/// reset fails PostgreSQL skips the statements up to the first Sync, and the proxy sends nothing after that
/// until the reset is known to have succeeded: nothing of the next tenant runs on what the last one left. Made
/// to fail here by a tenant that, inside `DO` (where the proxy cannot see; `set_config` spelt so that the
/// proxy's look for it, which would keep the session on its connection, misses it), points its `search_path`
/// at its own schema and makes 300 temporary tables: on a server whose lock table holds about 700 locks,
/// making them fits in one transaction but dropping them (each with its row types) does not. globex's
/// unqualified INSERTs, had any run without the reset, would have landed in acme's table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reset_lets_nothing_of_the_next_tenant_run() {
    let shared = PgCluster::start();
    shared.psql(
        "postgres",
        "ALTER SYSTEM SET max_locks_per_transaction = 10",
    );
    shared.psql("postgres", "ALTER SYSTEM SET max_connections = 20");
    // The lock table holds max_locks_per_transaction * (max_connections + max_prepared_transactions) locks.
    shared.psql("postgres", "ALTER SYSTEM SET max_prepared_transactions = 0");
    shared.stop();
    shared.restart();
    // (Made after the restart: the test clusters run without fsync, and the stop is immediate.)
    shared.tenant_schemas("app", &["tenant_acme", "tenant_globex"]);
    let w = Two {
        shared,
        dedicated: PgCluster::start(),
    };
    let p = harness(&w, 1).start().await;
    // The proxy's start-up check of the serving role uses a connection of the pool of its own and resets it
    // in the background; were that reset to run while acme's temporary tables fill the lock table, it would
    // fail and free the place, and globex would get a fresh connection instead of acme's.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Both raw clients, with the same startup parameters, share the pool's one connection.
    let mut acme = common::raw_login(p.port(), &[("user", "dev.acme"), ("database", "app")]).await;
    let mut globex =
        common::raw_login(p.port(), &[("user", "dev.globex"), ("database", "app")]).await;
    let set = |name: &str, value: &str| {
        format!("EXECUTE 'SELECT set_' || 'config(''{name}'', ''{value}'', false)';")
    };
    let mut out = BytesMut::new();
    frontend::query(
        &format!(
            "DO $$ BEGIN {} \
             FOR i IN 1..300 LOOP EXECUTE format('CREATE TEMP TABLE tmp_%s (i int)', i); END LOOP; END $$",
            set("search_path", "tenant_acme"),
        ),
        &mut out,
    )
    .unwrap();
    acme.write_all(&out).await.unwrap();
    let done = common::read_until(&mut acme, b'C').await.unwrap();
    assert_eq!(&done[..], b"DO\0");
    common::read_until(&mut acme, b'Z').await.unwrap();
    // The session gives the connection back just after its ReadyForQuery went out.
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Pipelined, in one write: an extended-protocol batch, a Query, and another batch. PostgreSQL skips only
    // up to the first Sync after a failed reset; what follows must not even be sent (the Query right behind
    // the Sync included, which the run of admitted frames once let through).
    let mut out = BytesMut::new();
    for (id, sql) in [
        (1000, "INSERT INTO t VALUES (1000, 'globex-late')"),
        (1001, "INSERT INTO t VALUES (1001, 'globex-later')"),
    ] {
        if id == 1001 {
            frontend::query("INSERT INTO t VALUES (1002, 'globex-last')", &mut out).unwrap();
        }
        unnamed_execute(sql, &mut out);
        frontend::sync(&mut out);
    }
    globex.write_all(&out).await.unwrap();
    // Everything the session answers, up to its end.
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), globex.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    eprintln!("globex's statements after the failed reset: {answer:?}");
    assert!(read.is_ok(), "the session did not end: {answer:?}");
    assert!(answer.contains("C08006"), "{answer:?}");
    let landed = w.shared.psql(
        "app",
        "SELECT (SELECT count(*) FROM tenant_acme.t WHERE id >= 1000) || ' ' || \
         (SELECT count(*) FROM tenant_globex.t WHERE id >= 1000)",
    );
    assert_eq!(landed, "0 0", "a statement ran after a failed reset");
    // The connection was closed; a new session of globex gets a fresh one, in its own schema.
    let again = p.connect("app.globex", "app").await.unwrap();
    again
        .batch_execute("INSERT INTO t VALUES (1000, 'globex')")
        .await
        .unwrap();
    assert_eq!(
        w.shared
            .psql("app", "SELECT who FROM tenant_globex.t WHERE id = 1000"),
        "globex"
    );
    drop(acme);
}

/// After another tenant's transaction the reset and the schema go ahead of the client's statement in a
/// transaction of their own, committed first: a statement PostgreSQL refuses inside a transaction or pipeline
/// (`VACUUM`) runs, and a `ROLLBACK` in the client's query string cannot take the schema back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_switch_leaves_the_clients_statements_as_if_sent_alone() {
    let w = clusters();
    let p = harness(&w, 1).start().await;
    let acme = p.connect("app.acme", "app").await.unwrap();
    let globex = p.connect("app.globex", "app").await.unwrap();
    for _ in 0..3 {
        globex.batch_execute("SELECT 1").await.unwrap();
        acme.batch_execute("VACUUM t").await.unwrap();
        globex.batch_execute("SELECT 1").await.unwrap();
        let rows = acme
            .simple_query("BEGIN; ROLLBACK; SELECT who FROM t")
            .await
            .unwrap();
        let who: Vec<&str> = rows
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0),
                _ => None,
            })
            .collect();
        assert_eq!(who, ["tenant_acme"]);
        assert_eq!(who_is(&globex).await.unwrap(), "tenant_globex");
    }
}

/// The reset leaves its own statement as the connection's unnamed one; a client's Bind of an unnamed statement
/// it never prepared fails as on PostgreSQL (26000), rather than running the proxy's `COMMIT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bind_of_no_unnamed_statement_fails_after_a_tenant_switch() {
    let w = clusters();
    let p = harness(&w, 1).start().await;
    let mut acme = Raw::connect(&p).await;
    let mut globex = Raw::connect_as(&p, "dev.globex").await;
    for _ in 0..2 {
        globex.simple("SELECT 1").await;
        let (tags, texts) = acme.execute("", "1").await;
        assert_eq!((tags.as_str(), texts), ("EZ", vec!["26000".to_owned()]));
    }
}

/// COPY FROM STDIN as a transaction's first statement on a connection another tenant used: the copy data
/// waits behind the reset only until its replies are in (the backend sends them with CopyInResponse).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_from_stdin_right_after_a_tenant_switch() {
    let w = clusters();
    let p = harness(&w, 1).start().await;
    let mut acme = Raw::connect(&p).await;
    let mut globex = Raw::connect_as(&p, "dev.globex").await;
    for n in 0..3 {
        globex.simple("SELECT 1").await;
        acme.send(|b| frontend::query("COPY t FROM STDIN", b).unwrap())
            .await;
        let started = tokio::time::timeout(
            Duration::from_secs(10),
            common::read_until(&mut acme.s, b'G'),
        )
        .await
        .expect("CopyInResponse within 10 s");
        assert!(started.is_some());
        acme.send(|b| {
            frontend::CopyData::new(format!("{}\tcopied\n", 100 + n).as_bytes())
                .unwrap()
                .write(b);
            frontend::copy_done(b);
        })
        .await;
        let (tags, _) = acme.replies().await;
        assert_eq!(tags, "CZ");
    }
    assert_eq!(
        w.shared.psql(
            "app",
            "SELECT count(*) FROM tenant_acme.t WHERE who = 'copied'"
        ),
        "3"
    );
}

/// In transaction pooling a client's cancel key stands for the backend connection it holds now: it stops the
/// client's own statement while one runs, and does nothing while the client is between transactions, when its
/// last connection is running another client's statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_only_the_connection_the_client_holds_now() {
    let pg = PgCluster::start();
    pg.tenant_schemas("app", &["tenant_acme"]);
    let proxy = Harness::new()
        .proxy("pool_mode = \"transaction\"")
        .backend_with("shared", &pg, "database = \"app\"\npool_size = 1")
        .tenant("acme", "shared", None, Some("tenant_acme"))
        .start()
        .await;
    let a = proxy.connect("app.acme", "app").await.unwrap();
    let token = a.cancel_token();
    let (a, r) = cancelled_midway(a, "SELECT pg_sleep(30)", &token).await;
    assert_eq!(code(&r.unwrap_err()), "57014");
    // a is parked; b gets the pool's one connection, the one a's key last stood for.
    let b = proxy.connect("app.acme", "app").await.unwrap();
    let (_b, r) = cancelled_midway(b, "SELECT pg_sleep(1.5)", &token).await;
    assert!(r.is_ok(), "a's cancel stopped b's statement: {r:?}");
    // And a's key works again once a holds a connection.
    let (_a, r) = cancelled_midway(a, "SELECT pg_sleep(30)", &token).await;
    assert_eq!(code(&r.unwrap_err()), "57014");
}

/// The proxy's count of full resets between tenants (`pgtenant_pool_tenant_resets_total`).
async fn tenant_resets(p: &TestProxy) -> f64 {
    let (_, body) = common::http_get(p.proxy.metrics_addr().unwrap(), "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix("pgtenant_pool_tenant_resets_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no resets counter in\n{body}"))
}

/// Two tenants of a shared pool of two connections, taking turns: each keeps finding the connection it used
/// last (no reset between tenants is needed), where taking the connection returned last would hand each
/// transaction the one the other tenant just left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_taking_turns_each_find_their_own_connection_again() {
    let w = clusters();
    let p = harness(&w, 2)
        .proxy("metrics_listen = \"127.0.0.1:0\"")
        .start()
        .await;
    let acme = p.connect("app.acme", "app").await.unwrap();
    let globex = p.connect("app.globex", "app").await.unwrap();
    // Both connections opened: each client holds one at the same time.
    acme.batch_execute("BEGIN").await.unwrap();
    globex.batch_execute("BEGIN").await.unwrap();
    acme.batch_execute("COMMIT").await.unwrap();
    globex.batch_execute("COMMIT").await.unwrap();
    async fn pid(c: &tokio_postgres::Client) -> i32 {
        let r = c.query_one("SELECT pg_backend_pid()", &[]).await.unwrap();
        r.get(0)
    }
    let before = tenant_resets(&p).await;
    let (mut mine, mut theirs) = (
        std::collections::BTreeSet::new(),
        std::collections::BTreeSet::new(),
    );
    for _ in 0..10 {
        mine.insert(pid(&acme).await);
        assert_eq!(who_is(&acme).await.unwrap(), "tenant_acme");
        theirs.insert(pid(&globex).await);
        assert_eq!(who_is(&globex).await.unwrap(), "tenant_globex");
    }
    assert_eq!((mine.len(), theirs.len()), (1, 1), "{mine:?} {theirs:?}");
    assert!(mine.is_disjoint(&theirs), "{mine:?} {theirs:?}");
    assert_eq!(
        tenant_resets(&p).await,
        before,
        "no connection changed tenants"
    );
    assert!(backend_connections(&w.shared) <= 2);
    // With one connection between them, every turn is a reset, and the counter says so.
    drop(p);
    let p = harness(&w, 1)
        .proxy("metrics_listen = \"127.0.0.1:0\"")
        .start()
        .await;
    let acme = p.connect("app.acme", "app").await.unwrap();
    let globex = p.connect("app.globex", "app").await.unwrap();
    for _ in 0..3 {
        assert_eq!(who_is(&acme).await.unwrap(), "tenant_acme");
        assert_eq!(who_is(&globex).await.unwrap(), "tenant_globex");
    }
    let counted = tenant_resets(&p).await;
    assert!(counted >= 5.0, "{counted}");
}

/// Clients waiting for a connection of `backend`'s pools, from the admin socket.
async fn waiting(p: &TestProxy, backend: &str) -> u64 {
    pools_sum(p, backend, "waiting").await
}

/// A field of `backend`'s pools in the admin socket's `backends`, summed.
async fn pools_sum(p: &TestProxy, backend: &str, field: &str) -> u64 {
    let b = p.admin_ok(json!({"cmd": "backends"})).await;
    b["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["backend"] == backend)
        .flat_map(|b| b["pools"].as_array().unwrap().iter())
        .map(|p| p[field].as_u64().unwrap())
        .sum()
}

/// A proxy whose shared pool has one connection and the given tenant turn (ms) and linger (ms).
async fn one_connection_with_turns(w: &Two, turn: u64, linger: u64) -> TestProxy {
    Harness::new()
        .proxy("pool_mode = \"transaction\"\nmetrics_listen = \"127.0.0.1:0\"")
        .backend_with(
            "shared",
            &w.shared,
            &format!(
                "database = \"app\"\npool_size = 1\ntenant_turn_ms = {turn}\ntenant_turn_linger_ms = {linger}"
            ),
        )
        .tenant("acme", "shared", None, Some("tenant_acme"))
        .tenant("globex", "shared", None, Some("tenant_globex"))
        .start()
        .await
}

/// Turns: a tenant whose transaction ends while another tenant waits keeps the connection for its next
/// transaction (no reset between tenants), and the waiter gets it once the tenant's client does not come back
/// within the linger. With turns off, the waiter gets it at once and each tenant change costs a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_keeps_its_connection_for_its_turn_while_another_waits() {
    let w = clusters();
    for turns in [true, false] {
        let p = match turns {
            true => one_connection_with_turns(&w, 60_000, 1_500).await,
            false => one_connection_with_turns(&w, 0, 1_500).await,
        };
        let (acme, queued) = acme_holds_globex_queued(&p).await;
        let before = tenant_resets(&p).await;
        acme.batch_execute("COMMIT").await.unwrap();
        assert_eq!(who_is(&acme).await.unwrap(), "tenant_acme");
        if turns {
            assert!(!queued.is_finished(), "globex took acme's turn");
            assert_eq!(
                tenant_resets(&p).await,
                before,
                "acme's turn needed no reset"
            );
        }
        // Acme's client does not come back: after the linger, globex gets the connection, reset.
        assert_eq!(queued.await.unwrap().unwrap(), "tenant_globex");
        // (Each `who_is` is two checkouts: tokio-postgres prepares, then executes. Without turns the tenants
        // alternate on the connection between them, each change a reset.)
        let resets = tenant_resets(&p).await - before;
        match turns {
            true => assert_eq!(resets, 1.0),
            false => assert!(resets >= 2.0, "{resets}"),
        }
        assert_eq!(pools_sum(&p, "shared", "open").await, 1);
        drop(p);
    }
}

/// A turn is bounded: two tenants whose clients each come back at once, on one connection, both make
/// progress (a turn without an end would leave one waiting until the other stops), and the connection changes
/// tenants once a turn, not once a transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turns_end_while_their_tenants_keep_coming_back() {
    let w = clusters();
    let p = one_connection_with_turns(&w, 50, 2_000).await;
    let before = tenant_resets(&p).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut loops = Vec::new();
    for (tenant, who) in [("app.acme", "tenant_acme"), ("app.globex", "tenant_globex")] {
        let c = p.connect(tenant, "app").await.unwrap();
        let stop = stop.clone();
        loops.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // A simple query: one checkout per transaction.
                let rows = c.simple_query("SELECT who FROM t").await.unwrap();
                let got = rows.iter().find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                    _ => None,
                });
                assert_eq!(got.as_deref(), Some(who));
                n += 1;
            }
            n
        }));
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut counts = Vec::new();
    for l in loops {
        counts.push(l.await.unwrap());
    }
    let resets = tenant_resets(&p).await - before;
    let total = (counts[0] + counts[1]) as f64;
    eprintln!("transactions {counts:?}, resets {resets}");
    // Each tenant had several turns of 50 ms in 1.5 s.
    assert!(counts.iter().all(|&n| n >= 5), "{counts:?}");
    assert!(
        resets <= total / 4.0,
        "{resets} resets in {total} transactions"
    );
}

/// A connection kept for a tenant's turn whose time runs out when nobody in its pool waits any more, while
/// another pool of the backend waits for room under the backend's `max_connections`, is closed to make that
/// room (as a checkin would close it), not left idle where nothing hands it on: the other pool's client would
/// wait out its checkout timeout. Timings: globex's wait (4 s) ends before acme's linger (6 s) does, and
/// initech, queued after globex gave up, is still waiting when the linger ends (its own wait ends at 8 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_whose_time_ran_out_makes_room_for_another_pool() {
    let w = clusters();
    let exists = w.shared.psql(
        "postgres",
        "SELECT count(*) FROM pg_database WHERE datname = 'turns_other'",
    );
    if exists == "0" {
        w.shared.psql("postgres", "CREATE DATABASE turns_other");
    }
    let p = Harness::new()
        .proxy("pool_mode = \"transaction\"")
        .proxy("pool_checkout_timeout_ms = 4000")
        .backend_with(
            "shared",
            &w.shared,
            "database = \"app\"\npool_size = 1\nmax_connections = 1\ntenant_turn_ms = 60000\n\
             tenant_turn_linger_ms = 6000",
        )
        .tenant("acme", "shared", None, Some("tenant_acme"))
        .tenant("globex", "shared", None, Some("tenant_globex"))
        .tenant("initech", "shared", Some("turns_other"), None)
        .start()
        .await;
    let (acme, queued) = acme_holds_globex_queued(&p).await;
    // Globex waits: the connection stays with acme for its turn, and acme's client does not come back.
    acme.batch_execute("COMMIT").await.unwrap();
    let err = queued.await.unwrap().expect_err("globex's wait ends first");
    assert_eq!(code(&err), "53300", "{err}");
    assert_eq!(pools_sum(&p, "shared", "open").await, 1);
    // Initech's pool (another database) finds the backend full and acme's connection still kept: it queues
    // (had the keeping ended already, it would have taken the idle connection's place without queueing).
    let url = p.url("app.initech", "app");
    let initech = tokio::spawn(async move {
        let c = common::connect(&url).await?;
        c.query_one("SELECT current_database()", &[])
            .await
            .map(|r| r.get::<_, String>(0))
    });
    until_waiting(&p, 1).await;
    assert_eq!(initech.await.unwrap().unwrap(), "turns_other");
    assert_eq!(
        pools_sum(&p, "shared", "open").await,
        1,
        "the backend's cap held"
    );
}

/// A connection kept until before the time the pool's sweeping task sleeps to wakes that task: here a
/// reload shortened the linger while the task slept out the old one. Timings: the old linger (6 s) ends after
/// globex's wait (4 s) would; the new one (300 ms) long before. Without the early wake-up, nothing hands the
/// kept connection on in time (acme's client does not come back), and globex's wait ends in `53300`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shorter_linger_after_a_reload_ends_a_kept_connection_at_its_own_time() {
    let w = clusters();
    let backend = |linger: u32| {
        format!(
            "database = \"app\"\npool_size = 1\ntenant_turn_ms = 60000\ntenant_turn_linger_ms = {linger}"
        )
    };
    let harness = |linger| {
        Harness::new()
            .proxy("pool_mode = \"transaction\"")
            .proxy("pool_checkout_timeout_ms = 4000")
            .backend_with("shared", &w.shared, &backend(linger))
            .tenant("acme", "shared", None, Some("tenant_acme"))
            .tenant("globex", "shared", None, Some("tenant_globex"))
    };
    let (p, path) = harness(6000).start_from_file().await;
    let (acme, queued) = acme_holds_globex_queued(&p).await;
    // Kept for acme (the sweeping task now sleeps for 6 s), and taken back by acme's next transaction.
    acme.batch_execute("COMMIT").await.unwrap();
    acme.batch_execute("BEGIN").await.unwrap();
    assert_eq!(who_is(&acme).await.unwrap(), "tenant_acme");
    std::fs::write(&path, harness(300).text()).unwrap();
    p.admin_ok(json!({"cmd": "reload"})).await;
    // Kept for acme again, for 300 ms now; acme's client does not come back.
    acme.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        queued
            .await
            .unwrap()
            .expect("globex served when acme's linger ended"),
        "tenant_globex"
    );
}

/// Acme's client in a transaction on the pool's only connection, and globex's query queued behind it.
async fn acme_holds_globex_queued(
    p: &TestProxy,
) -> (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<String, tokio_postgres::Error>>,
) {
    let acme = p.connect("app.acme", "app").await.unwrap();
    let globex = p.connect("app.globex", "app").await.unwrap();
    acme.batch_execute("BEGIN").await.unwrap();
    assert_eq!(who_is(&acme).await.unwrap(), "tenant_acme");
    let queued = tokio::spawn(async move { who_is(&globex).await });
    until_waiting(p, 1).await;
    (acme, queued)
}

/// Until `n` clients wait on the pools of backend `shared` (panics after 10 s).
async fn until_waiting(p: &TestProxy, n: u64) {
    for _ in 0..2000 {
        if waiting(p, "shared").await == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{n} clients never waited");
}

/// A tenant's code cannot swap another tenant's prepared statement on a shared connection: it finds the
/// proxy's statement in `pg_prepared_statements` and, in a `DO` block, deallocates it and prepares its own SQL
/// under the same name. With statements kept across tenants, the other tenant's next execution ran that SQL;
/// now a change of tenant discards them, and the other tenant's statement is prepared again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_replace_another_tenants_prepared_statement() {
    let w = clusters();
    let p = harness(&w, 1).start().await;
    let globex = p.connect("app.globex", "app").await.unwrap();
    let acme = p.connect("app.acme", "app").await.unwrap();
    let statement = globex.prepare("SELECT who FROM t").await.unwrap();
    let who = |rows: Vec<tokio_postgres::Row>| rows[0].get::<_, String>(0);
    assert_eq!(
        who(globex.query(&statement, &[]).await.unwrap()),
        "tenant_globex"
    );
    // (A simple query: a prepared one would list itself.)
    let rows = acme
        .simple_query("SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'pgtenant\\_%'")
        .await
        .unwrap();
    let swapped = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap();
    acme.batch_execute(
        "DO $$ DECLARE n text; BEGIN \
           FOR n IN SELECT name FROM pg_prepared_statements WHERE name LIKE 'pgtenant\\_%' LOOP \
             EXECUTE format('DEALLOCATE %I', n); \
             EXECUTE format('PREPARE %I AS SELECT ''forged''::text AS who', n); \
           END LOOP; END $$",
    )
    .await
    .unwrap();
    assert_eq!(
        who(globex.query(&statement, &[]).await.unwrap()),
        "tenant_globex"
    );
    assert_eq!(
        swapped, "0",
        "the connection came to acme with globex's statements"
    );
}

/// A COPY ended before the backend said it began (CopyDone sent right behind the Execute, as PostgreSQL
/// allows) left the proxy counting both of the client's Syncs as ignored, so the two ReadyForQuery that answer
/// them settled the client's next two queries in its count: the connection went back to the pool with those
/// queries still running, for another tenant to read their replies as its own. Such a connection is never
/// handed on now: it stays with its session, which gets every reply, and is closed after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_ended_before_it_began_never_hands_its_connection_on() {
    let w = clusters();
    w.shared.psql(
        "app",
        "CREATE TABLE IF NOT EXISTS tenant_acme.copied (n int)",
    );
    let p = harness(&w, 1).start().await;
    let mut a = Raw::connect(&p).await;
    let (_, first) = a.simple("SELECT pg_backend_pid()::text").await;
    a.send(|b| {
        unnamed_execute("COPY copied FROM STDIN", b);
        frontend::copy_done(b);
        unnamed_execute("SELECT pg_sleep(0.5)::text", b);
        frontend::sync(b);
        frontend::sync(b);
    })
    .await;
    // Once COPY has begun, a CopyFail (which PostgreSQL, out of COPY again, ignores) and two more queries.
    common::read_until(&mut a.s, b'G').await.unwrap();
    a.send(|b| {
        frontend::copy_fail("", b).unwrap();
        frontend::query("SELECT pg_sleep(1)::text", b).unwrap();
        frontend::query("SELECT 'mine'", b).unwrap();
    })
    .await;
    assert_eq!(a.replies().await.0, "C12DCZ");
    assert_eq!(a.replies().await.0, "Z");
    assert_eq!(a.replies().await.0, "TDCZ");
    assert_eq!(a.replies().await, ("TDCZ".into(), vec!["mine".into()]));
    drop(a);
    // Globex gets a connection of its own, and only its own replies.
    let globex = p.connect("app.globex", "app").await.unwrap();
    assert_eq!(who_is(&globex).await.unwrap(), "tenant_globex");
    let theirs: i32 = globex
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(first, vec![theirs.to_string()]);
}
