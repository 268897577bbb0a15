//! Who a client is and what it asked for at startup, and the places it holds under the client limits.

use std::sync::Arc;

use crate::auth::UserEntry;
use crate::tenant::TenantId;

/// The places a logged-in client holds under the client limits; given back when the session ends.
pub struct Admission {
    pub(super) _client: tokio::sync::OwnedSemaphorePermit,
    pub(super) _user: super::limits::UserSlot,
    /// Changes when `SET pgtenant.tenant` moves the session.
    pub(super) tenant: Option<super::limits::TenantSlot>,
}

/// Who the client is and what it asked for at startup; fixed for the session's life.
pub struct ClientInfo {
    pub admission: Admission,
    pub user: Arc<UserEntry>,
    /// Configured user name (without tenant suffix).
    pub user_name: String,
    pub database: Option<String>,
    /// Session parameters from the startup packet (sorted), passed to backends.
    pub params: Vec<(String, String)>,
    /// The client's `options` arguments, `pgtenant.tenant` removed.
    pub options: Vec<String>,
    pub startup_tenant: Option<TenantId>,
    /// True when the client named its tenant at startup; then SET may not move it to another.
    pub tenant_fixed: bool,
    pub peer: Option<std::net::SocketAddr>,
}
