//! Password exchanges with a client: SCRAM-SHA-256, md5 and trust, per the user's configured credential.

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::auth::scram::{constant_time_eq, Binding, ScramExchange, MAX_SASL_MESSAGE};
use crate::auth::{Credential, ScramVerifier, UserEntry, Users};
use crate::context::Shared;
use crate::errors::ClientError;
use crate::net::Stream;
use crate::protocol::tag::frontend as fe;
use crate::protocol::{messages, PgError};

/// Why a login did not get through authentication.
#[derive(Debug)]
pub enum AuthFailure {
    /// The client hung up (psql does this to prompt for a password, then reconnects).
    Closed,
    /// Tell the client this, then close.
    Refused(PgError),
}

impl From<std::io::Error> for AuthFailure {
    fn from(_: std::io::Error) -> Self {
        AuthFailure::Closed
    }
}

fn failed(raw_user: &str) -> AuthFailure {
    AuthFailure::Refused(ClientError::PasswordFailed(raw_user.to_owned()).into())
}

fn protocol(msg: &str) -> AuthFailure {
    AuthFailure::Refused(PgError::from(ClientError::Protocol(msg.to_owned())))
}

/// Authenticates `user` (the configured name; `raw_user` is what the client sent, which md5 hashes with).
/// Unknown users go through a SCRAM exchange that cannot succeed, with a salt derived from their name, so they
/// look like wrong passwords of known users: same messages, same salt on every attempt.
pub async fn authenticate(
    shared: &Shared,
    stream: &mut Stream,
    buf: &mut BytesMut,
    users: &Users,
    user: &str,
    raw_user: &str,
) -> Result<Arc<UserEntry>, AuthFailure> {
    let entry = users.get(user).cloned();
    // Over TLS the client may bind the exchange to our certificate.
    let end_point = if stream.is_tls() {
        shared.tls_end_point.as_deref()
    } else {
        None
    };
    let ok = match entry.as_deref().map(|e| &e.credential) {
        Some(Credential::Trust) => true,
        Some(Credential::Md5 { password }) => md5(stream, buf, password, raw_user).await?,
        Some(Credential::Scram(v)) => scram(stream, buf, v.clone(), end_point).await?,
        None => {
            let salt = shared
                .key
                .mac("pgtenant fake scram salt", &[user.as_bytes()]);
            let verifier = ScramVerifier::impossible(&salt[..16]);
            scram(stream, buf, verifier, end_point).await?
        }
    };
    match entry {
        Some(e) if ok => Ok(e),
        _ => Err(failed(raw_user)),
    }
}

/// Reads one password-class message (`p`) and returns its body.
async fn read_password_message(
    stream: &mut Stream,
    buf: &mut BytesMut,
) -> Result<BytesMut, AuthFailure> {
    loop {
        if buf.len() >= 5 {
            let tag = buf[0];
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if tag == fe::TERMINATE {
                return Err(AuthFailure::Closed);
            }
            if tag != fe::PASSWORD {
                return Err(protocol("expected a password response"));
            }
            if !(4..=MAX_SASL_MESSAGE + 64).contains(&len) {
                return Err(protocol("invalid password message length"));
            }
            if buf.len() > len {
                let mut frame = buf.split_to(len + 1);
                frame.advance(5);
                return Ok(frame);
            }
        }
        buf.reserve(1024);
        if stream.read_buf(buf).await? == 0 {
            return Err(AuthFailure::Closed);
        }
    }
}

async fn send(stream: &mut Stream, out: &BytesMut) -> Result<(), AuthFailure> {
    stream.write_all(out).await?;
    stream.flush().await?;
    Ok(())
}

async fn md5(
    stream: &mut Stream,
    buf: &mut BytesMut,
    password: &str,
    raw_user: &str,
) -> Result<bool, AuthFailure> {
    let mut salt = [0u8; 4];
    rand::thread_rng().fill_bytes(&mut salt);
    let mut out = BytesMut::new();
    messages::auth_md5(&mut out, salt);
    send(stream, &out).await?;
    let body = read_password_message(stream, buf).await?;
    let answer = body
        .strip_suffix(&[0])
        .ok_or_else(|| protocol("invalid password message"))?;
    let expected =
        postgres_protocol::authentication::md5_hash(raw_user.as_bytes(), password.as_bytes(), salt);
    Ok(constant_time_eq(answer, expected.as_bytes()))
}

async fn scram(
    stream: &mut Stream,
    buf: &mut BytesMut,
    verifier: ScramVerifier,
    end_point: Option<&[u8]>,
) -> Result<bool, AuthFailure> {
    let mut out = BytesMut::new();
    if end_point.is_some() {
        messages::auth_sasl(&mut out, &["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
    } else {
        messages::auth_sasl(&mut out, &["SCRAM-SHA-256"]);
    }
    send(stream, &out).await?;

    let initial = read_password_message(stream, buf).await?;
    let (mechanism, data) = split_initial_response(&initial)
        .ok_or_else(|| protocol("invalid SASL initial response"))?;
    let binding = match (mechanism, end_point) {
        (b"SCRAM-SHA-256-PLUS", Some(data)) => Binding::Plus(data),
        (b"SCRAM-SHA-256", offered) => Binding::Plain {
            plus_offered: offered.is_some(),
        },
        _ => {
            return Err(protocol(
                "client selected an invalid SASL authentication mechanism",
            ))
        }
    };
    let (exchange, server_first) = match ScramExchange::start(verifier, data, binding) {
        Ok(x) => x,
        Err(e) => return Err(protocol(&e.to_string())),
    };
    out.clear();
    messages::auth_sasl_continue(&mut out, server_first.as_bytes());
    send(stream, &out).await?;

    let response = read_password_message(stream, buf).await?;
    match exchange.finish(&response) {
        Ok(server_final) => {
            out.clear();
            messages::auth_sasl_final(&mut out, server_final.as_bytes());
            send(stream, &out).await?;
            Ok(true)
        }
        Err(_) => Ok(false),
    }
}

/// SASLInitialResponse body: mechanism name, then a length-prefixed (or -1) initial message.
fn split_initial_response(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = memchr::memchr(0, body)?;
    let (mechanism, rest) = (&body[..end], &body[end + 1..]);
    let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    let data = &rest[4..];
    match len {
        -1 => Some((mechanism, &[])),
        n if n >= 0 && n as usize == data.len() => Some((mechanism, data)),
        _ => None,
    }
}
