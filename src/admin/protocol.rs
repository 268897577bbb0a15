//! Admin requests and responses (DESIGN section 6), without I/O: one JSON object per line in, one out.
//! `{"cmd":"pause","tenant":"acme","timeout_ms":2000}` -> `{"ok":true,"result":{...}}` or
//! `{"ok":false,"error":{"code":"unknown_tenant","message":"..."}}`.

use serde_json::{json, Map, Value};

use crate::tenant::{valid_identifier, TenantId};

/// Longest request line accepted.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Most audit lines one request may ask for.
pub const MAX_AUDIT_TAIL: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Tenants,
    TenantGet {
        tenant: TenantId,
    },
    TenantSet {
        tenant: TenantId,
        backend: String,
        database: Option<String>,
        schema: Option<String>,
    },
    TenantRemove {
        tenant: TenantId,
    },
    Backends,
    Pause {
        tenant: TenantId,
        timeout_ms: Option<u64>,
    },
    Resume {
        tenant: TenantId,
    },
    Stats,
    Reload,
    Audit {
        tail: usize,
    },
}

impl Request {
    pub fn command(&self) -> &'static str {
        match self {
            Request::Tenants => "tenants",
            Request::TenantGet { .. } => "tenant.get",
            Request::TenantSet { .. } => "tenant.set",
            Request::TenantRemove { .. } => "tenant.remove",
            Request::Backends => "backends",
            Request::Pause { .. } => "pause",
            Request::Resume { .. } => "resume",
            Request::Stats => "stats",
            Request::Reload => "reload",
            Request::Audit { .. } => "audit",
        }
    }

    /// Commands that change the routing table; they run one at a time.
    pub fn changes_routes(&self) -> bool {
        matches!(
            self,
            Request::TenantSet { .. } | Request::TenantRemove { .. } | Request::Reload
        )
    }

    /// Commands that change something (and so are written to the audit log).
    pub fn mutates(&self) -> bool {
        matches!(
            self,
            Request::TenantSet { .. }
                | Request::TenantRemove { .. }
                | Request::Pause { .. }
                | Request::Resume { .. }
                | Request::Reload
        )
    }
}

/// A refused request: a stable code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminError {
    pub code: &'static str,
    pub message: String,
}

impl AdminError {
    pub fn new(code: &'static str, message: impl Into<String>) -> AdminError {
        AdminError {
            code,
            message: message.into(),
        }
    }
}

pub fn ok(result: Value) -> String {
    json!({"ok": true, "result": result}).to_string()
}

pub fn err(e: &AdminError) -> String {
    json!({"ok": false, "error": {"code": e.code, "message": e.message}}).to_string()
}

/// Parses one request line. `token` is the field a TCP listener requires; it is returned, not checked, here.
pub fn parse(line: &[u8]) -> Result<(Request, Option<String>), AdminError> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(AdminError::new(
            "request_too_large",
            format!("requests are limited to {MAX_REQUEST_BYTES} bytes"),
        ));
    }
    let value: Value = serde_json::from_slice(line)
        .map_err(|e| AdminError::new("bad_json", format!("request is not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(AdminError::new("bad_json", "request must be a JSON object"));
    };
    let a = Args(&obj);
    let token = a.opt_str("token")?;
    let cmd = a.str("cmd")?;
    let allowed: &[&str] = match cmd {
        "tenants" | "backends" | "stats" | "reload" => &[],
        "tenant.get" | "tenant.remove" | "resume" => &["tenant"],
        "tenant.set" => &["tenant", "backend", "database", "schema"],
        "pause" => &["tenant", "timeout_ms"],
        "audit" => &["tail"],
        other => {
            return Err(AdminError::new(
                "unknown_command",
                format!("unknown command {:?}", truncate(other)),
            ));
        }
    };
    if let Some(k) = obj
        .keys()
        .find(|k| !["cmd", "token"].contains(&k.as_str()) && !allowed.contains(&k.as_str()))
    {
        return Err(AdminError::new(
            "invalid_argument",
            format!("{cmd} takes no argument {:?}", truncate(k)),
        ));
    }
    let request = match cmd {
        "tenants" => Request::Tenants,
        "backends" => Request::Backends,
        "stats" => Request::Stats,
        "reload" => Request::Reload,
        "tenant.get" => Request::TenantGet {
            tenant: a.tenant()?,
        },
        "tenant.remove" => Request::TenantRemove {
            tenant: a.tenant()?,
        },
        "resume" => Request::Resume {
            tenant: a.tenant()?,
        },
        "pause" => Request::Pause {
            tenant: a.tenant()?,
            timeout_ms: a.opt_u64("timeout_ms", 3_600_000)?,
        },
        "tenant.set" => Request::TenantSet {
            tenant: a.tenant()?,
            backend: a.name("backend")?,
            database: a.opt_ident("database")?,
            schema: a.opt_ident("schema")?,
        },
        "audit" => Request::Audit {
            tail: a.opt_u64("tail", MAX_AUDIT_TAIL as u64)?.unwrap_or(20) as usize,
        },
        _ => unreachable!("listed above"),
    };
    Ok((request, token))
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

struct Args<'a>(&'a Map<String, Value>);

impl Args<'_> {
    fn opt_str(&self, key: &str) -> Result<Option<String>, AdminError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(AdminError::new(
                "invalid_argument",
                format!("{key} must be a string"),
            )),
        }
    }

    fn str(&self, key: &str) -> Result<&str, AdminError> {
        match self.0.get(key) {
            Some(Value::String(s)) => Ok(s),
            None | Some(Value::Null) => Err(AdminError::new(
                "missing_argument",
                format!("{key} is required"),
            )),
            Some(_) => Err(AdminError::new(
                "invalid_argument",
                format!("{key} must be a string"),
            )),
        }
    }

    fn tenant(&self) -> Result<TenantId, AdminError> {
        TenantId::parse(self.str("tenant")?)
            .map_err(|e| AdminError::new("invalid_argument", e.to_string()))
    }

    fn name(&self, key: &str) -> Result<String, AdminError> {
        let s = self.str(key)?;
        if !valid_identifier(s) {
            return Err(AdminError::new(
                "invalid_argument",
                format!("{key} must match [A-Za-z0-9_-]{{1,63}}"),
            ));
        }
        Ok(s.to_owned())
    }

    /// Database and schema names: any text PostgreSQL accepts as an identifier (1 to 63 bytes, no NUL); they are
    /// always quoted where they reach SQL.
    fn opt_ident(&self, key: &str) -> Result<Option<String>, AdminError> {
        match self.opt_str(key)? {
            None => Ok(None),
            Some(s) if !s.is_empty() && s.len() <= 63 && !s.contains('\0') => Ok(Some(s)),
            Some(_) => Err(AdminError::new(
                "invalid_argument",
                format!("{key} must be 1 to 63 bytes"),
            )),
        }
    }

    fn opt_u64(&self, key: &str, max: u64) -> Result<Option<u64>, AdminError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if v <= max => Ok(Some(v)),
                _ => Err(AdminError::new(
                    "invalid_argument",
                    format!("{key} must be a whole number up to {max}"),
                )),
            },
            Some(_) => Err(AdminError::new(
                "invalid_argument",
                format!("{key} must be a number"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(line: &str) -> &'static str {
        parse(line.as_bytes()).unwrap_err().code
    }

    #[test]
    fn parses_requests() {
        let (r, t) =
            parse(br#"{"cmd":"pause","tenant":"acme","timeout_ms":250,"token":"x"}"#).unwrap();
        assert_eq!(
            r,
            Request::Pause {
                tenant: TenantId::parse("acme").unwrap(),
                timeout_ms: Some(250)
            }
        );
        assert_eq!(t.as_deref(), Some("x"));
        let (r, _) =
            parse(br#"{"cmd":"tenant.set","tenant":"a","backend":"b","schema":"Weird \"S\""}"#)
                .unwrap();
        assert!(matches!(
            r,
            Request::TenantSet {
                schema: Some(_),
                database: None,
                ..
            }
        ));
        assert_eq!(
            parse(br#"{"cmd":"audit"}"#).unwrap().0,
            Request::Audit { tail: 20 }
        );
    }

    #[test]
    fn every_refusal_has_its_code() {
        assert_eq!(code("{"), "bad_json");
        assert_eq!(code("[1]"), "bad_json");
        assert_eq!(code(r#"{"cmd":"explode"}"#), "unknown_command");
        assert_eq!(code(r#"{"tenant":"a"}"#), "missing_argument");
        assert_eq!(code(r#"{"cmd":"pause"}"#), "missing_argument");
        assert_eq!(
            code(r#"{"cmd":"pause","tenant":"a b"}"#),
            "invalid_argument"
        );
        assert_eq!(
            code(r#"{"cmd":"pause","tenant":"a","timeout_ms":-1}"#),
            "invalid_argument"
        );
        assert_eq!(
            code(r#"{"cmd":"tenants","tenant":"a"}"#),
            "invalid_argument"
        );
        assert_eq!(
            code(r#"{"cmd":"tenant.set","tenant":"a","backend":"x y"}"#),
            "invalid_argument"
        );
        assert_eq!(
            code(r#"{"cmd":"tenant.set","tenant":"a","backend":"b","schema":""}"#),
            "invalid_argument"
        );
        assert_eq!(
            code(r#"{"cmd":"audit","tail":100000000}"#),
            "invalid_argument"
        );
        let big = format!(
            r#"{{"cmd":"tenants","x":"{}"}}"#,
            "a".repeat(MAX_REQUEST_BYTES)
        );
        assert_eq!(code(&big), "request_too_large");
    }
}
