//! One HTTP/1.1 request from the host itself, on a connection of its own:
//! the CLI's calls to a running host's admin API, the OTLP exporter's
//! batches, and the fetches of trusted issuers' signing keys (JWKS). None is
//! on a request path (one call per CLI command, one batch per export
//! interval, one key set per issuer and hour), so a pooled client would buy
//! nothing. `https://` is spoken with rustls and the Mozilla roots of
//! `webpki-roots`, as wasmtime-wasi-http's outbound client does: an identity
//! provider's keys must come from that provider.

use std::sync::{Arc, LazyLock};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// The TLS client configuration, made once: building the root store parses
/// every root certificate.
static TLS: LazyLock<tokio_rustls::TlsConnector> = LazyLock::new(|| {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.into(),
    };
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
});

/// Sends `request` (its URI absolute: `http://host:port/path` or
/// `https://...`) and reads the whole response, refusing one whose body
/// is larger than `max_body` bytes. The request goes out in origin form,
/// with `Host`.
pub async fn send(request: Request<Bytes>, max_body: usize) -> Result<Response<Bytes>> {
    let uri = request.uri().clone();
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => bail!("`{uri}` is not an http:// or https:// URL"),
    };
    let authority = uri
        .authority()
        .with_context(|| format!("`{uri}` has no host"))?
        .clone();
    let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let host = authority.host();
    // An IPv6 host is `[::1]` in a URI, `::1` to connect and to TLS.
    let bare_host = host.trim_matches(['[', ']']);
    let stream = tokio::net::TcpStream::connect((bare_host, port))
        .await
        .with_context(|| format!("cannot connect to {host}:{port}"))?;
    let (parts, body) = request.into_parts();
    if tls {
        let name = rustls::pki_types::ServerName::try_from(bare_host)
            .with_context(|| format!("`{host}` is not a TLS server name"))?
            .to_owned();
        let stream = TLS
            .connect(name, stream)
            .await
            .with_context(|| format!("TLS with {host}:{port} failed"))?;
        exchange(stream, parts, body, &authority, max_body).await
    } else {
        exchange(stream, parts, body, &authority, max_body).await
    }
}

async fn exchange(
    stream: impl AsyncRead + AsyncWrite + Send + Unpin + 'static,
    mut parts: http::request::Parts,
    body: Bytes,
    authority: &http::uri::Authority,
    max_body: usize,
) -> Result<Response<Bytes>> {
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    parts.headers.insert(
        http::header::HOST,
        http::HeaderValue::from_str(authority.as_str())?,
    );
    parts.uri = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()?;
    let response = sender
        .send_request(Request::from_parts(parts, Full::new(body)))
        .await?;
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, max_body)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the response: {e}"))?
        .to_bytes();
    Ok(Response::from_parts(parts, body))
}
