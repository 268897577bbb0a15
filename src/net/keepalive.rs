//! TCP keepalive on client and backend sockets: a peer that vanished without closing (a crashed host, a
//! dropped NAT entry) is noticed after `idle + interval * count` instead of never.

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

use crate::config::Keepalive;

/// Turns keepalive on for `tcp` as configured; failures are only logged (the connection still works).
pub fn apply(tcp: &TcpStream, keepalive: Option<Keepalive>) {
    let Some(k) = keepalive else {
        return;
    };
    let params = TcpKeepalive::new()
        .with_time(k.idle)
        .with_interval(k.interval)
        .with_retries(k.count);
    if let Err(e) = SockRef::from(tcp).set_tcp_keepalive(&params) {
        tracing::debug!(error = %e, "could not enable TCP keepalive");
    }
}
