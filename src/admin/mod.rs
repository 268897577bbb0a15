//! The admin socket (DESIGN section 6): JSON lines over a unix socket (mode 0600) and, optionally, over TCP
//! with a token. One typed protocol ([`request`], [`reply`], [`code`]) shared by the server and `ctl`.

pub mod args;
pub mod cmd;
pub mod code;
pub mod grant_sql;
pub mod reply;
pub mod request;
pub mod server;

pub use cmd::Done;
pub use code::{AdminCode, AdminError};
pub use request::Request;
