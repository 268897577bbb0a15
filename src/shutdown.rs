//! The "end every session now" signal, and per-session end signals.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

/// The "stop now" signal of the proxy's background tasks (any number of waiters). Sessions do not wait on it:
/// a waiting `Notified` takes the notifier's mutex on every poll, and every session polling one global mutex
/// on every relay step would make it the hottest lock of the proxy; shutdown fires each session's own
/// [`EndSignal`] instead.
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

/// One session's "end now" signal: one waiter (the session's task), so firing and waiting are an atomic flag
/// and an `AtomicWaker`, with no lock on the relay's path.
#[derive(Default)]
pub struct EndSignal {
    fired: AtomicBool,
    waker: AtomicWaker,
}

impl EndSignal {
    pub fn fire(&self) {
        self.fired.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    pub fn is_fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// Completes when the signal fires (at once if it already has). Only the session's own task may wait.
    pub fn fired(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.is_fired() {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            // Fired between the check and the registration: the wake may have missed the new waker.
            if self.is_fired() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn an_end_signal_wakes_its_waiter_once_fired() {
        let signal = Arc::new(EndSignal::default());
        let waiter = tokio::spawn({
            let s = signal.clone();
            async move { s.fired().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        signal.fire();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        // Already fired: completes at once.
        signal.fired().await;
    }
}
