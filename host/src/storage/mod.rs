//! `agora:platform/storage`: SQL for components, one private database each.
//!
//! The backend traits are async and a [`Transaction`] is an owned object that
//! lives across awaits (and across guest calls, as a WIT resource), because
//! the production backend is a pooled network database. Components write the
//! PostgreSQL/SQLite common subset with `$1` placeholders; each backend adapts.
//!
//! The transactional outbox's storage half is here: [`Transaction::enqueue`]
//! writes a record (opaque text) into the component's own database in the
//! same transaction; `crate::outbox` gives records their meaning and relays
//! committed ones to the broker.
//!
//! Backends: one file each, declaring its `kind`, its settings and its
//! constructor ([`StorageSettings`]), and one line in [`BACKENDS`]:
//! `sqlite` (embedded, the default) and `postgres`. The migration ledger's
//! rules are written once, in `ledger.rs`.
//!
//! Guarantees every backend keeps:
//! - a component's SQL reaches exactly its own tables: not another
//!   component's, not the host's (`_agora_*`: the outbox, the migration
//!   ledger), no file and no connection setting, by the backend's own
//!   mechanisms (SQLite: `sandbox.rs`; PostgreSQL: roles, `postgres.rs`); transactions are opened
//!   only with `begin()`, and `query` only reads;
//! - a transaction commits whole or not at all, also when the database
//!   ends it by itself after an error: every later call on it fails;
//! - what one component's SQL can make the host hold (memory, disk) is
//!   bounded, so it cannot starve the others;
//! - a transaction its owner abandons (a trap, a deadline, a dropped
//!   instance) is rolled back before its connection serves anyone else;
//! - a version's new migrations apply in one transaction with their ledger
//!   rows, so a refused version leaves the schema exactly as it was;
//! - what an acknowledged commit survives is the backend's `durability`
//!   setting (see [`crate::plugins::Durability`]); [`Database::sync`] makes every commit so
//!   far survive a machine crash, which the outbox relay does before an
//!   event leaves the component.

mod allocator;
#[cfg(test)]
mod contract;
mod functions;
mod ledger;
mod postgres;
mod sandbox;
mod sqlite;
mod threads;

use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use crate::bindings::storage::{self as wit, Error, RowSet, Value};
use crate::capability::{Capability, CapabilityView};
use crate::metrics::{metrics, ComponentLabels, PoolUse};
use crate::plugins::{BackendKind, BackendRegistry, ComponentSpec, Grant};
use crate::state::InstanceState;

pub use postgres::{PostgresBackend, PostgresConfig};
pub use sqlite::{synchronous, Settings as SqliteSettings, SharedConnection, SqliteBackend};

/// Every storage backend, by the `kind` that chooses it in `[backends.storage]`.
const BACKENDS: &[BackendKind<dyn StorageSettings>] = &[sqlite::KIND, postgres::KIND];

/// A storage backend's settings from `[backends.storage]`, which start it.
#[async_trait]
pub trait StorageSettings: Debug + Send + Sync {
    /// Whether the backend runs inside the host, needing no server.
    fn embedded(&self) -> bool;
    /// `data_dir` is the host's data directory, for embedded backends.
    async fn start(&self, data_dir: &Path) -> Result<Arc<dyn StorageBackend>>;
}

/// `[backends.storage]`: the `sqlite` backend by default, which needs no server.
pub type BackendConfig = crate::plugins::BackendConfig<dyn StorageSettings>;

impl BackendRegistry for dyn StorageSettings {
    const CAPABILITY: &'static str = "storage";
    fn kinds() -> &'static [BackendKind<Self>] {
        BACKENDS
    }
    fn default_settings() -> Arc<Self> {
        Arc::new(SqliteSettings::default())
    }
}

/// Opens component databases.
#[async_trait]
pub trait StorageBackend: Send + Sync {
    /// The component's database, created on first use. `statement_timeout`
    /// bounds each of its statements where the backend can (the component's
    /// deadline); a backend may share one handle between versions.
    async fn open(
        &self,
        component: &str,
        statement_timeout: Duration,
    ) -> Result<Arc<dyn Database>, Error>;
    async fn ping(&self) -> Result<(), Error>;
    /// Its connection pools' use, for the metrics (none in process).
    fn pools(&self) -> Vec<PoolUse> {
        Vec::new()
    }
}

/// One component's database.
#[async_trait]
pub trait Database: Send + Sync {
    async fn query(&self, sql: &str, params: Vec<Value>) -> Result<RowSet, Error>;
    async fn execute(&self, sql: &str, params: Vec<Value>) -> Result<u64, Error>;
    async fn begin(&self) -> Result<Box<dyn Transaction>, Error>;
    /// Applies the migrations not yet recorded, in order and all in one
    /// transaction with their ledger rows, so a failing one leaves the
    /// schema as it was; refuses one that was applied with different SQL.
    /// Returns the names it applied.
    async fn migrate(&self, migrations: &[Migration]) -> Result<Vec<String>, Error>;
    /// Applies what [`Database::migrate`] would and rolls it back: whether
    /// the migrations would apply to the data as it is now, with nothing
    /// committed (a reload checks every component this way before it
    /// migrates any).
    async fn rehearse_migrations(&self, migrations: &[Migration]) -> Result<(), Error>;
    /// Committed outbox rows with a `seq` above `after`, oldest first.
    async fn outbox_pending(&self, after: i64, limit: usize) -> Result<Vec<OutboxRow>, Error>;
    /// How many committed events wait in the outbox.
    async fn outbox_depth(&self) -> Result<u64, Error>;
    /// Removes outbox rows that reached the broker (`relayed`), and moves
    /// those the relay refused (`rejected`, with the reason) to the host's
    /// table `_agora_outbox_rejected`, where an operator can inspect them.
    async fn outbox_settle(&self, relayed: &[i64], rejected: &[(i64, String)])
        -> Result<(), Error>;
    /// Makes every transaction committed so far survive a machine crash
    /// (a no-op where each commit already does).
    async fn sync(&self) -> Result<(), Error>;
    /// Whether other hosts may use this database too (a server's), so that
    /// its outbox is relayed by each of them in turn.
    fn shared(&self) -> bool {
        false
    }
}

/// One row of a component's outbox.
#[derive(Debug)]
pub struct OutboxRow {
    /// Increasing in commit order.
    pub seq: i64,
    /// The record, or why the row holds none.
    pub record: Result<Vec<u8>, String>,
}

/// The most a `query` result may carry, in bytes of its values: it is
/// collected in host memory and then copied into the instance's, whose
/// default is 64 MiB. 16 MiB is far above any page a service shows, and a
/// larger read is paged (`LIMIT`, a `WHERE` on the last key).
pub(crate) const MAX_RESULT_BYTES: usize = 16 << 20;

/// The text of a storage error, whatever its kind.
pub(crate) fn message(e: &Error) -> &str {
    match e {
        Error::ConstraintViolation(m) | Error::InvalidQuery(m) | Error::Unavailable(m) => m,
    }
}

/// An open transaction. Dropping it without [`Transaction::commit`] rolls it back.
#[async_trait]
pub trait Transaction: Send {
    async fn query(&mut self, sql: &str, params: Vec<Value>) -> Result<RowSet, Error>;
    async fn execute(&mut self, sql: &str, params: Vec<Value>) -> Result<u64, Error>;
    /// Writes an outbox record as part of this transaction.
    async fn enqueue(&mut self, record: &str) -> Result<(), Error>;
    async fn commit(self: Box<Self>) -> Result<(), Error>;
}

#[derive(Debug, Clone)]
pub struct Migration {
    pub name: String,
    pub sql: String,
}

/// The host side of a `transaction` resource.
pub struct TransactionHandle {
    tx: Box<dyn Transaction>,
    /// Notified on commit if a record was enqueued: the outbox relay.
    wake_on_commit: Option<Arc<Notify>>,
}

impl TransactionHandle {
    /// Enqueues an outbox record; `wake` is notified if the transaction
    /// commits.
    pub async fn enqueue(&mut self, record: &str, wake: Arc<Notify>) -> Result<(), Error> {
        self.tx.enqueue(record).await?;
        self.wake_on_commit = Some(wake);
        Ok(())
    }
}

pub struct StorageCapability {
    backend: Arc<dyn StorageBackend>,
}

/// What a component granted `storage` holds: its database, and the count
/// of its calls, looked up once per version rather than on every call.
pub struct ComponentDatabase {
    pub db: Arc<dyn Database>,
    calls: Counter,
}

impl StorageCapability {
    pub async fn init(config: &BackendConfig, data_dir: &Path) -> Result<Self> {
        Ok(StorageCapability {
            backend: config.start(data_dir).await?,
        })
    }

    pub fn pools(&self) -> Vec<PoolUse> {
        self.backend.pools()
    }
}

#[async_trait]
impl Capability for StorageCapability {
    const GRANT: Grant = Grant::Storage;
    const INTERFACES: &'static [&'static str] = &["agora:platform/storage"];
    type ComponentState = ComponentDatabase;

    fn add_to_linker(linker: &mut Linker<InstanceState>) -> Result<()> {
        Ok(wit::add_to_linker::<_, StorageData>(linker, |s| {
            let caps = &*s.caps;
            StorageView {
                db: CapabilityView::new(caps.storage.as_ref(), Grant::Storage, &caps.name),
                table: &mut s.table,
                open_transactions: &mut s.open_transactions,
            }
        })?)
    }

    async fn configure(&self, component: &str, spec: &ComponentSpec) -> Result<ComponentDatabase> {
        let timeout = Duration::from_millis(spec.limits.timeout_ms);
        let calls = metrics()
            .storage_calls
            .get_or_create(&ComponentLabels {
                component: component.to_owned(),
            })
            .clone();
        Ok(ComponentDatabase {
            db: self.backend.open(component, timeout).await?,
            calls,
        })
    }

    async fn ready(&self) -> Result<()> {
        Ok(self.backend.ping().await?)
    }
}

/// Why a write outside an open transaction is refused: the transaction holds
/// the write lock (SQLite) or row locks (PostgreSQL), so the write would wait
/// on its own instance until the deadline. Refusing at once turns a hang
/// into an error that says what to do.
const WRITE_BESIDE_TRANSACTION: &str =
    "this instance has an open transaction: run the statement in it (transactions do not nest)";

/// What storage's host functions see of an instance: the component's
/// database, and the instance's resource table with the count of its open
/// transactions (a transaction is a resource that lives across calls).
pub struct StorageView<'a> {
    db: CapabilityView<'a, ComponentDatabase>,
    table: &'a mut ResourceTable,
    open_transactions: &'a mut u32,
}

/// The [`HasData`] of a [`StorageView`].
pub struct StorageData;

impl HasData for StorageData {
    type Data<'a> = StorageView<'a>;
}

impl StorageView<'_> {
    /// The component's database, for one call that reaches it.
    fn database(&self) -> wasmtime::Result<&Arc<dyn Database>> {
        let granted = self.db.granted()?;
        granted.calls.inc();
        Ok(&granted.db)
    }

    /// An open transaction, for one call that reaches the database.
    fn transaction(
        &mut self,
        tx: &Resource<TransactionHandle>,
    ) -> wasmtime::Result<&mut TransactionHandle> {
        self.db.granted()?.calls.inc();
        Ok(self.table.get_mut(tx)?)
    }
}

impl wit::Host for StorageView<'_> {
    async fn query(
        &mut self,
        sql: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<RowSet, Error>> {
        Ok(self.database()?.query(&sql, params).await)
    }

    async fn execute(
        &mut self,
        sql: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<u64, Error>> {
        if *self.open_transactions > 0 {
            return Ok(Err(Error::InvalidQuery(WRITE_BESIDE_TRANSACTION.into())));
        }
        Ok(self.database()?.execute(&sql, params).await)
    }

    async fn begin(&mut self) -> wasmtime::Result<Result<Resource<TransactionHandle>, Error>> {
        if *self.open_transactions > 0 {
            return Ok(Err(Error::InvalidQuery(WRITE_BESIDE_TRANSACTION.into())));
        }
        // Not counted, as the metric says: on SQLite `BEGIN` rides the
        // transaction's first statement (on PostgreSQL it is a round trip
        // of its own).
        let tx = match self.db.granted()?.db.begin().await {
            Ok(tx) => tx,
            Err(e) => return Ok(Err(e)),
        };
        let handle = TransactionHandle {
            tx,
            wake_on_commit: None,
        };
        let handle = self.table.push(handle)?;
        *self.open_transactions += 1;
        Ok(Ok(handle))
    }
}

impl wit::HostTransaction for StorageView<'_> {
    async fn query(
        &mut self,
        tx: Resource<TransactionHandle>,
        sql: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<RowSet, Error>> {
        Ok(self.transaction(&tx)?.tx.query(&sql, params).await)
    }

    async fn execute(
        &mut self,
        tx: Resource<TransactionHandle>,
        sql: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<u64, Error>> {
        Ok(self.transaction(&tx)?.tx.execute(&sql, params).await)
    }

    async fn commit(
        &mut self,
        tx: Resource<TransactionHandle>,
    ) -> wasmtime::Result<Result<(), Error>> {
        self.db.granted()?.calls.inc();
        let handle = self.table.delete(tx)?;
        *self.open_transactions -= 1;
        let result = handle.tx.commit().await;
        if let (Ok(()), Some(wake)) = (&result, &handle.wake_on_commit) {
            wake.notify_one();
        }
        Ok(result)
    }

    async fn drop(&mut self, tx: Resource<TransactionHandle>) -> wasmtime::Result<()> {
        // Dropping the backend transaction rolls it back.
        self.table.delete(tx)?;
        *self.open_transactions -= 1;
        Ok(())
    }
}
