//! `[backends.coordination] kind = "postgres"`: several hosts sharing one
//! PostgreSQL, in the host schema `<namespace>` (no component has `USAGE`
//! on it, see `storage/postgres.rs`).
//!
//! - `<namespace>.hosts`: one row per live host, its `seen` time renewed
//!   on each heartbeat; rows older than the lease time are removed by
//!   whichever host notices, so a dead host stops counting in the shares.
//! - `<namespace>.consumer_offsets`: per claim, the next offset, the
//!   lease's holder and its expiry. Expiry is measured on the server's
//!   clock, so hosts' clocks need not agree. A holder's own check is
//!   stricter: its consumers stop handling once `lease_seconds` minus one
//!   heartbeat have passed since its last successful heartbeat began (see
//!   `messaging/delivery.rs`), before the server can hand the lease on.
//! - Outbox locks: a row of `<namespace>.locks` locked (`FOR UPDATE`) in a
//!   transaction the guard holds open on its own connection. Not an
//!   advisory lock: any role may take those, so a component could hold a
//!   key and stall another's outbox. A host that dies loses its connection
//!   and with it the lock, at once; a guard dropped before it got the lock
//!   (a caller that stopped waiting) closes its connection rather than
//!   return a session to the pool that may get the lock later.
//! - Every statement has a timeout (`statement_timeout`, and the host's own
//!   around each call), so an unreachable server fails a heartbeat rather
//!   than hang it; heartbeats and commits have connections of their own,
//!   apart from those waiting for outbox locks.
//!
//! Hand-over times, with the defaults: a host that stops gives its leases
//! back before it exits (the next holder starts within a heartbeat, 1 s); a
//! host killed or cut off loses them when they expire (`lease_seconds`,
//! 10 s) and the others take them at their next heartbeat. A host restarted
//! on the same data directory is the same host (its id is kept there, and
//! used only by the process holding `coordination.lock` in it), so it takes
//! its leases back at its first heartbeat instead of waiting them out.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use async_trait::async_trait;
use deadpool_postgres::{Object, Pool};
use serde::Deserialize;

use super::{Claim, Commit, CoordinationSettings, Coordinator, Leases, Unlock, HEARTBEAT};
use crate::metrics::{metrics, PoolUse};
use crate::pg::{self, ident, redacted};
use crate::plugins::BackendKind;

pub const KIND: BackendKind<dyn CoordinationSettings> = BackendKind {
    kind: "postgres",
    parse: |table| {
        let config = PostgresConfig::deserialize(table)?;
        config.check().map_err(serde::de::Error::custom)?;
        Ok(Box::new(config))
    },
};

/// `[backends.coordination] kind = "postgres"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// The deployment's PostgreSQL, usually storage's `url`. No default.
    pub url: String,
    /// The host schema's name, as storage's `namespace` (`agora` by default).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// How long a lease outlives its holder's last heartbeat. 10 s: ten
    /// heartbeats, so a slow round trip or a pause of the host does not
    /// hand work over; and the longest a dead host's partitions wait.
    #[serde(default = "default_lease_seconds")]
    pub lease_seconds: u64,
}

fn default_namespace() -> String {
    "agora".into()
}
fn default_lease_seconds() -> u64 {
    10
}

impl PostgresConfig {
    fn check(&self) -> Result<(), String> {
        pg::check_namespace(&self.namespace)?;
        if Duration::from_secs(self.lease_seconds) < HEARTBEAT * 3 {
            return Err(format!(
                "`lease_seconds` must be at least {} (three heartbeats)",
                (HEARTBEAT * 3).as_secs()
            ));
        }
        self.url
            .parse::<tokio_postgres::Config>()
            .map_err(|e| format!("`url` is not a PostgreSQL URL: {e}"))?;
        Ok(())
    }
}

/// Connections for commits and reads of offsets (heartbeats have one of
/// their own, so consumers never hold them up).
const CONNECTIONS: usize = 4;
/// Connections for outbox locks, one per lock held or awaited (a component
/// relaying, and direct publishes behind it).
const LOCK_CONNECTIONS: usize = 16;
/// How long connecting, an outbox lock, or one call may take before it
/// fails (and is retried by its caller).
const TIMEOUT: Duration = Duration::from_secs(5);
/// How long an outbox lock may sit idle in its transaction before the
/// server ends it: far beyond one batch, and a frozen host (paused, starved)
/// cannot stall the outbox for ever; at worst a batch is sent twice.
const LOCK_IDLE_LIMIT: Duration = Duration::from_secs(30);

#[async_trait]
impl CoordinationSettings for PostgresConfig {
    fn embedded(&self) -> bool {
        false
    }

    async fn start(&self, data_dir: &Path) -> Result<Arc<dyn Coordinator>> {
        let mut coordinator = PostgresCoordinator::connect(self).await?;
        coordinator.identity = HostIdentity::claim(data_dir)?;
        Ok(Arc::new(coordinator))
    }
}

pub struct PostgresCoordinator {
    beats: Pool,
    pool: Pool,
    locks: Pool,
    ns: String,
    identity: HostIdentity,
    lease: Duration,
}

impl PostgresCoordinator {
    pub async fn connect(config: &PostgresConfig) -> Result<Self> {
        config.check().map_err(anyhow::Error::msg)?;
        let mut server: tokio_postgres::Config = config.url.parse()?;
        server.connect_timeout(TIMEOUT);
        server.application_name("agora-coordination");
        // A server that stops answering fails the connection (which the
        // pool then drops) instead of leaving a call hanging for minutes.
        server.tcp_user_timeout(TIMEOUT * 2);
        server.keepalives_idle(TIMEOUT);
        // Bounds the wait for an outbox lock, and any statement.
        let ms = TIMEOUT.as_millis();
        server.options(format!("-c lock_timeout={ms} -c statement_timeout={ms}"));
        let beats = pg::pool(server.clone(), 1, TIMEOUT)
            .build()
            .context("making the coordination pool")?;
        let pool = pg::pool(server.clone(), CONNECTIONS, TIMEOUT)
            .build()
            .context("making the coordination pool")?;
        // A host that froze while holding a lock loses it after 30 s.
        server.options(format!(
            "-c lock_timeout={ms} -c statement_timeout={ms} \
             -c idle_in_transaction_session_timeout={}",
            LOCK_IDLE_LIMIT.as_millis()
        ));
        let locks = pg::pool(server, LOCK_CONNECTIONS, TIMEOUT)
            .build()
            .context("making the coordination pool")?;
        let ns = ident(&config.namespace);
        let sql = format!(
            "CREATE SCHEMA IF NOT EXISTS {ns};
             REVOKE ALL ON SCHEMA {ns} FROM PUBLIC;
             CREATE TABLE IF NOT EXISTS {ns}.hosts (
                 id TEXT PRIMARY KEY, seen TIMESTAMPTZ NOT NULL);
             ALTER TABLE {ns}.hosts ADD COLUMN IF NOT EXISTS wants TEXT[] NOT NULL DEFAULT '{{}}';
             CREATE TABLE IF NOT EXISTS {ns}.locks (name TEXT PRIMARY KEY);
             CREATE TABLE IF NOT EXISTS {ns}.consumer_offsets (
                 subscriber TEXT NOT NULL, topic TEXT NOT NULL, partition INT NOT NULL,
                 next BIGINT NOT NULL DEFAULT 0, holder TEXT, expires TIMESTAMPTZ,
                 PRIMARY KEY (subscriber, topic, partition))"
        );
        let prepare = async {
            let conn = pool.get().await?;
            pg::run_with_retry(&conn, &sql).await?;
            anyhow::Ok(())
        };
        prepare.await.with_context(|| {
            format!(
                "preparing coordination in PostgreSQL at {}",
                redacted(&config.url)
            )
        })?;
        Ok(PostgresCoordinator {
            beats,
            pool,
            locks,
            ns,
            identity: HostIdentity::fresh(),
            lease: Duration::from_secs(config.lease_seconds),
        })
    }

    async fn conn(&self) -> Result<Object> {
        self.pool
            .get()
            .await
            .context("PostgreSQL (coordination) is unreachable")
    }

    fn lease_secs(&self) -> f64 {
        self.lease.as_secs_f64()
    }
}

impl PostgresCoordinator {
    async fn take_lock(&self, name: &str) -> Result<Option<Box<dyn Unlock>>> {
        let conn = self
            .locks
            .get()
            .await
            .context("PostgreSQL (coordination) is unreachable")?;
        // Guarded before the first statement: dropped while waiting, the
        // session is closed, never pooled with a lock it may yet get.
        let lock = RowLock { conn: Some(conn) };
        let client = lock.conn.as_ref().unwrap();
        let ns = &self.ns;
        client
            .batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED")
            .await
            .context("beginning a lock")?;
        client
            .execute(
                &format!("INSERT INTO {ns}.locks VALUES ($1) ON CONFLICT DO NOTHING"),
                &[&name],
            )
            .await
            .with_context(|| format!("waiting for the lock `{name}`"))?;
        client
            .execute(
                &format!("SELECT 1 FROM {ns}.locks WHERE name = $1 FOR UPDATE"),
                &[&name],
            )
            .await
            .with_context(|| format!("waiting for the lock `{name}`"))?;
        Ok(Some(Box::new(lock)))
    }

    async fn beat(&self, wanted: &[Claim]) -> Result<Leases> {
        let ns = &self.ns;
        let conn = self
            .beats
            .get()
            .await
            .context("PostgreSQL (coordination) is unreachable")?;
        let lease = self.lease_secs();
        let groups = super::subscriptions(wanted);
        let key = |(subscriber, topic): &(String, String)| format!("{subscriber}\u{1f}{topic}");
        let wants: Vec<String> = groups.keys().map(key).collect();
        conn.execute(
            &format!(
                "INSERT INTO {ns}.hosts (id, seen, wants) VALUES ($1, now(), $2)
                 ON CONFLICT (id) DO UPDATE SET seen = now(), wants = excluded.wants"
            ),
            &[&self.identity.id, &wants],
        )
        .await?;
        conn.execute(
            &format!("DELETE FROM {ns}.hosts WHERE seen < now() - make_interval(secs => $1)"),
            &[&lease],
        )
        .await?;
        // How many live hosts subscribe to each subscription.
        let subscribed: std::collections::HashMap<String, i64> = conn
            .query(
                &format!("SELECT w, count(*) FROM {ns}.hosts, unnest(wants) w GROUP BY w"),
                &[],
            )
            .await?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let (subscribers, topics, partitions) = columns(wanted.iter());
        conn.execute(
            &format!(
                "INSERT INTO {ns}.consumer_offsets (subscriber, topic, partition)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::int[])
                 ON CONFLICT DO NOTHING"
            ),
            &[&subscribers, &topics, &partitions],
        )
        .await?;
        let mut held = claims(
            conn.query(
                &format!(
                    "UPDATE {ns}.consumer_offsets SET expires = now() + make_interval(secs => $2)
                     WHERE holder = $1 RETURNING subscriber, topic, partition"
                ),
                &[&self.identity.id, &lease],
            )
            .await?,
        );
        let mut shares = std::collections::HashMap::new();
        for (subscription, claimed) in &groups {
            let hosts = subscribed
                .get(&key(subscription))
                .copied()
                .unwrap_or(1)
                .max(1);
            let share = claimed.len().div_ceil(hosts as usize);
            shares.insert(subscription.clone(), share);
            let mine = held.iter().filter(|c| claimed.contains(c)).count();
            if mine >= share {
                continue;
            }
            // Free or expired leases, in random order so that hosts taking
            // at once mostly take different ones; SKIP LOCKED so they never
            // wait for each other.
            let (subscribers, topics, partitions) = columns(claimed.iter().copied());
            held.extend(claims(
                conn.query(
                    &format!(
                        "UPDATE {ns}.consumer_offsets o
                         SET holder = $1, expires = now() + make_interval(secs => $2)
                         FROM (SELECT subscriber, topic, partition FROM {ns}.consumer_offsets
                               WHERE (subscriber, topic, partition) IN
                                     (SELECT * FROM unnest($3::text[], $4::text[], $5::int[]))
                                 AND (holder IS NULL OR expires < now())
                               ORDER BY random() LIMIT $6
                               FOR UPDATE SKIP LOCKED) f
                         WHERE (o.subscriber, o.topic, o.partition)
                             = (f.subscriber, f.topic, f.partition)
                         RETURNING o.subscriber, o.topic, o.partition"
                    ),
                    &[
                        &self.identity.id,
                        &lease,
                        &subscribers,
                        &topics,
                        &partitions,
                        &((share - mine) as i64),
                    ],
                )
                .await?,
            ));
        }
        Ok(Leases { held, shares })
    }
}

/// This host, in `hosts` and as a lease's holder.
struct HostIdentity {
    id: String,
    /// Holds the data directory's identity for this process (an flock,
    /// released when the process exits, however it exits).
    _lock: Option<std::fs::File>,
}

impl HostIdentity {
    fn fresh() -> HostIdentity {
        HostIdentity {
            id: uuid::Uuid::new_v4().simple().to_string(),
            _lock: None,
        }
    }

    /// The identity kept in `data_dir`, if no other live process holds it;
    /// a fresh one otherwise (hosts sharing a data directory).
    fn claim(data_dir: &Path) -> Result<HostIdentity> {
        let lock_path = data_dir.join("coordination.lock");
        let lock = std::fs::File::create(&lock_path)
            .with_context(|| format!("creating {}", lock_path.display()))?;
        if lock.try_lock().is_err() {
            tracing::info!(dir = %data_dir.display(), "another host uses this data directory; this one gets an identity of its own");
            return Ok(HostIdentity::fresh());
        }
        let id_path = data_dir.join("host-id");
        let id = match std::fs::read_to_string(&id_path) {
            Ok(id) if !id.trim().is_empty() => id.trim().to_owned(),
            _ => {
                let id = HostIdentity::fresh().id;
                std::fs::write(&id_path, &id)
                    .with_context(|| format!("writing {}", id_path.display()))?;
                id
            }
        };
        Ok(HostIdentity {
            id,
            _lock: Some(lock),
        })
    }
}

/// `call`, failing after [`TIMEOUT`] (a statement's own timeout does not
/// cover a server that stopped answering).
async fn timed<T>(what: &str, call: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    let result = tokio::time::timeout(TIMEOUT * 2, call)
        .await
        .map_err(|_| anyhow::anyhow!("coordination: {what} took over {:?}", TIMEOUT * 2))
        .and_then(|result| result);
    if result.is_err() {
        metrics().backend_error("coordination", KIND.kind);
    }
    result
}

/// Claims as three arrays, for `unnest`.
fn columns<'a>(
    claims: impl Iterator<Item = &'a Claim> + Clone,
) -> (Vec<&'a str>, Vec<&'a str>, Vec<i32>) {
    (
        claims.clone().map(|c| c.subscriber.as_str()).collect(),
        claims.clone().map(|c| c.topic.as_str()).collect(),
        claims.map(|c| c.partition as i32).collect(),
    )
}

fn claims(rows: Vec<tokio_postgres::Row>) -> Vec<Claim> {
    rows.into_iter()
        .map(|r| Claim {
            subscriber: r.get(0),
            topic: r.get(1),
            partition: r.get::<_, i32>(2) as u32,
        })
        .collect()
}

#[async_trait]
impl Coordinator for PostgresCoordinator {
    fn lease_time(&self) -> Duration {
        self.lease
    }

    async fn heartbeat(&self, wanted: &[Claim]) -> Result<Leases> {
        timed("a heartbeat", self.beat(wanted)).await
    }

    async fn release(&self, released: &[Claim]) -> Result<()> {
        timed("release", async {
            if released.is_empty() {
                return Ok(());
            }
            let (subscribers, topics, partitions) = columns(released.iter());
            self.conn()
                .await?
                .execute(
                    &format!(
                        "UPDATE {ns}.consumer_offsets SET holder = NULL, expires = NULL
                         WHERE holder = $1 AND (subscriber, topic, partition) IN
                               (SELECT * FROM unnest($2::text[], $3::text[], $4::int[]))",
                        ns = self.ns
                    ),
                    &[&self.identity.id, &subscribers, &topics, &partitions],
                )
                .await?;
            Ok(())
        })
        .await
    }

    async fn committed(&self, claim: &Claim) -> Result<u64> {
        timed("committed", async {
            let row = self
                .conn()
                .await?
                .query_opt(
                    &format!(
                        "SELECT next FROM {}.consumer_offsets
                         WHERE subscriber = $1 AND topic = $2 AND partition = $3",
                        self.ns
                    ),
                    &[&claim.subscriber, &claim.topic, &(claim.partition as i32)],
                )
                .await?;
            Ok(row.map_or(0, |r| r.get::<_, i64>(0) as u64))
        })
        .await
    }

    async fn commit(&self, claim: &Claim, from: u64, to: u64) -> Result<Commit> {
        timed("commit", async {
            let ns = &self.ns;
            let conn = self.conn().await?;
            let key: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
                [&claim.subscriber, &claim.topic, &(claim.partition as i32)];
            let done = conn
                .execute(
                    &format!(
                        "UPDATE {ns}.consumer_offsets SET next = $5
                         WHERE subscriber = $1 AND topic = $2 AND partition = $3
                           AND holder = $4 AND next = $6"
                    ),
                    &[
                        key[0],
                        key[1],
                        key[2],
                        &self.identity.id,
                        &(to as i64),
                        &(from as i64),
                    ],
                )
                .await?;
            if done == 1 {
                return Ok(Commit::Done);
            }
            let row = conn
                .query_opt(
                    &format!(
                        "SELECT next, holder IS NOT DISTINCT FROM $4 FROM {ns}.consumer_offsets
                         WHERE subscriber = $1 AND topic = $2 AND partition = $3"
                    ),
                    &[key[0], key[1], key[2], &self.identity.id],
                )
                .await?;
            Ok(match row {
                Some(row) if row.get::<_, bool>(1) => Commit::Moved(row.get::<_, i64>(0) as u64),
                _ => Commit::Lost,
            })
        })
        .await
    }

    async fn rewind(&self, claim: &Claim, to: u64) -> Result<()> {
        timed("rewind", async {
            self.conn()
                .await?
                .execute(
                    &format!(
                        "INSERT INTO {}.consumer_offsets (subscriber, topic, partition, next)
                         VALUES ($1, $2, $3, $4)
                         ON CONFLICT (subscriber, topic, partition) DO UPDATE SET next = excluded.next",
                        self.ns
                    ),
                    &[
                        &claim.subscriber,
                        &claim.topic,
                        &(claim.partition as i32),
                        &(to as i64),
                    ],
                )
                .await?;
            Ok(())
        })
        .await
    }

    async fn lock(&self, name: &str) -> Result<Option<Box<dyn Unlock>>> {
        // Dropped at the timeout, the guard closes its connection.
        timed("a lock", self.take_lock(name)).await
    }

    fn pools(&self) -> Vec<PoolUse> {
        [
            ("heartbeats", &self.beats),
            ("offsets", &self.pool),
            ("locks", &self.locks),
        ]
        .into_iter()
        .map(|(name, pool)| pg::pool_use("coordination", name, pool))
        .collect()
    }

    async fn ping(&self) -> Result<()> {
        timed("ping", async {
            self.conn().await?.execute("SELECT 1", &[]).await?;
            Ok(())
        })
        .await
    }

    /// Gives back every lease of this host and leaves the hosts table: a
    /// host stopping hands its work over at once.
    async fn leave(&self) -> Result<()> {
        timed("leave", async {
            let conn = self.conn().await?;
            conn.execute(
                &format!(
                    "UPDATE {}.consumer_offsets SET holder = NULL, expires = NULL WHERE holder = $1",
                    self.ns
                ),
                &[&self.identity.id],
            )
            .await?;
            conn.execute(
                &format!("DELETE FROM {}.hosts WHERE id = $1", self.ns),
                &[&self.identity.id],
            )
            .await?;
            Ok(())
        })
        .await
    }
}

/// A held lock: the open transaction holding its row, and its session.
struct RowLock {
    conn: Option<Object>,
}

#[async_trait]
impl Unlock for RowLock {
    async fn unlock(mut self: Box<Self>) {
        let conn = self.conn.take().expect("unlocked once");
        match tokio::time::timeout(TIMEOUT, conn.batch_execute("COMMIT")).await {
            Ok(Ok(())) => drop(conn),
            // Closing the session ends the transaction, and the lock.
            _ => drop(Object::take(conn)),
        }
    }
}

impl Drop for RowLock {
    fn drop(&mut self) {
        // Dropped without unlocking (its task was cancelled): the session
        // must not go back to the pool still holding the lock.
        if let Some(conn) = self.conn.take() {
            drop(Object::take(conn));
        }
    }
}
