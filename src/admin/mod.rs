//! The admin socket (DESIGN section 6): JSON lines over a unix socket (mode 0600) and, optionally, over TCP
//! with a token.

pub mod commands;
pub mod grants;
pub mod protocol;
pub mod reload;
pub mod server;

pub use protocol::{AdminError, Request};

use serde_json::Value;

/// A command's answer plus what the audit log records about it.
pub struct Done {
    pub result: Value,
    pub before: Value,
    pub after: Value,
}

impl Done {
    pub fn read(result: Value) -> Done {
        Done {
            result,
            before: Value::Null,
            after: Value::Null,
        }
    }
}
