//! The parts of a relay session, each owning its fields: the client side ([`ClientSide`]), the transaction and
//! gate state ([`Txn`]), transaction pooling ([`Pooling`]) and where the session is routed ([`Place`]). The
//! backend side is [`super::server::Server`]; the session state it tracks is [`super::state::SessionState`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Buf, BytesMut};

use super::statements::{ClientStatements, Inflight};
use crate::gate::{Gate, GatePass};
use crate::metrics::TenantMetrics;
use crate::net::Stream;
use crate::protocol::frame::{Direction, Scanner, WHOLE_FRAME_MAX};
use crate::protocol::{messages, tag, PgError};
use crate::routing::{Epoch, Route};
use crate::tenant::TenantId;

/// Stop reading a side while the buffer towards the other side holds more than this.
pub const OUT_HIGH_WATER: usize = 256 * 1024;
/// Capacity of the held-reply buffer kept across transactions.
const HELD_KEEP: usize = 4 * 1024;

/// How an error skip ends at the client's Sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SkipEnd {
    /// Nothing of the batch reached a backend: answer the Sync ourselves.
    Local,
    /// Part of the batch went to the backend: send it the Sync; the backend answers it.
    ForwardSync,
}

/// Why a session ended.
#[derive(Debug)]
pub(super) enum End {
    ClientGone,
    /// The client sent Terminate.
    Terminated,
    ServerGone,
    Shutdown,
    Fatal(PgError),
}

/// Moves the first `n` bytes of `from` to the end of `to`; when that is all of `from` and `to` is empty the
/// buffers are swapped instead of copied.
pub(super) fn move_bytes(from: &mut BytesMut, to: &mut BytesMut, n: usize) {
    if n == 0 {
        return;
    }
    if to.is_empty() && n == from.len() {
        std::mem::swap(from, to);
    } else {
        to.extend_from_slice(&from[..n]);
        from.advance(n);
    }
}

/// Sets `name` to `value` in a list of parameters.
pub(super) fn set_param(params: &mut Vec<(String, String)>, name: &str, value: &str) {
    match params.iter_mut().find(|(k, _)| k == name) {
        Some((_, v)) => {
            if v != value {
                *v = value.to_owned()
            }
        }
        None => params.push((name.to_owned(), value.to_owned())),
    }
}

/// The client's socket and what is buffered either way.
pub(super) struct ClientSide {
    pub stream: Stream,
    /// Bytes from the client not yet handled.
    pub cin: BytesMut,
    /// Bytes for the client not yet written.
    pub cout: BytesMut,
    /// TLS buffers what it is given: flush once `cout` is empty.
    pub flush: bool,
    /// Bytes `cin` must hold before the next frame can be judged.
    pub need: usize,
    pub scan: Scanner,
    /// After an error in the extended protocol, client messages are dropped up to Sync (as PostgreSQL does).
    pub skip: Option<SkipEnd>,
    /// The rest of a refused streamed frame is dropped.
    pub discarding: bool,
    /// ParameterStatus values the client has been told.
    pub told: Vec<(String, String)>,
}

impl ClientSide {
    pub fn new(stream: Stream, cin: BytesMut, told: Vec<(String, String)>) -> ClientSide {
        ClientSide {
            stream,
            cin,
            cout: BytesMut::new(),
            flush: false,
            need: 0,
            scan: Scanner::new(Direction::FromClient, WHOLE_FRAME_MAX),
            skip: None,
            discarding: false,
            told,
        }
    }

    /// Answers a frame that may not reach the backend (nothing of it was forwarded, and the backend owes
    /// nothing): the error, then ReadyForQuery with `status` now (Query, FunctionCall) or at the client's Sync.
    pub fn refuse(&mut self, frame_tag: u8, err: PgError, status: u8) {
        err.encode(&mut self.cout);
        match frame_tag {
            tag::frontend::QUERY | tag::frontend::FUNCTION_CALL => {
                messages::ready_for_query(&mut self.cout, status)
            }
            _ => self.skip = Some(SkipEnd::Local),
        }
    }

    /// Records a ParameterStatus value the client is told.
    pub fn set_told(&mut self, name: &str, value: &str) {
        set_param(&mut self.told, name, value);
    }

    /// Tells the client every parameter of `params` that differs from what it was told, and remembers them.
    pub fn tell(&mut self, params: &[(String, String)]) {
        for (k, v) in params {
            if self.told.iter().all(|(tk, tv)| tk != k || tv != v) {
                messages::parameter_status(&mut self.cout, k, v);
            }
        }
        self.told = params.to_vec();
    }
}

/// The current transaction: the gate pass that admitted it, what it did, and a reply held for the tee.
#[derive(Default)]
pub(super) struct Txn {
    /// The tenant's gate (while no transaction holds a pass).
    pub gate: Option<Arc<Gate>>,
    /// Held from the start of a transaction to its end.
    pub pass: Option<GatePass>,
    /// Queries, times and bytes counted since the last flush into the tenant's totals (at a transaction's end).
    pub tally: crate::metrics::Tally,
    /// When the backend began to owe a ReadyForQuery for the query or batch in flight (for the query time).
    pub query_started: Option<std::time::Instant>,
    /// When this transaction's backend connection was ready: the start of its first query's time, if that
    /// query is booked before the backend next settles everything owed (then it is dropped).
    pub routed_at: Option<std::time::Instant>,
    /// When the current transaction got its gate pass (for the tenant's transaction time).
    pub started: Option<std::time::Instant>,
    /// When the last ReadyForQuery that settled everything owed arrived: the end of a transaction ending there,
    /// read once for both its query time and its transaction time.
    pub settled_at: Option<std::time::Instant>,
    /// A statement the proxy answers itself waits at the head of the input until the backend owes nothing.
    pub blocked: bool,
    /// Client frames wait behind the proxy's own reset (pipelined with no Sync ahead of them) until it is
    /// known to have succeeded: one frame that ends a batch has gone after it, and if the reset failed,
    /// PostgreSQL would run whatever comes after that frame on the unreset connection.
    pub own_wait: bool,
    /// The current transaction changed rows (judged from CommandComplete tags and COPY FROM).
    pub wrote: bool,
    /// While a migration tee drains this transaction's changes to the target, the reply that ends it waits in
    /// `held` and neither side is processed further.
    pub tee_wait: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
    pub held: BytesMut,
}

impl Txn {
    /// The reply the tee held, to go to the client now; the buffer keeps little memory between transactions.
    pub fn release_held(&mut self, cout: &mut BytesMut) {
        self.tee_wait = None;
        cout.extend_from_slice(&self.held);
        self.held.clear();
        if self.held.capacity() > HELD_KEEP {
            self.held = BytesMut::new();
        }
    }

    /// Takes the first `n` bytes of `from` into the held reply.
    pub fn hold(&mut self, from: &mut BytesMut, n: usize) {
        self.held.extend_from_slice(&from[..n]);
        from.advance(n);
    }
}

/// Transaction pooling: what lets a session give its backend connection back between transactions.
#[derive(Default)]
pub(super) struct Pooling {
    /// The backend connection is held only from the start of a transaction to its end.
    pub tx_mode: bool,
    /// The client's named statements, prepared on each connection as needed.
    pub statements: ClientStatements,
    /// Where the tenant's transactions went last (reused while nothing changed).
    pub resolved: Option<super::resolve::Resolved>,
    /// The output buffer and in-flight queue of the last backend connection, kept for the next one (dropping
    /// them at every park would cost an allocation per transaction).
    pub spare: Option<(BytesMut, Inflight)>,
    /// A shared pool: the tenant's schema, set per transaction (see [`super::resolve::resolve`]).
    pub route_path: Option<Arc<str>>,
}

/// Where the session is routed: its tenant, the route and epoch its backend connection was chosen under.
#[derive(Default)]
pub(super) struct Place {
    pub tenant: Option<TenantId>,
    pub route: Option<Arc<Route>>,
    pub epoch: Epoch,
    /// Since when a route change has been waiting for this pinned session to unpin.
    pub stale_since: Option<std::time::Instant>,
    pub tm: Option<Arc<TenantMetrics>>,
    /// The pin reason the session registry was last told.
    pub published_pin: Option<&'static str>,
}
