//! The relay's rules, each driven through real sessions against the scripted backend: transaction boundaries
//! (when a pooled connection goes back), pipelining, prepared-statement renaming in transaction pooling, the
//! session state that follows a session to another connection, the reset between tenants, and the tee hold.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;

use super::{bind_execute, parse, sync, World};
use crate::migration::registry::CommitWait;
use crate::tenant::TenantId;

/// Long enough for a reply that is coming to arrive; the tests that wait this long expect none.
const QUIET: Duration = Duration::from_millis(300);

/// After client A runs `script` in transaction pooling with one backend connection, can client B run a
/// statement, or does A still hold the connection?
#[tokio::test]
async fn a_connection_is_held_exactly_for_a_transaction() {
    let cases: &[(&[&str], bool)] = &[
        (&["SELECT 1"], false),
        (&["BEGIN"], true),
        (&["BEGIN", "INSERT INTO t VALUES (1)"], true),
        (&["BEGIN", "COMMIT"], false),
        (&["BEGIN", "FAIL"], true),
        (&["BEGIN", "FAIL", "ROLLBACK"], false),
        (&["SET application_name = 'a'"], false),
        (&["SELECT 1; SELECT 2"], false),
    ];
    for (script, held) in cases {
        let w = World::new("transaction", 1);
        let mut a = w.connect("acme").await;
        let mut b = w.connect("acme").await;
        for sql in *script {
            a.query(sql).await;
        }
        b.send_query("SELECT 42").await;
        let got = b.reply_within(QUIET).await;
        assert_eq!(got.is_none(), *held, "{script:?}: {got:?}");
        if *held {
            a.query("ROLLBACK").await;
            let late = b.reply_within(Duration::from_secs(5)).await;
            assert_eq!(late.map(|r| r.values), Some(vec!["1".into()]), "{script:?}");
        }
    }
}

/// Several extended-protocol batches written at once come back whole and in order, on one connection.
#[tokio::test]
async fn pipelined_batches_keep_their_order() {
    for mode in ["session", "transaction"] {
        let w = World::new(mode, 2);
        let mut c = w.connect("acme").await;
        let mut out = BytesMut::new();
        for n in 1..=3 {
            parse(&mut out, "", &format!("SELECT {n}"));
            bind_execute(&mut out, "");
            sync(&mut out);
        }
        c.send(&out).await;
        for _ in 1..=3 {
            let r = c.reply().await.unwrap();
            assert_eq!(r.tags, b"12DCZ".to_vec(), "{mode}");
        }
        let texts: Vec<String> = w
            .log
            .seen()
            .into_iter()
            .filter(|s| s.tag == b'P')
            .map(|s| s.text)
            .collect();
        assert_eq!(texts, ["SELECT 1", "SELECT 2", "SELECT 3"], "{mode}");
    }
}

/// Leaves `client` inside a transaction on backend connection `conn` (transactions on the others are ended).
async fn hold(client: &mut super::Client, conn: usize) {
    loop {
        let r = client.query("BEGIN; SELECT 1").await;
        if r.values == [conn.to_string()] {
            return;
        }
        client.query("COMMIT").await;
    }
}

/// Transaction pooling: a client's named statement gets a server-side name of the proxy's, and is prepared
/// again on a connection that does not have it before the Bind that needs it.
#[tokio::test]
async fn named_statements_are_renamed_and_prepared_where_missing() {
    let w = World::new("transaction", 2);
    let mut a = w.connect("acme").await;
    let mut other = w.connect("acme").await;
    let mut out = BytesMut::new();
    parse(&mut out, "s1", "SELECT 7");
    bind_execute(&mut out, "s1");
    sync(&mut out);
    a.send(&out).await;
    let r = a.reply().await.unwrap();
    let first_conn: usize = r.values[0].parse().unwrap();
    let server_name = |conn: usize, tag: u8| {
        w.log
            .seen()
            .into_iter()
            .filter(|s| s.conn == conn && s.tag == tag)
            .map(|s| s.name)
            .collect::<Vec<_>>()
    };
    let parsed = server_name(first_conn, b'P');
    assert_eq!(parsed.len(), 1, "{:?}", w.log.seen());
    assert!(parsed[0].starts_with("pgtenant_"), "{parsed:?}");
    assert_eq!(server_name(first_conn, b'B'), parsed);
    // Keep that connection busy with another client's transaction: the next Bind goes to the other one.
    hold(&mut other, first_conn).await;
    let mut out = BytesMut::new();
    bind_execute(&mut out, "s1");
    sync(&mut out);
    a.send(&out).await;
    let r = a.reply().await.unwrap();
    let second_conn: usize = r.values[0].parse().unwrap();
    assert_ne!(second_conn, first_conn);
    let order: Vec<(u8, String)> = w
        .log
        .seen()
        .into_iter()
        // Named ones: the proxy's own schema change before them is unnamed.
        .filter(|s| s.conn == second_conn && matches!(s.tag, b'P' | b'B') && !s.name.is_empty())
        .map(|s| (s.tag, s.name))
        .collect();
    assert_eq!(
        order,
        [(b'P', parsed[0].clone()), (b'B', parsed[0].clone())]
    );
    other.query("COMMIT").await;
}

/// Transaction pooling: the client's unnamed statement is prepared again on another connection before a Bind
/// of it (libpq's PQsendPrepare then PQsendQueryPrepared), until a simple Query drops it as PostgreSQL does.
#[tokio::test]
async fn the_unnamed_statement_follows_the_session_until_a_query_drops_it() {
    let w = World::new("transaction", 2);
    let mut a = w.connect("acme").await;
    let mut other = w.connect("acme").await;
    let unnamed_parses = || {
        w.log
            .seen()
            .into_iter()
            .filter(|s| s.tag == b'P' && s.name.is_empty() && s.text == "SELECT 7")
            .map(|s| s.conn)
            .collect::<Vec<_>>()
    };
    let mut out = BytesMut::new();
    parse(&mut out, "", "SELECT 7");
    sync(&mut out);
    a.send(&out).await;
    a.reply().await.unwrap();
    let first_conn = unnamed_parses()[0];
    // Another client's transaction holds that connection: the Bind goes to the other one, the Parse first.
    hold(&mut other, first_conn).await;
    let mut out = BytesMut::new();
    bind_execute(&mut out, "");
    sync(&mut out);
    a.send(&out).await;
    let r = a.reply().await.unwrap();
    assert_eq!(r.tags, b"2DCZ".to_vec(), "{r:?}");
    let parses = unnamed_parses();
    assert_eq!(parses.len(), 2, "{:?}", w.log.seen());
    assert_ne!(parses[1], first_conn);
    other.query("COMMIT").await;
    // A simple Query drops it: a later Bind of "" is sent as it is, on whichever connection.
    a.query("SELECT 1").await;
    let mut out = BytesMut::new();
    bind_execute(&mut out, "");
    sync(&mut out);
    a.send(&out).await;
    a.reply().await.unwrap();
    assert_eq!(unnamed_parses().len(), 2, "{:?}", w.log.seen());
}

/// Transaction pooling: a session's SETs are replayed on the next connection it gets, before its statement.
#[tokio::test]
async fn session_settings_follow_the_session_to_another_connection() {
    let w = World::new("transaction", 2);
    let mut a = w.connect("acme").await;
    let mut other = w.connect("acme").await;
    a.query("SET application_name = 'a1'").await;
    other.query("BEGIN").await;
    let r = a.query("SELECT 1").await;
    assert_eq!(r.values, ["2"]);
    let second = w.log.queries(2);
    let set = second
        .iter()
        .position(|q| q == "SET application_name = 'a1'");
    let select = second.iter().position(|q| q == "SELECT 1");
    assert!(
        matches!((set, select), (Some(s), Some(q)) if s < q),
        "{second:?}"
    );
    other.query("COMMIT").await;
}

/// Transaction pooling of one shared pool: each transaction carries its tenant's schema, and a connection
/// another tenant used is fully reset first, in Executes pipelined ahead of the client's Query with no Sync;
/// the same tenant again gets no reset.
#[tokio::test]
async fn another_tenant_gets_a_connection_only_after_a_full_reset() {
    let w = World::new("transaction", 1);
    let mut acme = w.connect("acme").await;
    let mut globex = w.connect("globex").await;
    let start = w.log.seen().len();
    acme.query("SELECT 1").await;
    globex.query("SELECT 2").await;
    globex.query("SELECT 3").await;
    let sent = w.log.statements_since(start, 1);
    // The connection holds no prepared statements: one DISCARD ALL, then the schema in a transaction.
    let reset = |schema: &str| {
        [
            "DISCARD ALL",
            "BEGIN",
            &format!("SET search_path = \"{schema}\""),
            "COMMIT",
        ]
        .map(String::from)
    };
    // globex logged in last: acme's statement needs a full reset first, and so does globex's after it.
    let mut expected = reset("s_acme").to_vec();
    expected.push("SELECT 1".into());
    expected.extend(reset("s_globex"));
    expected.extend(["SELECT 2".into(), "SELECT 3".into()]);
    assert_eq!(sent, expected);
    // No Sync between the reset and the client's Query: an error in the reset would skip the Query.
    let syncs = w.log.seen()[start..]
        .iter()
        .filter(|s| s.tag == b'S')
        .count();
    assert_eq!(syncs, 0);
}

/// A connection holding prepared statements gets `DISCARD ALL` too before another tenant uses it: the
/// statements go (a session's code may have replaced one under the proxy's name), and the tenant that comes
/// back later has its statement prepared again.
#[tokio::test]
async fn a_connection_with_prepared_statements_is_discarded_before_another_tenant() {
    let w = World::new("transaction", 1);
    let mut acme = w.connect("acme").await;
    let mut globex = w.connect("globex").await;
    let mut out = BytesMut::new();
    parse(&mut out, "s1", "SELECT 7");
    bind_execute(&mut out, "s1");
    sync(&mut out);
    acme.send(&out).await;
    acme.reply().await.unwrap();
    let start = w.log.seen().len();
    globex.query("SELECT 2").await;
    let sent = w.log.statements_since(start, 1);
    let expected = [
        "DISCARD ALL",
        "BEGIN",
        "SET search_path = \"s_globex\"",
        "COMMIT",
        "SELECT 2",
    ];
    assert_eq!(sent, expected.map(String::from));
    // Acme's statement is prepared again on its next use.
    let start = w.log.seen().len();
    let mut out = BytesMut::new();
    bind_execute(&mut out, "s1");
    sync(&mut out);
    acme.send(&out).await;
    acme.reply().await.unwrap();
    let sent = w.log.statements_since(start, 1);
    assert_eq!(
        sent.last().map(String::as_str),
        Some("SELECT 7"),
        "{sent:?}"
    );
    assert_eq!(
        sent.first().map(String::as_str),
        Some("DISCARD ALL"),
        "{sent:?}"
    );
}

/// A stand-in for a migration tee: commits wait until the test releases them.
struct HeldTee(tokio::sync::watch::Receiver<bool>);

impl CommitWait for HeldTee {
    fn after_commit(&self) -> Pin<Box<dyn Future<Output = ()> + Send + Sync + '_>> {
        let mut rx = self.0.clone();
        Box::pin(async move {
            let _ = rx.wait_for(|open| *open).await;
        })
    }
}

/// While a tenant's tee runs, the reply that ends a transaction that wrote waits for it, whole; reads and
/// statements inside the transaction do not wait.
#[tokio::test]
async fn the_end_of_a_writing_transaction_waits_for_the_tee() {
    let cases: &[(&[&str], &str, bool)] = &[
        (&[], "INSERT INTO t VALUES (1)", true),
        (&[], "SELECT 1", false),
        (&["BEGIN"], "INSERT INTO t VALUES (1)", false),
        (&["BEGIN", "INSERT INTO t VALUES (1)"], "COMMIT", true),
        (&["BEGIN", "SELECT 1"], "COMMIT", false),
    ];
    for (before, last, waits) in cases {
        let w = World::new("session", 2);
        let (open, rx) = tokio::sync::watch::channel(false);
        let mut tees = std::collections::HashMap::new();
        let tee: Arc<dyn CommitWait> = Arc::new(HeldTee(rx));
        tees.insert(TenantId::parse("acme").unwrap(), tee);
        w.shared.migrations.tees.store(Arc::new(tees));
        let mut c = w.connect("acme").await;
        for sql in *before {
            c.query(sql).await;
        }
        c.send_query(last).await;
        let got = c.reply_within(QUIET).await;
        assert_eq!(got.is_none(), *waits, "{before:?} {last}: {got:?}");
        if *waits {
            open.send(true).unwrap();
            let r = c.reply_within(Duration::from_secs(5)).await.unwrap();
            assert_eq!(r.tags.last(), Some(&b'Z'), "{r:?}");
            assert!(
                r.tags.contains(&b'C'),
                "the CommandComplete waited too: {r:?}"
            );
        }
    }
}
