//! The admin socket (DESIGN section 6): JSON lines over a unix socket (mode 0600) and, optionally, over TCP
//! with a token.

pub mod commands;
pub mod grants;
pub mod protocol;
pub mod server;

pub use protocol::{AdminError, Request};
