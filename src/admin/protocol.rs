//! Admin requests and responses (DESIGN section 6), without I/O: one JSON object per line in, one out.
//! `{"cmd":"pause","tenant":"acme","timeout_ms":2000}` -> `{"ok":true,"result":{...}}` or
//! `{"ok":false,"error":{"code":"unknown_tenant","message":"..."}}`.

use serde_json::{json, Map, Value};

use crate::config::Isolation;
use crate::migration::ops::StartRequest;
use crate::migration::record::{CutoverMode, VerifyLevel};
use crate::routing::Route;
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
        route: Route,
    },
    TenantGrants {
        tenant: TenantId,
        apply: bool,
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
    Migrate(Migrate),
}

/// The `migrate.*` commands (DESIGN section 6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Migrate {
    Start(StartRequest),
    Status {
        tenant: Option<TenantId>,
    },
    Cutover {
        tenant: TenantId,
    },
    Abort {
        tenant: TenantId,
        drop_target: bool,
    },
    Pause {
        tenant: TenantId,
    },
    Resume {
        tenant: TenantId,
    },
    Verify {
        tenant: TenantId,
        level: Option<VerifyLevel>,
    },
    Repair {
        tenant: TenantId,
    },
    Ddl {
        tenant: TenantId,
        sql: String,
    },
    Rollback {
        tenant: TenantId,
    },
    Finalize {
        tenant: TenantId,
        drop_source: bool,
    },
}

impl Migrate {
    pub fn command(&self) -> &'static str {
        match self {
            Migrate::Start(_) => "migrate.start",
            Migrate::Status { .. } => "migrate.status",
            Migrate::Cutover { .. } => "migrate.cutover",
            Migrate::Abort { .. } => "migrate.abort",
            Migrate::Pause { .. } => "migrate.pause",
            Migrate::Resume { .. } => "migrate.resume",
            Migrate::Verify { .. } => "migrate.verify",
            Migrate::Repair { .. } => "migrate.repair",
            Migrate::Ddl { .. } => "migrate.ddl",
            Migrate::Rollback { .. } => "migrate.rollback",
            Migrate::Finalize { .. } => "migrate.finalize",
        }
    }

    pub fn tenant(&self) -> Option<&TenantId> {
        match self {
            Migrate::Start(r) => Some(&r.tenant),
            Migrate::Status { tenant } => tenant.as_ref(),
            Migrate::Cutover { tenant }
            | Migrate::Abort { tenant, .. }
            | Migrate::Pause { tenant }
            | Migrate::Resume { tenant }
            | Migrate::Verify { tenant, .. }
            | Migrate::Repair { tenant }
            | Migrate::Ddl { tenant, .. }
            | Migrate::Rollback { tenant }
            | Migrate::Finalize { tenant, .. } => Some(tenant),
        }
    }
}

impl Request {
    pub fn command(&self) -> &'static str {
        match self {
            Request::Tenants => "tenants",
            Request::TenantGet { .. } => "tenant.get",
            Request::TenantSet { .. } => "tenant.set",
            Request::TenantGrants { .. } => "tenant.grants",
            Request::TenantRemove { .. } => "tenant.remove",
            Request::Backends => "backends",
            Request::Pause { .. } => "pause",
            Request::Resume { .. } => "resume",
            Request::Stats => "stats",
            Request::Reload => "reload",
            Request::Audit { .. } => "audit",
            Request::Migrate(m) => m.command(),
        }
    }

    /// Commands that change the routing table; they run one at a time.
    pub fn changes_routes(&self) -> bool {
        matches!(
            self,
            Request::TenantSet { .. } | Request::TenantRemove { .. } | Request::Reload
        ) || matches!(self, Request::Migrate(Migrate::Start(_)))
    }

    /// Commands that change something (and so are written to the audit log).
    pub fn mutates(&self) -> bool {
        matches!(
            self,
            Request::TenantSet { .. }
                | Request::TenantGrants { apply: true, .. }
                | Request::TenantRemove { .. }
                | Request::Pause { .. }
                | Request::Resume { .. }
                | Request::Reload
        ) || matches!(self, Request::Migrate(m) if !matches!(m, Migrate::Status { .. }))
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
        "tenant.set" => &[
            "tenant",
            "backend",
            "database",
            "schema",
            "isolation",
            "role",
            "tenant_column",
            "tenant_key",
        ],
        "tenant.grants" => &["tenant", "apply"],
        "pause" => &["tenant", "timeout_ms"],
        "audit" => &["tail"],
        "migrate.start" => &[
            "tenant",
            "to",
            "database",
            "schema",
            "verify",
            "cutover",
            "allow_existing",
            "tenant_column",
            "tenant_key",
        ],
        "migrate.status" => &["tenant"],
        "migrate.cutover" | "migrate.pause" | "migrate.resume" | "migrate.repair"
        | "migrate.rollback" => &["tenant"],
        "migrate.abort" => &["tenant", "drop_target"],
        "migrate.finalize" => &["tenant", "drop_source"],
        "migrate.verify" => &["tenant", "level"],
        "migrate.ddl" => &["tenant", "sql"],
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
            route: Route {
                backend: a.name("backend")?,
                database: a.opt_ident("database")?,
                schema: a.opt_ident("schema")?,
                isolation: match a.opt_str("isolation")?.as_deref() {
                    None => None,
                    Some("role") => Some(Isolation::Role),
                    Some("shared") => Some(Isolation::Shared),
                    Some(_) => {
                        return Err(AdminError::new(
                            "invalid_argument",
                            "isolation must be \"role\" or \"shared\"",
                        ))
                    }
                },
                role: a.opt_ident("role")?,
                tenant_column: a.opt_ident("tenant_column")?,
                tenant_key: a.opt_key("tenant_key")?,
            },
        },
        "tenant.grants" => Request::TenantGrants {
            tenant: a.tenant()?,
            apply: a.opt_bool("apply")?,
        },
        "audit" => Request::Audit {
            tail: a.opt_u64("tail", MAX_AUDIT_TAIL as u64)?.unwrap_or(20) as usize,
        },
        m if m.starts_with("migrate.") => Request::Migrate(parse_migrate(m, &a)?),
        _ => unreachable!("listed above"),
    };
    Ok((request, token))
}

fn parse_migrate(cmd: &str, a: &Args) -> Result<Migrate, AdminError> {
    Ok(match cmd {
        "migrate.start" => Migrate::Start(StartRequest {
            tenant: a.tenant()?,
            to: a.name("to")?,
            database: a.opt_ident("database")?,
            schema: a.opt_ident("schema")?,
            verify: a.verify_level("verify")?.unwrap_or_default(),
            cutover: match a.opt_str("cutover")?.as_deref() {
                None | Some("manual") => CutoverMode::Manual,
                Some("auto") => CutoverMode::Auto,
                Some(_) => {
                    return Err(AdminError::new(
                        "invalid_argument",
                        "cutover must be \"auto\" or \"manual\"",
                    ))
                }
            },
            allow_existing: a.opt_bool("allow_existing")?,
            tenant_column: a.opt_ident("tenant_column")?,
            tenant_key: a.opt_key("tenant_key")?,
        }),
        "migrate.status" => Migrate::Status {
            tenant: match a.opt_str("tenant")? {
                Some(_) => Some(a.tenant()?),
                None => None,
            },
        },
        "migrate.cutover" => Migrate::Cutover {
            tenant: a.tenant()?,
        },
        "migrate.pause" => Migrate::Pause {
            tenant: a.tenant()?,
        },
        "migrate.resume" => Migrate::Resume {
            tenant: a.tenant()?,
        },
        "migrate.repair" => Migrate::Repair {
            tenant: a.tenant()?,
        },
        "migrate.ddl" => Migrate::Ddl {
            tenant: a.tenant()?,
            sql: match a.str("sql")? {
                s if s.trim().is_empty()
                    || s.len() > crate::migration::ddl::MAX_DDL_BYTES
                    || s.contains('\0') =>
                {
                    return Err(AdminError::new(
                        "invalid_argument",
                        "sql must be a non-empty statement of at most 64 KiB",
                    ))
                }
                s => s.to_owned(),
            },
        },
        "migrate.rollback" => Migrate::Rollback {
            tenant: a.tenant()?,
        },
        "migrate.abort" => Migrate::Abort {
            tenant: a.tenant()?,
            drop_target: a.opt_bool("drop_target")?,
        },
        "migrate.finalize" => Migrate::Finalize {
            tenant: a.tenant()?,
            drop_source: a.opt_bool("drop_source")?,
        },
        "migrate.verify" => Migrate::Verify {
            tenant: a.tenant()?,
            level: a.verify_level("level")?,
        },
        _ => unreachable!("listed in parse"),
    })
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

    /// A tenant key: 1 to 256 bytes, no NUL (a literal wherever it reaches SQL).
    fn opt_key(&self, key: &str) -> Result<Option<String>, AdminError> {
        match self.opt_str(key)? {
            Some(k) if k.is_empty() || k.len() > 256 || k.contains('\0') => Err(AdminError::new(
                "invalid_argument",
                format!("{key} must be 1 to 256 bytes"),
            )),
            k => Ok(k),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<bool, AdminError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(AdminError::new(
                "invalid_argument",
                format!("{key} must be true or false"),
            )),
        }
    }

    /// `count`, `hash` or `full`, or a comma list of them (the strongest counts).
    fn verify_level(&self, key: &str) -> Result<Option<VerifyLevel>, AdminError> {
        let Some(s) = self.opt_str(key)? else {
            return Ok(None);
        };
        let mut best = None;
        for part in s.split(',') {
            let level = VerifyLevel::parse(part.trim()).ok_or_else(|| {
                AdminError::new(
                    "invalid_argument",
                    format!("{key} must be count, hash or full"),
                )
            })?;
            best = best.max(Some(level));
        }
        Ok(best)
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
            Request::TenantSet { ref route, .. } if route.schema.is_some() && route.database.is_none()
        ));
        let (r, _) = parse(
            br#"{"cmd":"tenant.set","tenant":"a","backend":"b","isolation":"role","role":"t_a","tenant_column":"tid","tenant_key":"7"}"#,
        )
        .unwrap();
        assert!(matches!(
            r,
            Request::TenantSet { ref route, .. }
                if route.isolation == Some(Isolation::Role) && route.role.as_deref() == Some("t_a")
                    && route.tenant_key.as_deref() == Some("7")
        ));
        assert_eq!(
            parse(br#"{"cmd":"tenant.set","tenant":"a","backend":"b","isolation":"x"}"#)
                .unwrap_err()
                .code,
            "invalid_argument"
        );
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
