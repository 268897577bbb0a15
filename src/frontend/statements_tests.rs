//! Unit tests of the statement renaming (a child module of `statements`, kept in its own file).

use super::*;
use crate::protocol::test_frame as frame;

struct Conn {
    out: BytesMut,
    inflight: Inflight,
    statements: ServerStatements,
    unnamed_ours: bool,
}

impl Conn {
    fn new() -> Conn {
        Conn {
            out: BytesMut::new(),
            inflight: Inflight::default(),
            statements: ServerStatements::default(),
            unnamed_ours: false,
        }
    }
    fn target(&mut self, limit: usize) -> Target<'_> {
        Target {
            out: &mut self.out,
            inflight: &mut self.inflight,
            statements: &mut self.statements,
            limit,
            unnamed_ours: &mut self.unnamed_ours,
        }
    }
    /// The frames written, as (tag, body) pairs; clears the output.
    fn frames(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut v = Vec::new();
        let mut b = &self.out[..];
        while !b.is_empty() {
            let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
            v.push((b[0], b[5..1 + len].to_vec()));
            b = &b[1 + len..];
        }
        self.out.clear();
        v
    }
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    frame(b'P', format!("{name}\0{sql}\0\0\0").as_bytes())
}

fn bind(stmt: &str) -> Vec<u8> {
    frame(b'B', format!("\0{stmt}\0\0\0\0\0\0\0").as_bytes())
}

/// The frames the relay forwards in a run without `forward` are exactly those `forward` would send
/// unchanged, changing nothing.
#[test]
fn frames_passed_unchanged_are_those_forward_leaves_alone() {
    let describe = |body: &str| frame(b'D', body.as_bytes());
    let frames = [
        bind(""),
        bind("s0"),
        frame(b'B', b"p1\0\0\0\0\0\0\0\0"),
        describe("P\0"),
        describe("Pp1\0"),
        describe("S\0"),
        describe("Ss0\0"),
        frame(b'C', b"S\0"),
        parse("", "select 1"),
    ];
    for unnamed_ours in [false, true] {
        for f in &frames {
            let mut client = ClientStatements::default();
            client
                .forward(&parse("", "select 1"), String::new, Conn::new().target(10))
                .unwrap();
            client
                .forward(
                    &parse("s0", "select 2"),
                    String::new,
                    Conn::new().target(10),
                )
                .unwrap();
            let mut conn = Conn::new();
            conn.unnamed_ours = unnamed_ours;
            client.forward(f, String::new, conn.target(10)).unwrap();
            let unchanged = conn.out[..] == f[..]
                && conn.inflight.len() == 0
                && conn.unnamed_ours == unnamed_ours
                && !conn.statements.unnamed;
            if ClientStatements::passes_unchanged(f, unnamed_ours) {
                assert!(unchanged, "{f:?} ours={unnamed_ours}: {:?}", conn.frames());
            }
        }
    }
    assert!(ClientStatements::passes_unchanged(&bind(""), true));
    assert!(!ClientStatements::passes_unchanged(&bind(""), false));
    assert!(!ClientStatements::passes_unchanged(&bind("s0"), true));
    assert!(ClientStatements::passes_unchanged(&describe("P\0"), false));
    assert!(!ClientStatements::passes_unchanged(
        &describe("Ss0\0"),
        true
    ));
}

#[test]
fn same_name_different_text_never_collide_and_same_text_is_shared() {
    let (mut a, mut b) = (ClientStatements::default(), ClientStatements::default());
    let mut conn = Conn::new();
    a.forward(&parse("s0", "select 1"), String::new, conn.target(10))
        .unwrap();
    let first = conn.frames();
    b.forward(&parse("s0", "select 2"), String::new, conn.target(10))
        .unwrap();
    let second = conn.frames();
    // Each real Parse is preceded by a Close of the same name.
    assert_eq!(first.iter().map(|f| f.0).collect::<Vec<_>>(), b"CP");
    assert_ne!(
        first[1].1, second[1].1,
        "different statements, different names"
    );
    assert!(first[1].1.starts_with(b"pgtenant_"));
    // A third client preparing "select 1" on the same connection gets a throwaway Parse and its Close.
    let mut c = ClientStatements::default();
    c.forward(&parse("x", "select 1"), String::new, conn.target(10))
        .unwrap();
    let third = conn.frames();
    assert_eq!(third.iter().map(|f| f.0).collect::<Vec<_>>(), b"CPC");
    assert!(third[1].1.starts_with(NOOP_NAME));
    // Its Bind goes to the shared statement.
    c.forward(&bind("x"), String::new, conn.target(10)).unwrap();
    let b = conn.frames();
    assert_eq!(
        &b[0].1[1..1 + SERVER_NAME_LEN],
        &first[1].1[..SERVER_NAME_LEN]
    );
}

#[test]
fn bind_on_another_connection_prepares_first_and_swallows_the_completion() {
    let mut a = ClientStatements::default();
    let mut one = Conn::new();
    a.forward(&parse("s", "select $1"), String::new, one.target(10))
        .unwrap();
    let mut two = Conn::new();
    a.forward(&bind("s"), String::new, two.target(10)).unwrap();
    let frames = two.frames();
    assert_eq!(frames.iter().map(|f| f.0).collect::<Vec<_>>(), b"CPB");
    assert!(two.inflight.on_complete(), "the Close's completion is ours");
    assert!(
        two.inflight.on_complete(),
        "the injected Parse's completion is ours"
    );
    // A Bind of an unknown name passes as it is, for the backend to refuse.
    a.forward(&bind("nope"), String::new, two.target(10))
        .unwrap();
    assert_eq!(two.frames()[0].1, b"\0nope\0\0\0\0\0\0\0".to_vec());
}

#[test]
fn the_bound_evicts_the_least_recently_used_statement() {
    let mut a = ClientStatements::default();
    let mut conn = Conn::new();
    for (n, sql) in [("a", "select 1"), ("b", "select 2"), ("c", "select 3")] {
        a.forward(&parse(n, sql), String::new, conn.target(2))
            .unwrap();
    }
    let frames = conn.frames();
    assert_eq!(frames.iter().map(|f| f.0).collect::<Vec<_>>(), b"CPCPCCP");
    assert_eq!(conn.statements.len(), 2);
}

#[test]
fn a_failed_batch_undoes_what_it_recorded() {
    let mut a = ClientStatements::default();
    let mut conn = Conn::new();
    a.forward(&parse("s", "select nope"), String::new, conn.target(10))
        .unwrap();
    // The Sync. The ParseComplete never comes (the Close's does): the error and ReadyForQuery do.
    conn.inflight.sent_ready();
    conn.inflight.on_complete();
    conn.inflight.on_ready(&mut conn.statements, &mut a);
    assert!(conn.statements.is_empty());
    assert!(!a.contains(b"s"));
    assert_eq!(a.bytes, 0);
}

#[test]
fn a_skipped_close_keeps_the_name_and_a_later_parse_wins() {
    let mut a = ClientStatements::default();
    let mut conn = Conn::new();
    a.forward(&parse("s", "select 1"), String::new, conn.target(10))
        .unwrap();
    conn.inflight.on_complete();
    conn.inflight.on_complete();
    conn.inflight.sent_ready();
    conn.inflight.on_ready(&mut conn.statements, &mut a);
    // Batch: an Execute that fails, then Close s: the backend skips the Close.
    a.forward(&frame(b'C', b"Ss\0"), String::new, conn.target(10))
        .unwrap();
    conn.inflight.sent_ready();
    conn.inflight.on_ready(&mut conn.statements, &mut a);
    assert!(a.contains(b"s"), "the Close did not happen");
    // Pipelined: a failing Parse of t, then (next batch) a good Parse of t; the first batch's undo leaves
    // the second definition alone.
    a.forward(&parse("t", "selec"), String::new, conn.target(10))
        .unwrap();
    conn.inflight.sent_ready();
    a.forward(&parse("t", "select 2"), String::new, conn.target(10))
        .unwrap();
    conn.inflight.sent_ready();
    conn.inflight.on_complete(); // the first Close
    conn.inflight.on_ready(&mut conn.statements, &mut a);
    assert!(a.contains(b"t"));
}
