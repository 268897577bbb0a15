//! Admin requests (DESIGN section 6): one JSON object per line, `{"cmd":"pause","tenant":"acme",...}`. The
//! command table below is the only list of commands: the server parses with it, `ctl` builds requests with it,
//! and every front end dispatches the one [`Request`] type. The argument structs are also `ctl`'s command-line
//! arguments (clap), so a command's arguments are written once. Arguments are typed ([`super::args`]), so a request
//! that parses is valid; a refusal carries [`AdminCode::MissingArgument`] or [`AdminCode::InvalidArgument`]
//! and names the argument.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::args::{
    is_default, or_default, AuditTail, FilePath, Ident, PauseTimeout, Sql, TenantKey,
};
use super::code::{AdminCode, AdminError};
use crate::config::Isolation;
use crate::migration::ops::StartRequest;
use crate::migration::record::VerifyLevel;
use crate::routing::{BackendId, Route};
use crate::tenant::TenantId;

/// Longest request line accepted.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// What every command's arguments can say about themselves.
pub trait Args {
    /// The tenant the command is about (written to the audit log).
    fn tenant(&self) -> Option<&TenantId> {
        None
    }
}

macro_rules! commands {
    ($($name:literal => $variant:ident($args:ty),)*) => {
        /// One admin request: the command and its arguments.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum Request {
            $($variant($args),)*
        }

        impl Request {
            /// The command's wire name.
            pub fn command(&self) -> &'static str {
                match self {
                    $(Request::$variant(_) => $name,)*
                }
            }

            pub fn tenant(&self) -> Option<&TenantId> {
                match self {
                    $(Request::$variant(a) => a.tenant(),)*
                }
            }

            /// The request from its command name and the object of its arguments.
            pub fn from_args(cmd: &str, args: Value) -> Result<Request, AdminError> {
                match cmd {
                    $($name => decode(args).map(Request::$variant),)*
                    other => Err(AdminError::new(
                        AdminCode::UnknownCommand,
                        format!("unknown command {:?}", truncate(other)),
                    )),
                }
            }

            fn args_json(&self) -> serde_json::Result<Value> {
                match self {
                    $(Request::$variant(a) => serde_json::to_value(a),)*
                }
            }
        }
    };
}

commands! {
    "tenants" => Tenants(NoArgs),
    "clients" => Clients(NoArgs),
    "instances" => Instances(NoArgs),
    "tenant.get" => TenantGet(TenantArg),
    "tenant.set" => TenantSet(SetRoute),
    "tenant.grants" => TenantGrants(Grants),
    "tenant.remove" => TenantRemove(TenantArg),
    "tenant.backup" => TenantBackup(BackupArgs),
    "tenant.backups" => TenantBackups(BackupsArgs),
    "tenant.restore" => TenantRestore(RestoreArgs),
    "backends" => Backends(NoArgs),
    "pause" => Pause(Pause),
    "pause.all" => PauseAll(PauseAll),
    "resume.all" => ResumeAll(NoArgs),
    "tenant.kill" => TenantKill(TenantArg),
    "resume" => Resume(TenantArg),
    "stats" => Stats(NoArgs),
    "reload" => Reload(NoArgs),
    "audit" => Audit(Audit),
    "webhooks.log" => WebhooksLog(Audit),
    "migrate.start" => MigrateStart(StartRequest),
    "migrate.status" => MigrateStatus(MaybeTenant),
    "migrate.history" => MigrateHistory(HistoryArgs),
    "migrate.estimate" => MigrateEstimate(StartRequest),
    "migrate.queue" => MigrateQueue(NoArgs),
    "migrate.cancel" => MigrateCancel(TenantArg),
    "migrate.cutover" => MigrateCutover(TenantArg),
    "migrate.abort" => MigrateAbort(Abort),
    "migrate.pause" => MigratePause(TenantArg),
    "migrate.resume" => MigrateResume(TenantArg),
    "migrate.verify" => MigrateVerify(Verify),
    "migrate.repair" => MigrateRepair(TenantArg),
    "migrate.ddl" => MigrateDdl(Ddl),
    "migrate.rollback" => MigrateRollback(TenantArg),
    "migrate.finalize" => MigrateFinalize(Finalize),
    "migrate.drops" => MigrateDrops(NoArgs),
    "migrate.cancel_drop" => MigrateCancelDrop(TenantArg),
}

impl Request {
    /// Commands that change the routing table; they run one at a time.
    pub fn changes_routes(&self) -> bool {
        matches!(
            self,
            Request::TenantSet(_)
                | Request::TenantRemove(_)
                | Request::Reload(_)
                | Request::MigrateStart(_)
        )
    }

    /// Commands that change something (and so are written to the audit log).
    pub fn mutates(&self) -> bool {
        match self {
            Request::Tenants(_)
            | Request::Clients(_)
            | Request::Instances(_)
            | Request::TenantGet(_)
            | Request::Backends(_)
            | Request::Stats(_)
            | Request::Audit(_)
            | Request::WebhooksLog(_)
            | Request::TenantBackups(_)
            | Request::MigrateStatus(_)
            | Request::MigrateHistory(_)
            | Request::MigrateEstimate(_)
            | Request::MigrateQueue(_)
            | Request::MigrateDrops(_) => false,
            Request::TenantGrants(g) => g.apply,
            _ => true,
        }
    }

    /// The least HTTP API role that may run it: reads for viewers; pause, resume, kill, backups and migrations
    /// for operators; routes, grants, reload, restores and schema changes for admins.
    pub fn role(&self) -> crate::config::ApiRole {
        role_of(self.command())
    }

    /// The request as one JSON object (what `ctl` sends).
    pub fn to_json(&self) -> Value {
        let mut object = match self.args_json() {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        object.insert("cmd".into(), Value::String(self.command().into()));
        Value::Object(object)
    }
}

/// The least HTTP API role that may run command `cmd` (see [`Request::role`]).
pub fn role_of(cmd: &str) -> crate::config::ApiRole {
    use crate::config::ApiRole;
    match cmd {
        "tenant.set" | "tenant.remove" | "tenant.grants" | "reload" | "tenant.restore"
        | "migrate.ddl" => ApiRole::Admin,
        "tenants" | "clients" | "instances" | "tenant.get" | "backends" | "stats" | "audit"
        | "webhooks.log" | "tenant.backups" | "migrate.status" | "migrate.history"
        | "migrate.estimate" | "migrate.queue" | "migrate.drops" => ApiRole::Viewer,
        _ => ApiRole::Operator,
    }
}

/// Parses one request line. `token` is the field a TCP listener requires; it is returned, not checked, here.
pub fn parse(line: &[u8]) -> Result<(Request, Option<String>), AdminError> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(AdminError::new(
            AdminCode::RequestTooLarge,
            format!("requests are limited to {MAX_REQUEST_BYTES} bytes"),
        ));
    }
    let bad_json = |m: String| AdminError::new(AdminCode::BadJson, m);
    let value: Value = serde_json::from_slice(line)
        .map_err(|e| bad_json(format!("request is not valid JSON: {e}")))?;
    let Value::Object(mut object) = value else {
        return Err(bad_json("request must be a JSON object".into()));
    };
    let token = match object.remove("token") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => Some(t),
        Some(_) => return Err(AdminError::invalid("token must be a string")),
    };
    let cmd = match object.remove("cmd") {
        Some(Value::String(c)) => c,
        None | Some(Value::Null) => {
            return Err(AdminError::new(
                AdminCode::MissingArgument,
                "cmd is required",
            ))
        }
        Some(_) => return Err(AdminError::invalid("cmd must be a string")),
    };
    Ok((Request::from_args(&cmd, Value::Object(object))?, token))
}

impl<'de> Deserialize<'de> for Request {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Request, D::Error> {
        let value = Value::deserialize(d)?;
        let line = serde_json::to_vec(&value).map_err(serde::de::Error::custom)?;
        parse(&line)
            .map(|(r, _)| r)
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for Request {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

/// One command's arguments from their object, with the argument's name in any refusal.
fn decode<T: DeserializeOwned>(args: Value) -> Result<T, AdminError> {
    serde_path_to_error::deserialize(args).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        if let Some(field) = message
            .strip_prefix("missing field `")
            .and_then(|m| m.split('`').next())
        {
            return AdminError::new(AdminCode::MissingArgument, format!("{field} is required"));
        }
        if path == "." {
            AdminError::invalid(message)
        } else {
            AdminError::invalid(format!("{path}: {message}"))
        }
    })
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Commands without arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

impl Args for NoArgs {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct TenantArg {
    /// The tenant's name.
    pub tenant: TenantId,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct MaybeTenant {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<TenantId>,
}

/// `migrate.history`: which finished moves to list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct HistoryArgs {
    /// Only this tenant's moves.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<TenantId>,
    /// Only moves that ended since a date (2026-12-01, UTC) or a span back from now (7d, 12h, 30m).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// At most this many entries, newest first (default 100).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// `tenant.set`: the route's fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct SetRoute {
    /// The tenant's name.
    pub tenant: TenantId,
    /// The backend (a `[backends.NAME]` of the config) the tenant's connections go to.
    #[arg(long)]
    pub backend: BackendId,
    /// Database on the backend (default: the backend's, else the one the client asks for).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<Ident>,
    /// Schema of the tenant's own (its search_path); none for a database of its own.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Ident>,
    /// `role` (log in as the tenant's own role) or `shared` (the backend's serving role); default: the
    /// backend's `isolation`.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<Isolation>,
    /// Login role for isolation = role (default: the backend's tenant_role template).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Ident>,
    /// The tenant's rows live in shared tables told apart by this column.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_column: Option<Ident>,
    /// The tenant's value in that column (default: the tenant's name).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_key: Option<TenantKey>,
}

impl SetRoute {
    pub fn route(&self) -> Route {
        Route {
            backend: self.backend.clone(),
            database: self.database.clone().map(String::from),
            schema: self.schema.clone().map(String::from),
            isolation: self.isolation,
            role: self.role.clone().map(String::from),
            tenant_column: self.tenant_column.clone().map(String::from),
            tenant_key: self.tenant_key.clone().map(String::from),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    /// The tenant's name.
    pub tenant: TenantId,
    /// Run the SQL with the backend's admin credentials (else only print it).
    #[arg(long)]
    #[serde(
        default,
        deserialize_with = "or_default",
        skip_serializing_if = "is_default"
    )]
    pub apply: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Pause {
    /// The tenant's name.
    pub tenant: TenantId,
    /// How long to wait for open transactions to finish (default 10 000).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<PauseTimeout>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct PauseAll {
    /// How long to wait for open transactions to finish (default 10 000).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<PauseTimeout>,
}

impl Args for PauseAll {}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Audit {
    /// How many of the last entries to show.
    #[arg(long, default_value_t)]
    #[serde(default, deserialize_with = "or_default")]
    pub tail: AuditTail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Abort {
    /// The tenant's name.
    pub tenant: TenantId,
    /// Also delete what was copied to the target.
    #[arg(long)]
    #[serde(
        default,
        deserialize_with = "or_default",
        skip_serializing_if = "is_default"
    )]
    pub drop_target: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Verify {
    /// The tenant's name.
    pub tenant: TenantId,
    /// count, hash or full (default: the migration's level).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<VerifyLevel>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Ddl {
    /// The tenant's name.
    pub tenant: TenantId,
    /// The statement(s), run with the tenant's schema as search_path.
    #[arg(long)]
    pub sql: Sql,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Finalize {
    /// The tenant's name.
    pub tenant: TenantId,
    /// Delete the tenant's data on the source.
    #[arg(long)]
    #[serde(
        default,
        deserialize_with = "or_default",
        skip_serializing_if = "is_default"
    )]
    pub drop_source: bool,
    /// Keep the source's copy (fenced) for this long, then drop it: 30d, 12h, 30m, 45s. Scheduled, survives
    /// restarts, cancellable with `migrate cancel-drop`.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_source_after: Option<String>,
}

/// `tenant.backup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct BackupArgs {
    /// The tenant's name.
    pub tenant: TenantId,
    /// Directory the backup file goes to (default: <state_dir>/backups).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<FilePath>,
}

/// `tenant.backups`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct BackupsArgs {
    /// The tenant's name.
    pub tenant: TenantId,
    /// Directory to list (default: <state_dir>/backups).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<FilePath>,
}

/// `tenant.restore`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct RestoreArgs {
    /// The backup file (its checksums are checked before anything is restored).
    pub file: FilePath,
    /// The backend to restore to.
    #[arg(long)]
    pub to: BackendId,
    /// Restore as this tenant (default: the backup's).
    #[arg(long = "as")]
    #[serde(rename = "as", default, skip_serializing_if = "Option::is_none")]
    pub as_tenant: Option<TenantId>,
    /// Database on the target (default: the backend's, else the backup's).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<Ident>,
    /// Schema on the target (default: the backup's, with the tenant's name in it replaced by the new one).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Ident>,
    /// Rows of shared tables: the new tenant's value in the tenant column (default: its name).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_key: Option<TenantKey>,
}

impl Args for RestoreArgs {
    fn tenant(&self) -> Option<&TenantId> {
        self.as_tenant.as_ref()
    }
}

macro_rules! about_tenant {
    ($($t:ty),*) => {$(
        impl Args for $t {
            fn tenant(&self) -> Option<&TenantId> {
                Some(&self.tenant)
            }
        }
    )*};
}
about_tenant!(
    TenantArg,
    SetRoute,
    Grants,
    Pause,
    Abort,
    Verify,
    Ddl,
    Finalize,
    StartRequest,
    BackupArgs,
    BackupsArgs
);

impl Args for MaybeTenant {
    fn tenant(&self) -> Option<&TenantId> {
        self.tenant.as_ref()
    }
}

impl Args for HistoryArgs {
    fn tenant(&self) -> Option<&TenantId> {
        self.tenant.as_ref()
    }
}

impl Args for Audit {}

#[cfg(test)]
mod tests;
