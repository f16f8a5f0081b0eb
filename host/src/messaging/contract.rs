//! The contract of [`Broker`], run against every messaging backend (the
//! embedded log today; Kafka joins it with issue 8): events come back as
//! they were appended, in order per partition, from any offset; consumer
//! offsets are kept per consumer, topic and partition, across a restart.

use std::path::Path;
use std::sync::Arc;

use super::{Broker, EmbeddedConfig, Envelope, MessagingSettings};
use crate::plugins::Durability;

/// Every backend, started on `dir` (for the embedded ones): the same `dir`
/// gives a restarted backend the same data.
async fn backends(dir: &Path) -> Vec<(&'static str, Arc<dyn Broker>)> {
    let embedded = EmbeddedConfig {
        durability: Durability::ProcessCrash,
    };
    vec![("embedded", embedded.start(dir).await.unwrap())]
}

fn event(id: &str, key: &str) -> Envelope {
    Envelope {
        id: id.into(),
        topic: "orders".into(),
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
        for (offset, event) in broker.read(topic, partition, 0, 1000).await.unwrap() {
            events.push((partition, offset, event));
        }
    }
    events
}

#[tokio::test]
async fn events_come_back_whole_and_in_order_per_key() {
    let dir = tempfile::tempdir().unwrap();
    for (name, broker) in backends(dir.path()).await {
        broker.ping().await.unwrap();
        let appended = [event("a1", "a"), event("b1", "b"), event("a2", "a")];
        broker
            .append(&appended[..2], Durability::ProcessCrash)
            .await
            .unwrap();
        broker
            .append(&appended[2..], Durability::MachineCrash)
            .await
            .unwrap();
        let events = all(&*broker, "orders").await;
        assert_eq!(events.len(), 3, "{name}");
        for original in &appended {
            assert!(
                events.iter().any(|(_, _, e)| e == original),
                "{name}: {} changed or missing",
                original.id
            );
        }
        // Per key: in the order appended, on one partition.
        let of_a: Vec<_> = events
            .iter()
            .filter(|(_, _, e)| e.key.as_deref() == Some("a"))
            .collect();
        assert_eq!(of_a[0].0, of_a[1].0, "{name}: one key, one partition");
        assert!(of_a[0].1 < of_a[1].1, "{name}");
        assert_eq!(
            (of_a[0].2.id.as_str(), of_a[1].2.id.as_str()),
            ("a1", "a2"),
            "{name}"
        );
        // `end` is the next offset of each partition.
        for partition in 0..broker.partitions("orders").await.unwrap() {
            let last = events
                .iter()
                .filter(|(p, _, _)| *p == partition)
                .map(|(_, offset, _)| offset + 1)
                .max();
            if let Some(last) = last {
                assert_eq!(
                    broker.end("orders", partition).await.unwrap(),
                    last,
                    "{name}"
                );
            }
        }
        assert!(all(&*broker, "nothing-here").await.is_empty(), "{name}");
    }
}

#[tokio::test]
async fn a_read_starts_at_its_offset_and_stops_at_its_maximum() {
    let dir = tempfile::tempdir().unwrap();
    for (name, broker) in backends(dir.path()).await {
        let appended: Vec<_> = (0..5).map(|i| event(&format!("e{i}"), "k")).collect();
        broker
            .append(&appended, Durability::ProcessCrash)
            .await
            .unwrap();
        let (partition, first, _) = all(&*broker, "orders").await.remove(0);
        let page = broker
            .read("orders", partition, first + 1, 2)
            .await
            .unwrap();
        let ids: Vec<_> = page.iter().map(|(_, e)| e.id.as_str()).collect();
        assert_eq!(ids, ["e1", "e2"], "{name}");
        assert_eq!(page[0].0, first + 1, "{name}");
    }
}

#[tokio::test]
async fn offsets_are_kept_per_consumer_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    for (name, broker) in backends(dir.path()).await {
        assert_eq!(
            broker.committed("payments", "orders", 0).await.unwrap(),
            0,
            "{name}"
        );
        broker.commit("payments", "orders", 0, 7).await.unwrap();
        broker.commit("payments", "orders", 0, 9).await.unwrap();
        assert_eq!(
            broker.committed("payments", "orders", 0).await.unwrap(),
            9,
            "{name}"
        );
        assert_eq!(
            broker
                .committed("notifications", "orders", 0)
                .await
                .unwrap(),
            0,
            "{name}: another consumer's offset"
        );
        assert_eq!(
            broker.committed("payments", "users", 0).await.unwrap(),
            0,
            "{name}"
        );
    }
    for (name, broker) in backends(dir.path()).await {
        assert_eq!(
            broker.committed("payments", "orders", 0).await.unwrap(),
            9,
            "{name}: after a restart"
        );
    }
}
