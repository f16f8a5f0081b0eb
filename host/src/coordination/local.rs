//! `[backends.coordination] kind = "local"`: this host alone. It holds
//! every lease, and keeps consumer offsets in its data directory, in the
//! `consumer_offsets` table of `messaging/log.db` (where the embedded log
//! has always kept them, so upgrading loses no progress), committed with
//! `synchronous = NORMAL`: a machine crash can take the last commits, which
//! redelivers those events (handlers are idempotent), never skips one.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use serde::Deserialize;

use super::{Claim, Commit, CoordinationSettings, Coordinator, Leases, Unlock};
use crate::plugins::BackendKind;
use crate::storage::SharedConnection;

pub const KIND: BackendKind<dyn CoordinationSettings> = BackendKind {
    kind: "local",
    parse: |table| Ok(Box::new(LocalConfig::deserialize(table)?)),
};

/// `[backends.coordination] kind = "local"`: no settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {}

#[async_trait]
impl CoordinationSettings for LocalConfig {
    fn embedded(&self) -> bool {
        true
    }

    async fn start(&self, data_dir: &Path) -> Result<Arc<dyn Coordinator>> {
        Ok(Arc::new(LocalCoordinator::open(
            &data_dir.join("messaging"),
        )?))
    }
}

pub struct LocalCoordinator {
    conn: SharedConnection,
}

impl LocalCoordinator {
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("log.db");
        // The embedded log writes the same file.
        let conn = SharedConnection::open_file(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS consumer_offsets (
                 consumer TEXT NOT NULL,
                 topic TEXT NOT NULL,
                 partition INTEGER NOT NULL,
                 next INTEGER NOT NULL,
                 PRIMARY KEY (consumer, topic, partition)
             );",
        )
        .with_context(|| format!("initialising consumer offsets in {}", path.display()))?;
        Ok(LocalCoordinator {
            conn: SharedConnection::new(conn, "consumer offsets"),
        })
    }
}

fn read_offset(c: &Connection, claim: &Claim) -> rusqlite::Result<u64> {
    c.query_row(
        "SELECT next FROM consumer_offsets WHERE consumer = ?1 AND topic = ?2 AND partition = ?3",
        params![claim.subscriber, claim.topic, claim.partition],
        |r| r.get::<_, i64>(0),
    )
    .optional()
    .map(|next| next.unwrap_or(0) as u64)
}

#[async_trait]
impl Coordinator for LocalCoordinator {
    fn lease_time(&self) -> Duration {
        // Nobody else could take a lease: they never run out.
        Duration::MAX
    }

    async fn heartbeat(&self, wanted: &[Claim]) -> Result<Leases> {
        let shares = super::subscriptions(wanted)
            .into_iter()
            .map(|(subscription, claims)| (subscription, claims.len()))
            .collect();
        Ok(Leases {
            held: wanted.to_vec(),
            shares,
        })
    }

    async fn release(&self, _claims: &[Claim]) -> Result<()> {
        Ok(())
    }

    async fn committed(&self, claim: &Claim) -> Result<u64> {
        let claim = claim.clone();
        self.conn.with(move |c| read_offset(c, &claim)).await
    }

    async fn commit(&self, claim: &Claim, from: u64, to: u64) -> Result<Commit> {
        let claim = claim.clone();
        self.conn.with(move |c| {
            let current = read_offset(c, &claim)?;
            if current != from {
                return Ok(Commit::Moved(current));
            }
            c.execute(
                "INSERT INTO consumer_offsets (consumer, topic, partition, next) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (consumer, topic, partition) DO UPDATE SET next = excluded.next",
                params![claim.subscriber, claim.topic, claim.partition, to as i64],
            )?;
            Ok(Commit::Done)
        })
        .await
    }

    async fn rewind(&self, claim: &Claim, to: u64) -> Result<()> {
        let claim = claim.clone();
        self.conn.with(move |c| {
            c.execute(
                "INSERT INTO consumer_offsets (consumer, topic, partition, next) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (consumer, topic, partition) DO UPDATE SET next = excluded.next",
                params![claim.subscriber, claim.topic, claim.partition, to as i64],
            )
            .map(|_| ())
        })
        .await
    }

    async fn lock(&self, _name: &str) -> Result<Option<Box<dyn Unlock>>> {
        Ok(None)
    }

    async fn ping(&self) -> Result<()> {
        self.conn
            .with(|c| c.query_row("SELECT 1", [], |_| Ok(())))
            .await
    }

    async fn leave(&self) -> Result<()> {
        Ok(())
    }
}
