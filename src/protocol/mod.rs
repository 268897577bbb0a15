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

pub use frame::{Direction, FrameError, Scan, Scanner};
pub use messages::PgError;
