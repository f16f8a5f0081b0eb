//! The listeners: the public one routing to components, and the admin one.
//!
//! Each serves HTTP/1.1 and cleartext HTTP/2 (prior knowledge, told apart by
//! the connection preface) and shuts down gracefully: on a signal it stops
//! accepting and lets in-flight requests finish, up to a grace period.
//! HTTP/2 through `Upgrade: h2c` is not offered (hyper does not implement
//! it, and RFC 9113 deprecates it): such a request is answered in HTTP/1.1.
//!
//! A client holds a connection only while it is useful. It has
//! `header_read_timeout` to send a request head (the auto builder's protocol
//! detection and HTTP/2's first request included, which hyper's HTTP/1 timer
//! does not cover), and a connection with no request in flight for
//! `idle_timeout` is shut down. Beyond `max_connections` the listener stops
//! accepting: new clients wait in the kernel's accept queue, costing the
//! host no descriptor and no memory, and are served in order as the
//! timeouts close the connections that hold the slots. Closing them at once
//! instead would turn a burst of idle attackers into refusals for everyone.
//!
//! A request in flight does not count as idle, so a client that stops
//! reading its response (an HTTP/2 stream window of 0, or an HTTP/1.1
//! response larger than the socket buffers) would hold its slot forever.
//! The connection is therefore also cut, without grace, once a response has
//! waited `response_write_timeout` on the client: a write to the socket
//! pending, or a response (head or frame) that the client's flow control has
//! not let out. Time a component spends producing its response is not
//! counted; its own deadline bounds that. The timeout measures progress,
//! not throughput: a client reading a byte at a time keeps its connection,
//! as it would with any slow link. HTTP/2 pings, while a request is in
//! flight, find a peer that has vanished without a FIN.
//!
//! HTTP/2 multiplies a connection: each stream may hold a request body
//! (up to the component's `max_body_kib`) while it is read, before
//! `max_waiting_requests` counts it. `http2_max_concurrent_streams` caps the
//! streams per connection; a client opening more gets `REFUSED_STREAM`. So
//! request bodies being read hold at most `max_connections` x
//! `http2_max_concurrent_streams` x `max_body_kib`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use opentelemetry::trace::{SpanKind, TraceContextExt};
use opentelemetry::KeyValue;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::component::ComponentVersion;
use crate::gateway;
use crate::metrics::CacheResult;
use crate::plugins::HostSettings;
use crate::response::{self, Body};
use crate::response_cache;
use crate::runtime::Runtime;
use crate::telemetry;

/// How long in-flight requests get to finish after a shutdown signal.
const GRACE: Duration = Duration::from_secs(10);

/// Descriptors kept for the host's own files (databases, the event log,
/// compiled code, outbound connections) and the admin listener when the
/// public listener's cap is fitted under the open-file limit.
const RESERVED_DESCRIPTORS: u64 = 128;

/// How often an HTTP/2 connection with a request in flight is pinged, and
/// how long the peer has to answer before the connection is dropped. 20 s
/// (hyper's default answer time) finds a vanished peer well before the
/// response timeouts would, at one small frame per interval.
const HTTP2_KEEP_ALIVE: Duration = Duration::from_secs(20);

/// Connection limits and timeouts of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub response_write_timeout: Duration,
    pub max_connections: usize,
    pub http2_max_concurrent_streams: u32,
}

impl Limits {
    /// The public listener's limits from `[host]`, the connection cap fitted
    /// under the process's open-file limit.
    pub fn public(host: &HostSettings) -> Limits {
        let configured = host.max_connections as u64;
        let max_connections = match open_file_limit() {
            Some(files) if files.saturating_sub(RESERVED_DESCRIPTORS) < configured => {
                let fitted = files.saturating_sub(RESERVED_DESCRIPTORS).max(1);
                tracing::warn!(
                    configured,
                    fitted,
                    open_file_limit = files,
                    "host.max_connections lowered to leave descriptors for the host's own files; raise `ulimit -n` for more"
                );
                fitted
            }
            _ => configured,
        };
        Limits {
            max_connections: max_connections as usize,
            ..Limits::public_uncapped(host)
        }
    }

    /// The admin listener's: the same timeouts but for the body, and a
    /// small cap of its own, so a flood of the public listener never locks
    /// the operator out. A deploy's body may be 256 MiB from afar: ten
    /// minutes, for the client that got past the token check.
    pub fn admin(host: &HostSettings) -> Limits {
        Limits {
            body_read_timeout: Duration::from_secs(600),
            max_connections: 16,
            ..Limits::public_uncapped(host)
        }
    }

    fn public_uncapped(host: &HostSettings) -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(host.header_read_timeout_seconds),
            body_read_timeout: Duration::from_secs(host.body_read_timeout_seconds),
            idle_timeout: Duration::from_secs(host.idle_timeout_seconds),
            response_write_timeout: Duration::from_secs(host.response_write_timeout_seconds),
            max_connections: host.max_connections as usize,
            http2_max_concurrent_streams: host.http2_max_concurrent_streams,
        }
    }
}

/// The soft limit on open files (`ulimit -n`), if there is one.
fn open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    (ok && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// How long the listener gives a request to send its whole body: a client
/// trickling one forever would otherwise hold its connection forever.
#[derive(Debug, Clone, Copy)]
pub struct BodyReadTimeout(pub Duration);

/// The address the client connected to, for the admin API's `Host` check.
#[derive(Debug, Clone, Copy)]
pub struct LocalAddr(pub SocketAddr);

/// When a connection last had nothing to do, how much it has now, and
/// whether it waits on its client.
///
/// Waiting is counted, not timed, on the request path: a counter of
/// waiters (the socket's pending write, responses offered to the client)
/// and a counter of progress (a write or a frame the client took). The
/// watchdog in [`Activity::stalled`] reads the clock, a few times per
/// timeout, so a frame costs an atomic add or two rather than a lock, a
/// map update and a clock read.
struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `opened`; `u64::MAX` until the first request.
    idle_since_ms: AtomicU64,
    /// Things that wait for the client to take what they offered.
    waiting_on_client: AtomicUsize,
    /// Bumped whenever the client takes something.
    progress: AtomicU64,
}

/// One request in flight, until its response body is done or dropped.
struct Busy {
    activity: Arc<Activity>,
}

/// One waiter's share of [`Activity::waiting_on_client`].
struct Waiting {
    waiting: bool,
}

impl Waiting {
    fn set(&mut self, activity: &Activity, waiting: bool) {
        if waiting != self.waiting {
            self.waiting = waiting;
            if waiting {
                activity.waiting_on_client.fetch_add(1, Ordering::Relaxed);
            } else {
                activity.waiting_on_client.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn progressed(&mut self, activity: &Activity, still_waiting: bool) {
        activity.progress.fetch_add(1, Ordering::Relaxed);
        self.set(activity, still_waiting);
    }
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(u64::MAX),
            waiting_on_client: AtomicUsize::new(0),
            progress: AtomicU64::new(0),
        })
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.idle_since_ms
            .store(self.elapsed_ms(), Ordering::SeqCst);
        Busy {
            activity: self.clone(),
        }
    }

    fn elapsed_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    /// Resolves once the connection has waited `header` for its first
    /// request, or later has had no request in flight for `idle`. Wakes at
    /// least every `idle`, so a deadline moved earlier by a request that
    /// came and went is never missed by more than that.
    async fn unused(&self, header: Duration, idle: Duration) {
        loop {
            let now = Instant::now();
            let deadline = if self.in_flight.load(Ordering::SeqCst) > 0 {
                now + idle
            } else {
                match self.idle_since_ms.load(Ordering::SeqCst) {
                    u64::MAX => (self.opened + header).min(now + idle),
                    since => self.opened + Duration::from_millis(since) + idle,
                }
            };
            if deadline <= now {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }

    /// Resolves once something has waited `timeout` on the client and the
    /// client took nothing meanwhile. Checked every quarter of the timeout,
    /// so a stall is cut within 1.25 times it.
    async fn stalled(&self, timeout: Duration) {
        let mut check = tokio::time::interval(timeout / 4);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen = (self.progress.load(Ordering::Relaxed), Instant::now());
        loop {
            check.tick().await;
            let progress = self.progress.load(Ordering::Relaxed);
            if progress != seen.0 || self.waiting_on_client.load(Ordering::Relaxed) == 0 {
                seen = (progress, Instant::now());
            } else if seen.1.elapsed() >= timeout {
                return;
            }
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let activity = &self.activity;
        activity
            .idle_since_ms
            .store(activity.elapsed_ms(), Ordering::SeqCst);
        activity.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body on its way to the client. It waits on the client from
/// when its head is handed over until hyper asks for its next frame: hyper
/// asks only when the client's flow control and the socket have room.
struct Outgoing {
    body: Body,
    busy: Busy,
    waiting: Waiting,
}

impl Outgoing {
    fn new(body: Body, busy: Busy) -> Outgoing {
        let mut waiting = Waiting { waiting: false };
        waiting.set(&busy.activity, true);
        Outgoing {
            body,
            busy,
            waiting,
        }
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        self.waiting.set(&self.busy.activity, false);
    }
}

impl hyper::body::Body for Outgoing {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        // Asked again: the client took what was offered before. A new frame
        // waits on it; otherwise the body waits on the component, or is done.
        let offered = matches!(polled, Poll::Ready(Some(Ok(_))));
        let this = &mut *self;
        this.waiting.progressed(&this.busy.activity, offered);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The client's socket, noting when a write waits for the client to read:
/// once a response is wholly handed to hyper, its last bytes may still be
/// stuck here.
struct WatchedStream {
    stream: TcpStream,
    activity: Arc<Activity>,
    waiting: Waiting,
}

impl WatchedStream {
    fn note<T>(&mut self, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match &polled {
            Poll::Pending => self.waiting.set(&self.activity, true),
            Poll::Ready(_) => self.waiting.progressed(&self.activity, false),
        }
        polled
    }
}

impl Drop for WatchedStream {
    fn drop(&mut self) {
        self.waiting.set(&self.activity, false);
    }
}

impl AsyncRead for WatchedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.note(polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.note(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_shutdown(cx);
        self.note(polled)
    }
}

/// Resolves when `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Accepts connections on `listener` and serves each request with `handler`
/// until `stop` turns true.
pub async fn serve<H, F>(
    listener: TcpListener,
    limits: Limits,
    handler: H,
    mut stop: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .keep_alive_interval(HTTP2_KEEP_ALIVE)
        .keep_alive_timeout(HTTP2_KEEP_ALIVE);
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            _ = stopped(&mut stop) => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, most likely: the client stays in
                    // the accept queue until a connection closes.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().unwrap_or(peer);
        let activity = Activity::new();
        let handler = handler.clone();
        let tracker = activity.clone();
        let service = service_fn(move |mut req: Request<Incoming>| {
            let busy = tracker.begin();
            req.extensions_mut().insert(gateway::ClientAddr(peer));
            req.extensions_mut().insert(LocalAddr(local));
            req.extensions_mut()
                .insert(BodyReadTimeout(limits.body_read_timeout));
            let response = handler(req);
            async move {
                // The request stays in flight until its body is sent.
                let response = response
                    .await
                    .map(|body| Outgoing::new(body, busy).boxed_unsync());
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let (builder, mut stop) = (builder.clone(), stop.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let stream = WatchedStream {
                stream,
                activity: activity.clone(),
                waiting: Waiting { waiting: false },
            };
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let unused = activity.unused(limits.header_read_timeout, limits.idle_timeout);
            tokio::pin!(unused);
            let stalled = activity.stalled(limits.response_write_timeout);
            tokio::pin!(stalled);
            let mut closing = false;
            loop {
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    // No grace: the client is not taking what it has.
                    _ = &mut stalled => {
                        tracing::debug!(%peer, "closed a connection whose client stopped reading");
                        break;
                    }
                    _ = &mut unused, if !closing => closing = true,
                    _ = stopped(&mut stop), if !closing => closing = true,
                }
                // Idle: closed now; HTTP/2: GOAWAY, then streams finish.
                connection.as_mut().graceful_shutdown();
            }
        });
    }
    // New clients are refused from now on, not queued for nobody.
    drop(listener);
    // Every connection holds a slot until it ends.
    let all = limits.max_connections as u32;
    if tokio::time::timeout(GRACE, slots.acquire_many(all))
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

/// Reads a whole body, refusing more than `limit` bytes with 413 and a body
/// slower than the listener's `BodyReadTimeout` with 408.
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
    let timeout = request
        .extensions()
        .get::<BodyReadTimeout>()
        .map_or(Duration::MAX, |t| t.0);
    let (parts, body) = request.into_parts();
    let Ok(collected) = tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await
    else {
        return Err(response::error(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the request body did not arrive within {} s",
                timeout.as_secs()
            ),
        ));
    };
    match collected {
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
    // Behind a trusted proxy, the client is who the proxy says it is.
    let peer = request
        .extensions()
        .get::<gateway::ClientAddr>()
        .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |c| c.0);
    let client = runtime.proxies.client(peer.ip(), request.headers());
    if client != peer.ip() {
        request
            .extensions_mut()
            .insert(gateway::ClientAddr(SocketAddr::new(client, 0)));
    }
    // The client's trace goes on in the host's span, which the component
    // sees as its parent.
    let trace = telemetry::child(
        &telemetry::from_headers(request.headers()),
        SpanKind::Server,
        || {
            (
                telemetry::method_name(&method),
                vec![
                    KeyValue::new("http.request.method", method.to_string()),
                    KeyValue::new("url.path", path.clone()),
                ],
            )
        },
    );
    let traced = trace.span().span_context().is_valid();
    if traced {
        telemetry::inject(&trace, request.headers_mut());
        request.extensions_mut().insert(trace.clone());
    }
    let (routed, mut response) = route(&runtime, request).await;
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    if let Some((component, route)) = &routed {
        component.observe_request(*route, status, elapsed);
    }
    let span = trace.span();
    if span.is_recording() {
        if let Some((component, route)) = &routed {
            let route = &component.spec.routes[*route];
            span.update_name(format!("{} {route}", telemetry::method_name(&method)));
            span.set_attribute(KeyValue::new("http.route", route.clone()));
            span.set_attribute(KeyValue::new("agora.component", component.name.clone()));
        }
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
    }
    telemetry::end(&trace, (status >= 500).then_some("server error"));
    tracing::info!(
        target: "agora::request",
        %method,
        %path,
        component = routed.as_ref().map_or("-", |(c, _)| c.name.as_str()),
        %client,
        status,
        duration_ms = format!("{:.2}", elapsed.as_secs_f64() * 1000.0),
        request_id = id.to_str().unwrap_or_default(),
    );
    response.headers_mut().insert(REQUEST_ID, id);
    response
}

/// The component a request was routed to, and the index of its route.
type Routed = Option<(Arc<ComponentVersion>, usize)>;

async fn route(runtime: &Runtime, mut request: Request<Incoming>) -> (Routed, Response<Body>) {
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
        // Boxed, as the other rare branches below: a future holds the
        // largest of the futures it awaits, and hyper moves every request's
        // future, so one rarely taken branch would cost every request.
        "/readyz" => return (None, Box::pin(readiness(runtime)).await),
        "/openapi.json" => return (None, Box::pin(openapi(runtime)).await),
        _ => {}
    }
    let registry = runtime.registry();
    let Some((prefix, component)) = registry.route(request.uri().path()) else {
        let message = format!("no component serves {}", request.uri().path());
        return (
            None,
            response::error(StatusCode::NOT_FOUND, "not_found", message),
        );
    };
    let routed = (component.clone(), component.route_index(prefix));
    drop(registry);
    gateway::strip_console_cookie(request.headers_mut());
    let component = routed.0.clone();
    let authenticator = runtime.capabilities.tokens.authenticator();
    let external = match gateway::authorize(&component.spec, &authenticator, &mut request).await {
        Ok(external) => external,
        Err(refused) => return (Some(routed), refused.response()),
    };
    if let Some(user) = external {
        let trace = request
            .extensions()
            .get::<opentelemetry::Context>()
            .cloned()
            .unwrap_or_default();
        let provisioned = Box::pin(runtime.accounts.provision(runtime, &user, trace)).await;
        if let Err(reason) = provisioned {
            tracing::warn!(user = %user.id, %reason, "a trusted issuer's user could not be provisioned");
            let refused = gateway::Refusal::Unavailable {
                code: "accounts_unavailable",
                message: "your account could not be set up; try again later".into(),
            };
            return (Some(routed), refused.response());
        }
    }
    let cache = runtime.capabilities.cache.backend();
    if let Err(refused) = gateway::admit(&component.name, &component.spec, &*cache, &request).await
    {
        return (Some(routed), refused.response());
    }
    let cached = response_cache::rule_for(&component.spec, &request)
        .map(|rule| (rule, response_cache::key(&component.name, &request)));
    if let Some((_, key)) = &cached {
        if let Some(hit) = Box::pin(response_cache::lookup(&*cache, key)).await {
            component.observe_cache(routed.1, CacheResult::Hit);
            return (Some(routed), hit);
        }
    }
    let limit = component.spec.limits.max_body_kib as usize * 1024;
    let response = match read_body(request, limit).await {
        Ok(request) => component.clone().handle_http(request).await,
        Err(response) => response,
    };
    let response = match cached {
        Some((rule, key)) => {
            let (response, result) =
                Box::pin(response_cache::keep(&*cache, &key, rule, response)).await;
            component.observe_cache(routed.1, result);
            response
        }
        None => response,
    };
    (Some(routed), response)
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
        Err(e) => {
            // The path is the operator's to see, not the client's.
            tracing::error!(path = %path.display(), error = %e, "cannot read the OpenAPI document");
            response::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "cannot read the OpenAPI document: see the host's log",
            )
        }
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
