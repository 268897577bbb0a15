//! Live tenant migration (DESIGN section 5): record and state machine ([`record`]), change capture
//! ([`capture`]), bulk copy ([`copy`]), the exactly-once applier ([`apply`]) and the tee that runs it after
//! commits ([`tee`]), verification ([`verify`]), cutover ([`cutover`]) and the coordinator that drives a
//! migration through its states and answers the `migrate.*` admin commands ([`coordinator`]).

pub mod apply;
pub mod batch;
pub mod capture;
pub mod catalog;
pub mod coordinator;
pub mod copy;
pub mod cutover;
pub mod ddl;
pub mod failpoint;
pub mod ops;
pub mod pg;
pub mod record;
pub mod rowsql;
pub mod tee;
pub mod verify;

use thiserror::Error;

pub use coordinator::Migrations;

#[derive(Debug, Error)]
pub enum MigrateError {
    #[error("{0}")]
    Refused(String),
    #[error("{context}: {message}")]
    Postgres { context: String, message: String },
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("failpoint {0} triggered")]
    Failpoint(String),
    #[error("stopped")]
    Cancelled,
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

impl MigrateError {
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
