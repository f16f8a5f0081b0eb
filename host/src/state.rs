//! The per-instance state a `Store` carries: one per request or message,
//! or per warm instance with `limits.reuse` (its per-request parts reset).
//!
//! Building it must stay cheap (it is on every request's path): everything
//! expensive lives in [`ComponentCaps`], made once per component version and
//! shared through an `Arc`.

use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::body::{HostOutgoingBody, StreamContext};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::capability::ComponentCaps;
use crate::http_out::OutboundHooks;

pub struct InstanceState {
    pub caps: Arc<ComponentCaps>,
    pub table: ResourceTable,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    outbound: OutboundHooks,
    pub limiter: MemoryLimiter,
    /// Transactions this instance has open (see the storage capability).
    pub open_transactions: u32,
    /// The span this instance works in: its request's or its delivery's.
    pub trace: opentelemetry::Context,
}

impl InstanceState {
    pub fn new(caps: Arc<ComponentCaps>, memory_bytes: usize) -> Self {
        // No preopened directories, no environment but its own `env`, no
        // network sockets: a component reaches the world only through its
        // granted capabilities.
        let wasi = WasiCtx::builder()
            .inherit_stdout()
            .inherit_stderr()
            .envs(&caps.env)
            .build();
        let outbound = OutboundHooks::new(caps.outbound_hosts.clone());
        InstanceState {
            caps,
            table: ResourceTable::new(),
            wasi,
            http: WasiHttpCtx::new(),
            outbound,
            limiter: MemoryLimiter {
                max_bytes: memory_bytes,
                exhausted: false,
            },
            open_transactions: 0,
            trace: opentelemetry::Context::new(),
        }
    }

    /// Makes the instance work in `trace`: its calls, outbound requests and
    /// events continue that trace.
    pub fn set_trace(&mut self, trace: opentelemetry::Context) {
        self.outbound.trace = trace.clone();
        self.trace = trace;
    }
}

/// Aborts the outgoing bodies (of its response, of its outgoing requests)
/// that the guest left unfinished, whichever way the store ends (returned,
/// trapped, out of time, dropped at shutdown). wasi-http aborts a body the
/// guest drops, but one still in the table when the table is dropped ends
/// like a finished one: the client, or the remote server of an outgoing
/// request, would take what was written for all of it. Aborted, the
/// response's connection is cut and the request fails.
impl Drop for InstanceState {
    fn drop(&mut self) {
        let mut aborted = 0;
        for entry in self.table.iter_mut() {
            if let Some(body) = entry.downcast_mut::<HostOutgoingBody>() {
                // `abort` takes the body; an unused one stands in until
                // the table is dropped.
                let (unused, _) = HostOutgoingBody::new(StreamContext::Response, None, 1, 1);
                std::mem::replace(body, unused).abort();
                aborted += 1;
            }
        }
        if aborted > 0 {
            tracing::warn!(component = %self.caps.name, bodies = aborted,
                "the guest ended without finishing its outgoing bodies: they were aborted");
        }
    }
}

impl WasiView for InstanceState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for InstanceState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.outbound,
        }
    }
}

/// Enforces the component's memory limit and remembers that it was hit, so
/// the resulting trap can be reported as memory exhaustion rather than a bug.
pub struct MemoryLimiter {
    max_bytes: usize,
    pub exhausted: bool,
}

/// Tables hold function references; no sane component needs more.
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.exhausted = true;
            wasmtime::bail!(
                "memory limit of {} MiB exceeded",
                self.max_bytes / (1024 * 1024)
            );
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}
