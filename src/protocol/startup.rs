//! The packets a client sends before the message protocol starts: SSLRequest, GSSENCRequest, CancelRequest and
//! StartupMessage. Each is a four-byte length (counting itself), a four-byte code, then a body.

use thiserror::Error;

/// PostgreSQL's `MAX_STARTUP_PACKET_LENGTH`.
pub const MAX_STARTUP_LEN: usize = 10_000;
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// At most this many startup parameters are accepted.
pub const MAX_PARAMS: usize = 64;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum StartupError {
    #[error("invalid length of startup packet")]
    BadLength,
    #[error("unsupported frontend protocol {0}.{1}: server supports 3.0 to 3.0")]
    UnsupportedProtocol(u16, u16),
    #[error("invalid startup packet layout: {0}")]
    Layout(&'static str),
    #[error("startup parameter is not valid UTF-8")]
    NotUtf8,
    #[error("duplicate startup parameter \"{0}\"")]
    Duplicate(String),
    #[error("too many startup parameters")]
    TooMany,
}

/// A decoded pre-protocol packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel { pid: i32, secret: i32 },
    Startup(StartupMessage),
}

/// A StartupMessage: the protocol version the client asked for and its parameters in the order sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub minor: u16,
    pub params: Vec<(String, String)>,
}

impl StartupMessage {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Protocol options (`_pq_.*`) the client asked for; we support none and say so.
    pub fn protocol_options(&self) -> Vec<&str> {
        self.params
            .iter()
            .filter(|(k, _)| k.starts_with("_pq_."))
            .map(|(k, _)| k.as_str())
            .collect()
    }
}

/// The total length announced by a packet header, once four bytes are buffered.
pub fn packet_len(buf: &[u8]) -> Result<Option<usize>, StartupError> {
    let Some(head) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if !(8..=MAX_STARTUP_LEN).contains(&len) {
        return Err(StartupError::BadLength);
    }
    Ok(Some(len))
}

/// Decodes one whole packet (length field included).
pub fn parse(packet: &[u8]) -> Result<StartupPacket, StartupError> {
    if packet_len(packet)? != Some(packet.len()) {
        return Err(StartupError::BadLength);
    }
    let code = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    let body = &packet[8..];
    match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE if !body.is_empty() => Err(StartupError::BadLength),
        SSL_REQUEST_CODE => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST_CODE => {
            let b: [u8; 8] = body.try_into().map_err(|_| StartupError::BadLength)?;
            Ok(StartupPacket::Cancel {
                pid: i32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                secret: i32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            })
        }
        _ => {
            let (major, minor) = ((code >> 16) as u16, (code & 0xffff) as u16);
            if major != 3 {
                return Err(StartupError::UnsupportedProtocol(major, minor));
            }
            Ok(StartupPacket::Startup(StartupMessage {
                minor,
                params: parse_params(body)?,
            }))
        }
    }
}

fn parse_params(mut body: &[u8]) -> Result<Vec<(String, String)>, StartupError> {
    let mut params: Vec<(String, String)> = Vec::new();
    loop {
        let name = take_cstr(&mut body)?;
        if name.is_empty() {
            break;
        }
        let value = take_cstr(&mut body)?;
        if params.len() == MAX_PARAMS {
            return Err(StartupError::TooMany);
        }
        let name = std::str::from_utf8(name).map_err(|_| StartupError::NotUtf8)?;
        let value = std::str::from_utf8(value).map_err(|_| StartupError::NotUtf8)?;
        if params.iter().any(|(k, _)| k == name) {
            return Err(StartupError::Duplicate(name.to_owned()));
        }
        params.push((name.to_owned(), value.to_owned()));
    }
    if !body.is_empty() {
        return Err(StartupError::Layout("bytes after the terminating zero"));
    }
    Ok(params)
}

fn take_cstr<'a>(body: &mut &'a [u8]) -> Result<&'a [u8], StartupError> {
    let end = memchr::memchr(0, body).ok_or(StartupError::Layout("missing terminator"))?;
    let s = &body[..end];
    *body = &body[end + 1..];
    Ok(s)
}

/// Splits a startup `options` value into arguments the way PostgreSQL's `pg_split_opts` does: white space
/// separates, a backslash takes the next character literally. A lone trailing backslash would make an empty
/// argument there (which the server refuses); it is dropped, so split and join round-trip.
pub fn split_options(options: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut cur = String::new();
    let mut in_arg = false;
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                in_arg = true;
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if is_c_space(c) => {
                if in_arg && !cur.is_empty() {
                    args.push(std::mem::take(&mut cur));
                }
                in_arg = false;
            }
            c => {
                in_arg = true;
                cur.push(c);
            }
        }
    }
    if in_arg && !cur.is_empty() {
        args.push(cur);
    }
    args
}

/// White space as PostgreSQL's `pg_split_opts` sees it (C's `isspace`): Rust's ASCII white space and the
/// vertical tab, which Rust leaves out. A split that kept `-c\x0brole=x` as one argument would let a setting
/// past the startup guards that PostgreSQL then applies.
fn is_c_space(c: char) -> bool {
    c.is_ascii_whitespace() || c == '\x0b'
}

/// The inverse of [`split_options`]: escapes white space and backslashes in each argument.
pub fn join_options<S: AsRef<str>>(args: &[S]) -> String {
    let mut out = String::new();
    for (i, arg) in args.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        for c in arg.as_ref().chars() {
            if c == '\\' || is_c_space(c) {
                out.push('\\');
            }
            out.push(c);
        }
    }
    out
}

/// A `-c name=value` / `--name=value` setting found in split options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionSetting {
    pub name: String,
    pub value: String,
}

/// Removes every setting of `name` (compared case-insensitively, as GUC names are) from the arguments and
/// returns their values in order. Other arguments are kept as they were.
pub fn take_setting(args: &mut Vec<String>, name: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut kept = Vec::with_capacity(args.len());
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        let (setting, used) = if arg == "-c" {
            (args.get(i + 1).map(|s| s.as_str()), 2)
        } else if let Some(s) = arg.strip_prefix("-c") {
            (Some(s), 1)
        } else if let Some(s) = arg.strip_prefix("--") {
            (Some(s), 1)
        } else {
            (None, 1)
        };
        let matched = setting
            .and_then(|s| s.split_once('='))
            .filter(|(k, _)| k.eq_ignore_ascii_case(name));
        match matched {
            Some((_, v)) => found.push(v.to_owned()),
            None => kept.extend(args[i..(i + used).min(args.len())].iter().cloned()),
        }
        i += used;
    }
    *args = kept;
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = 196608u32.to_be_bytes().to_vec();
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        p.extend(body);
        p
    }

    #[test]
    fn parses_startup_message() {
        let p = startup(&[("user", "app.acme"), ("database", "app")]);
        let StartupPacket::Startup(m) = parse(&p).unwrap() else {
            panic!("not a startup message")
        };
        assert_eq!(m.get("user"), Some("app.acme"));
        assert_eq!(m.get("database"), Some("app"));
        assert_eq!(m.minor, 0);
    }

    #[test]
    fn parses_special_requests() {
        let ssl = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        assert_eq!(parse(&ssl).unwrap(), StartupPacket::SslRequest);
        let mut cancel = vec![0, 0, 0, 16];
        cancel.extend(CANCEL_REQUEST_CODE.to_be_bytes());
        cancel.extend(42i32.to_be_bytes());
        cancel.extend((-7i32).to_be_bytes());
        assert_eq!(
            parse(&cancel).unwrap(),
            StartupPacket::Cancel {
                pid: 42,
                secret: -7
            }
        );
    }

    #[test]
    fn refuses_bad_packets() {
        assert_eq!(packet_len(&[0, 0, 0, 7]), Err(StartupError::BadLength));
        assert_eq!(packet_len(&[0, 1, 0, 0]), Err(StartupError::BadLength));
        let mut p = startup(&[("user", "a")]);
        p.pop();
        assert!(parse(&p).is_err());
        let dup = startup(&[("user", "a"), ("user", "b")]);
        assert_eq!(parse(&dup), Err(StartupError::Duplicate("user".into())));
        let mut v2 = startup(&[("user", "a")]);
        v2[4..8].copy_from_slice(&131072u32.to_be_bytes());
        assert_eq!(parse(&v2), Err(StartupError::UnsupportedProtocol(2, 0)));
    }

    #[test]
    fn options_round_trip_and_settings_are_taken() {
        let mut args =
            split_options(r"-c pgtenant.tenant=acme -c geqo=off --search_path=a\ b -cwork_mem=4MB");
        assert_eq!(
            args,
            vec![
                "-c",
                "pgtenant.tenant=acme",
                "-c",
                "geqo=off",
                "--search_path=a b",
                "-cwork_mem=4MB"
            ]
        );
        assert_eq!(take_setting(&mut args, "PGTENANT.TENANT"), vec!["acme"]);
        assert_eq!(
            join_options(&args),
            r"-c geqo=off --search_path=a\ b -cwork_mem=4MB"
        );
        assert_eq!(split_options(&join_options(&args)), args);
        // Found by the fuzzer: a trailing lone backslash.
        let odd = split_options("--a=b\t\\");
        assert_eq!(split_options(&join_options(&odd)), odd);
    }
}
