//! Clients waiting for a backend connection of a full pool, served round-robin by tenant: one tenant opening
//! a hundred sessions waits behind another tenant's single one, not in front of it. Within a tenant, first
//! come, first served. No I/O; the pool hands out under its own lock.

use std::collections::{HashMap, VecDeque};

use tokio::sync::oneshot;

use super::conn::ServerConn;
use crate::tenant::TenantId;

/// What a waiter is given (a connection is boxed for its life, so handing it out moves a pointer).
pub enum Grant {
    /// A connection someone gave back.
    Conn(Box<ServerConn>),
    /// A free place in the pool (and on the backend): open a connection in it.
    Open,
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Grant::Conn(_) => "Grant::Conn",
            Grant::Open => "Grant::Open",
        })
    }
}

struct Waiter {
    id: u64,
    tx: oneshot::Sender<Grant>,
}

/// Who waits, by tenant (`None`: sessions without a tenant, such as migration tooling).
#[derive(Default)]
pub struct WaitQueue {
    by_tenant: HashMap<Option<TenantId>, VecDeque<Waiter>>,
    /// Tenants with waiters, in the order they are served next.
    ring: VecDeque<Option<TenantId>>,
    len: usize,
    next_id: u64,
}

impl WaitQueue {
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Queues a waiter of `tenant`; returns its id (to leave the queue) and where its grant will arrive.
    pub fn push(&mut self, tenant: Option<&TenantId>) -> (u64, oneshot::Receiver<Grant>) {
        let (tx, rx) = oneshot::channel();
        self.next_id += 1;
        let id = self.next_id;
        let key = tenant.cloned();
        let q = self.by_tenant.entry(key.clone()).or_default();
        if q.is_empty() {
            self.ring.push_back(key);
        }
        q.push_back(Waiter { id, tx });
        self.len += 1;
        (id, rx)
    }

    /// Takes waiter `id` of `tenant` out (it gave up). False when it is no longer queued (it was served).
    pub fn remove(&mut self, tenant: Option<&TenantId>, id: u64) -> bool {
        let key = tenant.cloned();
        let Some(q) = self.by_tenant.get_mut(&key) else {
            return false;
        };
        let Some(at) = q.iter().position(|w| w.id == id) else {
            return false;
        };
        q.remove(at);
        self.len -= 1;
        if q.is_empty() {
            self.by_tenant.remove(&key);
            self.ring.retain(|t| *t != key);
        }
        true
    }

    /// Gives `grant` to `tenant`'s first waiter, out of the round-robin's order (a tenant's turn on a connection,
    /// see the pool). The grant comes back when the tenant has no waiter.
    #[allow(clippy::result_large_err)]
    pub fn hand_out_to(&mut self, tenant: &TenantId, mut grant: Grant) -> Result<(), Grant> {
        let key = Some(tenant.clone());
        let Some(q) = self.by_tenant.get_mut(&key) else {
            return Err(grant);
        };
        let mut served = false;
        while let Some(w) = q.pop_front() {
            self.len -= 1;
            match w.tx.send(grant) {
                Ok(()) => {
                    served = true;
                    grant = Grant::Open;
                    break;
                }
                Err(back) => grant = back,
            }
        }
        // Served out of turn, the tenant goes to the back of the ring, as if served in its turn: its next
        // turn on a connection comes after every other waiting tenant's.
        self.ring.retain(|t| *t != key);
        if q.is_empty() {
            self.by_tenant.remove(&key);
        } else if served {
            self.ring.push_back(key);
        }
        if served {
            Ok(())
        } else {
            Err(grant)
        }
    }

    /// Gives `grant` to the next waiter, round-robin over the tenants that `eligible` allows (a tenant at its
    /// connection cap waits its turn). Returns the tenant served, or the grant back when nobody took it
    /// (no eligible waiter, or every one gave up meanwhile).
    #[allow(clippy::result_large_err)]
    pub fn hand_out(
        &mut self,
        mut grant: Grant,
        eligible: impl Fn(Option<&TenantId>) -> bool,
    ) -> Result<Option<TenantId>, Grant> {
        // Each tenant with waiters is looked at once.
        for _ in 0..self.ring.len() {
            let Some(key) = self.ring.pop_front() else {
                break;
            };
            if !eligible(key.as_ref()) {
                self.ring.push_back(key);
                continue;
            }
            let Some(q) = self.by_tenant.get_mut(&key) else {
                continue;
            };
            while let Some(w) = q.pop_front() {
                self.len -= 1;
                match w.tx.send(grant) {
                    Ok(()) => {
                        if q.is_empty() {
                            self.by_tenant.remove(&key);
                        } else {
                            self.ring.push_back(key.clone());
                        }
                        return Ok(key);
                    }
                    // That waiter stopped waiting without taking itself out yet: the next one.
                    Err(back) => grant = back,
                }
            }
            // Every waiter of this tenant had gone: on to the next tenant.
            self.by_tenant.remove(&key);
        }
        Err(grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> Option<TenantId> {
        Some(TenantId::parse(name).unwrap())
    }

    #[test]
    fn tenants_are_served_round_robin_and_each_in_order() {
        let mut q = WaitQueue::default();
        let a = t("a");
        let b = t("b");
        let mut rx_a: Vec<_> = (0..3).map(|_| q.push(a.as_ref()).1).collect();
        let mut rx_b = q.push(b.as_ref()).1;
        assert_eq!(q.len(), 4);
        let served: Vec<_> = (0..4)
            .map(|_| q.hand_out(Grant::Open, |_| true).unwrap())
            .collect();
        assert_eq!(served, vec![a.clone(), b.clone(), a.clone(), a.clone()]);
        assert!(q.is_empty());
        assert!(matches!(rx_b.try_recv(), Ok(Grant::Open)));
        for rx in &mut rx_a {
            assert!(matches!(rx.try_recv(), Ok(Grant::Open)));
        }
        assert!(q.hand_out(Grant::Open, |_| true).is_err());
    }

    #[test]
    fn a_tenant_at_its_cap_is_skipped_and_gone_waiters_are_passed_over() {
        let mut q = WaitQueue::default();
        let (a, b) = (t("a"), t("b"));
        let _rx_a = q.push(a.as_ref()).1;
        let gone = q.push(b.as_ref()).1;
        let mut rx_b2 = q.push(b.as_ref()).1;
        drop(gone);
        // `a` is at its cap: `b`'s first waiter gave up, so its second one is served.
        let served = q.hand_out(Grant::Open, |t| t != a.as_ref()).unwrap();
        assert_eq!(served, b);
        assert!(rx_b2.try_recv().is_ok());
        // Only `a` is left, and it may not take more.
        assert!(q.hand_out(Grant::Open, |t| t != a.as_ref()).is_err());
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn a_tenant_served_out_of_turn_keeps_the_others_order() {
        let mut q = WaitQueue::default();
        let (a, b) = (t("a"), t("b"));
        let mut rx_b = q.push(b.as_ref()).1;
        let mut rx_a = q.push(a.as_ref()).1;
        let gone = q.push(b.as_ref()).1;
        let mut rx_b3 = q.push(b.as_ref()).1;
        let mut rx_b4 = q.push(b.as_ref()).1;
        assert!(q.hand_out_to(b.as_ref().unwrap(), Grant::Open).is_ok());
        assert!(matches!(rx_b.try_recv(), Ok(Grant::Open)));
        // Served out of turn, `b` goes behind `a` in the round-robin.
        assert_eq!(q.hand_out(Grant::Open, |_| true).unwrap(), a);
        assert!(matches!(rx_a.try_recv(), Ok(Grant::Open)));
        drop(gone);
        // The one that gave up is passed over.
        assert!(q.hand_out_to(b.as_ref().unwrap(), Grant::Open).is_ok());
        assert!(matches!(rx_b3.try_recv(), Ok(Grant::Open)));
        assert!(q.hand_out_to(b.as_ref().unwrap(), Grant::Open).is_ok());
        assert!(matches!(rx_b4.try_recv(), Ok(Grant::Open)));
        // `b` has nobody left: the grant comes back, and nobody is queued.
        assert!(q.hand_out_to(b.as_ref().unwrap(), Grant::Open).is_err());
        assert!(q.is_empty());
        assert!(q.hand_out(Grant::Open, |_| true).is_err());
    }

    #[test]
    fn a_waiter_that_leaves_is_removed_once() {
        let mut q = WaitQueue::default();
        let a = t("a");
        let (id, _rx) = q.push(a.as_ref());
        assert!(q.remove(a.as_ref(), id));
        assert!(!q.remove(a.as_ref(), id));
        assert!(q.is_empty());
        assert!(q.hand_out(Grant::Open, |_| true).is_err());
    }
}
