//! One stream type for every connection the proxy holds, so the relay is not generic over four types.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub enum Stream {
    /// Plain TCP, with the task whose read wake-up is registered (see `rawio::poll_recv_armed`).
    Tcp(TcpStream, Armed),
    /// Client-facing TLS (we are the server).
    ServerTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Backend-facing TLS (we are the client).
    ClientTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// An in-process pipe: the relay's unit tests drive a session and a scripted backend through these.
    Memory(tokio::io::DuplexStream),
}

/// The task (its waker's data and vtable pointers) that registered for the socket's next read readiness and saw none since;
/// 0 when nobody is known to be registered. See `rawio::poll_recv_armed`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Armed(pub(super) (usize, usize));

impl Stream {
    /// A plain TCP connection.
    pub fn plain(tcp: TcpStream) -> Stream {
        Stream::Tcp(tcp, Armed::default())
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::ServerTls(_) | Stream::ClientTls(_))
    }

    /// The socket under the stream (none for an in-process pipe).
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Tcp(s, _) => Some(s),
            Stream::ServerTls(s) => Some(s.get_ref().0),
            Stream::ClientTls(s) => Some(s.get_ref().0),
            Stream::Memory(_) => None,
        }
    }

    /// Sends what it can of `data` now if this is plain TCP known to be writable (see `rawio::try_send`);
    /// `None` otherwise, and the relay's poll writes it.
    #[cfg_attr(not(target_os = "linux"), allow(unused_variables))]
    pub fn try_send(&self, data: &[u8]) -> io::Result<Option<usize>> {
        match self {
            #[cfg(target_os = "linux")]
            Stream::Tcp(s, _) => super::rawio::try_send(s, data),
            _ => Ok(None),
        }
    }

    /// Reads into the spare capacity of `buf` (on plain TCP, room is made in a full one; the relay keeps room
    /// of its own): the bytes read, 0 at the end. On plain TCP, a task on a single-threaded runtime (`one_thread`)
    /// that reads in a loop skips tokio's readiness registration while its last one stands (see
    /// `rawio::poll_recv_armed`).
    pub fn poll_read_bytes(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut bytes::BytesMut,
        one_thread: bool,
    ) -> Poll<io::Result<usize>> {
        #[cfg(target_os = "linux")]
        if let Stream::Tcp(s, armed) = self {
            let armed = one_thread.then_some(&mut armed.0);
            return super::rawio::poll_recv_armed(s, armed, cx, buf);
        }
        #[cfg(not(target_os = "linux"))]
        let _ = one_thread;
        tokio_util::io::poll_read_buf(Pin::new(self), cx, buf)
    }

    /// Whether nothing has arrived on an idle connection (the pool's liveness check), without registering a
    /// waker: the one the connection's last reader left stays, and so does its `Armed` unless the check had
    /// to peek (the readiness was set; see `rawio::nothing_to_read`).
    pub fn nothing_to_read(&mut self) -> bool {
        #[cfg(target_os = "linux")]
        if let Stream::Tcp(s, armed) = self {
            let (quiet, peeked) = super::rawio::nothing_to_read(s);
            if peeked {
                *armed = Armed::default();
            }
            return quiet;
        }
        self.tcp().is_none_or(quiet_by_readiness)
    }

    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        self.tcp().and_then(|t| t.peer_addr().ok())
    }
}

/// [`Stream::nothing_to_read`] through tokio's readiness (TLS, or not Linux), read with a waker that does
/// nothing (nobody waits on an idle connection), and a peek when it is set.
fn quiet_by_readiness(tcp: &TcpStream) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    if tcp.poll_read_ready(&mut cx).is_pending() {
        return true;
    }
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    tcp.poll_peek(&mut cx, &mut buf).is_pending()
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Tcp($s, _) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::ServerTls($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
            Stream::ClientTls($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
            Stream::Memory($s) => {
                let $s = Pin::new($s);
                $e
            }
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        #[cfg(target_os = "linux")]
        if let Stream::Tcp(s, armed) = self.as_mut().get_mut() {
            // A read outside the relay's: whatever it saw, the relay's next read registers again.
            *armed = Armed::default();
            return super::rawio::poll_recv(s, cx, buf);
        }
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        #[cfg(target_os = "linux")]
        if let Stream::Tcp(s, _) = self.as_ref().get_ref() {
            return super::rawio::poll_send(s, cx, buf);
        }
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s, _) => s.is_write_vectored(),
            Stream::ServerTls(s) => s.is_write_vectored(),
            Stream::ClientTls(s) => s.is_write_vectored(),
            Stream::Memory(s) => s.is_write_vectored(),
        }
    }
}
