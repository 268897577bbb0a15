//! The few things the relay reads out of frames it forwards. Each takes a whole frame (tag included) and returns
//! `None` on anything malformed: a frame the proxy cannot read is still forwarded, and the peer judges it.

use super::tag::{backend as be, field, status};

/// The transaction status byte of a ReadyForQuery frame (`I`, `T` or `E`).
pub fn ready_status(frame: &[u8]) -> Option<u8> {
    match frame {
        [be::READY_FOR_QUERY, 0, 0, 0, 5, s @ (status::IDLE | status::IN_BLOCK | status::FAILED)] => {
            Some(*s)
        }
        _ => None,
    }
}

/// Name and value of a ParameterStatus frame.
pub fn parameter_status(frame: &[u8]) -> Option<(&str, &str)> {
    let body = frame.get(5..)?;
    let mut parts = body.split(|&b| b == 0);
    let name = std::str::from_utf8(parts.next()?).ok()?;
    let value = std::str::from_utf8(parts.next()?).ok()?;
    Some((name, value))
}

/// Process id and secret key of a BackendKeyData frame.
pub fn backend_key_data(frame: &[u8]) -> Option<(i32, i32)> {
    match frame {
        [be::BACKEND_KEY_DATA, 0, 0, 0, 12, p @ ..] if p.len() == 8 => Some((
            i32::from_be_bytes([p[0], p[1], p[2], p[3]]),
            i32::from_be_bytes([p[4], p[5], p[6], p[7]]),
        )),
        _ => None,
    }
}

/// The statement text of a Query frame, without its terminating zero.
pub fn query_text(frame: &[u8]) -> Option<&[u8]> {
    frame.get(5..)?.strip_suffix(&[0])
}

/// Statement name and text of a Parse frame.
pub fn parse_statement(frame: &[u8]) -> Option<(&[u8], &[u8])> {
    let body = frame.get(5..)?;
    // Most Parse frames name no statement (the extended protocol's unnamed one): no search for its end.
    let name_end = match body.first() {
        Some(0) => 0,
        _ => memchr::memchr(0, body)?,
    };
    let rest = &body[name_end + 1..];
    let text_end = memchr::memchr(0, rest)?;
    Some((&body[..name_end], &rest[..text_end]))
}

/// Severity, SQLSTATE and message of an ErrorResponse or NoticeResponse frame.
pub fn error_fields(frame: &[u8]) -> Option<(String, String, String)> {
    let mut body = frame.get(5..)?;
    let (mut severity, mut code, mut message) = (String::new(), String::new(), String::new());
    while let Some((&field, rest)) = body.split_first() {
        if field == 0 {
            break;
        }
        let end = memchr::memchr(0, rest)?;
        let value = String::from_utf8_lossy(&rest[..end]).into_owned();
        match field {
            field::SEVERITY_RAW => severity = value,
            field::SEVERITY if severity.is_empty() => severity = value,
            field::CODE => code = value,
            field::MESSAGE => message = value,
            _ => {}
        }
        body = &rest[end + 1..];
    }
    Some((severity, code, message))
}

/// The SQLSTATE of the notice the migration's capture trigger sends, once per transaction, in the proxy's own
/// backend sessions (`pgtenant.note()`, see `migration::capture`).
pub const CAPTURE_NOTICE_CODE: &[u8] = b"PT001";

/// True for the capture trigger's NoticeResponse: the transaction wrote rows of a tenant being migrated, however
/// it wrote them (in a function called by a SELECT, a procedure, a `DO` block), which no CommandComplete tag
/// tells. Allocates nothing; notices are rare.
pub fn is_capture_notice(frame: &[u8]) -> bool {
    let (mut code, mut notice) = (false, false);
    let mut body = frame.get(5..).unwrap_or_default();
    while let Some((&field, rest)) = body.split_first() {
        if field == 0 {
            return code && notice;
        }
        let Some(end) = memchr::memchr(0, rest) else {
            return false;
        };
        let value = &rest[..end];
        match field {
            field::CODE => code = value == CAPTURE_NOTICE_CODE,
            // The severity as sent, never translated: an application's own WARNING with that code is its own.
            field::SEVERITY_RAW => notice = value == b"NOTICE",
            _ => {}
        }
        body = &rest[end + 1..];
    }
    false
}

/// True for the CommandComplete of a statement that changes rows (INSERT, UPDATE, DELETE, MERGE). A write hidden
/// in a function call is not seen here: the capture trigger's notice tells of it ([`is_capture_notice`]).
pub fn is_write_tag(frame: &[u8]) -> bool {
    let tag = frame.get(5..).unwrap_or(&[]);
    [&b"INSERT "[..], b"UPDATE ", b"DELETE ", b"MERGE "]
        .iter()
        .any(|w| tag.starts_with(w))
}

/// What a CommandComplete says about a commit: `COMMIT` (also of `END` and `COMMIT AND CHAIN`, after which the
/// session is in a new transaction and no idle ReadyForQuery follows), `COMMIT PREPARED` (a transaction prepared
/// by any session, whose writes no tag of this one showed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    No,
    Commit,
    Prepared,
}

pub fn commit_tag(frame: &[u8]) -> Commit {
    match frame.get(5..).unwrap_or(&[]) {
        b"COMMIT\0" => Commit::Commit,
        b"COMMIT PREPARED\0" => Commit::Prepared,
        _ => Commit::No,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_tags() {
        let cc = |t: &str| {
            let mut f = vec![b'C', 0, 0, 0, 0];
            f.extend_from_slice(t.as_bytes());
            f.push(0);
            f
        };
        assert!(is_write_tag(&cc("INSERT 0 1")));
        assert!(is_write_tag(&cc("UPDATE 3")));
        assert!(is_write_tag(&cc("DELETE 0")));
        assert!(is_write_tag(&cc("MERGE 2")));
        assert!(!is_write_tag(&cc("SELECT 1")));
        assert!(!is_write_tag(&cc("COMMIT")));
        assert!(!is_write_tag(b"C"));
        assert_eq!(commit_tag(&cc("COMMIT")), Commit::Commit);
        assert_eq!(commit_tag(&cc("COMMIT PREPARED")), Commit::Prepared);
        assert_eq!(commit_tag(&cc("COMMIT 1")), Commit::No);
        assert_eq!(commit_tag(&cc("ROLLBACK")), Commit::No);
        assert_eq!(commit_tag(b"C"), Commit::No);
    }

    #[test]
    fn capture_notice() {
        let notice = |fields: &[(u8, &str)]| {
            let mut f = vec![b'N', 0, 0, 0, 0];
            for (k, v) in fields {
                f.push(*k);
                f.extend_from_slice(v.as_bytes());
                f.push(0);
            }
            f.push(0);
            f
        };
        let ours = notice(&[
            (b'S', "NOTICE"),
            (b'V', "NOTICE"),
            (b'C', "PT001"),
            (b'M', "x"),
        ]);
        assert!(is_capture_notice(&ours));
        let no = |fields: &[(u8, &str)]| assert!(!is_capture_notice(&notice(fields)), "{fields:?}");
        no(&[(b'V', "NOTICE"), (b'C', "00000")]);
        no(&[(b'V', "NOTICE"), (b'C', "PT0011")]);
        no(&[(b'V', "NOTICE"), (b'M', "PT001")]);
        no(&[(b'V', "WARNING"), (b'C', "PT001")]);
        no(&[(b'C', "PT001")]);
        // Cut short: no terminator.
        assert!(!is_capture_notice(&ours[..ours.len() - 12]));
        assert!(!is_capture_notice(b"N"));
    }

    #[test]
    fn reads_frames() {
        assert_eq!(ready_status(b"Z\0\0\0\x05T"), Some(b'T'));
        assert_eq!(ready_status(b"Z\0\0\0\x05X"), None);
        assert_eq!(parameter_status(b"S\0\0\0\x0ba\0b\0"), Some(("a", "b")));
        assert_eq!(
            backend_key_data(b"K\0\0\0\x0c\0\0\0\x07\xff\xff\xff\xff"),
            Some((7, -1))
        );
        assert_eq!(query_text(b"Q\0\0\0\x0dselect 1\0"), Some(&b"select 1"[..]));
        assert_eq!(
            parse_statement(b"P\0\0\0\x0fs1\0select\0\0\0"),
            Some((&b"s1"[..], &b"select"[..]))
        );
        assert_eq!(
            parse_statement(b"P\0\0\0\x0d\0select\0\0\0"),
            Some((&b""[..], &b"select"[..]))
        );
        // No name and no text: cut short.
        assert_eq!(parse_statement(b"P\0\0\0\x04"), None);
        assert_eq!(parse_statement(b"P\0\0\0\x05\0"), None);
        let e = error_fields(b"E\0\0\0\x1aSERROR\0C42601\0Moops\0\0").unwrap();
        assert_eq!(e, ("ERROR".into(), "42601".into(), "oops".into()));
    }
}
