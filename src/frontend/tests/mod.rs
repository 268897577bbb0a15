//! In-process tests of the relay: real sessions (login, relay loop, pooling, state tracking) over in-memory
//! pipes, against a scripted backend ([`backend`]). No PostgreSQL, no sockets.

mod backend;
mod relay;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncWriteExt, DuplexStream};

use self::backend::{read_frame, Log};
use crate::config::Config;
use crate::context::Shared;
use crate::net::Stream;

const PIPE: usize = 256 * 1024;

/// A proxy (its shared state, no listener) whose backend `b` is the scripted one.
pub struct World {
    pub shared: Arc<Shared>,
    pub log: Arc<Log>,
    _dir: tempfile::TempDir,
}

impl World {
    /// `mode`: `session` or `transaction`; `pool_size`: the backend's.
    pub fn new(mode: &str, pool_size: usize) -> World {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let toml = format!(
            r#"
[proxy]
listen = "127.0.0.1:0"
pool_mode = "{mode}"
state_dir = "{d}/state"
admin_socket = "{d}/admin.sock"

[[users]]
name = "app"
auth = "trust"
tenants = ["*"]

[backends.b]
host = "127.0.0.1"
port = 1
pool_size = {pool_size}

[tenants.acme]
backend = "b"
schema = "s_acme"

[tenants.globex]
backend = "b"
schema = "s_globex"
"#
        );
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_test_writer()
            .try_init();
        let config = Config::from_toml(&toml, std::iter::empty()).unwrap();
        let shared = Shared::new(config, None).unwrap();
        let log = Arc::new(Log::default());
        let dial_log = log.clone();
        let dial: crate::backend::MemoryDialer = Arc::new(move || {
            let (ours, theirs) = tokio::io::duplex(PIPE);
            tokio::spawn(backend::serve(theirs, dial_log.clone()));
            ours
        });
        let backends = shared.backends.load();
        let b = backends.get("b").unwrap();
        assert!(b.dialer.set(dial).is_ok());
        World {
            shared,
            log,
            _dir: dir,
        }
    }

    /// A client logged in as `app.<tenant>`, past its first ReadyForQuery.
    pub async fn connect(&self, tenant: &str) -> Client {
        let (mut ours, theirs) = tokio::io::duplex(PIPE);
        let ticket = self.shared.logins.enter().unwrap();
        tokio::spawn(crate::frontend::login::serve_stream(
            self.shared.clone(),
            Stream::Memory(theirs),
            ticket,
        ));
        let mut out = BytesMut::new();
        let user = format!("app.{tenant}");
        frontend::startup_message([("user", user.as_str()), ("database", "app")], &mut out)
            .unwrap();
        ours.write_all(&out).await.unwrap();
        let mut client = Client {
            io: ours,
            buf: BytesMut::new(),
        };
        let hello = client.reply().await.expect("startup reply");
        assert_eq!(hello.tags.first(), Some(&b'R'), "{hello:?}");
        client
    }
}

/// What came back up to a ReadyForQuery.
#[derive(Debug, Default, Clone)]
pub struct Reply {
    pub tags: Vec<u8>,
    /// First column of each DataRow.
    pub values: Vec<String>,
    /// SQLSTATE of each ErrorResponse.
    pub errors: Vec<String>,
    pub status: u8,
}

/// The test's side of a client connection.
pub struct Client {
    io: DuplexStream,
    buf: BytesMut,
}

impl Client {
    pub async fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
    }

    pub async fn query(&mut self, sql: &str) -> Reply {
        self.send_query(sql).await;
        self.reply().await.expect("a reply")
    }

    pub async fn send_query(&mut self, sql: &str) {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).unwrap();
        self.send(&out).await;
    }

    /// Reads up to the next ReadyForQuery (none if the connection ends first).
    pub async fn reply(&mut self) -> Option<Reply> {
        let mut r = Reply::default();
        loop {
            let (tag, body) = read_frame(&mut self.io, &mut self.buf).await?;
            r.tags.push(tag);
            match tag {
                b'D' => {
                    let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]) as usize;
                    r.values
                        .push(String::from_utf8_lossy(&body[6..6 + len]).into_owned());
                }
                b'E' => r.errors.push(error_code(&body)),
                b'Z' => {
                    r.status = body[0];
                    return Some(r);
                }
                _ => {}
            }
        }
    }

    /// A reply that arrives within `wait`, or none.
    pub async fn reply_within(&mut self, wait: Duration) -> Option<Reply> {
        tokio::time::timeout(wait, self.reply())
            .await
            .ok()
            .flatten()
    }
}

fn error_code(body: &[u8]) -> String {
    let mut fields = body.split(|b| *b == 0);
    fields
        .find_map(|f| f.strip_prefix(b"C"))
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .unwrap_or_default()
}

/// Extended-protocol frames.
pub fn parse(out: &mut BytesMut, name: &str, sql: &str) {
    frontend::parse(name, sql, std::iter::empty(), out).unwrap();
}

pub fn bind_execute(out: &mut BytesMut, statement: &str) {
    frontend::bind(
        "",
        statement,
        std::iter::empty::<i16>(),
        std::iter::empty::<Option<&[u8]>>(),
        |_: Option<&[u8]>, _: &mut BytesMut| Ok(postgres_protocol::IsNull::Yes),
        std::iter::empty::<i16>(),
        out,
    )
    .map_err(|_| ())
    .unwrap();
    frontend::execute("", 0, out).unwrap();
}

pub fn sync(out: &mut BytesMut) {
    frontend::sync(out);
}
