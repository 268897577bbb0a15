//! One HTTP POST to a webhook receiver (hyper's HTTP/1 client over a TCP or TLS stream).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The most of a receiver's answer body read (and thrown away) before the connection is closed.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

#[derive(Debug, Error)]
pub enum PostError {
    #[error("bad url: {0}")]
    Url(String),
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("tls: {0}")]
    Tls(std::io::Error),
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    #[error("request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("timed out after {0} ms")]
    Timeout(u128),
}

/// Posts `body` as JSON with extra `headers`; the receiver's status (any status: the caller decides).
pub async fn post(
    uri: &Uri,
    headers: &[(HeaderName, HeaderValue)],
    body: Bytes,
    timeout: Duration,
) -> Result<StatusCode, PostError> {
    tokio::time::timeout(timeout, attempt(uri, headers, body))
        .await
        .map_err(|_| PostError::Timeout(timeout.as_millis()))?
}

async fn attempt(
    uri: &Uri,
    headers: &[(HeaderName, HeaderValue)],
    body: Bytes,
) -> Result<StatusCode, PostError> {
    let host = uri
        .host()
        .ok_or_else(|| PostError::Url("no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']');
    let tls = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(HOST, authority)
        .header(CONTENT_TYPE, "application/json")
        .header(USER_AGENT, concat!("pgtenant/", env!("CARGO_PKG_VERSION")));
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let req = req.body(Full::new(body))?;
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(PostError::Connect)?;
    let _ = tcp.set_nodelay(true);
    if !tls {
        return send(TokioIo::new(tcp), req).await;
    }
    let name = ServerName::try_from(host.to_owned()).map_err(|e| PostError::Url(e.to_string()))?;
    let stream = connector()?
        .connect(name, tcp)
        .await
        .map_err(PostError::Tls)?;
    send(TokioIo::new(stream), req).await
}

async fn send<I>(io: I, req: Request<Full<Bytes>>) -> Result<StatusCode, PostError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    // The connection is driven beside the request; it ends with this function (one request per connection).
    let driver = tokio::spawn(conn);
    let answer = sender.send_request(req).await;
    let result = match answer {
        Ok(resp) => {
            let status = resp.status();
            let _ = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await;
            Ok(status)
        }
        Err(e) => Err(PostError::Http(e)),
    };
    driver.abort();
    result
}

/// A TLS connector that checks receivers' certificates against the Mozilla roots (webpki-roots).
fn connector() -> Result<TlsConnector, PostError> {
    static CONNECTOR: OnceLock<Result<TlsConnector, String>> = OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            let roots =
                rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map(|b| {
                    let config = b.with_root_certificates(roots).with_no_client_auth();
                    TlsConnector::from(Arc::new(config))
                })
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| PostError::Tls(std::io::Error::other(e)))
}
