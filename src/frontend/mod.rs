//! The client side: the pre-protocol handshake and TLS ([`startup`]), password exchanges ([`auth`]), logging a
//! client in and choosing its tenant ([`login`]), and the relay loop ([`session`]) with the statements the proxy
//! answers itself ([`intercept`]).

pub mod auth;
mod boundary;
mod client_in;
pub mod client_info;
pub mod guards;
pub mod intercept;
pub mod limits;
pub mod login;
mod parts;
mod pooling;
mod relay;
mod resolve;
mod server;
mod server_in;
pub mod session;
pub mod startup;
pub mod state;
mod statements;
#[cfg(test)]
mod tests;
mod timeouts;

pub use boundary::moved_away;
pub use login::serve_client;
