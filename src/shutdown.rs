//! The "end every session now" signal, and per-session end signals.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// The "end every session now" signal. Sessions poll it on every relay step, so checking it is one atomic load
/// (a `CancellationToken` takes a mutex to answer `is_cancelled`).
#[derive(Default)]
pub struct Terminate {
    fired: AtomicBool,
    notify: Notify,
}

impl Terminate {
    pub fn fire(&self) {
        self.fired.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub fn is_fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// Completes when the signal fires (at once if it already has).
    pub async fn fired(&self) {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.is_fired() {
            return;
        }
        notified.await;
    }
}
