//! The proxy's own requests on a backend connection it holds, outside any client: resets, rollbacks, and the
//! replay of a moved session's state.

use bytes::{Bytes, BytesMut};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::AsyncWriteExt;

use super::conn::ServerConn;
use super::connect::{next_message, server_error, ConnectError};
use crate::protocol::tag::status::IDLE;
use crate::routing::BackendId;

/// Sends each statement as its own Query (so `DISCARD ALL` is not inside an implicit transaction block),
/// pipelined, and reads every reply up to the matching ReadyForQuery. Returns the final transaction status.
pub async fn run_simple(
    backend: &BackendId,
    conn: &mut ServerConn,
    statements: &[&str],
) -> Result<u8, ConnectError> {
    let out = queries(backend, statements)?;
    send_and_read(backend, conn, &out, statements.len()).await
}

/// Each statement as its own Query frame.
fn queries(backend: &BackendId, statements: &[&str]) -> Result<BytesMut, ConnectError> {
    let mut out = BytesMut::new();
    for s in statements {
        frontend::query(s, &mut out).map_err(|e| ConnectError::Protocol {
            backend: backend.clone(),
            reason: e.to_string(),
        })?;
    }
    Ok(out)
}

/// Whether the session on `conn` ever made a temporary object: PostgreSQL keeps its temporary namespace for
/// the backend's whole life (`pg_my_temp_schema()` stays set after the objects are gone), so such a
/// connection is closed rather than handed to someone else.
pub async fn temp_schema_used(
    backend: &BackendId,
    conn: &mut ServerConn,
) -> Result<bool, ConnectError> {
    let value = query_value(backend, conn, "SELECT pg_my_temp_schema() <> 0").await?;
    Ok(value.as_deref() != Some("f"))
}

/// Runs one simple query and returns the first column of its first row (text), if any.
pub async fn query_value(
    backend: &BackendId,
    conn: &mut ServerConn,
    sql: &str,
) -> Result<Option<String>, ConnectError> {
    run_collect(backend, conn, &[sql]).await.map(|(v, _)| v)
}

/// Like [`run_simple`] (each statement its own Query, pipelined, in one round trip), also returning the first
/// column of the first row any of them returned. Any error fails the whole run.
pub async fn run_collect(
    backend: &BackendId,
    conn: &mut ServerConn,
    statements: &[&str],
) -> Result<(Option<String>, u8), ConnectError> {
    let out = queries(backend, statements)?;
    conn.stream
        .write_all(&out)
        .await
        .map_err(|source| ConnectError::Io {
            backend: backend.clone(),
            source,
        })?;
    let (mut value, mut error, mut status) = (None, None, IDLE);
    let mut remaining = statements.len();
    while remaining > 0 {
        match next_message(backend, conn).await? {
            Message::DataRow(row) if value.is_none() => {
                use fallible_iterator::FallibleIterator;
                let mut ranges = row.ranges();
                if let Ok(Some(Some(r))) = ranges.next() {
                    value = Some(String::from_utf8_lossy(&row.buffer()[r]).into_owned());
                }
            }
            Message::ErrorResponse(body) => {
                error.get_or_insert(server_error(backend, body.fields()));
            }
            Message::ParameterStatus(body) => {
                if let (Ok(k), Ok(v)) = (body.name(), body.value()) {
                    conn.set_param(k, v);
                }
            }
            Message::ReadyForQuery(body) => {
                remaining -= 1;
                status = body.status();
            }
            _ => {}
        }
    }
    match error {
        Some(e) => Err(e),
        None => Ok((value, status)),
    }
}

/// Sends Parse frames followed by one Sync and reads to the ReadyForQuery; any error fails the whole replay.
pub async fn run_parses(
    backend: &BackendId,
    conn: &mut ServerConn,
    frames: &[Bytes],
) -> Result<(), ConnectError> {
    if frames.is_empty() {
        return Ok(());
    }
    let mut out = BytesMut::new();
    for f in frames {
        out.extend_from_slice(f);
    }
    frontend::sync(&mut out);
    send_and_read(backend, conn, &out, 1).await.map(|_| ())
}

/// Writes `out` and reads replies up to the `readies`-th ReadyForQuery, keeping ParameterStatus values.
/// Returns the last transaction status, or the first error the backend reported.
async fn send_and_read(
    backend: &BackendId,
    conn: &mut ServerConn,
    out: &[u8],
    readies: usize,
) -> Result<u8, ConnectError> {
    conn.stream
        .write_all(out)
        .await
        .map_err(|source| ConnectError::Io {
            backend: backend.clone(),
            source,
        })?;
    let mut first_error = None;
    let mut remaining = readies;
    let mut status = IDLE;
    while remaining > 0 {
        match next_message(backend, conn).await? {
            Message::ReadyForQuery(body) => {
                remaining -= 1;
                status = body.status();
            }
            Message::ErrorResponse(body) => {
                first_error.get_or_insert(server_error(backend, body.fields()));
            }
            Message::ParameterStatus(body) => {
                if let (Ok(k), Ok(v)) = (body.name(), body.value()) {
                    conn.set_param(k, v);
                }
            }
            _ => {}
        }
    }
    first_error.map_or(Ok(status), Err)
}
