//! Tenant resolution, routes, access control and authentication, end to end on real PostgreSQL.

mod common;

use common::{code, connect, psql, Harness, PgCluster, PASSWORD};

/// Two clusters: "shared" with schemas for acme and globex plus a database "dbtwo" for initech;
/// "dedicated" holding hooli in database app.
struct World {
    shared: PgCluster,
    dedicated: PgCluster,
}

fn world() -> World {
    let shared = PgCluster::start();
    shared.tenant_schemas("app", &["tenant_acme", "tenant_globex"]);
    shared.psql("postgres", "CREATE DATABASE dbtwo");
    shared.psql(
        "dbtwo",
        "CREATE TABLE t (id int, who text); INSERT INTO t VALUES (1, 'dbtwo')",
    );
    let dedicated = PgCluster::start();
    dedicated.psql(
        "app",
        "CREATE TABLE t (id int, who text); INSERT INTO t VALUES (1, 'dedicated')",
    );
    World { shared, dedicated }
}

fn harness(w: &World) -> Harness {
    Harness::new()
        .backend_with("shared", &w.shared, "database = \"app\"")
        .backend("dedicated", &w.dedicated)
        .tenant("acme", "shared", None, Some("tenant_acme"))
        .tenant("globex", "shared", None, Some("tenant_globex"))
        .tenant("initech", "shared", Some("dbtwo"), None)
        .tenant("hooli", "dedicated", Some("app"), None)
        .raw("[[users]]\nname = \"limited\"\npassword = \"pw\"\nauth = \"md5\"\ntenants = [\"acme\"]\n")
        .raw("[[users]]\nname = \"dev\"\nauth = \"trust\"\ntenants = [\"acme\"]\n")
}

async fn where_am_i(client: &tokio_postgres::Client) -> (String, String, i32, String) {
    let row = client
        .query_one(
            "SELECT current_schema()::text, current_database()::text, inet_server_port(), (SELECT who FROM t LIMIT 1)",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2), row.get(3))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_route_tier_lands_where_it_should() {
    let w = world();
    let proxy = harness(&w).start().await;
    let sp = w.shared.port as i32;
    let dp = w.dedicated.port as i32;

    let acme = proxy.connect("app.acme", "app").await.unwrap();
    assert_eq!(
        where_am_i(&acme).await,
        ("tenant_acme".into(), "app".into(), sp, "tenant_acme".into())
    );
    let globex = proxy.connect("app.globex", "whatever").await.unwrap();
    assert_eq!(
        where_am_i(&globex).await,
        (
            "tenant_globex".into(),
            "app".into(),
            sp,
            "tenant_globex".into()
        )
    );
    let initech = proxy.connect("app.initech", "app").await.unwrap();
    assert_eq!(
        where_am_i(&initech).await,
        ("public".into(), "dbtwo".into(), sp, "dbtwo".into())
    );
    let hooli = proxy.connect("app.hooli", "app").await.unwrap();
    assert_eq!(
        where_am_i(&hooli).await,
        ("public".into(), "app".into(), dp, "dedicated".into())
    );
    // RESET search_path returns to the tenant's schema, not the server default.
    acme.batch_execute("SET search_path = public; RESET search_path")
        .await
        .unwrap();
    assert_eq!(where_am_i(&acme).await.0, "tenant_acme");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tenant_source_works_and_conflicts_are_refused() {
    let w = world();
    let proxy = harness(&w).start().await;
    let port = proxy.port();
    let base = format!("host=127.0.0.1 port={port} password={PASSWORD}");

    // options source
    let c = connect(&format!(
        "{base} user=app dbname=app options='-c pgtenant.tenant=globex -c geqo=off'"
    ))
    .await
    .unwrap();
    assert_eq!(where_am_i(&c).await.0, "tenant_globex");
    // the other options reach the backend
    let geqo: String = c.query_one("SHOW geqo", &[]).await.unwrap().get(0);
    assert_eq!(geqo, "off");
    // database source
    let c = connect(&format!("{base} user=app dbname=acme"))
        .await
        .unwrap();
    assert_eq!(where_am_i(&c).await.0, "tenant_acme");
    // agreeing sources are fine
    let c = connect(&format!(
        "{base} user=app.acme dbname=acme options='-c pgtenant.tenant=acme'"
    ))
    .await;
    assert!(c.is_ok());
    // disagreeing sources are not
    let e = connect(&format!(
        "{base} user=app.acme dbname=app options='-c pgtenant.tenant=globex'"
    ))
    .await
    .unwrap_err();
    assert_eq!(code(&e), "08004", "{e}");
    let e = connect(&format!("{base} user=app.acme dbname=globex"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), "08004", "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_pgtenant_tenant_moves_the_session() {
    let w = world();
    let proxy = harness(&w).start().await;
    let c = proxy.connect("app", "app").await.unwrap();
    // Without a tenant everything but the tenant statements is refused.
    let e = c.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "3D000");
    let e = c.query("SELECT $1::int", &[&1i32]).await.unwrap_err();
    assert_eq!(code(&e), "3D000");
    c.simple_query("SET pgtenant.tenant = 'acme'")
        .await
        .unwrap();
    assert_eq!(where_am_i(&c).await.0, "tenant_acme");
    c.simple_query("SET pgtenant.tenant TO hooli")
        .await
        .unwrap();
    assert_eq!(where_am_i(&c).await.3, "dedicated");
    let rows = c.simple_query("SHOW pgtenant.tenant").await.unwrap();
    let shown = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(shown.as_deref(), Some("hooli"));
    // Not inside a transaction.
    c.batch_execute("BEGIN").await.unwrap();
    let e = c
        .simple_query("SET pgtenant.tenant = 'acme'")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "25001");
    c.batch_execute("ROLLBACK").await.unwrap();
    // Not hidden among other statements, and not through the extended protocol.
    let e = c
        .simple_query("SELECT 1; SET pgtenant.tenant = 'acme'")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "0A000");
    let e = c
        .query("SET pgtenant.tenant = 'acme'", &[])
        .await
        .unwrap_err();
    assert_eq!(code(&e), "0A000");
    assert_eq!(
        where_am_i(&c).await.3,
        "dedicated",
        "session still works after the refusals"
    );
    // Unknown and invalid tenants.
    let e = c
        .simple_query("SET pgtenant.tenant = 'nope'")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "3D000");
    let e = c
        .simple_query("SET pgtenant.tenant = 'bad name'")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "3D000");
    // RESET goes back to no tenant.
    c.simple_query("RESET pgtenant.tenant").await.unwrap();
    assert_eq!(
        code(&c.simple_query("SELECT 1").await.unwrap_err()),
        "3D000"
    );

    // A connection that named its tenant cannot SET its way to another.
    let fixed = proxy.connect("app.acme", "app").await.unwrap();
    let e = fixed
        .simple_query("SET pgtenant.tenant = 'globex'")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "08004");
    fixed
        .simple_query("SET pgtenant.tenant = 'acme'")
        .await
        .unwrap();
    assert_eq!(where_am_i(&fixed).await.0, "tenant_acme");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_forbidden_tenants_are_refused() {
    let w = world();
    let proxy = harness(&w).start().await;
    let e = proxy.connect("app.nope", "app").await.unwrap_err();
    assert_eq!(code(&e), "3D000", "{e}");
    let e = proxy.connect("app.bad!name", "app").await.unwrap_err();
    assert_eq!(code(&e), "3D000", "{e}");
    let limited = |tenant: &str| {
        format!(
            "host=127.0.0.1 port={} user=limited.{tenant} dbname=app password=pw",
            proxy.port()
        )
    };
    let e = connect(&limited("globex")).await.unwrap_err();
    assert_eq!(code(&e), "28000", "{e}");
    let c = connect(&limited("acme")).await.unwrap();
    assert_eq!(where_am_i(&c).await.0, "tenant_acme");
    // A user limited to acme with no tenant in its startup goes nowhere else by SET either.
    let c = connect(&format!(
        "host=127.0.0.1 port={} user=dev dbname=app",
        proxy.port()
    ))
    .await
    .unwrap();
    let e = c
        .simple_query("SET pgtenant.tenant = 'globex'")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42501");
    c.simple_query("SET pgtenant.tenant = 'acme'")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_authentication_methods() {
    let w = world();
    let proxy = harness(&w).start().await;
    let port = proxy.port();
    // SCRAM (tokio-postgres and psql both use it), md5, trust.
    assert!(proxy.connect("app.acme", "app").await.is_ok());
    let e = connect(&format!(
        "host=127.0.0.1 port={port} user=app.acme dbname=app password=wrong"
    ))
    .await
    .unwrap_err();
    assert_eq!(code(&e), "28P01");
    let e = connect(&format!(
        "host=127.0.0.1 port={port} user=ghost.acme dbname=app password=x"
    ))
    .await
    .unwrap_err();
    assert_eq!(code(&e), "28P01");
    assert!(connect(&format!(
        "host=127.0.0.1 port={port} user=limited.acme dbname=app password=pw"
    ))
    .await
    .is_ok());
    let e = connect(&format!(
        "host=127.0.0.1 port={port} user=limited.acme dbname=app password=nope"
    ))
    .await
    .unwrap_err();
    assert_eq!(code(&e), "28P01");
    assert!(connect(&format!(
        "host=127.0.0.1 port={port} user=dev.acme dbname=app"
    ))
    .await
    .is_ok());
    // psql with SCRAM
    let (ok, out, err) = psql(&proxy.url("app.acme", "app"), &["-c", "SELECT who FROM t"]);
    assert!(ok, "{err}");
    assert_eq!(out, "tenant_acme");
    // a stored SCRAM verifier works the same as a password
    let secret = postgres_protocol::password::scram_sha_256(b"s3cret");
    let proxy2 = harness(&w)
        .raw(&format!(
            "[[users]]\nname = \"stored\"\nscram_secret = \"{secret}\"\ntenants = [\"*\"]\n"
        ))
        .start()
        .await;
    assert!(connect(&format!(
        "host=127.0.0.1 port={} user=stored.acme dbname=app password=s3cret",
        proxy2.port()
    ))
    .await
    .is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_authentication_methods() {
    let pg = PgCluster::start();
    pg.tenant_schemas("app", &["s"]);
    pg.psql(
        "app",
        "SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN SUPERUSER PASSWORD 'm5pw';
         SET password_encryption = 'scram-sha-256'; CREATE ROLE scramuser LOGIN SUPERUSER PASSWORD 'scpw';",
    );
    let proxy = Harness::new()
        .backend_with("m", &pg, "")
        .tenant("viamd5", "m", Some("app"), Some("s"))
        .raw(&format!(
            "[backends.sc]\nhost = \"127.0.0.1\"\nport = {}\nuser = \"scramuser\"\npassword = \"scpw\"\n\
             [backends.md]\nhost = \"127.0.0.1\"\nport = {}\nuser = \"md5user\"\npassword = \"m5pw\"\n\
             [backends.badpw]\nhost = \"127.0.0.1\"\nport = {}\nuser = \"scramuser\"\npassword = \"wrong\"\n\
             [tenants.viascram]\nbackend = \"sc\"\ndatabase = \"app\"\nschema = \"s\"\n\
             [tenants.viamd5b]\nbackend = \"md\"\ndatabase = \"app\"\nschema = \"s\"\n\
             [tenants.broken]\nbackend = \"badpw\"\ndatabase = \"app\"\n",
            pg.port, pg.port, pg.port
        ))
        .start()
        .await;
    for (tenant, user) in [
        ("viascram", "scramuser"),
        ("viamd5b", "md5user"),
        ("viamd5", "postgres"),
    ] {
        let c = proxy
            .connect(&format!("app.{tenant}"), "app")
            .await
            .unwrap();
        let who: String = c
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(who, user);
    }
    let e = proxy.connect("app.broken", "app").await.unwrap_err();
    assert_eq!(code(&e), "08001", "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_sources_and_default_tenant() {
    let w = world();
    // Only the user suffix counts: a database named like a tenant does not, and no tenant at all is refused.
    let strict = harness(&w)
        .proxy("tenant_sources = [\"user_suffix\"]")
        .start()
        .await;
    let e = strict.connect("app", "acme").await.unwrap_err();
    assert_eq!(code(&e), "08004", "{e}");
    assert!(common::message(&e).contains("user name suffix"), "{e}");
    assert_eq!(
        where_am_i(&strict.connect("app.globex", "acme").await.unwrap())
            .await
            .0,
        "tenant_globex"
    );
    // A default tenant catches connections that name none, and SET may still move them.
    let defaulted = harness(&w)
        .proxy("default_tenant = \"globex\"")
        .start()
        .await;
    let c = defaulted.connect("app", "app").await.unwrap();
    assert_eq!(where_am_i(&c).await.0, "tenant_globex");
    c.simple_query("SET pgtenant.tenant = 'acme'")
        .await
        .unwrap();
    assert_eq!(where_am_i(&c).await.0, "tenant_acme");
    c.simple_query("RESET pgtenant.tenant").await.unwrap();
    assert_eq!(where_am_i(&c).await.0, "tenant_globex");
}
