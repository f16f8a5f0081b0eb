//! `agora:platform/messaging`: publish events, deliver them to subscribers.
//!
//! Guarantees, whatever the backend:
//! - `publish` returns once the event is durable in the broker;
//! - `publish-in` writes the event into the component's own database inside
//!   its transaction (the outbox); a relay moves committed events to the
//!   broker as soon as the commit wakes it, and on a timer for anything a
//!   crash or a broker outage left behind;
//! - each subscriber gets each event at least once, in order per partition
//!   (so per key), its progress committed only after its handler returned
//!   ok; failures are retried with exponential backoff, then the event moves
//!   to `dead-letter.<component>` with the error in its headers.
//!
//! Backends implement [`Broker`]: an append-only log of partitions with
//! consumer offsets, the model Kafka has. Consumers are driven by the host
//! (see `delivery.rs`), so a backend without consumer groups (rskafka) fits.

mod delivery;
mod embedded;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use wasmtime::component::{HasSelf, Linker, Resource};

use crate::bindings::messaging::{self as wit, Error, OutgoingMessage};
use crate::capability::Capability;
use crate::plugins::{ComponentSpec, Grant, MessagingBackend as BackendChoice, RetryPolicy};
use crate::state::InstanceState;
use crate::storage::{Database, TransactionHandle};

pub use delivery::Deliver;
pub use embedded::EmbeddedLog;

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

/// A partitioned, durable log with consumer offsets.
#[async_trait]
pub trait Broker: Send + Sync {
    /// Appends events; returns once they are durable.
    async fn append(&self, events: &[Envelope]) -> Result<()>;
    async fn partitions(&self, topic: &str) -> Result<u32>;
    /// Up to `max` events of one partition from offset `from` on.
    async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, Envelope)>>;
    /// The offset the next event of a partition will get.
    async fn end(&self, topic: &str, partition: u32) -> Result<u64>;
    /// The next offset `consumer` has to process.
    async fn committed(&self, consumer: &str, topic: &str, partition: u32) -> Result<u64>;
    async fn commit(&self, consumer: &str, topic: &str, partition: u32, next: u64) -> Result<()>;
    async fn ping(&self) -> Result<()>;
}

/// Per-topic change counters: consumers wait on them instead of polling,
/// and a change between a read and the wait is never missed.
#[derive(Default)]
pub struct Wakeups {
    topics: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl Wakeups {
    fn sender(&self, topic: &str) -> watch::Sender<u64> {
        self.topics
            .lock()
            .unwrap()
            .entry(topic.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .clone()
    }

    pub fn notify(&self, topic: &str) {
        self.sender(topic).send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn subscribe(&self, topic: &str) -> watch::Receiver<u64> {
        self.sender(topic).subscribe()
    }
}

/// The prefix of the topic a subscriber's failed events go to.
pub const DEAD_LETTER_PREFIX: &str = "dead-letter.";

/// How often the outbox relay looks for events without being woken (after a
/// crash or while the broker is down).
const RELAY_SWEEP: Duration = Duration::from_secs(1);

pub struct MessagingCapability {
    broker: Arc<dyn Broker>,
    wakeups: Arc<Wakeups>,
    /// The outbox relay of each component with messaging.
    relays: Mutex<HashMap<String, Relay>>,
    subscriptions: Mutex<HashMap<(String, String), delivery::Running>>,
    stop: watch::Sender<bool>,
}

#[derive(Default)]
struct Relay {
    wake: Arc<Notify>,
    running: bool,
}

/// A component's handle to messaging.
pub struct Publisher {
    publishes: Vec<String>,
    broker: Arc<dyn Broker>,
    wakeups: Arc<Wakeups>,
    relay: Arc<Notify>,
}

impl MessagingCapability {
    pub async fn init(choice: &BackendChoice, data_dir: &Path) -> Result<Self> {
        let broker: Arc<dyn Broker> = match choice {
            BackendChoice::Embedded => Arc::new(EmbeddedLog::open(&data_dir.join("messaging"))?),
        };
        Ok(MessagingCapability {
            broker,
            wakeups: Arc::default(),
            relays: Mutex::default(),
            subscriptions: Mutex::default(),
            stop: watch::channel(false).0,
        })
    }

    fn relay_wakeup(&self, component: &str) -> Arc<Notify> {
        let mut relays = self.relays.lock().unwrap();
        relays.entry(component.to_owned()).or_default().wake.clone()
    }

    /// Starts the outbox relay of a component (once; later versions share it).
    pub fn relay_outbox(&self, component: &str, db: Arc<dyn Database>) {
        let wake = {
            let mut relays = self.relays.lock().unwrap();
            let relay = relays.entry(component.to_owned()).or_default();
            if relay.running {
                return;
            }
            relay.running = true;
            relay.wake.clone()
        };
        let broker = self.broker.clone();
        let wakeups = self.wakeups.clone();
        let mut stop = self.stop.subscribe();
        let component = component.to_owned();
        tokio::spawn(async move {
            loop {
                match relay_once(&*db, &*broker, &wakeups).await {
                    Ok(0) => {}
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::warn!(%component, error = %e, "outbox relay failed; retrying")
                    }
                }
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(RELAY_SWEEP) => {}
                    _ = stop.changed() => return,
                }
            }
        });
    }

    /// Runs exactly the wanted subscriptions: starts new ones, stops removed
    /// ones, restarts those whose retry policy changed.
    pub fn sync_subscriptions(
        &self,
        deliver: Arc<dyn Deliver>,
        wanted: &[(String, String, RetryPolicy)],
    ) {
        let mut running = self.subscriptions.lock().unwrap();
        running.retain(|(component, topic), sub| {
            wanted
                .iter()
                .any(|(c, t, retry)| c == component && t == topic && *retry == sub.retry)
        });
        for (component, topic, retry) in wanted {
            let key = (component.clone(), topic.clone());
            if running.contains_key(&key) {
                continue;
            }
            let sub = delivery::Running::start(
                delivery::Consumer {
                    component: component.clone(),
                    topic: topic.clone(),
                    retry: *retry,
                    broker: self.broker.clone(),
                    wakeups: self.wakeups.clone(),
                    deliver: deliver.clone(),
                },
                self.stop.subscribe(),
            );
            running.insert(key, sub);
        }
    }

    /// Moves a subscriber back to offset `to` on every partition of a topic,
    /// so it handles those events again (after fixing a handler, say). A
    /// consumer in the middle of a batch may finish it first.
    pub async fn rewind(&self, component: &str, topic: &str, to: u64) -> Result<()> {
        for partition in 0..self.broker.partitions(topic).await? {
            self.broker.commit(component, topic, partition, to).await?;
        }
        self.wakeups.notify(topic);
        Ok(())
    }

    /// Where a subscriber stands on each partition: (partition, next offset
    /// it will handle, end of the partition). Caught up when next >= end.
    pub async fn progress(&self, component: &str, topic: &str) -> Result<Vec<(u32, u64, u64)>> {
        let mut partitions = Vec::new();
        for partition in 0..self.broker.partitions(topic).await? {
            let next = self.broker.committed(component, topic, partition).await?;
            partitions.push((partition, next, self.broker.end(topic, partition).await?));
        }
        Ok(partitions)
    }

    /// Events of a topic from `from` on, across its partitions: how an
    /// operator inspects a dead-letter topic.
    pub async fn read_topic(
        &self,
        topic: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, Envelope)>> {
        let mut events = Vec::new();
        for partition in 0..self.broker.partitions(topic).await? {
            events.extend(self.broker.read(topic, partition, from, max).await?);
        }
        events.sort_by_key(|(offset, _)| *offset);
        events.truncate(max);
        Ok(events)
    }
}

/// Moves one batch of committed outbox events to the broker; returns how many.
async fn relay_once(db: &dyn Database, broker: &dyn Broker, wakeups: &Wakeups) -> Result<usize> {
    let pending = db.outbox_pending(256).await?;
    if pending.is_empty() {
        return Ok(0);
    }
    let (seqs, events): (Vec<i64>, Vec<Envelope>) = pending.into_iter().unzip();
    broker.append(&events).await?;
    // A crash here re-sends these events: at least once, and subscribers
    // deduplicate on the event id.
    db.outbox_remove(&seqs).await?;
    for event in &events {
        wakeups.notify(&event.topic);
    }
    Ok(events.len())
}

#[async_trait]
impl Capability for MessagingCapability {
    const GRANT: Grant = Grant::Messaging;
    const INTERFACES: &'static [&'static str] = &["agora:platform/messaging"];
    type ComponentState = Publisher;

    fn add_to_linker(linker: &mut Linker<InstanceState>) -> Result<()> {
        Ok(wit::add_to_linker::<_, HasSelf<InstanceState>>(
            linker,
            |s| s,
        )?)
    }

    async fn configure(&self, component: &str, spec: &ComponentSpec) -> Result<Publisher> {
        Ok(Publisher {
            publishes: spec.publishes.clone(),
            broker: self.broker.clone(),
            wakeups: self.wakeups.clone(),
            relay: self.relay_wakeup(component),
        })
    }

    async fn ready(&self) -> Result<()> {
        self.broker.ping().await
    }

    async fn shutdown(&self) {
        self.stop.send_replace(true);
        self.subscriptions.lock().unwrap().clear();
    }
}

impl Publisher {
    pub fn wake_relay(&self) {
        self.relay.notify_one();
    }

    fn envelope(&self, message: OutgoingMessage) -> Result<Envelope, Error> {
        if message.topic.is_empty() {
            return Err(Error::Invalid("the topic is empty".into()));
        }
        if !self
            .publishes
            .iter()
            .any(|t| t == "*" || *t == message.topic)
        {
            return Err(Error::TopicNotGranted(format!(
                "publishing to `{}` is not granted (see `publishes` in plugins.toml)",
                message.topic
            )));
        }
        Ok(Envelope {
            id: uuid::Uuid::new_v4().to_string(),
            topic: message.topic,
            key: message.key,
            payload: message.payload,
            headers: message.headers,
            published_at: crate::now_millis(),
        })
    }
}

impl InstanceState {
    fn publisher(&self) -> wasmtime::Result<&Publisher> {
        self.caps.messaging.as_ref().ok_or_else(|| {
            wasmtime::format_err!("messaging is not granted to `{}`", self.caps.name)
        })
    }
}

impl wit::Host for InstanceState {
    async fn publish(
        &mut self,
        message: OutgoingMessage,
    ) -> wasmtime::Result<Result<String, Error>> {
        let publisher = self.publisher()?;
        let event = match publisher.envelope(message) {
            Ok(event) => event,
            Err(e) => return Ok(Err(e)),
        };
        if let Err(e) = publisher.broker.append(std::slice::from_ref(&event)).await {
            return Ok(Err(Error::Unavailable(format!("{e:#}"))));
        }
        publisher.wakeups.notify(&event.topic);
        Ok(Ok(event.id))
    }

    async fn publish_in(
        &mut self,
        tx: Resource<TransactionHandle>,
        message: OutgoingMessage,
    ) -> wasmtime::Result<Result<String, Error>> {
        let event = match self.publisher()?.envelope(message) {
            Ok(event) => event,
            Err(e) => return Ok(Err(e)),
        };
        let handle = self.transaction(&tx)?;
        Ok(match handle.enqueue(&event).await {
            Ok(()) => Ok(event.id),
            Err(e) => Err(Error::Unavailable(e.to_string())),
        })
    }
}
