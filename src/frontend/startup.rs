//! Reading the pre-protocol packets: SSLRequest (TLS via rustls when configured), GSSENCRequest (refused),
//! CancelRequest, and finally the StartupMessage.

use bytes::BytesMut;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

use crate::errors::ClientError;
use crate::net::Stream;
use crate::protocol::messages::PgError;
use crate::protocol::startup::{self, StartupError, StartupMessage, StartupPacket};

#[derive(Debug, Error)]
pub enum HandshakeError {
    #[error("client i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("client closed the connection during startup")]
    Closed,
    #[error(transparent)]
    Startup(#[from] StartupError),
    #[error("protocol violation: {0}")]
    Violation(&'static str),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
}

/// What the client wants once the handshake is over.
pub enum Hello {
    Startup {
        stream: Stream,
        /// Bytes that arrived after the StartupMessage.
        buf: BytesMut,
        message: StartupMessage,
    },
    Cancel {
        pid: i32,
        secret: i32,
    },
}

/// Reads one whole packet; `None` when the client closed before sending anything.
async fn read_packet(
    stream: &mut Stream,
    buf: &mut BytesMut,
) -> Result<Option<BytesMut>, HandshakeError> {
    loop {
        if let Some(len) = startup::packet_len(buf)? {
            if buf.len() >= len {
                return Ok(Some(buf.split_to(len)));
            }
        }
        buf.reserve(1024);
        if stream.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(HandshakeError::Closed)
            };
        }
    }
}

/// Runs the handshake up to a StartupMessage or CancelRequest. Protocol errors are reported to the client
/// before the error is returned.
pub async fn handshake(
    mut stream: Stream,
    tls: Option<&TlsAcceptor>,
) -> Result<Option<Hello>, HandshakeError> {
    let mut buf = BytesMut::with_capacity(1024);
    let mut gss_answered = false;
    loop {
        let Some(packet) = read_packet(&mut stream, &mut buf).await? else {
            return Ok(None);
        };
        let parsed = match startup::parse(&packet) {
            Ok(p) => p,
            Err(e) => {
                report(
                    &mut stream,
                    PgError::from(ClientError::Protocol(e.to_string())),
                )
                .await;
                return Err(e.into());
            }
        };
        match parsed {
            StartupPacket::SslRequest => {
                if stream.is_tls() {
                    return Err(HandshakeError::Violation("SSLRequest inside TLS"));
                }
                stream = negotiate_tls(stream, &buf, tls).await?;
            }
            StartupPacket::GssEncRequest => {
                if gss_answered || stream.is_tls() {
                    return Err(HandshakeError::Violation("repeated GSSENCRequest"));
                }
                gss_answered = true;
                stream.write_all(b"N").await?;
            }
            StartupPacket::Cancel { pid, secret } => {
                return Ok(Some(Hello::Cancel { pid, secret }))
            }
            StartupPacket::Startup(message) => {
                return Ok(Some(Hello::Startup {
                    stream,
                    buf,
                    message,
                }));
            }
        }
    }
}

async fn negotiate_tls(
    stream: Stream,
    pending: &BytesMut,
    tls: Option<&TlsAcceptor>,
) -> Result<Stream, HandshakeError> {
    let mut tcp = match stream {
        Stream::Tcp(tcp, _) => tcp,
        // An in-process pipe has no TLS to offer.
        Stream::Memory(mut pipe) => {
            pipe.write_all(b"N").await?;
            return Ok(Stream::Memory(pipe));
        }
        _ => return Err(HandshakeError::Violation("SSLRequest inside TLS")),
    };
    // Bytes sent after SSLRequest but before our answer would otherwise be read as if they had come through TLS
    // (CVE-2021-23214); a client that does this is broken or an attacker's, so the connection ends.
    if !pending.is_empty() {
        return Err(HandshakeError::Violation(
            "unencrypted data after SSLRequest",
        ));
    }
    let Some(acceptor) = tls else {
        tcp.write_all(b"N").await?;
        return Ok(Stream::plain(tcp));
    };
    tcp.write_all(b"S").await?;
    let tls = acceptor.accept(tcp).await.map_err(HandshakeError::Tls)?;
    Ok(Stream::ServerTls(Box::new(tls)))
}

/// Writes a FATAL error and flushes; failures are ignored because the connection is ending anyway.
pub async fn report(stream: &mut Stream, err: PgError) {
    let mut out = BytesMut::new();
    err.encode(&mut out);
    let _ = stream.write_all(&out).await;
    let _ = stream.flush().await;
}
