//! A loaded component version: compiled, checked against its grants,
//! linked, and ready to instantiate.
//!
//! Everything that can fail happens off the request path, and nothing is
//! committed until everything of a change passed:
//! [`ComponentVersion::load`] checks the binary and commits nothing;
//! [`ComponentVersion::rehearse_migrations`] applies the migrations and
//! rolls them back, so a change of several components can be refused as a
//! whole before any commits; [`ComponentVersion::migrate`] then commits
//! them. A change of one component (an admin deploy, say) skips the rehearsal:
//! its migrations commit in one transaction, which a failure leaves
//! untouched, and a rehearsal would only double the work of a swap.
//! A version that fails any step is never routed to. Serving is
//! then one fresh instance per request or message from the pre-linked
//! [`InstancePre`]: no state leaks between requests, and a trap poisons
//! nothing but its own instance.
//!
//! A component may opt out of that isolation with `limits.reuse`: an
//! instance that returned cleanly is kept warm and serves up to that many
//! requests, skipping instantiation. The trade-off is the component's own:
//! what a request leaves in memory can be read by a later request of the
//! same component (no other component ever sees the instance). What
//! cannot be trusted is not kept: an instance that trapped, hit its
//! deadline or memory limit, or still holds a host resource when it
//! returns (an open transaction, a stream, an outgoing request) is
//! dropped, so no transaction or connection outlives its request. A version
//! keeps at most [`MAX_WARM`] idle instances, and drops them when it is
//! replaced.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures_util::FutureExt;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, SizeHint};
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::time::timeout_at;
use wasmtime::component::{Component, Instance, InstancePre, Linker, Val};
use wasmtime::{Store, Trap, UpdateDeadline};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::ProxyIndices;
use wasmtime_wasi_http::WasiHttpView;

use crate::bindings::messaging::Message;
use crate::bindings::{schema, subscriber};
use crate::capability::{Capabilities, ComponentCaps};
use crate::compiled::{CompiledCache, Wasm};
use crate::links;
use crate::messaging::Undelivered;
use crate::metrics::{CacheResult, InstanceMetrics, NotKept, RouteMetrics};
use crate::plugins::{ComponentSpec, HostSettings};
use crate::registry::prefix_matches;
use crate::response::{self, Body};
use crate::runtime::Runtime;
use crate::state::InstanceState;
use crate::storage::{Database, Migration};
use crate::telemetry;

pub struct ComponentVersion {
    pub name: String,
    /// The first 12 hex digits of the binary's SHA-256.
    pub version: String,
    pub spec: ComponentSpec,
    /// The binary, kept so a rollback can be persisted.
    pub wasm: Arc<[u8]>,
    pre: InstancePre<InstanceState>,
    http: Option<ProxyIndices>,
    subscriber: Option<subscriber::GuestIndices>,
    caps: Arc<ComponentCaps>,
    /// What the `schema` export returned; committed by `migrate`.
    migrations: Vec<Migration>,
    permits: Arc<Semaphore>,
    /// HTTP requests waiting for a permit, each holding its body, and how
    /// many may (`host.max_waiting_requests`).
    waiting: AtomicUsize,
    max_waiting: usize,
    /// One per route of `spec.routes`, in its order.
    route_metrics: Vec<RouteMetrics>,
    instance_metrics: InstanceMetrics,
    /// Instances kept for reuse (`limits.reuse`), the last returned on top.
    warm: Mutex<Vec<Lease>>,
    /// Whether this version serves its component; a replaced one keeps no
    /// warm instances (it may serve again after a rollback).
    serving: AtomicBool,
}

/// Why an invocation failed, as the client is told.
#[derive(Debug)]
pub enum Failure {
    Busy,
    Overloaded,
    Timeout,
    MemoryExhausted,
    Trapped(String),
    NoResponse,
    Internal(String),
}

impl Failure {
    /// The client gets the reason; the log gets the wasm backtrace too.
    fn classify(error: wasmtime::Error, memory_exhausted: bool) -> Failure {
        if memory_exhausted {
            return Failure::MemoryExhausted;
        }
        match error.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => Failure::Timeout,
            Some(trap) => {
                tracing::debug!(error = %format!("{error:#}"), "trap details");
                Failure::Trapped(trap.to_string())
            }
            None => Failure::Trapped(error.to_string()),
        }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Failure::Busy => (StatusCode::SERVICE_UNAVAILABLE, "component_busy"),
            Failure::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "component_overloaded"),
            Failure::Timeout => (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded"),
            Failure::MemoryExhausted => {
                (StatusCode::INTERNAL_SERVER_ERROR, "memory_limit_exceeded")
            }
            Failure::Trapped(_) => (StatusCode::INTERNAL_SERVER_ERROR, "component_trapped"),
            Failure::NoResponse => (StatusCode::INTERNAL_SERVER_ERROR, "no_response"),
            Failure::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        }
    }

    pub fn message(&self, component: &str) -> String {
        match self {
            Failure::Busy => format!("component `{component}` is at its concurrency limit"),
            Failure::Overloaded => format!(
                "component `{component}` is at its concurrency limit with too many requests waiting"
            ),
            Failure::Timeout => format!("component `{component}` exceeded its deadline"),
            Failure::MemoryExhausted => {
                format!("component `{component}` exceeded its memory limit")
            }
            Failure::Trapped(trap) => format!("component `{component}` trapped: {trap}"),
            Failure::NoResponse => format!("component `{component}` returned no response"),
            Failure::Internal(e) => format!("component `{component}`: {e}"),
        }
    }

    pub fn response(&self, component: &str) -> Response<Body> {
        let (status, code) = self.status_and_code();
        tracing::warn!(%component, %code, "{}", self.message(component));
        let mut response = response::error(status, code, self.message(component));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            // A slot frees as soon as any instance finishes.
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
    }
}

const MIB: usize = 1024 * 1024;

/// Idle instances a version keeps for reuse, at most. Under load a freed
/// instance is taken again at once, so few wait; after a burst this bounds
/// the memory and instance-pool slots (shared by every component) that stay
/// taken until the component is busy again.
const MAX_WARM: usize = 16;

/// Who waits for an instance slot: that decides whether the wait is bounded
/// and whether it counts against the instance's deadline.
#[derive(Clone, Copy, PartialEq)]
enum Claimant {
    /// An HTTP request. It holds its body while it waits, so it is refused
    /// at once when `max_waiting` others already wait; its deadline runs
    /// from its arrival, which is what its client sees.
    Request,
    /// A call from another component, bounded by its caller's deadline
    /// and by the callers; the wait counts against its own deadline too.
    Call,
    /// A delivery, bounded by partitions and the subscriber's keys in
    /// parallel. Its deadline starts with the slot: a handler that waited
    /// behind others still gets its whole time, instead of failing an
    /// attempt for the wait.
    Delivery,
}

/// An instance slot: its concurrency permit, held until the instance is
/// done, and the store with the deadline it must finish by.
struct Slot {
    permit: OwnedSemaphorePermit,
    lease: Lease,
    deadline: tokio::time::Instant,
}

/// A store and its instance: fresh (made on first use), or warm from
/// earlier requests, with how many it served.
struct Lease {
    store: Store<InstanceState>,
    instance: Option<Instance>,
    served: u32,
}

/// A request counted among those waiting for a slot, until dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long a compile runs before the log says so: a cache hit takes
/// milliseconds, a large component's first compile tens of seconds.
const COMPILE_NOTICE: Duration = Duration::from_secs(2);

/// Compiles `wasm` off the async threads (or maps it from the compiled
/// artifacts), saying so in the log while it takes long.
async fn compile(
    compiled: &Arc<CompiledCache>,
    name: &str,
    wasm: &Wasm,
) -> Result<Result<Component>> {
    let started = Instant::now();
    let compiling = {
        let (compiled, wasm) = (compiled.clone(), wasm.clone());
        tokio::task::spawn_blocking(move || compiled.load(&wasm).map(|(c, _)| c))
    };
    tokio::pin!(compiling);
    let mut notice = tokio::time::interval_at(
        tokio::time::Instant::now() + COMPILE_NOTICE,
        COMPILE_NOTICE * 5,
    );
    loop {
        tokio::select! {
            compiled = &mut compiling => {
                if started.elapsed() >= COMPILE_NOTICE {
                    tracing::info!(component = %name, seconds = format!("{:.1}", started.elapsed().as_secs_f64()), "compiled (cached for the next start)");
                }
                return Ok(compiled?);
            }
            _ = notice.tick() => tracing::info!(
                component = %name,
                bytes = wasm.bytes().len(),
                "compiling to native code ({} s so far; cached afterwards)",
                started.elapsed().as_secs()
            ),
        }
    }
}

impl ComponentVersion {
    /// Compiles (or fetches from the compilation cache), validates grants,
    /// links, configures capabilities and lists the migrations, committing
    /// nothing.
    pub async fn load(
        compiled: &Arc<CompiledCache>,
        linker: &Linker<InstanceState>,
        capabilities: &Capabilities,
        runtime: &Weak<Runtime>,
        name: &str,
        spec: &ComponentSpec,
        wasm: Wasm,
    ) -> Result<ComponentVersion> {
        let version = wasm.version();
        let engine = compiled.engine();
        let component = compile(compiled, name, &wasm)
            .await?
            .map_err(|e| anyhow!("component `{name}` is not a valid component: {e:#}"))?;
        Capabilities::check_imports(engine, name, &component, spec)?;
        let linked = links::linker_for(linker, engine, name, &component, spec, runtime)?;
        let pre = linked
            .as_ref()
            .unwrap_or(linker)
            .instantiate_pre(&component)
            .map_err(|e| anyhow!("component `{name}` cannot be linked: {e:#}"))?;
        let http = ProxyIndices::new(&pre).ok();
        if http.is_none() && !spec.routes.is_empty() {
            bail!("component `{name}` has routes but does not export wasi:http/incoming-handler");
        }
        let subscriber = subscriber::GuestIndices::new(&pre).ok();
        if subscriber.is_none() && !spec.subscribes.is_empty() {
            bail!("component `{name}` subscribes to topics but does not export agora:platform/subscriber");
        }
        let caps = Arc::new(capabilities.configure(name, spec).await?);
        let mut loaded = ComponentVersion {
            name: name.to_owned(),
            version,
            spec: spec.clone(),
            wasm: wasm.bytes().clone(),
            pre,
            http,
            subscriber,
            caps,
            migrations: Vec::new(),
            permits: Arc::new(Semaphore::new(spec.limits.max_concurrency as usize)),
            waiting: AtomicUsize::new(0),
            max_waiting: HostSettings::default().max_waiting_requests as usize,
            route_metrics: spec
                .routes
                .iter()
                .map(|route| {
                    let cached = spec.response_cache.iter().any(|rule| {
                        prefix_matches(route, &rule.prefix) || prefix_matches(&rule.prefix, route)
                    });
                    RouteMetrics::new(name, route, cached)
                })
                .collect(),
            instance_metrics: InstanceMetrics::new(name, spec.limits.reuse > 0),
            warm: Mutex::default(),
            serving: AtomicBool::new(true),
        };
        loaded.migrations = loaded.list_migrations().await?;
        // Refuses migrations without a storage grant now, not at commit.
        loaded.database()?;
        Ok(loaded)
    }

    /// Bounds the HTTP requests that may wait for an instance slot.
    pub fn with_max_waiting(mut self, max_waiting: usize) -> Self {
        self.max_waiting = max_waiting;
        self
    }

    /// The index of `route` (one of `spec.routes`), for [`Self::observe_request`].
    pub fn route_index(&self, route: &str) -> usize {
        self.spec
            .routes
            .iter()
            .position(|r| r == route)
            .expect("the registry routes only to a component's own routes")
    }

    /// Counts a request answered on the route of `route_index`.
    pub fn observe_request(&self, route_index: usize, status: u16, elapsed: Duration) {
        self.route_metrics[route_index].observe(status, elapsed.as_secs_f64());
    }

    /// Counts what the response cache did with a GET on the route of `route_index`.
    pub fn observe_cache(&self, route_index: usize, result: CacheResult) {
        if let Some(counters) = &self.route_metrics[route_index].response_cache {
            counters[result as usize].inc();
        }
    }

    /// Requests answered so far on each route, as (route, count); the
    /// counts go on across versions.
    pub fn requests_per_route(&self) -> Vec<(&str, u64)> {
        self.spec
            .routes
            .iter()
            .zip(&self.route_metrics)
            .map(|(route, m)| (route.as_str(), m.total()))
            .collect()
    }

    /// Instance slots in use, and HTTP requests waiting for one.
    pub fn slots(&self) -> (usize, usize) {
        let max = self.spec.limits.max_concurrency as usize;
        (
            max.saturating_sub(self.permits.available_permits()),
            self.waiting.load(Ordering::Relaxed),
        )
    }

    /// The database holding this component's outbox, if it publishes.
    pub fn outbox(&self) -> Option<&Arc<dyn Database>> {
        self.caps
            .messaging
            .as_ref()
            .and(self.caps.storage.as_ref().map(|s| &s.db))
    }

    /// Counts an invocation's failure by kind, and hands it on.
    fn failed(&self, failure: Failure) -> Failure {
        let m = &self.instance_metrics;
        let counter = match failure {
            Failure::Timeout => Some(&m.deadlines),
            Failure::MemoryExhausted => Some(&m.memory_kills),
            Failure::Trapped(_) => Some(&m.traps),
            _ => None,
        };
        if let Some(counter) = counter {
            counter.inc();
        }
        failure
    }

    /// The lease's instance: its warm one, or a fresh one, timed.
    async fn instance(&self, lease: &mut Lease) -> wasmtime::Result<Instance> {
        if let Some(instance) = lease.instance {
            return Ok(instance);
        }
        let started = Instant::now();
        let instance = self.pre.instantiate_async(&mut lease.store).await?;
        self.instance_metrics
            .instantiation
            .observe(started.elapsed().as_secs_f64());
        lease.instance = Some(instance);
        Ok(instance)
    }

    /// Ends a call made on `lease` (`ran` is the failure that stopped it
    /// before it ended, the deadline say, or what it returned): a returned
    /// instance is given back, a failure counted by kind.
    fn settle<T>(
        &self,
        lease: Lease,
        ran: Result<wasmtime::Result<T>, Failure>,
    ) -> Result<T, Failure> {
        match ran {
            Ok(Ok(value)) => {
                self.give_back(lease);
                Ok(value)
            }
            Ok(Err(e)) => {
                let exhausted = lease.store.data().limiter.exhausted;
                Err(self.failed(Failure::classify(e, exhausted)))
            }
            Err(failure) => Err(self.failed(failure)),
        }
    }

    /// Takes back the lease of an instance that returned normally, and
    /// keeps it warm if `limits.reuse` allows and it holds nothing of its
    /// request: no host resource left in its table, no transaction open.
    /// With reuse, an instance not kept is counted by why.
    fn give_back(&self, mut lease: Lease) {
        lease.served += 1;
        // Nothing of the request's trace is kept alive with the instance.
        lease
            .store
            .data_mut()
            .set_trace(opentelemetry::Context::new());
        let state = lease.store.data();
        let reason = if lease.served >= self.spec.limits.reuse {
            NotKept::Served
        } else if !state.table.is_empty() || state.open_transactions > 0 {
            NotKept::HeldResource
        } else if state.limiter.exhausted {
            NotKept::Memory
        } else {
            let mut warm = self.warm.lock().unwrap();
            // Read under the lock `set_serving` drains under, so a version
            // being replaced cannot be handed an instance it would keep.
            if self.serving.load(Ordering::SeqCst) && warm.len() < MAX_WARM {
                warm.push(lease);
                return;
            }
            NotKept::NoRoom
        };
        if let Some(not_kept) = &self.instance_metrics.not_kept {
            not_kept.count(reason);
        }
    }

    /// Waits until none of this version's instances runs: at shutdown, so
    /// that guests whose clients went away finish before the backends they
    /// write to stop.
    pub async fn until_idle(&self) {
        let _ = self
            .permits
            .acquire_many(self.spec.limits.max_concurrency)
            .await;
    }

    /// Says whether this version serves its component. A replaced version
    /// drops its warm instances and keeps no more.
    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::SeqCst);
        if !serving {
            // Taken out first, so the stores drop outside the lock.
            let warm = std::mem::take(&mut *self.warm.lock().unwrap());
            drop(warm);
        }
    }

    /// A warm lease, if one is kept, or a fresh store, to finish by `deadline`.
    fn lease(&self, deadline: Instant) -> Lease {
        let warm = self.warm.lock().unwrap().pop();
        match warm {
            Some(mut lease) => {
                arm_deadline(&mut lease.store, deadline);
                lease
            }
            None => Lease {
                store: self.new_store(deadline),
                instance: None,
                served: 0,
            },
        }
    }

    fn deadline(&self) -> Instant {
        Instant::now() + Duration::from_millis(self.spec.limits.timeout_ms)
    }

    /// The pre-linked component every instance is made from.
    pub fn instance_pre(&self) -> &InstancePre<InstanceState> {
        &self.pre
    }

    /// A store for one instance, with this version's limits and `deadline`.
    pub fn new_store(&self, deadline: Instant) -> Store<InstanceState> {
        let memory = self.spec.limits.memory_mib as usize * MIB;
        let mut store = Store::new(
            self.pre.engine(),
            InstanceState::new(self.caps.clone(), memory),
        );
        store.limiter(|s| &mut s.limiter);
        arm_deadline(&mut store, deadline);
        store
    }

    /// Waits, for up to this version's deadline, for an instance slot (the
    /// concurrency limit) and makes the store for that instance; how long
    /// the instance then has depends on the `claimant`.
    async fn claim_slot(&self, claimant: Claimant) -> Result<Slot, Failure> {
        let deadline = self.deadline();
        let until = tokio::time::Instant::from_std(deadline);
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => return Err(Failure::Busy),
            Err(TryAcquireError::NoPermits) => {
                let _waiting = (claimant == Claimant::Request)
                    .then(|| self.wait_in_line())
                    .transpose()?;
                match timeout_at(until, self.permits.clone().acquire_owned()).await {
                    Ok(Ok(permit)) => permit,
                    _ => return Err(Failure::Busy),
                }
            }
        };
        let deadline = match claimant {
            Claimant::Delivery => self.deadline(),
            Claimant::Request | Claimant::Call => deadline,
        };
        Ok(Slot {
            permit,
            lease: self.lease(deadline),
            deadline: tokio::time::Instant::from_std(deadline),
        })
    }

    /// A place among the requests waiting for a slot, if one is free.
    fn wait_in_line(&self) -> Result<Waiting<'_>, Failure> {
        self.waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max_waiting).then_some(n + 1)
            })
            .map(|_| Waiting(&self.waiting))
            .map_err(|_| Failure::Overloaded)
    }

    /// The migrations of the `schema` export (none without it).
    async fn list_migrations(&self) -> Result<Vec<Migration>> {
        let Ok(indices) = schema::GuestIndices::new(&self.pre) else {
            return Ok(Vec::new());
        };
        let mut store = self.new_store(self.deadline());
        let instance = self.pre.instantiate_async(&mut store).await?;
        let migrations = indices
            .load(&mut store, &instance)?
            .call_migrations(&mut store)
            .await
            .map_err(anyhow::Error::from)
            .with_context(|| format!("component `{}`: listing its migrations", self.name))?;
        Ok(migrations
            .into_iter()
            .map(|m| Migration {
                name: m.name,
                sql: m.sql,
            })
            .collect())
    }

    /// The database the migrations go to, if there are any.
    fn database(&self) -> Result<Option<&Arc<dyn Database>>> {
        if self.migrations.is_empty() {
            return Ok(None);
        }
        self.caps
            .storage
            .as_ref()
            .map(|s| Some(&s.db))
            .ok_or_else(|| {
                anyhow!(
                    "component `{}` ships migrations but is not granted `storage`",
                    self.name
                )
            })
    }

    fn migration_failed(&self, e: impl std::fmt::Display) -> anyhow::Error {
        anyhow!("component `{}` version {}: {e}", self.name, self.version)
    }

    /// Applies the migrations not yet applied and rolls them back: whether
    /// they would apply to the data as it is now.
    pub async fn rehearse_migrations(&self) -> Result<()> {
        let Some(db) = self.database()? else {
            return Ok(());
        };
        db.rehearse_migrations(&self.migrations)
            .await
            .map_err(|e| self.migration_failed(e))
    }

    /// Commits the migrations not yet applied, in one transaction: a
    /// failure leaves the schema as it was.
    pub async fn migrate(&self) -> Result<()> {
        let Some(db) = self.database()? else {
            return Ok(());
        };
        let applied = db
            .migrate(&self.migrations)
            .await
            .map_err(|e| self.migration_failed(e))?;
        if !applied.is_empty() {
            tracing::info!(component = %self.name, version = %self.version, ?applied, "migrations applied");
        }
        Ok(())
    }

    /// Serves one request on a fresh instance (or a warm one, with `limits.reuse`).
    pub async fn handle_http(self: Arc<Self>, request: Request<Full<Bytes>>) -> Response<Body> {
        let Slot {
            permit,
            mut lease,
            deadline,
        } = match self.claim_slot(Claimant::Request).await {
            Ok(slot) => slot,
            Err(failure) => return failure.response(&self.name),
        };
        let trace = request.extensions().get::<opentelemetry::Context>();
        lease
            .store
            .data_mut()
            .set_trace(trace.cloned().unwrap_or_default());
        let (sender, mut receiver) = oneshot::channel();
        let handles = {
            let mut http = lease.store.data_mut().http();
            http.new_incoming_request(Scheme::Http, request)
                .and_then(|req| Ok((req, http.new_response_outparam(sender)?)))
        };
        let (req, out) = match handles {
            Ok(handles) => handles,
            Err(e) => return Failure::Internal(format!("{e:#}")).response(&self.name),
        };
        let this = self.clone();
        let failed = Arc::new(AtomicBool::new(false));
        let guest_failed = failed.clone();
        let mut guest = GuestRun::new(async move {
            // Held until the guest is done, response body included.
            let _permit = permit;
            let run = async {
                let indices = this
                    .http
                    .as_ref()
                    .ok_or_else(|| wasmtime::format_err!("no wasi:http/incoming-handler export"))?;
                let instance = this.instance(&mut lease).await?;
                let proxy = indices.load(&mut lease.store, &instance)?;
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut lease.store, req, out)
                    .await
            };
            // The deadline holds wherever the call runs, waiting in a host
            // call included, where epoch interruption cannot reach it.
            let ran = match timeout_at(deadline, AssertUnwindSafe(run).catch_unwind()).await {
                Ok(Ok(returned)) => Ok(returned),
                Ok(Err(_)) => Err(Failure::Internal("the host panicked serving it".into())),
                Err(_) => Err(Failure::Timeout),
            };
            // Said before the store, and with it the body's stream, is
            // dropped: see `GuestBody`.
            guest_failed.store(!matches!(ran, Ok(Ok(()))), Ordering::SeqCst);
            // Counted here, whether or not the response head was out.
            this.settle(lease, ran)
        });
        let head = tokio::select! {
            biased;
            head = &mut receiver => head,
            // Returned: its head was sent, or its sender dropped.
            () = &mut guest => receiver.await,
        };
        match head {
            Ok(Ok(response)) => {
                // Still writing its body: on a task of its own from here,
                // so that it moves on (to its deadline) while hyper waits
                // for the client to take the bytes.
                guest.detach();
                response.map(|body| GuestBody { body, failed }.boxed_unsync())
            }
            Ok(Err(code)) => {
                Failure::Internal(format!("failed the request: {code:?}")).response(&self.name)
            }
            // No head: the guest failed, or returned (or goes on) without one.
            Err(_) => {
                (&mut guest).await;
                match guest.outcome.take() {
                    Some(Err(failure)) => failure.response(&self.name),
                    _ => Failure::NoResponse.response(&self.name),
                }
            }
        }
    }

    /// Whether this version exports `interface` (`package/name`, any version).
    pub fn exports(&self, interface: &str) -> bool {
        let ty = self.pre.component().component_type();
        let engine = self.pre.engine();
        let found = ty
            .exports(engine)
            .any(|(name, _)| name.split('@').next() == Some(interface));
        found
    }

    /// Calls `function` of the exported `interface` on a fresh (or warm) instance: the
    /// callee side of a service-to-service call. A failure of the callee
    /// (trap, deadline, memory) fails the caller's call with its reason.
    pub async fn call_export(
        &self,
        interface: &str,
        function: &str,
        params: &[Val],
        results: &mut [Val],
        trace: opentelemetry::Context,
    ) -> wasmtime::Result<()> {
        let Slot {
            permit: _permit,
            mut lease,
            deadline,
        } = match self.claim_slot(Claimant::Call).await {
            Ok(slot) => slot,
            Err(failure) => wasmtime::bail!("{}", failure.message(&self.name)),
        };
        lease.store.data_mut().set_trace(trace);
        let run = async {
            let instance = self.instance(&mut lease).await?;
            let store = &mut lease.store;
            let func = instance
                .get_export_index(&mut *store, None, interface)
                .and_then(|i| instance.get_export_index(&mut *store, Some(&i), function))
                .and_then(|f| instance.get_func(&mut *store, f))
                .ok_or_else(|| {
                    wasmtime::format_err!(
                        "component `{}` does not export `{interface}#{function}`",
                        self.name
                    )
                })?;
            func.call_async(store, params, results).await
        };
        let ran = timeout_at(deadline, run)
            .await
            .map_err(|_| Failure::Timeout);
        self.settle(lease, ran)
            .map_err(|failure| wasmtime::format_err!("{}", failure.message(&self.name)))
    }

    /// Hands one message to the `subscriber` export of a fresh (or warm)
    /// instance; gives up waiting for a slot once `stop` turns true.
    pub async fn deliver(
        self: Arc<Self>,
        message: Message,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), Undelivered> {
        let indices = self.subscriber.as_ref().ok_or_else(|| {
            Undelivered::Failed(format!(
                "component `{}` has no subscriber export",
                self.name
            ))
        })?;
        let Slot {
            permit: _permit,
            mut lease,
            deadline,
        } = tokio::select! {
            claimed = self.claim_slot(Claimant::Delivery) => {
                claimed.map_err(|f| Undelivered::Busy(f.message(&self.name)))?
            }
            // Nothing of it ran, so a stopping consumer need not wait for it.
            Ok(_) = stop.wait_for(|stop| *stop) => {
                return Err(Undelivered::Busy(format!(
                    "component `{}`: stopped while waiting for an instance slot",
                    self.name
                )));
            }
        };
        lease
            .store
            .data_mut()
            .set_trace(telemetry::from_pairs(&message.headers));
        let run = async {
            let instance = self.instance(&mut lease).await?;
            indices
                .load(&mut lease.store, &instance)?
                .call_handle(&mut lease.store, &message)
                .await
        };
        let ran = timeout_at(deadline, run)
            .await
            .map_err(|_| Failure::Timeout);
        // Returned, the guest says whether it handled the message.
        self.settle(lease, ran)
            .map_err(|failure| Undelivered::Failed(failure.message(&self.name)))?
            .map_err(Undelivered::Failed)
    }
}

/// Makes `store` check `deadline` at every epoch tick, yielding to the
/// executor meanwhile so one busy instance cannot starve the others. Set
/// again for each request a warm instance serves.
fn arm_deadline(store: &mut Store<InstanceState>, deadline: Instant) {
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        Ok(if Instant::now() >= deadline {
            UpdateDeadline::Interrupt
        } else {
            UpdateDeadline::Yield(1)
        })
    });
}

/// A guest's HTTP call, run on the task of its request until the response
/// head is out: most guests (hello world, any handler whose body fits the
/// stream's buffer) return by then, and a task of their own would cost
/// every request a spawn and wakeups across threads. A guest still writing
/// its body when the head is out is spawned ([`GuestRun::detach`]), so it
/// moves on whatever the client does; hyper then polls only the body.
///
/// Dropped before the guest returned (the client went away), the call is
/// spawned too: a client never cuts a guest off between two writes (a stock
/// reservation and its order, say). The call carries its deadline, so a
/// spawned guest ends by it too.
struct GuestRun {
    call: Option<GuestCall>,
    /// How the guest ended, once it has.
    outcome: Option<Result<(), Failure>>,
}

/// A guest's call, ending with how it ended (counted already).
type GuestCall = Pin<Box<dyn Future<Output = Result<(), Failure>> + Send>>;

impl GuestRun {
    fn new(call: impl Future<Output = Result<(), Failure>> + Send + 'static) -> GuestRun {
        GuestRun {
            call: Some(Box::pin(call)),
            outcome: None,
        }
    }

    /// Runs the rest of the call, if any, on a task of its own.
    fn detach(&mut self) {
        if let (Some(call), Ok(runtime)) = (self.call.take(), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(call);
        }
    }
}

impl Future for GuestRun {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        let Some(call) = self.call.as_mut() else {
            return Poll::Ready(());
        };
        let outcome = std::task::ready!(call.as_mut().poll(cx));
        self.call = None;
        self.outcome = Some(outcome);
        Poll::Ready(())
    }
}

impl Drop for GuestRun {
    fn drop(&mut self) {
        self.detach();
    }
}

/// A component's response body, whose end says whether the guest finished
/// it. A guest that traps or runs out of time drops its half-written body,
/// which would otherwise end like a whole one: a client (and the response
/// cache) would take a fragment for the response. Such an end becomes an
/// error, so the connection is cut instead (HTTP/1.1 sends no last chunk,
/// HTTP/2 resets the stream).
///
/// The end is judged without waiting. A failed guest's body can only end
/// when its store is dropped, and the call says it failed before it drops
/// the store, so at such an end `failed` is set. A finished body ends when
/// the guest calls `finish`, before it returns, so `failed` not set means a
/// finished body: waiting for the guest to return would cost every
/// response a wakeup. A guest that returns still holding its body has it
/// aborted when its store is dropped (see `InstanceState`'s `Drop`), which
/// ends it with an error too.
struct GuestBody {
    body: Body,
    failed: Arc<AtomicBool>,
}

impl hyper::body::Body for GuestBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(None) if self.failed.swap(false, Ordering::SeqCst) => {
                Poll::Ready(Some(Err(wasmtime_wasi_http::Error::HttpResponseIncomplete)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        !self.failed.load(Ordering::SeqCst) && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
