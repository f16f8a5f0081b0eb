//! Delivery: a supervisor per host keeps one consumer task per
//! (subscriber, topic, partition) whose lease this host holds.
//!
//! The supervisor beats every [`HEARTBEAT`]: it finds each subscribed
//! topic's partitions (again every [`PARTITIONS_REFRESH`], so a topic that
//! grew is seen), asks coordination for this host's leases, starts
//! consumers for new ones and stops those it lost, no longer wants, or
//! should give back to a host that joined. A consumer being stopped
//! finishes the event in hand and commits before its lease is given back,
//! so two hosts never handle one partition at once. Should this host stop
//! reaching coordination, its consumers pause before their leases can
//! expire on the server (one heartbeat of margin), and resume when it
//! renews them.
//!
//! A consumer reads its partition in batches, with long fetches (nothing
//! in-process wakes it, so events appended by any host reach it). Within a
//! batch, each key's events are handled one at a time, in log order, and
//! different keys at once, up to [`KEYS_IN_PARALLEL`] per subscriber over
//! all its consumers on this host; an event without a key is a key of its
//! own. The next batch starts when the whole batch is
//! done with, so per-key order holds across batches too. The offset is
//! committed after each batch, only past events whose handler succeeded or
//! that went to the dead-letter topic: up to the first event cut short (by
//! a stop or a lapsed lease), else the batch's end. A crash or hand-over in
//! between redelivers the rest of that batch, events of other keys already
//! handled included, which is why handlers are idempotent on the event id.
//! A failed delivery is retried with backoff, then dead-lettered. A
//! handler's deadline starts once it has an instance slot; a delivery that
//! found none free for a whole deadline ran no handler and waits again,
//! without counting an attempt.
//!
//! Keys in parallel rather than one event at a time: a partition's events
//! mostly belong to different keys (an order each, in the shop), and one at
//! a time a subscriber could not keep up with its publishers under load. A
//! checkout run's saga fell seconds behind while orders were being placed,
//! each event waiting for the one before it to finish its storage calls. A
//! slow or failing key now holds up its own events and the next batch,
//! not the events beside it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::{stream, StreamExt};
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use super::{
    Broker, Envelope, ATTEMPTS_HEADER, DEAD_LETTER_PREFIX, ERROR_HEADER, ORIGINAL_TOPIC_HEADER,
};
use crate::bindings::messaging::Message;
use crate::coordination::{
    subscriptions as subscriptions_of, Claim, Commit, Coordinator, HEARTBEAT,
};
use crate::metrics::DeliveryMetrics;
use crate::plugins::{Durability, RetryPolicy};
use crate::telemetry;

/// Hands a message to a component's `subscriber` export.
#[async_trait]
pub trait Deliver: Send + Sync {
    /// Once `stop` turns true, a delivery still waiting for an instance
    /// slot gives up (`Busy`: nothing of it ran); one whose handler runs
    /// goes on. A `stop` whose sender is gone never stops it.
    async fn deliver(
        &self,
        component: &str,
        message: Message,
        stop: watch::Receiver<bool>,
    ) -> Result<(), Undelivered>;
}

/// Why a message was not handled.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Undelivered {
    /// Its handler ran and failed: it returned an error, trapped, or ran
    /// out of time or memory; or no version of it serves. One attempt of
    /// the subscriber's retry policy.
    #[error("{0}")]
    Failed(String),
    /// No handler ran: every instance slot of the subscriber stayed taken
    /// for a whole deadline, or the consumer was told to stop while it
    /// waited. Not an attempt: a subscriber whose slots its HTTP traffic
    /// keeps busy must not dead-letter events it never saw.
    #[error("{0}")]
    Busy(String),
}

/// Events fetched per read, and so at most redelivered after a crash.
const BATCH: usize = 64;
/// Keys handled at once per subscriber on this host, over all its
/// partitions and topics: enough to keep its events moving while each
/// waits on storage or the broker, and few enough that its deliveries take
/// a quarter of its instance slots at most (`limits.max_concurrency`, 64
/// by default), however many distinct keys a publisher floods it with, so
/// its HTTP requests still find slots.
const KEYS_IN_PARALLEL: usize = 16;
/// The longest wait between retries of a failed delivery.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The wait before trying a failed broker or coordination call again, or a
/// delivery that found no instance slot.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// How often an idle consumer re-reads its offset, to see a rewind.
const IDLE_OFFSET_CHECK: Duration = Duration::from_secs(1);
/// How often the partitions of subscribed topics are counted again.
const PARTITIONS_REFRESH: Duration = Duration::from_secs(10);
/// The most of a handler's error a dead letter keeps: brokers bound a
/// record's size, and a dead letter must always fit.
const MAX_ERROR_BYTES: usize = 4096;
/// How long a stopping host waits for its consumers to finish the events in
/// hand before giving their leases back anyway.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A component subscribed to a topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    pub component: String,
    pub topic: String,
    pub retry: RetryPolicy,
}

/// Until when this host's leases are surely its own, by its own clock.
#[derive(Default)]
struct LeaseClock(Mutex<Option<Instant>>);

impl LeaseClock {
    fn valid(&self) -> bool {
        self.until().is_some_and(|until| Instant::now() < until)
    }

    fn until(&self) -> Option<Instant> {
        *self.0.lock().unwrap()
    }

    /// After a heartbeat that began at `began`: the server's expiry counts
    /// from later than that, and a heartbeat of margin is kept.
    fn renewed(&self, began: Instant, lease: Duration) {
        let until = lease
            .checked_sub(HEARTBEAT)
            .and_then(|ahead| began.checked_add(ahead))
            // A lease that never runs out (one host alone).
            .unwrap_or_else(|| began + Duration::from_secs(100 * 365 * 24 * 3600));
        *self.0.lock().unwrap() = Some(until);
    }
}

/// The host's delivery; dropping it stops everything at once (use
/// [`Supervisor::stopped`] to stop gracefully).
pub struct Supervisor {
    subscriptions: watch::Sender<Vec<Subscription>>,
    task: JoinHandle<()>,
}

impl Supervisor {
    pub fn start(
        broker: Arc<dyn Broker>,
        coordinator: Arc<dyn Coordinator>,
        deliver: Arc<dyn Deliver>,
        subscriptions: Vec<Subscription>,
        stop: watch::Receiver<bool>,
    ) -> Supervisor {
        let (sender, wanted) = watch::channel(subscriptions);
        let shared = Arc::new(Shared {
            broker,
            coordinator,
            deliver,
            clock: LeaseClock::default(),
            in_parallel: Mutex::default(),
        });
        let task = tokio::spawn(supervise(shared, wanted, stop));
        Supervisor {
            subscriptions: sender,
            task,
        }
    }

    /// Consumes these subscriptions from now on.
    pub fn set(&self, subscriptions: Vec<Subscription>) {
        self.subscriptions.send_replace(subscriptions);
    }

    /// Waits for the supervisor to stop (after the host's stop signal): its
    /// consumers finish the events in hand and the leases are given back.
    pub async fn stopped(mut self) {
        let _ = (&mut self.task).await;
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the supervisor and its consumers share.
struct Shared {
    broker: Arc<dyn Broker>,
    coordinator: Arc<dyn Coordinator>,
    deliver: Arc<dyn Deliver>,
    clock: LeaseClock,
    /// Per subscriber, the keys its consumers may handle at once, shared
    /// by all its partitions and topics (see [`KEYS_IN_PARALLEL`]).
    in_parallel: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Shared {
    fn in_parallel(&self, subscriber: &str) -> Arc<Semaphore> {
        self.in_parallel
            .lock()
            .unwrap()
            .entry(subscriber.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(KEYS_IN_PARALLEL)))
            .clone()
    }
}

/// A consumer task and how to stop it.
struct Running {
    retry: RetryPolicy,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        // Aborting mid-delivery is safe: the offset was not committed, so
        // the event is delivered again by whoever consumes next.
        self.task.abort();
    }
}

async fn supervise(
    shared: Arc<Shared>,
    mut wanted: watch::Receiver<Vec<Subscription>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut running: HashMap<Claim, Running> = HashMap::new();
    // Consumers asked to stop, whose leases go back once they have.
    let mut stopping: Vec<(Claim, Running)> = Vec::new();
    let mut partitions: HashMap<String, (u32, Instant)> = HashMap::new();
    loop {
        let subscriptions = wanted.borrow_and_update().clone();
        count_partitions(&*shared.broker, &subscriptions, &mut partitions).await;
        let mut claims = Vec::new();
        for sub in &subscriptions {
            let count = partitions.get(&sub.topic).map_or(0, |(n, _)| *n);
            claims.extend((0..count).map(|partition| Claim {
                subscriber: sub.component.clone(),
                topic: sub.topic.clone(),
                partition,
            }));
        }
        let retry_of = |claim: &Claim| {
            subscriptions
                .iter()
                .find(|s| s.component == claim.subscriber && s.topic == claim.topic)
                .map(|s| s.retry)
        };

        // Stopped consumers give their leases back.
        let mut finished = Vec::new();
        stopping.retain(|(claim, consumer)| {
            let done = consumer.task.is_finished();
            if done {
                finished.push(claim.clone());
            }
            !done
        });
        let began = Instant::now();
        match shared.coordinator.heartbeat(&claims).await {
            Ok(leases) => {
                let held: HashSet<&Claim> = leases.held.iter().collect();
                // Keep at most each subscription's share of its partitions:
                // those running first, so that a rebalance moves as little
                // as it can.
                let mut kept: HashSet<Claim> = HashSet::new();
                for (subscription, group) in subscriptions_of(&claims) {
                    let mut mine: Vec<&Claim> = group
                        .iter()
                        .copied()
                        .filter(|c| held.contains(c) && running.contains_key(*c))
                        .collect();
                    mine.extend(
                        group
                            .iter()
                            .copied()
                            .filter(|c| held.contains(c) && !running.contains_key(*c)),
                    );
                    let share = leases.shares.get(&subscription).copied().unwrap_or(0);
                    kept.extend(mine.into_iter().take(share).cloned());
                }
                // Stop what is no longer ours or wanted, or runs an old retry policy.
                let stale: Vec<Claim> = running
                    .iter()
                    .filter(|(claim, consumer)| {
                        !kept.contains(*claim) || retry_of(claim) != Some(consumer.retry)
                    })
                    .map(|(claim, _)| claim.clone())
                    .collect();
                for claim in stale {
                    let consumer = running.remove(&claim).unwrap();
                    consumer.stop.send_replace(true);
                    stopping.push((claim, consumer));
                }
                // Only now: a consumer told to stop must not see its lease
                // renewed first and start another event.
                shared.clock.renewed(began, shared.coordinator.lease_time());
                // Leases held but neither kept nor still stopping go back.
                let give_back: Vec<Claim> = leases
                    .held
                    .iter()
                    .filter(|c| !stopping.iter().any(|(s, _)| s == *c))
                    .cloned()
                    .chain(finished)
                    .filter(|c| !kept.contains(c))
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                if let Err(e) = shared.coordinator.release(&give_back).await {
                    tracing::warn!(error = %format!("{e:#}"), "giving leases back failed; they expire instead");
                }
                for claim in kept {
                    let stopping_now = stopping.iter().any(|(s, _)| *s == claim);
                    let alive = running.get(&claim).is_some_and(|c| !c.task.is_finished());
                    if stopping_now || alive {
                        continue;
                    }
                    let retry = retry_of(&claim).expect("kept claims are wanted");
                    running.insert(claim.clone(), Consumer::start(shared.clone(), claim, retry));
                }
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "coordination heartbeat failed; consumers pause when their leases would run out");
            }
        }

        tokio::select! {
            _ = tokio::time::sleep(HEARTBEAT) => {}
            _ = wanted.changed() => {}
            _ = stop.changed() => break,
        }
    }

    // Stopping: every consumer finishes the event in hand, then the leases
    // go back, so other hosts take over at once.
    for consumer in running.values() {
        consumer.stop.send_replace(true);
    }
    stopping.extend(running.drain());
    let finish =
        futures_util::future::join_all(stopping.iter_mut().map(|(_, consumer)| &mut consumer.task));
    if tokio::time::timeout(STOP_GRACE, finish).await.is_err() {
        tracing::warn!("consumers did not finish in time; their events are delivered again");
    }
    drop(stopping);
    if let Err(e) = shared.coordinator.leave().await {
        tracing::warn!(error = %format!("{e:#}"), "giving leases back failed; they expire instead");
    }
}

/// Counts the partitions of subscribed topics not counted for
/// [`PARTITIONS_REFRESH`], all at once and each within a heartbeat, so an
/// unreachable broker cannot hold up the heartbeat. A topic that cannot be
/// counted keeps its last count (or has none yet) and is tried again at
/// the next refresh (the next heartbeat, if it has none).
async fn count_partitions(
    broker: &dyn Broker,
    subscriptions: &[Subscription],
    partitions: &mut HashMap<String, (u32, Instant)>,
) {
    let mut due: Vec<&str> = subscriptions
        .iter()
        .map(|s| s.topic.as_str())
        .filter(|topic| {
            partitions
                .get(*topic)
                .is_none_or(|(_, at)| at.elapsed() >= PARTITIONS_REFRESH)
        })
        .collect();
    due.sort_unstable();
    due.dedup();
    let counted = futures_util::future::join_all(due.into_iter().map(|topic| async move {
        (
            topic,
            tokio::time::timeout(HEARTBEAT, broker.partitions(topic)).await,
        )
    }))
    .await;
    for (topic, counted) in counted {
        match counted {
            Ok(Ok(n)) => {
                partitions.insert(topic.to_owned(), (n, Instant::now()));
            }
            failed => {
                let error = match failed {
                    Ok(Err(e)) => format!("{e:#}"),
                    _ => format!("no answer within {HEARTBEAT:?}"),
                };
                tracing::warn!(%topic, %error, "counting partitions failed; retrying");
                if let Some((_, at)) = partitions.get_mut(topic) {
                    *at = Instant::now();
                }
            }
        }
    }
}

/// One partition's consumer.
struct Consumer {
    shared: Arc<Shared>,
    claim: Claim,
    retry: RetryPolicy,
    stop: watch::Receiver<bool>,
    metrics: DeliveryMetrics,
    /// Its subscriber's keys in parallel, shared with its other consumers.
    in_parallel: Arc<Semaphore>,
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn truncated(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Whether to go on, after a wait that a stop can cut short.
async fn pause(stop: &mut watch::Receiver<bool>, wait: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait) => !*stop.borrow(),
        _ = stop.changed() => false,
    }
}

impl Consumer {
    fn start(shared: Arc<Shared>, claim: Claim, retry: RetryPolicy) -> Running {
        let (stop_sender, stop) = watch::channel(false);
        let consumer = Consumer {
            metrics: DeliveryMetrics::new(&claim.subscriber, &claim.topic),
            in_parallel: shared.in_parallel(&claim.subscriber),
            shared,
            claim,
            retry,
            stop,
        };
        Running {
            retry,
            stop: stop_sender,
            task: tokio::spawn(consumer.run()),
        }
    }

    fn warn(&self, what: &str, error: &anyhow::Error) {
        tracing::warn!(component = %self.claim.subscriber, topic = %self.claim.topic, partition = self.claim.partition, error = %format!("{error:#}"), "{what} failed; retrying");
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// `call`, again after a pause until it succeeds; `None` if the
    /// consumer is stopped first.
    async fn retried<T, Fut>(&self, what: &str, mut call: impl FnMut() -> Fut) -> Option<T>
    where
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        let mut stop = self.stop.clone();
        loop {
            match call().await {
                Ok(value) => return Some(value),
                Err(e) => self.warn(what, &e),
            }
            if !pause(&mut stop, RETRY_PAUSE).await {
                return None;
            }
        }
    }

    /// The committed offset, retried until read (or stopped).
    async fn committed(&self) -> Option<u64> {
        let (shared, claim) = (self.shared.clone(), self.claim.clone());
        self.retried("reading the offset", || {
            shared.coordinator.committed(&claim)
        })
        .await
    }

    async fn run(mut self) {
        let Some(mut next) = self.committed().await else {
            return;
        };
        let mut offset_read = Instant::now();
        let (topic, partition) = (self.claim.topic.clone(), self.claim.partition);
        while !self.stopped() {
            if !self.shared.clock.valid() {
                if !pause(&mut self.stop, RETRY_PAUSE).await {
                    return;
                }
                continue;
            }
            let fetch_began = Instant::now();
            let fetched = tokio::select! {
                fetched = self.shared.broker.fetch(&topic, partition, next, BATCH, true) => fetched,
                _ = self.stop.changed() => return,
            };
            let batch = match fetched {
                Ok(batch) => batch,
                Err(e) => {
                    self.warn("reading events", &e);
                    if !pause(&mut self.stop, RETRY_PAUSE).await {
                        return;
                    }
                    continue;
                }
            };
            if batch.is_empty() {
                // A broker that answered at once without waiting (an error
                // it reports as nothing): no busy loop.
                if fetch_began.elapsed() < Duration::from_millis(5)
                    && !pause(&mut self.stop, Duration::from_millis(100)).await
                {
                    return;
                }
                if offset_read.elapsed() >= IDLE_OFFSET_CHECK {
                    let Some(committed) = self.committed().await else {
                        return;
                    };
                    next = committed;
                    offset_read = Instant::now();
                }
                continue;
            }
            let handled = self.handle_batch(batch, next).await;
            if handled == next {
                continue;
            }
            // Committed even when stopping: the next holder starts after it.
            loop {
                match self
                    .shared
                    .coordinator
                    .commit(&self.claim, next, handled)
                    .await
                {
                    Ok(Commit::Done) => {
                        next = handled;
                        break;
                    }
                    Ok(Commit::Moved(to)) => {
                        tracing::info!(component = %self.claim.subscriber, topic = %topic, partition, to, "offset moved (rewound); going on from there");
                        next = to;
                        break;
                    }
                    Ok(Commit::Lost) => {
                        tracing::info!(component = %self.claim.subscriber, topic = %topic, partition, "lease taken over by another host");
                        return;
                    }
                    Err(e) => self.warn("committing the offset", &e),
                }
                // Not waiting on the stop signal: what was handled should
                // be committed; a host stopping bounds this by its grace.
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            offset_read = Instant::now();
        }
    }

    /// Handles a batch read from `from`, keys in parallel and each key's
    /// events in order; returns the offset up to which every event is done
    /// with: the batch's end, or the first event cut short.
    async fn handle_batch(&self, batch: Vec<(u64, Envelope)>, from: u64) -> u64 {
        let end = batch.last().map_or(from, |(offset, _)| offset + 1);
        let mut keys: Vec<Vec<(u64, Envelope)>> = Vec::new();
        let mut of_key: HashMap<String, usize> = HashMap::new();
        for (offset, event) in batch {
            let at = match &event.key {
                Some(key) => *of_key.entry(key.clone()).or_insert_with(|| {
                    keys.push(Vec::new());
                    keys.len() - 1
                }),
                None => {
                    keys.push(Vec::new());
                    keys.len() - 1
                }
            };
            keys[at].push((offset, event));
        }
        stream::iter(keys)
            .map(|events| self.handle_in_order(events))
            .buffer_unordered(KEYS_IN_PARALLEL)
            .fold(end, |handled, cut| async move {
                cut.map_or(handled, |at| handled.min(at))
            })
            .await
    }

    /// One key's events, one after the other; the offset of the first not
    /// done with, if any.
    async fn handle_in_order(&self, events: Vec<(u64, Envelope)>) -> Option<u64> {
        let _slot = self.in_parallel.acquire().await.expect("never closed");
        for (offset, event) in events {
            if self.stopped() || !self.shared.clock.valid() || !self.handle(event).await {
                return Some(offset);
            }
        }
        None
    }

    /// Delivers with retries; dead-letters the event when they run out.
    /// False when stopped before the event was done with.
    async fn handle(&self, event: Envelope) -> bool {
        let mut stop = self.stop.clone();
        let mut backoff = Duration::from_millis(self.retry.backoff_ms);
        let mut last_error = String::new();
        let component = self.claim.subscriber.clone();
        let published_in = telemetry::from_pairs(&event.headers);
        let mut attempt = 1;
        while attempt <= self.retry.max_attempts {
            // Each attempt a span, a child of the publisher's; the
            // subscriber sees it as its parent.
            let trace = telemetry::child(&published_in, SpanKind::Consumer, || {
                (
                    format!("{} process", event.topic),
                    vec![
                        KeyValue::new("messaging.operation.type", "process"),
                        KeyValue::new("messaging.destination.name", event.topic.clone()),
                        KeyValue::new(
                            "messaging.destination.partition.id",
                            self.claim.partition.to_string(),
                        ),
                        KeyValue::new("messaging.message.id", event.id.clone()),
                        KeyValue::new("agora.component", component.clone()),
                        KeyValue::new("agora.attempt", i64::from(attempt)),
                    ],
                )
            });
            let mut headers: Vec<(String, String)> = event
                .headers
                .iter()
                .filter(|(name, _)| name != "traceparent" && name != "tracestate")
                .cloned()
                .collect();
            telemetry::inject_pairs(&trace, &mut headers);
            let message = Message {
                id: event.id.clone(),
                topic: event.topic.clone(),
                key: event.key.clone(),
                payload: event.payload.clone(),
                headers,
                published_at: event.published_at,
                attempt,
            };
            // Within the lease only: a handler still running when this
            // host's lease could have passed to another host is cut short
            // (and its event delivered again there), so two hosts never
            // handle one partition at once. The lease is read again as
            // heartbeats renew it, so only a lapse cuts a handler, never
            // its own deadline.
            let delivery = self
                .shared
                .deliver
                .deliver(&component, message, self.stop.clone());
            tokio::pin!(delivery);
            let delivered = loop {
                let until = self.shared.clock.until().filter(|u| Instant::now() < *u);
                // Read after the clock: the supervisor stops, then renews.
                let (Some(until), false) = (until, self.stopped()) else {
                    break None;
                };
                tokio::select! {
                    delivered = &mut delivery => break Some(delivered),
                    _ = tokio::time::sleep_until(until.into()) => {}
                }
            };
            let Some(delivered) = delivered else {
                tracing::warn!(%component, topic = %event.topic, event = %event.id, "delivery cut short: this host's lease lapsed, or it was told to stop");
                telemetry::end(&trace, Some("cut short"));
                return false;
            };
            let error = delivered.as_ref().err().map(ToString::to_string);
            telemetry::end(&trace, error.as_deref());
            match delivered {
                Ok(()) => {
                    self.metrics.delivered.inc();
                    return true;
                }
                Err(Undelivered::Busy(e)) => {
                    if self.stopped() {
                        return false;
                    }
                    self.metrics.waited.inc();
                    tracing::warn!(%component, topic = %event.topic, event = %event.id, attempt, error = %e, "delivery waited for an instance slot until its deadline; waiting again");
                    if !pause(&mut stop, RETRY_PAUSE).await {
                        return false;
                    }
                    continue;
                }
                Err(Undelivered::Failed(e)) => {
                    tracing::warn!(%component, topic = %event.topic, event = %event.id, attempt, error = %e, "delivery failed");
                    last_error = e;
                }
            }
            if attempt < self.retry.max_attempts {
                self.metrics.retried.inc();
                if !pause(&mut stop, backoff).await {
                    return false;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            attempt += 1;
        }
        let mut dead = event.clone();
        dead.topic = format!("{DEAD_LETTER_PREFIX}{component}");
        dead.headers.extend([
            (ORIGINAL_TOPIC_HEADER.to_owned(), event.topic.clone()),
            (
                ERROR_HEADER.to_owned(),
                truncated(last_error, MAX_ERROR_BYTES),
            ),
            (
                ATTEMPTS_HEADER.to_owned(),
                self.retry.max_attempts.to_string(),
            ),
        ]);
        tracing::error!(%component, topic = %event.topic, event = %event.id, dead_letter = %dead.topic, "event dead-lettered");
        // Rare, and the offset moves past the event next: its only copy
        // must survive a machine crash first.
        let shared = self.shared.clone();
        let stored = self
            .retried("dead-lettering", || {
                shared
                    .broker
                    .append(std::slice::from_ref(&dead), Durability::MachineCrash)
            })
            .await
            .is_some();
        if stored {
            self.metrics.dead_lettered.inc();
        }
        stored
    }
}
