//! The per-tenant gate: while it is closed, new transactions (and statements outside a transaction) of that
//! tenant wait in a bounded FIFO queue, transactions already running go on to their end, and other tenants are
//! not touched. `pause`/`resume` drive it; the migration cutover uses the same calls (close, wait for drain with
//! a deadline, swap the route, open).
//!
//! Concurrency note: a session entering increments `active` and then re-checks `closed`; `close` sets `closed`
//! and then reads `active`. Both use SeqCst, so either the session sees the gate closed (and backs out into the
//! queue) or `close` sees the session as active (and waits for it): a transaction can never slip past a closed
//! gate unseen.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{oneshot, Notify};

use crate::tenant::TenantId;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum GateError {
    #[error("tenant {0} is paused and its queue is full")]
    QueueFull(String),
    #[error("tenant {0} is paused; gave up waiting after {1} ms")]
    WaitTimeout(String, u64),
}

#[derive(Default)]
struct Queue {
    waiters: VecDeque<(u64, oneshot::Sender<()>)>,
    next_id: u64,
}

pub struct Gate {
    tenant: TenantId,
    closed: AtomicBool,
    /// Sessions of this tenant inside a transaction (holding a [`GatePass`]).
    active: AtomicUsize,
    queue: Mutex<Queue>,
    drained: Notify,
}

/// Held by a session from the first message of a transaction to the ReadyForQuery that ends it. It owns the
/// session's handle on the gate for that time, so taking and giving back a pass costs no reference counting.
pub struct GatePass {
    gate: Option<Arc<Gate>>,
}

impl GatePass {
    /// Ends the transaction's hold on the gate and hands the gate back.
    pub fn leave(mut self) -> Option<Arc<Gate>> {
        let gate = self.gate.take();
        if let Some(g) = &gate {
            g.exit();
        }
        gate
    }
}

impl Drop for GatePass {
    fn drop(&mut self) {
        if let Some(g) = self.gate.take() {
            g.exit();
        }
    }
}

impl Gate {
    pub fn new(tenant: TenantId) -> Arc<Gate> {
        Arc::new(Gate {
            tenant,
            closed: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            queue: Mutex::new(Queue::default()),
            drained: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(SeqCst)
    }

    /// Sessions inside a transaction now.
    pub fn active(&self) -> usize {
        self.active.load(SeqCst)
    }

    /// Requests waiting for the gate to open.
    pub fn queued(&self) -> usize {
        self.lock().waiters.len()
    }

    fn exit(&self) {
        if self.active.fetch_sub(1, SeqCst) == 1 && self.closed.load(SeqCst) {
            self.drained.notify_waiters();
        }
    }

    /// The open-gate fast path: a pass, or the gate back when it is closed.
    pub fn try_pass(self: Arc<Self>) -> Result<GatePass, Arc<Gate>> {
        if self.closed.load(SeqCst) {
            return Err(self);
        }
        self.active.fetch_add(1, SeqCst);
        if self.closed.load(SeqCst) {
            self.exit();
            return Err(self);
        }
        Ok(GatePass { gate: Some(self) })
    }

    /// Lets a session start a transaction, waiting (FIFO, at most `max_queued` waiting, at most `wait`) while the
    /// gate is closed. On refusal the gate is handed back with the reason.
    pub async fn enter(
        self: Arc<Self>,
        max_queued: usize,
        wait: Duration,
    ) -> Result<GatePass, (Arc<Gate>, GateError)> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut gate = self;
        loop {
            gate = match gate.try_pass() {
                Ok(pass) => return Ok(pass),
                Err(g) => g,
            };
            let (id, rx) = {
                let mut q = gate.lock();
                if !gate.closed.load(SeqCst) {
                    continue;
                }
                if q.waiters.len() >= max_queued {
                    let e = GateError::QueueFull(gate.tenant.to_string());
                    drop(q);
                    return Err((gate, e));
                }
                let (tx, rx) = oneshot::channel();
                let id = q.next_id;
                q.next_id += 1;
                q.waiters.push_back((id, tx));
                (id, rx)
            };
            // If this wait is abandoned (timeout, or the session going away), its place in the queue goes too.
            let place = QueuePlace { gate: &gate, id };
            let woken = tokio::time::timeout_at(deadline, rx).await.is_ok();
            drop(place);
            if !woken {
                let e = GateError::WaitTimeout(gate.tenant.to_string(), wait.as_millis() as u64);
                return Err((gate, e));
            }
        }
    }

    /// Closes the gate. Returns false when it was closed already.
    pub fn close(&self) -> bool {
        let _q = self.lock();
        !self.closed.swap(true, SeqCst)
    }

    /// Waits until no session of this tenant is inside a transaction, or `timeout` passes. Returns whether it
    /// drained.
    pub async fn wait_drained(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.active.load(SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.active.load(SeqCst) == 0;
            }
        }
    }

    /// Opens the gate and releases the queue in arrival order. Returns how many were waiting.
    pub fn open(&self) -> usize {
        let mut q = self.lock();
        self.closed.store(false, SeqCst);
        let waiters = std::mem::take(&mut q.waiters);
        drop(q);
        let n = waiters.len();
        for (_, tx) in waiters {
            let _ = tx.send(());
        }
        n
    }
}

/// A waiter's place in the queue; dropping it removes the place if `open` has not taken it already.
struct QueuePlace<'a> {
    gate: &'a Gate,
    id: u64,
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.gate.lock().waiters.retain(|(w, _)| *w != self.id);
    }
}

/// Every tenant's gate, created on first use.
#[derive(Default)]
pub struct Gates {
    map: Mutex<HashMap<TenantId, Arc<Gate>>>,
    /// A global pause is in force: gates made from now on start closed too.
    all_closed: std::sync::atomic::AtomicBool,
}

impl Gates {
    pub fn get(&self, tenant: &TenantId) -> Arc<Gate> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(tenant.clone())
            .or_insert_with(|| {
                let g = Gate::new(tenant.clone());
                if self.all_closed.load(SeqCst) {
                    g.close();
                }
                g
            })
            .clone()
    }

    /// The global pause: every gate closes, those of `tenants` are made (closed) if they do not exist, and gates
    /// made later start closed. The gates, to wait on.
    pub fn close_all<'a>(&self, tenants: impl Iterator<Item = &'a TenantId>) -> Vec<Arc<Gate>> {
        self.all_closed.store(true, SeqCst);
        for t in tenants {
            self.get(t);
        }
        let gates: Vec<Arc<Gate>> = {
            let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.values().cloned().collect()
        };
        for g in &gates {
            g.close();
        }
        gates
    }

    /// Ends a global pause (and any tenant's own): every gate opens. How many were waiting.
    pub fn open_all(&self) -> usize {
        self.all_closed.store(false, SeqCst);
        let gates: Vec<Arc<Gate>> = {
            let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.values().cloned().collect()
        };
        gates
            .iter()
            .filter(|g| g.is_closed())
            .map(|g| g.open())
            .sum()
    }

    pub fn all_closed(&self) -> bool {
        self.all_closed.load(SeqCst)
    }

    /// The gate if it exists (so listing does not create gates).
    pub fn peek(&self, tenant: &str) -> Option<Arc<Gate>> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(tenant).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> Arc<Gate> {
        Gate::new(TenantId::parse("t").unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn open_gate_admits_at_once() {
        let g = gate();
        let p = g
            .clone()
            .enter(10, Duration::from_secs(1))
            .await
            .ok()
            .unwrap();
        assert_eq!(g.active(), 1);
        drop(p);
        assert_eq!(g.active(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn closed_gate_queues_in_order_and_drains() {
        let g = gate();
        let running = g
            .clone()
            .enter(10, Duration::from_secs(1))
            .await
            .ok()
            .unwrap();
        assert!(g.close());
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..3 {
            let (g, order) = (g.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let pass = g.enter(10, Duration::from_secs(60)).await.ok().unwrap();
                order.lock().unwrap().push(i);
                drop(pass);
            }));
            tokio::task::yield_now().await;
        }
        assert_eq!(g.queued(), 3);
        assert!(
            !g.wait_drained(Duration::from_millis(100)).await,
            "one transaction is still open"
        );
        drop(running);
        assert!(g.wait_drained(Duration::from_millis(100)).await);
        assert_eq!(g.open(), 3);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn full_queue_and_timeout_are_errors() {
        let g = gate();
        g.close();
        let g2 = g.clone();
        let waiter = tokio::spawn(async move {
            g2.enter(1, Duration::from_secs(5))
                .await
                .map(drop)
                .map_err(|(_, e)| e)
        });
        tokio::task::yield_now().await;
        assert!(matches!(
            g.clone().enter(1, Duration::from_secs(5)).await,
            Err((_, GateError::QueueFull(_)))
        ));
        assert!(matches!(
            waiter.await.unwrap(),
            Err(GateError::WaitTimeout(..))
        ));
        assert_eq!(g.queued(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_wait_gives_up_its_place() {
        let g = gate();
        g.close();
        let g2 = g.clone();
        let waiter =
            tokio::spawn(async move { g2.enter(1, Duration::from_secs(60)).await.is_ok() });
        tokio::task::yield_now().await;
        assert_eq!(g.queued(), 1);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(g.queued(), 0, "the queue slot is free again");
    }
}
