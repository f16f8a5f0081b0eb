//! Kafka messaging through rskafka: `[backends.messaging] kind = "kafka"`.
//!
//! - Topics: a missing topic is created with `partitions` and
//!   `replication_factor`; partition counts are read from the cluster's
//!   metadata, so a topic grown with Kafka's tools is seen (by consumers
//!   within `delivery.rs`'s refresh).
//! - Producing: each event goes to the partition its key picks with
//!   Kafka's own hash ([`super::partition_of`]), acknowledged by all
//!   in-sync replicas (`acks = -1`, rskafka's only mode). What an
//!   acknowledged event survives is the cluster's: with replication factor
//!   3 and `min.insync.replicas = 2` the loss of a broker; with one broker
//!   (the development setting) what that broker's disk keeps.
//! - Records: the key is the record key, the payload its value, and the
//!   envelope's id and publication time travel as the headers `agora-id`
//!   and `agora-published-at` (the time is also the record's timestamp),
//!   beside the component's own headers. Any Kafka tool can read them; a
//!   record some other producer wrote without `agora-id` gets the id
//!   `<topic>-<partition>-<offset>`, stable across redeliveries.
//! - Consuming: long fetches of at most `fetch_max_wait_ms`. Offsets and
//!   leases are coordination's (rskafka has no consumer groups).
//! - Outages: the client connects lazily, and every call gives up after
//!   `request_timeout_ms`; callers retry (the outbox keeps events meanwhile),
//!   so the host starts and serves while the broker is away.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use async_trait::async_trait;
use rskafka::chrono::{TimeZone, Utc};
use rskafka::client::error::{Error as KafkaError, ProtocolError};
use rskafka::client::partition::{Compression, OffsetAt, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::{Record, RecordAndOffset};
use rskafka::BackoffConfig;
use serde::Deserialize;
use tokio::sync::OnceCell;

use super::{partition_of, Broker, Envelope, MessagingSettings};
use crate::metrics::metrics;
use crate::plugins::{BackendKind, Durability};

pub const KIND: BackendKind<dyn MessagingSettings> = BackendKind {
    kind: "kafka",
    parse: |table| {
        let config = KafkaConfig::deserialize(table)?;
        config.check().map_err(serde::de::Error::custom)?;
        Ok(Box::new(config))
    },
};

/// `[backends.messaging] kind = "kafka"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port` separated by commas, e.g.
    /// `"${KAFKA_BROKERS:-127.0.0.1:9092}"`. No default.
    pub brokers: String,
    /// Put before every topic's name on the broker, so that deployments (or
    /// tests) can share a cluster: `"staging."` makes `order.placed` the
    /// broker's `staging.order.placed`. Empty by default.
    #[serde(default)]
    pub topic_prefix: String,
    /// Partitions of a topic the host creates. 4: a subscriber handles four
    /// keys at once, shared among the hosts; Kafka can add partitions
    /// later but never remove them.
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// Replicas of a topic the host creates. 1 fits a single broker; a
    /// production cluster wants 3 (with `min.insync.replicas = 2`).
    #[serde(default = "default_replication_factor")]
    pub replication_factor: i16,
    /// How long a fetch waits for events before returning none. 250 ms:
    /// Kafka answers as soon as events arrive, so this only paces idle
    /// polling. Brokers that always wait it out (tansu) want 10 to 50.
    #[serde(default = "default_fetch_max_wait_ms")]
    pub fetch_max_wait_ms: u64,
    /// How long a call (with its retries) may take before it fails.
    /// 5 s: a publish fails with `unavailable` rather than hang a request.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
}

fn default_partitions() -> u32 {
    4
}
fn default_replication_factor() -> i16 {
    1
}
fn default_fetch_max_wait_ms() -> u64 {
    250
}
fn default_request_timeout_ms() -> u64 {
    5000
}

impl KafkaConfig {
    fn check(&self) -> Result<(), String> {
        if self.bootstrap().is_empty() {
            return Err("`brokers` names no broker (write `host:port`, comma separated)".into());
        }
        if let Some(bad) = self.bootstrap().iter().find(|b| !b.contains(':')) {
            return Err(format!("`brokers`: `{bad}` is not `host:port`"));
        }
        if self.partitions == 0 || self.partitions > i32::MAX as u32 {
            return Err("`partitions` must be above 0".into());
        }
        if self.replication_factor < 1 {
            return Err("`replication_factor` must be above 0".into());
        }
        if self.request_timeout_ms <= self.fetch_max_wait_ms {
            return Err("`request_timeout_ms` must be above `fetch_max_wait_ms`".into());
        }
        Ok(())
    }

    fn bootstrap(&self) -> Vec<String> {
        self.brokers
            .split(',')
            .map(str::trim)
            .filter(|b| !b.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

#[async_trait]
impl MessagingSettings for KafkaConfig {
    fn embedded(&self) -> bool {
        false
    }

    async fn start(&self, _data_dir: &Path) -> Result<Arc<dyn Broker>> {
        Ok(Arc::new(KafkaBroker {
            config: self.clone(),
            client: OnceCell::new(),
            partitions: Mutex::default(),
            clients: Mutex::default(),
            read_ahead: Mutex::default(),
        }))
    }
}

pub struct KafkaBroker {
    config: KafkaConfig,
    client: OnceCell<Client>,
    /// Partition counts of the topics seen, and when they were counted,
    /// for placing events.
    partitions: Mutex<HashMap<String, (u32, Instant)>>,
    clients: Mutex<HashMap<TopicPartition, Arc<PartitionClient>>>,
    /// Per partition, events fetched beyond a fetch's maximum.
    read_ahead: Mutex<HashMap<TopicPartition, Vec<(u64, Envelope)>>>,
}

type TopicPartition = (String, u32);

/// The headers that carry the envelope.
const ID_HEADER: &str = "agora-id";
const PUBLISHED_AT_HEADER: &str = "agora-published-at";

impl KafkaBroker {
    /// The topic's name on the broker.
    fn broker_name(&self, topic: &str) -> String {
        format!("{}{topic}", self.config.topic_prefix)
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.request_timeout_ms)
    }

    /// `call`, failing after the request timeout.
    async fn timed<T>(&self, what: &str, call: impl Future<Output = Result<T>>) -> Result<T> {
        let result = tokio::time::timeout(self.timeout(), call)
            .await
            .map_err(|_| anyhow!("Kafka: {what} took over {:?}", self.timeout()))
            .and_then(|result| result.with_context(|| format!("Kafka: {what}")));
        if result.is_err() {
            metrics().backend_error("messaging", KIND.kind);
        }
        result
    }

    async fn client(&self) -> Result<&Client> {
        self.client
            .get_or_try_init(|| async {
                ClientBuilder::new(self.config.bootstrap())
                    .client_id("agora")
                    .backoff_config(BackoffConfig {
                        init_backoff: Duration::from_millis(50),
                        max_backoff: Duration::from_secs(1),
                        base: 2.0,
                        deadline: Some(self.timeout()),
                    })
                    .build()
                    .await
                    .with_context(|| format!("connecting to {}", self.config.brokers))
            })
            .await
    }

    async fn partition(&self, topic: &str, partition: u32) -> Result<Arc<PartitionClient>> {
        let key = (topic.to_owned(), partition);
        if let Some(client) = self.clients.lock().unwrap().get(&key) {
            return Ok(client.clone());
        }
        let client = Arc::new(
            self.client()
                .await?
                .partition_client(
                    self.broker_name(topic),
                    partition as i32,
                    UnknownTopicHandling::Retry,
                )
                .await?,
        );
        self.clients.lock().unwrap().insert(key, client.clone());
        Ok(client)
    }

    /// The topic's partition count from the cluster, creating the topic
    /// if it is missing.
    async fn discover(&self, topic: &str) -> Result<u32> {
        let client = self.client().await?;
        for _ in 0..10 {
            let topics = client.list_topics().await?;
            let name = self.broker_name(topic);
            if let Some(found) = topics.iter().find(|t| t.name == name) {
                if !found.partitions.is_empty() {
                    let n = found.partitions.len() as u32;
                    self.partitions
                        .lock()
                        .unwrap()
                        .insert(topic.to_owned(), (n, Instant::now()));
                    return Ok(n);
                }
            } else {
                let created = client
                    .controller_client()?
                    .create_topic(
                        &name,
                        self.config.partitions as i32,
                        self.config.replication_factor,
                        self.config.request_timeout_ms as i32,
                    )
                    .await;
                match created {
                    Ok(()) => {
                        tracing::info!(%topic, partitions = self.config.partitions, "created Kafka topic")
                    }
                    Err(KafkaError::ServerError {
                        protocol_error: ProtocolError::TopicAlreadyExists,
                        ..
                    }) => {}
                    Err(e) => return Err(e).context(format!("creating topic `{topic}`")),
                }
            }
            // Metadata follows a creation with a delay.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("topic `{topic}` has no partitions in the cluster's metadata")
    }

    /// The records from `from` on, when a fetch at `from` returned none
    /// though the partition holds more, or started after `from`: Kafka
    /// returns the whole record batch holding an offset, but some brokers
    /// (tansu) answer an offset inside a batch (where a consumer that
    /// stopped mid-batch resumes) with nothing, or with the next batch,
    /// which would skip the rest of this one. Fetches from the offsets
    /// before it until a fetch starts at or before `from`.
    async fn batch_containing(
        &self,
        client: &PartitionClient,
        from: u64,
    ) -> Result<Vec<RecordAndOffset>> {
        for start in (from.saturating_sub(MAX_BATCH_RECORDS)..from).rev() {
            let (records, _) = client
                .fetch_records(start as i64, 1..FETCH_MAX_BYTES, 0)
                .await?;
            if records.first().is_some_and(|r| r.offset as u64 <= from) {
                return Ok(records);
            }
        }
        bail!("no record batch starts within {MAX_BATCH_RECORDS} offsets before {from}")
    }

    async fn produce(&self, topic: &str, partition: u32, records: Vec<Record>) -> Result<()> {
        self.partition(topic, partition)
            .await?
            .produce(records, Compression::NoCompression)
            .await?;
        Ok(())
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
        wait: bool,
    ) -> Result<Vec<(u64, Envelope)>> {
        let client = self.partition(topic, partition).await?;
        let max_wait = if wait {
            self.config.fetch_max_wait_ms as i32
        } else {
            0
        };
        let fetched = client
            .fetch_records(from as i64, 1..FETCH_MAX_BYTES, max_wait)
            .await;
        // Where the events returned start: `from`, or the partition's first
        // offset when `from` is out of its range.
        let mut start = from;
        let records = match fetched {
            // Nothing, though the partition holds more; or a batch after
            // `from` (no gaps: this host's producers write dense offsets).
            Ok((records, high_watermark))
                if (records.is_empty() && (from as i64) < high_watermark)
                    || records.first().is_some_and(|r| r.offset as u64 > from) =>
            {
                self.batch_containing(&client, from).await?
            }
            Ok((records, _)) => records,
            Err(KafkaError::ServerError {
                protocol_error: ProtocolError::OffsetOutOfRange,
                ..
            }) => {
                let earliest = client.get_offset(OffsetAt::Earliest).await? as u64;
                if from >= earliest {
                    // Past the end: the topic was made again, or the
                    // cluster lost events. At least once: from the start.
                    tracing::error!(%topic, partition, from, earliest, "offset {from} is past the end of the partition; reading it again from {earliest}");
                } else {
                    tracing::error!(%topic, partition, from, earliest, "events before offset {earliest} are gone (retention); going on from there");
                }
                start = earliest;
                client
                    .fetch_records(earliest as i64, 1..FETCH_MAX_BYTES, max_wait)
                    .await?
                    .0
            }
            Err(e) => return Err(e.into()),
        };
        let mut events: Vec<(u64, Envelope)> = records
            .into_iter()
            .filter(|r| r.offset as u64 >= start)
            .map(|r| (r.offset as u64, envelope(topic, partition, r)))
            .collect();
        if events.len() > max {
            let rest = events.split_off(max);
            self.read_ahead
                .lock()
                .unwrap()
                .insert((topic.to_owned(), partition), rest);
        }
        Ok(events)
    }

    /// What the last fetch of a partition returned beyond its maximum, if
    /// it starts at `from`: the next fetch, which asks for it, needs no
    /// round trip (nor, on tansu, a search for its batch's start).
    fn take_read_ahead(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Option<Vec<(u64, Envelope)>> {
        let mut read_ahead = self.read_ahead.lock().unwrap();
        let key = (topic.to_owned(), partition);
        let mut rest = read_ahead.remove(&key)?;
        if rest.first().map(|(offset, _)| *offset) != Some(from) {
            return None;
        }
        if rest.len() > max {
            let later = rest.split_off(max);
            read_ahead.insert(key, later);
        }
        Some(rest)
    }
}

/// Bytes of records in one produce request, well under Kafka's default
/// `max.message.bytes` (1 MiB), which bounds a record batch: a larger batch
/// would be refused, and retried, for ever.
const MAX_PRODUCE_BYTES: usize = 512 << 10;

/// How long a topic's partition count is trusted for placing events.
const PARTITIONS_REFRESH: Duration = Duration::from_secs(10);

/// `records` in runs of at most [`MAX_PRODUCE_BYTES`] (a larger record
/// alone; events are bounded below that at `publish`).
fn by_size(records: Vec<Record>) -> Vec<Vec<Record>> {
    let mut runs: Vec<Vec<Record>> = Vec::new();
    let mut size = 0;
    for record in records {
        let len = record.approximate_size();
        match runs.last_mut() {
            Some(run) if size + len <= MAX_PRODUCE_BYTES => {
                size += len;
                run.push(record);
            }
            _ => {
                size = len;
                runs.push(vec![record]);
            }
        }
    }
    runs
}

/// Bytes one fetch may return (Kafka returns at least one whole batch).
const FETCH_MAX_BYTES: i32 = 4 << 20;

/// How far back [`KafkaBroker::batch_containing`] looks for a batch's start:
/// the relay's largest batch and then some.
const MAX_BATCH_RECORDS: u64 = 4096;

fn record(event: &Envelope) -> Record {
    let mut headers: BTreeMap<String, Vec<u8>> = event
        .headers
        .iter()
        .map(|(name, value)| (name.clone(), value.clone().into_bytes()))
        .collect();
    headers.insert(ID_HEADER.into(), event.id.clone().into_bytes());
    headers.insert(
        PUBLISHED_AT_HEADER.into(),
        event.published_at.to_string().into_bytes(),
    );
    Record {
        key: event.key.clone().map(String::into_bytes),
        value: Some(event.payload.clone()),
        headers,
        timestamp: Utc
            .timestamp_millis_opt(event.published_at as i64)
            .single()
            .unwrap_or_default(),
    }
}

fn envelope(topic: &str, partition: u32, r: RecordAndOffset) -> Envelope {
    let mut headers = r.record.headers;
    let text = |bytes: Vec<u8>| String::from_utf8_lossy(&bytes).into_owned();
    let id = headers
        .remove(ID_HEADER)
        .map(text)
        .unwrap_or_else(|| format!("{topic}-{partition}-{}", r.offset));
    let published_at = headers
        .remove(PUBLISHED_AT_HEADER)
        .and_then(|v| text(v).parse().ok())
        .unwrap_or(r.record.timestamp.timestamp_millis().max(0) as u64);
    Envelope {
        id,
        topic: topic.to_owned(),
        key: r.record.key.map(text),
        payload: r.record.value.unwrap_or_default(),
        headers: headers
            .into_iter()
            .map(|(name, value)| (name, text(value)))
            .collect(),
        published_at,
    }
}

#[async_trait]
impl Broker for KafkaBroker {
    async fn partitions(&self, topic: &str) -> Result<u32> {
        self.timed(&format!("partitions of `{topic}`"), self.discover(topic))
            .await
    }

    /// Acknowledged by all in-sync replicas whatever `at_least` asks: the
    /// cluster's replication, not an fsync, is what Kafka's durability is.
    async fn append(&self, events: &[Envelope], _at_least: Durability) -> Result<()> {
        // One produce per partition, in order within each.
        let mut batches: Vec<((String, u32), Vec<Record>)> = Vec::new();
        for event in events {
            // Counted again now and then, so keys follow a topic that grew.
            let known = self.partitions.lock().unwrap().get(&event.topic).copied();
            let count = match known {
                Some((n, at)) if at.elapsed() < PARTITIONS_REFRESH => n,
                _ => self.partitions(&event.topic).await?,
            };
            let target = (event.topic.clone(), partition_of(event, count));
            match batches.iter_mut().find(|(t, _)| *t == target) {
                Some((_, records)) => records.push(record(event)),
                None => batches.push((target, vec![record(event)])),
            }
        }
        for ((topic, partition), records) in batches {
            for records in by_size(records) {
                let what = format!("producing to `{topic}` partition {partition}");
                self.timed(&what, self.produce(&topic, partition, records))
                    .await?;
            }
        }
        Ok(())
    }

    async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
        wait: bool,
    ) -> Result<Vec<(u64, Envelope)>> {
        if let Some(events) = self.take_read_ahead(topic, partition, from, max) {
            return Ok(events);
        }
        let what = format!("fetching `{topic}` partition {partition} from {from}");
        self.timed(&what, self.read(topic, partition, from, max, wait))
            .await
    }

    async fn end(&self, topic: &str, partition: u32) -> Result<u64> {
        let what = format!("the end of `{topic}` partition {partition}");
        self.timed(&what, async {
            // A fetch's high watermark, not ListOffsets(Latest), which some
            // brokers (tansu's memory engine) answer wrongly.
            let client = self.partition(topic, partition).await?;
            let earliest = client.get_offset(OffsetAt::Earliest).await?;
            let (_, high_watermark) = client.fetch_records(earliest, 1..2, 0).await?;
            Ok(high_watermark.max(0) as u64)
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        self.timed("listing topics", async {
            self.client().await?.list_topics().await?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_travels_as_a_kafka_record_and_back() {
        let event = Envelope {
            id: "e1".into(),
            topic: "orders".into(),
            key: Some("order-7".into()),
            payload: br#"{"n":1}"#.to_vec(),
            headers: vec![("traceparent".into(), "00-abc".into())],
            published_at: 1_700_000_000_123,
        };
        let record = record(&event);
        assert_eq!(record.key.as_deref(), Some(&b"order-7"[..]));
        assert_eq!(record.headers["agora-id"], b"e1");
        assert_eq!(record.headers["traceparent"], b"00-abc");
        assert_eq!(record.timestamp.timestamp_millis(), 1_700_000_000_123);
        let back = envelope("orders", 2, RecordAndOffset { record, offset: 9 });
        assert_eq!(back, event);
    }

    #[test]
    fn a_foreign_record_gets_a_stable_id() {
        let record = Record {
            key: None,
            value: Some(b"x".to_vec()),
            headers: BTreeMap::new(),
            timestamp: Utc.timestamp_millis_opt(5).unwrap(),
        };
        let event = envelope("t", 1, RecordAndOffset { record, offset: 42 });
        assert_eq!(event.id, "t-1-42");
        assert_eq!(event.published_at, 5);
    }

    #[test]
    fn settings_are_checked() {
        let parse = |text: &str| (KIND.parse)(text.parse::<toml::Table>().unwrap()).map(|_| ());
        assert!(parse("brokers = \"127.0.0.1:9092, k2:9092\"").is_ok());
        for (text, expected) in [
            ("brokers = \"\"", "names no broker"),
            ("brokers = \"kafka\"", "`kafka` is not `host:port`"),
            (
                "brokers = \"k:1\"\npartitions = 0",
                "`partitions` must be above 0",
            ),
            (
                "brokers = \"k:1\"\nfetch_max_wait_ms = 9000",
                "`request_timeout_ms` must be above",
            ),
            ("broker = \"k:1\"", "unknown field `broker`"),
        ] {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }
}
