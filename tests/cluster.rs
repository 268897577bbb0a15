//! Several proxies sharing a control plane on PostgreSQL: a route change made on any instance is applied by
//! all of them (latency measured), membership is listed, and serving goes on while the control-plane database
//! restarts, after which changes flow again.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

async fn three(cp: &PgCluster, shared: &PgCluster, dedicated: &PgCluster) -> Vec<TestProxy> {
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", cp.port);
    let mut out = Vec::new();
    for _ in 0..3 {
        out.push(
            Harness::new()
                .top(&format!("control_plane = \"{url}\""))
                .backend_with("shared", shared, "database = \"app\"")
                .backend_with("dedicated", dedicated, "database = \"app\"")
                .tenant("acme", "shared", None, Some("tenant_acme"))
                .tenant("beta", "shared", None, Some("tenant_beta"))
                .start()
                .await,
        );
    }
    out
}

async fn backend_of(p: &TestProxy, tenant: &str) -> Value {
    p.admin_ok(json!({"cmd": "tenant.get", "tenant": tenant}))
        .await["route"]["backend"]
        .clone()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_change_on_any_instance_reaches_every_instance() {
    let (cp, shared, dedicated) = (PgCluster::start(), PgCluster::start(), PgCluster::start());
    for pg in [&shared, &dedicated] {
        pg.tenant_schemas("app", &["tenant_acme", "tenant_beta"]);
    }
    let proxies = three(&cp, &shared, &dedicated).await;
    let mut latencies = Vec::new();
    for i in 0..20 {
        let to = if i % 2 == 0 { "dedicated" } else { "shared" };
        let writer = &proxies[i % 3];
        let started = Instant::now();
        writer
            .admin_ok(json!({"cmd": "tenant.set", "tenant": "beta", "backend": to, "schema": "tenant_beta"}))
            .await;
        loop {
            let mut all = true;
            for p in &proxies {
                all &= backend_of(p, "beta").await == json!(to);
            }
            if all {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "change {i} did not reach every instance"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    eprintln!("route change applied by all three instances: p50 {p50:.1} ms, p99 {p99:.1} ms");
    assert!(p99 < 1000.0, "p99 {p99:.1} ms");
    // Clients through every instance reach beta where the last change put it (shared).
    for p in &proxies {
        let c = p.connect("app.beta", "app").await.unwrap();
        let port: i32 = c
            .query_one("SELECT inet_server_port()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(port as u16, shared.port);
    }
    // Membership: three live instances, each at the store's epoch.
    // Membership: three live instances, each reporting (heartbeats are a second apart) the store's last epoch:
    // two seeded tenants and twenty changes.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let listed = proxies[0].admin_ok(json!({"cmd": "instances"})).await;
        let rows = listed["instances"].as_array().unwrap().clone();
        assert_eq!(rows.len(), 3, "{listed}");
        assert!(rows.iter().all(|r| r["alive"] == json!(true)), "{listed}");
        if rows.iter().all(|r| r["applied_epoch"] == json!(22)) {
            break;
        }
        assert!(Instant::now() < deadline, "{listed}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_goes_on_while_the_control_plane_restarts() {
    let (cp, shared, dedicated) = (PgCluster::start(), PgCluster::start(), PgCluster::start());
    for pg in [&shared, &dedicated] {
        pg.tenant_schemas("app", &["tenant_acme", "tenant_beta"]);
    }
    let proxies = three(&cp, &shared, &dedicated).await;
    cp.stop();
    for p in &proxies {
        let c = p.connect("app.acme", "app").await.unwrap();
        c.simple_query("SELECT 1").await.unwrap();
    }
    let refused = proxies[0]
        .admin_err(json!({"cmd": "tenant.set", "tenant": "beta", "backend": "dedicated", "schema": "tenant_beta"}))
        .await;
    assert_eq!(refused, "state_write_failed");
    assert_eq!(backend_of(&proxies[1], "beta").await, json!("shared"));
    cp.restart();
    let started = Instant::now();
    loop {
        let r = proxies[0]
            .admin(json!({"cmd": "tenant.set", "tenant": "beta", "backend": "dedicated", "schema": "tenant_beta"}))
            .await;
        if r["ok"] == json!(true) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for p in &proxies[1..] {
        let mut seen = false;
        for _ in 0..100 {
            if backend_of(p, "beta").await == json!("dedicated") {
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            seen,
            "the change after the restart did not reach every instance"
        );
    }
}
