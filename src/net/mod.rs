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
