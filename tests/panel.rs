//! The web control panel in a real browser: headless Chromium driven by Playwright (tests/python/panel.py)
//! signs in, searches the tenants, estimates and starts a move of a tenant under pgbench from the wizard,
//! watches the monitor reach migrated, finalizes, and finds the move in the history. Skipped (with a note)
//! where Chromium or Playwright is missing, unless `PGTENANT_REQUIRE_BROWSER=1` (CI sets it after installing
//! them). `PGTENANT_SCREENSHOTS=DIR` keeps the screenshots there (docs/ holds the committed ones).

mod common;

use std::process::{Command, Stdio};

use common::*;

const TOKEN: &str = "panel-operator-token-0123";

fn browser_available() -> bool {
    std::path::Path::new("/usr/bin/chromium").exists()
        && Command::new("python3")
            .args(["-c", "import playwright"])
            .status()
            .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_panel_moves_a_tenant_under_pgbench() {
    if !browser_available() {
        assert!(
            std::env::var("PGTENANT_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "Chromium and Playwright are required"
        );
        eprintln!("skipped: /usr/bin/chromium or Python's playwright is missing");
        return;
    }
    let shared = PgCluster::start();
    let dedicated = PgCluster::start();
    shared.psql(
        "app",
        "CREATE SCHEMA tenant_acme; CREATE SCHEMA tenant_beta;",
    );
    let proxy = Harness::new()
        .proxy("metrics_listen = \"127.0.0.1:0\"")
        .raw(&format!(
            "[[api_tokens]]\nname = \"oncall\"\nrole = \"operator\"\ntoken = \"{TOKEN}\"\n\
             [migration]\npg_dump = \"{}\"\ncutover_timeout_ms = 3000",
            pg_bin("pg_dump").display()
        ))
        .backend_with(
            "shared",
            &shared,
            "database = \"app\"\nadmin_user = \"postgres\"",
        )
        .backend_with(
            "dedicated",
            &dedicated,
            "database = \"app\"\nadmin_user = \"postgres\"",
        )
        .tenant("acme", "shared", None, Some("tenant_acme"))
        .tenant("beta", "shared", None, Some("tenant_beta"))
        .start()
        .await;
    let url = proxy.url("app.acme", "app");
    let init = Command::new("pgbench")
        .args(["-i", "-s", "1", "-q", &url])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let pgbench = Command::new("pgbench")
        .args(["-c", "2", "-T", "20", "-n", &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = std::env::var("PGTENANT_SCREENSHOTS")
        .unwrap_or_else(|_| proxy.state.path().display().to_string());
    let base = format!("http://{}", proxy.proxy.metrics_addr().unwrap());
    let script = format!("{}/tests/python/panel.py", env!("CARGO_MANIFEST_DIR"));
    let run = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args([&script, &base, TOKEN, "acme", "dedicated", &out])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        run.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let bench = tokio::task::spawn_blocking(move || pgbench.wait_with_output().unwrap())
        .await
        .unwrap();
    let report = String::from_utf8_lossy(&bench.stdout).into_owned();
    assert!(
        report.contains("number of failed transactions: 0 "),
        "{report}"
    );
    // The tenant lives on the target now, with the rows pgbench wrote.
    let where_now = dedicated.psql("app", "SELECT count(*) FROM tenant_acme.pgbench_history");
    assert!(where_now.parse::<u64>().unwrap() > 0, "{where_now}");
    eprintln!(
        "panel: move under pgbench ({})",
        report
            .lines()
            .find(|l| l.starts_with("tps"))
            .unwrap_or_default()
    );
}
