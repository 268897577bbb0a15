//! The psql admin console through real `psql`: every SHOW with its columns and a value, the commands (PAUSE,
//! RESUME, KILL, MIGRATE) with their effect, and who may use it.

mod common;

use std::process::Command;
use std::time::Duration;

use common::moves::{least_privilege, small_schema};
use common::*;

/// `psql -c sql` as `user` on the console: (header columns, rows), or the error text.
fn console(
    proxy: &TestProxy,
    user: &str,
    sql: &str,
) -> Result<(Vec<String>, Vec<Vec<String>>), String> {
    let url = format!(
        "host=127.0.0.1 port={} user={user} dbname=pgtenant password={PASSWORD}",
        proxy.port()
    );
    let out = Command::new("psql")
        .args([
            "-X",
            "-A",
            "-F",
            "|",
            "-P",
            "footer=off",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
            &url,
        ])
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    let header = lines
        .next()
        .unwrap_or_default()
        .split('|')
        .map(str::to_owned)
        .collect();
    let rows = lines
        .map(|l| l.split('|').map(str::to_owned).collect())
        .collect();
    Ok((header, rows))
}

/// The value of `column` in the first row whose `key_column` is `key`.
fn cell(
    set: &(Vec<String>, Vec<Vec<String>>),
    key_column: &str,
    key: &str,
    column: &str,
) -> String {
    let (header, rows) = set;
    let at = |c: &str| {
        header
            .iter()
            .position(|h| h == c)
            .unwrap_or_else(|| panic!("no column {c} in {header:?}"))
    };
    let (k, c) = (at(key_column), at(column));
    rows.iter()
        .find(|r| r[k] == key)
        .unwrap_or_else(|| panic!("no row {key} in {rows:?}"))[c]
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_and_runs_through_psql() {
    let shared = PgCluster::start();
    let dedicated = PgCluster::start();
    small_schema(&shared);
    least_privilege(&shared);
    let proxy = Harness::new()
        .proxy("admin_users = [\"ops\"]")
        .proxy("stats_users = [\"watch\"]")
        .raw(&format!(
            "[[users]]\nname = \"ops\"\npassword = \"{PASSWORD}\"\n[[users]]\nname = \"watch\"\npassword = \"{PASSWORD}\"\n\
             [migration]\npg_dump = \"{}\"",
            pg_bin("pg_dump").display()
        ))
        .backend_with("shared", &shared, "database = \"app\"\nadmin_user = \"postgres\"")
        .backend_with("dedicated", &dedicated, "database = \"app\"\nadmin_user = \"postgres\"")
        .tenant("acme", "shared", None, Some("tenant_acme"))
        .tenant("beta", "shared", None, Some("tenant_beta"))
        .start()
        .await;
    let app = proxy.connect("app.acme", "app").await.unwrap();
    for _ in 0..5 {
        app.simple_query("SELECT count(*) FROM a").await.unwrap();
    }

    let t = console(&proxy, "ops", "SHOW TENANTS").unwrap();
    assert_eq!(cell(&t, "tenant", "acme", "backend"), "shared");
    assert_eq!(cell(&t, "tenant", "acme", "schema"), "tenant_acme");
    assert_eq!(cell(&t, "tenant", "acme", "sessions"), "1");
    let one = console(&proxy, "ops", "SHOW TENANT acme").unwrap();
    assert_eq!(one.0, ["key", "value"]);
    assert_eq!(cell(&one, "key", "route.backend", "value"), "shared");
    let pools = console(&proxy, "ops", "SHOW POOLS").unwrap();
    assert_eq!(&pools.0[..3], ["backend", "database", "user"]);
    assert_eq!(cell(&pools, "backend", "shared", "database"), "app");
    assert_eq!(cell(&pools, "backend", "shared", "pool_mode"), "session");
    let clients = console(&proxy, "ops", "SHOW CLIENTS").unwrap();
    assert_eq!(cell(&clients, "tenant", "acme", "user"), "app");
    // One row per backend connection: acme's client holds one (its pid is the backend's), and a connection
    // a client of beta gave back waits idle in the pool.
    let pid = app
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get::<_, i32>(0);
    {
        let beta = proxy.connect("app.beta", "app").await.unwrap();
        beta.simple_query("SELECT 1").await.unwrap();
    }
    let mut servers = console(&proxy, "ops", "SHOW SERVERS").unwrap();
    for _ in 0..50 {
        if servers.1.iter().any(|r| r[4] == "idle") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        servers = console(&proxy, "ops", "SHOW SERVERS").unwrap();
    }
    assert_eq!(
        &servers.0[..5],
        ["type", "backend", "database", "user", "state"]
    );
    let active = cell(&servers, "remote_pid", &pid.to_string(), "state");
    assert_eq!(active, "active", "{servers:?}");
    assert_eq!(
        cell(&servers, "remote_pid", &pid.to_string(), "tenant"),
        "acme"
    );
    assert_eq!(
        cell(&servers, "remote_pid", &pid.to_string(), "database"),
        "app"
    );
    assert!(
        servers.1.iter().any(|r| r[1] == "shared" && r[4] == "idle"),
        "{servers:?}"
    );
    let stats = console(&proxy, "ops", "SHOW STATS").unwrap();
    assert!(
        stats.0.contains(&"avg_xact_count".to_string()),
        "{:?}",
        stats.0
    );
    let xacts: u64 = cell(&stats, "tenant", "acme", "total_xact_count")
        .parse()
        .unwrap();
    assert!(xacts >= 5, "{stats:?}");
    // Bytes both ways, and the backend's time on the queries, are counted per tenant.
    for column in ["total_received", "total_sent", "total_query_time"] {
        let n: u64 = cell(&stats, "tenant", "acme", column).parse().unwrap();
        assert!(n > 0, "{column}: {stats:?}");
    }
    for column in [
        "total_wait_time",
        "avg_query_time",
        "avg_wait_time",
        "avg_recv",
    ] {
        let n: Result<f64, _> = cell(&stats, "tenant", "acme", column).parse();
        assert!(n.is_ok(), "{column}: {stats:?}");
    }
    let backends = console(&proxy, "ops", "SHOW BACKENDS").unwrap();
    assert_eq!(cell(&backends, "backend", "dedicated", "healthy"), "true");
    let config = console(&proxy, "ops", "SHOW CONFIG").unwrap();
    assert_eq!(
        cell(&config, "key", "proxy.admin_database", "value"),
        "pgtenant"
    );
    assert_eq!(cell(&config, "key", "proxy.listen", "changeable"), "no");
    assert!(
        !config.1.iter().any(|r| r[0].contains("token")),
        "no secrets in SHOW CONFIG"
    );
    let version = console(&proxy, "ops", "SHOW VERSION").unwrap();
    assert!(version.1[0][0].starts_with("pgtenant "), "{version:?}");
    assert!(console(&proxy, "ops", "SHOW HELP").unwrap().1.len() > 5);

    // PAUSE and RESUME of a tenant, and of every tenant; both in the audit log as the console user.
    console(&proxy, "ops", "PAUSE acme").unwrap();
    let t = console(&proxy, "ops", "SHOW TENANTS").unwrap();
    assert_eq!(cell(&t, "tenant", "acme", "gate.paused"), "true");
    console(&proxy, "ops", "RESUME acme").unwrap();
    console(&proxy, "ops", "PAUSE").unwrap();
    let t = console(&proxy, "ops", "SHOW TENANTS").unwrap();
    assert_eq!(cell(&t, "tenant", "beta", "gate.paused"), "true");
    console(&proxy, "ops", "RESUME").unwrap();
    let audit = console(&proxy, "ops", "SHOW AUDIT 10").unwrap();
    assert_eq!(cell(&audit, "command", "pause.all", "actor"), "console:ops");

    // A stats user reads but does not change; other users do not get in; no extended protocol.
    assert!(console(&proxy, "watch", "SHOW POOLS").is_ok());
    let refused = console(&proxy, "watch", "PAUSE acme").unwrap_err();
    assert!(refused.contains("for admin_users"), "{refused}");
    let refused = console(&proxy, "app", "SHOW POOLS").unwrap_err();
    assert!(
        refused.contains("may not use the admin console"),
        "{refused}"
    );
    let c = connect(&format!(
        "host=127.0.0.1 port={} user=ops dbname=pgtenant password={PASSWORD}",
        proxy.port()
    ))
    .await
    .unwrap();
    assert_eq!(
        code(&c.query("SHOW POOLS", &[]).await.unwrap_err()),
        "0A000"
    );
    assert!(!c.simple_query("SHOW VERSION").await.unwrap().is_empty());
    let bad = console(&proxy, "ops", "DROP TABLE a").unwrap_err();
    assert!(bad.contains("unknown console command"), "{bad}");

    // KILL ends the tenant's sessions.
    let killed = console(&proxy, "ops", "KILL acme").unwrap();
    assert_eq!(cell(&killed, "key", "sessions_ended", "value"), "1");
    assert!(app.simple_query("SELECT 1").await.is_err());
    assert!(
        eventually(Duration::from_secs(5), || {
            let t = console(&proxy, "ops", "SHOW TENANTS").unwrap();
            cell(&t, "tenant", "acme", "sessions") == "0"
        })
        .await
    );

    // A move from the console: start, status, cutover, finalize; SHOW MIGRATIONS lists it.
    console(&proxy, "ops", "MIGRATE START acme TO dedicated VERIFY hash").unwrap();
    let m = console(&proxy, "ops", "SHOW MIGRATIONS").unwrap();
    assert_eq!(cell(&m, "tenant", "acme", "target.backend"), "dedicated");
    assert!(
        eventually(Duration::from_secs(30), || {
            console(&proxy, "ops", "MIGRATE STATUS acme")
                .map(|s| cell(&s, "key", "state", "value") == "dual_write")
                .unwrap_or(false)
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cut = console(&proxy, "ops", "MIGRATE CUTOVER acme").unwrap();
    let pause: f64 = cell(&cut, "key", "pause_ms", "value").parse().unwrap();
    common::held_briefly(pause, &format!("{cut:?}"));
    console(&proxy, "ops", "MIGRATE FINALIZE acme").unwrap();
    let h = console(&proxy, "ops", "SHOW HISTORY acme").unwrap();
    assert_eq!(cell(&h, "tenant", "acme", "outcome"), "completed");
    // A queued move shows in SHOW QUEUE until cancelled.
    console(
        &proxy,
        "ops",
        "MIGRATE START beta TO dedicated AT +1h PRIORITY 2",
    )
    .unwrap();
    let q = console(&proxy, "ops", "SHOW QUEUE").unwrap();
    assert_eq!(cell(&q, "request.tenant", "beta", "priority"), "2");
    assert_eq!(
        cell(&q, "request.tenant", "beta", "queued_by"),
        "console:ops"
    );
    console(&proxy, "ops", "MIGRATE CANCEL beta").unwrap();
}
