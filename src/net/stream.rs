//! One stream type for every connection the proxy holds, so the relay is not generic over four types.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub enum Stream {
    Tcp(TcpStream),
    /// Client-facing TLS (we are the server).
    ServerTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Backend-facing TLS (we are the client).
    ClientTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// An in-process pipe: the relay's unit tests drive a session and a scripted backend through these.
    Memory(tokio::io::DuplexStream),
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::ServerTls(_) | Stream::ClientTls(_))
    }

    /// The socket under the stream (none for an in-process pipe).
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Tcp(s) => Some(s),
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
            Stream::Tcp(s) => super::rawio::try_send(s, data),
            _ => Ok(None),
        }
    }

    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        self.tcp().and_then(|t| t.peer_addr().ok())
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Tcp($s) => {
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
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        #[cfg(target_os = "linux")]
        if let Stream::Tcp(s) = self.as_ref().get_ref() {
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
        if let Stream::Tcp(s) = self.as_ref().get_ref() {
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
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::ServerTls(s) => s.is_write_vectored(),
            Stream::ClientTls(s) => s.is_write_vectored(),
            Stream::Memory(s) => s.is_write_vectored(),
        }
    }
}
