//! The control plane's state in this instance: where the store is, who this instance is, the epoch it applied,
//! its connection to the store, and the barriers and leases it holds. What it does with the rest of the proxy is
//! in the parent module ([`super`]) and its siblings.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_postgres::Client;

use super::store::{self, StoreError};
use crate::tenant::TenantId;

pub struct ControlPlane {
    pub(super) url: String,
    pub id: String,
    /// This process's own mark on its leases, beside `id`: a replacement started under the same id (a pod
    /// rescheduled with its name while the old one is frozen or cut off) takes the leases over with a new one,
    /// and the old process's renewals then fail instead of passing as the replacement's.
    pub(super) incarnation: String,
    pub(super) address: String,
    pub(super) started_unix: i64,
    /// The store epoch this instance has applied.
    pub applied: AtomicI64,
    /// The store answered the last time it was asked.
    pub reachable: AtomicBool,
    pub(super) client: tokio::sync::Mutex<Option<Client>>,
    /// Serialises applying, so changes are applied once and in order.
    pub(super) applying: tokio::sync::Mutex<()>,
    pub(super) wake_tx: mpsc::UnboundedSender<()>,
    pub(super) wake_rx: Mutex<Option<mpsc::UnboundedReceiver<()>>>,
    /// Other instances' cutover barriers this one holds.
    pub(super) held: Held,
    /// Finished migrations whose lease was given up.
    pub(super) released: Released,
    /// When this instance's leases were last renewed; shared with the tees of its moves.
    pub lease_clock: Arc<super::leases::LeaseClock>,
}

/// What this instance holds for other instances' barriers: tenant -> (attempt, closed at, closed by us).
#[derive(Default)]
pub struct Held(pub(super) Mutex<HashMap<TenantId, (i64, Instant, bool)>>);

/// Finished migrations already written to the store with their lease given up.
#[derive(Default)]
pub struct Released(pub(super) Mutex<HashSet<(TenantId, String)>>);

impl ControlPlane {
    pub fn new(url: &str, id: String, address: String) -> ControlPlane {
        let (wake_tx, wake_rx) = mpsc::unbounded_channel();
        ControlPlane {
            url: url.to_owned(),
            id,
            incarnation: format!("{:016x}", rand::random::<u64>()),
            address,
            started_unix: (crate::migration::record::now_ms() / 1000) as i64,
            applied: AtomicI64::new(0),
            reachable: AtomicBool::new(false),
            client: tokio::sync::Mutex::new(None),
            applying: tokio::sync::Mutex::new(()),
            wake_tx,
            wake_rx: Mutex::new(Some(wake_rx)),
            held: Held::default(),
            released: Released::default(),
            lease_clock: Arc::default(),
        }
    }

    /// Drops the store connection (one that gave no answer in time); the next call connects again.
    pub async fn disconnect(&self) {
        *self.client.lock().await = None;
        self.reachable.store(false, Ordering::Relaxed);
    }

    /// Runs `f` on the store's connection, connecting (and listening) first if there is none; a failure drops
    /// the connection, so the next call reconnects.
    pub(super) async fn with_client<T>(
        &self,
        f: impl AsyncFnOnce(&mut Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut guard = self.client.lock().await;
        if guard.is_none() {
            let mut c = store::connect(&self.url, Some(self.wake_tx.clone())).await?;
            store::ensure_schema(&mut c).await?;
            c.batch_execute(&format!("LISTEN {}", store::CHANNEL))
                .await
                .map_err(|e| StoreError::Pg(format!("listen: {e}")))?;
            *guard = Some(c);
        }
        let Some(c) = guard.as_mut() else {
            return Err(StoreError::Pg("no connection".into()));
        };
        let r = f(c).await;
        // A refusal is an answer: the connection (and its LISTEN) stays. Only a failure drops it.
        let answered = !matches!(r, Err(StoreError::Pg(_)));
        if !answered {
            *guard = None;
        }
        self.reachable.store(answered, Ordering::Relaxed);
        r
    }
}
