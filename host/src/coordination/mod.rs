//! Coordination: what the hosts of one deployment agree on, so that they
//! share the work of consuming events and relaying outboxes.
//!
//! - **Leases.** Each (subscriber, topic, partition), a [`Claim`], is
//!   consumed by one host at a time: the one holding its lease. Hosts renew
//!   their leases on every heartbeat and take free or expired ones up to
//!   their fair share (per subscription, its partitions divided by the live
//!   hosts that subscribe, rounded up: a host running another version
//!   during a deploy leaves nothing unconsumed), so a host that joins gets
//!   work within a few heartbeats and a
//!   host that stops or dies hands its claims over: at once when it stops
//!   (it gives them back), within the lease time when it dies.
//! - **Consumer offsets**, beside the leases, in the same row: an offset is
//!   committed only by the lease's holder and only from the offset that
//!   holder read (compare and set), so a host that lost its lease, or whose
//!   subscriber an operator rewound, learns it at its next commit and
//!   cannot move the offset. A consumer commits only what its handlers
//!   finished, so across any hand-over no event is skipped; the next holder
//!   may handle again the events after the last commit, which handlers
//!   absorb by being idempotent on the event id.
//! - **Locks** across hosts, for one component's outbox relay at a time.
//!
//! Backends: `local` (the default: this host alone, offsets in its data
//! directory) and `postgres` (several hosts, through the deployment's
//! PostgreSQL). Kafka could keep offsets itself only through consumer
//! groups, which rskafka does not implement; PostgreSQL is already every
//! multi-host deployment's, and keeping a lease and its offset in one row
//! makes a commit by a host that lost its lease impossible rather than
//! unlikely.

mod local;
mod postgres;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;

use crate::metrics::PoolUse;
use crate::plugins::{BackendKind, BackendRegistry};

pub use local::LocalConfig;
pub use postgres::PostgresConfig;

/// Every coordination backend, by the `kind` that chooses it in `[backends.coordination]`.
const BACKENDS: &[BackendKind<dyn CoordinationSettings>] = &[local::KIND, postgres::KIND];

/// A coordination backend's settings from `[backends.coordination]`.
#[async_trait]
pub trait CoordinationSettings: std::fmt::Debug + Send + Sync {
    /// Whether this host is alone (no other host can share its work).
    fn embedded(&self) -> bool;
    async fn start(&self, data_dir: &Path) -> Result<Arc<dyn Coordinator>>;
}

/// `[backends.coordination]`: `local` by default.
pub type BackendConfig = crate::plugins::BackendConfig<dyn CoordinationSettings>;

impl BackendRegistry for dyn CoordinationSettings {
    const CAPABILITY: &'static str = "coordination";
    fn kinds() -> &'static [BackendKind<Self>] {
        BACKENDS
    }
    fn default_settings() -> Arc<Self> {
        Arc::new(LocalConfig {})
    }
}

/// What one consumer handles, and what a lease is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Claim {
    pub subscriber: String,
    pub topic: String,
    pub partition: u32,
}

/// This host's leases after a heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub struct Leases {
    /// Every claim whose lease this host holds.
    pub held: Vec<Claim>,
    /// Per subscription (subscriber, topic): how many of its partitions
    /// this host should hold, its partitions divided by the live hosts
    /// that subscribe (rounded up). It gives back the ones above, so that
    /// joining hosts find free leases; hosts that do not subscribe (another
    /// version during a deploy) do not count.
    pub shares: HashMap<(String, String), usize>,
}

impl Leases {
    pub fn share(&self, claim: &Claim) -> usize {
        self.shares
            .get(&(claim.subscriber.clone(), claim.topic.clone()))
            .copied()
            .unwrap_or(0)
    }
}

/// The partitions of each subscription among `claims`.
pub fn subscriptions(claims: &[Claim]) -> HashMap<(String, String), Vec<&Claim>> {
    let mut groups: HashMap<(String, String), Vec<&Claim>> = HashMap::new();
    for claim in claims {
        groups
            .entry((claim.subscriber.clone(), claim.topic.clone()))
            .or_default()
            .push(claim);
    }
    groups
}

/// What became of a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    Done,
    /// The offset was moved by someone else (a rewind) to this one.
    Moved(u64),
    /// Another host holds the lease now.
    Lost,
}

#[async_trait]
pub trait Coordinator: Send + Sync {
    /// How long a lease outlives the last heartbeat of its holder.
    fn lease_time(&self) -> Duration;
    /// Renews this host's leases and takes free ones of `wanted`, up to
    /// its share. Run every [`HEARTBEAT`], well within the lease time.
    async fn heartbeat(&self, wanted: &[Claim]) -> Result<Leases>;
    /// Gives leases back (their consumers have stopped).
    async fn release(&self, claims: &[Claim]) -> Result<()>;
    /// The next offset the claim's subscriber has to handle.
    async fn committed(&self, claim: &Claim) -> Result<u64>;
    /// Moves the offset from `from` (what this host read) to `to`, if this
    /// host holds the lease and nobody moved the offset meanwhile.
    async fn commit(&self, claim: &Claim, from: u64, to: u64) -> Result<Commit>;
    /// Sets the offset, whoever holds the lease (an operator's rewind).
    async fn rewind(&self, claim: &Claim, to: u64) -> Result<()>;
    /// Holds `name` exclusively across hosts until the guard is unlocked
    /// or dropped; `None` where this host is alone.
    async fn lock(&self, name: &str) -> Result<Option<Box<dyn Unlock>>>;
    async fn ping(&self) -> Result<()>;
    /// Gives back every lease of this host and leaves the live hosts, as
    /// it stops: its work is handed over at once.
    async fn leave(&self) -> Result<()>;
    /// Its connection pools' use, for the metrics (none in process).
    fn pools(&self) -> Vec<PoolUse> {
        Vec::new()
    }
}

/// A held cross-host lock.
#[async_trait]
pub trait Unlock: Send {
    async fn unlock(self: Box<Self>);
}

/// How often hosts renew their leases and rebalance. 1 s: a joining host
/// gets its share within about two, at one round trip each.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

#[cfg(test)]
mod contract;
