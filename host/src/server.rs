//! The HTTP/1.1 listeners: the public one routing to components, and the
//! admin one. Both shut down gracefully: on a signal they stop accepting and
//! let in-flight requests finish, up to a grace period.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::gateway;
use crate::response::{self, Body};
use crate::runtime::Runtime;

/// How long in-flight requests get to finish after a shutdown signal.
const GRACE: Duration = Duration::from_secs(10);

/// Accepts connections on `listener` and serves each request with `handler`
/// until `stop` turns true.
pub async fn serve<H, F>(listener: TcpListener, handler: H, mut stop: watch::Receiver<bool>)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let http = hyper::server::conn::http1::Builder::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(gateway::ClientAddr(peer));
            let response = handler(req);
            async move { Ok::<_, std::convert::Infallible>(response.await) }
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after the grace period were cut");
    }
}

pub async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for the {what}: {e}"))
}

/// Reads a whole body, refusing more than `limit` bytes with 413.
pub async fn read_body(
    request: Request<Incoming>,
    limit: usize,
) -> Result<Request<Full<Bytes>>, Response<Body>> {
    let too_large = || {
        response::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body exceeds the limit of {limit} bytes"),
        )
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let (parts, body) = request.into_parts();
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(Request::from_parts(parts, Full::new(collected.to_bytes()))),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(response::error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("could not read the request body: {e}"),
        )),
    }
}

/// Correlates a request across the client, the log and the component.
const REQUEST_ID: &str = "x-request-id";

/// The client's request id if it is a sane one, else a new one.
fn request_id(request: &Request<Incoming>) -> header::HeaderValue {
    request
        .headers()
        .get(REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.to_str().is_ok())
        .cloned()
        .unwrap_or_else(|| {
            header::HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
                .expect("a UUID is a valid header value")
        })
}

/// The public listener's handler: host endpoints, then routing.
pub async fn handle(runtime: Arc<Runtime>, mut request: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let id = request_id(&request);
    request.headers_mut().insert(REQUEST_ID, id.clone());
    let (component, mut response) = route(&runtime, request).await;
    tracing::info!(
        target: "agora::request",
        %method,
        %path,
        component = component.as_deref().unwrap_or("-"),
        status = response.status().as_u16(),
        duration_ms = format!("{:.2}", started.elapsed().as_secs_f64() * 1000.0),
        request_id = id.to_str().unwrap_or_default(),
    );
    response.headers_mut().insert(REQUEST_ID, id);
    response
}

async fn route(
    runtime: &Runtime,
    mut request: Request<Incoming>,
) -> (Option<String>, Response<Body>) {
    // One path for everything below: routing, auth, rate limits, the component.
    if let Err(refused) = gateway::normalize(&mut request) {
        return (None, refused.response());
    }
    match request.uri().path() {
        "/healthz" => {
            return (
                None,
                response::json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
            )
        }
        "/readyz" => return (None, readiness(runtime).await),
        "/openapi.json" => return (None, openapi(runtime).await),
        _ => {}
    }
    let registry = runtime.registry();
    let Some(component) = registry.route(request.uri().path()).cloned() else {
        let message = format!("no component serves {}", request.uri().path());
        return (
            None,
            response::error(StatusCode::NOT_FOUND, "not_found", message),
        );
    };
    drop(registry);
    let name = component.name.clone();
    let signer = runtime.capabilities.tokens.signer();
    if let Err(refused) = gateway::authorize(&component.spec, &signer, &mut request) {
        return (Some(name), refused.response());
    }
    let cache = runtime.capabilities.cache.backend();
    if let Err(refused) = gateway::admit(&name, &component.spec, &*cache, &request).await {
        return (Some(name), refused.response());
    }
    let limit = component.spec.limits.max_body_kib as usize * 1024;
    let response = match read_body(request, limit).await {
        Ok(request) => component.handle_http(request).await,
        Err(response) => response,
    };
    (Some(name), response)
}

async fn openapi(runtime: &Runtime) -> Response<Body> {
    let plugins = runtime.plugins();
    let Some(path) = plugins.host.openapi.as_ref().map(|p| plugins.resolve(p)) else {
        return response::error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no OpenAPI document is configured (host.openapi)",
        );
    };
    match tokio::fs::read(&path).await {
        Ok(document) => {
            let mut response = Response::new(response::full(document));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(e) => response::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            format!("cannot read the OpenAPI document {}: {e}", path.display()),
        ),
    }
}

async fn readiness(runtime: &Runtime) -> Response<Body> {
    let registry = runtime.registry();
    let expected = runtime.plugins().components.len();
    let components: serde_json::Map<_, _> = registry
        .components
        .iter()
        .map(|(name, c)| (name.clone(), c.version.clone().into()))
        .collect();
    let mut ready = components.len() == expected;
    let mut backends = serde_json::Map::new();
    for (name, result) in runtime.capabilities.readiness().await {
        let state = match result {
            Ok(()) => "ok".to_owned(),
            Err(e) => {
                ready = false;
                format!("{e:#}")
            }
        };
        backends.insert(name.to_owned(), state.into());
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    response::json(
        status,
        &serde_json::json!({
            "status": if ready { "ready" } else { "not_ready" },
            "components": components,
            "backends": backends,
        }),
    )
}
