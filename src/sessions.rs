//! The registry of live client sessions, for the admin socket: who is connected, to which tenant and backend,
//! on which routing epoch, and who is inside a transaction now. Sessions update it only when they attach, move
//! or end (and flip one atomic flag per transaction), so the relay does not pay for it per message.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::admin::reply::SessionView;
use crate::cancel::CancelSlot;
use crate::protocol::PgError;
use crate::routing::{BackendId, Epoch};
use crate::shutdown::EndSignal;
use crate::tenant::TenantId;

/// Where a session's backend connection came from.
#[derive(Debug, Clone, Default)]
pub struct SessionRoute {
    pub tenant: Option<TenantId>,
    pub backend: Option<BackendId>,
    pub database: Option<String>,
    /// Routing epoch the backend connection was chosen under.
    pub epoch: Epoch,
    /// Session state that cannot move yet keeps it on an older route.
    pub pinned: Option<&'static str>,
    /// The login role of the pool the backend connection came from.
    pub role: Option<String>,
}

pub struct SessionInfo {
    pub id: u64,
    pub user: String,
    pub peer: Option<SocketAddr>,
    pub started: Instant,
    pub in_transaction: AtomicBool,
    route: Mutex<SessionRoute>,
    /// The session's cancel key: it points at the backend connection the session holds now.
    cancel: Arc<CancelSlot>,
    /// Fired to end this session from outside (a cutover ending pinned sessions, an operator's KILL).
    pub end: EndSignal,
    end_reason: Mutex<Option<PgError>>,
}

impl std::fmt::Debug for SessionInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionInfo({}, {})", self.id, self.user)
    }
}

impl SessionInfo {
    /// Ends the session with `reason` (a FATAL error the client is sent) at its next step, or now if idle.
    pub fn end_with(&self, reason: PgError) {
        *self.end_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        self.end.fire();
    }

    /// Why the session was told to end, if it was.
    pub fn take_end_reason(&self) -> Option<PgError> {
        self.end_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    pub fn set_route(&self, route: SessionRoute) {
        *self.route.lock().unwrap_or_else(|p| p.into_inner()) = route;
    }

    pub fn route(&self) -> SessionRoute {
        self.route.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn view(&self, current_epoch: Epoch) -> SessionView {
        let r = self.route();
        let server = self.cancel.get();
        SessionView {
            id: self.id,
            user: self.user.clone(),
            peer: self.peer.map(|p| p.to_string()),
            tenant: r.tenant,
            backend: r.backend,
            database: r.database,
            epoch: r.epoch,
            on_current_route: r.epoch == current_epoch,
            pinned: r.pinned.map(str::to_owned),
            in_transaction: self.in_transaction.load(Ordering::Relaxed),
            connected_s: self.started.elapsed().as_secs(),
            server_pid: server.as_ref().map(|s| s.pid),
            server_addr: server.map(|s| format!("{}:{}", s.host, s.port)),
            server_role: r.role,
        }
    }
}

#[derive(Debug, Default)]
pub struct Sessions {
    next: AtomicU64,
    map: Mutex<HashMap<u64, Arc<SessionInfo>>>,
}

/// A registered session; dropping it unregisters.
pub struct SessionHandle {
    sessions: Arc<Sessions>,
    pub info: Arc<SessionInfo>,
}

impl Drop for SessionHandle {
    fn drop(&mut self) {
        let mut map = self.sessions.map.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&self.info.id);
    }
}

impl Sessions {
    pub fn register(
        self: &Arc<Self>,
        user: &str,
        peer: Option<SocketAddr>,
        cancel: Arc<CancelSlot>,
    ) -> SessionHandle {
        let info = Arc::new(SessionInfo {
            id: self.next.fetch_add(1, Ordering::Relaxed) + 1,
            user: user.to_owned(),
            peer,
            started: Instant::now(),
            in_transaction: AtomicBool::new(false),
            route: Mutex::new(SessionRoute::default()),
            cancel,
            end: EndSignal::default(),
            end_reason: Mutex::new(None),
        });
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(info.id, info.clone());
        SessionHandle {
            sessions: self.clone(),
            info,
        }
    }

    pub fn all(&self) -> Vec<Arc<SessionInfo>> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = map.values().cloned().collect();
        v.sort_by_key(|s| s.id);
        v
    }

    pub fn of_tenant(&self, tenant: &str) -> Vec<Arc<SessionInfo>> {
        self.all()
            .into_iter()
            .filter(|s| s.route().tenant.is_some_and(|t| t.as_str() == tenant))
            .collect()
    }

    pub fn count(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}
