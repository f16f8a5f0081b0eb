//! Prometheus metrics, served at `/metrics` on the admin listener in the
//! OpenMetrics text format (prometheus-client encodes it).
//!
//! Two kinds, chosen by what they cost:
//! - *Counted as it happens*, on the request and delivery paths: requests,
//!   latencies, instantiations, failures, events. A family's lookup takes a
//!   lock and allocates its labels, so the paths do it once, when a
//!   component version loads or a consumer starts, and keep the handles
//!   (prometheus-client's metrics are `Arc`s: a kept handle and a later
//!   lookup are the same series). A request then costs atomic adds and one
//!   histogram lock.
//! - *Read at scrape time*, because they are state rather than events:
//!   instance slots, consumer lag, outbox depth, pool use. Reading them on
//!   every change would tax the hot path for a number read every 15 s; the
//!   scrape asks the runtime and the backends instead ([`Runtime::scrape`]),
//!   and clears those families first so a removed component's series go.
//!
//! The families live in one process-wide set ([`metrics`]), like
//! prometheus' default registry: the capabilities count their own errors
//! without reaching each other's state, and tests run hosts as processes.
//!
//! [`Runtime::scrape`]: crate::runtime::Runtime::scrape

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub component: String,
    /// The route (a prefix from plugins.toml), not the path: paths are the
    /// client's to choose and would make series without bound.
    pub route: String,
    /// `2xx`, `4xx`, ...
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub component: String,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ComponentLabels {
    pub component: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub component: String,
    /// `trap`, `deadline` or `memory`.
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NotKeptLabels {
    pub component: String,
    /// See [`NotKept`].
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabels {
    /// The publisher, or the subscriber.
    pub component: String,
    pub topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub subscriber: String,
    pub topic: String,
    pub partition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeployLabels {
    pub component: String,
    /// `deployed`, `refused` or `rolled_back`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// `storage`, `cache`, `messaging`, `coordination`.
    pub capability: String,
    /// The backend's kind: `postgres`, `redis`, `kafka`, ...
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub capability: String,
    pub backend: String,
    /// Whose connections: a component's, or the host's own.
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LinkLabels {
    /// The component whose import made the call.
    pub caller: String,
    /// The component plugins.toml links that import to.
    pub callee: String,
    /// `agora:shop/inventory#lookup`: names from `wit/`, so bounded.
    pub function: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseCacheLabels {
    pub component: String,
    pub route: String,
    /// `hit`, `miss` (answered by the component, then kept) or `uncached`
    /// (answered by the component, and not kept: no-store, private, not a
    /// 200, too large).
    pub result: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latencies from 0.25 ms to about 8 s: a cached GET to a component's
/// whole deadline.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// Instantiation from 5 µs to about 80 ms (a fresh instance from the pool
/// is tens of µs; a large one on demand, milliseconds).
fn instantiation() -> Histogram {
    Histogram::new(exponential_buckets(0.000_005, 2.0, 15))
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: HistogramFamily<RouteLabels>,
    pub slots_in_use: Family<ComponentLabels, Gauge>,
    pub slots_waiting: Family<ComponentLabels, Gauge>,
    pub instantiation_seconds: HistogramFamily<ComponentLabels>,
    pub failures: Family<FailureLabels, Counter>,
    pub events_published: Family<TopicLabels, Counter>,
    pub events_delivered: Family<TopicLabels, Counter>,
    pub events_retried: Family<TopicLabels, Counter>,
    pub events_waited: Family<TopicLabels, Counter>,
    pub events_dead_lettered: Family<TopicLabels, Counter>,
    pub consumer_lag: Family<PartitionLabels, Gauge>,
    pub outbox_depth: Family<ComponentLabels, Gauge>,
    pub deploys: Family<DeployLabels, Counter>,
    pub backend_errors: Family<BackendLabels, Counter>,
    pub pool_connections: Family<PoolLabels, Gauge>,
    pub pool_in_use: Family<PoolLabels, Gauge>,
    pub pool_waiting: Family<PoolLabels, Gauge>,
    pub link_calls: Family<LinkLabels, Counter>,
    pub storage_calls: Family<ComponentLabels, Counter>,
    pub response_cache: Family<ResponseCacheLabels, Counter>,
    pub instances_not_kept: Family<NotKeptLabels, Counter>,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("agora");
        let metrics = Metrics {
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(latency),
            slots_in_use: Family::default(),
            slots_waiting: Family::default(),
            instantiation_seconds: Family::new_with_constructor(instantiation),
            failures: Family::default(),
            events_published: Family::default(),
            events_delivered: Family::default(),
            events_retried: Family::default(),
            events_waited: Family::default(),
            events_dead_lettered: Family::default(),
            consumer_lag: Family::default(),
            outbox_depth: Family::default(),
            deploys: Family::default(),
            backend_errors: Family::default(),
            pool_connections: Family::default(),
            pool_in_use: Family::default(),
            pool_waiting: Family::default(),
            link_calls: Family::default(),
            storage_calls: Family::default(),
            response_cache: Family::default(),
            instances_not_kept: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "http_requests",
            "HTTP requests answered, by component, route and status class",
            metrics.requests.clone(),
        );
        r.register(
            "http_request_duration_seconds",
            "Time from a request's arrival to its response head, by component and route",
            metrics.request_seconds.clone(),
        );
        r.register(
            "instance_slots_in_use",
            "Instances running now, of the component's max_concurrency",
            metrics.slots_in_use.clone(),
        );
        r.register(
            "instance_slots_waiting",
            "HTTP requests waiting for an instance slot",
            metrics.slots_waiting.clone(),
        );
        r.register(
            "instantiation_duration_seconds",
            "Time to make a fresh instance",
            metrics.instantiation_seconds.clone(),
        );
        r.register(
            "component_failures",
            "Invocations that trapped, ran past their deadline or out of memory",
            metrics.failures.clone(),
        );
        r.register(
            "events_published",
            "Events a component's outbox or publish handed to the broker",
            metrics.events_published.clone(),
        );
        r.register(
            "events_delivered",
            "Events a subscriber handled",
            metrics.events_delivered.clone(),
        );
        r.register(
            "events_retried",
            "Failed deliveries that were tried again",
            metrics.events_retried.clone(),
        );
        r.register(
            "events_waited",
            "Deadlines that deliveries spent waiting for a free instance slot, then waited again: no attempt spent",
            metrics.events_waited.clone(),
        );
        r.register(
            "events_dead_lettered",
            "Events moved to a dead-letter topic after their last attempt",
            metrics.events_dead_lettered.clone(),
        );
        r.register(
            "consumer_lag_events",
            "Events on a partition that its subscriber has not handled yet",
            metrics.consumer_lag.clone(),
        );
        r.register(
            "outbox_depth_events",
            "Committed events in a component's outbox not yet on the broker",
            metrics.outbox_depth.clone(),
        );
        r.register(
            "deploys",
            "Changes to a component's serving version, by outcome",
            metrics.deploys.clone(),
        );
        r.register(
            "backend_errors",
            "Calls to a backend that failed for the backend's sake (unreachable, timed out, refused), not the caller's",
            metrics.backend_errors.clone(),
        );
        r.register(
            "pool_connections",
            "Connections open in a backend pool",
            metrics.pool_connections.clone(),
        );
        r.register(
            "pool_connections_in_use",
            "Connections of a backend pool lent out now",
            metrics.pool_in_use.clone(),
        );
        r.register(
            "pool_waiting",
            "Callers waiting for a connection of a backend pool",
            metrics.pool_waiting.clone(),
        );
        r.register(
            "link_calls",
            "Calls from a component's agora:shop import to the component linked to it",
            metrics.link_calls.clone(),
        );
        r.register(
            "storage_calls",
            "Calls of a component that reach its database: queries, executes and commits",
            metrics.storage_calls.clone(),
        );
        r.register(
            "response_cache_lookups",
            "GET requests on routes with a response cache, by whether the cache answered",
            metrics.response_cache.clone(),
        );
        r.register(
            "instances_not_kept",
            "Instances of a component with limits.reuse that returned cleanly and were dropped \
             instead of kept warm, by reason",
            metrics.instances_not_kept.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// Counts one failed call to a backend.
    pub fn backend_error(&self, capability: &str, backend: &str) {
        self.backend_errors
            .get_or_create(&BackendLabels {
                capability: capability.to_owned(),
                backend: backend.to_owned(),
            })
            .inc();
    }

    /// Counts one change of a component's serving version.
    pub fn deploy(&self, component: &str, outcome: &str) {
        self.deploys
            .get_or_create(&DeployLabels {
                component: component.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Forgets the scrape-time series, before they are read again.
    pub fn clear_observed(&self) {
        self.slots_in_use.clear();
        self.slots_waiting.clear();
        self.consumer_lag.clear();
        self.outbox_depth.clear();
        self.pool_connections.clear();
        self.pool_in_use.clear();
        self.pool_waiting.clear();
    }

    /// Records one pool's use, read at scrape time.
    pub fn observe_pool(&self, pool: &PoolUse) {
        let labels = PoolLabels {
            capability: pool.capability.to_owned(),
            backend: pool.backend.to_owned(),
            pool: pool.pool.clone(),
        };
        self.pool_connections
            .get_or_create(&labels)
            .set(pool.connections as i64);
        self.pool_in_use
            .get_or_create(&labels)
            .set(pool.in_use as i64);
        self.pool_waiting
            .get_or_create(&labels)
            .set(pool.waiting as i64);
    }

    /// Every family, in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// How a backend pool is used right now.
#[derive(Debug, Clone)]
pub struct PoolUse {
    pub capability: &'static str,
    pub backend: &'static str,
    pub pool: String,
    pub connections: usize,
    pub in_use: usize,
    pub waiting: usize,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The host's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// One route's request series, looked up once per component version.
#[derive(Clone)]
pub struct RouteMetrics {
    /// By status class: 1xx to 5xx.
    pub by_class: [Counter; 5],
    pub duration: Histogram,
    /// Hits, misses and uncached answers, on routes with a response cache.
    pub response_cache: Option<[Counter; 3]>,
}

/// What the response cache did with a GET, as [`RouteMetrics::response_cache`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    Hit = 0,
    Miss = 1,
    Uncached = 2,
}

impl CacheResult {
    pub fn name(self) -> &'static str {
        ["hit", "miss", "uncached"][self as usize]
    }
}

impl RouteMetrics {
    /// `cached`: whether a response cache rule covers part of the route.
    pub fn new(component: &str, route: &str, cached: bool) -> RouteMetrics {
        let m = metrics();
        let counter = |status: &str| {
            m.requests
                .get_or_create(&RequestLabels {
                    component: component.to_owned(),
                    route: route.to_owned(),
                    status: status.to_owned(),
                })
                .clone()
        };
        RouteMetrics {
            by_class: ["1xx", "2xx", "3xx", "4xx", "5xx"].map(counter),
            duration: m
                .request_seconds
                .get_or_create(&RouteLabels {
                    component: component.to_owned(),
                    route: route.to_owned(),
                })
                .clone(),
            response_cache: cached.then(|| {
                [CacheResult::Hit, CacheResult::Miss, CacheResult::Uncached].map(|result| {
                    m.response_cache
                        .get_or_create(&ResponseCacheLabels {
                            component: component.to_owned(),
                            route: route.to_owned(),
                            result: result.name().to_owned(),
                        })
                        .clone()
                })
            }),
        }
    }

    /// Counts one answered request.
    pub fn observe(&self, status: u16, seconds: f64) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].inc();
        self.duration.observe(seconds);
    }

    /// Requests answered so far, of every class.
    pub fn total(&self) -> u64 {
        self.by_class.iter().map(Counter::get).sum()
    }
}

/// A component's instance series, looked up once per version.
#[derive(Clone)]
pub struct InstanceMetrics {
    pub instantiation: Histogram,
    pub traps: Counter,
    pub deadlines: Counter,
    pub memory_kills: Counter,
    /// Only for a component with `limits.reuse`: for the others, every
    /// instance is dropped, and saying so per reason would be noise.
    pub not_kept: Option<NotKeptMetrics>,
}

/// Why an instance that returned cleanly was not kept for reuse, as the
/// `reason` label says it: what an operator who set `limits.reuse` looks at
/// when instantiations do not drop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NotKept {
    /// It served its `limits.reuse` requests (`served`).
    Served,
    /// Something was left in its resource table (`held-resource`): an open
    /// transaction, a stream, an outgoing request or body, or a guest
    /// library's stdout kept open after a print.
    HeldResource,
    /// It reached its memory limit, even if it returned (`memory`).
    Memory,
    /// Its version was replaced, or the warm pool was full (`no-room`).
    NoRoom,
}

impl NotKept {
    const ALL: [NotKept; 4] = [
        NotKept::Served,
        NotKept::HeldResource,
        NotKept::Memory,
        NotKept::NoRoom,
    ];

    fn label(self) -> &'static str {
        match self {
            NotKept::Served => "served",
            NotKept::HeldResource => "held-resource",
            NotKept::Memory => "memory",
            NotKept::NoRoom => "no-room",
        }
    }
}

/// A component's `instances_not_kept` series, one per reason.
#[derive(Clone)]
pub struct NotKeptMetrics([Counter; NotKept::ALL.len()]);

impl NotKeptMetrics {
    pub fn count(&self, reason: NotKept) {
        self.0[reason as usize].inc();
    }
}

impl InstanceMetrics {
    pub fn new(component: &str, reuses: bool) -> InstanceMetrics {
        let m = metrics();
        let failure = |kind: &str| {
            m.failures
                .get_or_create(&FailureLabels {
                    component: component.to_owned(),
                    kind: kind.to_owned(),
                })
                .clone()
        };
        InstanceMetrics {
            instantiation: m
                .instantiation_seconds
                .get_or_create(&ComponentLabels {
                    component: component.to_owned(),
                })
                .clone(),
            traps: failure("trap"),
            deadlines: failure("deadline"),
            memory_kills: failure("memory"),
            not_kept: reuses.then(|| {
                NotKeptMetrics(NotKept::ALL.map(|reason| {
                    m.instances_not_kept
                        .get_or_create(&NotKeptLabels {
                            component: component.to_owned(),
                            reason: reason.label().to_owned(),
                        })
                        .clone()
                }))
            }),
        }
    }
}

/// A subscription's delivery series, looked up once per consumer.
#[derive(Clone)]
pub struct DeliveryMetrics {
    pub delivered: Counter,
    pub retried: Counter,
    pub waited: Counter,
    pub dead_lettered: Counter,
}

impl DeliveryMetrics {
    pub fn new(subscriber: &str, topic: &str) -> DeliveryMetrics {
        let m = metrics();
        let labels = TopicLabels {
            component: subscriber.to_owned(),
            topic: topic.to_owned(),
        };
        DeliveryMetrics {
            delivered: m.events_delivered.get_or_create(&labels).clone(),
            retried: m.events_retried.get_or_create(&labels).clone(),
            waited: m.events_waited.get_or_create(&labels).clone(),
            dead_lettered: m.events_dead_lettered.get_or_create(&labels).clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_handle_and_a_later_lookup_count_one_series() {
        let route = RouteMetrics::new("metrics-test", "/things", false);
        route.observe(201, 0.002);
        route.observe(404, 0.001);
        RouteMetrics::new("metrics-test", "/things", false).observe(200, 0.003);
        assert_eq!(route.total(), 3);
        let text = metrics().encode();
        assert!(
            text.contains(
                r#"agora_http_requests_total{component="metrics-test",route="/things",status="2xx"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains(
            r#"agora_http_request_duration_seconds_count{component="metrics-test",route="/things"} 3"#
        ));
        assert!(text.ends_with("# EOF\n"));
    }
}
