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

/// Whether `p` routes acme to `shared` within 2 s.
async fn routes_home(p: &TestProxy) -> bool {
    for _ in 0..100 {
        if backend_of(p, "acme").await == json!("shared") {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// An instance of the control plane at `cp` with the two backends, tenants acme and beta, and a migration setup.
fn member(
    cp: &PgCluster,
    shared: &PgCluster,
    dedicated: &PgCluster,
    cutover_timeout_ms: u64,
) -> Harness {
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", cp.port);
    let backend = "database = \"app\"\nadmin_user = \"postgres\"";
    Harness::new()
        .top(&format!("control_plane = \"{url}\""))
        .raw(&format!(
            "[migration]\npg_dump = \"{}\"\ncutover_timeout_ms = {cutover_timeout_ms}",
            pg_bin("pg_dump").display()
        ))
        .backend_with("shared", shared, backend)
        .backend_with("dedicated", dedicated, backend)
        .tenant("acme", "shared", None, Some("tenant_acme"))
        .tenant("beta", "shared", None, Some("tenant_beta"))
}

/// Runs the instance of `h` as a process of its own (so it can be frozen or killed); its admin socket is in its
/// state directory.
/// An instance running as a process of its own, killed when dropped (a failed assertion must not leave it
/// running, holding the test's output open).
struct Member(std::process::Child);

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_member(h: &Harness) -> Member {
    spawn_member_with(h, "")
}

/// [`spawn_member`] with `PGTENANT_FAILPOINTS=failpoints`.
fn spawn_member_with(h: &Harness, failpoints: &str) -> Member {
    let port = free_port();
    let text = toml::to_string(&h.config())
        .unwrap()
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let config = h.state_dir().join("pgtenant.toml");
    std::fs::write(&config, text).unwrap();
    Member(
        std::process::Command::new(env!("CARGO_BIN_EXE_pgtenant"))
            .args(["serve", "--config", config.to_str().unwrap()])
            .env("PGTENANT_FAILPOINTS", failpoints)
            .spawn()
            .unwrap(),
    )
}

/// Kills the instance's process (`kill -9`) and reaps it.
fn kill9(child: &mut Member) {
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let _ = child.0.wait();
}

/// Waits (up to 10 s) until `p` lists `n` live instances.
async fn wait_members(p: &TestProxy, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let l = p.admin_ok(json!({"cmd": "instances"})).await;
        let alive = l["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["alive"] == json!(true))
            .count();
        if alive >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {alive} of {n} instances joined: {l}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
    // Every instance's audit entries reach the shared audit table.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let audited = cp.psql(
            "postgres",
            "SELECT count(*) || ' ' || count(DISTINCT instance) FROM pgtenant_cp.audit WHERE command = 'tenant.set'",
        );
        if audited == "20 3" {
            break;
        }
        assert!(Instant::now() < deadline, "shared audit: {audited}");
        tokio::time::sleep(Duration::from_millis(200)).await;
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

/// A move under pgbench through all three instances: the cutover holds the tenant on every instance (each
/// acknowledges in the store how long it held), nothing fails, and both sides end equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cutover_holds_the_tenant_on_every_instance() {
    use std::process::{Command, Stdio};
    let (cp, shared, dedicated) = (PgCluster::start(), PgCluster::start(), PgCluster::start());
    shared.tenant_schemas("app", &["tenant_acme", "tenant_beta"]);
    let mut proxies = Vec::new();
    for _ in 0..3 {
        proxies.push(member(&cp, &shared, &dedicated, 3000).start().await);
    }
    let init = Command::new("pgbench")
        .args(["-i", "-s", "1", "-q", &proxies[0].url("app.acme", "app")])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let benches: Vec<_> = proxies
        .iter()
        .map(|p| {
            Command::new("pgbench")
                .args(["-c", "2", "-T", "12", "-n", &p.url("app.acme", "app")])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let coordinator = &proxies[0];
    coordinator
        .admin_ok(
            json!({"cmd": "migrate.start", "tenant": "acme", "to": "dedicated", "verify": "hash"}),
        )
        .await;
    common::moves::wait_state(coordinator, "acme", "dual_write", Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Another instance refuses to change the route of the tenant being moved.
    let refused = proxies[1]
        .admin_err(json!({"cmd": "tenant.set", "tenant": "acme", "backend": "dedicated", "schema": "tenant_acme"}))
        .await;
    assert_eq!(refused, "invalid_state");
    let cut = coordinator
        .admin_ok(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
        .await;
    let pause = cut["pause_ms"].as_f64().unwrap();
    for b in benches {
        let out = tokio::task::spawn_blocking(move || b.wait_with_output().unwrap())
            .await
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            report.contains("number of failed transactions: 0 "),
            "{report}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every instance follows the move and held the tenant for the barrier.
    for p in &proxies {
        assert_eq!(backend_of(p, "acme").await, json!("dedicated"));
    }
    let held = cp.psql(
        "postgres",
        "SELECT count(*) || ' ' || coalesce(max(held_ms), 0)::int FROM pgtenant_cp.barrier_acks WHERE state = 'opened'",
    );
    let mut parts = held.split(' ');
    let (n, max_held): (u32, u32) = (
        parts.next().unwrap().parse().unwrap(),
        parts.next().unwrap().parse().unwrap(),
    );
    assert_eq!(n, 2, "both other instances held and opened: {held}");
    // A debug build with three pgbench runs and three proxies on two cores: typically 30-60 ms, once 102 ms
    // here; the release figures (14-23 ms) are in BENCHMARKS.md. The bound catches a barrier that waits for a
    // timeout or a lost notification (seconds), not scheduling noise.
    assert!(
        max_held < 500 && pause < 500.0,
        "pause {pause:.1} ms, held at most {max_held} ms"
    );
    coordinator
        .admin_ok(json!({"cmd": "migrate.verify", "tenant": "acme", "level": "full"}))
        .await;
    let digest = |pg: &PgCluster| {
        pg.psql(
            "app",
            "SELECT (SELECT count(*) FROM tenant_acme.pgbench_history) || ':' || (SELECT sum(abalance) FROM tenant_acme.pgbench_accounts) || ':' || (SELECT sum(delta) FROM tenant_acme.pgbench_history)",
        )
    };
    let (src, dst) = (digest(&shared), digest(&dedicated));
    assert_eq!(src, dst);
    let parts: Vec<&str> = dst.split(':').collect();
    assert_eq!(parts[1], parts[2], "pgbench's invariant");
    eprintln!("three-instance cutover: coordinator pause {pause:.1} ms, other instances held at most {max_held} ms");
    // A rollback holds every instance the same way and brings them all back to the source.
    let back = coordinator
        .admin_ok(json!({"cmd": "migrate.rollback", "tenant": "acme"}))
        .await;
    assert!(back["pause_ms"].as_f64().unwrap() < 500.0, "{back}");
    for p in &proxies {
        assert!(
            routes_home(p).await,
            "an instance still routes acme to the target after the rollback"
        );
    }
    let opened = cp.psql(
        "postgres",
        "SELECT count(*) FROM pgtenant_cp.barrier_acks WHERE state = 'opened'",
    );
    assert_eq!(opened, "4", "both barriers held by both other instances");
}

/// One instance frozen (SIGSTOP) during a cutover: it cannot hold the tenant, so the attempt falls back within
/// the cutover timeout and the move stays in dual_write; after SIGCONT the next cutover succeeds, and the
/// frozen instance follows the move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_instance_makes_the_cutover_fall_back_until_it_thaws() {
    use std::process::Command;
    let (cp, shared, dedicated) = (PgCluster::start(), PgCluster::start(), PgCluster::start());
    common::moves::small_schema(&shared);
    let harness = || member(&cp, &shared, &dedicated, 2000);
    let coordinator = harness().start().await;
    // The other instance is a process of its own, so it can be frozen.
    let other = harness();
    let mut child = spawn_member(&other);
    wait_members(&coordinator, 2).await;
    coordinator
        .admin_ok(json!({"cmd": "migrate.start", "tenant": "acme", "to": "dedicated"}))
        .await;
    common::moves::wait_state(&coordinator, "acme", "dual_write", Duration::from_secs(30)).await;
    common::moves::wait_lag_zero(&coordinator, "acme").await;
    let signal = |sig: &str| {
        assert!(Command::new("kill")
            .args([sig, &child.0.id().to_string()])
            .status()
            .unwrap()
            .success())
    };
    signal("-STOP");
    let started = Instant::now();
    let refused = coordinator
        .admin_err(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
        .await;
    let took = started.elapsed();
    assert_eq!(refused, "cutover_failed");
    assert!(took < Duration::from_secs(4), "fell back after {took:?}");
    let s = coordinator
        .admin_ok(json!({"cmd": "migrate.status", "tenant": "acme"}))
        .await;
    assert_eq!(s["state"], json!("dual_write"), "{s}");
    assert_eq!(backend_of(&coordinator, "acme").await, json!("shared"));
    signal("-CONT");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cut = coordinator
        .admin_ok(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
        .await;
    common::held_briefly(cut["pause_ms"].as_f64().unwrap(), &cut);
    let socket = other.state_dir().join("admin.sock");
    let mut followed = false;
    for _ in 0..50 {
        let r = admin_line(&socket, &json!({"cmd": "tenant.get", "tenant": "acme"})).await;
        if r["result"]["route"]["backend"] == json!("dedicated") {
            followed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    signal("-KILL");
    let _ = child.0.wait();
    assert!(followed, "the thawed instance did not follow the move");
    eprintln!(
        "frozen instance: cutover fell back after {took:?}; after SIGCONT the pause was {} ms",
        cut["pause_ms"]
    );
}

/// A move of acme coordinated by an instance running as a process of its own (so it can be frozen or killed),
/// in dual_write, and two more instances; returns its harness (which keeps its state directory: dropped after
/// the process), the process and the two others.
async fn move_on_a_process(
    cp: &PgCluster,
    shared: &PgCluster,
    dedicated: &PgCluster,
) -> (Harness, Member, [TestProxy; 2]) {
    move_on_a_process_with(cp, shared, dedicated, "").await
}

/// [`move_on_a_process`] with the coordinator's `PGTENANT_FAILPOINTS`.
async fn move_on_a_process_with(
    cp: &PgCluster,
    shared: &PgCluster,
    dedicated: &PgCluster,
    failpoints: &str,
) -> (Harness, Member, [TestProxy; 2]) {
    common::moves::small_schema(shared);
    let harness = || member(cp, shared, dedicated, 3000);
    let first = harness();
    let child = spawn_member_with(&first, failpoints);
    let socket = first.state_dir().join("admin.sock");
    let others = [harness().start().await, harness().start().await];
    wait_members(&others[0], 3).await;
    let started = admin_line(
        &socket,
        &json!({"cmd": "migrate.start", "tenant": "acme", "to": "dedicated", "verify": "hash"}),
    )
    .await;
    assert_eq!(started["ok"], json!(true), "{started}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = admin_line(&socket, &json!({"cmd": "migrate.status", "tenant": "acme"})).await;
        if s["result"]["state"] == json!("dual_write") {
            break;
        }
        assert!(Instant::now() < deadline, "{s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (first, child, others)
}

/// The instance of `others` that took the move of acme over (within 20 s of `since`).
async fn taker(others: &[TestProxy], since: Instant) -> &TestProxy {
    loop {
        for p in others {
            let s = p
                .admin(json!({"cmd": "migrate.status", "tenant": "acme"}))
                .await;
            if s["ok"] == json!(true) {
                return p;
            }
        }
        assert!(
            since.elapsed() < Duration::from_secs(20),
            "no instance took the move over"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// kill -9 of the instance coordinating a move in dual_write: another instance takes the move over when the
/// lease runs out, and the move completes with every write made through any instance on the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instance_takes_over_a_move_whose_coordinator_died() {
    let (cp, shared, dedicated) = (PgCluster::start(), PgCluster::start(), PgCluster::start());
    let (_first, mut child, others) = move_on_a_process(&cp, &shared, &dedicated).await;
    let write = |p: &TestProxy, from: i32| {
        let url = p.url("app.acme", "app");
        async move {
            let c = connect(&url).await.unwrap();
            c.execute(
                "INSERT INTO a (v) SELECT g FROM generate_series($1::int, $1::int + 99) g",
                &[&from],
            )
            .await
            .unwrap();
        }
    };
    write(&others[0], 100_000).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    kill9(&mut child);
    let killed = Instant::now();
    write(&others[1], 200_000).await;
    // One of the others takes the move over once the lease runs out.
    let taker = taker(&others, killed).await;
    let took = killed.elapsed();
    common::moves::wait_state(taker, "acme", "dual_write", Duration::from_secs(30)).await;
    common::moves::wait_lag_zero(taker, "acme").await;
    let cut = taker
        .admin_ok(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
        .await;
    common::held_briefly(cut["pause_ms"].as_f64().unwrap(), &cut);
    for p in &others {
        assert_eq!(backend_of(p, "acme").await, json!("dedicated"));
    }
    let rows = dedicated.psql(
        "app",
        "SELECT count(*) FROM tenant_acme.a WHERE v >= 100000",
    );
    assert_eq!(
        rows, "200",
        "writes through both surviving instances are on the target"
    );
    let v = taker
        .admin_ok(json!({"cmd": "migrate.verify", "tenant": "acme", "level": "full"}))
        .await;
    assert_eq!(v["passed"], json!(true), "{v}");
    taker
        .admin_ok(json!({"cmd": "migrate.finalize", "tenant": "acme"}))
        .await;
    eprintln!(
        "coordinator killed: move taken over after {took:?}, cutover pause {} ms",
        cut["pause_ms"]
    );
}

/// Waits until acme's apply claim on `target` was recorded with `generation`.
async fn apply_claimed(target: &PgCluster, generation: i64) {
    let sql =
        "SELECT generation FROM pgtenant.claim_generation WHERE lock LIKE 'pgtenant apply acme %'";
    let claimed = || target.psql("app", sql) == generation.to_string();
    assert!(
        common::eventually(Duration::from_secs(20), claimed).await,
        "apply claim {:?}, not {generation}",
        target.psql("app", sql)
    );
}

/// The target session holding the apply lock of acme's move (the applying link's), if any.
fn apply_lock_holder(dedicated: &PgCluster) -> String {
    dedicated.psql(
        "app",
        "SELECT string_agg(l.pid::text, ',') FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = 'pgtenant-migration' \
         AND NOT (l.classid = 0 AND l.objid = 7406721)",
    )
}

/// SIGSTOP of the instance coordinating a move in dual_write, until another instance took the move over, then
/// SIGCONT: the thawed instance stops its move, its tee included, so the two do not take the target's apply lock
/// from each other (each new link ends the session holding it); the taker's link keeps it, and the move
/// completes with every write on the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_that_thaws_after_a_takeover_leaves_the_tee_to_the_taker() {
    use std::process::Command;
    let (cp, shared, dedicated) = (PgCluster::start(), PgCluster::start(), PgCluster::start());
    let (_first, child, others) = move_on_a_process(&cp, &shared, &dedicated).await;
    let signal = |sig: &str| {
        assert!(Command::new("kill")
            .args([sig, &child.0.id().to_string()])
            .status()
            .unwrap()
            .success());
    };
    let generation = || {
        cp.psql(
            "postgres",
            "SELECT generation FROM pgtenant_cp.migrations WHERE tenant = 'acme'",
        )
        .parse::<i64>()
        .unwrap()
    };
    let first_generation = generation();
    // The applying link's claim carries its lease's generation (it claims on its own task, just after the
    // tee starts).
    apply_claimed(&dedicated, first_generation).await;
    signal("-STOP");
    let frozen = Instant::now();
    let taker = taker(&others, frozen).await;
    common::moves::wait_state(taker, "acme", "dual_write", Duration::from_secs(30)).await;
    common::moves::wait_lag_zero(taker, "acme").await;
    // The takeover drew a newer generation, which the taker's claim recorded on the target (what a claim of
    // the older generation meets there is tests/apply.rs's `a_claim_of_an_older_lease_generation_is_refused`).
    assert!(generation() > first_generation);
    apply_claimed(&dedicated, generation()).await;
    signal("-CONT");
    // The thawed instance finds its lease taken at its next renewal (each second).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let c = connect(&taker.url("app.acme", "app")).await.unwrap();
    let mut holder = String::new();
    for n in 0..20 {
        c.execute("INSERT INTO a (v) VALUES ($1)", &[&(300_000 + n)])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        if n == 0 {
            // The taker's link holds it now (it applied that write).
            holder = apply_lock_holder(&dedicated);
        }
    }
    assert!(!holder.is_empty() && !holder.contains(','), "{holder}");
    assert_eq!(
        apply_lock_holder(&dedicated),
        holder,
        "the apply lock changed hands after the thaw"
    );
    assert_eq!(
        dedicated.psql(
            "app",
            "SELECT count(*) FROM tenant_acme.a WHERE v >= 300000"
        ),
        "20",
        "each sync commit is on the target"
    );
    let cut = taker
        .admin_ok(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
        .await;
    common::held_briefly(cut["pause_ms"].as_f64().unwrap(), &cut);
    let v = taker
        .admin_ok(json!({"cmd": "migrate.verify", "tenant": "acme", "level": "full"}))
        .await;
    assert_eq!(v["passed"], json!(true), "{v}");
}

/// A move's lease is in the store when `migrate start` answers (not at the next renewal), a start that fails
/// leaves none, and a second instance asked to move the same tenant refuses: one coordinator per move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_has_one_coordinator_from_its_start() {
    let (cp, shared, dedicated) = (PgCluster::start(), PgCluster::start(), PgCluster::start());
    common::moves::small_schema(&shared);
    let a = member(&cp, &shared, &dedicated, 3000).start().await;
    let b = member(&cp, &shared, &dedicated, 3000).start().await;
    wait_members(&a, 2).await;
    let start = json!({"cmd": "migrate.start", "tenant": "acme", "to": "dedicated"});
    // A start refused after its lease was taken (the target schema exists) leaves no lease behind.
    dedicated.psql("app", "CREATE SCHEMA tenant_acme");
    assert_eq!(a.admin_err(start.clone()).await, "preflight_failed");
    assert_eq!(
        cp.psql(
            "postgres",
            "SELECT count(*) FROM pgtenant_cp.migrations WHERE tenant = 'acme'"
        ),
        "0"
    );
    dedicated.psql("app", "DROP SCHEMA tenant_acme");
    a.admin_ok(start.clone()).await;
    assert_eq!(
        cp.psql(
            "postgres",
            "SELECT count(*) FROM pgtenant_cp.migrations WHERE tenant = 'acme' AND lease_until > now()"
        ),
        "1",
        "the lease is taken before the start answers"
    );
    assert_eq!(b.admin_err(start).await, "invalid_state");
    common::moves::wait_state(&a, "acme", "dual_write", Duration::from_secs(30)).await;
    a.admin_ok(json!({"cmd": "migrate.abort", "tenant": "acme"}))
        .await;
}

/// One instance on the control plane, moving acme from `shared` to `dedicated`, in dual_write with no lag.
async fn one_member_moving(cp: &PgCluster, shared: &PgCluster, dedicated: &PgCluster) -> TestProxy {
    common::moves::small_schema(shared);
    let a = member(cp, shared, dedicated, 3000).start().await;
    a.admin_ok(json!({"cmd": "migrate.start", "tenant": "acme", "to": "dedicated"}))
        .await;
    common::moves::wait_state(&a, "acme", "dual_write", Duration::from_secs(30)).await;
    common::moves::wait_lag_zero(&a, "acme").await;
    a
}

/// A coordinator cut off from the control plane stops acting on its move once its lease is no longer confirmed
/// (another instance could take the move over when the lease runs out): its tee, whose applying session was
/// ended, does not connect again, so it cannot take the target back from a taker. Once the store answers and the
/// lease is renewed, the tee resumes and the write made meanwhile reaches the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_cut_off_from_the_store_stops_acting_on_its_move() {
    let (cp, shared, dedicated) = (PgCluster::start(), PgCluster::start(), PgCluster::start());
    let a = one_member_moving(&cp, &shared, &dedicated).await;
    assert!(!apply_lock_holder(&dedicated).is_empty());
    cp.stop();
    // Past the time a renewal is trusted (3 s), well inside the lease (5 s).
    tokio::time::sleep(Duration::from_secs(4)).await;
    dedicated.psql(
        "app",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pgtenant-migration'",
    );
    let c = connect(&a.url("app.acme", "app")).await.unwrap();
    c.execute("INSERT INTO a (v) VALUES (424242)", &[])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        apply_lock_holder(&dedicated),
        "",
        "the tee connected again without a confirmed lease"
    );
    // Commands that act on the move are refused too.
    let verify = json!({"cmd": "migrate.verify", "tenant": "acme"});
    assert_eq!(a.admin_err(verify.clone()).await, "invalid_state");
    cp.restart();
    common::moves::wait_lag_zero(&a, "acme").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while dedicated.psql("app", "SELECT count(*) FROM tenant_acme.a WHERE v = 424242") != "1" {
        assert!(
            Instant::now() < deadline,
            "the write never reached the target"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!apply_lock_holder(&dedicated).is_empty());
    let v = a.admin_ok(verify).await;
    assert_eq!(v["passed"], json!(true), "{v}");
}

/// The incarnation and generation of acme's lease in the store.
fn lease_of_acme(cp: &PgCluster) -> (String, i64) {
    let row = cp.psql(
        "postgres",
        "SELECT incarnation || ' ' || generation FROM pgtenant_cp.migrations WHERE tenant = 'acme'",
    );
    let (who, generation) = row.rsplit_once(' ').unwrap();
    (who.to_owned(), generation.parse().unwrap())
}

/// Waits until acme's lease is held by an incarnation other than `from`, under a generation other than
/// `generation`; returns the new generation.
async fn lease_taken_from(cp: &PgCluster, from: &str, generation: i64) -> i64 {
    let taken = || {
        let (who, g) = lease_of_acme(cp);
        who != from && g != generation
    };
    assert!(
        common::eventually(Duration::from_secs(20), taken).await,
        "the lease stayed {:?}",
        lease_of_acme(cp)
    );
    lease_of_acme(cp).1
}

/// A lease is held by a process, not only by an instance id: when the store shows the lease renewed by another
/// process of the same id (a replacement started under the same name while this one was frozen), this process's
/// next renewal fails and it stops its move; the move is then taken over under a new generation, and goes on.
/// Nor is another instance's expired lease on the unfinished move renewed over: it is taken over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_of_the_same_id_but_another_process_is_not_renewed() {
    let (cp, shared, dedicated) = (PgCluster::start(), PgCluster::start(), PgCluster::start());
    let a = one_member_moving(&cp, &shared, &dedicated).await;
    let first_generation = lease_of_acme(&cp).1;
    cp.psql(
        "postgres",
        "UPDATE pgtenant_cp.migrations SET incarnation = 'another process' WHERE tenant = 'acme'",
    );
    // The renewal fails, the move stops here, and once the lease ran out it is taken again (by this instance,
    // whose id it is: as after a restart) with a new incarnation and generation.
    let taken_again = lease_taken_from(&cp, "another process", first_generation).await;
    assert!(taken_again > first_generation);
    // The move stopped and was resumed: its tee claimed the target anew, under the new generation.
    apply_claimed(&dedicated, taken_again).await;
    // An expired lease of another instance on this unfinished move (a taker that died in turn) is not written
    // over by this process's renewal, which would keep its own, possibly older, record: the move stops here
    // and is taken over from the store's record, so its tee claims the target anew.
    cp.psql(
        "postgres",
        "UPDATE pgtenant_cp.migrations SET holder = 'gone:1', incarnation = 'gone', \
         lease_until = now() - interval '1 second' WHERE tenant = 'acme'",
    );
    let taken_back = lease_taken_from(&cp, "gone", taken_again).await;
    apply_claimed(&dedicated, taken_back).await;
    let c = connect(&a.url("app.acme", "app")).await.unwrap();
    c.execute("INSERT INTO a (v) VALUES (515151)", &[])
        .await
        .unwrap();
    let on_target =
        || dedicated.psql("app", "SELECT count(*) FROM tenant_acme.a WHERE v = 515151") == "1";
    assert!(
        common::eventually(Duration::from_secs(20), on_target).await,
        "the write never reached the target"
    );
    let v = a
        .admin_ok(json!({"cmd": "migrate.verify", "tenant": "acme"}))
        .await;
    assert_eq!(v["passed"], json!(true), "{v}");
}

/// The number of route changes of acme in the store with `backend`.
fn acme_changes_to(cp: &PgCluster, backend: &str) -> String {
    cp.psql(
        "postgres",
        &format!(
            "SELECT count(*) FROM pgtenant_cp.route_changes WHERE tenant = 'acme' AND route->>'backend' = '{backend}'"
        ),
    )
}

/// A cutover whose route swap the store does not answer: the swap's outcome is unknown, so the tenant stays held
/// on every instance (no write goes to either side, none fails), past the cutover's own answer, until the store
/// answers; then the cutover completes, the swap is in the store once, every instance routes to the target, and
/// the held writes run there. A rollback held the same way, whose store write's answer is then lost, finds that
/// write on its retry and does not write it twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_the_store_does_not_answer_holds_every_instance_until_it_does() {
    use pgtenant::migration::failpoint::Action;
    let (cp, shared, dedicated) = (PgCluster::start(), PgCluster::start(), PgCluster::start());
    let a = std::sync::Arc::new(one_member_moving(&cp, &shared, &dedicated).await);
    let b = member(&cp, &shared, &dedicated, 3000).start().await;
    let on_a = connect(&a.url("app.acme", "app")).await.unwrap();
    let on_b = connect(&b.url("app.acme", "app")).await.unwrap();
    on_b.execute("INSERT INTO a (v) VALUES (1)", &[])
        .await
        .unwrap();
    let failpoints = a.proxy.shared.migrations.failpoints.clone();
    failpoints.set("swap.store", Some(Action::Error));
    failpoints.set("swap.answer_limit", Some(Action::Error));
    let cut = a
        .admin(json!({"cmd": "migrate.cutover", "tenant": "acme"}))
        .await;
    let why = cut["error"]["message"].as_str().unwrap_or_default();
    assert!(why.contains("did not answer the route swap"), "{cut}");
    let writes = [(on_a, 616161), (on_b, 515151)].map(|(c, v)| {
        tokio::spawn(async move {
            c.execute(&format!("INSERT INTO a (v) VALUES ({v})"), &[])
                .await
        })
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    for w in &writes {
        assert!(!w.is_finished(), "a write was not held");
    }
    assert_eq!(acme_changes_to(&cp, "dedicated"), "0");
    // Nothing may let the tenant go or undo the move while the swap's outcome is unknown.
    for req in [
        json!({"cmd": "resume", "tenant": "acme"}),
        json!({"cmd": "migrate.abort", "tenant": "acme"}),
    ] {
        assert_eq!(a.admin_err(req.clone()).await, "invalid_state", "{req}");
    }
    failpoints.set("swap.answer_limit", None);
    failpoints.set("swap.store", None);
    common::moves::wait_state(&a, "acme", "migrated", Duration::from_secs(20)).await;
    for w in writes {
        let ran = tokio::time::timeout(Duration::from_secs(15), w).await;
        ran.expect("a held write never ran").unwrap().unwrap();
    }
    assert_eq!(
        dedicated.psql(
            "app",
            "SELECT count(*) FROM tenant_acme.a WHERE v IN (515151, 616161)"
        ),
        "2"
    );
    assert_eq!(backend_of(&a, "acme").await, json!("dedicated"));
    assert_eq!(backend_of(&b, "acme").await, json!("dedicated"));
    assert_eq!(acme_changes_to(&cp, "dedicated"), "1");
    // The rollback waits for the store with the tenant held; then its write commits and the answer is lost:
    // the retry finds it.
    let before = acme_changes_to(&cp, "shared");
    failpoints.set("swap.store", Some(Action::Error));
    let coordinator = a.clone();
    let back = tokio::spawn(async move {
        coordinator
            .admin(json!({"cmd": "migrate.rollback", "tenant": "acme"}))
            .await
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !back.is_finished(),
        "the rollback went on without the store"
    );
    failpoints.set("swap.store_answer", Some(Action::Error));
    failpoints.set("swap.store", None);
    let back = tokio::time::timeout(Duration::from_secs(20), back).await;
    let back = back.expect("the rollback never ended").unwrap();
    failpoints.set("swap.store_answer", None);
    assert_eq!(back["result"]["state"], json!("rolled_back"), "{back}");
    let after: u32 = acme_changes_to(&cp, "shared").parse().unwrap();
    assert_eq!(after, before.parse::<u32>().unwrap() + 1, "written once");
    for p in [&*a, &b] {
        assert!(
            routes_home(p).await,
            "an instance still routes acme to the target"
        );
    }
}

/// Two moves into one place are refused while the first is unfinished, whether the second starts on the
/// first's coordinator or on another instance (which knows of the first only through the store); neither
/// instance changes the moving tenant's route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_move_into_the_same_place_is_refused_on_every_instance() {
    let (cp, shared, dedicated) = (PgCluster::start(), PgCluster::start(), PgCluster::start());
    let a = one_member_moving(&cp, &shared, &dedicated).await;
    let b = member(&cp, &shared, &dedicated, 3000).start().await;
    let into_acmes_place = json!({"cmd": "migrate.start", "tenant": "beta", "to": "dedicated",
        "schema": "tenant_acme", "allow_existing": true});
    for (p, whose) in [
        (&a, "tenant \"acme\"'s move lands"),
        (&b, "on another instance"),
    ] {
        let r = p.admin(into_acmes_place.clone()).await;
        assert_eq!(r["error"]["code"], "invalid_state", "{r}");
        assert!(
            r["error"]["message"].as_str().unwrap().contains(whose),
            "{r}"
        );
    }
    let set = json!({"cmd": "tenant.set", "tenant": "acme", "backend": "dedicated", "schema": "tenant_acme"});
    for p in [&a, &b] {
        assert_eq!(p.admin_err(set.clone()).await, "invalid_state");
    }
    assert_eq!(
        dedicated.psql(
            "app",
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'tenant_acme' AND tablename = 't'"
        ),
        "0",
        "beta's table was made in acme's place"
    );
}

/// A coordinator killed while it holds every instance for a swap the store never answered: the instance that
/// takes the move over settles the cutover from the store (no swap there: it falls back) and ends the dead
/// coordinator's barrier, so the other instances stop holding and the write held there runs on the source,
/// from where the tee carries it to the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_while_holding_for_its_swap_is_settled_by_the_taker() {
    let (cp, shared, dedicated) = (PgCluster::start(), PgCluster::start(), PgCluster::start());
    let (first, mut child, others) =
        move_on_a_process_with(&cp, &shared, &dedicated, "swap.store=error").await;
    let held = connect(&others[0].url("app.acme", "app")).await.unwrap();
    let socket = first.state_dir().join("admin.sock");
    let cut = tokio::spawn(async move {
        try_admin_line(
            &socket,
            &json!({"cmd": "migrate.cutover", "tenant": "acme"}),
        )
        .await
    });
    let drained = "SELECT count(*) FROM pgtenant_cp.barrier_acks WHERE state = 'drained'";
    let deadline = Instant::now() + Duration::from_secs(20);
    while cp.psql("postgres", drained) != "2" {
        assert!(
            Instant::now() < deadline,
            "the other instances never held the tenant"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let write =
        tokio::spawn(async move { held.execute("INSERT INTO a (v) VALUES (717171)", &[]).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!write.is_finished(), "the write was not held");
    kill9(&mut child);
    cut.abort();
    let killed = Instant::now();
    let taker = taker(&others, killed).await;
    // Within the clients' 30 s wait at the gate.
    let ran = tokio::time::timeout(Duration::from_secs(25), write).await;
    ran.expect("the held write never ran").unwrap().unwrap();
    assert_eq!(
        shared.psql("app", "SELECT count(*) FROM tenant_acme.a WHERE v = 717171"),
        "1"
    );
    common::moves::wait_state(taker, "acme", "dual_write", Duration::from_secs(30)).await;
    common::moves::wait_lag_zero(taker, "acme").await;
    assert_eq!(
        dedicated.psql("app", "SELECT count(*) FROM tenant_acme.a WHERE v = 717171"),
        "1"
    );
    for p in &others {
        assert_eq!(backend_of(p, "acme").await, json!("shared"));
    }
}

/// The store's route lock held past the store sessions' `lock_timeout` (5 s; here by a session of the test's
/// own, as another instance's slow write would): a `migrate start` (whose first lease takes the lock) and then a
/// `tenant set` that meet it are tried again, and go through once it is let go, rather than failing at the
/// first timeout. (The admin commands that change routes run one at a time, so each meets a hold of its own.)
/// Without the retry the start failed with `preflight_failed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_that_meet_a_held_route_lock_are_tried_again() {
    let (cp, shared, dedicated) = (PgCluster::start(), PgCluster::start(), PgCluster::start());
    common::moves::small_schema(&shared);
    let a = member(&cp, &shared, &dedicated, 3000).start().await;
    let start = json!({"cmd": "migrate.start", "tenant": "acme", "to": "dedicated"});
    let set = json!({"cmd": "tenant.set", "tenant": "gamma", "backend": "shared", "schema": "tenant_beta"});
    for request in [start, set] {
        let held_for = Duration::from_secs(6);
        let release = hold_route_lock(&cp, held_for).await;
        let since = Instant::now();
        let r = a.admin(request.clone()).await;
        assert_eq!(r["ok"], json!(true), "{request} -> {r}");
        assert!(
            since.elapsed() >= held_for - Duration::from_millis(500),
            "{request} waited for the lock: {:?}",
            since.elapsed()
        );
        release.await.unwrap();
    }
    assert_eq!(backend_of(&a, "gamma").await, json!("shared"));
    common::moves::wait_state(&a, "acme", "dual_write", Duration::from_secs(30)).await;
    a.admin_ok(json!({"cmd": "migrate.abort", "tenant": "acme"}))
        .await;
}

/// Takes the store's route lock (its key spells "pgtenant") in a session of the test's own, let go after
/// `held_for` by the task returned.
async fn hold_route_lock(cp: &PgCluster, held_for: Duration) -> tokio::task::JoinHandle<()> {
    let holder = connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        cp.port
    ))
    .await
    .unwrap();
    let lock = 0x7067_7465_6e61_6e74_i64;
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&lock])
        .await
        .unwrap();
    tokio::spawn(async move {
        tokio::time::sleep(held_for).await;
        holder
            .execute("SELECT pg_advisory_unlock($1)", &[&lock])
            .await
            .unwrap();
    })
}

/// A reload's new tenants go into the store (`add_tenants`, with `Guard::IfAbsent`) only where it has no route:
/// an instance whose table is behind the store, reloading a config that names a tenant another instance has since
/// routed or moved, never writes its config's route over the newer one. The write is made as such an instance's
/// reload makes it, straight on the store, since the instance's lag cannot be timed from outside; so this tests
/// the guard, not that `add_tenants` chooses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_if_absent_guard_keeps_a_lagging_reload_from_overwriting_a_newer_route() {
    use pgtenant::cluster::store::{append, latest_route, Guard};
    use pgtenant::routing::{BackendId, Route};
    use pgtenant::tenant::TenantId;
    let (cp, shared, dedicated) = (PgCluster::start(), PgCluster::start(), PgCluster::start());
    for pg in [&shared, &dedicated] {
        pg.tenant_schemas("app", &["tenant_acme", "tenant_beta"]);
    }
    let p = member(&cp, &shared, &dedicated, 3000).start().await;
    // The newer route: beta moved to dedicated by an operator.
    p.admin_ok(json!({"cmd": "tenant.set", "tenant": "beta", "backend": "dedicated", "schema": "tenant_beta"}))
        .await;
    let id = |t: &str| TenantId::parse(t).unwrap();
    let on_shared = |schema: &str| Route {
        backend: BackendId::parse("shared").unwrap(),
        schema: Some(schema.into()),
        ..Default::default()
    };
    let mut store = connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        cp.port
    ))
    .await
    .unwrap();
    // A lagging instance's reload: beta as its config has it, and a tenant that is new everywhere.
    let stale = [
        (id("beta"), Some(on_shared("tenant_beta"))),
        (id("gamma"), Some(on_shared("tenant_acme"))),
    ];
    append(&mut store, "lagging", &stale, Guard::IfAbsent)
        .await
        .unwrap();
    let tx = store.transaction().await.unwrap();
    let beta = latest_route(&tx, &id("beta")).await.unwrap().unwrap();
    assert_eq!(&*beta.backend, "dedicated");
    let gamma = latest_route(&tx, &id("gamma")).await.unwrap();
    assert_eq!(gamma, Some(on_shared("tenant_acme")));
    drop(tx);
    // The instance applies what was written, and only that.
    let deadline = Instant::now() + Duration::from_secs(5);
    let gamma_of = || p.admin(json!({"cmd": "tenant.get", "tenant": "gamma"}));
    while gamma_of().await["result"]["route"]["backend"] != json!("shared") {
        assert!(
            Instant::now() < deadline,
            "gamma never reached the instance: {}",
            gamma_of().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(backend_of(&p, "beta").await, json!("dedicated"));
}
