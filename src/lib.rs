//! pgtenant: a PostgreSQL wire-protocol proxy that routes each tenant's connections to that tenant's backend.

pub mod admin;
pub mod auth;
pub mod backend;
pub mod backup;
pub mod cancel;
pub mod config;
pub mod context;
pub mod ctl;
pub mod errors;
pub mod frontend;
pub mod gate;
pub mod heap;
pub mod ids;
pub mod metrics;
pub mod migration;
pub mod net;
pub mod notify;
pub mod protocol;
pub mod quote;
pub mod routing;
pub mod server;
pub mod sessions;
pub mod shutdown;
pub mod state;
pub mod tenant;
