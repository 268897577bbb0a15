//! The HTTP API: each role against the commands it may and may not run, paging, the OpenAPI description, and
//! server-sent events during a real move.

mod common;

use std::time::{Duration, Instant};

use common::moves::{small_schema, wait_lag_zero};
use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const VIEWER: &str = "viewer-token-0123456789";
const OPERATOR: &str = "operator-token-0123456789";
const ADMIN: &str = "admin-token-0123456789";

async fn up(shared: &PgCluster, dedicated: &PgCluster) -> TestProxy {
    Harness::new()
        .proxy("metrics_listen = \"127.0.0.1:0\"")
        .raw(&format!(
            "[[api_tokens]]\nname = \"dash\"\nrole = \"viewer\"\ntoken = \"{VIEWER}\"\n\
             [[api_tokens]]\nname = \"oncall\"\nrole = \"operator\"\ntoken = \"{OPERATOR}\"\n\
             [[api_tokens]]\nname = \"platform\"\nrole = \"admin\"\ntoken = \"{ADMIN}\"\n\
             [migration]\npg_dump = \"{}\"",
            pg_bin("pg_dump").display()
        ))
        .backend_with(
            "shared",
            shared,
            "database = \"app\"\nadmin_user = \"postgres\"",
        )
        .backend_with(
            "dedicated",
            dedicated,
            "database = \"app\"\nadmin_user = \"postgres\"",
        )
        .tenant("acme", "shared", None, Some("tenant_acme"))
        .tenant("beta", "shared", None, Some("tenant_beta"))
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_runs_what_it_may_and_gets_403_for_the_rest() {
    let shared = PgCluster::start();
    let dedicated = PgCluster::start();
    small_schema(&shared);
    let proxy = up(&shared, &dedicated).await;
    let addr = proxy.proxy.metrics_addr().unwrap();

    let (s, body) = api(addr, "GET", "/api/tenants", None, None).await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    assert_eq!(
        api(
            addr,
            "GET",
            "/api/tenants",
            Some("wrong-token-0123456789"),
            None
        )
        .await
        .0,
        401
    );
    let (s, body) = api(
        addr,
        "GET",
        "/api/tenants?limit=1&offset=1",
        Some(VIEWER),
        None,
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["result"]["total"], json!(2));
    assert_eq!(
        body["result"]["tenants"][0]["tenant"],
        json!("beta"),
        "{body}"
    );
    let (_, found) = api(addr, "GET", "/api/tenants?search=ACM", Some(VIEWER), None).await;
    assert_eq!(
        found["result"]["tenants"].as_array().unwrap().len(),
        1,
        "{found}"
    );
    assert_eq!(
        api(addr, "GET", "/api/tenants/nope", Some(VIEWER), None)
            .await
            .0,
        404
    );
    let (s, _) = api(addr, "GET", "/api/audit?tail=5", Some(VIEWER), None).await;
    assert_eq!(s, 200);

    // A viewer cannot start a move, pause, or change a route.
    let start = json!({"tenant": "acme", "to": "dedicated", "verify": "hash"});
    let (s, body) = api(
        addr,
        "POST",
        "/api/migrations",
        Some(VIEWER),
        Some(start.clone()),
    )
    .await;
    assert_eq!(s, 403, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("needs role operator"),
        "{body}"
    );
    assert_eq!(
        api(addr, "POST", "/api/tenants/acme/pause", Some(VIEWER), None)
            .await
            .0,
        403
    );
    // An operator pauses and resumes, but does not change routes.
    assert_eq!(
        api(
            addr,
            "POST",
            "/api/tenants/acme/pause",
            Some(OPERATOR),
            Some(json!({"timeout_ms": 1000}))
        )
        .await
        .0,
        200
    );
    let (_, t) = api(addr, "GET", "/api/tenants/acme", Some(VIEWER), None).await;
    assert_eq!(t["result"]["gate"]["paused"], json!(true), "{t}");
    assert_eq!(
        api(
            addr,
            "POST",
            "/api/tenants/acme/resume",
            Some(OPERATOR),
            None
        )
        .await
        .0,
        200
    );
    let route = json!({"backend": "shared", "schema": "tenant_beta"});
    assert_eq!(
        api(
            addr,
            "PUT",
            "/api/tenants/gamma",
            Some(OPERATOR),
            Some(route.clone())
        )
        .await
        .0,
        403
    );
    let (s, body) = api(addr, "PUT", "/api/tenants/gamma", Some(ADMIN), Some(route)).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        api(addr, "DELETE", "/api/tenants/gamma", Some(ADMIN), None)
            .await
            .0,
        200
    );
    // Bad input is a 400 that names the argument.
    let (s, body) = api(
        addr,
        "POST",
        "/api/migrations",
        Some(OPERATOR),
        Some(json!({"tenant": "acme"})),
    )
    .await;
    assert_eq!(s, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("to is required"),
        "{body}"
    );
    // The audit log names the token.
    let (_, audit) = api(addr, "GET", "/api/audit?tail=10", Some(VIEWER), None).await;
    assert!(audit.to_string().contains("api:oncall"), "{audit}");

    let (s, spec) = api(addr, "GET", "/api/openapi.json", None, None).await;
    assert_eq!(s, 200);
    assert_eq!(spec["openapi"], json!("3.0.3"));
    let op = &spec["paths"]["/api/migrations"]["post"];
    assert_eq!(op["operationId"], json!("migrate.start"));
    assert_eq!(op["x-pgtenant-role"], json!("operator"));
    assert_eq!(
        spec["paths"]["/api/tenants/{tenant}"]["put"]["x-pgtenant-role"],
        json!("admin")
    );
    assert_eq!(
        spec["paths"]["/api/tenants"]["get"]["x-pgtenant-role"],
        json!("viewer")
    );
    let (s, metrics) = http_get(addr, "/metrics").await;
    assert_eq!(s, 200);
    assert!(metrics.contains("pgtenant_"), "{metrics}");
}

/// Reads server-sent events until `until` says stop; (event, data) pairs.
async fn read_events(
    reader: &mut BufReader<tokio::net::TcpStream>,
    deadline: Instant,
    mut until: impl FnMut(&str, &Value) -> bool,
) -> Vec<(String, Value)> {
    let mut got = Vec::new();
    let mut event = String::new();
    loop {
        let mut line = String::new();
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, reader.read_line(&mut line)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return got,
        }
        let line = line.trim_end();
        if let Some(e) = line.strip_prefix("event: ") {
            event = e.to_owned();
        } else if let Some(d) = line.strip_prefix("data: ") {
            let data: Value = serde_json::from_str(d).unwrap_or(Value::Null);
            let stop = until(&event, &data);
            got.push((event.clone(), data));
            if stop {
                return got;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_streams_its_progress_and_events() {
    let shared = PgCluster::start();
    let dedicated = PgCluster::start();
    small_schema(&shared);
    let proxy = up(&shared, &dedicated).await;
    let addr = proxy.proxy.metrics_addr().unwrap();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET /api/migrations/acme/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {VIEWER}\r\nAccept: text/event-stream\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut reader = BufReader::new(stream);
    let start = json!({"tenant": "acme", "to": "dedicated", "verify": "hash"});
    let (s, body) = api(addr, "POST", "/api/migrations", Some(OPERATOR), Some(start)).await;
    assert_eq!(s, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let got = read_events(&mut reader, deadline, |e, d| {
        e == "migration.state" && d["data"]["to"] == json!("dual_write")
    })
    .await;
    let states: Vec<&str> = got
        .iter()
        .filter(|(e, _)| e == "migration.state")
        .map(|(_, d)| d["data"]["to"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["pending", "bulk_copy", "dual_write"], "{got:?}");
    assert!(
        got.iter().any(|(e, _)| e == "progress"),
        "progress events: {got:?}"
    );
    wait_lag_zero(&proxy, "acme").await;
    let (s, cut) = api(
        addr,
        "POST",
        "/api/migrations/acme/cutover",
        Some(OPERATOR),
        None,
    )
    .await;
    assert_eq!(s, 200, "{cut}");
    let got = read_events(&mut reader, deadline, |e, _| e == "migration.cutover").await;
    let (_, cutover) = got.last().unwrap();
    assert_eq!(cutover["data"]["outcome"], json!("swapped"), "{got:?}");
    common::held_briefly(cutover["data"]["pause_ms"].as_f64().unwrap(), &cutover);
    // Progress now says migrated.
    let got = read_events(&mut reader, deadline, |e, d| {
        e == "progress" && d["state"] == json!("migrated")
    })
    .await;
    assert!(!got.is_empty());
}

/// With `metrics_tls`, the API (and metrics and panel) are served over HTTPS with the `[tls]` certificate, and
/// not over plain HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_speaks_https_when_configured() {
    let pg = PgCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (c, k) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&c, cert.cert.pem()).unwrap();
    std::fs::write(&k, cert.key_pair.serialize_pem()).unwrap();
    let proxy = Harness::new()
        .proxy("metrics_listen = \"127.0.0.1:0\"")
        .proxy("metrics_tls = true")
        .raw(&format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n[[api_tokens]]\nname = \"dash\"\nrole = \"viewer\"\ntoken = \"{VIEWER}\"",
            c.display(),
            k.display()
        ))
        .backend_with("shared", &pg, "database = \"app\"")
        .start()
        .await;
    let addr = proxy.proxy.metrics_addr().unwrap();
    let curl = move |scheme: &str| {
        std::process::Command::new("curl")
            .args([
                "-sk",
                "--max-time",
                "5",
                "-H",
                &format!("Authorization: Bearer {VIEWER}"),
            ])
            .arg(format!("{scheme}://{addr}/api/stats"))
            .output()
            .unwrap()
    };
    let out = tokio::task::spawn_blocking(move || (curl("https"), curl("http")))
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&out.0.stdout).unwrap_or(Value::Null);
    assert_eq!(
        body["ok"],
        json!(true),
        "{}",
        String::from_utf8_lossy(&out.0.stderr)
    );
    assert!(
        !String::from_utf8_lossy(&out.1.stdout).contains("\"ok\""),
        "plain HTTP answered"
    );
}

/// The HTTP listener closes a connection whose request headers do not arrive in time (silent, or dripping
/// half a request), and still serves the next client: `/metrics` needs no token, so anyone may open one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_http_connections_are_closed_and_others_still_served() {
    let (shared, dedicated) = (PgCluster::start(), PgCluster::start());
    let proxy = up(&shared, &dedicated).await;
    let addr = proxy.proxy.metrics_addr().unwrap();
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut dripping = tokio::net::TcpStream::connect(addr).await.unwrap();
    dripping
        .write_all(b"GET /metrics HTTP/1.1\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    for s in [&mut silent, &mut dripping] {
        assert!(closes_within(s, Duration::from_secs(30)).await);
    }
    eprintln!("closed after {:?}", started.elapsed());
    let mut ok = tokio::net::TcpStream::connect(addr).await.unwrap();
    ok.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut line = String::new();
    BufReader::new(ok).read_line(&mut line).await.unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
}
