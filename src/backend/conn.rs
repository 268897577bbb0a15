//! A live, authenticated backend connection and what the proxy knows about it.

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;

use super::statements::ServerStatements;
use crate::net::Stream;

/// The startup parameters a backend connection was opened with (user and database aside). Two connections with
/// equal tags are interchangeable after `DISCARD ALL`, because `RESET ALL` returns to these values.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct StartupTag {
    pub params: Vec<(String, String)>,
}

/// Where to send a CancelRequest for a backend session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelTarget {
    pub host: Arc<str>,
    pub port: u16,
    pub pid: i32,
    pub secret: i32,
}

pub struct ServerConn {
    pub stream: Stream,
    /// Bytes read from the server but not yet consumed.
    pub buf: BytesMut,
    pub pid: i32,
    pub secret: i32,
    /// The server's current ParameterStatus values, kept up to date by whoever reads its frames.
    pub params: Vec<(String, String)>,
    pub tag: Arc<StartupTag>,
    pub host: Arc<str>,
    pub port: u16,
    pub idle_since: Instant,
    /// When it was opened (`server_lifetime`).
    pub born: Instant,
    /// Prepared statements pgtenant made here for transaction-pool clients.
    pub statements: ServerStatements,
    /// Fingerprint of the session `SET`s in effect here (0: none beyond the startup parameters).
    pub applied_sets: u64,
    /// A `SET ROLE` or `SET SESSION AUTHORIZATION` is among them (`RESET ALL` leaves those alone).
    pub applied_role: bool,
    /// Transaction pooling of a shared pool: the schema the proxy last set as `search_path` here (`None`:
    /// the connection's own default, or not known).
    pub route_path: Option<Arc<str>>,
    /// Transaction pool mode: the tenant whose transaction used the connection last. Another tenant gets it
    /// only after a full reset.
    pub owner: Option<crate::tenant::TenantId>,
    /// Transaction pool mode: its last user ran something whose session effects the proxy cannot follow
    /// (a `DO` block, `CALL`): the next user, of any tenant, gets it only after a full reset.
    pub suspect: bool,
    /// Transaction pooling of a shared pool with clients waiting: when its owner's turn on it began (see
    /// [`super::pool`]'s turns). `None`: no turn running.
    pub turn_since: Option<Instant>,
    /// Idle and kept for its owner's next transaction until then, while other tenants wait.
    pub kept_until: Option<Instant>,
}

impl ServerConn {
    pub fn cancel_target(&self) -> CancelTarget {
        CancelTarget {
            host: self.host.clone(),
            port: self.port,
            pid: self.pid,
            secret: self.secret,
        }
    }

    /// Records a ParameterStatus value.
    pub fn set_param(&mut self, name: &str, value: &str) {
        match self.params.iter_mut().find(|(k, _)| k == name) {
            Some((_, v)) if v == value => {}
            Some((_, v)) => *v = value.to_owned(),
            None => self.params.push((name.to_owned(), value.to_owned())),
        }
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}
