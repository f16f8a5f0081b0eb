//! The transactional outbox, written once above the storage and messaging
//! backends, which neither owns: an event published inside a component's
//! transaction (`publish-in`) is stored as a record of that transaction by
//! the storage backend ([`Transaction::enqueue`](crate::storage::Transaction::enqueue)),
//! and this relay moves committed records to the broker.
//!
//! Storage keeps records as opaque text and knows nothing of events;
//! messaging knows nothing of databases beyond handing this relay the
//! component's. The record format (the event as JSON) is [`encode`] and
//! [`decode`], here alone.
//!
//! Guarantees (see `messaging/mod.rs` for the whole list): events leave in
//! commit order, after the transaction that wrote them is on disk, and a
//! record is removed only once the broker's copy is; a record that is not
//! an event, or whose topic no serving version of the component was
//! granted, is set aside with its reason.
//!
//! Several hosts relay one component's outbox in turn, under a lock of
//! coordination's (`outbox:<component>`): each moves what it finds and
//! removes it from the outbox before letting go, so the next finds only
//! newer rows. A host that dies between the broker's acknowledgement and
//! the removal leaves rows the next host sends again (at least once, never
//! lost); the lock is taken per batch, so no host waits for another longer
//! than one batch, and a dead host's lock goes with its connection. A
//! database of this host's alone (SQLite) needs no lock.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use tokio::sync::{watch, Notify};

use crate::coordination::Coordinator;
use crate::messaging::{may_publish, Broker, Envelope};
use crate::metrics::{metrics, TopicLabels};
use crate::plugins::Durability;
use crate::storage::Database;

/// An event as an outbox record.
pub fn encode(event: &Envelope) -> Result<String, String> {
    serde_json::to_string(event).map_err(|e| format!("the event cannot be stored: {e}"))
}

/// The event in outbox record `seq`, or why it is not one.
pub fn decode(seq: i64, record: &[u8]) -> Result<Envelope, String> {
    serde_json::from_slice(record).map_err(|e| format!("outbox row {seq} is not an event: {e}"))
}

/// How often the outbox relay looks for events without being woken (after a
/// crash or while the broker is down).
const RELAY_SWEEP: Duration = Duration::from_secs(1);

/// Outbox rows the relay reads at once.
const RELAY_BATCH: usize = 256;

/// One component's outbox relay, shared by its background task and the
/// component's direct publishes.
pub struct Relay {
    component: String,
    wake: Arc<Notify>,
    running: AtomicBool,
    /// What the relay lets leave: the `publishes` of every version of the
    /// component that served since the host started.
    grants: Mutex<Vec<String>>,
    /// Held while events move to the broker, so they leave in outbox order
    /// and a direct publish follows the events committed before it. Holds
    /// the rows already in the broker or set aside (with the reason) and
    /// not yet removed from the outbox; in memory, so after a crash they are
    /// relayed again (at least once).
    pub(crate) handled: tokio::sync::Mutex<BTreeMap<i64, Option<String>>>,
}

impl Relay {
    pub fn new(component: &str, publishes: &[String]) -> Relay {
        Relay {
            component: component.to_owned(),
            wake: Arc::default(),
            running: false.into(),
            grants: Mutex::new(publishes.to_vec()),
            handled: tokio::sync::Mutex::default(),
        }
    }

    /// Makes the relay look for new events now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// What a transaction that enqueued events notifies when it commits.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Adds topics to what the relay lets leave (see
    /// [`crate::messaging::MessagingCapability::grant`]).
    pub fn grant(&self, publishes: &[String]) {
        let mut grants = self.grants.lock().unwrap();
        for topic in publishes {
            if !grants.contains(topic) {
                grants.push(topic.clone());
            }
        }
    }

    /// Runs the relay in the background (once; later calls do nothing):
    /// whenever it is woken, and every [`RELAY_SWEEP`] for what a crash or
    /// a broker outage left behind, until `stop` changes.
    pub fn start(
        self: &Arc<Self>,
        db: Arc<dyn Database>,
        broker: Arc<dyn Broker>,
        coordinator: Arc<dyn Coordinator>,
        mut stop: watch::Receiver<bool>,
    ) {
        if self.running.swap(true, Ordering::SeqCst) {
            return;
        }
        let relay = self.clone();
        tokio::spawn(async move {
            loop {
                let moved = async {
                    relay.forward(&*db, &*broker, &*coordinator, None).await?;
                    relay.settle(&*db).await
                };
                if let Err(e) = moved.await {
                    tracing::warn!(component = %relay.component, error = %e, "outbox relay failed; retrying");
                }
                tokio::select! {
                    _ = relay.wake.notified() => {}
                    _ = tokio::time::sleep(RELAY_SWEEP) => {}
                    _ = stop.changed() => return,
                }
            }
        });
    }

    /// Moves the committed outbox events not yet handled to the broker, in
    /// outbox order, setting aside rows that are not events or whose topic
    /// the component may not publish; then appends `direct` (a direct
    /// publish), so that it follows them. Returns how many rows it handled.
    pub(crate) async fn forward(
        &self,
        db: &dyn Database,
        broker: &dyn Broker,
        coordinator: &dyn Coordinator,
        direct: Option<&Envelope>,
    ) -> Result<usize> {
        let mut handled = self.handled.lock().await;
        let lock = format!("outbox:{}", self.component);
        let mut count = 0;
        loop {
            // Rows are numbered in commit order and a new one is numbered
            // above every row still in the outbox, so the unhandled ones lie
            // above the handled ones.
            let after = handled.last_key_value().map_or(0, |(seq, _)| *seq);
            let mut rows = db.outbox_pending(after, RELAY_BATCH).await?;
            if rows.is_empty() {
                break;
            }
            // Shared with other hosts: in turn, one batch at a time, read
            // again under the lock (another host may have sent these).
            let shared = match db.shared() {
                true => coordinator.lock(&lock).await?,
                false => None,
            };
            if shared.is_some() {
                rows = db.outbox_pending(after, RELAY_BATCH).await?;
            }
            let full = rows.len() == RELAY_BATCH;
            let grants = self.grants.lock().unwrap().clone();
            let mut events = Vec::new();
            let mut verdicts = Vec::with_capacity(rows.len());
            for row in rows {
                let refusal = match row.record.and_then(|record| decode(row.seq, &record)) {
                    Ok(event) if may_publish(&grants, &event.topic) => {
                        events.push(event);
                        None
                    }
                    Ok(event) => Some(format!(
                        "`{}` may not publish to `{}` (see `publishes` in plugins.toml)",
                        self.component, event.topic
                    )),
                    Err(reason) => Some(reason),
                };
                if let Some(reason) = &refusal {
                    tracing::warn!(component = %self.component, seq = row.seq, %reason, "outbox event set aside");
                }
                verdicts.push((row.seq, refusal));
            }
            if !events.is_empty() {
                // The transaction that wrote them first, then the broker's
                // copy, each surviving a machine crash before the next step.
                db.sync().await?;
                broker.append(&events, Durability::MachineCrash).await?;
                self.count_published(&events);
            }
            count += verdicts.len();
            handled.extend(verdicts);
            if let Some(lock) = shared {
                // The next host to take the lock must not find these rows
                // (a server's database: no write connection to wait for).
                Self::remove(db, &mut handled).await?;
                lock.unlock().await;
            }
            if !full {
                break;
            }
        }
        if let Some(event) = direct {
            let direct = std::slice::from_ref(event);
            broker.append(direct, Durability::ProcessCrash).await?;
            self.count_published(direct);
        }
        Ok(count)
    }

    /// Counts events handed to the broker, by topic where the grant names
    /// it and as `*` where only a wildcard grant lets it through: a
    /// component choosing topics must not grow the metrics without bound.
    pub(crate) fn count_published(&self, events: &[Envelope]) {
        let grants = self.grants.lock().unwrap().clone();
        let mut per_topic = BTreeMap::<&str, u64>::new();
        for event in events {
            let label = match grants.contains(&event.topic) {
                true => event.topic.as_str(),
                false => "*",
            };
            *per_topic.entry(label).or_default() += 1;
        }
        for (topic, count) in per_topic {
            metrics()
                .events_published
                .get_or_create(&TopicLabels {
                    component: self.component.clone(),
                    topic: topic.to_owned(),
                })
                .inc_by(count);
        }
    }

    /// Removes the handled rows from the outbox (the rejected ones to the
    /// rejected table). Takes the component's write connection, so it runs
    /// outside the ordering lock: a direct publish from an instance whose
    /// transaction holds that connection must not wait on it.
    pub(crate) async fn settle(&self, db: &dyn Database) -> Result<()> {
        let done = self.handled.lock().await.clone();
        Self::remove(db, &mut done.clone()).await?;
        let mut handled = self.handled.lock().await;
        for seq in done.keys() {
            handled.remove(seq);
        }
        Ok(())
    }

    /// Removes `done` rows from the outbox (the rejected ones to the
    /// rejected table), and from `done`.
    async fn remove(db: &dyn Database, done: &mut BTreeMap<i64, Option<String>>) -> Result<()> {
        if done.is_empty() {
            return Ok(());
        }
        let relayed: Vec<i64> = done
            .iter()
            .filter(|(_, refusal)| refusal.is_none())
            .map(|(seq, _)| *seq)
            .collect();
        let rejected: Vec<(i64, String)> = done
            .iter()
            .filter_map(|(seq, refusal)| refusal.clone().map(|r| (*seq, r)))
            .collect();
        db.outbox_settle(&relayed, &rejected).await?;
        done.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_survives_its_record_and_a_bad_record_says_why() {
        let event = Envelope {
            id: "e1".into(),
            topic: "t.events".into(),
            key: Some("k".into()),
            payload: br#"{"n":1}"#.to_vec(),
            headers: vec![("h".into(), "v".into())],
            published_at: 7,
        };
        let record = encode(&event).unwrap();
        assert_eq!(decode(3, record.as_bytes()).unwrap(), event);
        let err = decode(4, b"{\"forged\": true}").unwrap_err();
        assert!(err.starts_with("outbox row 4 is not an event"), "{err}");
    }
}
