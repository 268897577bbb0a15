//! The fault matrix of a live move: each scenario runs a real `pgtenant serve` process (so it can be killed with
//! SIGKILL) with pgbench writing to the moving tenant, a client that records every commit it saw acknowledged,
//! and a second tenant writing beside it. Each ends by checking that no acknowledged write was lost or
//! duplicated (every acknowledged row present exactly once, per-table row sets equal on both sides, pgbench's
//! balance invariant) and where the migration ended; what the clients saw (errors, commit latency) is asserted
//! too. README "Live migration: what is promised" cites these tests.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// The migration tenant `acme` (pgbench tables and a `ledger`) and its neighbour `beta` (a `ledger`) on the
/// shared server; `dedicated` is the target. Serving roles are the tenants' own (role isolation).
struct Env {
    shared: PgCluster,
    dedicated: PgCluster,
    /// Keeps the state directory alive.
    _harness: Harness,
    proxy: ProxyProc,
    /// Between the proxy and the target, when asked for.
    forwarder: Option<Forwarder>,
}

/// The serving role, and commits that survive a crash of the server (the test clusters run with
/// `synchronous_commit = off` elsewhere, which loses the last acknowledged commits when a server is stopped
/// with `-m immediate`, as PostgreSQL documents).
fn least_privilege(pg: &PgCluster) {
    pg.psql("postgres", "CREATE ROLE pgtenant_serve LOGIN");
    pg.psql("postgres", "ALTER SYSTEM SET synchronous_commit = on");
    pg.psql("postgres", "SELECT pg_reload_conf()");
}

/// Two clusters and a proxy process routing acme and beta to `shared`; with `forward`, the proxy reaches the
/// dedicated server through a [`Forwarder`].
async fn env_with(extra: &str, forward: bool) -> Env {
    env_as(extra, forward, false).await
}

/// `legacy`: the serving role is the superuser and tenants share it (`isolation = "shared"`), as configs before
/// role isolation were: only the proxy and the triggers stand between a client and the capture.
async fn env_as(extra: &str, forward: bool, legacy: bool) -> Env {
    let shared = PgCluster::start();
    let dedicated = PgCluster::start();
    least_privilege(&shared);
    least_privilege(&dedicated);
    shared.psql(
        "app",
        "CREATE SCHEMA tenant_acme; CREATE SCHEMA tenant_beta;
         CREATE TABLE tenant_acme.ledger (n bigint, at timestamptz DEFAULT clock_timestamp());
         CREATE TABLE tenant_beta.ledger (n bigint, at timestamptz DEFAULT clock_timestamp());",
    );
    let (serving, backend) = if legacy {
        ("postgres", "database = \"app\"\npool_size = 20")
    } else {
        (
            "pgtenant_serve",
            "admin_user = \"postgres\"\nisolation = \"role\"\ndatabase = \"app\"\npool_size = 20",
        )
    };
    let forwarder = if forward {
        Some(forwarder(dedicated.port).await)
    } else {
        None
    };
    let port = free_port();
    let mut harness = Harness::new()
        .proxy(&format!("listen = \"127.0.0.1:{port}\""))
        .backend_as("shared", &shared, serving, backend)
        .tenant("acme", "shared", None, Some("tenant_acme"))
        .tenant("beta", "shared", None, Some("tenant_beta"))
        .raw(&format!(
            "[migration]\npg_dump = \"{}\"\ncutover_timeout_ms = 2000\ntee_timeout_ms = 1000\nverify_chunk_rows = 2000{extra}",
            pg_bin("pg_dump").display()
        ));
    harness = match &forwarder {
        Some(f) => harness.raw(&format!(
            "[backends.dedicated]\nhost = \"127.0.0.1\"\nport = {}\nuser = \"{serving}\"\n{backend}",
            f.port
        )),
        None => harness.backend_as("dedicated", &dedicated, serving, backend),
    };
    let mut proxy = ProxyProc::new(&harness, port);
    proxy.start("");
    for t in ["acme", "beta"].iter().filter(|_| !legacy) {
        proxy
            .admin_ok(json!({"cmd": "tenant.grants", "tenant": t, "apply": true}))
            .await;
    }
    pgbench(&proxy.url("acme"), &["-i", "-s", "1", "-q"]);
    Env {
        shared,
        dedicated,
        _harness: harness,
        proxy,
        forwarder,
    }
}

async fn env() -> Env {
    env_with("", false).await
}

/// `pgtenant serve` as a process of its own.
struct ProxyProc {
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
    socket: PathBuf,
    port: u16,
}

impl ProxyProc {
    fn new(h: &Harness, port: u16) -> ProxyProc {
        let dir = h.state_dir();
        let config = dir.join("pgtenant.toml");
        std::fs::write(&config, h.text()).unwrap();
        ProxyProc {
            child: None,
            config,
            log: dir.join("proxy.log"),
            socket: dir.join("admin.sock"),
            port,
        }
    }

    /// Starts the process (with `PGTENANT_FAILPOINTS=failpoints`) and waits until it accepts clients.
    fn start(&mut self, failpoints: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_pgtenant"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("PGTENANT_FAILPOINTS", failpoints)
            .env("RUST_LOG", "pgtenant=info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "proxy did not start:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no shutdown, no goodbye to anyone.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn url(&self, tenant: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=app.{tenant} dbname=app password={PASSWORD}",
            self.port
        )
    }

    async fn admin(&self, req: Value) -> Value {
        common::admin_line(&self.socket, &req).await
    }

    async fn admin_ok(&self, req: Value) -> Value {
        let r = self.admin(req.clone()).await;
        assert_eq!(r["ok"], json!(true), "{req} -> {r}\n{}", self.log_text());
        r["result"].clone()
    }

    async fn status(&self) -> Value {
        self.admin_ok(json!({"cmd": "migrate.status", "tenant": "acme"}))
            .await
    }

    /// Waits until the migration's state is `state` (and, for dual_write, its first verification passed).
    async fn wait_state(&self, state: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let s = self.status().await;
            let verified = state != "dual_write" || s["verification"]["passed"] == json!(true);
            if s["state"] == json!(state) && verified {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "not {state}: {s:#}\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_lag_zero(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.status().await["lag_events"] != json!(0) {
            assert!(Instant::now() < deadline, "lag did not drain");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn start_migration(&self) {
        self.admin_ok(
            json!({"cmd": "migrate.start", "tenant": "acme", "to": "dedicated", "verify": "hash"}),
        )
        .await;
    }

    /// Starts acme's move and waits until it is in dual_write.
    async fn start_to_dual_write(&self) {
        self.start_migration().await;
        self.wait_state("dual_write", Duration::from_secs(60)).await;
    }

    /// Waits for the tee to catch up, verifies, and cuts acme over.
    async fn verify_and_cut_over(&self) {
        self.wait_lag_zero().await;
        self.admin_ok(json!({"cmd": "migrate.verify", "tenant": "acme"}))
            .await;
        self.admin_ok(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
            .await;
    }
}

impl Drop for ProxyProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A client inserting numbered rows into a tenant's ledger, one per commit, reconnecting after errors. It
/// remembers which numbers were acknowledged, which were in flight when something failed (their fate is
/// unknown to the client), the errors it saw and its slowest commit.
#[derive(Clone, Default)]
struct Seen {
    acked: Vec<i64>,
    uncertain: Vec<i64>,
    errors: Vec<String>,
    slowest: Duration,
}

struct Writer {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

fn writer(url: String, setup: Option<&'static str>) -> Writer {
    writer_from(url, setup, 0)
}

/// A writer whose numbers start after `base` (so two writers can share a ledger).
fn writer_from(url: String, setup: Option<&'static str>, base: i64) -> Writer {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let (s, st) = (seen.clone(), stop.clone());
    let task = tokio::spawn(async move {
        let mut client: Option<tokio_postgres::Client> = None;
        let mut n = base;
        while !st.load(Ordering::Relaxed) {
            let c = match &client {
                Some(c) => c,
                None => match connect(&url).await {
                    Ok(c) => {
                        if let Some(sql) = setup {
                            let _ = c.batch_execute(sql).await;
                        }
                        client.insert(c)
                    }
                    Err(e) => {
                        s.lock().unwrap().errors.push(error_name(&e));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            n += 1;
            let started = Instant::now();
            match c
                .batch_execute(&format!("INSERT INTO ledger (n) VALUES ({n})"))
                .await
            {
                Ok(()) => {
                    let mut g = s.lock().unwrap();
                    g.acked.push(n);
                    g.slowest = g.slowest.max(started.elapsed());
                }
                Err(e) => {
                    let mut g = s.lock().unwrap();
                    g.uncertain.push(n);
                    g.errors.push(error_name(&e));
                    client = None;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    Writer { seen, stop, task }
}

impl Writer {
    async fn stop(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        let s = self.seen.lock().unwrap().clone();
        s
    }

    fn acked(&self) -> usize {
        self.seen.lock().unwrap().acked.len()
    }
}

/// A SQLSTATE, or "closed" for a connection that went away without one.
fn error_name(e: &tokio_postgres::Error) -> String {
    match e.code() {
        Some(c) => c.code().to_string(),
        None => "closed".into(),
    }
}

/// pgbench (TPC-B) on acme in short runs, again and again until stopped: a run that fails (the proxy was
/// killed) is followed by the next.
struct Bench {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(usize, usize)>,
}

fn bench(url: String) -> Bench {
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let thread = std::thread::spawn(move || {
        let (mut ok, mut failed) = (0, 0);
        while !st.load(Ordering::Relaxed) {
            let out = Command::new("pgbench")
                .args(["-n", "-c", "4", "-j", "2", "-T", "2", "-M", "prepared"])
                .arg(&url)
                .env("PGPASSWORD", PASSWORD)
                .output()
                .unwrap();
            if out.status.success() {
                ok += 1;
            } else {
                failed += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        (ok, failed)
    });
    Bench { stop, thread }
}

impl Bench {
    fn stop(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Every acknowledged number is in the ledger exactly once; nothing is there that was not sent.
fn check_ledger(pg: &PgCluster, schema: &str, seen: &Seen) {
    let text = pg.psql("app", &format!("SELECT n FROM {schema}.ledger ORDER BY n"));
    let rows: Vec<i64> = text
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.parse().unwrap())
        .collect();
    let mut distinct = rows.clone();
    distinct.dedup();
    assert_eq!(rows.len(), distinct.len(), "{schema}: duplicated rows");
    for n in &seen.acked {
        assert!(
            rows.binary_search(n).is_ok(),
            "{schema}: acknowledged row {n} lost"
        );
    }
    for n in &rows {
        assert!(
            seen.acked.contains(n) || seen.uncertain.contains(n),
            "{schema}: row {n} was never written"
        );
    }
    assert!(!seen.acked.is_empty(), "{schema}: nothing was written");
}

/// pgbench's invariant: branches, tellers, accounts and history agree on the total.
fn check_invariant(pg: &PgCluster) {
    let sums = pg.psql(
        "app",
        "SELECT (SELECT sum(abalance) FROM tenant_acme.pgbench_accounts) || ',' || (SELECT sum(bbalance) FROM tenant_acme.pgbench_branches)
             || ',' || (SELECT sum(tbalance) FROM tenant_acme.pgbench_tellers) || ',' || (SELECT coalesce(sum(delta), 0) FROM tenant_acme.pgbench_history)",
    );
    let parts: Vec<&str> = sums.split(',').collect();
    assert!(
        parts.iter().all(|p| *p == parts[0]),
        "balance invariant broken: {sums}"
    );
}

/// Per table of acme: row count and a digest of all rows.
fn fingerprint(pg: &PgCluster) -> String {
    pg.psql(
        "app",
        "SELECT string_agg(relname || ':' || n || ':' || h, ' ' ORDER BY relname) FROM (
           SELECT c.relname, (xpath('/row/n/text()', query_to_xml(format('SELECT count(*) AS n FROM tenant_acme.%I', c.relname), false, true, '')))[1]::text AS n,
                  (xpath('/row/h/text()', query_to_xml(format('SELECT md5(string_agg(x::text, '','' ORDER BY x::text)) AS h FROM tenant_acme.%I x', c.relname), false, true, '')))[1]::text AS h
             FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace
            WHERE s.nspname = 'tenant_acme' AND c.relkind = 'r') f",
    )
}

/// The load of every scenario: pgbench and a ledger writer on acme, a ledger writer on beta.
struct Load {
    bench: Bench,
    acme: Writer,
    beta: Writer,
}

fn load(p: &ProxyProc) -> Load {
    Load {
        bench: bench(p.url("acme")),
        acme: writer(p.url("acme"), None),
        beta: writer(p.url("beta"), None),
    }
}

impl Load {
    /// Stops everything; returns what acme's and beta's writers saw.
    async fn stop(self) -> (Seen, Seen) {
        let (runs, _) = self.bench.stop();
        assert!(runs > 0, "pgbench never completed a run");
        (self.acme.stop().await, self.beta.stop().await)
    }
}

/// After the load: nothing acknowledged lost or duplicated on `live` (where acme lives now), both sides equal
/// (the tee keeps them in step), the invariant holds, and beta never moved and lost nothing.
async fn settle(env: &Env, load: Load, live: &PgCluster) -> (Seen, Seen) {
    settle_with(env, load, live, Seen::default()).await
}

/// Like [`settle`], with `also`'s rows (another writer's) in acme's ledger too.
async fn settle_with(env: &Env, load: Load, live: &PgCluster, also: Seen) -> (Seen, Seen) {
    let (mut acme, beta) = load.stop().await;
    acme.acked.extend(&also.acked);
    acme.acked.sort();
    acme.uncertain.extend(&also.uncertain);
    env.proxy.wait_lag_zero().await;
    check_ledger(live, "tenant_acme", &acme);
    check_invariant(live);
    assert_eq!(fingerprint(&env.shared), fingerprint(&env.dedicated));
    check_ledger(&env.shared, "tenant_beta", &beta);
    (acme, beta)
}

async fn until_acked(w: &Writer, more: usize) {
    let target = w.acked() + more;
    let deadline = Instant::now() + Duration::from_secs(20);
    while w.acked() < target {
        assert!(Instant::now() < deadline, "writes stopped going through");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_bulk_copy_resumes_by_itself() {
    let mut env = env().await;
    env.proxy.kill9();
    env.proxy.start("copy.after_table=hang");
    let load = load(&env.proxy);
    env.proxy.start_migration().await;
    env.proxy
        .wait_state("bulk_copy", Duration::from_secs(20))
        .await;
    until_acked(&load.acme, 20).await;
    env.proxy.kill9();
    env.proxy.start("");
    env.proxy
        .wait_state("dual_write", Duration::from_secs(60))
        .await;
    until_acked(&load.acme, 20).await;
    env.proxy
        .admin_ok(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
        .await;
    until_acked(&load.acme, 20).await;
    let (acme, beta) = settle(&env, load, &env.dedicated).await;
    // Clients saw the proxy go away, and nothing else.
    assert!(
        acme.errors.iter().all(|e| e == "closed"),
        "{:?}",
        acme.errors
    );
    assert!(
        beta.errors.iter().all(|e| e == "closed"),
        "{:?}",
        beta.errors
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_dual_write_applies_the_backlog_after_restart() {
    let mut env = env().await;
    let load = load(&env.proxy);
    env.proxy.start_to_dual_write().await;
    until_acked(&load.acme, 30).await;
    env.proxy.kill9();
    // Writes made on the source while no proxy runs (an administrator's) reach the target too.
    env.shared
        .psql("app", "INSERT INTO tenant_acme.ledger (n) VALUES (-1)");
    env.proxy.start("");
    until_acked(&load.acme, 30).await;
    env.proxy.wait_lag_zero().await;
    assert_eq!(
        env.dedicated.psql(
            "app",
            "SELECT count(*) FROM tenant_acme.ledger WHERE n = -1"
        ),
        "1"
    );
    env.proxy
        .admin_ok(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
        .await;
    until_acked(&load.acme, 20).await;
    let mut acme_seen = load.acme.seen.lock().unwrap().clone();
    acme_seen.uncertain.push(-1);
    *load.acme.seen.lock().unwrap() = acme_seen;
    settle(&env, load, &env.dedicated).await;
}

/// A move in dual_write under load, the proxy restarted with `failpoint` set, and a cutover started in the
/// background (it hangs at the failpoint).
async fn cutover_stuck_at(
    failpoint: &str,
) -> (Env, Load, tokio::task::JoinHandle<Result<Value, String>>) {
    let mut env = env().await;
    let load = load(&env.proxy);
    env.proxy.start_to_dual_write().await;
    env.proxy.kill9();
    env.proxy.start(failpoint);
    env.proxy
        .wait_state("dual_write", Duration::from_secs(30))
        .await;
    let socket = env.proxy.socket.clone();
    let cutover = tokio::spawn(async move {
        try_admin_line(
            &socket,
            &json!({"cmd": "migrate.cutover", "tenant": "acme"}),
        )
        .await
    });
    (env, load, cutover)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_inside_cutover_before_the_swap_falls_back_to_the_source() {
    let (mut env, load, cutover) = cutover_stuck_at("cutover.before_swap=hang").await;
    env.proxy
        .wait_state("cutover_paused", Duration::from_secs(10))
        .await;
    // The fence is not up before the swap: the source still takes the tenant's (held) writes afterwards.
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.proxy.kill9();
    let _ = cutover.await;
    env.proxy.start("");
    env.proxy
        .wait_state("dual_write", Duration::from_secs(30))
        .await;
    until_acked(&load.acme, 30).await;
    assert_eq!(
        env.shared
            .psql("app", "SELECT count(*) FROM pgtenant.fenced"),
        "0"
    );
    let (acme, _) = settle(&env, load, &env.shared).await;
    assert!(
        acme.errors.iter().all(|e| e == "closed"),
        "{:?}",
        acme.errors
    );
    // And the move goes on from there.
    let r = env
        .proxy
        .admin_ok(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
        .await;
    assert_eq!(r["state"], "migrated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_inside_cutover_after_the_swap_completes_it() {
    let (mut env, load, cutover) = cutover_stuck_at("cutover.after_swap=hang").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = env
            .proxy
            .admin_ok(json!({"cmd": "tenant.get", "tenant": "acme"}))
            .await;
        if t["route"]["backend"] == "dedicated" {
            break;
        }
        if cutover.is_finished() || Instant::now() >= deadline {
            panic!("{t}\n{:?}\n{}", cutover.await, env.proxy.log_text());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.proxy.kill9();
    let _ = cutover.await;
    env.proxy.start("");
    env.proxy
        .wait_state("migrated", Duration::from_secs(30))
        .await;
    until_acked(&load.acme, 30).await;
    // The source is fenced: a direct write there fails.
    let direct = connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=app",
        env.shared.port
    ))
    .await
    .unwrap();
    let e = direct
        .batch_execute("INSERT INTO tenant_acme.ledger (n) VALUES (-5)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "55000", "{}", message(&e));
    settle(&env, load, &env.dedicated).await;
}

/// A rollback under the load, then every acknowledged row of both tenants on the source, once, and pgbench's
/// invariant there.
async fn roll_back_and_check(env: &Env, load: Load) {
    let r = env
        .proxy
        .admin_ok(json!({"cmd": "migrate.rollback", "tenant": "acme"}))
        .await;
    assert_eq!(r["state"], "rolled_back");
    until_acked(&load.acme, 30).await;
    let (acme, beta) = load.stop().await;
    check_ledger(&env.shared, "tenant_acme", &acme);
    check_invariant(&env.shared);
    check_ledger(&env.shared, "tenant_beta", &beta);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_after_migrated_keeps_route_reverse_tee_and_rollback() {
    let mut env = env().await;
    let load = load(&env.proxy);
    env.proxy.start_to_dual_write().await;
    env.proxy
        .admin_ok(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
        .await;
    until_acked(&load.acme, 30).await;
    env.proxy.kill9();
    env.proxy.start("");
    env.proxy
        .wait_state("migrated", Duration::from_secs(20))
        .await;
    until_acked(&load.acme, 30).await;
    env.proxy.wait_lag_zero().await;
    roll_back_and_check(&env, load).await;
    // The target's copy is fenced now.
    let e = connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=app",
        env.dedicated.port
    ))
    .await
    .unwrap()
    .batch_execute("DELETE FROM tenant_acme.ledger")
    .await
    .unwrap_err();
    assert_eq!(code(&e), "55000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_stopped_during_dual_write_delays_commits_but_loses_nothing() {
    let env = env().await;
    let load = load(&env.proxy);
    env.proxy.start_to_dual_write().await;
    until_acked(&load.acme, 20).await;
    env.dedicated.stop();
    let before = load.acme.acked();
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Commits went on, each held at most about tee_timeout_ms (1 s here).
    assert!(
        load.acme.acked() > before,
        "commits stopped while the target was down"
    );
    env.dedicated.restart();
    until_acked(&load.acme, 20).await;
    env.proxy.verify_and_cut_over().await;
    until_acked(&load.acme, 20).await;
    let (acme, beta) = settle(&env, load, &env.dedicated).await;
    assert!(acme.errors.is_empty(), "clients saw {:?}", acme.errors);
    assert!(beta.errors.is_empty(), "beta saw {:?}", beta.errors);
    assert!(
        acme.slowest < Duration::from_millis(2500),
        "slowest commit {:?}",
        acme.slowest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_stopped_during_dual_write_fails_sessions_and_the_move_recovers() {
    let env = env().await;
    let load = load(&env.proxy);
    env.proxy.start_to_dual_write().await;
    until_acked(&load.acme, 20).await;
    env.shared.stop();
    tokio::time::sleep(Duration::from_secs(5)).await;
    env.shared.restart();
    until_acked(&load.acme, 30).await;
    until_acked(&load.beta, 30).await;
    // The migration picks up where it was (retrying with backoff while the source was gone).
    env.proxy
        .admin(json!({"cmd": "migrate.resume", "tenant": "acme"}))
        .await;
    env.proxy
        .wait_state("dual_write", Duration::from_secs(30))
        .await;
    env.proxy.verify_and_cut_over().await;
    until_acked(&load.acme, 20).await;
    let (acme, beta) = settle(&env, load, &env.dedicated).await;
    // Sessions on the stopped server were ended (57P01 from the server, or 08006 from the proxy).
    assert!(!acme.errors.is_empty() && !beta.errors.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_transaction_at_cutover_makes_it_fall_back_and_then_commits() {
    let env = env().await;
    let load = load(&env.proxy);
    env.proxy.start_to_dual_write().await;
    let long = connect(&env.proxy.url("acme")).await.unwrap();
    long.batch_execute("BEGIN; INSERT INTO ledger (n) VALUES (-7)")
        .await
        .unwrap();
    let started = Instant::now();
    let r = env
        .proxy
        .admin(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
        .await;
    assert_eq!(r["ok"], json!(false), "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(env.proxy.status().await["state"], "dual_write");
    long.batch_execute("COMMIT").await.unwrap();
    until_acked(&load.acme, 20).await;
    env.proxy
        .admin_ok(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
        .await;
    until_acked(&load.acme, 20).await;
    load.acme.seen.lock().unwrap().acked.push(-7);
    let (acme, _) = settle(&env, load, &env.dedicated).await;
    assert!(acme.errors.is_empty(), "{:?}", acme.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_session_writing_across_the_cutover_loses_nothing() {
    let env = env().await;
    let load = load(&env.proxy);
    // This session holds state that cannot move (LISTEN) and keeps writing.
    let pinned = writer_from(env.proxy.url("acme"), Some("LISTEN somewhere"), 1_000_000);
    env.proxy.start_to_dual_write().await;
    until_acked(&pinned, 20).await;
    let r = env
        .proxy
        .admin_ok(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
        .await;
    assert!(r["pinned_sessions_ended"].as_u64().unwrap() >= 1, "{r}");
    // It was ended (57P01, with why), reconnected (and pinned itself again) on the target.
    until_acked(&pinned, 20).await;
    let seen = pinned.stop().await;
    assert!(
        seen.errors.iter().any(|e| e == "57P01" || e == "closed"),
        "{:?}",
        seen.errors
    );
    assert!(
        !seen.errors.iter().any(|e| e == "55000"),
        "{:?}",
        seen.errors
    );
    // Every row it saw acknowledged is on the target, once, with everyone else's.
    settle_with(&env, load, &env.dedicated, seen).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_switch_capture_off() {
    let env = env().await;
    let load = load(&env.proxy);
    env.proxy.start_to_dual_write().await;
    let c = connect(&env.proxy.url("acme")).await.unwrap();
    for sql in [
        "SET session_replication_role = replica",
        "SELECT set_config('session_replication_role', 'replica', false)",
        "SET pgtenant.apply_key = 'guess'",
        "DO $$ BEGIN EXECUTE 'SET session_replication_role = replica'; END $$",
        "ALTER TABLE ledger DISABLE TRIGGER ALL",
    ] {
        let e = c.batch_execute(sql).await.unwrap_err();
        assert!(
            ["42501", "55000"].contains(&code(&e).as_str()),
            "{sql}: {} {}",
            code(&e),
            message(&e)
        );
    }
    // In the startup options too.
    let opts = format!(
        "{} options='-c session_replication_role=replica'",
        env.proxy.url("acme")
    );
    assert_eq!(code(&connect(&opts).await.unwrap_err()), "42501");
    c.batch_execute("INSERT INTO ledger (n) VALUES (-9)")
        .await
        .unwrap();
    env.proxy.wait_lag_zero().await;
    assert_eq!(
        env.dedicated.psql(
            "app",
            "SELECT count(*) FROM tenant_acme.ledger WHERE n = -9"
        ),
        "1"
    );
    load.acme.seen.lock().unwrap().acked.push(-9);
    env.proxy
        .admin_ok(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
        .await;
    settle(&env, load, &env.dedicated).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_holds_even_for_a_superuser_serving_role() {
    // The configuration this project started with: every tenant runs as the superuser.
    let env = env_as("", false, true).await;
    let load = load(&env.proxy);
    env.proxy.start_to_dual_write().await;
    let c = connect(&env.proxy.url("acme")).await.unwrap();
    // The proxy refuses the setting where it can see it...
    let e = c
        .batch_execute("SET session_replication_role = replica")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42501", "{}", message(&e));
    let opts = format!(
        "{} options='-c session_replication_role=replica'",
        env.proxy.url("acme")
    );
    assert_eq!(code(&connect(&opts).await.unwrap_err()), "42501");
    // ...and where it cannot (code run by a superuser), the triggers fire anyway.
    c.batch_execute(
        "DO $$ BEGIN EXECUTE 'SET session_replication_role = replica'; END $$; INSERT INTO ledger (n) VALUES (-11)",
    )
    .await
    .unwrap();
    assert_eq!(
        one_value(&c, "SHOW session_replication_role").await,
        "replica"
    );
    c.batch_execute("INSERT INTO ledger (n) VALUES (-12); RESET session_replication_role")
        .await
        .unwrap();
    env.proxy.wait_lag_zero().await;
    assert_eq!(
        env.dedicated.psql(
            "app",
            "SELECT string_agg(n::text, ',' ORDER BY n) FROM tenant_acme.ledger WHERE n < 0"
        ),
        "-12,-11"
    );
    load.acme.seen.lock().unwrap().acked.extend([-11, -12]);
    env.proxy
        .admin_ok(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
        .await;
    settle(&env, load, &env.dedicated).await;
}

async fn one_value(c: &tokio_postgres::Client, sql: &str) -> String {
    c.simple_query(sql)
        .await
        .unwrap()
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_default()
}

/// A TCP forwarder that can stop forwarding (a blackholed network: connections stay open, nothing arrives).
struct Forwarder {
    port: u16,
    blackhole: Arc<AtomicBool>,
}

async fn forwarder(to: u16) -> Forwarder {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let blackhole = Arc::new(AtomicBool::new(false));
    let bh = blackhole.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, bh.clone()));
            tokio::spawn(pump(sr, cw, bh.clone()));
        }
    });
    Forwarder { port, blackhole }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    blackhole: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16384];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while blackhole.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_target_during_a_tee_pass_holds_commits_only_to_the_timeout() {
    // The proxy reaches the target through a forwarder the test can blackhole.
    let env = env_with("", true).await;
    let fwd = env.forwarder.as_ref().unwrap();
    let load = load(&env.proxy);
    env.proxy.start_to_dual_write().await;
    until_acked(&load.acme, 20).await;
    fwd.blackhole.store(true, Ordering::Relaxed);
    let before = load.acme.acked();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        load.acme.acked() > before,
        "commits stopped while the target was unreachable"
    );
    fwd.blackhole.store(false, Ordering::Relaxed);
    until_acked(&load.acme, 20).await;
    env.proxy.verify_and_cut_over().await;
    until_acked(&load.acme, 20).await;
    let (acme, _) = settle(&env, load, &env.dedicated).await;
    assert!(acme.errors.is_empty(), "{:?}", acme.errors);
    assert!(
        acme.slowest < Duration::from_millis(2500),
        "slowest commit {:?}",
        acme.slowest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_schema_change_is_applied_on_both_sides_in_order() {
    let env = env().await;
    let load = load(&env.proxy);
    env.proxy.start_to_dual_write().await;
    until_acked(&load.acme, 20).await;
    // The tenant's own DDL is refused during the move...
    let c = connect(&env.proxy.url("acme")).await.unwrap();
    let e = c
        .batch_execute("ALTER TABLE pgbench_history ADD COLUMN note text")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "55000", "{}", message(&e));
    // ...an operator applies it on both sides, under load, with the tenant held briefly.
    let r = env
        .proxy
        .admin_ok(json!({"cmd": "migrate.ddl", "tenant": "acme",
            "sql": "ALTER TABLE ledger ADD COLUMN note text DEFAULT 'n'; CREATE TABLE extra (id int PRIMARY KEY, v text)"}))
        .await;
    assert!(r["held_ms"].as_f64().unwrap() < 2000.0, "{r}");
    assert!(r["tables"].to_string().contains("extra"), "{r}");
    c.batch_execute(
        "INSERT INTO extra VALUES (1, 'one'); UPDATE ledger SET note = 'seen' WHERE n = 1",
    )
    .await
    .unwrap();
    until_acked(&load.acme, 20).await;
    env.proxy.wait_lag_zero().await;
    assert_eq!(
        env.dedicated.psql("app", "SELECT v FROM tenant_acme.extra"),
        "one"
    );
    let v = env
        .proxy
        .admin_ok(json!({"cmd": "migrate.verify", "tenant": "acme", "level": "full"}))
        .await;
    assert_eq!(v["passed"], true, "{v}");
    // A statement the target refuses after the source took it pauses the move and says so.
    env.dedicated
        .psql("app", "CREATE TABLE tenant_acme.clash (x int)");
    let e = env
        .proxy
        .admin(json!({"cmd": "migrate.ddl", "tenant": "acme", "sql": "CREATE TABLE clash (x int)"}))
        .await;
    assert_eq!(e["error"]["code"], "ddl_partial", "{e}");
    assert_eq!(env.proxy.status().await["paused"], true);
    // An operator puts it right (the clash goes, the source's new table is made on the target) and resumes.
    env.dedicated.psql(
        "app",
        "DROP TABLE tenant_acme.clash; CREATE TABLE tenant_acme.clash (x int)",
    );
    env.proxy
        .admin_ok(json!({"cmd": "migrate.resume", "tenant": "acme"}))
        .await;
    env.proxy
        .admin_ok(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
        .await;
    until_acked(&load.acme, 20).await;
    settle(&env, load, &env.dedicated).await;
}

/// kill -9 inside a rollback after the target was fenced and the source opened, before the route went back: the
/// tenant's route is still the target, so the restarted proxy opens the target again and fences the source
/// (without that, every write of the tenant was refused), the load goes on there, and the next rollback
/// completes with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_inside_rollback_before_its_swap_leaves_the_tenant_writable() {
    let mut env = env().await;
    let load = load(&env.proxy);
    env.proxy.start_to_dual_write().await;
    env.proxy.kill9();
    env.proxy.start("rollback.after_fence=hang");
    env.proxy
        .wait_state("dual_write", Duration::from_secs(30))
        .await;
    env.proxy.wait_lag_zero().await;
    env.proxy
        .admin_ok(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
        .await;
    until_acked(&load.acme, 30).await;
    env.proxy.wait_lag_zero().await;
    let socket = env.proxy.socket.clone();
    let rollback = tokio::spawn(async move {
        try_admin_line(
            &socket,
            &json!({"cmd": "migrate.rollback", "tenant": "acme"}),
        )
        .await
    });
    let fenced = |pg: &PgCluster| {
        pg.psql(
            "app",
            "SELECT count(*) FROM pgtenant.fenced WHERE tenant = 'acme'",
        )
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while fenced(&env.dedicated) != "1" || fenced(&env.shared) != "0" {
        assert!(
            Instant::now() < deadline,
            "the rollback never fenced the target"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.proxy.kill9();
    let _ = rollback.await;
    env.proxy.start("");
    env.proxy
        .wait_state("migrated", Duration::from_secs(20))
        .await;
    until_acked(&load.acme, 30).await;
    assert_eq!(
        (fenced(&env.dedicated), fenced(&env.shared)),
        ("0".into(), "1".into())
    );
    env.proxy.wait_lag_zero().await;
    roll_back_and_check(&env, load).await;
}
