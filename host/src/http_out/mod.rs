//! `wasi:http/outgoing-handler`: outbound HTTP, only to granted hosts.
//!
//! The check sits in the one place every outbound request passes
//! (`WasiHttpHooks::send_request`), so no guest path can go around it. An
//! entry `name` allows that host on any port; `name:port` only that port.

use std::sync::Arc;

use anyhow::Result;
use async_trait::async_trait;
use opentelemetry::trace::{SpanKind, TraceContextExt};
use opentelemetry::KeyValue;
use wasmtime::component::Linker;
use wasmtime_wasi_http::{RequestOptions, WasiBody, WasiHttpHooks};

use crate::capability::Capability;
use crate::plugins::{ComponentSpec, Grant};
use crate::state::InstanceState;
use crate::telemetry;

pub struct HttpOutCapability;

#[async_trait]
impl Capability for HttpOutCapability {
    const GRANT: Grant = Grant::HttpOut;
    const INTERFACES: &'static [&'static str] = &["wasi:http/outgoing-handler"];
    type ComponentState = Arc<Vec<String>>;

    fn add_to_linker(linker: &mut Linker<InstanceState>) -> Result<()> {
        Ok(wasmtime_wasi_http::p2::add_only_http_to_linker_async(
            linker,
        )?)
    }

    async fn configure(&self, _component: &str, spec: &ComponentSpec) -> Result<Arc<Vec<String>>> {
        Ok(Arc::new(spec.outbound_hosts.clone()))
    }
}

/// The per-instance hooks: the allow-list of the component, if granted,
/// and the trace its requests continue.
pub struct OutboundHooks {
    allowed: Option<Arc<Vec<String>>>,
    pub trace: opentelemetry::Context,
}

impl OutboundHooks {
    pub fn new(allowed: Option<Arc<Vec<String>>>) -> Self {
        OutboundHooks {
            allowed,
            trace: opentelemetry::Context::new(),
        }
    }

    fn permits(&self, authority: &http::uri::Authority) -> bool {
        let Some(allowed) = &self.allowed else {
            return false;
        };
        allowed
            .iter()
            .any(|entry| entry == authority.host() || entry == authority.as_str())
    }
}

type SendFuture = Box<
    dyn std::future::Future<
            Output = wasmtime_wasi_http::Result<(
                http::Response<WasiBody>,
                Box<dyn std::future::Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
            )>,
        > + Send,
>;

impl WasiHttpHooks for OutboundHooks {
    fn send_request(
        &mut self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn std::future::Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> SendFuture {
        let permitted = request.uri().authority().is_some_and(|a| self.permits(a));
        if !permitted {
            tracing::warn!(uri = %request.uri(), "outbound request to a host not granted");
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        let span = telemetry::child(&self.trace, SpanKind::Client, || {
            (
                format!(
                    "{} {}",
                    telemetry::method_name(request.method()),
                    request.uri().host().unwrap_or("")
                ),
                vec![
                    KeyValue::new("http.request.method", request.method().to_string()),
                    // No query or credentials: they may hold secrets.
                    KeyValue::new(
                        "url.full",
                        format!(
                            "{}://{}{}",
                            request.uri().scheme_str().unwrap_or("http"),
                            request.uri().host().unwrap_or(""),
                            request.uri().path()
                        ),
                    ),
                ],
            )
        });
        // Unless the component passes on a context of its own.
        if !request.headers().contains_key("traceparent") {
            telemetry::inject(&span, request.headers_mut());
        }
        Box::new(async move {
            use http_body_util::BodyExt;
            let sent = wasmtime_wasi_http::default_send_request(request, options).await;
            match &sent {
                Ok((response, _)) => {
                    let status = response.status().as_u16();
                    span.span().set_attribute(KeyValue::new(
                        "http.response.status_code",
                        i64::from(status),
                    ));
                    telemetry::end(&span, (status >= 500).then_some("server error"));
                }
                Err(e) => telemetry::end(&span, Some(&e.to_string())),
            }
            let (response, io) = sent?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn std::future::Future<Output = _> + Send>,
            ))
        })
    }
}
