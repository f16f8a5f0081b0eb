//! Embedded messaging: a durable log in a SQLite file (`<data>/messaging/log.db`).
//!
//! One partition per topic: the embedded host is a single process, so order
//! per topic (stronger than per key) costs nothing. Offsets are the log's
//! global sequence numbers, increasing but not dense within a topic, which
//! is all a consumer needs.
//!
//! Durability, per the backend's `durability` setting: appends are committed
//! before `append` returns, in WAL mode with `synchronous = NORMAL`
//! (`process-crash`: an acknowledged publish survives a crash of the host
//! process) or `FULL` (`machine-crash`: the WAL is fsynced at every commit,
//! so it survives a crash of the machine too). An append that asks for more
//! than the setting (the outbox relay's) commits with `FULL`, which fsyncs
//! the WAL and so every commit before it.

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use serde::Deserialize;

use super::{Broker, Envelope, MessagingSettings};
use crate::plugins::{BackendKind, Durability};
use crate::storage::synchronous;

pub const KIND: BackendKind<dyn MessagingSettings> = BackendKind {
    kind: "embedded",
    parse: |table| Ok(Box::new(EmbeddedConfig::deserialize(table)?)),
};

/// `[backends.messaging] kind = "embedded"`: a durable log in a SQLite file
/// under the data directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedConfig {
    /// What a direct `publish` survives; the outbox relay's appends always
    /// survive a machine crash.
    #[serde(default)]
    pub durability: Durability,
}

#[async_trait]
impl MessagingSettings for EmbeddedConfig {
    fn embedded(&self) -> bool {
        true
    }

    async fn start(&self, data_dir: &Path) -> Result<Arc<dyn Broker>> {
        Ok(Arc::new(EmbeddedLog::open(
            &data_dir.join("messaging"),
            self.durability,
        )?))
    }
}

pub struct EmbeddedLog {
    conn: Arc<Mutex<Connection>>,
    durability: Durability,
}

impl EmbeddedLog {
    pub fn open(dir: &Path, durability: Durability) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("log.db");
        let conn =
            Connection::open(&path).with_context(|| format!("opening {}", path.display()))?;
        conn.pragma_update(None, "synchronous", synchronous(durability))
            .with_context(|| format!("initialising {}", path.display()))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE IF NOT EXISTS events (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 topic TEXT NOT NULL,
                 id TEXT NOT NULL,
                 key TEXT,
                 payload BLOB NOT NULL,
                 headers TEXT NOT NULL,
                 published_at INTEGER NOT NULL
             );
             CREATE INDEX IF NOT EXISTS events_by_topic ON events (topic, seq);
             CREATE TABLE IF NOT EXISTS consumer_offsets (
                 consumer TEXT NOT NULL,
                 topic TEXT NOT NULL,
                 partition INTEGER NOT NULL,
                 next INTEGER NOT NULL,
                 PRIMARY KEY (consumer, topic, partition)
             );",
        )
        .with_context(|| format!("initialising {}", path.display()))?;
        Ok(EmbeddedLog {
            conn: Arc::new(Mutex::new(conn)),
            durability,
        })
    }

    async fn with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R> {
        let conn = self.conn.clone();
        let result = tokio::task::spawn_blocking(move || f(&mut conn.lock().unwrap())).await?;
        result.context("embedded message log")
    }
}

#[async_trait]
impl Broker for EmbeddedLog {
    async fn append(&self, events: &[Envelope], at_least: Durability) -> Result<()> {
        let rows: Vec<(Envelope, String)> = events
            .iter()
            .map(|e| Ok((e.clone(), serde_json::to_string(&e.headers)?)))
            .collect::<Result<_>>()?;
        let (configured, wanted) = (self.durability, self.durability.max(at_least));
        self.with(move |c| {
            if wanted != configured {
                c.pragma_update(None, "synchronous", synchronous(wanted))?;
            }
            let appended = append_rows(c, rows);
            if wanted != configured {
                // The append may have committed: an error here would make
                // the caller append again (duplicates). Left stronger than
                // configured, the log is only slower.
                if let Err(e) = c.pragma_update(None, "synchronous", synchronous(configured)) {
                    tracing::warn!(error = %e, "embedded message log: cannot restore `synchronous`; appends stay synchronous = {}", synchronous(wanted));
                }
            }
            appended
        })
        .await
    }

    async fn partitions(&self, _topic: &str) -> Result<u32> {
        Ok(1)
    }

    async fn read(
        &self,
        topic: &str,
        _partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, Envelope)>> {
        let topic = topic.to_owned();
        let rows = self
            .with(move |c| {
                let mut stmt = c.prepare_cached(
                    "SELECT seq, id, key, payload, headers, published_at FROM events
                     WHERE topic = ?1 AND seq >= ?2 ORDER BY seq LIMIT ?3",
                )?;
                let rows = stmt.query_map(params![topic, from as i64, max as i64], |r| {
                    Ok((
                        r.get::<_, i64>(0)? as u64,
                        Envelope {
                            id: r.get(1)?,
                            topic: topic.clone(),
                            key: r.get(2)?,
                            payload: r.get(3)?,
                            headers: Vec::new(),
                            published_at: r.get::<_, i64>(5)? as u64,
                        },
                        r.get::<_, String>(4)?,
                    ))
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        rows.into_iter()
            .map(|(seq, mut event, headers)| {
                event.headers = serde_json::from_str(&headers)
                    .with_context(|| format!("headers of event {seq}"))?;
                Ok((seq, event))
            })
            .collect()
    }

    async fn end(&self, topic: &str, _partition: u32) -> Result<u64> {
        let topic = topic.to_owned();
        let last = self
            .with(move |c| {
                c.query_row(
                    "SELECT MAX(seq) FROM events WHERE topic = ?1",
                    [topic],
                    |r| r.get::<_, Option<i64>>(0),
                )
            })
            .await?;
        Ok(last.map_or(0, |seq| seq as u64 + 1))
    }

    async fn committed(&self, consumer: &str, topic: &str, partition: u32) -> Result<u64> {
        let (consumer, topic) = (consumer.to_owned(), topic.to_owned());
        let next = self
            .with(move |c| {
                c.query_row(
                    "SELECT next FROM consumer_offsets WHERE consumer = ?1 AND topic = ?2 AND partition = ?3",
                    params![consumer, topic, partition],
                    |r| r.get::<_, i64>(0),
                )
                .optional()
            })
            .await?;
        Ok(next.unwrap_or(0) as u64)
    }

    async fn commit(&self, consumer: &str, topic: &str, partition: u32, next: u64) -> Result<()> {
        let (consumer, topic) = (consumer.to_owned(), topic.to_owned());
        self.with(move |c| {
            c.execute(
                "INSERT INTO consumer_offsets (consumer, topic, partition, next) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (consumer, topic, partition) DO UPDATE SET next = excluded.next",
                params![consumer, topic, partition, next as i64],
            )
            .map(|_| ())
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        self.with(|c| c.query_row("SELECT 1", [], |_| Ok(()))).await
    }
}

fn append_rows(c: &mut Connection, rows: Vec<(Envelope, String)>) -> rusqlite::Result<()> {
    let tx = c.transaction()?;
    for (e, headers) in rows {
        tx.execute(
            "INSERT INTO events (topic, id, key, payload, headers, published_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                e.topic,
                e.id,
                e.key,
                e.payload,
                headers,
                e.published_at as i64
            ],
        )?;
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn synchronous_level(log: &EmbeddedLog) -> i64 {
        log.with(|c| c.query_row("PRAGMA synchronous", [], |r| r.get(0)))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn durability_sets_synchronous_and_an_append_may_ask_for_more() {
        let event = Envelope {
            id: "1".into(),
            topic: "t".into(),
            key: None,
            payload: b"{}".to_vec(),
            headers: Vec::new(),
            published_at: 0,
        };
        // SQLite's numbers: NORMAL is 1, FULL is 2.
        for (durability, level) in [(Durability::ProcessCrash, 1), (Durability::MachineCrash, 2)] {
            let dir = tempfile::TempDir::new().unwrap();
            let log = EmbeddedLog::open(dir.path(), durability).unwrap();
            assert_eq!(synchronous_level(&log).await, level);
            log.append(std::slice::from_ref(&event), Durability::MachineCrash)
                .await
                .unwrap();
            assert_eq!(
                synchronous_level(&log).await,
                level,
                "the setting is restored"
            );
            assert_eq!(log.read("t", 0, 0, 10).await.unwrap().len(), 1);
        }
    }
}
