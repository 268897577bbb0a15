//! Builders for the backend messages the proxy writes itself (authentication, errors, the startup reply, answers
//! to statements it handles). Forwarded frames are never built here: they travel as the bytes that arrived.

use std::borrow::Cow;

use bytes::{BufMut, BytesMut};

use super::tag::{backend as be, field, frontend as fe};

/// Writes one frame: tag, a length patched in afterwards, and the body `f` appends.
fn frame(buf: &mut BytesMut, tag: u8, f: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_u32(0);
    f(buf);
    let len = (buf.len() - at) as u32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn cstr(buf: &mut BytesMut, s: &str) {
    // A NUL inside would end the string early on the client; such text never comes from us, but be safe.
    buf.extend(s.bytes().filter(|&b| b != 0));
    buf.put_u8(0);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// An error the proxy reports to a client itself, with its SQLSTATE. Only text meant for the client goes here;
/// internal error chains are logged, not sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    pub severity: Severity,
    pub code: Cow<'static, str>,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl PgError {
    pub fn error(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        PgError {
            severity: Severity::Error,
            code: code.into(),
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn fatal(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        PgError {
            severity: Severity::Fatal,
            ..PgError::error(code, message)
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Appends this error as an ErrorResponse frame.
    pub fn encode(&self, buf: &mut BytesMut) {
        frame(buf, be::ERROR_RESPONSE, |b| {
            let fields = [
                (field::SEVERITY, Some(self.severity.as_str())),
                (field::SEVERITY_RAW, Some(self.severity.as_str())),
                (field::CODE, Some(&*self.code)),
                (field::MESSAGE, Some(self.message.as_str())),
                (field::DETAIL, self.detail.as_deref()),
                (field::HINT, self.hint.as_deref()),
            ];
            for (code, value) in fields {
                if let Some(v) = value {
                    b.put_u8(code);
                    cstr(b, v);
                }
            }
            b.put_u8(0);
        });
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.severity.as_str(),
            self.code,
            self.message
        )
    }
}

pub fn auth_ok(buf: &mut BytesMut) {
    frame(buf, be::AUTHENTICATION, |b| b.put_i32(0));
}

pub fn auth_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    frame(buf, be::AUTHENTICATION, |b| {
        b.put_i32(5);
        b.put_slice(&salt);
    });
}

pub fn auth_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    frame(buf, be::AUTHENTICATION, |b| {
        b.put_i32(10);
        for m in mechanisms {
            cstr(b, m);
        }
        b.put_u8(0);
    });
}

pub fn auth_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    frame(buf, be::AUTHENTICATION, |b| {
        b.put_i32(11);
        b.put_slice(data);
    });
}

pub fn auth_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    frame(buf, be::AUTHENTICATION, |b| {
        b.put_i32(12);
        b.put_slice(data);
    });
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    frame(buf, be::PARAMETER_STATUS, |b| {
        cstr(b, name);
        cstr(b, value);
    });
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    frame(buf, be::BACKEND_KEY_DATA, |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    });
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    frame(buf, be::READY_FOR_QUERY, |b| b.put_u8(status));
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    frame(buf, be::COMMAND_COMPLETE, |b| cstr(b, tag));
}

/// A frontend Execute of a portal that cannot exist: the backend answers it with an error at exactly this
/// point of an extended-protocol batch, which the proxy then replaces with its own.
pub fn execute_refused(buf: &mut BytesMut) {
    frame(buf, be::ERROR_RESPONSE, |b| {
        cstr(b, "pgtenant refused this statement");
        b.put_i32(0);
    });
}

pub fn parse_complete(buf: &mut BytesMut) {
    buf.extend_from_slice(b"1\0\0\0\x04");
}

/// A frontend Sync (the proxy sends one to end an extended-protocol batch it refused part of).
pub fn sync(buf: &mut BytesMut) {
    frame(buf, be::PARAMETER_STATUS, |_| {});
}

pub fn empty_query_response(buf: &mut BytesMut) {
    frame(buf, be::EMPTY_QUERY, |_| {});
}

/// NegotiateProtocolVersion: the newest minor version we speak and the protocol options we did not recognise.
pub fn negotiate_protocol_version(buf: &mut BytesMut, minor: u16, unrecognised: &[&str]) {
    frame(buf, be::NEGOTIATE_PROTOCOL_VERSION, |b| {
        b.put_i32(minor as i32);
        b.put_i32(unrecognised.len() as i32);
        for o in unrecognised {
            cstr(b, o);
        }
    });
}

/// A one-column text result: RowDescription, one DataRow, CommandComplete (used to answer `SHOW`).
pub fn single_text_row(buf: &mut BytesMut, column: &str, value: Option<&str>, tag: &str) {
    row_description(buf, &[column]);
    data_row(buf, &[value]);
    command_complete(buf, tag);
}

/// RowDescription of text columns.
pub fn row_description(buf: &mut BytesMut, columns: &[&str]) {
    frame(buf, be::ROW_DESCRIPTION, |b| {
        b.put_i16(columns.len() as i16);
        for c in columns {
            cstr(b, c);
            b.put_i32(0); // table oid
            b.put_i16(0); // column number
            b.put_i32(25); // text
            b.put_i16(-1);
            b.put_i32(-1);
            b.put_i16(0); // text format
        }
    });
}

/// One DataRow of text values (`None`: NULL).
pub fn data_row(buf: &mut BytesMut, values: &[Option<&str>]) {
    frame(buf, be::DATA_ROW, |b| {
        b.put_i16(values.len() as i16);
        for v in values {
            match v {
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.put_slice(v.as_bytes());
                }
                None => b.put_i32(-1),
            }
        }
    });
}

/// A frontend Parse, Bind and Execute of `sql` as the unnamed statement and portal, no parameters, text results,
/// and no Sync: the proxy's own statements sent ahead of a client's (frontend::pooling says why no Sync).
pub fn execute_unnamed(buf: &mut BytesMut, sql: &str) {
    frame(buf, fe::PARSE, |b| {
        cstr(b, "");
        cstr(b, sql);
        b.put_i16(0);
    });
    frame(buf, fe::BIND, |b| {
        cstr(b, "");
        cstr(b, "");
        // No parameter formats, no parameters, no result formats.
        b.put_i16(0);
        b.put_i16(0);
        b.put_i16(0);
    });
    frame(buf, fe::EXECUTE, |b| {
        cstr(b, "");
        b.put_i32(0);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_layout() {
        let mut buf = BytesMut::new();
        PgError::fatal("28P01", "bad").encode(&mut buf);
        assert_eq!(buf[0], b'E');
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        assert_eq!(len + 1, buf.len());
        assert_eq!(&buf[5..], b"SFATAL\0VFATAL\0C28P01\0Mbad\0\0");
    }

    #[test]
    fn ready_for_query_layout() {
        let mut buf = BytesMut::new();
        ready_for_query(&mut buf, b'I');
        assert_eq!(&buf[..], b"Z\0\0\0\x05I");
    }
}
