//! Delivery: one consumer task per (component, topic, partition).
//!
//! Events are handled one at a time, in log order, and the consumer's offset
//! moves past an event only once its handler succeeded or the event was
//! written to the dead-letter topic. A host crash in between redelivers
//! that one event, which is why handlers are idempotent on the event id.
//! Sequential handling is what makes per-key order hold; throughput comes
//! from partitions, not from concurrency within one.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Broker, Envelope, Wakeups, DEAD_LETTER_PREFIX};
use crate::bindings::messaging::Message;
use crate::plugins::{Durability, RetryPolicy};

/// Hands a message to a component's `subscriber` export.
#[async_trait]
pub trait Deliver: Send + Sync {
    async fn deliver(&self, component: &str, message: Message) -> Result<(), String>;
}

/// Events fetched per read.
const BATCH: usize = 64;
/// The longest wait between retries, and before re-reading an idle topic
/// (a safety net: consumers are woken on publish).
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const IDLE_POLL: Duration = Duration::from_secs(1);

pub struct Consumer {
    pub component: String,
    pub topic: String,
    pub retry: RetryPolicy,
    pub broker: Arc<dyn Broker>,
    pub wakeups: Arc<Wakeups>,
    pub deliver: Arc<dyn Deliver>,
}

/// A running subscription; dropping it stops its tasks.
pub struct Running {
    pub retry: RetryPolicy,
    task: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        // Aborting mid-delivery is safe: the offset was not committed, so the
        // event is delivered again by whoever consumes next.
        self.task.abort();
    }
}

impl Running {
    pub fn start(consumer: Consumer, stop: watch::Receiver<bool>) -> Running {
        let retry = consumer.retry;
        let consumer = Arc::new(consumer);
        let task = tokio::spawn(async move {
            let partitions = loop {
                match consumer.broker.partitions(&consumer.topic).await {
                    Ok(n) => break n,
                    Err(e) => {
                        consumer.warn("reading partitions", &e);
                        tokio::time::sleep(IDLE_POLL).await;
                    }
                }
            };
            // Dropping the set (when this task is aborted) aborts every partition.
            let mut partitions_set = tokio::task::JoinSet::new();
            for p in 0..partitions {
                partitions_set.spawn(consumer.clone().run(p, stop.clone()));
            }
            while partitions_set.join_next().await.is_some() {}
        });
        Running { retry, task }
    }
}

/// Repeats a broker call until it succeeds: progress must not be skipped.
macro_rules! persist {
    ($self:ident, $what:literal, $call:expr) => {
        loop {
            match $call.await {
                Ok(v) => break v,
                Err(e) => {
                    $self.warn($what, &e);
                    tokio::time::sleep(IDLE_POLL).await;
                }
            }
        }
    };
}

impl Consumer {
    fn warn(&self, what: &str, error: &anyhow::Error) {
        tracing::warn!(component = %self.component, topic = %self.topic, error = %format!("{error:#}"), "{what} failed; retrying");
    }

    async fn run(self: Arc<Self>, partition: u32, mut stop: watch::Receiver<bool>) {
        let mut published = self.wakeups.subscribe(&self.topic);
        loop {
            if *stop.borrow() {
                return;
            }
            published.borrow_and_update();
            let next = persist!(
                self,
                "reading the offset",
                self.broker
                    .committed(&self.component, &self.topic, partition)
            );
            let batch = persist!(
                self,
                "reading events",
                self.broker.read(&self.topic, partition, next, BATCH)
            );
            if batch.is_empty() {
                tokio::select! {
                    _ = published.changed() => {}
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                    _ = stop.changed() => return,
                }
                continue;
            }
            for (offset, event) in batch {
                self.handle(event).await;
                persist!(
                    self,
                    "committing the offset",
                    self.broker
                        .commit(&self.component, &self.topic, partition, offset + 1)
                );
            }
        }
    }

    /// Delivers with retries; dead-letters the event when they run out.
    async fn handle(&self, event: Envelope) {
        let mut backoff = Duration::from_millis(self.retry.backoff_ms);
        let mut last_error = String::new();
        for attempt in 1..=self.retry.max_attempts {
            let message = Message {
                id: event.id.clone(),
                topic: event.topic.clone(),
                key: event.key.clone(),
                payload: event.payload.clone(),
                headers: event.headers.clone(),
                published_at: event.published_at,
                attempt,
            };
            match self.deliver.deliver(&self.component, message).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(component = %self.component, topic = %self.topic, event = %event.id, attempt, error = %e, "delivery failed");
                    last_error = e;
                }
            }
            if attempt < self.retry.max_attempts {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        let mut dead = event.clone();
        dead.topic = format!("{DEAD_LETTER_PREFIX}{}", self.component);
        dead.headers.extend([
            ("agora-original-topic".to_owned(), event.topic.clone()),
            ("agora-error".to_owned(), last_error),
            (
                "agora-attempts".to_owned(),
                self.retry.max_attempts.to_string(),
            ),
        ]);
        tracing::error!(component = %self.component, topic = %self.topic, event = %event.id, dead_letter = %dead.topic, "event dead-lettered");
        // Rare, and the offset moves past the event next: its only copy
        // must survive a machine crash first.
        persist!(
            self,
            "dead-lettering",
            self.broker
                .append(std::slice::from_ref(&dead), Durability::MachineCrash)
        );
        self.wakeups.notify(&dead.topic);
    }
}
