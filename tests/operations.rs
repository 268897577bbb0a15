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
    assert!(pause < 100.0, "{cut}");
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
        if failed >= 1 {
            let f = entries
                .iter()
                .find(|d| d["outcome"] == json!("failed"))
                .unwrap();
            assert_eq!(f["attempts"], json!(2), "{f}");
            assert_eq!(f["url"], json!(format!("http://127.0.0.1:{dead}/hook")));
            assert!(f["error"].as_str().unwrap().contains("connect"), "{f}");
            let ok = entries
                .iter()
                .filter(|d| d["outcome"] == json!("delivered"))
                .count();
            assert_eq!(ok, expected.len(), "{l}");
            assert!(entries
                .iter()
                .all(|d| d["url"].as_str().unwrap().ends_with("/hook")));
            break;
        }
        assert!(Instant::now() < deadline, "no failure logged: {l}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "webhooks: {} events delivered in order; cutover pause {pause:.1} ms with a dead receiver",
        got.len()
    );
}
