//! `agora:platform/messaging`: publish events, deliver them to subscribers.
//!
//! Guarantees, whatever the backend:
//! - `publish` returns once the event is durable in the broker (per the
//!   broker's `durability` setting);
//! - `publish-in` writes the event into the component's own database inside
//!   its transaction (the outbox); a relay moves committed events to the
//!   broker as soon as the commit wakes it, and on a timer for anything a
//!   crash or a broker outage left behind;
//! - one component's events leave in the order it published them, outbox
//!   and direct alike: a direct `publish` first relays the outbox events
//!   committed before it, under the same per-component lock as the relay
//!   (without taking the component's write connection, which its own open
//!   transaction may hold);
//! - the relay re-checks every outbox event, whatever wrote the row, against
//!   the `publishes` of the component's versions that served since the host
//!   started: an event none of them was granted, or a row that is not an
//!   event, is set aside (`_agora_outbox_rejected` in the component's
//!   database) with a logged reason, and the events after it flow on. A
//!   version's grants join before it serves and stay until a restart, so
//!   an event a serving version committed under its grant leaves whatever
//!   swap or rollback follows (see [`MessagingCapability::grant`]);
//! - across a machine crash, an event leaves the outbox only once the
//!   transaction that wrote it is on disk ([`Database::sync`]), and its row
//!   is removed only once the broker's copy is (the relay's appends survive
//!   a machine crash whatever the setting): the crash can duplicate an
//!   event, never lose one or deliver one whose transaction it undid;
//! - each subscriber gets each event at least once, in order per key
//!   (different keys of a partition in parallel, see `delivery.rs`), its
//!   progress committed only after its handler returned ok; failures are
//!   retried with exponential backoff, then the event moves to
//!   `dead-letter.<component>` with the error in its headers.
//!
//! Backends implement [`Broker`]: an append-only log of partitioned topics,
//! the model Kafka has. Which host consumes which partition, and how far
//! each subscriber got, is coordination's (`coordination/`), so a broker
//! without consumer groups (rskafka) fits, and several hosts share the work.
//! Nothing waits on an in-process signal from a publisher: consumers fetch
//! with a long wait, as a Kafka consumer does, so an event appended by any
//! host reaches them (see `delivery.rs`).

#[cfg(test)]
mod contract;
mod delivery;
mod embedded;
mod kafka;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Result};
use async_trait::async_trait;
use opentelemetry::Context;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use crate::bindings::messaging::{self as wit, Error, OutgoingMessage};
use crate::capability::{Capability, CapabilityView};
use crate::coordination::{self, Claim, Coordinator};
use crate::metrics::PoolUse;
use crate::outbox;
use crate::plugins::{BackendKind, BackendRegistry, ComponentSpec, Durability, Grant, RetryPolicy};
use crate::state::InstanceState;
use crate::storage::{Database, TransactionHandle};
use crate::telemetry;

pub use delivery::{Deliver, Undelivered};
pub use embedded::{EmbeddedConfig, EmbeddedLog};
pub use kafka::KafkaConfig;

/// Every messaging backend, by the `kind` that chooses it in `[backends.messaging]`.
const BACKENDS: &[BackendKind<dyn MessagingSettings>] = &[embedded::KIND, kafka::KIND];

/// A messaging backend's settings from `[backends.messaging]`, which start it.
#[async_trait]
pub trait MessagingSettings: std::fmt::Debug + Send + Sync {
    /// Whether the backend runs inside the host, needing no server (and
    /// so serves this host alone).
    fn embedded(&self) -> bool;
    /// `data_dir` is the host's data directory, for embedded backends.
    async fn start(&self, data_dir: &Path) -> Result<Arc<dyn Broker>>;
}

/// `[backends.messaging]`: the `embedded` log by default, which needs no server.
pub type BackendConfig = crate::plugins::BackendConfig<dyn MessagingSettings>;

impl BackendRegistry for dyn MessagingSettings {
    const CAPABILITY: &'static str = "messaging";
    fn kinds() -> &'static [BackendKind<Self>] {
        BACKENDS
    }
    fn default_settings() -> Arc<Self> {
        Arc::new(EmbeddedConfig::default())
    }
}

/// How far a subscriber got in one partition of a topic.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    pub partition: u32,
    /// The offset it handles next.
    pub next: u64,
    /// The offset the partition's next event will get.
    pub end: u64,
    /// Events not yet handled. Not `end - next`: the embedded log numbers
    /// events across all topics and partitions.
    pub lag: u64,
}

/// An event as stored and relayed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Envelope {
    pub id: String,
    pub topic: String,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
    /// Milliseconds since the Unix epoch.
    pub published_at: u64,
}

impl Envelope {
    /// What counts towards [`MAX_EVENT_BYTES`]: payload, key and headers.
    pub fn size(&self) -> usize {
        self.payload.len()
            + self.key.as_ref().map_or(0, String::len)
            + self
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len())
                .sum::<usize>()
    }
}

/// The largest event (payload, key and headers) a component may publish:
/// under what a Kafka broker accepts in one record by default (1 MiB), with
/// room for the envelope and a dead letter's headers.
pub const MAX_EVENT_BYTES: usize = 256 << 10;

/// Header names the platform writes itself (the envelope's fields on Kafka,
/// a dead letter's error); components may not set them.
pub const RESERVED_HEADER_PREFIX: &str = "agora-";

/// A log of partitioned topics. Offsets increase within a partition.
#[async_trait]
pub trait Broker: Send + Sync {
    /// The partitions of `topic`, creating it with the configured number
    /// if it is missing. Asked again, it sees a topic that grew.
    async fn partitions(&self, topic: &str) -> Result<u32>;
    /// Appends events, each to the partition [`partition_of`] picks;
    /// returns once they survive what the backend promises, and a machine
    /// crash if `at_least` asks for it.
    async fn append(&self, events: &[Envelope], at_least: Durability) -> Result<()>;
    /// Up to `max` events of one partition from offset `from` on. With
    /// `wait`, a fetch that finds none waits for one, up to the backend's
    /// maximum wait (a long fetch), then returns what it has.
    async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
        wait: bool,
    ) -> Result<Vec<(u64, Envelope)>>;
    /// The offset the next event of a partition will get.
    async fn end(&self, topic: &str, partition: u32) -> Result<u64>;
    /// How many events of a partition are at offset `from` or after: the
    /// end less `from` where a partition's offsets are dense (Kafka's).
    async fn behind(&self, topic: &str, partition: u32, from: u64) -> Result<u64> {
        Ok(self.end(topic, partition).await?.saturating_sub(from))
    }
    async fn ping(&self) -> Result<()>;
}

/// The partition of `event` among `partitions`: by its key as Kafka's own
/// clients place keyed records (murmur2, positive, modulo), so other Kafka
/// producers and consumers agree; an event without a key by its id.
pub fn partition_of(event: &Envelope, partitions: u32) -> u32 {
    let key = event.key.as_deref().unwrap_or(&event.id);
    (murmur2(key.as_bytes()) & 0x7fff_ffff) as u32 % partitions.max(1)
}

/// Kafka's `Utils.murmur2`: MurmurHash2, 32 bits, seed 0x9747b28c.
fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes(chunk.try_into().unwrap());
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= (tail[2] as u32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as u32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The prefix of the topic a subscriber's failed events go to.
pub const DEAD_LETTER_PREFIX: &str = "dead-letter.";
/// A dead letter's headers, beside the event's own: the topic it was
/// published to, the last attempt's error, and how many attempts failed.
pub const ORIGINAL_TOPIC_HEADER: &str = "agora-original-topic";
pub const ERROR_HEADER: &str = "agora-error";
pub const ATTEMPTS_HEADER: &str = "agora-attempts";

pub struct MessagingCapability {
    broker: Arc<dyn Broker>,
    coordinator: Arc<dyn Coordinator>,
    /// The outbox relay of each component with messaging.
    relays: Mutex<HashMap<String, Arc<outbox::Relay>>>,
    /// Started by the first [`Self::sync_subscriptions`].
    delivery: Mutex<Option<delivery::Supervisor>>,
    stop: watch::Sender<bool>,
}

/// A component's handle to messaging.
pub struct Publisher {
    publishes: Vec<String>,
    broker: Arc<dyn Broker>,
    coordinator: Arc<dyn Coordinator>,
    relay: Arc<outbox::Relay>,
}

impl MessagingCapability {
    pub async fn init(
        config: &BackendConfig,
        coordination: &coordination::BackendConfig,
        data_dir: &Path,
    ) -> Result<Self> {
        if config.embedded() && !coordination.embedded() {
            bail!(
                "[backends.messaging]: the embedded log serves one host, but \
                 [backends.coordination] shares the work among several: use a shared \
                 broker (`kind = \"kafka\"`) or local coordination"
            );
        }
        Ok(MessagingCapability {
            broker: config.start(data_dir).await?,
            coordinator: coordination.start(data_dir).await?,
            relays: Mutex::default(),
            delivery: Mutex::default(),
            stop: watch::channel(false).0,
        })
    }

    /// The relay of a component, made on its first version with that
    /// version's grants.
    fn relay(&self, component: &str, publishes: &[String]) -> Arc<outbox::Relay> {
        let mut relays = self.relays.lock().unwrap();
        let relay = relays
            .entry(component.to_owned())
            .or_insert_with(|| Arc::new(outbox::Relay::new(component, publishes)));
        relay.clone()
    }

    /// Starts the outbox relay of a component (once; later versions share
    /// it). Called after the component's messaging is configured.
    pub fn relay_outbox(&self, component: &str, db: Arc<dyn Database>) {
        let Some(relay) = self.relays.lock().unwrap().get(component).cloned() else {
            tracing::error!(%component, "no relay: messaging is not configured for it");
            return;
        };
        relay.start(
            db,
            self.broker.clone(),
            self.coordinator.clone(),
            self.stop.subscribe(),
        );
    }

    /// Adds the `publishes` of versions about to serve to what their
    /// components' relays let leave. Called before the swap: a new version's
    /// first `publish-in` can commit as soon as it serves, and must find its
    /// grant. Never narrowed while the host runs: after a rollback, or a
    /// reload that dropped a topic, the events a version committed under its
    /// grant (acknowledged to it) still leave; new ones are refused at once
    /// by `publish-in`, which checks the serving version's own grant.
    ///
    /// Why a union and not a per-row record of the version that wrote it:
    /// `publish-in` checks the grant as it writes, and the storage sandbox
    /// keeps components out of `_agora_outbox`, so the relay's re-check only
    /// guards rows that got there past both (a bug, a hand edit); a row of
    /// that kind could name any version, so the record would bound nothing
    /// the union does not, and the outbox's format would have to change. A
    /// restart narrows the grants to the serving versions'.
    pub fn grant<'a>(&self, serving: impl IntoIterator<Item = (&'a str, &'a [String])>) {
        let relays = self.relays.lock().unwrap();
        for (component, publishes) in serving {
            if let Some(relay) = relays.get(component) {
                relay.grant(publishes);
            }
        }
    }

    /// Consumes exactly the wanted subscriptions ((component, topic,
    /// retry policy)): this host's share of their partitions.
    pub fn sync_subscriptions(
        &self,
        deliver: Arc<dyn Deliver>,
        wanted: &[(String, String, RetryPolicy)],
    ) {
        let subscriptions = wanted
            .iter()
            .map(|(component, topic, retry)| delivery::Subscription {
                component: component.clone(),
                topic: topic.clone(),
                retry: *retry,
            })
            .collect();
        let mut supervisor = self.delivery.lock().unwrap();
        match &*supervisor {
            Some(running) => running.set(subscriptions),
            None => {
                *supervisor = Some(delivery::Supervisor::start(
                    self.broker.clone(),
                    self.coordinator.clone(),
                    deliver,
                    subscriptions,
                    self.stop.subscribe(),
                ))
            }
        }
    }

    fn claim(component: &str, topic: &str, partition: u32) -> Claim {
        Claim {
            subscriber: component.to_owned(),
            topic: topic.to_owned(),
            partition,
        }
    }

    /// Moves a subscriber back to offset `to` on every partition of a topic,
    /// so it handles those events again (after fixing a handler, say). Its
    /// consumers notice at their next commit, or within a second when idle.
    pub async fn rewind(&self, component: &str, topic: &str, to: u64) -> Result<()> {
        for partition in 0..self.broker.partitions(topic).await? {
            self.coordinator
                .rewind(&Self::claim(component, topic, partition), to)
                .await?;
        }
        Ok(())
    }

    /// Coordination's connection pools' use, for the metrics.
    pub fn pools(&self) -> Vec<PoolUse> {
        self.coordinator.pools()
    }

    /// Where a subscriber stands on each partition: (partition, next offset
    /// it will handle, end of the partition). Caught up when next >= end.
    pub async fn progress(&self, component: &str, topic: &str) -> Result<Vec<Progress>> {
        let mut partitions = Vec::new();
        for partition in 0..self.broker.partitions(topic).await? {
            let claim = Self::claim(component, topic, partition);
            let next = self.coordinator.committed(&claim).await?;
            partitions.push(Progress {
                partition,
                next,
                end: self.broker.end(topic, partition).await?,
                lag: self.broker.behind(topic, partition, next).await?,
            });
        }
        Ok(partitions)
    }

    /// Up to `max` events of each partition of a topic from offset `from`
    /// on, as (partition, offset, event): how an operator inspects a
    /// dead-letter topic.
    pub async fn read_topic(
        &self,
        topic: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u32, u64, Envelope)>> {
        self.read_partitions(topic, Some(from), max).await
    }

    /// The last `max` events of each partition of a topic, as (partition,
    /// offset, event).
    pub async fn read_latest(&self, topic: &str, max: usize) -> Result<Vec<(u32, u64, Envelope)>> {
        self.read_partitions(topic, None, max).await
    }

    /// Up to `max` events of each partition, from offset `from`, or (None)
    /// from `max` before each partition's end.
    async fn read_partitions(
        &self,
        topic: &str,
        from: Option<u64>,
        max: usize,
    ) -> Result<Vec<(u32, u64, Envelope)>> {
        let mut events = Vec::new();
        for partition in 0..self.broker.partitions(topic).await? {
            let from = match from {
                Some(from) => from,
                None => self
                    .broker
                    .end(topic, partition)
                    .await?
                    .saturating_sub(max as u64),
            };
            let read = self
                .broker
                .fetch(topic, partition, from, max, false)
                .await?;
            events.extend(read.into_iter().map(|(offset, e)| (partition, offset, e)));
        }
        Ok(events)
    }

    /// The event at `offset` of a topic's `partition`, if there is one.
    pub async fn read_event(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<Option<Envelope>> {
        if partition >= self.broker.partitions(topic).await? {
            return Ok(None);
        }
        let read = self
            .broker
            .fetch(topic, partition, offset, 1, false)
            .await?;
        Ok(read.into_iter().find(|(o, _)| *o == offset).map(|(_, e)| e))
    }
}

/// Whether `grants` (a component's `publishes`) let it publish to `topic`.
/// Dead-letter topics are the platform's: no grant, not even `*`, lets a
/// component write one (a forged dead letter could be replayed to its
/// subscriber from the console).
pub fn may_publish(grants: &[String], topic: &str) -> bool {
    !topic.starts_with(DEAD_LETTER_PREFIX) && grants.iter().any(|t| t == "*" || t == topic)
}

/// The longest topic name: Kafka's limit.
const MAX_TOPIC_CHARS: usize = 249;

/// Whether `topic` is a name every broker takes: Kafka's rule, 1 to 249 of
/// ASCII letters, digits, `.`, `_` and `-`.
fn check_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("the topic is empty".into());
    }
    if topic.len() > MAX_TOPIC_CHARS {
        return Err(format!(
            "the topic is longer than {MAX_TOPIC_CHARS} characters"
        ));
    }
    if let Some(bad) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "the topic has {bad:?}: topics are ASCII letters, digits, `.`, `_` and `-`"
        ));
    }
    Ok(())
}

#[async_trait]
impl Capability for MessagingCapability {
    const GRANT: Grant = Grant::Messaging;
    const INTERFACES: &'static [&'static str] = &["agora:platform/messaging"];
    type ComponentState = Publisher;

    fn add_to_linker(linker: &mut Linker<InstanceState>) -> Result<()> {
        Ok(wit::add_to_linker::<_, MessagingData>(linker, |s| {
            let caps = &*s.caps;
            MessagingView {
                publisher: CapabilityView::new(
                    caps.messaging.as_ref(),
                    Grant::Messaging,
                    &caps.name,
                ),
                db: caps.storage.as_ref().map(|s| &s.db),
                table: &mut s.table,
                trace: &s.trace,
            }
        })?)
    }

    async fn configure(&self, component: &str, spec: &ComponentSpec) -> Result<Publisher> {
        Ok(Publisher {
            publishes: spec.publishes.clone(),
            broker: self.broker.clone(),
            coordinator: self.coordinator.clone(),
            relay: self.relay(component, &spec.publishes),
        })
    }

    async fn ready(&self) -> Result<()> {
        self.broker.ping().await?;
        self.coordinator.ping().await
    }

    async fn shutdown(&self) {
        self.stop.send_replace(true);
        let supervisor = self.delivery.lock().unwrap().take();
        if let Some(supervisor) = supervisor {
            supervisor.stopped().await;
        }
    }
}

impl Publisher {
    /// The event to store for `message`, checked against the grants and
    /// limits, continuing the publisher's `trace`.
    fn envelope(&self, message: OutgoingMessage, trace: &Context) -> Result<Envelope, Error> {
        check_topic(&message.topic).map_err(Error::Invalid)?;
        if !may_publish(&self.publishes, &message.topic) {
            return Err(Error::TopicNotGranted(format!(
                "publishing to `{}` is not granted (see `publishes` in plugins.toml)",
                message.topic
            )));
        }
        check_headers(&message.headers).map_err(Error::Invalid)?;
        // The trace context counts towards the size: a client chooses its
        // `tracestate`.
        let mut headers = message.headers;
        telemetry::inject_pairs(trace, &mut headers);
        let event = Envelope {
            id: uuid::Uuid::new_v4().to_string(),
            topic: message.topic,
            key: message.key,
            payload: message.payload,
            headers,
            published_at: crate::now_millis(),
        };
        let size = event.size();
        if size > MAX_EVENT_BYTES {
            return Err(Error::Invalid(format!(
                "the event is {size} bytes; at most {MAX_EVENT_BYTES} (payload, key and headers)"
            )));
        }
        Ok(event)
    }
}

/// Headers travel as Kafka record headers, a map: a name may appear once,
/// and the platform's own names are not a component's to set.
fn check_headers(headers: &[(String, String)]) -> Result<(), String> {
    for (i, (name, _)) in headers.iter().enumerate() {
        if name.is_empty() {
            return Err(format!("header {i} has an empty name"));
        }
        if name
            .to_ascii_lowercase()
            .starts_with(RESERVED_HEADER_PREFIX)
        {
            return Err(format!(
                "header `{name}`: names starting with `{RESERVED_HEADER_PREFIX}` are the platform's"
            ));
        }
        if headers[..i].iter().any(|(earlier, _)| earlier == name) {
            return Err(format!("header `{name}` appears twice"));
        }
    }
    Ok(())
}

/// What messaging's host functions see of an instance: the component's
/// publisher; its database, if it has storage, because a direct publish
/// first relays the events committed to its outbox; and the instance's
/// resource table, to publish inside one of its open transactions.
pub struct MessagingView<'a> {
    publisher: CapabilityView<'a, Publisher>,
    db: Option<&'a Arc<dyn Database>>,
    table: &'a mut ResourceTable,
    /// The instance's span, which its events carry on.
    trace: &'a Context,
}

/// The [`HasData`] of a [`MessagingView`].
pub struct MessagingData;

impl HasData for MessagingData {
    type Data<'a> = MessagingView<'a>;
}

impl wit::Host for MessagingView<'_> {
    async fn publish(
        &mut self,
        message: OutgoingMessage,
    ) -> wasmtime::Result<Result<String, Error>> {
        let publisher = self.publisher.granted()?;
        let event = match publisher.envelope(message, self.trace) {
            Ok(event) => event,
            Err(e) => return Ok(Err(e)),
        };
        let appended = match self.db {
            // After the events this component committed to its outbox, so
            // that it cannot overtake them.
            Some(db) => publisher
                .relay
                .forward(
                    &**db,
                    &*publisher.broker,
                    &*publisher.coordinator,
                    Some(&event),
                )
                .await
                .map(|handled| {
                    if handled > 0 {
                        // The relay removes what this call moved.
                        publisher.relay.wake();
                    }
                }),
            None => {
                let event = std::slice::from_ref(&event);
                let appended = publisher
                    .broker
                    .append(event, Durability::ProcessCrash)
                    .await;
                if appended.is_ok() {
                    publisher.relay.count_published(event);
                }
                appended
            }
        };
        if let Err(e) = appended {
            return Ok(Err(Error::Unavailable(format!("{e:#}"))));
        }
        Ok(Ok(event.id))
    }

    async fn publish_in(
        &mut self,
        tx: Resource<TransactionHandle>,
        message: OutgoingMessage,
    ) -> wasmtime::Result<Result<String, Error>> {
        let event = match self.publisher.granted()?.envelope(message, self.trace) {
            Ok(event) => event,
            Err(e) => return Ok(Err(e)),
        };
        let record = match outbox::encode(&event) {
            Ok(record) => record,
            Err(e) => return Ok(Err(Error::Invalid(e))),
        };
        let wake = self.publisher.granted()?.relay.waker();
        let handle = self.table.get_mut(&tx)?;
        Ok(match handle.enqueue(&record, wake).await {
            Ok(()) => Ok(event.id),
            Err(e) => Err(Error::Unavailable(e.to_string())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{SqliteBackend, SqliteSettings, StorageBackend};
    use std::time::Duration;

    #[test]
    fn topics_are_names_every_broker_takes_and_dead_letters_are_the_platforms() {
        check_topic("order.created").unwrap();
        check_topic("a_b-c.9").unwrap();
        for bad in ["", "a b", "a/b", "\u{e9}t\u{e9}", &"x".repeat(250)] {
            assert!(check_topic(bad).is_err(), "{bad:?}");
        }
        let all = ["*".to_owned()];
        assert!(may_publish(&all, "order.created"));
        assert!(!may_publish(&all, "dead-letter.payments"));
        assert!(!may_publish(
            &["dead-letter.payments".to_owned()],
            "dead-letter.payments"
        ));
    }

    fn event(topic: &str) -> Envelope {
        Envelope {
            id: topic.into(),
            topic: topic.into(),
            key: None,
            payload: b"{}".to_vec(),
            headers: Vec::new(),
            published_at: 0,
        }
    }

    /// What the runtime does around a deploy and a rollback: the first
    /// version makes the relay; a new one that gained `t` is granted before
    /// it serves and commits an event to `t`; then the first version is
    /// back. The event still leaves (it was set aside when the relay held
    /// only the serving version's grants); one no version was granted does not.
    #[tokio::test]
    async fn an_event_a_serving_version_was_granted_leaves_after_a_rollback() {
        let dir = tempfile::TempDir::new().unwrap();
        let durability = Durability::ProcessCrash;
        let messaging = MessagingCapability::init(
            &BackendConfig::new(Arc::new(EmbeddedConfig {
                durability,
                partitions: 1,
            })),
            &coordination::BackendConfig::default(),
            dir.path(),
        )
        .await
        .unwrap();
        let settings = SqliteSettings {
            durability,
            max_size_mib: 64,
        };
        let storage = SqliteBackend::new(&dir.path().join("storage"), settings).unwrap();
        let db = storage.open("c", Duration::from_secs(10)).await.unwrap();
        let v1 = vec!["a".to_owned()];
        let v2 = vec!["a".to_owned(), "t".to_owned()];

        let relay = messaging.relay("c", &v1);
        messaging.grant([("c", v2.as_slice())]);
        let mut tx = db.begin().await.unwrap();
        for topic in ["t", "never-granted"] {
            let record = outbox::encode(&event(topic)).unwrap();
            tx.enqueue(&record).await.unwrap();
        }
        tx.commit().await.unwrap();
        messaging.grant([("c", v1.as_slice())]);

        let (broker, coordinator) = (&*messaging.broker, &*messaging.coordinator);
        assert_eq!(
            relay
                .forward(&*db, broker, coordinator, None)
                .await
                .unwrap(),
            2
        );
        let verdicts: Vec<_> = relay.handled.lock().await.values().cloned().collect();
        assert_eq!(verdicts[0], None);
        assert!(
            verdicts[1]
                .as_deref()
                .is_some_and(|r| r.contains("may not publish to `never-granted`")),
            "{verdicts:?}"
        );
        relay.settle(&*db).await.unwrap();
        let relayed = messaging.read_topic("t", 0, 10).await.unwrap();
        assert_eq!(relayed.len(), 1);
        assert_eq!(relayed[0].2, event("t"));
        assert!(messaging
            .read_topic("never-granted", 0, 10)
            .await
            .unwrap()
            .is_empty());
        assert!(db.outbox_pending(0, 10).await.unwrap().is_empty());
    }

    /// Kafka's own test vectors (`UtilsTest.testMurmur2`), so keys land on
    /// the partitions Kafka's clients would pick.
    #[test]
    fn murmur2_matches_kafka() {
        for (key, hash) in [
            (&b"21"[..], -973932308),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            (b"abc", 479470107),
        ] {
            assert_eq!(murmur2(key), hash, "{}", String::from_utf8_lossy(key));
        }
        let mut keyed = event("t");
        keyed.key = Some("foobar".into());
        // (-790332482 & 0x7fffffff) % 6 = 1357151166 % 6
        assert_eq!(partition_of(&keyed, 6), 1357151166 % 6);
    }

    /// A publish is checked before it is stored or sent: its grant, its
    /// headers, and its size (an event a broker would refuse for ever must
    /// not reach an outbox).
    #[tokio::test]
    async fn an_event_is_refused_before_it_leaves_when_it_breaks_a_rule() {
        let dir = tempfile::TempDir::new().unwrap();
        let messaging = MessagingCapability::init(
            &BackendConfig::default(),
            &coordination::BackendConfig::default(),
            dir.path(),
        )
        .await
        .unwrap();
        let publisher = Publisher {
            publishes: vec!["t".into()],
            broker: messaging.broker.clone(),
            coordinator: messaging.coordinator.clone(),
            relay: messaging.relay("c", &["t".into()]),
        };
        let message = |topic: &str, payload: usize, header: &str| OutgoingMessage {
            topic: topic.into(),
            key: Some("k".into()),
            payload: vec![b'x'; payload],
            headers: vec![(header.into(), "v".into())],
        };
        assert!(publisher
            .envelope(message("t", 1000, "traceparent"), &Context::new())
            .is_ok());
        let refused = |m| format!("{:?}", publisher.envelope(m, &Context::new()).unwrap_err());
        assert!(refused(message("other", 10, "h")).contains("TopicNotGranted"));
        assert!(refused(message("t", 10, "agora-id")).contains("are the platform's"));
        let too_large = refused(message("t", MAX_EVENT_BYTES, "h"));
        assert!(too_large.contains("at most 262144"), "{too_large}");
    }

    #[test]
    fn headers_must_be_unique_and_not_the_platforms() {
        let h = |names: &[&str]| -> Vec<(String, String)> {
            names.iter().map(|n| (n.to_string(), "v".into())).collect()
        };
        assert!(check_headers(&h(&["traceparent", "x-tenant"])).is_ok());
        for (names, expected) in [
            (&["a", "b", "a"][..], "header `a` appears twice"),
            (&["Agora-Id"], "are the platform's"),
            (&[""], "header 0 has an empty name"),
        ] {
            let err = check_headers(&h(names)).unwrap_err();
            assert!(err.contains(expected), "{names:?}: {err}");
        }
    }
}
