//! Helpers of the migration tests: the two-backend harness with role isolation, waiting for states, and
//! comparing a tenant's tables on both sides.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::*;

/// Serving connections log in as each tenant's own role (`isolation = "role"`, grants made by `tenant grants
/// --apply`, see [`grant`]) under a serving role that is not a superuser; migrations use the admin role.
pub fn harness(shared: &PgCluster, dedicated: &PgCluster) -> Harness {
    harness_with(shared, dedicated, "")
}

/// [`harness`] with more `[migration]` keys (lines).
pub fn harness_with(shared: &PgCluster, dedicated: &PgCluster, migration: &str) -> Harness {
    least_privilege(shared);
    least_privilege(dedicated);
    let backend =
        "admin_user = \"postgres\"\nisolation = \"role\"\ndatabase = \"app\"\npool_size = 30";
    Harness::new()
        .backend_as("shared", shared, "pgtenant_serve", backend)
        .backend_as("dedicated", dedicated, "pgtenant_serve", backend)
        .tenant("acme", "shared", None, Some("tenant_acme"))
        .tenant("beta", "shared", None, Some("tenant_beta"))
        .raw(&format!(
            "[migration]\npg_dump = \"{}\"\ncopy_batch_rows = 1000\nverify_chunk_rows = 500\ncutover_timeout_ms = 3000\n{migration}",
            pg_bin("pg_dump").display()
        ))
}

/// The serving role, an ordinary login role.
pub fn least_privilege(pg: &PgCluster) {
    pg.psql(
        "postgres",
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgtenant_serve') THEN CREATE ROLE pgtenant_serve LOGIN; END IF; END $$",
    );
}

/// Makes the tenants' roles and grants on their current backend (the target's are made by `migrate start`).
pub async fn grant(proxy: &TestProxy, tenants: &[&str]) {
    for t in tenants {
        proxy
            .admin_ok(json!({"cmd": "tenant.grants", "tenant": t, "apply": true}))
            .await;
    }
}

/// Starts the proxy of `h` and grants acme and beta their roles.
pub async fn up(h: Harness) -> TestProxy {
    let proxy = h.start().await;
    grant(&proxy, &["acme", "beta"]).await;
    proxy
}

pub async fn status(proxy: &TestProxy, tenant: &str) -> Value {
    proxy
        .admin_ok(json!({"cmd": "migrate.status", "tenant": tenant}))
        .await
}

pub async fn wait_state(proxy: &TestProxy, tenant: &str, state: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let s = status(proxy, tenant).await;
        if s["state"] == json!(state) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "migration did not reach {state}: {s:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Per table: row count and a digest of all rows (in key or text order), as one comparable string.
pub fn fingerprint(pg: &PgCluster, schema: &str) -> String {
    pg.psql(
        "app",
        &format!(
            "SELECT string_agg(relname || ':' || n || ':' || h, ' ' ORDER BY relname) FROM (
               SELECT c.relname, (xpath('/row/n/text()', query_to_xml(format('SELECT count(*) AS n FROM %I.%I', '{schema}', c.relname), false, true, '')))[1]::text AS n,
                      (xpath('/row/h/text()', query_to_xml(format('SELECT md5(string_agg(x::text, '','' ORDER BY x::text)) AS h FROM %I.%I x', '{schema}', c.relname), false, true, '')))[1]::text AS h
                 FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace
                WHERE s.nspname = '{schema}' AND c.relkind = 'r') f"
        ),
    )
}

pub fn acme_url(proxy: &TestProxy) -> String {
    format!(
        "host=127.0.0.1 port={} user=app.acme dbname=app",
        proxy.port()
    )
}

pub async fn wait_lag_zero(proxy: &TestProxy, tenant: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = status(proxy, tenant).await;
        if s["lag_events"] == json!(0) {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            if status(proxy, tenant).await["lag_events"] == json!(0) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "lag did not drain: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn small_schema(pg: &PgCluster) {
    pg.psql(
        "app",
        "CREATE SCHEMA tenant_acme;
         CREATE TABLE tenant_acme.a (id serial PRIMARY KEY, v int);
         CREATE TABLE tenant_acme.b (id serial PRIMARY KEY, v int);
         CREATE TABLE tenant_acme.c (v int);
         INSERT INTO tenant_acme.a (v) SELECT g FROM generate_series(1, 2000) g;
         INSERT INTO tenant_acme.b (v) SELECT g FROM generate_series(1, 2000) g;
         INSERT INTO tenant_acme.c SELECT g FROM generate_series(1, 100) g;
         CREATE SCHEMA tenant_beta; CREATE TABLE tenant_beta.t (id int PRIMARY KEY);",
    );
}

pub async fn start_acme(proxy: &TestProxy) -> Value {
    proxy
        .admin_ok(
            json!({"cmd": "migrate.start", "tenant": "acme", "to": "dedicated", "verify": "hash"}),
        )
        .await
}

pub fn capture_left(pg: &PgCluster) -> String {
    let triggers = pg.psql(
        "app",
        "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgtenant_%' AND tgname NOT LIKE 'pgtenant\\_fence\\_%'",
    );
    let log = if pg.psql("app", "SELECT to_regclass('pgtenant.change_log') IS NULL") == "t" {
        "none".to_string()
    } else {
        pg.psql("app", "SELECT count(*) FROM pgtenant.change_log")
    };
    format!("{triggers}/{log}")
}
