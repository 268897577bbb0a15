//! A scripted PostgreSQL backend for the relay's unit tests: it speaks just enough of the protocol (startup,
//! simple and extended queries, transactions) and records every frame it receives, by connection.

use std::sync::{Arc, Mutex};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// One frame a backend connection received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub conn: usize,
    pub tag: u8,
    /// The statement text of a Query or Parse, the statement name of a Parse, Bind or Close, else empty.
    pub text: String,
    pub name: String,
}

/// What every connection received, in order, and how many were opened.
#[derive(Default)]
pub struct Log {
    pub seen: Mutex<Vec<Seen>>,
    pub opened: Mutex<usize>,
}

impl Log {
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The Query and Parse texts, in order, that connection `conn` received after the first `start` frames
    /// (of all connections) were logged.
    pub fn statements_since(&self, start: usize, conn: usize) -> Vec<String> {
        self.seen()[start..]
            .iter()
            .filter(|s| s.conn == conn && matches!(s.tag, b'Q' | b'P'))
            .map(|s| s.text.clone())
            .collect()
    }

    /// The Query texts, in order, of connection `conn`.
    pub fn queries(&self, conn: usize) -> Vec<String> {
        self.seen()
            .into_iter()
            .filter(|s| s.conn == conn && s.tag == b'Q')
            .map(|s| s.text)
            .collect()
    }
}

/// Serves one backend connection on `io` until the proxy closes it.
pub async fn serve(mut io: DuplexStream, log: Arc<Log>) {
    let conn = {
        let mut n = log.opened.lock().unwrap();
        *n += 1;
        *n
    };
    let mut buf = BytesMut::new();
    let Some(_startup) = read_startup(&mut io, &mut buf).await else {
        return;
    };
    let mut out = BytesMut::new();
    frame(&mut out, b'R', |b| b.put_i32(0));
    for (k, v) in [
        ("server_version", "15.0"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("standard_conforming_strings", "on"),
    ] {
        frame(&mut out, b'S', |b| {
            put_cstr(b, k);
            put_cstr(b, v);
        });
    }
    frame(&mut out, b'K', |b| {
        b.put_i32(1000 + conn as i32);
        b.put_i32(7);
    });
    let mut status = b'I';
    ready(&mut out, status);
    if io.write_all(&out).await.is_err() {
        return;
    }
    loop {
        let Some((tag, body)) = read_frame(&mut io, &mut buf).await else {
            return;
        };
        if tag == b'X' {
            return;
        }
        let seen = describe(conn, tag, &body);
        log.seen.lock().unwrap().push(seen.clone());
        let mut out = BytesMut::new();
        answer(conn, &seen, &mut status, &mut out);
        if !out.is_empty() && io.write_all(&out).await.is_err() {
            return;
        }
    }
}

fn describe(conn: usize, tag: u8, body: &[u8]) -> Seen {
    let cstrs: Vec<String> = body
        .split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    let (name, text) = match tag {
        b'Q' => (String::new(), cstrs[0].clone()),
        b'P' => (cstrs[0].clone(), cstrs[1].clone()),
        // Bind: portal, then statement.
        b'B' => (cstrs.get(1).cloned().unwrap_or_default(), String::new()),
        b'C' | b'D' => (
            String::from_utf8_lossy(&body[1..body.len() - 1]).into_owned(),
            String::new(),
        ),
        _ => (String::new(), String::new()),
    };
    Seen {
        conn,
        tag,
        text,
        name,
    }
}

/// The scripted reply to one frame. SELECTs return one row holding the connection's number, so a test can
/// tell which backend connection served it.
fn answer(conn: usize, seen: &Seen, status: &mut u8, out: &mut BytesMut) {
    match seen.tag {
        b'Q' => {
            for statement in seen.text.split(';').filter(|s| !s.trim().is_empty()) {
                run(conn, statement.trim(), status, out);
            }
            ready(out, *status);
        }
        b'P' => frame(out, b'1', |_| {}),
        b'B' => frame(out, b'2', |_| {}),
        b'D' => frame(out, b'n', |_| {}),
        b'E' => {
            data_row(out, &conn.to_string());
            complete(out, "SELECT 1");
        }
        b'C' => frame(out, b'3', |_| {}),
        b'S' => ready(out, *status),
        _ => {}
    }
}

fn run(conn: usize, sql: &str, status: &mut u8, out: &mut BytesMut) {
    let upper = sql.to_ascii_uppercase();
    let first = upper.split_whitespace().next().unwrap_or("");
    match first {
        "BEGIN" | "START" => {
            *status = b'T';
            complete(out, "BEGIN");
        }
        "COMMIT" | "END" | "ROLLBACK" => {
            let tag = if *status == b'E' { "ROLLBACK" } else { first };
            *status = b'I';
            complete(out, tag);
        }
        "INSERT" => complete(out, "INSERT 0 1"),
        "SELECT" if upper.contains("PG_MY_TEMP_SCHEMA") || upper.contains("ROLSUPER") => {
            row(out, "f");
            complete(out, "SELECT 1");
        }
        "SELECT" => {
            row(out, &conn.to_string());
            complete(out, "SELECT 1");
        }
        "FAIL" => {
            frame(out, b'E', |b| {
                for (f, v) in [(b'S', "ERROR"), (b'C', "42601"), (b'M', "scripted failure")] {
                    b.put_u8(f);
                    put_cstr(b, v);
                }
                b.put_u8(0);
            });
            if *status == b'T' {
                *status = b'E';
            }
        }
        other => complete(out, other),
    }
}

fn row(out: &mut BytesMut, value: &str) {
    frame(out, b'T', |b| {
        b.put_i16(1);
        put_cstr(b, "x");
        b.put_i32(0);
        b.put_i16(0);
        b.put_i32(25);
        b.put_i16(-1);
        b.put_i32(-1);
        b.put_i16(0);
    });
    data_row(out, value);
}

fn data_row(out: &mut BytesMut, value: &str) {
    frame(out, b'D', |b| {
        b.put_i16(1);
        b.put_i32(value.len() as i32);
        b.put_slice(value.as_bytes());
    });
}

fn complete(out: &mut BytesMut, tag: &str) {
    frame(out, b'C', |b| put_cstr(b, tag));
}

fn ready(out: &mut BytesMut, status: u8) {
    frame(out, b'Z', |b| b.put_u8(status));
}

pub fn put_cstr(b: &mut BytesMut, s: &str) {
    b.put_slice(s.as_bytes());
    b.put_u8(0);
}

/// Appends a tagged frame whose body `body` writes.
pub fn frame(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    let mut b = BytesMut::new();
    body(&mut b);
    out.put_u8(tag);
    out.put_i32(b.len() as i32 + 4);
    out.put_slice(&b);
}

async fn read_startup(io: &mut DuplexStream, buf: &mut BytesMut) -> Option<BytesMut> {
    fill(io, buf, 4).await?;
    let len = (&buf[..4]).get_i32() as usize;
    fill(io, buf, len).await?;
    Some(buf.split_to(len))
}

/// Reads one tagged frame: (tag, body).
pub async fn read_frame(io: &mut DuplexStream, buf: &mut BytesMut) -> Option<(u8, BytesMut)> {
    fill(io, buf, 5).await?;
    let len = (&buf[1..5]).get_i32() as usize;
    fill(io, buf, 1 + len).await?;
    let mut f = buf.split_to(1 + len);
    let tag = f[0];
    f.advance(5);
    Some((tag, f))
}

async fn fill(io: &mut DuplexStream, buf: &mut BytesMut, n: usize) -> Option<()> {
    while buf.len() < n {
        if io.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
    Some(())
}
