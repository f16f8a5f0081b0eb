//! Embedded messaging: a durable log in a SQLite file (`<data>/messaging/log.db`).
//!
//! Topics have `partitions` partitions (4 by default), created on first
//! use; an event's partition is chosen as Kafka's clients choose it
//! ([`partition_of`]), so a subscriber handles that many keys at once and
//! per-key order holds. Offsets are the log's global sequence numbers,
//! increasing but not dense within a partition, which is all a consumer
//! needs. A topic's partition count can grow (raise `partitions`; keys then
//! move, as in Kafka) but never shrinks.
//!
//! Consumers fetch with a long wait: a fetch that finds nothing waits for
//! an append to its partition, up to [`FETCH_MAX_WAIT`], inside this backend
//! (Kafka's broker does the same on its side).
//!
//! Consumers that keep up read from memory: each partition keeps its newest
//! events ([`Tail`]), added once their append has committed. A fetch from
//! an offset the tail covers never reaches SQLite, whose one connection
//! every read, append and offset commit of the host would otherwise queue
//! for, each a hand-off to a blocking thread and back. A consumer further
//! behind (a rewind, a burst larger than the tail; after a restart, until
//! its partition's first new event) reads the file as before. The cost
//! is memory: at most [`TAIL_EVENTS`] events and [`TAIL_BYTES`] per
//! partition, and [`ALL_TAILS_BYTES`] in all, however many topics a
//! component publishes to.
//!
//! The tails hold only this process's appends, so the log is this
//! process's alone: a second host opening the same data directory's log
//! is refused (`log.lock`), rather than its events being missed. Hosts that
//! share messaging share a broker (`kind = "kafka"`).
//!
//! Durability, per the backend's `durability` setting: appends are committed
//! before `append` returns, in WAL mode with `synchronous = NORMAL`
//! (`process-crash`: an acknowledged publish survives a crash of the host
//! process) or `FULL` (`machine-crash`: the WAL is fsynced at every commit,
//! so it survives a crash of the machine too). An append that asks for more
//! than the setting (the outbox relay's) commits with `FULL`, which fsyncs
//! the WAL and so every commit before it.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use async_trait::async_trait;
use rusqlite::{params, Connection};
use serde::Deserialize;
use tokio::sync::watch;

use super::{partition_of, Broker, Envelope, MessagingSettings};
use crate::plugins::{BackendKind, Durability};
use crate::storage::{synchronous, SharedConnection};

pub const KIND: BackendKind<dyn MessagingSettings> = BackendKind {
    kind: "embedded",
    parse: |table| {
        let config = EmbeddedConfig::deserialize(table)?;
        if config.partitions == 0 {
            return Err(serde::de::Error::custom("`partitions` must be above 0"));
        }
        Ok(Box::new(config))
    },
};

/// How long a fetch that finds nothing waits for an append. Appends wake it
/// at once, so this only bounds how long a consumer goes without looking
/// at its stop signal's peers (a topic that grew, a rewind).
const FETCH_MAX_WAIT: Duration = Duration::from_millis(500);

/// The most events a partition's [`Tail`] keeps: four fetches' worth
/// (`delivery.rs` reads 64 at once), so a consumer a few batches behind
/// still reads from memory.
const TAIL_EVENTS: usize = 256;

/// The most bytes ([`cost`]) a partition's [`Tail`] keeps, whatever its
/// event count: a few hundred of the shop's events. An event at the size
/// limit (`MAX_EVENT_BYTES`, plus its id and topic) does not fit, and is
/// read from the file.
const TAIL_BYTES: usize = 256 << 10;

/// The most bytes all tails keep together: a component granted `*` can
/// publish to any number of topics, each with tails of its own. 16 MiB
/// holds 64 full tails (the shop has 20 partitions); past it, a partition
/// keeps nothing new and its consumers read the file.
const ALL_TAILS_BYTES: usize = 16 << 20;

/// `[backends.messaging] kind = "embedded"`: a durable log in a SQLite file
/// under the data directory.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedConfig {
    /// What a direct `publish` survives; the outbox relay's appends always
    /// survive a machine crash.
    #[serde(default)]
    pub durability: Durability,
    /// Partitions of a new topic. 4: a subscriber handles four keys at
    /// once (one slow handler no longer holds up the rest) on a machine of
    /// a few cores; each costs an idle task per subscriber.
    #[serde(default = "default_partitions")]
    pub partitions: u32,
}

fn default_partitions() -> u32 {
    4
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            durability: Durability::default(),
            partitions: default_partitions(),
        }
    }
}

#[async_trait]
impl MessagingSettings for EmbeddedConfig {
    fn embedded(&self) -> bool {
        true
    }

    async fn start(&self, data_dir: &Path) -> Result<Arc<dyn Broker>> {
        Ok(Arc::new(EmbeddedLog::open(
            &data_dir.join("messaging"),
            *self,
        )?))
    }
}

pub struct EmbeddedLog {
    conn: SharedConnection,
    config: EmbeddedConfig,
    /// Partition counts of the topics seen, to place events without a read.
    topics: Mutex<HashMap<String, u32>>,
    /// Per topic and partition, a counter bumped by every append to it,
    /// that waiting fetches watch. Per partition, not per topic: an event
    /// wakes only the consumers that can read it, not one per partition of
    /// each subscriber, whose reads would find nothing.
    appended: Mutex<HashMap<(String, u32), watch::Sender<u64>>>,
    /// Per topic and partition, its newest committed events.
    tails: Arc<Mutex<Tails>>,
    /// Held while the log is open: the tails are right only if this
    /// process alone appends.
    _lock: std::fs::File,
}

/// The tails of the partitions that had events since the log was opened.
struct Tails {
    /// The first offset appended since the log was opened: a partition
    /// without a tail yet has had no event from there on.
    opened_at: u64,
    of: HashMap<(String, u32), Tail>,
    /// Of all tails, at most [`ALL_TAILS_BYTES`].
    bytes: usize,
}

/// A partition's newest events, in offset order: every event of the
/// partition from `covers` on.
struct Tail {
    covers: u64,
    events: VecDeque<(u64, Envelope)>,
    bytes: usize,
}

impl Tails {
    /// Adds committed events, in offset order, dropping the partition's
    /// oldest beyond [`TAIL_EVENTS`], [`TAIL_BYTES`] and [`ALL_TAILS_BYTES`]
    /// (the new event too, if it alone is beyond them).
    fn add(&mut self, appended: Vec<(u64, u32, Envelope)>) {
        for (offset, partition, event) in appended {
            let opened_at = self.opened_at;
            let tail = self
                .of
                .entry((event.topic.clone(), partition))
                .or_insert_with(|| Tail {
                    covers: opened_at,
                    events: VecDeque::new(),
                    bytes: 0,
                });
            let added = cost(&event);
            tail.bytes += added;
            self.bytes += added;
            tail.events.push_back((offset, event));
            while tail.events.len() > TAIL_EVENTS
                || tail.bytes > TAIL_BYTES
                || self.bytes > ALL_TAILS_BYTES
            {
                let Some((dropped, event)) = tail.events.pop_front() else {
                    break;
                };
                let freed = cost(&event);
                tail.bytes -= freed;
                self.bytes -= freed;
                tail.covers = dropped + 1;
            }
        }
    }

    /// Up to `max` events of the partition from offset `from`, if its tail
    /// covers `from`.
    fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Option<Vec<(u64, Envelope)>> {
        let Some(tail) = self.of.get(&(topic.to_owned(), partition)) else {
            return (from >= self.opened_at).then(Vec::new);
        };
        if from < tail.covers {
            return None;
        }
        let first = tail.events.partition_point(|(offset, _)| *offset < from);
        Some(tail.events.range(first..).take(max).cloned().collect())
    }
}

/// What an event takes in a tail: its [`Envelope::size`], its id and
/// topic, and about as much again for the entry itself.
fn cost(event: &Envelope) -> usize {
    event.size() + event.id.len() + event.topic.len() + 64
}

impl EmbeddedLog {
    pub fn open(dir: &Path, config: EmbeddedConfig) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let lock_path = dir.join("log.lock");
        let lock = std::fs::File::create(&lock_path)
            .with_context(|| format!("creating {}", lock_path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "the embedded message log in {} is in use by another process (another host \
                 with this data directory?); hosts that share messaging need a broker \
                 (`[backends.messaging] kind = \"kafka\"`)",
                dir.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", lock_path.display()))
            }
        }
        let path = dir.join("log.db");
        // Local coordination keeps the consumer offsets in the same file.
        let conn = SharedConnection::open_file(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        conn.pragma_update(None, "synchronous", synchronous(config.durability))
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
             CREATE TABLE IF NOT EXISTS topics (
                 name TEXT PRIMARY KEY,
                 partitions INTEGER NOT NULL
             );",
        )
        .with_context(|| format!("initialising {}", path.display()))?;
        // Logs written before topics had partitions hold their events in
        // partition 0.
        let partitioned: bool = conn
            .query_row(
                "SELECT COUNT(*) FROM pragma_table_info('events') WHERE name = 'partition'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n > 0)?;
        if !partitioned {
            conn.execute_batch(
                "ALTER TABLE events ADD COLUMN partition INTEGER NOT NULL DEFAULT 0;
                 DROP INDEX IF EXISTS events_by_topic;",
            )
            .with_context(|| format!("adding partitions to {}", path.display()))?;
        }
        conn.execute_batch(
            "CREATE INDEX IF NOT EXISTS events_by_partition ON events (topic, partition, seq);",
        )
        .with_context(|| format!("initialising {}", path.display()))?;
        // AUTOINCREMENT numbers every new event above every event ever
        // appended, deleted or not, and from 1: in a new log, every offset
        // is covered.
        let opened_at =
            conn.query_row("SELECT COALESCE(MAX(seq) + 1, 0) FROM events", [], |r| {
                r.get::<_, i64>(0)
            })
            .with_context(|| format!("reading the end of {}", path.display()))? as u64;
        Ok(EmbeddedLog {
            conn: SharedConnection::new(conn, "embedded message log"),
            config,
            topics: Mutex::default(),
            appended: Mutex::default(),
            tails: Arc::new(Mutex::new(Tails {
                opened_at,
                of: HashMap::new(),
                bytes: 0,
            })),
            _lock: lock,
        })
    }

    fn appended(&self, topic: &str, partition: u32) -> watch::Sender<u64> {
        self.appended
            .lock()
            .unwrap()
            .entry((topic.to_owned(), partition))
            .or_insert_with(|| watch::channel(0).0)
            .clone()
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, Envelope)>> {
        let in_tail = self.tails.lock().unwrap().read(topic, partition, from, max);
        match in_tail {
            Some(events) => Ok(events),
            None => self.read_file(topic, partition, from, max).await,
        }
    }

    async fn read_file(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, Envelope)>> {
        let topic = topic.to_owned();
        let rows = self
            .conn
            .with(move |c| {
                let mut stmt = c.prepare_cached(
                    "SELECT seq, id, key, payload, headers, published_at FROM events
                     WHERE topic = ?1 AND partition = ?2 AND seq >= ?3 ORDER BY seq LIMIT ?4",
                )?;
                let rows =
                    stmt.query_map(params![topic, partition, from as i64, max as i64], |r| {
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
}

#[async_trait]
impl Broker for EmbeddedLog {
    async fn partitions(&self, topic: &str) -> Result<u32> {
        if let Some(n) = self.topics.lock().unwrap().get(topic) {
            return Ok(*n);
        }
        let (name, wanted) = (topic.to_owned(), self.config.partitions);
        let n = self
            .conn
            .with(move |c| {
                // Created with the configured count, grown to it if it was
                // created smaller; never shrunk.
                c.execute(
                    "INSERT INTO topics (name, partitions) VALUES (?1, ?2)
                     ON CONFLICT (name) DO UPDATE SET partitions = MAX(partitions, excluded.partitions)",
                    params![name, wanted],
                )?;
                c.query_row(
                    "SELECT partitions FROM topics WHERE name = ?1",
                    [name],
                    |r| r.get::<_, u32>(0),
                )
            })
            .await?;
        self.topics.lock().unwrap().insert(topic.to_owned(), n);
        Ok(n)
    }

    async fn append(&self, events: &[Envelope], at_least: Durability) -> Result<()> {
        let mut rows = Vec::with_capacity(events.len());
        let mut woken = Vec::new();
        for event in events {
            let partition = partition_of(event, self.partitions(&event.topic).await?);
            if !woken.contains(&(&event.topic, partition)) {
                woken.push((&event.topic, partition));
            }
            rows.push((
                event.clone(),
                partition,
                serde_json::to_string(&event.headers)?,
            ));
        }
        let (configured, wanted) = (self.config.durability, self.config.durability.max(at_least));
        let tails = self.tails.clone();
        self.conn.with(move |c| {
            if wanted != configured {
                c.pragma_update(None, "synchronous", synchronous(wanted))?;
            }
            // Added to the tails while the connection is held, so in offset
            // order, and only once committed, so never read before that.
            let appended = append_rows(c, rows).map(|appended| tails.lock().unwrap().add(appended));
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
        .await?;
        for (topic, partition) in woken {
            self.appended(topic, partition)
                .send_modify(|n| *n = n.wrapping_add(1));
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
        // Watching before reading: an append between the two is not missed.
        let mut appended = self.appended(topic, partition).subscribe();
        let events = self.read(topic, partition, from, max).await?;
        if !events.is_empty() || !wait {
            return Ok(events);
        }
        let deadline = tokio::time::Instant::now() + FETCH_MAX_WAIT;
        while tokio::time::timeout_at(deadline, appended.changed())
            .await
            .is_ok_and(|changed| changed.is_ok())
        {
            let events = self.read(topic, partition, from, max).await?;
            if !events.is_empty() {
                return Ok(events);
            }
        }
        Ok(Vec::new())
    }

    async fn end(&self, topic: &str, partition: u32) -> Result<u64> {
        let topic = topic.to_owned();
        let last = self
            .conn
            .with(move |c| {
                c.query_row(
                    "SELECT MAX(seq) FROM events WHERE topic = ?1 AND partition = ?2",
                    params![topic, partition],
                    |r| r.get::<_, Option<i64>>(0),
                )
            })
            .await?;
        Ok(last.map_or(0, |seq| seq as u64 + 1))
    }

    /// Counted: offsets are the log's sequence numbers, shared by every
    /// topic and partition, so the end less `from` would count other
    /// partitions' events too.
    async fn behind(&self, topic: &str, partition: u32, from: u64) -> Result<u64> {
        let topic = topic.to_owned();
        let behind = self
            .conn
            .with(move |c| {
                c.query_row(
                    "SELECT COUNT(*) FROM events WHERE topic = ?1 AND partition = ?2 AND seq >= ?3",
                    params![topic, partition, from as i64],
                    |r| r.get::<_, i64>(0),
                )
            })
            .await?;
        Ok(behind as u64)
    }

    async fn ping(&self) -> Result<()> {
        self.conn
            .with(|c| c.query_row("SELECT 1", [], |_| Ok(())))
            .await
    }
}

/// Appends the events in one transaction; returns them with their offsets
/// once committed.
fn append_rows(
    c: &mut Connection,
    rows: Vec<(Envelope, u32, String)>,
) -> rusqlite::Result<Vec<(u64, u32, Envelope)>> {
    let tx = c.transaction()?;
    let mut appended = Vec::with_capacity(rows.len());
    for (e, partition, headers) in rows {
        tx.execute(
            "INSERT INTO events (topic, partition, id, key, payload, headers, published_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                e.topic,
                partition,
                e.id,
                e.key,
                e.payload,
                headers,
                e.published_at as i64
            ],
        )?;
        appended.push((tx.last_insert_rowid() as u64, partition, e));
    }
    tx.commit()?;
    Ok(appended)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn synchronous_level(log: &EmbeddedLog) -> i64 {
        log.conn
            .with(|c| c.query_row("PRAGMA synchronous", [], |r| r.get(0)))
            .await
            .unwrap()
    }

    /// Every event of a topic in partition 0, whatever its key.
    const ONE_PARTITION: EmbeddedConfig = EmbeddedConfig {
        durability: Durability::ProcessCrash,
        partitions: 1,
    };

    /// A new log of [`ONE_PARTITION`], in a directory that lasts as long
    /// as the returned one.
    fn one_partition_log() -> (tempfile::TempDir, EmbeddedLog) {
        let dir = tempfile::TempDir::new().unwrap();
        let log = EmbeddedLog::open(dir.path(), ONE_PARTITION).unwrap();
        (dir, log)
    }

    fn event(key: &str) -> Envelope {
        Envelope {
            id: key.into(),
            topic: "t".into(),
            key: Some(key.into()),
            payload: b"{}".to_vec(),
            headers: Vec::new(),
            published_at: 0,
        }
    }

    #[tokio::test]
    async fn durability_sets_synchronous_and_an_append_may_ask_for_more() {
        // SQLite's numbers: NORMAL is 1, FULL is 2.
        for (durability, level) in [(Durability::ProcessCrash, 1), (Durability::MachineCrash, 2)] {
            let dir = tempfile::TempDir::new().unwrap();
            let config = EmbeddedConfig {
                durability,
                partitions: 1,
            };
            let log = EmbeddedLog::open(dir.path(), config).unwrap();
            assert_eq!(synchronous_level(&log).await, level);
            log.append(&[event("k")], Durability::MachineCrash)
                .await
                .unwrap();
            assert_eq!(
                synchronous_level(&log).await,
                level,
                "the setting is restored"
            );
            assert_eq!(log.fetch("t", 0, 0, 10, false).await.unwrap().len(), 1);
        }
    }

    /// An append wakes the fetches waiting on its event's partition, and
    /// only those: a lost wake-up would leave a consumer idle for
    /// `FETCH_MAX_WAIT` with an event to read.
    #[tokio::test]
    async fn an_append_wakes_the_waiters_of_its_partition_only() {
        let dir = tempfile::TempDir::new().unwrap();
        let config = EmbeddedConfig::default();
        let log = EmbeddedLog::open(dir.path(), config).unwrap();
        let e = event("k");
        let partition = partition_of(&e, config.partitions);
        let mut waiters: Vec<_> = (0..config.partitions)
            .map(|p| (p, log.appended("t", p).subscribe()))
            .collect();
        log.append(&[e], Durability::ProcessCrash).await.unwrap();
        for (p, waiter) in &mut waiters {
            assert_eq!(
                waiter.has_changed().unwrap(),
                *p == partition,
                "partition {p}; the event went to {partition}"
            );
        }
        assert_eq!(
            log.fetch("t", partition, 0, 10, false).await.unwrap().len(),
            1
        );
    }

    /// The log and the consumer offsets are two connections to one file:
    /// an append that meets the other's write lock waits for it instead of
    /// failing with "database is locked".
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_append_waits_for_a_lock_held_on_the_same_file() {
        let (dir, log) = one_partition_log();
        let holder = Connection::open(dir.path().join("log.db")).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let released = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            holder.execute_batch("COMMIT").unwrap();
        });
        let started = std::time::Instant::now();
        log.append(&[event("k")], Durability::ProcessCrash)
            .await
            .unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "appended while the lock was held"
        );
        released.join().unwrap();
        assert_eq!(log.fetch("t", 0, 0, 10, false).await.unwrap().len(), 1);
    }

    /// A log written before partitions keeps its events, in partition 0, and
    /// a topic made with fewer partitions grows to the configured count.
    #[tokio::test]
    async fn an_unpartitioned_log_is_upgraded_and_topics_grow() {
        let dir = tempfile::TempDir::new().unwrap();
        {
            let c = SharedConnection::open_file(&dir.path().join("log.db")).unwrap();
            c.execute_batch(
                "CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,
                     id TEXT NOT NULL, key TEXT, payload BLOB NOT NULL, headers TEXT NOT NULL,
                     published_at INTEGER NOT NULL);
                 CREATE INDEX events_by_topic ON events (topic, seq);
                 INSERT INTO events (topic, id, key, payload, headers, published_at)
                     VALUES ('t', 'old', 'k', x'7b7d', '[]', 0);",
            )
            .unwrap();
        }
        let open = |partitions| {
            EmbeddedLog::open(
                dir.path(),
                EmbeddedConfig {
                    durability: Durability::ProcessCrash,
                    partitions,
                },
            )
            .unwrap()
        };
        let log = open(2);
        let old = log.fetch("t", 0, 0, 10, false).await.unwrap();
        assert_eq!(old.len(), 1);
        assert_eq!(old[0].1.id, "old");
        assert_eq!(log.partitions("t").await.unwrap(), 2);
        drop(log);
        assert_eq!(open(1).partitions("t").await.unwrap(), 2, "never shrunk");
        assert_eq!(open(6).partitions("t").await.unwrap(), 6, "grown");
    }

    /// Whatever the tail holds, a read answers what the file holds: for
    /// every offset, across the eviction of old events by count and by
    /// size, and after a reopening, which starts with no tail.
    #[tokio::test]
    async fn reads_from_the_tail_answer_what_the_file_holds() {
        let (dir, log) = one_partition_log();
        let large = |key: &str| Envelope {
            payload: vec![b'x'; 100 << 10],
            ..event(key)
        };
        for i in 0..TAIL_EVENTS + 20 {
            log.append(&[event(&format!("k{i}"))], Durability::ProcessCrash)
                .await
                .unwrap();
        }
        log.append(
            &[large("a"), large("b"), large("c")],
            Durability::ProcessCrash,
        )
        .await
        .unwrap();
        let offsets: Vec<u64> = log
            .read_file("t", 0, 0, usize::MAX)
            .await
            .unwrap()
            .iter()
            .map(|(offset, _)| *offset)
            .collect();
        assert_eq!(offsets.len(), TAIL_EVENTS + 23);
        let (kept, covers) = {
            let tails = log.tails.lock().unwrap();
            let tail = &tails.of[&("t".to_owned(), 0)];
            (tail.events.len(), tail.covers)
        };
        assert_eq!(kept, 2, "two large events fit in TAIL_BYTES");
        assert!(
            covers > offsets[TAIL_EVENTS],
            "the third large one pushed out the rest"
        );
        for from in [0].into_iter().chain(offsets.iter().copied()) {
            assert_eq!(
                log.read("t", 0, from, 64).await.unwrap(),
                log.read_file("t", 0, from, 64).await.unwrap(),
                "from {from} (the tail covers {covers} on)"
            );
        }
        let end = offsets.last().unwrap() + 1;
        assert!(log.read("t", 0, end, 64).await.unwrap().is_empty());
        drop(log);
        let reopened = EmbeddedLog::open(dir.path(), ONE_PARTITION).unwrap();
        assert_eq!(
            reopened.read("t", 0, 0, usize::MAX).await.unwrap().len(),
            offsets.len()
        );
        assert!(reopened.read("t", 0, end, 64).await.unwrap().is_empty());
    }

    /// However many topics a component publishes to, the tails stay within
    /// ALL_TAILS_BYTES, and a partition left without one reads the file.
    #[tokio::test]
    async fn the_tails_of_many_topics_stay_within_their_budget() {
        let (_dir, log) = one_partition_log();
        let topics = ALL_TAILS_BYTES / (200 << 10) + 8;
        for t in 0..topics {
            let event = Envelope {
                topic: format!("t{t}"),
                payload: vec![b'x'; 200 << 10],
                ..event("k")
            };
            log.append(&[event], Durability::ProcessCrash)
                .await
                .unwrap();
        }
        let kept = log.tails.lock().unwrap().bytes;
        assert!(kept <= ALL_TAILS_BYTES, "{kept} bytes kept");
        assert!(kept > ALL_TAILS_BYTES / 2, "only {kept} bytes kept");
        for t in 0..topics {
            let events = log.read(&format!("t{t}"), 0, 0, 10).await.unwrap();
            assert_eq!(events.len(), 1, "topic t{t}");
            assert_eq!(events[0].1.payload.len(), 200 << 10);
        }
    }

    /// The log is one process's: a second opening of it is refused while
    /// the first is open, with a message that says why, and not after.
    #[test]
    fn a_second_opening_of_the_log_is_refused_while_it_is_open() {
        let dir = tempfile::TempDir::new().unwrap();
        let log = EmbeddedLog::open(dir.path(), EmbeddedConfig::default()).unwrap();
        let refused = EmbeddedLog::open(dir.path(), EmbeddedConfig::default())
            .err()
            .expect("opened twice");
        assert!(
            refused.to_string().contains("in use by another process"),
            "{refused:#}"
        );
        drop(log);
        EmbeddedLog::open(dir.path(), EmbeddedConfig::default()).unwrap();
    }

    /// A consumer that keeps up does not queue behind the log's connection:
    /// its fetch is answered while an append (here, any job) holds it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fetch_from_the_tail_does_not_wait_for_the_connection() {
        let dir = tempfile::TempDir::new().unwrap();
        let log = Arc::new(EmbeddedLog::open(dir.path(), EmbeddedConfig::default()).unwrap());
        let e = event("k");
        let partition = partition_of(&e, EmbeddedConfig::default().partitions);
        log.append(std::slice::from_ref(&e), Durability::ProcessCrash)
            .await
            .unwrap();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (held, holding) = tokio::sync::oneshot::channel();
        let holder = tokio::spawn({
            let log = log.clone();
            async move {
                log.conn
                    .with(move |_| {
                        held.send(()).unwrap();
                        Ok(released.recv())
                    })
                    .await
            }
        });
        holding.await.unwrap();
        let fetched = tokio::time::timeout(
            Duration::from_secs(10),
            log.fetch("t", partition, 0, 10, true),
        )
        .await
        .expect("the fetch waited for the connection")
        .unwrap();
        assert_eq!(fetched.len(), 1);
        assert_eq!(fetched[0].1, e);
        release.send(()).unwrap();
        holder.await.unwrap().unwrap().unwrap();
    }

    /// A fetch that finds nothing waits for the next append and returns it.
    #[tokio::test]
    async fn a_waiting_fetch_returns_as_soon_as_an_event_arrives() {
        let (_dir, log) = one_partition_log();
        let log = Arc::new(log);
        let waiting = tokio::spawn({
            let log = log.clone();
            async move { log.fetch("t", 0, 0, 10, true).await.unwrap() }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        log.append(&[event("k")], Durability::ProcessCrash)
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let events = waiting.await.unwrap();
        assert_eq!(events.len(), 1);
        assert!(started.elapsed() < FETCH_MAX_WAIT, "woken by the append");
    }
}
