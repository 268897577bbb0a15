//! The psql admin console: a virtual database (`proxy.admin_database`, default `pgtenant`) that the users of
//! `proxy.admin_users` (every command) and `proxy.stats_users` (`SHOW` only) reach through the normal listener
//! with their own password, as PgBouncer's `pgbouncer` database. It speaks the simple query protocol and
//! answers with real row sets; commands run through the admin command table ([`crate::admin::cmd::execute`]),
//! audited as `console:<user>`.

pub mod parse;
pub mod rows;

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::admin::code::{AdminCode, AdminError};
use crate::admin::reply::{BackendList, ClientList, StatsView};
use crate::context::Shared;
use crate::net::stream::Stream;
use crate::protocol::messages::{self, PgError};
use crate::protocol::sqlstate;
use parse::{Listing, Statement};
use rows::RowSet;

/// Longest message the console reads (a query text).
const MAX_MESSAGE: usize = 1024 * 1024;

/// What a console user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Stats,
}

/// `user`'s console role, if any.
pub fn role_of(proxy: &crate::config::ProxyConfig, user: &str) -> Option<Role> {
    if proxy.admin_users.iter().any(|u| u == user) {
        Some(Role::Admin)
    } else if proxy.stats_users.iter().any(|u| u == user) {
        Some(Role::Stats)
    } else {
        None
    }
}

/// A console client that has logged in (authenticated by the login path); the permits it holds count it
/// against `max_client_conn` and its user's limit until it goes.
pub struct Login {
    pub user: String,
    pub role: Role,
    pub permits: Box<dyn Send + Sync>,
}

/// Runs the console for one client until it leaves.
pub async fn serve(shared: Arc<Shared>, mut stream: Stream, mut buf: BytesMut, login: Login) {
    let mut out = BytesMut::new();
    messages::auth_ok(&mut out);
    for (k, v) in [
        ("server_version", "15.0 (pgtenant console)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", ""),
    ] {
        messages::parameter_status(&mut out, k, v);
    }
    messages::backend_key_data(&mut out, 0, 0);
    messages::ready_for_query(&mut out, b'I');
    if stream.write_all(&out).await.is_err() {
        return;
    }
    tracing::info!(user = %login.user, role = ?login.role, "admin console session");
    let mut failed_batch = false;
    loop {
        let Some((tag, body)) = read_message(&mut stream, &mut buf).await else {
            return;
        };
        out.clear();
        match tag {
            b'Q' => {
                let text =
                    String::from_utf8_lossy(body.strip_suffix(b"\0").unwrap_or(&body)).into_owned();
                answer(&shared, &login, &text, &mut out).await;
                messages::ready_for_query(&mut out, b'I');
            }
            b'X' => return,
            b'S' => {
                failed_batch = false;
                messages::ready_for_query(&mut out, b'I');
            }
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'F' if !failed_batch => {
                failed_batch = true;
                PgError::error(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "the pgtenant console speaks the simple query protocol only (psql, or a driver's simple query)",
                )
                .encode(&mut out);
            }
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'F' => {}
            _ => {
                PgError::fatal(sqlstate::PROTOCOL_VIOLATION, "unexpected message").encode(&mut out);
                let _ = stream.write_all(&out).await;
                return;
            }
        }
        if stream.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// Reads one message (bounded), keeping what follows in `buf`.
async fn read_message(stream: &mut Stream, buf: &mut BytesMut) -> Option<(u8, BytesMut)> {
    loop {
        if buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if !(4..=MAX_MESSAGE).contains(&len) {
                return None;
            }
            if buf.len() > len {
                let tag = buf[0];
                buf.advance(5);
                return Some((tag, buf.split_to(len - 4)));
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(3600), stream.read_buf(buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
    }
}

/// Answers every statement of a query string; the first error ends it (as PostgreSQL does).
async fn answer(shared: &Arc<Shared>, login: &Login, text: &str, out: &mut BytesMut) {
    let statements = parse::statements(text);
    if statements.is_empty() {
        messages::empty_query_response(out);
        return;
    }
    for s in statements {
        match one(shared, login, s).await {
            Ok((set, tag)) => write_rows(out, &set, &tag),
            Err(e) => {
                to_pg(&e).encode(out);
                return;
            }
        }
    }
}

async fn one(
    shared: &Arc<Shared>,
    login: &Login,
    text: &str,
) -> Result<(RowSet, String), AdminError> {
    match parse::parse(text)? {
        Statement::Empty => Ok((RowSet::default(), String::new())),
        Statement::Show(listing) => Ok((local(shared, listing).await?, "SHOW".into())),
        Statement::Run { request, show, tag } => {
            if login.role == Role::Stats && request.mutates() {
                return Err(AdminError::new(
                    AdminCode::Unauthorized,
                    format!("{} is for admin_users; {} is a stats user", tag, login.user),
                ));
            }
            let actor = format!("console:{}", login.user);
            let result = crate::admin::cmd::execute(shared, *request, &actor).await?;
            Ok((
                rows::of_result(show.unwrap_or(Listing::Result), &result),
                tag,
            ))
        }
    }
}

/// Listings without a command of their own, made from the commands' answers or the proxy's state.
async fn local(shared: &Arc<Shared>, listing: Listing) -> Result<RowSet, AdminError> {
    let run = |cmd: &'static str| {
        let shared = shared.clone();
        async move {
            let req =
                crate::admin::request::Request::from_args(cmd, Value::Object(Default::default()))?;
            crate::admin::cmd::execute(&shared, req, "console").await
        }
    };
    Ok(match listing {
        Listing::Pools => {
            let list: BackendList = typed(run("backends").await?)?;
            let mode = format!("{:?}", shared.config.load().proxy.pool_mode).to_lowercase();
            rows::pools(&list, &mode)
        }
        Listing::Servers => {
            let backends: BackendList = typed(run("backends").await?)?;
            let clients: ClientList = typed(run("clients").await?)?;
            rows::servers(&backends, &clients)
        }
        Listing::Stats => {
            let view: StatsView = typed(run("stats").await?)?;
            rows::stats(&view)
        }
        Listing::Config => rows::config(shared),
        Listing::Version => rows::version(),
        _ => rows::help(),
    })
}

fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, AdminError> {
    serde_json::from_value(v).map_err(|e| AdminError::invalid(e.to_string()))
}

fn write_rows(out: &mut BytesMut, set: &RowSet, tag: &str) {
    if tag.is_empty() {
        messages::empty_query_response(out);
        return;
    }
    let columns: Vec<&str> = set.columns.iter().map(String::as_str).collect();
    messages::row_description(out, &columns);
    for r in &set.rows {
        let values: Vec<Option<&str>> = r.iter().map(Option::as_deref).collect();
        messages::data_row(out, &values);
    }
    let tag = if tag == "SHOW" {
        format!("SHOW {}", set.rows.len())
    } else {
        tag.to_owned()
    };
    messages::command_complete(out, &tag);
}

/// An admin refusal as a PostgreSQL error with a fitting SQLSTATE.
fn to_pg(e: &AdminError) -> PgError {
    let code = match e.code {
        AdminCode::Unauthorized => sqlstate::INSUFFICIENT_PRIVILEGE,
        AdminCode::UnknownCommand | AdminCode::InvalidArgument | AdminCode::MissingArgument => {
            sqlstate::SYNTAX_ERROR
        }
        AdminCode::UnknownTenant | AdminCode::UnknownBackend => "42704",
        AdminCode::InvalidState => "55000",
        _ => sqlstate::INTERNAL_ERROR,
    };
    PgError::error(code, e.message.clone())
        .with_detail(format!("pgtenant code {}", e.code.as_str()))
}
