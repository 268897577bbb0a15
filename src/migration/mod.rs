//! Live tenant migration (DESIGN section 5).
//!
//! - What a migration is and where it stands: the record ([`record`]), the state machine ([`machine`]: states,
//!   events, the one transition table), the registry of records and running work ([`registry`]).
//! - What drives it: the per-migration task ([`driver`]) and its pure decisions ([`decide`]); the admin
//!   operations ([`ops`], [`ddl`]).
//! - The work: change capture and the fence ([`capture`]), bulk copy ([`copy`]), the exactly-once applier
//!   ([`apply`], [`batch`], [`layers`], [`rowsql`]) and the tee that runs it after commits ([`tee`]), verification
//!   ([`verify`], [`verification`]), cutover and rollback ([`cutover`]); both sides and their connections
//!   ([`sides`], [`pg`], [`catalog`]); failpoints for tests ([`failpoint`]).

pub mod apply;
pub mod batch;
pub mod capture;
pub mod catalog;
pub mod claim;
pub mod clock;
pub mod copy;
pub mod copy_fence;
pub(crate) mod copy_split;
pub mod cutover;
pub mod ddl;
pub mod decide;
pub mod driver;
pub mod drops;
pub mod events;
pub mod failpoint;
pub mod history;
pub mod layers;
pub mod machine;
pub mod ops;
pub mod pg;
pub mod post_data;
mod publish;
pub mod queue;
pub mod record;
pub mod registry;
pub mod rollback;
pub mod rowsql;
pub mod sides;
pub mod tee;
pub mod verification;
pub mod verify;
pub mod window;

use thiserror::Error;

pub use registry::Migrations;

#[derive(Debug, Error)]
pub enum MigrateError {
    #[error("{0}")]
    Refused(String),
    #[error("{context}: {message}")]
    Postgres { context: String, message: String },
    #[error("timed out: {0}")]
    Timeout(String),
    /// Another proxy instance did not hold the tenant (or the control plane did not answer) in time.
    #[error("cutover barrier: {0}")]
    Barrier(String),
    /// The control plane did not answer a route swap: its outcome is unknown, so the tenant stays held.
    #[error("{0}")]
    SwapUnknown(String),
    #[error("failpoint {0} triggered")]
    Failpoint(String),
    #[error("stopped")]
    Cancelled,
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

impl MigrateError {
    /// A blocking thread that wrote migration state failed (it does not panic; if it did, the write's outcome is
    /// unknown, which is a state write error).
    pub fn state_thread(what: &str, e: tokio::task::JoinError) -> MigrateError {
        let failed = std::io::Error::other(format!("the {what}'s thread failed: {e}"));
        MigrateError::State(crate::state::StateError::io(
            std::path::Path::new("migrations"),
            failed,
        ))
    }

    /// A PostgreSQL error with the server's message, code and detail (tokio-postgres' Display hides them).
    pub fn pg(context: &str, e: tokio_postgres::Error) -> MigrateError {
        let message = match e.as_db_error() {
            Some(db) => {
                let mut m = format!("{} (SQLSTATE {})", db.message(), db.code().code());
                if let Some(d) = db.detail() {
                    m.push_str(&format!("; {d}"));
                }
                m
            }
            None => e.to_string(),
        };
        MigrateError::Postgres {
            context: context.to_owned(),
            message,
        }
    }
}
