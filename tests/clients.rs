//! Real clients end to end: TLS with psql, pgbench, psycopg, and the `pgtenant serve` binary itself.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{
    closes_within, pgbench, psql, python, raw_login, read_until, Harness, PgCluster, PASSWORD,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

fn tls_files(dir: &std::path::Path) -> String {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert.cert.pem()).unwrap();
    std::fs::write(&k, cert.key_pair.serialize_pem()).unwrap();
    format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        c.display(),
        k.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_for_clients() {
    let pg = PgCluster::start();
    pg.tenant_schemas("app", &["tenant_acme"]);
    let dir = tempfile::tempdir().unwrap();
    let proxy = Harness::new()
        .backend_with("shared", &pg, "database = \"app\"")
        .tenant("acme", "shared", None, Some("tenant_acme"))
        .raw(&tls_files(dir.path()))
        .start()
        .await;
    let url = proxy.url("app.acme", "app");
    let (ok, out, err) = psql(
        &format!("{url} sslmode=require"),
        &["-c", "\\conninfo", "-c", "SELECT who FROM t"],
    );
    assert!(ok, "{err}");
    assert!(out.contains("SSL connection"), "{out}");
    assert!(out.ends_with("tenant_acme"), "{out}");
    // TLS stays optional.
    let (ok, out, _) = psql(
        &format!("{url} sslmode=disable"),
        &["-c", "SELECT who FROM t"],
    );
    assert!(ok);
    assert_eq!(out, "tenant_acme");

    // Bytes sent after SSLRequest but before the answer are refused: no 'S', the connection closes.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port()))
        .await
        .unwrap();
    let mut injected = SSL_REQUEST.to_vec();
    injected.extend(common::startup_packet(
        196608,
        &[("user", "app.acme"), ("database", "app")],
    ));
    s.write_all(&injected).await.unwrap();
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut first))
        .await
        .unwrap()
        .unwrap_or(0);
    assert!(
        n == 0 || first[0] != b'S',
        "proxy must not start TLS after injected bytes"
    );
    assert!(closes_within(&mut s, Duration::from_secs(3)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_not_configured_answers_n() {
    let pg = PgCluster::start();
    pg.tenant_schemas("app", &["tenant_acme"]);
    let proxy = Harness::new()
        .backend_with("shared", &pg, "database = \"app\"")
        .tenant("acme", "shared", None, Some("tenant_acme"))
        .start()
        .await;
    let (ok, _, err) = psql(
        &format!("{} sslmode=require", proxy.url("app.acme", "app")),
        &["-c", "SELECT 1"],
    );
    assert!(!ok);
    assert!(err.contains("does not support SSL"), "{err}");
    let (ok, _, err) = psql(
        &format!("{} sslmode=prefer", proxy.url("app.acme", "app")),
        &["-c", "SELECT 1"],
    );
    assert!(ok, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_through_the_proxy_keeps_its_invariants() {
    let shared = PgCluster::start();
    shared.psql("app", "CREATE SCHEMA tenant_acme");
    let dedicated = PgCluster::start();
    let proxy = Harness::new()
        .backend_with("shared", &shared, "database = \"app\"\npool_size = 30")
        .backend_with(
            "dedicated",
            &dedicated,
            "database = \"app\"\npool_size = 30",
        )
        .tenant("acme", "shared", None, Some("tenant_acme"))
        .tenant("hooli", "dedicated", None, None)
        .start()
        .await;
    let urls = [
        format!(
            "host=127.0.0.1 port={} user=app.acme dbname=app",
            proxy.port()
        ),
        format!(
            "host=127.0.0.1 port={} user=app.hooli dbname=app",
            proxy.port()
        ),
    ];
    for url in &urls {
        pgbench(url, &["-i", "-s", "1", "-q"]);
    }
    let runs: Vec<_> = urls
        .iter()
        .flat_map(|u| ["simple", "extended", "prepared"].map(|m| (u.clone(), m)))
        .collect();
    let handles: Vec<_> = runs
        .into_iter()
        .map(|(url, mode)| {
            // -n: otherwise each pgbench truncates pgbench_history first, erasing rows of the runs
            // already going on the same tenant.
            tokio::task::spawn_blocking(move || {
                pgbench(&url, &["-n", "-c", "8", "-j", "2", "-t", "150", "-M", mode])
            })
        })
        .collect();
    for h in handles {
        let out = h.await.unwrap();
        assert!(out.contains("number of failed transactions: 0"), "{out}");
        assert!(
            out.contains("number of transactions actually processed: 1200/1200"),
            "{out}"
        );
    }
    // pgbench's invariant on each backend: balances equal the history of deltas.
    for (pg, schema) in [(&shared, "tenant_acme"), (&dedicated, "public")] {
        let check = pg.psql(
            "app",
            &format!(
                "SET search_path = {schema}; SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(bbalance) FROM pgbench_branches),
                   (SELECT sum(tbalance) FROM pgbench_tellers), (SELECT sum(delta) FROM pgbench_history), (SELECT count(*) FROM pgbench_history)"
            ),
        );
        let v: Vec<&str> = check.lines().last().unwrap().split('|').collect();
        assert!(
            v[0] == v[3] && v[1] == v[3] && v[2] == v[3] && v[4] == "3600",
            "{schema}: accounts|branches|tellers|history|count = {check}"
        );
    }
    // New connection per transaction.
    let out = pgbench(&urls[0], &["-c", "4", "-j", "2", "-t", "50", "-C", "-S"]);
    assert!(out.contains("number of failed transactions: 0"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_works_unchanged() {
    if !common::psycopg_available() {
        return;
    }
    let pg = PgCluster::start();
    pg.psql("app", "CREATE SCHEMA tenant_acme");
    let proxy = Harness::new()
        .backend_with("shared", &pg, "database = \"app\"")
        .tenant("acme", "shared", None, Some("tenant_acme"))
        .start()
        .await;
    let url = proxy.url("app.acme", "app");
    let no_tenant = proxy.url("app", "app");
    let (ok, text) =
        tokio::task::spawn_blocking(move || python("psycopg_check.py", &[&url, &no_tenant]))
            .await
            .unwrap();
    assert!(ok, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_sessions_finish_then_ends_them() {
    let pg = PgCluster::start();
    pg.tenant_schemas("app", &["tenant_acme"]);
    let proxy = Harness::new()
        .backend_with("shared", &pg, "database = \"app\"")
        .tenant("acme", "shared", None, Some("tenant_acme"))
        .raw("[[users]]\nname = \"dev\"\nauth = \"trust\"\ntenants = [\"*\"]\n")
        .start()
        .await;
    let port = proxy.port();
    let mut s = raw_login(port, &[("user", "dev.acme"), ("database", "app")]).await;
    let proxy = std::sync::Arc::new(proxy);
    let p = proxy.clone();
    let stopping = tokio::spawn(async move { p.proxy.shutdown(Duration::from_millis(500)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // No new clients once shutdown began; the open session still works during the grace period.
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err());
    s.write_all(b"Q\0\0\0\x0dselect 1\0").await.unwrap();
    assert!(read_until(&mut s, b'Z').await.is_some());
    // Then it is ended with 57P01.
    let err = read_until(&mut s, b'E').await.unwrap();
    assert!(String::from_utf8_lossy(&err).contains("57P01"));
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_and_stops_on_sigterm() {
    let pg = PgCluster::start();
    pg.tenant_schemas("app", &["tenant_acme"]);
    let port = common::free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pgtenant.toml");
    let harness = Harness::new()
        .backend_with("shared", &pg, "database = \"app\"")
        .tenant("acme", "shared", None, Some("tenant_acme"))
        .proxy("shutdown_timeout_ms = 300")
        .raw("[[users]]\nname = \"dev\"\nauth = \"trust\"\ntenants = [\"*\"]\n");
    let text = harness.config();
    let mut toml_text = toml::to_string(&text).unwrap();
    toml_text = toml_text.replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    std::fs::write(&config, toml_text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgtenant"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .spawn()
        .unwrap();
    let url = format!("host=127.0.0.1 port={port} user=app.acme dbname=app password={PASSWORD}");
    assert!(
        common::eventually(Duration::from_secs(10), || psql(&url, &["-c", "SELECT 1"])
            .0)
        .await
    );
    let (ok, out, _) = psql(&url, &["-c", "SELECT who FROM t"]);
    assert!(ok);
    assert_eq!(out, "tenant_acme");
    // SIGHUP reloads the config file: a tenant added to it becomes routable.
    let mut next = text.clone();
    next.tenants.insert(
        "late".into(),
        pgtenant::config::TenantConfig {
            backend: pgtenant::routing::BackendId::parse("shared").unwrap(),
            schema: Some("tenant_acme".into()),
            ..Default::default()
        },
    );
    let next_text = toml::to_string(&next)
        .unwrap()
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    std::fs::write(&config, next_text).unwrap();
    assert!(Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let late = format!("host=127.0.0.1 port={port} user=app.late dbname=app password={PASSWORD}");
    assert!(
        common::eventually(Duration::from_secs(5), || psql(&late, &["-c", "SELECT 1"])
            .0)
        .await
    );

    let client = common::connect(&url).await.unwrap();
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    assert!(client.simple_query("SELECT 1").await.is_err());

    // SIGINT ends sessions at once, with 57P01.
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgtenant"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .spawn()
        .unwrap();
    assert!(
        common::eventually(Duration::from_secs(10), || psql(&url, &["-c", "SELECT 1"])
            .0)
        .await
    );
    let mut raw = raw_login(port, &[("user", "dev.acme"), ("database", "app")]).await;
    assert!(Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let err = read_until(&mut raw, b'E').await.unwrap();
    assert!(String::from_utf8_lossy(&err).contains("57P01"));
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

/// Whether the session's backend connection is encrypted, as the backend sees it.
async fn backend_ssl(c: &tokio_postgres::Client) -> bool {
    c.query_one(
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_backends() {
    let secure = PgCluster::start();
    secure.tenant_schemas("app", &["tenant_acme"]);
    secure.enable_ssl();
    let plain = PgCluster::start();
    plain.tenant_schemas("app", &["tenant_acme"]);
    let proxy = Harness::new()
        .backend_with(
            "secure",
            &secure,
            "database = \"app\"\nsslmode = \"require\"",
        )
        .backend_with(
            "plain_required",
            &plain,
            "database = \"app\"\nsslmode = \"require\"",
        )
        .backend_with(
            "plain_preferred",
            &plain,
            "database = \"app\"\nsslmode = \"prefer\"",
        )
        .tenant("acme", "secure", None, Some("tenant_acme"))
        .tenant("globex", "plain_required", None, Some("tenant_acme"))
        .tenant("initech", "plain_preferred", None, Some("tenant_acme"))
        .start()
        .await;
    let c = proxy.connect("app.acme", "app").await.unwrap();
    let ssl = backend_ssl(&c).await;
    assert!(ssl, "the backend connection is encrypted");
    let e = proxy.connect("app.globex", "app").await.unwrap_err();
    assert_eq!(common::code(&e), "08001", "{e}");
    let c = proxy.connect("app.initech", "app").await.unwrap();
    let ssl = backend_ssl(&c).await;
    assert!(!ssl);
}
