//! The contract of [`Broker`], run against every messaging backend: the
//! embedded log always, Kafka whenever 127.0.0.1:9092 answers (the test
//! broker `scripts/services` starts; see [`crate::testing::answers`]).
//! Events come back as they were appended, on the partition their key
//! picks, in order per partition, from any offset; a missing topic is
//! created with the configured partitions; a fetch waits for an event.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{partition_of, Broker, EmbeddedConfig, Envelope, KafkaConfig, MessagingSettings};
use crate::plugins::Durability;
use crate::testing;

/// Partitions every backend here creates topics with.
const PARTITIONS: u32 = 3;

/// Every backend, started on `dir` (for the embedded ones).
async fn backends(dir: &Path) -> Vec<(&'static str, Arc<dyn Broker>)> {
    let embedded = EmbeddedConfig {
        durability: Durability::ProcessCrash,
        partitions: PARTITIONS,
    };
    let mut all = vec![("embedded", embedded.start(dir).await.unwrap())];
    if testing::answers("Kafka", testing::KAFKA_ADDR).await {
        all.push(("kafka", kafka().start(dir).await.unwrap()));
    }
    all
}

pub fn kafka() -> KafkaConfig {
    KafkaConfig {
        brokers: testing::KAFKA_ADDR.into(),
        topic_prefix: String::new(),
        partitions: PARTITIONS,
        replication_factor: 1,
        // The test broker (tansu) waits out every fetch.
        fetch_max_wait_ms: 20,
        request_timeout_ms: 5000,
    }
}

fn event(topic: &str, id: &str, key: &str) -> Envelope {
    Envelope {
        id: id.into(),
        topic: topic.into(),
        key: Some(key.into()),
        payload: format!(r#"{{"id":"{id}"}}"#).into_bytes(),
        headers: vec![("traceparent".into(), format!("00-{id}"))],
        published_at: 1_700_000_000_000,
    }
}

/// Every event of a topic, partition by partition, from offset 0.
async fn all(broker: &dyn Broker, topic: &str) -> Vec<(u32, u64, Envelope)> {
    let mut events = Vec::new();
    for partition in 0..broker.partitions(topic).await.unwrap() {
        for (offset, event) in broker
            .fetch(topic, partition, 0, 1000, false)
            .await
            .unwrap()
        {
            events.push((partition, offset, event));
        }
    }
    events
}

#[tokio::test]
async fn events_come_back_whole_on_their_keys_partition_in_order() {
    let dir = tempfile::tempdir().unwrap();
    for (name, broker) in backends(dir.path()).await {
        broker.ping().await.unwrap();
        let topic = testing::unique("orders");
        let appended = [
            event(&topic, "a1", "a"),
            event(&topic, "b1", "b"),
            event(&topic, "a2", "a"),
            event(&topic, "c1", "c"),
        ];
        broker
            .append(&appended[..2], Durability::ProcessCrash)
            .await
            .unwrap();
        broker
            .append(&appended[2..], Durability::MachineCrash)
            .await
            .unwrap();
        assert_eq!(
            broker.partitions(&topic).await.unwrap(),
            PARTITIONS,
            "{name}: created with the configured partitions"
        );
        let events = all(&*broker, &topic).await;
        assert_eq!(events.len(), 4, "{name}");
        for original in &appended {
            let found = events.iter().find(|(_, _, e)| e == original);
            let Some((partition, _, _)) = found else {
                panic!("{name}: {} changed or missing in {events:?}", original.id);
            };
            assert_eq!(
                *partition,
                partition_of(original, PARTITIONS),
                "{name}: {} on its key's partition",
                original.id
            );
        }
        // Per key: in the order appended.
        let of_a: Vec<_> = events
            .iter()
            .filter(|(_, _, e)| e.key.as_deref() == Some("a"))
            .collect();
        assert!(of_a[0].1 < of_a[1].1, "{name}");
        assert_eq!(
            (of_a[0].2.id.as_str(), of_a[1].2.id.as_str()),
            ("a1", "a2"),
            "{name}"
        );
        // `end` is the next offset of each partition.
        for partition in 0..PARTITIONS {
            let last = events
                .iter()
                .filter(|(p, _, _)| *p == partition)
                .map(|(_, offset, _)| offset + 1)
                .max();
            if let Some(last) = last {
                assert_eq!(broker.end(&topic, partition).await.unwrap(), last, "{name}");
            }
        }
        let empty = testing::unique("nothing");
        assert!(all(&*broker, &empty).await.is_empty(), "{name}");
    }
}

#[tokio::test]
async fn a_fetch_starts_at_its_offset_and_stops_at_its_maximum() {
    let dir = tempfile::tempdir().unwrap();
    for (name, broker) in backends(dir.path()).await {
        let topic = testing::unique("orders");
        let appended: Vec<_> = (0..5)
            .map(|i| event(&topic, &format!("e{i}"), "k"))
            .collect();
        broker
            .append(&appended, Durability::ProcessCrash)
            .await
            .unwrap();
        let (partition, first, _) = all(&*broker, &topic).await.remove(0);
        let page = broker
            .fetch(&topic, partition, first + 1, 2, false)
            .await
            .unwrap();
        let ids: Vec<_> = page.iter().map(|(_, e)| e.id.as_str()).collect();
        assert_eq!(ids, ["e1", "e2"], "{name}");
        assert_eq!(page[0].0, first + 1, "{name}");
        let end = broker.end(&topic, partition).await.unwrap();
        assert!(
            broker
                .fetch(&topic, partition, end, 10, false)
                .await
                .unwrap()
                .is_empty(),
            "{name}: nothing past the end"
        );
    }
}

/// A consumer's long fetch returns the event appended while it waited,
/// without any signal from the publisher's process.
#[tokio::test]
async fn a_waiting_fetch_gets_an_event_appended_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    for (name, broker) in backends(dir.path()).await {
        let topic = testing::unique("orders");
        let e = event(&topic, "late", "k");
        let partition = partition_of(&e, broker.partitions(&topic).await.unwrap());
        let end = broker.end(&topic, partition).await.unwrap();
        let appender = tokio::spawn({
            let (broker, e) = (broker.clone(), e.clone());
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                broker.append(&[e], Durability::ProcessCrash).await.unwrap();
            }
        });
        let started = Instant::now();
        let mut got = Vec::new();
        while got.is_empty() && started.elapsed() < Duration::from_secs(10) {
            got = broker
                .fetch(&topic, partition, end, 10, true)
                .await
                .unwrap();
        }
        appender.await.unwrap();
        assert_eq!(got.len(), 1, "{name}");
        assert_eq!(got[0].1, e, "{name}");
    }
}

/// A consumer resuming inside a batch of appended events (after a stop or
/// a hand-over) gets the rest of that batch, not the next one.
#[tokio::test]
async fn a_fetch_from_inside_a_batch_skips_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for (name, broker) in backends(dir.path()).await {
        let topic = testing::unique("orders");
        let mut ids = Vec::new();
        for batch in 0..2 {
            let appended: Vec<_> = (0..5)
                .map(|i| event(&topic, &format!("b{batch}e{i}"), "k"))
                .collect();
            ids.extend(appended.iter().map(|e| e.id.clone()));
            broker
                .append(&appended, Durability::ProcessCrash)
                .await
                .unwrap();
        }
        let all = all(&*broker, &topic).await;
        let (partition, offsets) = (all[0].0, all.iter().map(|(_, o, _)| *o).collect::<Vec<_>>());
        for skip in [2, 5, 7] {
            let got = broker
                .fetch(&topic, partition, offsets[skip], 100, false)
                .await
                .unwrap();
            let got: Vec<_> = got.iter().map(|(_, e)| e.id.clone()).collect();
            assert_eq!(got, ids[skip..], "{name}: from the event at {skip}");
        }
    }
}
