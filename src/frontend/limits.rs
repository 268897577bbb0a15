//! Limits on clients: connections still logging in ([`LoginSlots`]: a separate, smaller budget, so sockets
//! that connect and say nothing cannot lock real clients out), and logged-in clients per user and per tenant
//! ([`ClientCounts`]).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::tenant::TenantId;

/// Connections in their handshake or authentication.
pub struct LoginSlots {
    max: usize,
    next: AtomicU64,
    queue: Mutex<VecDeque<Arc<Ticket>>>,
}

struct Ticket {
    id: u64,
    /// The client sent its startup packet: it is talking, not just holding a socket open.
    spoke: AtomicBool,
    evict: CancellationToken,
}

/// A connection's place among those logging in; dropping it frees the place.
pub struct LoginTicket {
    slots: Arc<LoginSlots>,
    ticket: Arc<Ticket>,
}

impl LoginSlots {
    pub fn new(max: usize) -> Arc<LoginSlots> {
        Arc::new(LoginSlots {
            max: max.max(1),
            next: AtomicU64::new(0),
            queue: Mutex::new(VecDeque::new()),
        })
    }

    /// A place for a new connection. When every place is taken, the oldest connection that has not sent its
    /// startup packet is told to go; when all of them have spoken, `None` (the new connection is closed).
    pub fn enter(self: &Arc<Self>) -> Option<LoginTicket> {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= self.max {
            let silent = q.iter().position(|t| !t.spoke.load(Ordering::Relaxed))?;
            if let Some(old) = q.remove(silent) {
                old.evict.cancel();
            }
        }
        let ticket = Arc::new(Ticket {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            spoke: AtomicBool::new(false),
            evict: CancellationToken::new(),
        });
        q.push_back(ticket.clone());
        Some(LoginTicket {
            slots: self.clone(),
            ticket,
        })
    }

    /// Connections logging in now.
    pub fn len(&self) -> usize {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl LoginTicket {
    /// The startup packet arrived: this connection is no longer one that may be evicted.
    pub fn spoke(&self) {
        self.ticket.spoke.store(true, Ordering::Relaxed);
    }

    /// Completes when a newer connection took this one's place.
    pub async fn evicted(&self) {
        self.ticket.evict.cancelled().await
    }
}

impl Drop for LoginTicket {
    fn drop(&mut self) {
        let mut q = self.slots.queue.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = q.iter().position(|t| t.id == self.ticket.id) {
            q.remove(at);
        }
    }
}

/// Logged-in clients per user and per tenant.
#[derive(Default)]
pub struct ClientCounts {
    users: Counter<String>,
    tenants: Counter<TenantId>,
}

struct Counter<K: Eq + Hash>(Mutex<HashMap<K, usize>>);

impl<K: Eq + Hash> Default for Counter<K> {
    fn default() -> Self {
        Counter(Mutex::new(HashMap::new()))
    }
}

impl<K: Eq + Hash + Clone> Counter<K> {
    fn take(&self, key: &K, max: Option<usize>) -> bool {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(key.clone()).or_default();
        if max.is_some_and(|max| *n >= max) {
            return false;
        }
        *n += 1;
        true
    }

    fn give(&self, key: &K) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                m.remove(key);
            }
        }
    }

    fn get(&self, key: &K) -> usize {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.get(key).copied().unwrap_or(0)
    }
}

/// One client counted against its user's limit; dropping it uncounts it.
pub struct UserSlot {
    counts: Arc<ClientCounts>,
    user: String,
}

/// One client counted against its tenant's limit.
pub struct TenantSlot {
    counts: Arc<ClientCounts>,
    tenant: TenantId,
}

impl ClientCounts {
    /// Counts a client of `user`; `None` when `max` clients of it are connected already.
    pub fn user(self: &Arc<Self>, user: &str, max: Option<usize>) -> Option<UserSlot> {
        let user = user.to_owned();
        self.users.take(&user, max).then(|| UserSlot {
            counts: self.clone(),
            user,
        })
    }

    /// Counts a client of `tenant`; `None` when `max` clients of it are connected already.
    pub fn tenant(self: &Arc<Self>, tenant: &TenantId, max: Option<usize>) -> Option<TenantSlot> {
        self.tenants.take(tenant, max).then(|| TenantSlot {
            counts: self.clone(),
            tenant: tenant.clone(),
        })
    }

    pub fn of_tenant(&self, tenant: &TenantId) -> usize {
        self.tenants.get(tenant)
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        self.counts.users.give(&self.user);
    }
}

impl Drop for TenantSlot {
    fn drop(&mut self) {
        self.counts.tenants.give(&self.tenant);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_login_budget_evicts_the_oldest_silent_connection() {
        let slots = LoginSlots::new(2);
        let a = slots.enter().unwrap();
        let b = slots.enter().unwrap();
        a.spoke();
        // Full: `b` has not spoken, so it goes.
        let c = slots.enter().unwrap();
        assert!(b.ticket.evict.is_cancelled());
        assert!(!a.ticket.evict.is_cancelled());
        drop(b);
        assert_eq!(slots.len(), 2);
        c.spoke();
        // Everyone left has spoken: no room.
        assert!(slots.enter().is_none());
        drop(a);
        assert!(slots.enter().is_some());
    }

    #[test]
    fn client_counts_enforce_their_limits_and_free_on_drop() {
        let counts = Arc::new(ClientCounts::default());
        let acme = TenantId::parse("acme").unwrap();
        let one = counts.tenant(&acme, Some(2)).unwrap();
        let two = counts.tenant(&acme, Some(2)).unwrap();
        assert!(counts.tenant(&acme, Some(2)).is_none());
        assert!(counts.tenant(&acme, None).is_some(), "no limit");
        drop(one);
        assert_eq!(counts.of_tenant(&acme), 1);
        assert!(counts.tenant(&acme, Some(2)).is_some());
        drop(two);
        let u = counts.user("app", Some(1)).unwrap();
        assert!(counts.user("app", Some(1)).is_none());
        drop(u);
        assert!(counts.user("app", Some(1)).is_some());
    }
}
