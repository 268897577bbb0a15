//! The PostgreSQL v3 wire protocol, without any I/O.
//!
//! Everything here works on byte slices so it can be unit-tested and fuzzed: the startup packet parser, the
//! streaming frame scanner the relay uses, the few inspections the proxy needs (ReadyForQuery status,
//! ParameterStatus, BackendKeyData), the `SET pgtenant.tenant` recogniser, and builders for the messages the
//! proxy writes itself.

pub mod frame;
pub mod inspect;
pub mod messages;
pub mod sql;
pub mod sqlstate;
pub mod startup;
pub mod tag;

pub use frame::{Direction, FrameError, Scan, Scanner};
pub use messages::PgError;

/// A frame with `tag` and `body`, for unit tests.
#[cfg(test)]
pub(crate) fn test_frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}
