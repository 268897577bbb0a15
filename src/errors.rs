//! Every error pgtenant itself reports to a client (errors a backend sends pass through untouched, as
//! PostgreSQL wrote them). One type says what happened ([`ClientError`]), who caused it ([`Kind`]), and, in one
//! place ([`ClientError::sqlstate`]), which SQLSTATE the client sees, so the same failure never reaches two
//! clients under two codes.

use std::fmt;

use thiserror::Error;

use crate::protocol::messages::Severity;
use crate::protocol::{sqlstate, PgError};
use crate::tenant::TenantId;

/// Who caused an error (the same split pingora's error source and neon's error kind make).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The client asked for something it may not have, or spoke the protocol wrongly.
    Client,
    /// The tenant's backend failed or refused.
    Server,
    /// pgtenant itself could not do its part.
    Proxy,
    /// A limit, a timeout, a pause, a migration or a shutdown an operator configured or started.
    Operator,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Client => "client",
            Kind::Server => "server",
            Kind::Proxy => "proxy",
            Kind::Operator => "operator",
        }
    }
}

/// What went wrong, with what the message needs. The `Display` text is what the client reads.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ClientError {
    // The client's doing.
    #[error("no tenant selected")]
    NoTenant,
    #[error("tenant \"{0}\" does not exist")]
    UnknownTenant(String),
    #[error("{0}")]
    InvalidTenantName(String),
    #[error("user \"{user}\" may not use tenant \"{tenant}\"")]
    TenantNotAllowed { user: String, tenant: TenantId },
    #[error("this connection is bound to tenant \"{0}\" by its startup parameters")]
    TenantFixed(String),
    /// Two startup sources name different tenants.
    #[error("{0}")]
    TenantConflict(String),
    #[error(
        "no tenant named: use a user name suffix (user.tenant), options=-c pgtenant.tenant=NAME or a tenant database"
    )]
    NoTenantNamed,
    /// At login the refusal is an authorization failure (as pg_hba's); inside a session it is a privilege one.
    #[error("user \"{user}\" may not connect to tenant \"{tenant}\"")]
    TenantLoginNotAllowed { user: String, tenant: TenantId },
    #[error("pgtenant.tenant cannot be changed inside a transaction block")]
    TenantChangeInTransaction,
    #[error("pgtenant.tenant statements are only accepted in the simple query protocol")]
    TenantStatementNotSimple,
    #[error(
        "pgtenant.tenant statements cannot be sent inside an unfinished extended-protocol batch; send Sync first"
    )]
    TenantStatementInBatch,
    #[error("{0}")]
    Unsupported(String),
    /// A setting or statement that would let a session step outside its tenant.
    #[error("{0}")]
    Forbidden(String),
    #[error(
        "pgtenant: startup parameter \"{name}\" is not allowed for tenant \"{tenant}\": {why}"
    )]
    ForbiddenStartupParameter {
        name: String,
        tenant: String,
        why: &'static str,
    },
    #[error("prepared statement \"{0}\" belongs to pgtenant")]
    ReservedStatement(String),
    #[error("password authentication failed for user \"{0}\"")]
    PasswordFailed(String),
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
    #[error("pgtenant does not proxy replication connections")]
    Replication,
    #[error("user \"{0}\" must connect over TLS (sslmode=require)")]
    TlsRequired(String),
    #[error("user \"{user}\" may not connect from {peer}")]
    NetworkRefused { user: String, peer: String },
    #[error("{0}")]
    Protocol(String),

    // Limits, timeouts, pauses, migrations and shutdowns.
    #[error("sorry, too many clients already (pgtenant max_client_conn = {0})")]
    TooManyClients(usize),
    #[error("too many connections for user \"{user}\" (its max_client_conn = {limit})")]
    TooManyUserClients { user: String, limit: usize },
    #[error(
        "too many connections for tenant \"{tenant}\" (max_client_conn for the tenant = {limit})"
    )]
    TooManyTenantClients { tenant: TenantId, limit: usize },
    #[error("pgtenant: backend \"{backend}\" already serves {pools} pools")]
    TooManyPools { backend: String, pools: usize },
    #[error("pgtenant: no backend connection became free within pool_checkout_timeout_ms ({0})")]
    PoolTimeout(String),
    #[error(
        "pgtenant: a session may keep at most {count} prepared statements ({mib} MiB) in transaction pool mode"
    )]
    TooManyStatements { count: usize, mib: usize },
    #[error(
        "pgtenant: named prepared statements over 1 MiB are not supported in transaction pool mode"
    )]
    StatementTooLarge,
    #[error("canceling statement: {0}")]
    Held(String),
    #[error(
        "terminating connection due to idle-session timeout (pgtenant client_idle_timeout_ms)"
    )]
    IdleTimeout,
    #[error(
        "terminating connection due to idle-in-transaction timeout (pgtenant idle_transaction_timeout_ms); \
         the transaction was rolled back"
    )]
    IdleInTransactionTimeout,
    #[error("canceling statement due to query timeout (pgtenant query_timeout_ms); the connection is closed")]
    QueryTimeout,
    #[error("terminating connection due to administrator command")]
    Shutdown,
    #[error("tenant \"{0}\" was removed")]
    TenantRemoved(TenantId),
    /// A migration moved the tenant; this session holds state (`reason`) that cannot follow it.
    #[error(
        "terminating connection: tenant \"{tenant}\" was moved to another backend by a migration, and this \
         session holds state that cannot follow it ({reason}); reconnect"
    )]
    MovedAway { tenant: TenantId, reason: String },
    #[error(
        "terminating connection: tenant \"{tenant}\" moved to another backend and this session holds state \
         that cannot follow it ({reason}); reconnect"
    )]
    PinnedTooLong { tenant: TenantId, reason: String },
    #[error("tenant \"{tenant}\" routes to backend \"{backend}\", which is not configured")]
    BackendNotConfigured { tenant: TenantId, backend: String },
    /// The proxy has no login for the tenant's backend role (a missing password, a bad role template).
    #[error("{0}")]
    NoLogin(String),

    // The backend's doing.
    #[error("pgtenant: the tenant's backend closed the connection unexpectedly")]
    BackendClosed,
    #[error("pgtenant could not connect to the tenant's backend")]
    BackendUnreachable { detail: String },
    /// The backend refused the login with its own code and text (passed on as PgBouncer does).
    #[error("{message}")]
    BackendRefused { code: String, message: String },

    // pgtenant's own failures.
    #[error("pgtenant could not recreate this session's state on the tenant's new backend")]
    StateNotRecreated,
    #[error("pgtenant could not recreate this session's settings on a pooled backend connection")]
    SettingsNotRecreated,
    #[error("{0}")]
    Internal(String),
}

impl ClientError {
    pub fn kind(&self) -> Kind {
        use ClientError::*;
        match self {
            NoTenant
            | UnknownTenant(_)
            | InvalidTenantName(_)
            | TenantNotAllowed { .. }
            | TenantFixed(_)
            | TenantConflict(_)
            | NoTenantNamed
            | TenantLoginNotAllowed { .. }
            | TenantChangeInTransaction
            | TenantStatementNotSimple
            | TenantStatementInBatch
            | Unsupported(_)
            | Forbidden(_)
            | ForbiddenStartupParameter { .. }
            | ReservedStatement(_)
            | PasswordFailed(_)
            | NoUser
            | Replication
            | TlsRequired(_)
            | NetworkRefused { .. }
            | Protocol(_) => Kind::Client,
            TooManyClients(_)
            | TooManyUserClients { .. }
            | TooManyTenantClients { .. }
            | TooManyPools { .. }
            | PoolTimeout(_)
            | TooManyStatements { .. }
            | StatementTooLarge
            | Held(_)
            | IdleTimeout
            | IdleInTransactionTimeout
            | QueryTimeout
            | Shutdown
            | TenantRemoved(_)
            | MovedAway { .. }
            | PinnedTooLong { .. }
            | BackendNotConfigured { .. }
            | NoLogin(_) => Kind::Operator,
            BackendClosed | BackendUnreachable { .. } | BackendRefused { .. } => Kind::Server,
            StateNotRecreated | SettingsNotRecreated | Internal(_) => Kind::Proxy,
        }
    }

    /// The one mapping from what happened to the SQLSTATE a client sees.
    pub fn sqlstate(&self) -> &str {
        use ClientError::*;
        match self {
            NoTenant | UnknownTenant(_) | InvalidTenantName(_) | TenantRemoved(_) => {
                sqlstate::INVALID_CATALOG_NAME
            }
            TenantNotAllowed { .. }
            | Forbidden(_)
            | ForbiddenStartupParameter { .. }
            | ReservedStatement(_) => sqlstate::INSUFFICIENT_PRIVILEGE,
            TenantFixed(_) | TenantConflict(_) | NoTenantNamed => {
                sqlstate::SQLSERVER_REJECTED_ESTABLISHMENT_OF_SQLCONNECTION
            }
            // An unfinished batch is an implicit transaction.
            TenantChangeInTransaction | TenantStatementInBatch => sqlstate::ACTIVE_SQL_TRANSACTION,
            TenantStatementNotSimple | Unsupported(_) | Replication => {
                sqlstate::FEATURE_NOT_SUPPORTED
            }
            PasswordFailed(_) => sqlstate::INVALID_PASSWORD,
            NoUser | TlsRequired(_) | NetworkRefused { .. } | TenantLoginNotAllowed { .. } => {
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION
            }
            Protocol(_) => sqlstate::PROTOCOL_VIOLATION,
            TooManyClients(_)
            | TooManyUserClients { .. }
            | TooManyTenantClients { .. }
            | TooManyPools { .. }
            | PoolTimeout(_) => sqlstate::TOO_MANY_CONNECTIONS,
            TooManyStatements { .. } => sqlstate::CONFIGURATION_LIMIT_EXCEEDED,
            StatementTooLarge => sqlstate::PROGRAM_LIMIT_EXCEEDED,
            Held(_) | QueryTimeout => sqlstate::QUERY_CANCELED,
            IdleTimeout => sqlstate::IDLE_SESSION_TIMEOUT,
            IdleInTransactionTimeout => sqlstate::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
            Shutdown | MovedAway { .. } | PinnedTooLong { .. } => sqlstate::ADMIN_SHUTDOWN,
            BackendNotConfigured { .. } | NoLogin(_) | BackendUnreachable { .. } => {
                sqlstate::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION
            }
            BackendClosed | StateNotRecreated | SettingsNotRecreated => {
                sqlstate::CONNECTION_FAILURE
            }
            BackendRefused { code, .. } => code,
            Internal(_) => sqlstate::INTERNAL_ERROR,
        }
    }

    /// Errors that end the connection (FATAL) whatever the caller does.
    fn always_fatal(&self) -> bool {
        use ClientError::*;
        matches!(
            self,
            PasswordFailed(_)
                | NoUser
                | Replication
                | TlsRequired(_)
                | NetworkRefused { .. }
                | Protocol(_)
                | TooManyClients(_)
                | TooManyUserClients { .. }
                | IdleTimeout
                | IdleInTransactionTimeout
                | QueryTimeout
                | Shutdown
                | TenantRemoved(_)
                | MovedAway { .. }
                | PinnedTooLong { .. }
                | BackendClosed
                | BackendUnreachable { .. }
                | BackendRefused { .. }
        )
    }

    fn hint(&self) -> Option<&'static str> {
        match self {
            ClientError::NoTenant => {
                Some("Run SET pgtenant.tenant = 'name' first, or name the tenant when connecting.")
            }
            _ => None,
        }
    }

    /// The error as the client receives it: ERROR, or FATAL for the errors that end a connection.
    pub fn to_pg(&self) -> PgError {
        let mut e = PgError {
            severity: if self.always_fatal() {
                Severity::Fatal
            } else {
                Severity::Error
            },
            code: self.sqlstate().to_owned().into(),
            message: self.to_string(),
            detail: None,
            hint: self.hint().map(str::to_owned),
        };
        if let ClientError::BackendUnreachable { detail } = self {
            e.detail = Some(detail.clone());
        }
        e
    }

    /// The error ending a connection that is being refused (a login, a session told to go).
    pub fn fatal(&self) -> PgError {
        PgError {
            severity: Severity::Fatal,
            ..self.to_pg()
        }
    }
}

impl From<ClientError> for PgError {
    fn from(e: ClientError) -> PgError {
        e.to_pg()
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> TenantId {
        TenantId::parse(name).unwrap()
    }

    #[test]
    fn one_code_and_kind_per_failure() {
        let cases: Vec<(ClientError, &str, Kind, bool)> = vec![
            (ClientError::NoTenant, "3D000", Kind::Client, false),
            (
                ClientError::TenantNotAllowed {
                    user: "u".into(),
                    tenant: t("a"),
                },
                "42501",
                Kind::Client,
                false,
            ),
            (
                ClientError::PasswordFailed("u".into()),
                "28P01",
                Kind::Client,
                true,
            ),
            (
                ClientError::TooManyClients(5),
                "53300",
                Kind::Operator,
                true,
            ),
            (ClientError::IdleTimeout, "57P05", Kind::Operator, true),
            (
                ClientError::Held("x".into()),
                "57014",
                Kind::Operator,
                false,
            ),
            (
                ClientError::MovedAway {
                    tenant: t("a"),
                    reason: "a temp table".into(),
                },
                "57P01",
                Kind::Operator,
                true,
            ),
            (ClientError::BackendClosed, "08006", Kind::Server, true),
            (
                ClientError::BackendRefused {
                    code: "53300".into(),
                    message: "too many".into(),
                },
                "53300",
                Kind::Server,
                true,
            ),
            (
                ClientError::SettingsNotRecreated,
                "08006",
                Kind::Proxy,
                false,
            ),
        ];
        for (e, code, kind, fatal) in cases {
            let pg = e.to_pg();
            assert_eq!(pg.code, code, "{e:?}");
            assert_eq!(e.kind(), kind, "{e:?}");
            assert_eq!(pg.severity == Severity::Fatal, fatal, "{e:?}");
            assert_eq!(pg.message, e.to_string());
        }
        assert!(ClientError::NoTenant.to_pg().hint.is_some());
        assert_eq!(ClientError::NoTenant.fatal().severity, Severity::Fatal);
    }
}
