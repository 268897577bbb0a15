//! The relay on real PostgreSQL: extended protocol and pipelining, COPY, cancel, LISTEN/NOTIFY, large messages,
//! FunctionCall, client encodings, pool reset and limits, and failures on either side.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    closes_within, code, eventually, frame, psql, raw_login, read_until, Harness, PgCluster,
    TestProxy,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::AsyncWriteExt;

async fn setup(extra_proxy: &[&str]) -> (PgCluster, TestProxy) {
    let pg = PgCluster::start();
    pg.tenant_schemas("app", &["tenant_acme"]);
    let mut h = Harness::new()
        .backend_with("shared", &pg, "database = \"app\"")
        .tenant("acme", "shared", None, Some("tenant_acme"))
        .raw("[[users]]\nname = \"dev\"\nauth = \"trust\"\ntenants = [\"*\"]\n");
    for line in extra_proxy {
        h = h.proxy(line);
    }
    let proxy = h.start().await;
    (pg, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_and_pipelining() {
    let (_pg, proxy) = setup(&[]).await;
    let c = proxy.connect("app.acme", "app").await.unwrap();
    c.batch_execute("CREATE TABLE nums (n int primary key, sq bigint)")
        .await
        .unwrap();
    let insert = c.prepare("INSERT INTO nums VALUES ($1, $2)").await.unwrap();
    // tokio-postgres pipelines concurrent queries on one connection.
    let futs = (0..500i32).map(|i| {
        let c = &c;
        let insert = &insert;
        async move { c.execute(insert, &[&i, &(i as i64 * i as i64)]).await }
    });
    let results = futures_util::future::join_all(futs).await;
    assert!(results.iter().all(|r| matches!(r, Ok(1))));
    let sum: i64 = c
        .query_one("SELECT sum(sq)::bigint FROM nums", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(sum, (0..500i64).map(|i| i * i).sum::<i64>());
    // An error in the middle of a pipeline fails only its own statement.
    let (a, b, d) = tokio::join!(
        c.query_one("SELECT 1::int", &[]),
        c.query_one("SELECT 1/0", &[]),
        c.query_one("SELECT 3::int", &[])
    );
    assert_eq!(a.unwrap().get::<_, i32>(0), 1);
    assert_eq!(code(&b.unwrap_err()), "22012");
    assert_eq!(d.unwrap().get::<_, i32>(0), 3);
    // Describe of a statement prepared earlier, binary results, NULLs.
    let stmt = c
        .prepare("SELECT n, NULL::text FROM nums WHERE n = $1")
        .await
        .unwrap();
    assert_eq!(stmt.columns().len(), 2);
    let row = c.query_one(&stmt, &[&7i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);
    assert_eq!(row.get::<_, Option<String>>(1), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_out_and_copy_errors() {
    let (_pg, proxy) = setup(&[]).await;
    let c = proxy.connect("app.acme", "app").await.unwrap();
    c.batch_execute("CREATE TABLE cp (id int, payload text)")
        .await
        .unwrap();
    let sink = c.copy_in("COPY cp FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut chunk = String::new();
    for i in 0..100_000 {
        chunk.push_str(&format!("{i}\tpayload number {i}\n"));
        if chunk.len() > 64 * 1024 {
            sink.send(bytes::Bytes::from(std::mem::take(&mut chunk)))
                .await
                .unwrap();
        }
    }
    sink.send(bytes::Bytes::from(chunk)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 100_000);

    let stream = c.copy_out("COPY cp TO STDOUT").await.unwrap();
    let chunks: Vec<_> = stream.collect().await;
    let total: usize = chunks.iter().map(|c| c.as_ref().unwrap().len()).sum();
    let expected: i64 = c
        .query_one(
            "SELECT sum(octet_length(id::text || E'\\t' || payload || E'\\n'))::bigint FROM cp",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(total as i64, expected);

    // Bad data mid-copy: the server's error reaches the client and the session goes on.
    let sink = c.copy_in("COPY cp FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"1\tok\nnot-a-number\tbad\n"))
        .await
        .unwrap();
    let e = sink.finish().await.unwrap_err();
    assert_eq!(code(&e), "22P02");
    // CopyFail from the client (dropping an unfinished sink aborts the COPY).
    {
        let sink = c
            .copy_in::<_, bytes::Bytes>("COPY cp FROM STDIN")
            .await
            .unwrap();
        drop(sink);
    }
    let n: i64 = c
        .query_one("SELECT count(*) FROM cp", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 100_000);
    // psql's \copy both ways.
    let file = tempfile::NamedTempFile::new().unwrap();
    let path = file.path().display().to_string();
    let (ok, _, err) = psql(
        &proxy.url("app.acme", "app"),
        &["-c", &format!("\\copy cp TO '{path}'")],
    );
    assert!(ok, "{err}");
    let (ok, out, err) = psql(
        &proxy.url("app.acme", "app"),
        &[
            "-c",
            "CREATE TABLE cp2 (id int, payload text)",
            "-c",
            &format!("\\copy cp2 FROM '{path}'"),
            "-c",
            "SELECT count(*) FROM cp2",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.ends_with("100000"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_right_backend() {
    let (_pg, proxy) = setup(&[]).await;
    let c = proxy.connect("app.acme", "app").await.unwrap();
    let other = proxy.connect("app.acme", "app").await.unwrap();
    let token = c.cancel_token();
    let (_c, r) = common::cancelled_midway(c, "SELECT pg_sleep(30)", &token).await;
    assert_eq!(code(&r.unwrap_err()), "57014");
    // The other session was not touched.
    assert_eq!(
        other
            .query_one("SELECT 1::int", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_carries_the_real_backend_pid() {
    let (_pg, proxy) = setup(&[]).await;
    let (listener, mut conn) =
        tokio_postgres::connect(&proxy.url("app.acme", "app"), tokio_postgres::NoTls)
            .await
            .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n);
            }
        }
    });
    listener.batch_execute("LISTEN jobs").await.unwrap();
    let notifier = proxy.connect("app.acme", "app").await.unwrap();
    let pid: i32 = notifier
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    notifier
        .batch_execute("NOTIFY jobs, 'hello'")
        .await
        .unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (n.channel(), n.payload(), n.process_id()),
        ("jobs", "hello", pid)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_function_calls_and_encodings() {
    let (_pg, proxy) = setup(&[]).await;
    let c = proxy.connect("app.acme", "app").await.unwrap();
    let big = "x".repeat(48 << 20);
    let n: i32 = c
        .query_one("SELECT length($1::text)", &[&big])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n as usize, big.len());
    let back: String = c
        .query_one("SELECT repeat('y', 40000000)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(back.len(), 40_000_000);

    // psql's large-object commands use the fast-path FunctionCall message.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("in.bin");
    let dst = dir.path().join("out.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let url = proxy.url("app.acme", "app");
    let (ok, out, err) = psql(&url, &["-c", &format!("\\lo_import '{}'", src.display())]);
    assert!(ok, "{err}");
    let oid = out.rsplit(' ').next().unwrap().to_string();
    let (ok, _, err) = psql(
        &url,
        &["-c", &format!("\\lo_export {oid} '{}'", dst.display())],
    );
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(&dst).unwrap(), data);

    // A LATIN1 client: raw 0xE9 bytes go through untouched and the server converts them.
    c.batch_execute("CREATE TABLE enc (s text)").await.unwrap();
    let sql = dir.path().join("latin1.sql");
    std::fs::write(
        &sql,
        b"INSERT INTO enc VALUES ('caf\xe9');\nSELECT s FROM enc;\n",
    )
    .unwrap();
    let out = Command::new("psql")
        .env("PGCLIENTENCODING", "LATIN1")
        .args(["-X", "-A", "-t", "-q", "-f", sql.to_str().unwrap(), &url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"caf\xe9\n");
    let s: String = c.query_one("SELECT s FROM enc", &[]).await.unwrap().get(0);
    assert_eq!(s, "café");
}

fn backend_states(pg: &PgCluster) -> String {
    pg.psql(
        "app",
        "SELECT coalesce(string_agg(state, ','), '') FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND state <> 'idle'",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_client_leaves_no_transaction_open() {
    let (pg, proxy) = setup(&[]).await;
    let c = proxy.connect("app.acme", "app").await.unwrap();
    // A client that dies idle in a transaction holding a row lock.
    let mut child = Command::new("psql")
        .args(["-X", "-q", &proxy.url("app.acme", "app")])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stdin = child.stdin.as_mut().unwrap();
    use std::io::Write;
    stdin
        .write_all(b"BEGIN;\nUPDATE t SET who = 'locked' WHERE id = 1;\n")
        .unwrap();
    stdin.flush().unwrap();
    assert!(
        eventually(Duration::from_secs(5), || backend_states(&pg)
            .contains("idle in transaction"))
        .await
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(5), || backend_states(&pg).is_empty()).await,
        "left behind: {}",
        backend_states(&pg)
    );
    // The lock is gone and the update was rolled back.
    c.batch_execute("SET lock_timeout = '2s'; UPDATE t SET who = 'free' WHERE id = 1")
        .await
        .unwrap();

    // A client that dies mid-query: its backend connection is closed, not reused.
    let mut child = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-c",
            "BEGIN; SELECT pg_sleep(1.5)",
            &proxy.url("app.acme", "app"),
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || backend_states(&pg)
            .contains("active"))
        .await
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(eventually(Duration::from_secs(8), || backend_states(&pg).is_empty()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_are_reset_and_reused() {
    let (_pg, proxy) = setup(&[]).await;
    let c = proxy.connect("app.acme", "app").await.unwrap();
    let pid: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    c.batch_execute("SET work_mem = '7MB'; PREPARE p AS SELECT 1")
        .await
        .unwrap();
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = proxy.connect("app.acme", "app").await.unwrap();
    let again: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pid, again, "the idle connection is reused");
    // A session that made a temporary object: its connection is closed, not handed on (PostgreSQL keeps the
    // temporary namespace for the backend's life).
    let t = proxy.connect("app.acme", "app").await.unwrap();
    let temp_pid: i32 = t
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    t.batch_execute("CREATE TEMP TABLE tmp (x int); DROP TABLE tmp")
        .await
        .unwrap();
    drop(t);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = proxy.connect("app.acme", "app").await.unwrap();
    let fresh: i32 = t
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(
        temp_pid, fresh,
        "a connection that had temporary objects is not reused"
    );
    drop(t);
    let wm: String = c.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
    assert_eq!(wm, "4MB");
    assert!(
        c.batch_execute("EXECUTE p").await.is_err(),
        "prepared statements are discarded"
    );
    let schema: String = c
        .query_one("SELECT current_schema()::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(schema, "tenant_acme");
    // ParameterStatus changes reach the client.
    c.batch_execute("SET application_name = 'reporter'")
        .await
        .unwrap();
    let (ok, out, _) = psql(
        &proxy.url("app.acme", "app"),
        &["-c", "SHOW application_name"],
    );
    assert!(ok);
    assert_eq!(out, "psql");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_give_clear_errors() {
    let pg = PgCluster::start();
    pg.tenant_schemas("app", &["tenant_acme"]);
    let proxy = Harness::new()
        .proxy("max_client_conn = 2")
        .proxy("pool_checkout_timeout_ms = 300")
        .backend_with("shared", &pg, "database = \"app\"\npool_size = 1")
        .tenant("acme", "shared", None, Some("tenant_acme"))
        .start()
        .await;
    let first = proxy.connect("app.acme", "app").await.unwrap();
    // The pool has one connection and it is taken.
    let e = proxy.connect("app.acme", "app").await.unwrap_err();
    assert_eq!(code(&e), "53300", "{e}");
    let second = proxy.connect("app", "app").await.unwrap();
    let e = proxy.connect("app", "app").await.unwrap_err();
    assert_eq!(code(&e), "53300", "{e}");
    drop(second);
    // SET onto a full pool is an ERROR, not the end of the session.
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let a = proxy.connect("app.acme", "app").await.unwrap();
    let b = proxy.connect("app", "app").await.unwrap();
    let e = b
        .simple_query("SET pgtenant.tenant = 'acme'")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "53300");
    drop(a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.simple_query("SET pgtenant.tenant = 'acme'")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_timeout_and_protocol_violations() {
    let (_pg, proxy) = setup(&["client_login_timeout_ms = 300"]).await;
    // Silent client: closed after the login timeout.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port()))
        .await
        .unwrap();
    assert!(closes_within(&mut s, Duration::from_secs(3)).await);
    // Garbage startup length: an error and a close.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port()))
        .await
        .unwrap();
    s.write_all(&[0xff, 0xff, 0xff, 0xff, 0, 3, 0, 0])
        .await
        .unwrap();
    assert!(closes_within(&mut s, Duration::from_secs(3)).await);
    // Unsupported protocol version.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port()))
        .await
        .unwrap();
    s.write_all(&common::startup_packet(0x0002_0000, &[("user", "dev")]))
        .await
        .unwrap();
    let err = read_until(&mut s, b'E').await.unwrap();
    assert!(String::from_utf8_lossy(&err).contains("08P01"));
    // A newer 3.x minor version is negotiated down.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port()))
        .await
        .unwrap();
    let packet = common::startup_packet(
        0x0003_0002,
        &[("user", "dev.acme"), ("database", "app"), ("_pq_.x", "1")],
    );
    s.write_all(&packet).await.unwrap();
    let v = read_until(&mut s, b'v').await.unwrap();
    assert_eq!(&v[..8], &[0, 0, 0, 0, 0, 0, 0, 1]);
    assert!(read_until(&mut s, b'Z').await.is_some());
    // After login: a frame with an impossible length or an unknown type ends the session with 08P01.
    for bad in [&b"Q\xff\xff\xff\xff"[..], &b"\x01\x00\x00\x00\x04"[..]] {
        let mut s = raw_login(proxy.port(), &[("user", "dev.acme"), ("database", "app")]).await;
        s.write_all(bad).await.unwrap();
        let err = read_until(&mut s, b'E').await.unwrap();
        assert!(
            String::from_utf8_lossy(&err).contains("08P01"),
            "{}",
            String::from_utf8_lossy(&err)
        );
        assert!(closes_within(&mut s, Duration::from_secs(3)).await);
    }
    // GSSENCRequest is declined and the client may go on in plain text.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port()))
        .await
        .unwrap();
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30])
        .await
        .unwrap();
    let mut answer = [0u8; 1];
    tokio::io::AsyncReadExt::read_exact(&mut s, &mut answer)
        .await
        .unwrap();
    assert_eq!(&answer, b"N");
    s.write_all(&common::startup_packet(
        196608,
        &[("user", "dev.acme"), ("database", "app")],
    ))
    .await
    .unwrap();
    assert!(read_until(&mut s, b'Z').await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_death_is_reported_to_the_client() {
    let (pg, proxy) = setup(&[]).await;
    // Terminated by an administrator: the backend's own FATAL reaches the client.
    let (ok, _, err) = psql(
        &proxy.url("app.acme", "app"),
        &["-c", "SELECT pg_terminate_backend(pg_backend_pid())"],
    );
    assert!(!ok);
    assert!(
        err.contains("terminating connection due to administrator command"),
        "{err}"
    );
    // Killed outright: the proxy says so with 08006.
    let c = proxy.connect("app.acme", "app").await.unwrap();
    let pid: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let query =
        tokio::spawn(async move { c.simple_query("SELECT pg_sleep(20)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let r = tokio::time::timeout(Duration::from_secs(10), query)
        .await
        .unwrap()
        .unwrap();
    let e = r.unwrap_err();
    assert_eq!(code(&e), "08006", "{e}");
    // After the crash restart the proxy connects afresh.
    assert!(
        eventually(Duration::from_secs(20), || {
            psql(&proxy.url("app.acme", "app"), &["-c", "SELECT 1"]).0
        })
        .await
    );
    drop(pg);
}

fn parse(sql: &str) -> Vec<u8> {
    let mut body = vec![0u8];
    body.extend_from_slice(sql.as_bytes());
    body.extend_from_slice(&[0, 0, 0]);
    frame(b'P', &body)
}

fn bind_execute() -> Vec<u8> {
    let mut v = frame(b'B', &[0, 0, 0, 0, 0, 0, 0, 0]);
    v.extend(frame(b'E', &[0, 0, 0, 0, 0]));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_tenant_statement_fails_its_whole_batch() {
    let (pg, proxy) = setup(&[]).await;
    pg.psql("app", "CREATE TABLE tenant_acme.b (n int)");
    let mut s = raw_login(proxy.port(), &[("user", "dev.acme"), ("database", "app")]).await;
    // One batch: an INSERT, then SET pgtenant.tenant, then Sync. PostgreSQL would fail the batch at the second
    // statement and roll the implicit transaction back; the proxy must do the same.
    let mut batch = parse("INSERT INTO b VALUES (1)");
    batch.extend(bind_execute());
    batch.extend(parse("SET pgtenant.tenant = 'acme'"));
    batch.extend(bind_execute());
    batch.extend(frame(b'S', b""));
    s.write_all(&batch).await.unwrap();
    let err = read_until(&mut s, b'E').await.unwrap();
    assert!(
        String::from_utf8_lossy(&err).contains("0A000"),
        "{}",
        String::from_utf8_lossy(&err)
    );
    assert_eq!(read_until(&mut s, b'Z').await.unwrap(), b"I");
    assert_eq!(pg.psql("app", "SELECT count(*) FROM tenant_acme.b"), "0");
    // The session goes on.
    s.write_all(&frame(b'Q', b"INSERT INTO b VALUES (2)\0"))
        .await
        .unwrap();
    assert_eq!(read_until(&mut s, b'Z').await.unwrap(), b"I");
    assert_eq!(
        pg.psql("app", "SELECT string_agg(n::text, ',') FROM tenant_acme.b"),
        "2"
    );
}

/// Reads frames until `n` ReadyForQuery have come; returns every frame's tag and, for errors, the SQLSTATE
/// (ParameterStatus and notices left out).
async fn tags_until_ready(s: &mut tokio::net::TcpStream, n: usize) -> Vec<String> {
    let mut seen = Vec::new();
    let mut ready = 0;
    while ready < n {
        let tag = next_tag(s).await.expect("a reply");
        ready += usize::from(tag == "Z");
        seen.extend(tag_shown(tag));
    }
    seen
}

/// The next frame's tag, with the SQLSTATE appended for an error; `None` once the stream ends.
async fn next_tag(s: &mut tokio::net::TcpStream) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 5];
    s.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len.checked_sub(4)?];
    s.read_exact(&mut body).await.ok()?;
    let mut tag = (head[0] as char).to_string();
    if head[0] == b'E' {
        let text = String::from_utf8_lossy(&body).into_owned();
        tag.push_str(
            text.split('\0')
                .find_map(|f| f.strip_prefix('C'))
                .unwrap_or(""),
        );
    }
    Some(tag)
}

/// A tag as the tests list it: ParameterStatus and notices left out.
fn tag_shown(tag: String) -> Option<String> {
    (!matches!(tag.as_str(), "S" | "N")).then_some(tag)
}

/// A tenant statement sent as a simple Query in the middle of an unfinished extended batch (no Sync yet), in
/// both pool modes. Answered on the spot, its reply would overtake the batch's; a switch would close the
/// connection with the batch's INSERT unsent and keep the old tenant's gate pass (its pause would never
/// drain, and in transaction pooling every later statement went nowhere). It fails the batch as PostgreSQL
/// fails an implicit transaction: the batch's replies, the error, ReadyForQuery, and the INSERT rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_statement_inside_an_unfinished_batch_fails_the_batch() {
    let pg = PgCluster::start();
    pg.tenant_schemas("app", &["tenant_acme", "tenant_globex"]);
    pg.psql("app", "CREATE TABLE tenant_acme.b (n int)");
    for mode in ["session", "transaction"] {
        pg.psql("app", "TRUNCATE tenant_acme.b");
        let proxy = Harness::new()
            .proxy(&format!("pool_mode = \"{mode}\""))
            .backend_with("shared", &pg, "database = \"app\"")
            .tenant("acme", "shared", None, Some("tenant_acme"))
            .tenant("globex", "shared", None, Some("tenant_globex"))
            .raw("[[users]]\nname = \"dev\"\nauth = \"trust\"\ntenants = [\"*\"]\n")
            .start()
            .await;
        let mut s = raw_login(proxy.port(), &[("user", "dev"), ("database", "app")]).await;
        s.write_all(&frame(b'Q', b"SET pgtenant.tenant = 'acme'\0"))
            .await
            .unwrap();
        assert_eq!(tags_until_ready(&mut s, 1).await, ["C", "Z"], "{mode}");
        for statement in ["SET pgtenant.tenant = 'globex'", "SHOW pgtenant.tenant"] {
            let mut batch = parse("INSERT INTO b VALUES (1)");
            batch.extend(bind_execute());
            batch.extend(frame(b'Q', format!("{statement}\0").as_bytes()));
            batch.extend(frame(b'S', b""));
            s.write_all(&batch).await.unwrap();
            assert_eq!(
                tags_until_ready(&mut s, 2).await,
                ["1", "2", "C", "E25001", "Z", "Z"],
                "{mode}: {statement}"
            );
            assert_eq!(pg.psql("app", "SELECT count(*) FROM tenant_acme.b"), "0");
        }
        // A second tenant statement after the first refusal, in the extended protocol: refused on its own,
        // after the first one's answer (one refusal in flight at a time).
        let mut batch = parse("INSERT INTO b VALUES (1)");
        batch.extend(bind_execute());
        batch.extend(frame(b'Q', b"SET pgtenant.tenant = 'globex'\0"));
        batch.extend(parse("SET pgtenant.tenant = 'globex'"));
        batch.extend(bind_execute());
        batch.extend(frame(b'S', b""));
        s.write_all(&batch).await.unwrap();
        assert_eq!(
            tags_until_ready(&mut s, 2).await,
            ["1", "2", "C", "E25001", "Z", "E0A000", "Z"],
            "{mode}"
        );
        assert_eq!(pg.psql("app", "SELECT count(*) FROM tenant_acme.b"), "0");
        // Still acme's session, and it goes on.
        s.write_all(&frame(b'Q', b"INSERT INTO b VALUES (2)\0"))
            .await
            .unwrap();
        assert_eq!(tags_until_ready(&mut s, 1).await, ["C", "Z"], "{mode}");
        assert_eq!(
            pg.psql("app", "SELECT string_agg(n::text, ',') FROM tenant_acme.b"),
            "2"
        );
        // No gate pass of acme's is left behind: a pause drains at once.
        let r = proxy
            .admin_ok(json!({"cmd": "pause", "tenant": "acme", "timeout_ms": 2000}))
            .await;
        assert_eq!(r["drained"], true, "{mode}: {r}");
        proxy
            .admin_ok(json!({"cmd": "resume", "tenant": "acme"}))
            .await;
    }
}

/// Statements sent together with a Terminate run as PostgreSQL runs them, which reads everything before the
/// Terminate: an autocommitted INSERT commits, also behind a reply the proxy had not read yet, and an open
/// transaction is rolled back. Before, the frames still on their way to the backend were dropped with the
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_sent_with_a_terminate_run_as_on_postgresql() {
    let pg = PgCluster::start();
    pg.tenant_schemas("app", &["tenant_acme"]);
    pg.psql("app", "CREATE TABLE tenant_acme.last_words (n int)");
    for mode in ["session", "transaction"] {
        pg.psql("app", "TRUNCATE tenant_acme.last_words");
        let proxy = Harness::new()
            .proxy(&format!("pool_mode = \"{mode}\""))
            .backend_with("shared", &pg, "database = \"app\"")
            .tenant("acme", "shared", None, Some("tenant_acme"))
            .raw("[[users]]\nname = \"dev\"\nauth = \"trust\"\ntenants = [\"*\"]\n")
            .start()
            .await;
        let login = [("user", "dev.acme"), ("database", "app")];
        for (i, sql) in [
            &["INSERT INTO last_words VALUES (1)"][..],
            &["SELECT pg_sleep(0.2)", "INSERT INTO last_words VALUES (2)"],
            &["BEGIN; INSERT INTO last_words VALUES (3)"],
        ]
        .iter()
        .enumerate()
        {
            let mut s = raw_login(proxy.port(), &login).await;
            let mut bytes = Vec::new();
            for q in *sql {
                bytes.extend(frame(b'Q', format!("{q}\0").as_bytes()));
            }
            bytes.extend(frame(b'X', b""));
            s.write_all(&bytes).await.unwrap();
            assert!(
                closes_within(&mut s, Duration::from_secs(10)).await,
                "{mode} {i}"
            );
        }
        let rows = || {
            pg.psql(
                "app",
                "SELECT string_agg(n::text, ',' ORDER BY n) FROM tenant_acme.last_words",
            )
        };
        assert!(
            eventually(Duration::from_secs(10), || rows() == "1,2").await,
            "{mode}: {}",
            rows()
        );
        // The open transaction's INSERT stays rolled back.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(rows(), "1,2", "{mode}");
    }
}

/// A backend skipping to the next Sync after an error answers nothing, so named Parses sent behind the error
/// without a Sync wait for replies that never come, and the proxy kept a copy of each: memory grew with what
/// the client sent. Past 16 MiB (or 100 000 messages) the session ends with `08P01` instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parses_piled_up_behind_a_skipping_backend_are_bounded() {
    let (_pg, proxy) = setup(&[]).await;
    let mut s = raw_login(proxy.port(), &[("user", "dev.acme"), ("database", "app")]).await;
    s.write_all(&frame(b'E', b"nope\0\0\0\0\0")).await.unwrap();
    let text = "x".repeat(512 << 10);
    let mut ended = None;
    for i in 0..64 {
        let mut body = format!("p{i}\0SELECT '{text}'\0").into_bytes();
        body.extend_from_slice(&[0, 0]);
        if s.write_all(&frame(b'P', &body)).await.is_err() {
            break;
        }
        if i == 40 {
            ended = Some(tags_until_closed(&mut s).await);
            break;
        }
    }
    let tags = match ended {
        Some(tags) => tags,
        None => tags_until_closed(&mut s).await,
    };
    // (The portal's error, `34000`, comes first when the proxy read it before it gave up.)
    assert_eq!(tags.last().map(String::as_str), Some("E08P01"), "{tags:?}");
}

/// Reads frames until the peer closes (at most 10 s); returns their tags as `tags_until_ready` does.
async fn tags_until_closed(s: &mut tokio::net::TcpStream) -> Vec<String> {
    let mut seen = Vec::new();
    let read = async {
        while let Some(tag) = next_tag(s).await {
            seen.extend(tag_shown(tag));
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("closed within 10 s");
    seen
}
