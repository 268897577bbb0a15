//! Slows down password guessing: after a failed login, the answer to the next failure from the same address
//! waits longer (doubling up to a ceiling); a success clears the address. The table is bounded.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest delay before a failed login is answered.
const MAX_DELAY: Duration = Duration::from_secs(2);
/// Addresses remembered at most; beyond it the oldest entries go.
const MAX_PEERS: usize = 10_000;
/// An address that has not failed for this long starts over.
const FORGET_AFTER: Duration = Duration::from_secs(600);

#[derive(Default)]
pub struct AuthThrottle {
    base_ms: AtomicU64,
    peers: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl AuthThrottle {
    pub fn new(base_ms: u64) -> AuthThrottle {
        AuthThrottle {
            base_ms: AtomicU64::new(base_ms),
            peers: Mutex::new(HashMap::new()),
        }
    }

    /// Applies a reloaded `auth_failure_delay_ms`.
    pub fn set_base(&self, ms: u64) {
        self.base_ms.store(ms, Ordering::Relaxed);
    }

    /// The delay for another failure from `peer`, and counts it.
    pub fn note_failure(&self, peer: Option<IpAddr>) -> Duration {
        let base = Duration::from_millis(self.base_ms.load(Ordering::Relaxed));
        if base.is_zero() {
            return Duration::ZERO;
        }
        let Some(ip) = peer else {
            return base;
        };
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if peers.len() >= MAX_PEERS {
            peers.retain(|_, (_, at)| now.duration_since(*at) < FORGET_AFTER);
            if peers.len() >= MAX_PEERS {
                peers.clear();
            }
        }
        let entry = peers.entry(ip).or_insert((0, now));
        if now.duration_since(entry.1) >= FORGET_AFTER {
            entry.0 = 0;
        }
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
        let factor = 1u32 << (entry.0 - 1).min(16);
        base.saturating_mul(factor).min(MAX_DELAY)
    }

    /// Waits out the delay a failure from `peer` earns.
    pub async fn failed(&self, peer: Option<IpAddr>) {
        let delay = self.note_failure(peer);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }

    pub fn succeeded(&self, peer: Option<IpAddr>) {
        if let Some(ip) = peer {
            self.peers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_per_address_up_to_the_ceiling_and_reset_on_success() {
        let t = AuthThrottle::new(250);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let ms = |d: Duration| d.as_millis();
        assert_eq!(ms(t.note_failure(Some(a))), 250);
        assert_eq!(ms(t.note_failure(Some(a))), 500);
        assert_eq!(ms(t.note_failure(Some(a))), 1000);
        assert_eq!(ms(t.note_failure(Some(a))), 2000);
        assert_eq!(ms(t.note_failure(Some(a))), 2000);
        assert_eq!(
            ms(t.note_failure(Some(b))),
            250,
            "other addresses are not affected"
        );
        t.succeeded(Some(a));
        assert_eq!(ms(t.note_failure(Some(a))), 250);
        t.set_base(0);
        assert_eq!(t.note_failure(Some(a)), Duration::ZERO);
    }
}
