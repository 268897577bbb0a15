//! The relay loop: one task per client that moves raw frames both ways at once.
//!
//! Reads and writes on both sockets are polled together in one future ([`Session::poll_io`]), so a backend that
//! streams a large result while the client is still pipelining input never deadlocks the relay, and no locks or
//! extra tasks sit on the path. Flow control: a side is not read while the other side's outgoing buffer is
//! above [`OUT_HIGH_WATER`]. What each side's input means is decided in `client_in` and `server_in`.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWrite;

use super::parts::{End, OUT_HIGH_WATER};
use super::session::Session;
use super::timeouts::Phase;
use crate::net::Stream;
use crate::protocol::tag;

/// Reads stop once this much client input is waiting to be handled (unless a whole frame needs more).
const CLIENT_IN_MAX: usize = 64 * 1024;
/// An idle session's read buffers stay this small; they double while reads keep filling them.
const READ_MIN: usize = 1024;

enum Ev {
    ClientIn,
    ServerIn,
    ClientOut(usize),
    ServerOut(usize),
    ClientFlushed,
    ServerFlushed,
    Shutdown,
    /// The migration tee has the transaction's changes on the target (or gave up waiting).
    TeeDone,
    /// A client timeout may have passed.
    Timer,
}

impl Session {
    /// Why the session stops on a shutdown wake-up: told to end on its own (with its reason), or with the
    /// proxy.
    pub(super) fn shutdown_end(&self) -> End {
        match self.handle.info.take_end_reason() {
            Some(reason) => End::Fatal(reason),
            None => End::Shutdown,
        }
    }

    /// The session's client timeout fired: end it if the current phase's limit passed.
    fn on_timer(&mut self) -> Result<(), End> {
        let phase =
            if self.txn.tee_wait.is_some() || self.server.as_ref().is_some_and(|s| s.pending > 0) {
                Phase::Busy
            } else if self.status() != tag::status::IDLE {
                Phase::InTransaction
            } else {
                Phase::Idle
            };
        let Some(t) = self.timeouts.as_mut() else {
            return Ok(());
        };
        let Some(err) = t.check(phase) else {
            return Ok(());
        };
        tracing::info!(phase = ?phase, tenant = ?self.place.tenant, "client timeout; ending the session");
        if phase == Phase::Busy {
            // Stop the statement on the server too; the connection is closed either way.
            if let Some(target) = self.server.as_ref().map(|s| s.conn.get().cancel_target()) {
                tokio::spawn(async move {
                    let _ = crate::cancel::forward(target).await;
                });
            }
        }
        Err(End::Fatal(err))
    }

    pub(super) async fn relay(&mut self, mut shutdown: Pin<&mut impl Future<Output = ()>>) -> End {
        if let Err(end) = self.on_client_input().await {
            return end;
        }
        loop {
            let ev = poll_fn(|cx| self.poll_io(cx, shutdown.as_mut())).await;
            let step = match ev {
                Ok(Ev::ClientOut(n)) => self.client_wrote(n).await,
                Ok(Ev::ServerOut(n)) => {
                    self.server_wrote(n);
                    Ok(())
                }
                Ok(Ev::ClientFlushed) => {
                    self.client.flush = false;
                    Ok(())
                }
                Ok(Ev::ServerFlushed) => {
                    if let Some(s) = self.server.as_mut() {
                        s.flush = false;
                    }
                    Ok(())
                }
                Ok(Ev::ClientIn) => {
                    if let Some(t) = self.timeouts.as_mut() {
                        t.client_event();
                    }
                    match self.on_client_input().await {
                        Ok(()) => self.write_server_now(),
                        Err(end) => Err(end),
                    }
                }
                Ok(Ev::ServerIn) => {
                    if let Some(t) = self.timeouts.as_mut() {
                        t.server_event();
                    }
                    match self.after_server_input().await {
                        Ok(()) => self.write_client_now().await,
                        Err(end) => Err(end),
                    }
                }
                Ok(Ev::Timer) => self.on_timer(),
                Ok(Ev::TeeDone) => self.after_tee().await,
                Ok(Ev::Shutdown) => Err(self.shutdown_end()),
                Err(end) => Err(end),
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Some of the client's answers went out.
    async fn client_wrote(&mut self, n: usize) -> Result<(), End> {
        self.client.cout.advance(n);
        trim(&mut self.client.cout);
        // Plain TCP writes go straight to the socket; only TLS buffers and needs a flush.
        self.client.flush = self.client.stream.is_tls();
        // Input held back while our answers piled up can go on now.
        if self.client.cout.len() < OUT_HIGH_WATER && !self.client.cin.is_empty() {
            self.on_client_input().await
        } else {
            Ok(())
        }
    }

    fn server_wrote(&mut self, n: usize) {
        if let Some(s) = self.server.as_mut() {
            s.out.advance(n);
            trim(&mut s.out);
            s.flush = s.conn.get().stream.is_tls();
        }
    }

    /// Writes what the client's input put in the backend's buffer at once when its socket is known writable,
    /// rather than on the next turn of the poll loop (what is left, if any, that turn writes). Counted with
    /// `benches/instructions.sh`, the extra turns cost about 100 instructions of a transaction, both directions
    /// together.
    fn write_server_now(&mut self) -> Result<(), End> {
        let Some(s) = self.server.as_mut() else {
            return Ok(());
        };
        if s.out.is_empty() {
            return Ok(());
        }
        match s.conn.get().stream.try_send(&s.out) {
            Ok(Some(n)) => {
                self.server_wrote(n);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(_) => Err(End::ServerGone),
        }
    }

    /// The same for the client's answers.
    async fn write_client_now(&mut self) -> Result<(), End> {
        if self.client.cout.is_empty() {
            return Ok(());
        }
        match self.client.stream.try_send(&self.client.cout) {
            Ok(Some(n)) => self.client_wrote(n).await,
            Ok(None) => Ok(()),
            Err(_) => Err(End::ClientGone),
        }
    }

    /// Polls every socket operation that is wanted now and reports the first that is ready.
    fn poll_io(
        &mut self,
        cx: &mut Context<'_>,
        shutdown: Pin<&mut impl Future<Output = ()>>,
    ) -> Poll<Result<Ev, End>> {
        if self.shared.terminate.is_fired() || self.handle.info.end.is_fired() {
            return Poll::Ready(Ok(Ev::Shutdown));
        }
        if let Some(wait) = self.txn.tee_wait.as_mut() {
            if wait.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(Ev::TeeDone));
            }
        }
        if let Poll::Ready(r) = poll_write_side(
            cx,
            &mut self.client.stream,
            &self.client.cout,
            self.client.flush,
        ) {
            return Poll::Ready(r.map(|w| w.client()).map_err(|_| End::ClientGone));
        }
        if let Some(s) = self.server.as_mut() {
            if let Poll::Ready(r) =
                poll_write_side(cx, &mut s.conn.get_mut().stream, &s.out, s.flush)
            {
                return Poll::Ready(r.map(|w| w.server()).map_err(|_| End::ServerGone));
            }
        }
        let server_out = self.server.as_ref().map_or(0, |s| s.out.len());
        if self.client.cin.len() < self.client.need.max(CLIENT_IN_MAX)
            && server_out < OUT_HIGH_WATER
            && self.client.cout.len() < OUT_HIGH_WATER
        {
            read_space(&mut self.client.cin);
            match self
                .client
                .stream
                .poll_read_bytes(cx, &mut self.client.cin, self.one_thread)
            {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    return Poll::Ready(Err(End::ClientGone))
                }
                Poll::Ready(Ok(n)) => {
                    self.txn.tally.received += n as u64;
                    return Poll::Ready(Ok(Ev::ClientIn));
                }
                Poll::Pending => {}
            }
        }
        if self.client.cout.len() < OUT_HIGH_WATER && self.txn.tee_wait.is_none() {
            if let Some(s) = self.server.as_mut() {
                let conn = s.conn.get_mut();
                read_space(&mut conn.buf);
                match conn
                    .stream
                    .poll_read_bytes(cx, &mut conn.buf, self.one_thread)
                {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        return Poll::Ready(Err(End::ServerGone))
                    }
                    Poll::Ready(Ok(n)) => {
                        self.txn.tally.sent += n as u64;
                        return Poll::Ready(Ok(Ev::ServerIn));
                    }
                    Poll::Pending => {}
                }
            }
        }
        // Registering for the shutdown and timer wake-ups only on the way to sleep keeps them off the busy path.
        if shutdown.poll(cx).is_ready() {
            return Poll::Ready(Ok(Ev::Shutdown));
        }
        if let Some(t) = self.timeouts.as_mut() {
            if t.poll(cx).is_ready() {
                return Poll::Ready(Ok(Ev::Timer));
            }
        }
        Poll::Pending
    }

    /// The tee released a held reply: deliver it and go on with whatever arrived meanwhile.
    async fn after_tee(&mut self) -> Result<(), End> {
        self.txn.release_held(&mut self.client.cout);
        if self
            .server
            .as_ref()
            .is_some_and(|s| !s.conn.get().buf.is_empty())
        {
            self.after_server_input().await?;
        }
        if self.txn.tee_wait.is_none() && !self.client.cin.is_empty() {
            self.on_client_input().await?;
        }
        Ok(())
    }

    async fn after_server_input(&mut self) -> Result<(), End> {
        if self.txn.tee_wait.is_some() {
            return Ok(());
        }
        self.on_server_input()?;
        let (pending, own) = self
            .server
            .as_ref()
            .map_or((0, 0), |s| (s.pending, s.own_pending));
        let mut resume = false;
        if self.txn.blocked && pending == 0 {
            self.txn.blocked = false;
            resume = true;
        }
        if self.txn.own_wait && own == 0 {
            self.txn.own_wait = false;
            resume = true;
        }
        if resume {
            self.on_client_input().await?;
        }
        Ok(())
    }
}

enum Wrote {
    Bytes(usize),
    Flushed,
}

impl Wrote {
    fn client(self) -> Ev {
        match self {
            Wrote::Bytes(n) => Ev::ClientOut(n),
            Wrote::Flushed => Ev::ClientFlushed,
        }
    }
    fn server(self) -> Ev {
        match self {
            Wrote::Bytes(n) => Ev::ServerOut(n),
            Wrote::Flushed => Ev::ServerFlushed,
        }
    }
}

/// Makes room for a read without holding big buffers for idle sessions: at least 512 bytes free, growing
/// geometrically while reads keep filling the buffer.
fn read_space(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 512 {
        buf.reserve(buf.capacity().max(READ_MIN));
    }
}

/// Gives back the memory of a buffer that grew for a burst once it is empty again.
fn trim(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > OUT_HIGH_WATER {
        *buf = BytesMut::new();
    }
}

/// Writes what is buffered for one side, or flushes it once the buffer is empty (TLS keeps its own buffer).
fn poll_write_side(
    cx: &mut Context<'_>,
    stream: &mut Stream,
    out: &BytesMut,
    flush: bool,
) -> Poll<std::io::Result<Wrote>> {
    if !out.is_empty() {
        return match Pin::new(stream).poll_write(cx, out) {
            Poll::Ready(Ok(0)) => Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
            Poll::Ready(r) => Poll::Ready(r.map(Wrote::Bytes)),
            Poll::Pending => Poll::Pending,
        };
    }
    if flush {
        return Pin::new(stream)
            .poll_flush(cx)
            .map(|r| r.map(|_| Wrote::Flushed));
    }
    Poll::Pending
}
