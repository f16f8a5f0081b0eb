//! Traces: OpenTelemetry spans exported over OTLP/HTTP (protobuf), off
//! unless `[telemetry] endpoint` names a collector.
//!
//! One trace follows work across everything the host connects: a request's
//! span (`SERVER`), the service-to-service calls it makes (`CLIENT`, the
//! callee's instance runs in the child's context), its outbound HTTP
//! (`CLIENT`, with a `traceparent` header), the events it publishes (a
//! `traceparent` event header, through the outbox and the broker) and each
//! delivery of them (`CONSUMER`, a child of the publisher's span). W3C trace
//! context is the format throughout: a client's `traceparent` is honoured,
//! and each component sees its own span's in its request or message.
//!
//! The context is carried by hand, not by `tracing`'s span scopes (no
//! tracing-opentelemetry bridge): a trace crosses a wasm boundary (an
//! instance's state holds it), a link call, a socket and a broker, and none
//! of those is a scope on one task. Log lines stay log lines.
//!
//! Without an endpoint the tracer is OpenTelemetry's no-op one: spans cost
//! almost nothing and are not recorded, but a client's context still
//! passes through to components, their calls and their events, so a trace
//! that a gateway in front started does not break at Agora.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::LazyLock;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use opentelemetry::global::{self, BoxedTracer};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector, HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use serde::Deserialize;

/// `[telemetry]` in plugins.toml.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// The OTLP/HTTP collector's base URL (`http://collector:4318`, as
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`); spans go to `<endpoint>/v1/traces`.
    /// None (the default): no spans are exported.
    pub endpoint: Option<String>,
    /// `service.name` of the spans: `agora`, or one per deployment.
    pub service_name: String,
    /// How often finished spans are sent. 5 s is OpenTelemetry's default:
    /// one request per interval however busy the host is.
    pub export_interval_ms: u64,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            endpoint: None,
            service_name: "agora".into(),
            export_interval_ms: 5000,
        }
    }
}

/// How long one export may take: a collector that hangs must not hold the
/// exporter's thread for long.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// A collector answers an export with a small status message; more than
/// this is not one.
const COLLECTOR_REPLY_LIMIT: usize = 64 * 1024;

/// The exporter's running state; [`Exporting::shutdown`] sends what is left.
pub struct Exporting(Option<SdkTracerProvider>);

impl Exporting {
    pub fn shutdown(self) {
        if let Some(provider) = self.0 {
            if let Err(e) = provider.shutdown() {
                tracing::warn!(error = %e, "traces: the last spans were not all sent");
            }
        }
    }
}

/// Installs W3C trace context and, if an endpoint is set, the OTLP
/// exporter. Call once, from within the tokio runtime.
pub fn init(settings: &TelemetrySettings) -> Result<Exporting> {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let Some(endpoint) = &settings.endpoint else {
        return Ok(Exporting(None));
    };
    let url = traces_url(endpoint)?;
    if settings.export_interval_ms < 10 {
        bail!("[telemetry] export_interval_ms must be at least 10");
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(TokioClient(tokio::runtime::Handle::current()))
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .with_context(|| format!("[telemetry] endpoint `{endpoint}`"))?;
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(Duration::from_millis(settings.export_interval_ms))
                .build(),
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(
            Resource::builder()
                .with_service_name(settings.service_name.clone())
                .build(),
        )
        .build();
    global::set_tracer_provider(provider.clone());
    EXPORTING.store(true, Ordering::Relaxed);
    tracing::info!(%url, "exporting traces");
    Ok(Exporting(Some(provider)))
}

/// Whether spans are exported (an endpoint is set).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// `<endpoint>/v1/traces`, for a plain-HTTP collector (port 4318 if none
/// is given). TLS is not spoken: run the collector (or an agent) beside the
/// host, on a trusted network.
fn traces_url(endpoint: &str) -> Result<String> {
    let uri: http::Uri = endpoint
        .parse()
        .with_context(|| format!("[telemetry] endpoint `{endpoint}` is not a URL"))?;
    if uri.scheme_str() != Some("http") {
        bail!(
            "[telemetry] endpoint `{endpoint}`: only http:// collectors are supported (no TLS); \
             run the collector or an agent beside the host"
        );
    }
    let host = uri
        .host()
        .with_context(|| format!("[telemetry] endpoint `{endpoint}` has no host"))?;
    let port = uri.port_u16().unwrap_or(4318);
    let path = uri.path().trim_end_matches('/');
    Ok(format!("http://{host}:{port}{path}/v1/traces"))
}

/// The host's tracer, made at its first use, which is after [`init`].
static TRACER: LazyLock<BoxedTracer> = LazyLock::new(|| global::tracer("agora"));

/// The trace context a request's headers carry (a client's `traceparent`).
pub fn from_headers(headers: &http::HeaderMap) -> Context {
    if !headers.contains_key("traceparent") {
        return Context::new();
    }
    TraceContextPropagator::new().extract_with_context(&Context::new(), &HeaderExtractor(headers))
}

/// The trace context an event's headers carry.
pub fn from_pairs(headers: &[(String, String)]) -> Context {
    let map: std::collections::HashMap<String, String> = headers
        .iter()
        .filter(|(name, _)| name == "traceparent" || name == "tracestate")
        .cloned()
        .collect();
    TraceContextPropagator::new().extract_with_context(&Context::new(), &map)
}

/// Writes `cx`'s `traceparent` (and `tracestate`) into request headers.
pub fn inject(cx: &Context, headers: &mut http::HeaderMap) {
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
}

/// Sets `cx`'s `traceparent` (and `tracestate`) in event headers, unless
/// the component set trace context of its own.
pub fn inject_pairs(cx: &Context, headers: &mut Vec<(String, String)>) {
    if headers
        .iter()
        .any(|(name, _)| name == "traceparent" || name == "tracestate")
    {
        return;
    }
    let mut map = std::collections::HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut map);
    let mut pairs: Vec<(String, String)> = map.into_iter().collect();
    pairs.sort();
    headers.extend(pairs);
}

/// A context with a new span, a child of `parent`'s. Without an exporter
/// and without a parent there is nothing to record or pass on, and the
/// (empty) parent is returned as it is: the request path pays nothing.
/// `describe` gives the span's name and attributes; it is only called when
/// there is a span to make, so an untraced request allocates nothing.
pub fn child<N: Into<std::borrow::Cow<'static, str>>>(
    parent: &Context,
    kind: SpanKind,
    describe: impl FnOnce() -> (N, Vec<KeyValue>),
) -> Context {
    if !EXPORTING.load(Ordering::Relaxed) && !parent.span().span_context().is_valid() {
        return parent.clone();
    }
    let (name, attributes) = describe();
    let span = TRACER
        .span_builder(name)
        .with_kind(kind)
        .with_attributes(attributes)
        .start_with_context(&*TRACER, parent);
    parent.with_span(span)
}

/// Ends the span of `cx`, as failed with `error` if there is one.
pub fn end(cx: &Context, error: Option<&str>) {
    let span = cx.span();
    if let Some(error) = error {
        span.set_status(opentelemetry::trace::Status::error(error.to_owned()));
    }
    span.end();
}

/// A request method as a span name: the standard ones, else `_OTHER`
/// (a client's invented methods must not make span names without bound).
pub fn method_name(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::PATCH => "PATCH",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::CONNECT => "CONNECT",
        http::Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
}

/// OTLP exports over hyper on the host's runtime. The batch processor
/// exports from a thread of its own, outside tokio; the request runs on
/// the runtime and the thread waits for it.
#[derive(Debug)]
struct TokioClient(tokio::runtime::Handle);

#[async_trait::async_trait]
impl HttpClient for TokioClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        let send = crate::client::send(request, COLLECTOR_REPLY_LIMIT);
        // Timed on the runtime too: the exporter's thread has no timer.
        self.0
            .spawn(async move {
                match tokio::time::timeout(EXPORT_TIMEOUT, send).await {
                    Ok(sent) => sent.map_err(HttpError::from),
                    Err(_) => Err(HttpError::from("the OTLP collector did not answer in time")),
                }
            })
            .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collectors_are_named_by_base_url_and_spoken_to_in_plain_http() {
        assert_eq!(
            traces_url("http://collector").unwrap(),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://127.0.0.1:4000/otlp/").unwrap(),
            "http://127.0.0.1:4000/otlp/v1/traces"
        );
        let refused = traces_url("https://collector:4318")
            .unwrap_err()
            .to_string();
        assert!(refused.contains("only http://"), "{refused}");
        assert!(traces_url("collector:4318").is_err());
    }

    #[test]
    fn trace_context_travels_in_event_headers_unless_the_component_set_its_own() {
        let parent = from_pairs(&[(
            "traceparent".into(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        )]);
        let mut headers = vec![("k".to_owned(), "v".to_owned())];
        inject_pairs(&parent, &mut headers);
        assert!(headers.iter().any(|(n, v)| n == "traceparent"
            && v == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        let mut own = vec![("tracestate".to_owned(), "mine=1".to_owned())];
        inject_pairs(&parent, &mut own);
        assert_eq!(own.len(), 1, "{own:?}");
    }
}
