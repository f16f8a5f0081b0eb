//! The admin API, on its own listener (loopback by default): deploy,
//! rollback, reload, and inspection of components and topics. The CLI's
//! `deploy`, `rollback`, `rewind` and `events` commands are clients of it.
//!
//! It can replace code, and loopback alone does not keep anyone out: every
//! local user, and every web page the operator's browser opens, can reach
//! a loopback port. So every request must carry the host's admin token
//! (`Authorization: Bearer`, compared in constant time): random, made on
//! first start in `<data_dir>/admin.token` (mode 0600), where the CLI beside
//! the host finds it. Browsers meet a second wall, refused with 403 before
//! the token is looked at, so no page ever reaches a handler even if the
//! operator pasted the token somewhere: any request with an `Origin` header
//! (browsers send it with cross-origin and non-GET requests), and any whose
//! `Host` is not this listener's own address or `localhost` (a
//! DNS-rebinding page reaches the socket under its own name, and can read
//! the answers).
//!
//! The console (`/console`, see [`crate::console`]) is the one part meant
//! for a browser: it keeps the `Host` check, and replaces the bearer token
//! with a session cookie that the token opens, and the `Origin` refusal
//! with a same-origin check.
//!
//! - `GET  /metrics` (Prometheus, OpenMetrics text)
//! - `GET  /components`
//! - `POST /components/{name}/deploy` (body: the .wasm binary)
//! - `POST /components/{name}/rollback`
//! - `POST /reload` (re-read plugins.toml and component files)
//! - `GET  /topics/{topic}/events?from=N&limit=N`
//! - `GET  /topics/{topic}/subscribers/{component}` (progress: next offset and end, per partition)
//! - `POST /topics/{topic}/subscribers/{component}/rewind?to=N` (redeliver from N)

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::console::{self, Console};
use crate::metrics;
use crate::response::{self, Body};
use crate::runtime::Runtime;
use crate::server::{read_body, LocalAddr};

/// Largest binary accepted by `deploy`.
const MAX_DEPLOY_BYTES: usize = 256 * 1024 * 1024;
/// Events returned per inspection call unless `limit` says otherwise.
const DEFAULT_EVENTS: usize = 100;
/// The admin token's file in the data directory.
pub const TOKEN_FILE: &str = "admin.token";
/// Random bytes in a new token (256 bits), written as hex.
const TOKEN_BYTES: usize = 32;
/// Shortest token accepted from a file an operator wrote.
const MIN_TOKEN_CHARS: usize = 32;

/// The admin API's state: the runtime it acts on and the token it requires.
pub struct Admin {
    runtime: Arc<Runtime>,
    token: String,
    console: Console,
}

impl Admin {
    /// The admin API with the token of [`load_or_create_token`].
    pub fn new(runtime: Arc<Runtime>, token: String) -> Admin {
        Admin {
            runtime,
            token,
            console: Console::default(),
        }
    }

    /// Refuses browser requests, then requests without the token.
    fn admit(&self, request: &Request<Incoming>) -> Result<(), Refused> {
        if request.headers().contains_key(header::ORIGIN) {
            return Err(Refused::BrowserOrigin);
        }
        if !addressed_here(request) {
            return Err(Refused::ForeignHost);
        }
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match presented {
            Some(token) if bool::from(token.as_bytes().ct_eq(self.token.as_bytes())) => Ok(()),
            Some(_) => Err(Refused::InvalidToken),
            None => Err(Refused::MissingToken),
        }
    }
}

/// Why a request never reached an admin endpoint.
#[derive(Debug, Clone, Copy)]
enum Refused {
    BrowserOrigin,
    ForeignHost,
    MissingToken,
    InvalidToken,
}

impl Refused {
    fn response(self) -> Response<Body> {
        let needs_token = format!(
            "the admin API needs `Authorization: Bearer <token>` with the token in the host's data directory ({TOKEN_FILE})"
        );
        let (status, code, message) = match self {
            Refused::BrowserOrigin => (
                StatusCode::FORBIDDEN,
                "browser_request",
                "the admin API refuses requests with an Origin header: browsers may not reach it"
                    .to_owned(),
            ),
            Refused::ForeignHost => (
                StatusCode::FORBIDDEN,
                "foreign_host",
                "the admin API answers only requests whose Host is its own address or localhost"
                    .to_owned(),
            ),
            Refused::MissingToken => (StatusCode::UNAUTHORIZED, "missing_token", needs_token),
            Refused::InvalidToken => (StatusCode::UNAUTHORIZED, "invalid_token", needs_token),
        };
        let mut response = response::error(status, code, message);
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"agora-admin\""),
            );
        }
        response
    }
}

/// Reads the admin token from `data_dir`, creating it on first start.
pub fn load_or_create_token(data_dir: &Path) -> Result<String> {
    let path = data_dir.join(TOKEN_FILE);
    let token = crate::secret::load_or_create(&path, "admin API token", || {
        let bytes = crate::secret::random_bytes(TOKEN_BYTES)?;
        Ok(bytes
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
            .into_bytes())
    })?;
    read_token(&token).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The token in a token file's bytes: one line of visible ASCII.
pub fn read_token(bytes: &[u8]) -> Result<String, String> {
    let token = std::str::from_utf8(bytes)
        .map(str::trim)
        .map_err(|_| "the admin token is not text".to_owned())?;
    if token.len() < MIN_TOKEN_CHARS || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "the admin token must be at least {MIN_TOKEN_CHARS} visible ASCII characters"
        ));
    }
    Ok(token.to_owned())
}

/// Whether the request names this listener, or localhost, as its host.
fn addressed_here(request: &Request<Incoming>) -> bool {
    let local = request.extensions().get::<LocalAddr>().map(|l| l.0);
    host_is_local(request, local)
}

/// Whether the request names this listener, or localhost, as its host: a
/// DNS-rebinding page reaches the same socket under a name of its own.
fn host_is_local(request: &Request<Incoming>, local: Option<SocketAddr>) -> bool {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let authority = match (hosts.next(), hosts.next()) {
        (Some(host), None) => host
            .to_str()
            .ok()
            .and_then(|h| h.parse::<http::uri::Authority>().ok()),
        // HTTP/2 names the host in the request's URI.
        (None, _) => request.uri().authority().cloned(),
        // Which one would a proxy have looked at?
        (Some(_), Some(_)) => None,
    };
    let Some(authority) = authority else {
        return false;
    };
    if authority
        .port_u16()
        .zip(local)
        .is_some_and(|(port, local)| port != local.port())
    {
        return false;
    }
    let host = authority.host();
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        Ok(ip) => ip.is_loopback() || local.is_some_and(|local| local.ip() == ip),
        Err(_) => false,
    }
}

pub async fn handle(admin: Arc<Admin>, request: Request<Incoming>) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    if path == "/console" || path.starts_with("/console/") {
        if !addressed_here(&request) {
            return Refused::ForeignHost.response();
        }
        let response = console::handle(&admin.console, &admin.runtime, &admin.token, request).await;
        tracing::debug!(target: "agora::admin", %method, %path, status = response.status().as_u16());
        return response;
    }
    if let Err(refused) = admin.admit(&request) {
        tracing::warn!(target: "agora::admin", %method, %path, ?refused, "admin request refused");
        return refused.response();
    }
    let runtime = &admin.runtime;
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let response = match (&method, segments.as_slice()) {
        (&Method::GET, ["metrics"]) => {
            let mut response = Response::new(response::full(runtime.scrape().await));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(metrics::CONTENT_TYPE),
            );
            response
        }
        (&Method::GET, ["components"]) => components(runtime),
        (&Method::POST, ["components", name, "deploy"]) => deploy(runtime, name, request).await,
        (&Method::POST, ["components", name, "rollback"]) => match runtime.rollback(name).await {
            Ok(v) => response::json(
                StatusCode::OK,
                &json!({"component": v.name, "version": v.version}),
            ),
            Err(e) => refused(StatusCode::CONFLICT, e),
        },
        (&Method::POST, ["reload"]) => match runtime.reconcile().await {
            Ok(()) => components(runtime),
            Err(e) => refused(StatusCode::UNPROCESSABLE_ENTITY, e),
        },
        (&Method::GET, ["topics", topic, "events"]) => {
            events(runtime, topic, request.uri().query()).await
        }
        (&Method::GET, ["topics", topic, "subscribers", component]) => {
            match runtime
                .capabilities
                .messaging
                .progress(component, topic)
                .await
            {
                Ok(partitions) => {
                    let partitions: Vec<_> = partitions
                        .into_iter()
                        .map(|p| {
                            json!({"partition": p.partition, "next": p.next, "end": p.end, "lag": p.lag, "caught_up": p.lag == 0})
                        })
                        .collect();
                    response::json(
                        StatusCode::OK,
                        &json!({"topic": topic, "subscriber": component, "partitions": partitions}),
                    )
                }
                Err(e) => refused(StatusCode::SERVICE_UNAVAILABLE, e),
            }
        }
        (&Method::POST, ["topics", topic, "subscribers", component, "rewind"]) => {
            let to = query_param(request.uri().query(), "to").unwrap_or(0);
            match runtime
                .capabilities
                .messaging
                .rewind(component, topic, to)
                .await
            {
                Ok(()) => response::json(
                    StatusCode::OK,
                    &json!({"topic": topic, "subscriber": component, "next": to}),
                ),
                Err(e) => refused(StatusCode::SERVICE_UNAVAILABLE, e),
            }
        }
        _ => response::error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no admin endpoint {method} {path}"),
        ),
    };
    tracing::info!(target: "agora::admin", %method, %path, status = response.status().as_u16());
    response
}

fn refused(status: StatusCode, error: anyhow::Error) -> Response<Body> {
    tracing::error!(error = %format!("{error:#}"), "admin request refused");
    response::error(status, "refused", format!("{error:#}"))
}

fn components(runtime: &Runtime) -> Response<Body> {
    let registry = runtime.registry();
    let list: Vec<_> = registry
        .components
        .values()
        .map(|c| {
            json!({
                "name": c.name,
                "version": c.version,
                "routes": c.spec.routes,
                "previous_versions": runtime.previous_versions(&c.name),
            })
        })
        .collect();
    response::json(
        StatusCode::OK,
        &json!({ "components": list, "pooling_allocator": runtime.pooling }),
    )
}

async fn deploy(runtime: &Runtime, name: &str, request: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let request = match read_body(request, MAX_DEPLOY_BYTES).await {
        Ok(request) => request,
        Err(response) => return response,
    };
    let wasm = match request.into_body().collect().await {
        Ok(body) => body.to_bytes().to_vec(),
        Err(never) => match never {},
    };
    match runtime.deploy(name, wasm).await {
        Ok(v) => {
            let swap_ms = started.elapsed().as_secs_f64() * 1000.0;
            tracing::info!(component = %name, version = %v.version, swap_ms, "deployed");
            response::json(
                StatusCode::OK,
                &json!({"component": v.name, "version": v.version, "swap_ms": swap_ms}),
            )
        }
        Err(e) => refused(StatusCode::UNPROCESSABLE_ENTITY, e),
    }
}

fn query_param(query: Option<&str>, key: &str) -> Option<u64> {
    query
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse::<u64>().ok())
}

async fn events(runtime: &Runtime, topic: &str, query: Option<&str>) -> Response<Body> {
    let from = query_param(query, "from").unwrap_or(0);
    let limit = query_param(query, "limit").map_or(DEFAULT_EVENTS, |n| n as usize);
    match runtime
        .capabilities
        .messaging
        .read_topic(topic, from, limit)
        .await
    {
        Ok(events) => {
            let events: Vec<_> = events
                .into_iter()
                .map(|(partition, offset, e)| {
                    json!({
                        "partition": partition,
                        "offset": offset,
                        "id": e.id,
                        "key": e.key,
                        "headers": e.headers.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
                        "payload": String::from_utf8_lossy(&e.payload),
                        "published_at": e.published_at,
                    })
                })
                .collect();
            response::json(StatusCode::OK, &json!({ "topic": topic, "events": events }))
        }
        Err(e) => refused(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}
