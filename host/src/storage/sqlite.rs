//! Embedded storage: one SQLite file per component (`<data>/storage/<name>.db`).
//!
//! Trade-off: SQLite has one writer at a time, so each database has a single
//! write connection behind an async mutex, held for the life of a
//! transaction; plain queries go to a small pool of read connections, which
//! WAL mode lets run beside the writer. That gives real ACID transactions
//! and read concurrency without a server, at the price of serialised
//! writes per component, which is the right price for a shop on one machine.
//! (A write beside the instance's own open transaction would wait on itself;
//! the capability refuses it before it reaches here.)
//!
//! Every connection runs component SQL inside the sandbox of `sandbox.rs`;
//! the host's own statements (transactions, outbox, ledger) run past it.
//! The read connections are opened read-only, so `query` cannot write
//! beside the writer's lock; `execute` holds it.
//!
//! A transaction commits whole or not at all, also when SQLite ends it by
//! itself: after some errors (SQLITE_FULL, NOMEM, IOERR, INTERRUPT, an
//! `OR ROLLBACK` conflict) SQLite rolls the whole transaction back and the
//! connection is in autocommit mode again. The transaction's handle checks
//! for that after every statement, and from then on refuses every
//! statement, outbox event and `commit()`, which would otherwise each
//! commit alone.
//!
//! Bounds on what one component can take from the others: a database file
//! holds at most the backend's `max_size_mib` (`max_page_count`, 1 GiB by
//! default), so one component cannot fill the disk they share; a `query`
//! result carries at most [`MAX_RESULT_BYTES`], since it is collected in
//! host memory; `sandbox.rs` bounds the memory a statement may use.
//!
//! Abandoned work: a caller that stops waiting (its request's deadline
//! passed, its instance was dropped) interrupts the statement it started,
//! so a runaway query does not hold a connection or a thread (one that
//! outruns its interrupt runs on at idle priority: `threads.rs`); and
//! whoever takes the write connection next first rolls back any
//! transaction left open on it, so an abandoned transaction can neither
//! swallow nor undo someone else's write.
//!
//! Durability, per the backend's `durability` setting: WAL with
//! `synchronous = NORMAL` (`process-crash`, the default) acknowledges a
//! commit once it is in the OS, so it survives a crash of the host process
//! and a machine crash can take the last commits; `synchronous = FULL`
//! (`machine-crash`) fsyncs the WAL at every commit. [`Database::sync`]
//! fsyncs the WAL on demand, which covers every commit before it.
//!
//! rusqlite is blocking, so every call runs off the async threads: the
//! component's on storage threads (`threads.rs`), the host's own on tokio's
//! blocking pool.

use std::collections::HashMap;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{params_from_iter, Connection};
use serde::Deserialize;
use tokio::sync::{OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};

use super::allocator::{self, Running};
use super::ledger::{self, Pending};
use super::message;
use super::sandbox::{prepare_sqlite, stable_plans, Access, Failure, Sandboxed};
use super::threads::{self, OnAbandon, Overruns};
use super::{
    Database, Error, Migration, OutboxRow, RowSet, StorageBackend, StorageSettings, Transaction,
    Value, MAX_RESULT_BYTES,
};
use crate::plugins::{BackendKind, Durability};

pub struct SqliteBackend {
    dir: PathBuf,
    settings: Settings,
    open: Mutex<HashMap<String, Arc<SqliteDatabase>>>,
}

pub const KIND: BackendKind<dyn StorageSettings> = BackendKind {
    kind: "sqlite",
    parse: |table| {
        let settings = Settings::deserialize(table)?;
        if settings.max_size_mib == 0 {
            return Err(serde::de::Error::custom("`max_size_mib` must be above 0"));
        }
        Ok(Box::new(settings))
    },
};

/// `[backends.storage] kind = "sqlite"`, for every database it opens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub durability: Durability,
    /// The most one component's database file may hold, in MiB; a write
    /// beyond fails with SQLITE_FULL ("database or disk is full"). The
    /// databases share the data directory's disk, so one component must not
    /// be able to fill it for the others (or for the message log). 1 GiB is
    /// thousands of times a shop's working data; raise it for a component
    /// that keeps more.
    #[serde(default = "default_max_size_mib")]
    pub max_size_mib: u32,
}

fn default_max_size_mib() -> u32 {
    1024
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            durability: Durability::default(),
            max_size_mib: default_max_size_mib(),
        }
    }
}

#[async_trait]
impl StorageSettings for Settings {
    fn embedded(&self) -> bool {
        true
    }

    async fn start(&self, data_dir: &Path) -> anyhow::Result<Arc<dyn StorageBackend>> {
        Ok(Arc::new(SqliteBackend::new(
            &data_dir.join("storage"),
            *self,
        )?))
    }
}

impl SqliteBackend {
    pub fn new(dir: &Path, settings: Settings) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        Ok(SqliteBackend {
            dir: dir.to_owned(),
            settings,
            open: Mutex::default(),
        })
    }
}

/// A SQLite connection of the host's own (the embedded message log, local
/// coordination's offsets), used off the async threads. Callers queue for
/// it before a blocking thread is taken, so concurrent callers (a consumer
/// per partition) never park threads on one connection.
pub struct SharedConnection {
    conn: Arc<tokio::sync::Mutex<Connection>>,
    /// What it holds, for errors.
    what: &'static str,
}

impl SharedConnection {
    /// Opens a file the host's own connections share (the embedded log and
    /// local coordination's offsets are both in `log.db`): a write that
    /// meets another connection's lock waits for it, up to 5 s, instead of
    /// failing at once with "database is locked". Set before any setup
    /// statement, which may meet that lock too.
    pub fn open_file(path: &Path) -> rusqlite::Result<Connection> {
        prepare_sqlite();
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        stable_plans(&conn)?;
        Ok(conn)
    }

    pub fn new(conn: Connection, what: &'static str) -> Self {
        SharedConnection {
            conn: Arc::new(tokio::sync::Mutex::new(conn)),
            what,
        }
    }

    pub async fn with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> anyhow::Result<R> {
        let mut conn = self.conn.clone().lock_owned().await;
        let result = tokio::task::spawn_blocking(move || f(&mut conn)).await?;
        anyhow::Context::context(result, self.what)
    }
}

/// `PRAGMA synchronous` for a durability setting, in WAL mode.
pub fn synchronous(durability: Durability) -> &'static str {
    match durability {
        Durability::ProcessCrash => "NORMAL",
        Durability::MachineCrash => "FULL",
    }
}

#[async_trait]
impl StorageBackend for SqliteBackend {
    /// The statement timeout is not needed: a statement whose caller stops
    /// waiting is interrupted (see [`on_connection`]).
    async fn open(&self, component: &str, _: Duration) -> Result<Arc<dyn Database>, Error> {
        if let Some(db) = self.open.lock().unwrap().get(component) {
            return Ok(db.clone());
        }
        let path = self.dir.join(format!("{component}.db"));
        let (name, settings) = (component.to_owned(), self.settings);
        let db = blocking(move || SqliteDatabase::open(name, path, settings)).await?;
        let db = Arc::new(db);
        // Two loads racing here would open the file twice; keep the first.
        let db = self
            .open
            .lock()
            .unwrap()
            .entry(component.to_owned())
            .or_insert(db)
            .clone();
        Ok(db)
    }

    async fn ping(&self) -> Result<(), Error> {
        let dir = self.dir.clone();
        blocking(move || {
            std::fs::metadata(&dir).map(|_| ()).map_err(|e| {
                Error::Unavailable(format!("the storage directory is unreachable: {e}"))
            })
        })
        .await
    }
}

struct SqliteDatabase {
    /// The component's name: errors name it, never the file.
    component: String,
    path: PathBuf,
    settings: Settings,
    writer: Arc<tokio::sync::Mutex<Sandboxed>>,
    readers: Arc<Mutex<Vec<Sandboxed>>>,
    /// One per component query running: at most [`READERS`].
    reader_slots: Arc<Semaphore>,
    overruns: Overruns,
}

/// Read connections kept open per database, and how many component queries
/// of one database run at once (more wait for a slot). Reads take
/// microseconds on two cores, so more at once would only queue on the
/// CPU; and a statement that outruns its deadline keeps its slot while it
/// runs on at idle priority (`threads.rs`), so this also bounds how many
/// of those one component can make, however many requests it starts at
/// once. The host's own reads (its outbox) take no slot.
const READERS: usize = 4;

/// The host's tables in every component's database
/// ([`HOST_TABLES`](super::sandbox::HOST_TABLES)),
/// created before any component SQL runs there, so a component cannot take
/// their names first.
const HOST_SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS _agora_migrations (
        name TEXT PRIMARY KEY,
        checksum TEXT NOT NULL,
        applied_at INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS _agora_outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        event TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS _agora_outbox_rejected (
        id INTEGER PRIMARY KEY,
        seq INTEGER NOT NULL,
        event,
        reason TEXT NOT NULL,
        rejected_at INTEGER NOT NULL
    );";

/// Opens a connection: the writer `ReadWrite`, the readers `ReadOnly`, so
/// `query` cannot write whatever its SQL (see `sandbox.rs`).
fn connect(
    component: &str,
    path: &Path,
    settings: Settings,
    access: Access,
) -> Result<Sandboxed, Error> {
    let mut setup = format!(
        "PRAGMA synchronous = {};
         PRAGMA foreign_keys = ON;
         PRAGMA busy_timeout = 5000;",
        synchronous(settings.durability)
    );
    if access == Access::ReadWrite {
        // WAL is a property of the file, set by its writer. The size limit
        // is the writer's setting: `max_page_count` at the default 4 KiB
        // page, which components cannot change (PRAGMA page_size and
        // VACUUM are refused).
        setup.push_str(&format!(
            "PRAGMA journal_mode = WAL;
             PRAGMA max_page_count = {};",
            u64::from(settings.max_size_mib) * 1024 * 1024 / 4096
        ));
    }
    Sandboxed::open(path, access, &setup).map_err(|e| {
        // rusqlite names the file in some of these; the operator's log may
        // show it, the component must not.
        tracing::error!(%component, error = %e, "cannot open the database");
        let reason = match &e {
            rusqlite::Error::SqliteFailure(code, _) => code.to_string(),
            _ => "see the host's log".into(),
        };
        Error::Unavailable(format!(
            "cannot open the database of `{component}`: {reason}"
        ))
    })
}

impl SqliteDatabase {
    fn open(component: String, path: PathBuf, settings: Settings) -> Result<Self, Error> {
        let conn = connect(&component, &path, settings, Access::ReadWrite)?;
        conn.host(|c| c.execute_batch(HOST_SCHEMA))?;
        // The file and its WAL now exist: make their names durable, so that
        // `sync`, which fsyncs the WAL's contents, has a file to keep.
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::Unavailable(format!("syncing the storage directory: {e}")))?;
        }
        Ok(SqliteDatabase {
            component,
            path,
            settings,
            writer: Arc::new(tokio::sync::Mutex::new(conn)),
            readers: Arc::default(),
            reader_slots: Arc::new(Semaphore::new(READERS)),
            overruns: Overruns::default(),
        })
    }

    /// Runs `f` on the write connection, once it is free of any transaction
    /// an abandoned task left open on it.
    async fn with_writer<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Sandboxed) -> Result<R, Error> + Send + 'static,
    ) -> Result<R, Error> {
        let conn = self.writer.clone().lock_owned().await;
        let (_conn, result) = on_connection(&self.overruns, conn, move |c| {
            roll_back_abandoned(c)?;
            f(c)
        })
        .await?;
        result
    }

    /// Runs the host's `f` on a read connection.
    async fn with_reader<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Sandboxed) -> Result<R, Error> + Send + 'static,
    ) -> Result<R, Error> {
        self.on_reader(None, f).await
    }

    /// Runs component SQL on a read connection, once one of the
    /// [`READERS`] slots is free.
    async fn with_component_reader<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Sandboxed) -> Result<R, Error> + Send + 'static,
    ) -> Result<R, Error> {
        self.overruns.admit()?;
        let slot = self.reader_slots.clone().acquire_owned().await;
        let slot = slot.map_err(|_| Error::Unavailable("the database is closed".into()))?;
        // Again: the slot may have been freed by a statement that ran on.
        self.overruns.admit()?;
        self.on_reader(Some(slot), f).await
    }

    async fn on_reader<R: Send + 'static>(
        &self,
        slot: Option<OwnedSemaphorePermit>,
        f: impl FnOnce(&Sandboxed) -> Result<R, Error> + Send + 'static,
    ) -> Result<R, Error> {
        let pooled = self.readers.lock().unwrap().pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => {
                let (component, path, settings) =
                    (self.component.clone(), self.path.clone(), self.settings);
                blocking(move || connect(&component, &path, settings, Access::ReadOnly)).await?
            }
        };
        let reader = Reader { conn, _slot: slot };
        let (reader, result) = on_connection(&self.overruns, reader, f).await?;
        let mut idle = self.readers.lock().unwrap();
        if idle.len() < READERS {
            idle.push(reader.conn);
        }
        result
    }
}

/// Rolls back a transaction left open on the write connection by a task
/// that was cancelled while it held it (between `BEGIN` and `COMMIT`, or in
/// a statement of its transaction). Without this, the next plain write would
/// run inside that transaction, answer "done", and vanish with it.
fn roll_back_abandoned(conn: &Sandboxed) -> Result<(), Error> {
    if !conn.raw().is_autocommit() {
        tracing::warn!("rolling back a transaction its owner abandoned");
        conn.host(|c| c.execute_batch("ROLLBACK"))?;
    }
    Ok(())
}

/// Rolls back the transaction open on `conn`, if SQLite has not already.
/// A failure is logged: the connection's next user rolls back again.
fn roll_back(conn: &Sandboxed) {
    if !conn.raw().is_autocommit() {
        if let Err(e) = conn.host(|c| c.execute_batch("ROLLBACK")) {
            tracing::warn!(error = ?e, "rollback failed");
        }
    }
}

async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, Error> + Send + 'static,
) -> Result<R, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Unavailable(format!("storage task failed: {e}")))?
}

/// A connection a task holds: a pooled reader, or the guarded writer.
trait Held: Send + 'static {
    fn get(&self) -> &Sandboxed;
}

/// A read connection and, for component SQL, its slot: a call abandoned
/// while it runs keeps both until it ends.
struct Reader {
    conn: Sandboxed,
    _slot: Option<OwnedSemaphorePermit>,
}

impl Held for Reader {
    fn get(&self) -> &Sandboxed {
        &self.conn
    }
}

impl Held for OwnedMutexGuard<Sandboxed> {
    fn get(&self) -> &Sandboxed {
        self
    }
}

/// Runs `f` on a connection on a storage thread (`threads.rs`) and hands
/// the connection back with the result. If the caller stops waiting, the
/// statement `f` is running is interrupted; only while `f` runs, because
/// afterwards the connection may serve someone else, whose statement must
/// not be stopped. The thread is marked as running `f` for this caller
/// meanwhile, so an abandoned statement also stops at its next large
/// allocation (`allocator.rs`), loop or not; one that stops at neither
/// runs on at idle priority.
async fn on_connection<C: Held, R: Send + 'static>(
    overruns: &Overruns,
    conn: C,
    f: impl FnOnce(&Sandboxed) -> R + Send + 'static,
) -> Result<(C, R), Error> {
    let interrupt = conn.get().raw().get_interrupt_handle();
    let call = Arc::new(AtomicU8::new(allocator::WAITED_FOR));
    let (running, lowered) = (call.clone(), call.clone());
    let on_abandon = OnAbandon {
        stop: Box::new(move || {
            call.store(allocator::ABANDONED, Ordering::Relaxed);
            interrupt.interrupt();
        }),
        lowered: Box::new(move || lowered.store(allocator::LOWERED, Ordering::Relaxed)),
    };
    let (conn, result) = threads::run(
        overruns,
        move || {
            let result = {
                let _running = Running::on(running);
                // Caught here, so that the connection is handed back (and
                // dropped) only once the call is done.
                panic::catch_unwind(AssertUnwindSafe(|| f(conn.get())))
            };
            (conn, result)
        },
        on_abandon,
    )
    .await?;
    let result = result.map_err(|_| threads::failed())?;
    Ok((conn, result))
}

#[async_trait]
impl Database for SqliteDatabase {
    async fn query(&self, sql: &str, params: Vec<Value>) -> Result<RowSet, Error> {
        let sql = adapt_placeholders(sql);
        self.with_component_reader(move |c| c.component(|c| run_query(c, &sql, &params)))
            .await
    }

    async fn execute(&self, sql: &str, params: Vec<Value>) -> Result<u64, Error> {
        self.overruns.admit()?;
        let sql = adapt_placeholders(sql);
        self.with_writer(move |c| c.component_write(|c| run_execute(c, &sql, &params)))
            .await
    }

    /// Takes the write connection only: `BEGIN` runs with the first
    /// statement (see [`SqliteTransaction`]).
    async fn begin(&self) -> Result<Box<dyn Transaction>, Error> {
        let conn = self.writer.clone().lock_owned().await;
        Ok(Box::new(SqliteTransaction {
            conn: Some(conn),
            overruns: self.overruns.clone(),
            rolled_back: None,
            begun: false,
            outbox: Vec::new(),
            outbox_bytes: 0,
        }))
    }

    async fn migrate(&self, migrations: &[Migration]) -> Result<Vec<String>, Error> {
        let migrations = migrations.to_vec();
        self.with_writer(move |c| run_migrations(c, migrations, true))
            .await
    }

    async fn rehearse_migrations(&self, migrations: &[Migration]) -> Result<(), Error> {
        let migrations = migrations.to_vec();
        self.with_writer(move |c| run_migrations(c, migrations, false).map(|_| ()))
            .await
    }

    async fn outbox_pending(&self, after: i64, limit: usize) -> Result<Vec<OutboxRow>, Error> {
        self.with_reader(move |c| {
            c.host(|c| {
                let mut stmt = c.prepare(
                    "SELECT seq, event FROM _agora_outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                )?;
                let rows = stmt.query_map([after, limit as i64], |r| {
                    let seq: i64 = r.get(0)?;
                    let record = match r.get_ref(1)? {
                        ValueRef::Text(text) => Ok(text.to_vec()),
                        other => Err(format!(
                            "outbox row {seq} is not an event: it holds {:?}, not JSON text",
                            other.data_type()
                        )),
                    };
                    Ok(OutboxRow { seq, record })
                })?;
                rows.collect()
            })
        })
        .await
    }

    async fn outbox_depth(&self) -> Result<u64, Error> {
        self.with_reader(|c| {
            c.host(|c| {
                c.query_row("SELECT count(*) FROM _agora_outbox", [], |r| {
                    r.get::<_, i64>(0)
                })
            })
        })
        .await
        .map(|n| n as u64)
    }

    async fn outbox_settle(
        &self,
        relayed: &[i64],
        rejected: &[(i64, String)],
    ) -> Result<(), Error> {
        let (relayed, rejected) = (relayed.to_vec(), rejected.to_vec());
        self.with_writer(move |c| {
            c.host(|c| {
                c.execute_batch("BEGIN IMMEDIATE")?;
                let result = (|| {
                    let now = crate::now_millis() as i64;
                    for (seq, reason) in &rejected {
                        c.execute(
                            "INSERT INTO _agora_outbox_rejected (seq, event, reason, rejected_at)
                             SELECT seq, event, ?2, ?3 FROM _agora_outbox WHERE seq = ?1",
                            rusqlite::params![seq, reason, now],
                        )?;
                    }
                    for seq in relayed.iter().chain(rejected.iter().map(|(seq, _)| seq)) {
                        c.execute("DELETE FROM _agora_outbox WHERE seq = ?1", [seq])?;
                    }
                    c.execute_batch("COMMIT")
                })();
                if result.is_err() && !c.is_autocommit() {
                    c.execute_batch("ROLLBACK")?;
                }
                result
            })
        })
        .await
    }

    async fn sync(&self) -> Result<(), Error> {
        if self.settings.durability == Durability::MachineCrash {
            return Ok(());
        }
        // Committed frames are in the WAL (fsynced here) or were already
        // checkpointed into the database file, which SQLite fsyncs after a
        // checkpoint before it reuses the WAL.
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        blocking(move || {
            match std::fs::File::open(&wal) {
                Ok(file) => file.sync_data(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            }
            .map_err(|e| Error::Unavailable(format!("syncing the database: {e}")))
        })
        .await
    }
}

/// Applies the migrations not yet in the ledger in one transaction, and
/// commits it, or with `commit` false rolls it back (a rehearsal).
fn run_migrations(
    c: &Sandboxed,
    migrations: Vec<Migration>,
    commit: bool,
) -> Result<Vec<String>, Error> {
    let recorded: HashMap<String, String> = c.host(|c| {
        let mut stmt = c.prepare("SELECT name, checksum FROM _agora_migrations")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    })?;
    let new = ledger::plan(&recorded, &migrations)?;
    if new.is_empty() {
        return Ok(Vec::new());
    }
    c.host(|c| c.execute_batch("BEGIN IMMEDIATE"))?;
    let applied = apply_migrations(c, &new);
    let ended = match applied {
        Ok(_) if commit => c.host(|c| c.execute_batch("COMMIT")),
        // Unless SQLite rolled it back itself after an error.
        _ if c.raw().is_autocommit() => Ok(()),
        _ => c.host(|c| c.execute_batch("ROLLBACK")),
    };
    let applied = applied?;
    ended?;
    Ok(applied)
}

/// Runs new migrations inside the open transaction, each with its ledger
/// row; the caller commits or rolls back.
fn apply_migrations(c: &Sandboxed, new: &[ledger::Pending]) -> Result<Vec<String>, Error> {
    let now = crate::now_millis() as i64;
    for Pending {
        migration,
        checksum,
    } in new
    {
        c.component_batch(&migration.sql)
            .map_err(|e| ledger::failed(migration, message(&e)))?;
        c.host(|c| {
            c.execute(
                "INSERT INTO _agora_migrations (name, checksum, applied_at) VALUES (?1, ?2, ?3)",
                rusqlite::params![migration.name, checksum, now],
            )
        })?;
    }
    Ok(new.iter().map(|p| p.migration.name.clone()).collect())
}

/// A transaction on the write connection, held from `begin` to the end.
///
/// Every call is a hand-off to a storage thread and back, and on two cores
/// those thread switches cost more than the statements of a checkout. So a
/// transaction makes no hand-off of its own: `BEGIN IMMEDIATE` runs with
/// its first statement, and the outbox records it enqueues are written
/// with its next statement or its commit, in order. What a caller sees
/// changes only in when an error appears: a `BEGIN` that fails (the file
/// locked by another process past the busy timeout) fails the first
/// statement, which is then the transaction's end; so does any failure to
/// write what was deferred, which rolls the transaction back, since its
/// commit would lack events a `publish` reported as done. A transaction
/// that ran nothing and enqueued nothing commits without touching the
/// database.
struct SqliteTransaction {
    conn: Option<OwnedMutexGuard<Sandboxed>>,
    overruns: Overruns,
    /// The error after which SQLite rolled the transaction back by itself.
    rolled_back: Option<Error>,
    /// Whether `BEGIN` has been sent.
    begun: bool,
    /// Outbox records not yet written, and their size: written sooner, in
    /// a hand-off of their own, past [`OUTBOX_BUFFER_BYTES`].
    outbox: Vec<String>,
    outbox_bytes: usize,
}

/// Enqueued outbox records held in the host before they are written: a
/// bound on what a transaction publishing in a loop keeps outside SQLite,
/// whose size limit (`max_size_mib`) then stops it as before.
const OUTBOX_BUFFER_BYTES: usize = 256 * 1024;

impl SqliteTransaction {
    /// Runs `f` in the transaction, and checks it is still open afterwards.
    /// SQLite rolls a whole transaction back by itself after some errors
    /// (SQLITE_FULL, NOMEM, IOERR, INTERRUPT, a constraint with ON CONFLICT
    /// ROLLBACK or RAISE(ROLLBACK)), and the connection is back in
    /// autocommit mode: each later statement, outbox event included, would
    /// commit on its own. So once that happened, every later call fails,
    /// and `commit()` too: the transaction commits whole or not at all.
    async fn run<R: Send + 'static>(
        &mut self,
        f: impl FnOnce(&Sandboxed) -> Result<R, Error> + Send + 'static,
    ) -> Result<R, Error> {
        self.open()?;
        let conn = self
            .conn
            .take()
            .ok_or_else(|| Error::InvalidQuery("the transaction has ended".into()))?;
        let begin = !std::mem::replace(&mut self.begun, true);
        let records = std::mem::take(&mut self.outbox);
        self.outbox_bytes = 0;
        // If this is cancelled, the connection is released with the
        // transaction open; its next user rolls it back.
        let (conn, (result, ended)) = on_connection(&self.overruns, conn, move |c| {
            if let Err(e) = catch_up(c, begin, records) {
                // Not all it deferred happened (a record past the size
                // limit, say): committed now, the transaction would lack
                // events its caller was told were published.
                roll_back(c);
                return (Err(e), true);
            }
            let result = f(c);
            (result, c.raw().is_autocommit())
        })
        .await?;
        self.conn = Some(conn);
        match result {
            Err(e) if ended => {
                let error = reworded(
                    &e,
                    format!("{}: the database rolled back the transaction", message(&e)),
                );
                self.rolled_back = Some(e);
                Err(error)
            }
            result => result,
        }
    }

    /// Fails if the transaction can take no more statements.
    fn open(&self) -> Result<(), Error> {
        match (&self.rolled_back, &self.conn) {
            (Some(cause), _) => Err(reworded(
                cause,
                format!(
                    "the transaction was rolled back by the database after an earlier error: {}",
                    message(cause)
                ),
            )),
            (None, None) => Err(Error::InvalidQuery("the transaction has ended".into())),
            (None, Some(_)) => Ok(()),
        }
    }
}

/// What a transaction deferred, run ahead of its next statement: `BEGIN`
/// (after rolling back what a cancelled owner left open), then the outbox
/// records enqueued since.
fn catch_up(conn: &Sandboxed, begin: bool, records: Vec<String>) -> Result<(), Error> {
    if begin {
        roll_back_abandoned(conn)?;
        conn.host(|c| c.execute_batch("BEGIN IMMEDIATE"))?;
    }
    for record in records {
        conn.host(|c| c.execute("INSERT INTO _agora_outbox (event) VALUES (?1)", [record]))?;
    }
    Ok(())
}

/// `e` with another message, of the same kind.
fn reworded(e: &Error, message: String) -> Error {
    match e {
        Error::ConstraintViolation(_) => Error::ConstraintViolation(message),
        Error::InvalidQuery(_) => Error::InvalidQuery(message),
        Error::Unavailable(_) => Error::Unavailable(message),
    }
}

#[async_trait]
impl Transaction for SqliteTransaction {
    async fn query(&mut self, sql: &str, params: Vec<Value>) -> Result<RowSet, Error> {
        self.overruns.admit()?;
        let sql = adapt_placeholders(sql);
        self.run(move |c| c.component(|c| run_query(c, &sql, &params)))
            .await
    }

    async fn execute(&mut self, sql: &str, params: Vec<Value>) -> Result<u64, Error> {
        self.overruns.admit()?;
        let sql = adapt_placeholders(sql);
        self.run(move |c| c.component_write(|c| run_execute(c, &sql, &params)))
            .await
    }

    async fn enqueue(&mut self, record: &str) -> Result<(), Error> {
        self.open()?;
        self.outbox_bytes += record.len();
        self.outbox.push(record.to_owned());
        if self.outbox_bytes > OUTBOX_BUFFER_BYTES {
            self.run(|_| Ok(())).await?;
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<(), Error> {
        self.open()?;
        if self.begun || !self.outbox.is_empty() {
            self.run(|c| c.host(|c| c.execute_batch("COMMIT"))).await?;
        }
        // Committed: release the connection without the rollback in `drop`.
        self.conn.take();
        Ok(())
    }
}

impl Drop for SqliteTransaction {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            roll_back(&conn);
        }
    }
}

/// Runs a statement that only reads: SQLite says whether a compiled
/// statement writes (`sqlite3_stmt_readonly`), asked before every run
/// because a cached statement is not compiled (nor authorized) again. The
/// readers are opened read-only besides; this refuses on the writer, in a
/// transaction, too.
fn run_query(conn: &Connection, sql: &str, params: &[Value]) -> Result<RowSet, Failure> {
    let mut stmt = conn.prepare_cached(sql)?;
    if !stmt.readonly() {
        return Err(Failure::Refused(
            "query is read-only: use execute for a statement that writes".into(),
        ));
    }
    let columns: Vec<String> = stmt.column_names().into_iter().map(String::from).collect();
    let mut rows = stmt.query(params_from_iter(params.iter().map(to_sql)))?;
    let (mut out, mut bytes) = (Vec::new(), 0);
    while let Some(row) = rows.next()? {
        let mut values = Vec::with_capacity(columns.len());
        for i in 0..columns.len() {
            let value = row.get_ref(i)?;
            bytes += match value {
                ValueRef::Text(b) | ValueRef::Blob(b) => b.len(),
                _ => 8,
            };
            if bytes > MAX_RESULT_BYTES {
                return Err(Failure::Refused(format!(
                    "the result exceeds {} MiB: read it in pages (LIMIT, or a WHERE on the last key)",
                    MAX_RESULT_BYTES >> 20
                )));
            }
            values.push(from_sql(value));
        }
        out.push(values);
    }
    Ok(RowSet { columns, rows: out })
}

fn run_execute(conn: &Connection, sql: &str, params: &[Value]) -> rusqlite::Result<u64> {
    let mut stmt = conn.prepare_cached(sql)?;
    // Stepping through rows (rather than `Statement::execute`) lets a
    // statement with RETURNING run as an execute too.
    let mut rows = stmt.query(params_from_iter(params.iter().map(to_sql)))?;
    while rows.next()?.is_some() {}
    Ok(conn.changes())
}

fn to_sql(value: &Value) -> SqlValue {
    match value {
        Value::Null => SqlValue::Null,
        Value::Boolean(b) => SqlValue::Integer(*b as i64),
        Value::Integer(i) => SqlValue::Integer(*i),
        Value::Real(f) => SqlValue::Real(*f),
        Value::Text(s) => SqlValue::Text(s.clone()),
        Value::Blob(b) => SqlValue::Blob(b.clone()),
    }
}

fn from_sql(value: ValueRef<'_>) -> Value {
    match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Integer(i),
        ValueRef::Real(f) => Value::Real(f),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}

/// Rewrites PostgreSQL's `$1` placeholders as SQLite's `?1`, leaving string
/// literals, quoted identifiers and comments alone.
pub fn adapt_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                out.push(c);
                for d in chars.by_ref() {
                    out.push(d);
                    if d == c {
                        break;
                    }
                }
            }
            '-' if chars.peek() == Some(&'-') => {
                out.push(c);
                for d in chars.by_ref() {
                    out.push(d);
                    if d == '\n' {
                        break;
                    }
                }
            }
            '$' if chars.peek().is_some_and(char::is_ascii_digit) => out.push('?'),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_adapted_outside_literals() {
        assert_eq!(
            adapt_placeholders("SELECT '$1', \"$2\" FROM t WHERE a = $1 AND b = $12 -- $3\n"),
            "SELECT '$1', \"$2\" FROM t WHERE a = ?1 AND b = ?12 -- $3\n"
        );
    }

    fn database(dir: &tempfile::TempDir, durability: Durability) -> SqliteDatabase {
        let settings = Settings {
            durability,
            max_size_mib: 1024,
        };
        SqliteDatabase::open("c".into(), dir.path().join("c.db"), settings).unwrap()
    }

    async fn synchronous_level(db: &SqliteDatabase) -> i64 {
        db.with_writer(|c| c.host(|c| c.query_row("PRAGMA synchronous", [], |r| r.get(0))))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn durability_sets_synchronous_on_every_connection() {
        let dir = tempfile::TempDir::new().unwrap();
        // SQLite's numbers: NORMAL is 1, FULL is 2.
        for (durability, level) in [(Durability::ProcessCrash, 1), (Durability::MachineCrash, 2)] {
            let db = database(&dir, durability);
            assert_eq!(synchronous_level(&db).await, level);
            let reader: i64 = db
                .with_reader(|c| c.host(|c| c.query_row("PRAGMA synchronous", [], |r| r.get(0))))
                .await
                .unwrap();
            assert_eq!(reader, level);
            db.sync().await.unwrap();
        }
    }

    #[tokio::test]
    async fn migrations_apply_all_or_nothing() {
        let dir = tempfile::TempDir::new().unwrap();
        let db = database(&dir, Durability::ProcessCrash);
        let m = |name: &str, sql: &str| Migration {
            name: name.into(),
            sql: sql.into(),
        };
        db.migrate(&[m("1", "CREATE TABLE a (x TEXT)")])
            .await
            .unwrap();
        let err = db
            .migrate(&[
                m("1", "CREATE TABLE a (x TEXT)"),
                m("2", "CREATE TABLE b (x TEXT)"),
                m("3", "CREATE TABLE c (this is not sql"),
            ])
            .await
            .unwrap_err();
        assert!(message(&err).contains("migration `3` failed"), "{err:?}");
        let tables: Vec<String> = db
            .with_reader(|c| {
                c.host(|c| {
                    let mut s = c.prepare(
                        "SELECT name FROM sqlite_master WHERE type = 'table' \
                         AND name NOT LIKE '\\_agora\\_%' ESCAPE '\\' \
                         AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name",
                    )?;
                    let names = s.query_map([], |r| r.get(0))?;
                    names.collect()
                })
            })
            .await
            .unwrap();
        assert_eq!(tables, ["a"]);
        let ledger: i64 = db
            .with_reader(|c| {
                c.host(|c| c.query_row("SELECT count(*) FROM _agora_migrations", [], |r| r.get(0)))
            })
            .await
            .unwrap();
        assert_eq!(ledger, 1);
        // A migration cannot end the host's transaction early either.
        let err = db
            .migrate(&[
                m("1", "CREATE TABLE a (x TEXT)"),
                m("2", "COMMIT; CREATE TABLE b (x TEXT)"),
            ])
            .await
            .unwrap_err();
        assert!(message(&err).contains("transaction control"), "{err:?}");
    }

    #[tokio::test]
    async fn an_abandoned_transaction_is_rolled_back_before_the_next_write() {
        let dir = tempfile::TempDir::new().unwrap();
        let db = Arc::new(database(&dir, Durability::ProcessCrash));
        db.execute("CREATE TABLE t (x TEXT)", vec![]).await.unwrap();
        let mut tx = db.begin().await.unwrap();
        tx.execute("INSERT INTO t VALUES ('abandoned')", vec![])
            .await
            .unwrap();
        // Cancelled in the middle of a statement that would run for minutes:
        // the statement is interrupted and the transaction left open.
        let slow = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) \
                    SELECT count(*) FROM n";
        let cancelled = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            tx.query(slow, vec![]),
        )
        .await;
        assert!(cancelled.is_err());
        drop(tx);
        assert_eq!(
            db.execute("INSERT INTO t VALUES ('after')", vec![])
                .await
                .unwrap(),
            1
        );
        let tx = db.begin().await.unwrap();
        tx.commit().await.unwrap();
        let rows = db.query("SELECT x FROM t", vec![]).await.unwrap();
        assert!(
            matches!(&rows.rows[..], [row] if matches!(&row[..], [Value::Text(x)] if x == "after")),
            "{:?}",
            rows.rows
        );
    }

    async fn names(db: &SqliteDatabase, sql: &'static str) -> Vec<String> {
        db.with_reader(move |c| {
            c.host(|c| {
                let mut s = c.prepare(sql)?;
                let rows = s.query_map([], |r| r.get(0))?;
                rows.collect()
            })
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn the_host_schema_is_the_sandboxs_list_of_host_tables() {
        let dir = tempfile::TempDir::new().unwrap();
        let db = database(&dir, Durability::ProcessCrash);
        let tables = names(
            &db,
            "SELECT name FROM sqlite_schema WHERE name LIKE '\\_agora\\_%' ESCAPE '\\' ORDER BY name",
        )
        .await;
        assert_eq!(tables, super::super::sandbox::HOST_TABLES);
    }

    #[tokio::test]
    async fn after_sqlite_rolls_a_transaction_back_nothing_of_it_commits() {
        let dir = tempfile::TempDir::new().unwrap();
        let db = database(&dir, Durability::ProcessCrash);
        db.execute("CREATE TABLE t (x TEXT PRIMARY KEY)", vec![])
            .await
            .unwrap();
        db.execute("INSERT INTO t VALUES ('taken')", vec![])
            .await
            .unwrap();
        let mut tx = db.begin().await.unwrap();
        tx.execute("INSERT INTO t VALUES ('before')", vec![])
            .await
            .unwrap();
        // A conflict resolved with ROLLBACK: SQLite ends the transaction.
        let err = tx
            .execute("INSERT OR ROLLBACK INTO t VALUES ('taken')", vec![])
            .await
            .unwrap_err();
        assert!(
            message(&err).contains("the database rolled back the transaction"),
            "{err:?}"
        );
        let later = "the transaction was rolled back by the database after an earlier error";
        let err = tx
            .execute("INSERT INTO t VALUES ('after')", vec![])
            .await
            .unwrap_err();
        assert!(message(&err).contains(later), "{err:?}");
        let err = tx.enqueue("an event").await.unwrap_err();
        assert!(message(&err).contains(later), "{err:?}");
        let err = tx.commit().await.unwrap_err();
        assert!(message(&err).contains(later), "{err:?}");
        let rows = db
            .query("SELECT x FROM t ORDER BY x", vec![])
            .await
            .unwrap();
        assert_eq!(rows.rows.len(), 1, "{:?}", rows.rows);
        assert!(db.outbox_pending(0, 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn query_only_reads_and_its_result_is_bounded() {
        let dir = tempfile::TempDir::new().unwrap();
        let db = database(&dir, Durability::ProcessCrash);
        db.execute("CREATE TABLE t (x)", vec![]).await.unwrap();
        for sql in [
            "INSERT INTO t VALUES (1) RETURNING x",
            "CREATE TABLE u (x)",
            "DELETE FROM t",
        ] {
            let err = db.query(sql, vec![]).await.unwrap_err();
            assert!(
                message(&err).contains("query is read-only"),
                "{sql}: {err:?}"
            );
            let mut tx = db.begin().await.unwrap();
            let err = tx.query(sql, vec![]).await.unwrap_err();
            assert!(
                message(&err).contains("query is read-only"),
                "{sql}: {err:?}"
            );
            tx.commit().await.unwrap();
        }
        // 3 x 8 MB rows: above the 16 MiB a result may carry.
        let big = "WITH n(i) AS (VALUES (1), (2), (3)) SELECT zeroblob(8000000) FROM n";
        let err = db.query(big, vec![]).await.unwrap_err();
        assert!(
            message(&err).contains("the result exceeds 16 MiB"),
            "{err:?}"
        );
        let count = db.query("SELECT count(*) FROM t", vec![]).await.unwrap();
        assert!(matches!(count.rows[0][..], [Value::Integer(0)]));
        assert!(
            names(&db, "SELECT name FROM sqlite_schema WHERE name = 'u'")
                .await
                .is_empty()
        );
    }

    /// A database of at most 1 MiB, with a table `t (x)`.
    async fn one_mib_with_table(dir: &tempfile::TempDir) -> SqliteDatabase {
        let settings = Settings {
            durability: Durability::ProcessCrash,
            max_size_mib: 1,
        };
        let db = SqliteDatabase::open("c".into(), dir.path().join("c.db"), settings).unwrap();
        db.execute("CREATE TABLE t (x)", vec![]).await.unwrap();
        db
    }

    #[tokio::test]
    async fn a_database_stops_growing_at_its_size_limit() {
        let dir = tempfile::TempDir::new().unwrap();
        let db = one_mib_with_table(&dir).await;
        let err = db
            .execute("INSERT INTO t VALUES (randomblob(2000000))", vec![])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Unavailable(m) if m.contains("size limit")),
            "{err:?}"
        );
        // Smaller writes still fit.
        db.execute("INSERT INTO t VALUES (randomblob(1000))", vec![])
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_transaction_whose_held_events_cannot_be_written_cannot_commit() {
        let dir = tempfile::TempDir::new().unwrap();
        let db = one_mib_with_table(&dir).await;
        let mut tx = db.begin().await.unwrap();
        tx.execute("INSERT INTO t VALUES (1)", vec![])
            .await
            .unwrap();
        // Held in the host, then written: more than the database may hold.
        let record = "e".repeat(200_000);
        let mut failed = None;
        for _ in 0..8 {
            if let Err(e) = tx.enqueue(&record).await {
                failed = Some(e);
                break;
            }
        }
        let failed = failed.expect("8 events of 200 KB fit in 1 MiB");
        assert!(
            matches!(&failed, Error::Unavailable(m) if m.contains("size limit")),
            "{failed:?}"
        );
        // A guest that ignores the error cannot commit the events it kept.
        let statement = tx.execute("INSERT INTO t VALUES (2)", vec![]).await;
        assert!(
            matches!(&statement, Err(e) if message(e).contains("rolled back")),
            "{statement:?}"
        );
        assert!(tx.commit().await.is_err());
        assert!(db.outbox_pending(0, 10).await.unwrap().is_empty());
        let rows = db.query("SELECT x FROM t", vec![]).await.unwrap();
        assert!(rows.rows.is_empty(), "the transaction's row was committed");
    }
}
