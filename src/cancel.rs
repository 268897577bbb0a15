//! Cancel requests. Each client gets a BackendKeyData with its backend's real pid (clients compare it with
//! `pg_backend_pid()` and notification pids) and a secret of ours; a CancelRequest carrying that pair is mapped
//! to the backend session the client is on now and forwarded with the backend's own secret.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::backend::conn::{CancelTarget, ServerConn};

const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// The backend a client's key currently stands for; `None` while the client has no backend.
#[derive(Debug, Default)]
pub struct CancelSlot {
    target: Mutex<Option<CancelTarget>>,
    /// Whether `target` stands. A transaction-pool session gives its connection back and takes one at every
    /// transaction: clearing this is a plain store where emptying `target` would take the lock.
    attached: AtomicBool,
}

impl CancelSlot {
    pub fn set(&self, target: Option<CancelTarget>) {
        match target {
            Some(t) => {
                *self.target.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
                self.attached.store(true, Ordering::Release);
            }
            None => self.attached.store(false, Ordering::Release),
        }
    }

    /// Points the slot at `conn`'s backend session. A session often gets the connection it had last, and
    /// then nothing is copied.
    pub fn attach(&self, conn: &ServerConn) {
        let mut target = self.target.lock().unwrap_or_else(|p| p.into_inner());
        let same = target.as_ref().is_some_and(|t| {
            t.pid == conn.pid
                && t.secret == conn.secret
                && t.port == conn.port
                && t.host == conn.host
        });
        if !same {
            *target = Some(conn.cancel_target());
        }
        drop(target);
        self.attached.store(true, Ordering::Release);
    }

    pub fn get(&self) -> Option<CancelTarget> {
        if !self.attached.load(Ordering::Acquire) {
            return None;
        }
        self.target
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[derive(Debug, Default)]
pub struct CancelRegistry {
    slots: Mutex<HashMap<(i32, i32), Arc<CancelSlot>>>,
}

/// A registered key; dropping it unregisters.
#[derive(Debug)]
pub struct CancelKey {
    registry: Arc<CancelRegistry>,
    pub pid: i32,
    pub secret: i32,
    pub slot: Arc<CancelSlot>,
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        let mut slots = self
            .registry
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        slots.remove(&(self.pid, self.secret));
    }
}

impl CancelRegistry {
    /// Registers a key for `pid` with a fresh secret (never one already in use with that pid).
    pub fn register(self: &Arc<Self>, pid: i32) -> CancelKey {
        let slot = Arc::new(CancelSlot::default());
        let mut rng = rand::thread_rng();
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let secret = loop {
            let s: i32 = rng.gen();
            if !slots.contains_key(&(pid, s)) {
                break s;
            }
        };
        slots.insert((pid, secret), slot.clone());
        CancelKey {
            registry: self.clone(),
            pid,
            secret,
            slot,
        }
    }

    pub fn lookup(&self, pid: i32, secret: i32) -> Option<CancelTarget> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.get(&(pid, secret)).and_then(|s| s.get())
    }
}

/// A pid for clients that have no backend yet, outside the range PostgreSQL uses (at most 2^22).
pub fn synthetic_pid() -> i32 {
    rand::thread_rng().gen_range((1 << 23)..i32::MAX)
}

/// Sends a CancelRequest to the backend and waits (briefly) for it to close the connection, as libpq does.
pub async fn forward(target: CancelTarget) -> std::io::Result<()> {
    let run = async {
        let mut tcp = TcpStream::connect((&*target.host, target.port)).await?;
        let mut buf = BytesMut::new();
        postgres_protocol::message::frontend::cancel_request(target.pid, target.secret, &mut buf);
        tcp.write_all(&buf).await?;
        let mut sink = [0u8; 64];
        while tcp.read(&mut sink).await? > 0 {}
        Ok(())
    };
    tokio::time::timeout(CANCEL_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}
