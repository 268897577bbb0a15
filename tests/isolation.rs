//! Tenant isolation and least privilege, against clients that try to break it: a tenant reaches only its own
//! data whatever SQL or startup parameter it sends, on every route kind (schema, database, dedicated server,
//! rows of shared tables); pooled connections never carry one tenant's session into another's; one tenant
//! cannot take a whole pool; idle sockets cannot lock clients out; a vanished client cannot hold a tenant's
//! gate; the login path gives nothing away. Every refusal is checked by its SQLSTATE.

mod common;

use std::time::{Duration, Instant};

use common::{closes_within, code, message, startup_packet, Harness, PgCluster, TestProxy};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::Client;

/// Cluster `a`: database `app` with schemas tenant_acme and tenant_globex (tables secrets, orders), table
/// `docs` of rows of tenants rowsa/rowsb, and database `dbco`; cluster `b`: the dedicated server of `dedi`.
/// Both have the non-superuser serving role `pgtenant_serve`.
struct World {
    a: PgCluster,
    b: PgCluster,
    key: tempfile::TempDir,
}

fn world() -> World {
    let a = PgCluster::start();
    a.psql("postgres", "CREATE ROLE pgtenant_serve LOGIN");
    a.psql("postgres", "CREATE DATABASE dbco");
    a.psql(
        "app",
        "CREATE SCHEMA tenant_acme; CREATE SCHEMA tenant_globex;
         CREATE TABLE tenant_acme.secrets (id int PRIMARY KEY, v text);
         CREATE TABLE tenant_globex.secrets (id int PRIMARY KEY, v text);
         CREATE TABLE tenant_acme.orders (id serial PRIMARY KEY, item text);
         CREATE TABLE tenant_globex.orders (id serial PRIMARY KEY, item text);
         INSERT INTO tenant_acme.secrets VALUES (1, 'acme-secret');
         INSERT INTO tenant_globex.secrets VALUES (1, 'globex-secret');
         CREATE TABLE public.docs (id serial PRIMARY KEY, tenant_id text NOT NULL, body text);
         INSERT INTO public.docs (tenant_id, body) VALUES ('rowsa', 'a1'), ('rowsa', 'a2'), ('rowsb', 'b1');",
    );
    a.psql(
        "dbco",
        "CREATE TABLE t (id int PRIMARY KEY, who text); INSERT INTO t VALUES (1, 'dbco')",
    );
    let b = PgCluster::start();
    b.psql("postgres", "CREATE ROLE pgtenant_serve LOGIN");
    b.psql(
        "app",
        "CREATE TABLE t (id int PRIMARY KEY, who text); INSERT INTO t VALUES (1, 'dedi')",
    );
    let key = tempfile::tempdir().unwrap();
    std::fs::write(
        key.path().join("tenant.key"),
        "isolation-tests-derivation-key\n",
    )
    .unwrap();
    World { a, b, key }
}

/// Every route kind, all with role isolation and a serving role that is not a superuser.
fn harness(w: &World) -> Harness {
    let key = w.key.path().join("tenant.key");
    let role_backend = format!(
        "admin_user = \"postgres\"\ndatabase = \"app\"\nisolation = \"role\"\ntenant_password_key_file = \"{}\"",
        key.display()
    );
    Harness::new()
        .backend_as("shared", &w.a, "pgtenant_serve", &role_backend)
        .backend_as("dedicated", &w.b, "pgtenant_serve", &role_backend)
        .raw("[[users]]\nname = \"dev\"\nauth = \"trust\"\ntenants = [\"*\"]")
        .tenant("acme", "shared", None, Some("tenant_acme"))
        .tenant("globex", "shared", None, Some("tenant_globex"))
        .tenant("dbco", "shared", Some("dbco"), None)
        .tenant("dedi", "dedicated", None, None)
        .tenant("rowsa", "shared", None, None)
        .tenant_extra("tenant_column = \"tenant_id\"")
        .tenant("rowsb", "shared", None, None)
        .tenant_extra("tenant_column = \"tenant_id\"")
}

/// Creates every tenant's role and grants through the admin command (so `tenant grants --apply` is tested too).
async fn grant_all(p: &TestProxy, tenants: &[&str]) {
    for t in tenants {
        let r = p
            .admin_ok(json!({"cmd": "tenant.grants", "tenant": t, "apply": true}))
            .await;
        assert_eq!(r["applied"], true, "{r}");
    }
}

async fn tenant(p: &TestProxy, t: &str) -> Client {
    p.connect(&format!("app.{t}"), "app")
        .await
        .unwrap_or_else(|e| panic!("{t}: {}", message(&e)))
}

/// `sql` fails with one of `codes` (and nothing of it took effect, being one autocommit statement).
async fn refused(c: &Client, sql: &str, codes: &[&str]) {
    let e = c
        .batch_execute(sql)
        .await
        .expect_err(&format!("{sql} should be refused"));
    assert!(
        codes.contains(&code(&e).as_str()),
        "{sql}: got {} {}",
        code(&e),
        message(&e)
    );
}

async fn one(c: &Client, sql: &str) -> String {
    c.simple_query(sql)
        .await
        .unwrap()
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_string()),
            _ => None,
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_database_and_server_routes_hold_against_arbitrary_sql() {
    let w = world();
    let p = harness(&w).start().await;
    grant_all(&p, &["acme", "globex", "dbco", "dedi"]).await;
    let acme = tenant(&p, "acme").await;
    assert_eq!(one(&acme, "SELECT current_user").await, "t_acme");
    assert_eq!(one(&acme, "SELECT v FROM secrets").await, "acme-secret");
    // Another tenant's schema: by name, by search_path, by role, through code, by COPY.
    refused(&acme, "SELECT * FROM tenant_globex.secrets", &["42501"]).await;
    refused(
        &acme,
        "INSERT INTO tenant_globex.orders (item) VALUES ('x')",
        &["42501"],
    )
    .await;
    refused(
        &acme,
        "SET search_path = tenant_globex; SELECT * FROM secrets",
        &["42P01"],
    )
    .await;
    acme.batch_execute("RESET search_path").await.unwrap();
    refused(&acme, "SET ROLE t_globex", &["42501"]).await;
    refused(&acme, "SET SESSION AUTHORIZATION t_globex", &["42501"]).await;
    refused(
        &acme,
        "SELECT set_config('role', 't_globex', false)",
        &["42501"],
    )
    .await;
    refused(
        &acme,
        "DO $$ BEGIN PERFORM * FROM tenant_globex.secrets; END $$",
        &["42501"],
    )
    .await;
    refused(&acme, "COPY secrets FROM PROGRAM 'id'", &["42501"]).await;
    refused(&acme, "COPY (SELECT 1) TO PROGRAM 'id'", &["42501"]).await;
    refused(&acme, "SET session_replication_role = replica", &["42501"]).await;
    refused(&acme, "ALTER ROLE t_acme SUPERUSER", &["42501"]).await;
    // RESET ALL goes back to the tenant's own schema and role, not above them.
    acme.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(
        one(&acme, "SELECT current_user || ' ' || current_schema()").await,
        "t_acme tenant_acme"
    );
    // Another tenant's backend session cannot be cancelled or terminated.
    let globex = tenant(&p, "globex").await;
    let globex_pid = one(&globex, "SELECT pg_backend_pid()").await;
    let sleeper = tokio::spawn(async move { globex.batch_execute("SELECT pg_sleep(1.5)").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    refused(
        &acme,
        &format!("SELECT pg_cancel_backend({globex_pid})"),
        &["42501"],
    )
    .await;
    refused(
        &acme,
        &format!("SELECT pg_terminate_backend({globex_pid})"),
        &["42501"],
    )
    .await;
    assert!(
        sleeper.await.unwrap().is_ok(),
        "globex's statement ran to its end"
    );

    // Database route: its own database; other tenants' roles cannot even connect to it.
    let dbco = tenant(&p, "dbco").await;
    assert_eq!(one(&dbco, "SELECT who FROM t").await, "dbco");
    refused(&dbco, "COPY t FROM PROGRAM 'id'", &["42501"]).await;
    let direct = format!("host=127.0.0.1 port={} user=t_acme dbname=dbco", w.a.port);
    let e = common::connect(&direct).await.unwrap_err();
    assert_eq!(code(&e), "42501", "{}", message(&e));
    // Dedicated server: its own server, with its own role there.
    let dedi = tenant(&p, "dedi").await;
    assert_eq!(
        one(&dedi, "SELECT who || ' ' || current_user FROM t").await,
        "dedi t_dedi"
    );
    refused(&dedi, "SELECT pg_read_file('/etc/passwd')", &["42501"]).await;

    // Nothing of globex changed, and the serving roles are not superusers.
    assert_eq!(
        w.a.psql(
            "app",
            "SELECT string_agg(v, ',') FROM tenant_globex.secrets"
        ),
        "globex-secret"
    );
    assert_eq!(
        w.a.psql("app", "SELECT count(*) FROM tenant_globex.orders"),
        "0"
    );
    let backends = p.admin_ok(json!({"cmd": "backends"})).await;
    for b in backends["backends"].as_array().unwrap() {
        assert_eq!(b["warnings"], json!([]), "{b}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_table_rows_are_kept_apart_by_row_level_security() {
    let w = world();
    // As in a database made before PostgreSQL 15: anyone may create in `public`.
    w.a.psql("app", "GRANT CREATE ON SCHEMA public TO PUBLIC");
    let p = harness(&w).start().await;
    grant_all(&p, &["rowsa", "rowsb"]).await;
    let a = tenant(&p, "rowsa").await;
    // No tenant can plant a function in the schema every tenant's names resolve in.
    refused(
        &a,
        "CREATE FUNCTION lower(varchar) RETURNS text LANGUAGE sql AS $$ SELECT 'planted' $$",
        &["42501"],
    )
    .await;
    assert_eq!(
        one(&a, "SELECT string_agg(body, ',' ORDER BY id) FROM docs").await,
        "a1,a2"
    );
    // Writes reach only its own rows; writing a row as another tenant is refused by the policy.
    a.batch_execute("UPDATE docs SET body = body || '!'")
        .await
        .unwrap();
    a.batch_execute("DELETE FROM docs WHERE body = 'b1'")
        .await
        .unwrap();
    refused(
        &a,
        "INSERT INTO docs (tenant_id, body) VALUES ('rowsb', 'planted')",
        &["42501"],
    )
    .await;
    refused(&a, "UPDATE docs SET tenant_id = 'rowsb'", &["42501"]).await;
    // Settings are no way around it: the policy follows the login role, not a setting.
    a.batch_execute("SELECT set_config('pgtenant_rls.tenant', 'rowsb', false)")
        .await
        .unwrap();
    assert_eq!(one(&a, "SELECT count(*) FROM docs").await, "2");
    refused(&a, "SELECT * FROM pgtenant_rls.tenant_roles", &["42501"]).await;
    refused(&a, "TRUNCATE docs", &["42501"]).await;
    refused(
        &a,
        "ALTER TABLE docs DISABLE ROW LEVEL SECURITY",
        &["42501"],
    )
    .await;
    refused(&a, "SET ROLE t_rowsb", &["42501"]).await;
    let b = tenant(&p, "rowsb").await;
    assert_eq!(
        one(&b, "SELECT string_agg(body, ',') FROM docs").await,
        "b1"
    );
    b.batch_execute("INSERT INTO docs (tenant_id, body) VALUES ('rowsb', 'b2')")
        .await
        .unwrap();
    assert_eq!(
        w.a.psql(
            "app",
            "SELECT string_agg(tenant_id || ':' || body, ',' ORDER BY id) FROM docs"
        ),
        "rowsa:a1!,rowsa:a2!,rowsb:b1,rowsb:b2"
    );
}

/// Sends a StartupMessage as the trust user `dev` and returns the SQLSTATE of the error, or "" on success.
async fn startup_outcome(port: u16, params: &[(&str, &str)]) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(&startup_packet(196608, params)).await.unwrap();
    loop {
        let mut head = [0u8; 5];
        if s.read_exact(&mut head).await.is_err() {
            return "closed".into();
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        s.read_exact(&mut body).await.unwrap();
        match head[0] {
            b'Z' => return String::new(),
            b'E' => {
                let code = body
                    .split(|b| *b == 0)
                    .find_map(|f| f.strip_prefix(b"C"))
                    .unwrap_or_default();
                return String::from_utf8_lossy(code).into_owned();
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_that_escape_the_route_are_refused() {
    let w = world();
    let p = harness(&w).start().await;
    grant_all(&p, &["acme", "globex"]).await;
    let port = p.port();
    let base = [("user", "dev.acme"), ("database", "app")];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        v
    };
    assert_eq!(startup_outcome(port, &base).await, "");
    // pgjdbc's currentSchema sends exactly this.
    for extra in [
        &[("search_path", "tenant_globex")][..],
        &[("options", "-c search_path=tenant_globex")],
        &[("options", "--search-path=tenant_globex")],
        &[("role", "t_globex")],
        &[("options", "-c role=t_globex")],
        &[("session_authorization", "t_globex")],
        &[("options", "-c session_replication_role=replica")],
        &[("session_replication_role", "replica")],
        &[("pgtenant.bypass_ddl_guard", "on")],
    ] {
        assert_eq!(
            startup_outcome(port, &with(extra)).await,
            "42501",
            "{extra:?}"
        );
    }
    // Ordinary settings pass, and a session without a tenant cannot take the escape along by SET.
    assert_eq!(
        startup_outcome(
            port,
            &with(&[("application_name", "x"), ("options", "-c work_mem=8MB")])
        )
        .await,
        ""
    );
    let free = p.connect("app", "app").await.unwrap();
    free.batch_execute("SET pgtenant.tenant = 'acme'")
        .await
        .unwrap();
    assert_eq!(one(&free, "SELECT current_user").await, "t_acme");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_pooling_never_hands_session_state_to_another_tenant() {
    // Shared isolation (one serving role, one pool) in transaction mode with a single connection: every
    // transaction of either tenant lands on the same backend connection.
    let pg = PgCluster::start();
    pg.tenant_schemas("app", &["tenant_t1", "tenant_t2"]);
    pg.psql(
        "app",
        "CREATE TABLE public.shared_t (who text); CREATE TABLE tenant_t1.own (x int); CREATE TABLE tenant_t2.own (x int); \
         CREATE FUNCTION public.mark() RETURNS int LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM set_config('app.mark', 'from t1', false); RETURN 1; END $$",
    );
    let p = Harness::new()
        .proxy("pool_mode = \"transaction\"")
        .backend_with("shared", &pg, "database = \"app\"\npool_size = 1")
        .tenant("t1", "shared", None, Some("tenant_t1"))
        .tenant("t2", "shared", None, Some("tenant_t2"))
        .start()
        .await;
    let t1 = tenant(&p, "t1").await;
    let t2 = tenant(&p, "t2").await;
    // t1 hides temporary tables named like t2's table and the shared one, and puts pg_temp first, inside
    // code the proxy cannot read.
    t1.batch_execute(
        "DO $$ BEGIN CREATE TEMP TABLE own (x int); CREATE TEMP TABLE shared_t (who text); \
         EXECUTE 'SET search_path TO pg_temp, public'; END $$",
    )
    .await
    .unwrap();
    t2.batch_execute("INSERT INTO own VALUES (100)")
        .await
        .unwrap();
    t2.batch_execute("INSERT INTO public.shared_t VALUES ('t2')")
        .await
        .unwrap();
    assert_eq!(
        pg.psql("app", "SELECT sum(x) FROM tenant_t2.own"),
        "100",
        "t2's row is in its real table"
    );
    assert_eq!(
        pg.psql("app", "SELECT string_agg(who, ',') FROM public.shared_t"),
        "t2"
    );
    assert_eq!(one(&t2, "SELECT current_schema()").await, "tenant_t2");
    t2.batch_execute("DELETE FROM own").await.unwrap();
    // Each tenant keeps its own schema transaction after transaction on the one shared connection.
    for _ in 0..3 {
        t1.batch_execute("INSERT INTO own VALUES (1)")
            .await
            .unwrap();
        t2.batch_execute("INSERT INTO own VALUES (2)")
            .await
            .unwrap();
    }
    assert_eq!(pg.psql("app", "SELECT sum(x) FROM tenant_t1.own"), "3");
    assert_eq!(pg.psql("app", "SELECT sum(x) FROM tenant_t2.own"), "6");
    // A statement prepared by t1 is never run for t2 against t1's schema.
    let s1 = t1.prepare("SELECT who FROM t").await.unwrap();
    let s2 = t2.prepare("SELECT who FROM t").await.unwrap();
    let w1: String = t1.query_one(&s1, &[]).await.unwrap().get(0);
    let w2: String = t2.query_one(&s2, &[]).await.unwrap().get(0);
    assert_eq!((w1.as_str(), w2.as_str()), ("tenant_t1", "tenant_t2"));
    // A setting changed inside a function, out of the proxy's sight: the full reset undoes it all the same.
    assert_eq!(one(&t1, "SELECT public.mark()::text").await, "1");
    let leaked = one(
        &t2,
        "SELECT coalesce(current_setting('app.mark', true), '')",
    )
    .await;
    assert_eq!(leaked, "");
    // Nor does a SET the proxy saw reach the other tenant, or the function's setting after it.
    t1.batch_execute("SET application_name = 't1 app'")
        .await
        .unwrap();
    assert_eq!(one(&t1, "SELECT public.mark()::text").await, "1");
    assert_eq!(
        one(&t2, "SELECT current_setting('application_name')").await,
        ""
    );
    assert_eq!(
        one(
            &t2,
            "SELECT coalesce(current_setting('app.mark', true), '')"
        )
        .await,
        ""
    );
}

/// A serving role that is no superuser gets the cheaper full reset (`RESET ROLE` for `RESET SESSION
/// AUTHORIZATION`): a role taken inside a function by one tenant still never reaches the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_taken_inside_a_function_never_reaches_the_next_tenant() {
    let pg = PgCluster::start();
    pg.tenant_schemas("app", &["tenant_t1", "tenant_t2"]);
    pg.psql(
        "app",
        "CREATE ROLE serve LOGIN; CREATE ROLE other; GRANT other TO serve; \
         GRANT USAGE ON SCHEMA tenant_t1, tenant_t2 TO serve; \
         GRANT SELECT ON ALL TABLES IN SCHEMA tenant_t1, tenant_t2 TO serve; \
         CREATE FUNCTION public.become_other() RETURNS text LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM set_config('role', 'other', false); RETURN current_user; END $$",
    );
    let p = Harness::new()
        .proxy("pool_mode = \"transaction\"")
        .backend_as("shared", &pg, "serve", "database = \"app\"\npool_size = 1")
        .tenant("t1", "shared", None, Some("tenant_t1"))
        .tenant("t2", "shared", None, Some("tenant_t2"))
        .start()
        .await;
    let t1 = tenant(&p, "t1").await;
    let t2 = tenant(&p, "t2").await;
    assert_eq!(one(&t2, "SELECT current_user").await, "serve");
    assert_eq!(one(&t1, "SELECT public.become_other()").await, "other");
    assert_eq!(one(&t2, "SELECT current_user").await, "serve");
    assert_eq!(one(&t2, "SELECT who FROM t").await, "tenant_t2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenant_flooding_a_pool_leaves_the_others_served() {
    let pg = PgCluster::start();
    pg.tenant_schemas("app", &["tenant_a", "tenant_b"]);
    let p = Harness::new()
        .proxy("pool_checkout_timeout_ms = 1500")
        .backend_with(
            "shared",
            &pg,
            "database = \"app\"\npool_size = 3\nmax_tenant_connections = 2",
        )
        .tenant("a", "shared", None, Some("tenant_a"))
        .tenant("b", "shared", None, Some("tenant_b"))
        .start()
        .await;
    // Tenant a opens more sessions than the pool holds, each keeping its connection (session mode).
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(tenant(&p, "a").await);
    }
    let started = Instant::now();
    let third = p.connect("app.a", "app").await.unwrap_err();
    assert_eq!(code(&third), "53300", "{}", message(&third));
    assert!(
        message(&third).contains("max_tenant_connections"),
        "{}",
        message(&third)
    );
    assert!(started.elapsed() >= Duration::from_millis(1400));
    // Tenant b still gets its share at once.
    let started = Instant::now();
    let b = tenant(&p, "b").await;
    assert_eq!(one(&b, "SELECT who FROM t").await, "tenant_b");
    assert!(started.elapsed() < Duration::from_millis(1000));
    // When one of a's sessions ends, a gets its place back.
    held.pop();
    let again = tenant(&p, "a").await;
    assert_eq!(one(&again, "SELECT who FROM t").await, "tenant_a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_cap_is_shared_by_every_role_pool() {
    let w = world();
    let key = w.key.path().join("tenant.key");
    let p = Harness::new()
        .proxy("pool_mode = \"transaction\"")
        .proxy("pool_checkout_timeout_ms = 2000")
        .backend_as(
            "shared",
            &w.a,
            "pgtenant_serve",
            &format!(
                "admin_user = \"postgres\"\ndatabase = \"app\"\nisolation = \"role\"\nmax_connections = 2\ntenant_password_key_file = \"{}\"",
                key.display()
            ),
        )
        .tenant("acme", "shared", None, Some("tenant_acme"))
        .tenant("globex", "shared", None, Some("tenant_globex"))
        .start()
        .await;
    grant_all(&p, &["acme", "globex"]).await;
    // acme's pool fills the backend's cap with two idle connections...
    let (a1, a2) = (tenant(&p, "acme").await, tenant(&p, "acme").await);
    let (r1, r2) = tokio::join!(
        a1.batch_execute("SELECT pg_sleep(0.2)"),
        a2.batch_execute("SELECT pg_sleep(0.2)")
    );
    r1.unwrap();
    r2.unwrap();
    // ...and globex's role gets room by closing one of them.
    let g = tenant(&p, "globex").await;
    assert_eq!(one(&g, "SELECT current_user").await, "t_globex");
    let open = w.a.psql(
        "app",
        "SELECT count(*) FROM pg_stat_activity WHERE usename IN ('t_acme', 't_globex')",
    );
    assert!(
        open.parse::<u32>().unwrap() <= 2,
        "{open} connections under a cap of 2"
    );
}

/// The soft limit on open files of this process.
fn open_file_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        })
        .unwrap_or(1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_sockets_cannot_lock_out_real_clients() {
    let pg = PgCluster::start();
    pg.tenant_schemas("app", &["tenant_acme"]);
    let p = Harness::new()
        .proxy("max_client_conn = 8")
        .backend_with("shared", &pg, "database = \"app\"")
        .tenant("acme", "shared", None, Some("tenant_acme"))
        .start()
        .await;
    // A thousand sockets that connect and say nothing (fewer if this process may not open that many).
    let n = 1000.min(open_file_limit().saturating_sub(300));
    let mut idle = Vec::with_capacity(n);
    for _ in 0..n {
        idle.push(
            tokio::net::TcpStream::connect(("127.0.0.1", p.port()))
                .await
                .unwrap(),
        );
    }
    let started = Instant::now();
    let c = tenant(&p, "acme").await;
    assert_eq!(one(&c, "SELECT who FROM t").await, "tenant_acme");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The oldest silent sockets were closed to make room.
    assert!(closes_within(&mut idle[0], Duration::from_secs(2)).await);
    // Logged-in clients have a limit of their own, named in the error.
    let mut more = Vec::new();
    for _ in 0..7 {
        more.push(tenant(&p, "acme").await);
    }
    let e = p.connect("app.acme", "app").await.unwrap_err();
    assert_eq!(code(&e), "53300");
    assert!(message(&e).contains("max_client_conn"), "{}", message(&e));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_client_in_a_transaction_no_longer_blocks_pause() {
    let pg = PgCluster::start();
    pg.tenant_schemas("app", &["tenant_acme"]);
    let p = Harness::new()
        .proxy("idle_transaction_timeout_ms = 500")
        .proxy("client_idle_timeout_ms = 60000")
        .backend_with("shared", &pg, "database = \"app\"")
        .tenant("acme", "shared", None, Some("tenant_acme"))
        .start()
        .await;
    let c = tenant(&p, "acme").await;
    // The client opens a transaction, takes a row lock, and then says nothing more (as if its host died).
    c.batch_execute("BEGIN; UPDATE t SET who = 'locked' WHERE id = 1")
        .await
        .unwrap();
    let r = p
        .admin_ok(json!({"cmd": "pause", "tenant": "acme", "timeout_ms": 5000}))
        .await;
    assert_eq!(r["drained"], true, "{r}");
    assert!(r["drain_ms"].as_f64().unwrap() < 3000.0, "{r}");
    p.admin_ok(json!({"cmd": "resume", "tenant": "acme"})).await;
    // Its session was ended (the FATAL 25P03 arrived while the client was not listening) and its transaction
    // rolled back.
    let e = c.batch_execute("SELECT 1").await.unwrap_err();
    assert!(
        code(&e) == "25P03" || e.is_closed() || message(&e).contains("closed"),
        "{} {}",
        code(&e),
        message(&e)
    );
    assert_eq!(
        pg.psql("app", "SELECT who FROM tenant_acme.t"),
        "tenant_acme"
    );
}

/// The salt the proxy offers `user` in a SCRAM exchange.
async fn scram_salt(port: u16, user: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(&startup_packet(
        196608,
        &[("user", user), ("database", "app")],
    ))
    .await
    .unwrap();
    common::read_until(&mut s, b'R').await.unwrap();
    let first = b"n,,n=,r=clientnonce";
    let mut body = b"SCRAM-SHA-256\0".to_vec();
    body.extend_from_slice(&(first.len() as i32).to_be_bytes());
    body.extend_from_slice(first);
    s.write_all(&common::frame(b'p', &body)).await.unwrap();
    let reply = common::read_until(&mut s, b'R').await.unwrap();
    let text = String::from_utf8_lossy(&reply[4..]).into_owned();
    text.split(',')
        .find_map(|a| a.strip_prefix("s="))
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_give_nothing_away_and_respect_networks_and_tls() {
    let pg = PgCluster::start();
    pg.tenant_schemas("app", &["tenant_acme"]);
    let certs = tempfile::tempdir().unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    std::fs::write(certs.path().join("c.pem"), cert.cert.pem()).unwrap();
    std::fs::write(certs.path().join("k.pem"), cert.key_pair.serialize_pem()).unwrap();
    let p = Harness::new()
        .backend_with("shared", &pg, "database = \"app\"")
        .tenant("acme", "shared", None, Some("tenant_acme"))
        .raw(&format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"",
            certs.path().join("c.pem").display(),
            certs.path().join("k.pem").display()
        ))
        .raw("[[users]]\nname = \"far\"\npassword = \"pw\"\ntenants = [\"*\"]\nnetworks = [\"10.0.0.0/8\"]")
        .raw("[[users]]\nname = \"secure\"\npassword = \"pw\"\ntenants = [\"*\"]\nrequire_tls = true")
        .start()
        .await;
    let port = p.port();
    // Unknown users get a salt that stays the same from one attempt to the next, as known users' do.
    assert_eq!(
        scram_salt(port, "nobody").await,
        scram_salt(port, "nobody").await
    );
    assert_eq!(scram_salt(port, "app").await, scram_salt(port, "app").await);
    assert_ne!(
        scram_salt(port, "nobody").await,
        scram_salt(port, "someone").await
    );
    // Failed logins from one address are answered more and more slowly.
    let wrong = format!("host=127.0.0.1 port={port} user=app.acme dbname=app password=wrong");
    let mut took = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let e = common::connect(&wrong).await.unwrap_err();
        assert_eq!(code(&e), "28P01");
        took.push(started.elapsed());
    }
    assert!(took[2] >= Duration::from_millis(900), "{took:?}");
    // A success from the address starts over.
    tenant(&p, "acme").await;
    let started = Instant::now();
    common::connect(&wrong).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(800));
    // Networks and TLS are checked after the password: the right password from the wrong place is refused.
    let far = format!("host=127.0.0.1 port={port} user=far.acme dbname=app password=pw");
    let e = common::connect(&far).await.unwrap_err();
    assert_eq!(code(&e), "28000", "{}", message(&e));
    let plain = format!(
        "host=127.0.0.1 port={port} user=secure.acme dbname=app password=pw sslmode=disable"
    );
    let e = common::connect(&plain).await.unwrap_err();
    assert_eq!(code(&e), "28000", "{}", message(&e));
    // Over TLS, psql binds its SCRAM exchange to the proxy's certificate (SCRAM-SHA-256-PLUS).
    let bound = format!(
        "host=127.0.0.1 port={port} user=secure.acme dbname=app password=pw sslmode=require channel_binding=require"
    );
    let (ok, out, err) = common::psql(&bound, &["-c", "SELECT who FROM t"]);
    assert!(ok, "{err}");
    assert_eq!(out, "tenant_acme");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_role_passwords_come_from_the_key_and_grants_set_them() {
    let w = world();
    w.a.psql("app", "CREATE SCHEMA tenant_secure; CREATE TABLE tenant_secure.t (who text); INSERT INTO tenant_secure.t VALUES ('secure')");
    // pg_hba asks t_secure for a SCRAM password.
    let p = harness(&w)
        .tenant("secure", "shared", None, Some("tenant_secure"))
        .start()
        .await;
    // Before the grants the role does not exist: the proxy's login fails, and says so plainly.
    let e = p.connect("app.secure", "app").await.unwrap_err();
    assert_eq!(code(&e), "08001", "{}", message(&e));
    let printed = p
        .admin_ok(json!({"cmd": "tenant.grants", "tenant": "secure"}))
        .await;
    let sql = printed["sql"].as_str().unwrap();
    assert!(
        sql.contains("SCRAM-SHA-256$") && !sql.contains("isolation-tests"),
        "{sql}"
    );
    assert_eq!(printed["applied"], false);
    grant_all(&p, &["secure"]).await;
    let c = tenant(&p, "secure").await;
    assert_eq!(
        one(&c, "SELECT who || ' ' || current_user FROM t").await,
        "secure t_secure"
    );
    // Grants need role isolation.
    let shared = Harness::new()
        .backend_with("shared", &w.a, "database = \"app\"")
        .tenant("acme", "shared", None, Some("tenant_acme"))
        .start()
        .await;
    let e = shared
        .admin_err(json!({"cmd": "tenant.grants", "tenant": "acme"}))
        .await;
    assert_eq!(e, "invalid_state");
    // A superuser serving role is reported.
    let c = tenant(&shared, "acme").await;
    one(&c, "SELECT 1").await;
    let b = shared.admin_ok(json!({"cmd": "backends"})).await;
    assert!(
        b["backends"][0]["warnings"]
            .to_string()
            .contains("superuser"),
        "{b}"
    );
}
