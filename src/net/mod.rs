//! Sockets: one stream type for plain TCP and TLS on either side, client-facing TLS setup, and the small
//! helpers for reading frames during handshakes.

pub mod cidr;
pub mod fds;
pub mod keepalive;
#[cfg(target_os = "linux")]
pub mod rawio;
pub mod stream;
pub mod tls;

pub use stream::Stream;

/// Whether the calling task runs on a single-threaded (current-thread) runtime: there the I/O driver and the
/// tasks take turns on one thread, which `rawio::poll_recv_armed`'s shortcut needs.
pub fn on_one_thread() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread)
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_current_thread_runtime_is_one_thread() {
        assert!(!super::on_one_thread(), "outside any runtime");
        let one = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(one.block_on(async { super::on_one_thread() }));
        let many = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        assert!(!many.block_on(async {
            tokio::spawn(async { super::on_one_thread() })
                .await
                .unwrap()
        }));
    }
}
