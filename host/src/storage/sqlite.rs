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
//!
//! Abandoned work: a caller that stops waiting (its request's deadline
//! passed, its instance was dropped) interrupts the statement it started,
//! so a runaway query does not hold a connection or a blocking thread; and
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
//! rusqlite is blocking, so every call runs on tokio's blocking pool.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{params_from_iter, Connection, InterruptHandle};
use sha2::{Digest, Sha256};
use tokio::sync::OwnedMutexGuard;

use super::sandbox::Sandboxed;
use super::{Database, Error, Migration, OutboxRow, RowSet, StorageBackend, Transaction, Value};
use crate::messaging::Envelope;
use crate::plugins::Durability;

pub struct SqliteBackend {
    dir: PathBuf,
    durability: Durability,
    open: Mutex<HashMap<String, Arc<SqliteDatabase>>>,
}

impl SqliteBackend {
    pub fn new(dir: &Path, durability: Durability) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        Ok(SqliteBackend {
            dir: dir.to_owned(),
            durability,
            open: Mutex::default(),
        })
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
    async fn open(&self, component: &str) -> Result<Arc<dyn Database>, Error> {
        if let Some(db) = self.open.lock().unwrap().get(component) {
            return Ok(db.clone());
        }
        let path = self.dir.join(format!("{component}.db"));
        let (name, durability) = (component.to_owned(), self.durability);
        let db = blocking(move || SqliteDatabase::open(name, path, durability)).await?;
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
    durability: Durability,
    writer: Arc<tokio::sync::Mutex<Sandboxed>>,
    readers: Arc<Mutex<Vec<Sandboxed>>>,
}

/// Read connections kept open per database; more are opened under load and
/// closed afterwards.
const IDLE_READERS: usize = 4;

/// The host's tables in every component's database, created before any
/// component SQL runs there, so a component cannot take their names first.
const HOST_TABLES: &str = "
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

fn connect(component: &str, path: &Path, durability: Durability) -> Result<Sandboxed, Error> {
    let setup = format!(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = {};
         PRAGMA foreign_keys = ON;
         PRAGMA busy_timeout = 5000;",
        synchronous(durability)
    );
    Sandboxed::open(path, &setup).map_err(|e| {
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
    fn open(component: String, path: PathBuf, durability: Durability) -> Result<Self, Error> {
        let conn = connect(&component, &path, durability)?;
        conn.host(|c| c.execute_batch(HOST_TABLES))?;
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
            durability,
            writer: Arc::new(tokio::sync::Mutex::new(conn)),
            readers: Arc::default(),
        })
    }

    /// Runs `f` on the write connection, once it is free of any transaction
    /// an abandoned task left open on it.
    async fn with_writer<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Sandboxed) -> Result<R, Error> + Send + 'static,
    ) -> Result<R, Error> {
        let conn = self.writer.clone().lock_owned().await;
        let (_conn, result) = on_connection(conn, move |c| {
            roll_back_abandoned(c)?;
            f(c)
        })
        .await?;
        result
    }

    async fn with_reader<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Sandboxed) -> Result<R, Error> + Send + 'static,
    ) -> Result<R, Error> {
        let pooled = self.readers.lock().unwrap().pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => {
                let (component, path, durability) =
                    (self.component.clone(), self.path.clone(), self.durability);
                blocking(move || connect(&component, &path, durability)).await?
            }
        };
        let (conn, result) = on_connection(conn, f).await?;
        let mut idle = self.readers.lock().unwrap();
        if idle.len() < IDLE_READERS {
            idle.push(conn);
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

impl Held for Sandboxed {
    fn get(&self) -> &Sandboxed {
        self
    }
}

impl Held for OwnedMutexGuard<Sandboxed> {
    fn get(&self) -> &Sandboxed {
        self
    }
}

/// Runs `f` on a connection on the blocking
/// pool and hands the connection back with the result. If the caller stops
/// waiting, the statement `f` is running is interrupted; only while `f`
/// runs, because afterwards the connection may serve someone else, whose
/// statement must not be stopped.
async fn on_connection<C: Held, R: Send + 'static>(
    conn: C,
    f: impl FnOnce(&Sandboxed) -> R + Send + 'static,
) -> Result<(C, R), Error> {
    struct Abandon {
        interrupt: InterruptHandle,
        done: Arc<Mutex<bool>>,
    }
    impl Drop for Abandon {
        fn drop(&mut self) {
            // `f` is marked done under this lock before the connection is
            // handed back, so the interrupt cannot reach its next user.
            if !*self.done.lock().unwrap() {
                self.interrupt.interrupt();
            }
        }
    }
    let abandon = Abandon {
        interrupt: conn.get().raw().get_interrupt_handle(),
        done: Arc::default(),
    };
    let done = abandon.done.clone();
    let joined = tokio::task::spawn_blocking(move || {
        let result = f(conn.get());
        *done.lock().unwrap() = true;
        (conn, result)
    })
    .await;
    drop(abandon);
    joined.map_err(|e| Error::Unavailable(format!("storage task failed: {e}")))
}

#[async_trait]
impl Database for SqliteDatabase {
    async fn query(&self, sql: &str, params: Vec<Value>) -> Result<RowSet, Error> {
        let sql = adapt_placeholders(sql);
        self.with_reader(move |c| c.component(|c| run_query(c, &sql, &params)))
            .await
    }

    async fn execute(&self, sql: &str, params: Vec<Value>) -> Result<u64, Error> {
        let sql = adapt_placeholders(sql);
        self.with_writer(move |c| c.component(|c| run_execute(c, &sql, &params)))
            .await
    }

    async fn begin(&self) -> Result<Box<dyn Transaction>, Error> {
        let mut tx = SqliteTransaction {
            conn: Some(self.writer.clone().lock_owned().await),
        };
        tx.run(|c| {
            roll_back_abandoned(c)?;
            c.host(|c| c.execute_batch("BEGIN IMMEDIATE"))
        })
        .await?;
        Ok(Box::new(tx))
    }

    async fn migrate(&self, migrations: &[Migration]) -> Result<Vec<String>, Error> {
        let migrations = migrations.to_vec();
        self.with_writer(move |c| {
            let recorded: HashMap<String, String> = c.host(|c| {
                let mut stmt = c.prepare("SELECT name, checksum FROM _agora_migrations")?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect()
            })?;
            let mut new = Vec::new();
            for m in migrations {
                let checksum = hex(&Sha256::digest(m.sql.as_bytes()));
                match recorded.get(&m.name) {
                    Some(sum) if *sum == checksum => {}
                    Some(_) => {
                        return Err(Error::InvalidQuery(format!(
                            "migration `{}` was changed after it was applied; \
                             add a new migration instead",
                            m.name
                        )))
                    }
                    None => new.push((m, checksum)),
                }
            }
            if new.is_empty() {
                return Ok(Vec::new());
            }
            c.host(|c| c.execute_batch("BEGIN IMMEDIATE"))?;
            let applied = apply_migrations(c, &new);
            let ended = match applied {
                Ok(_) => c.host(|c| c.execute_batch("COMMIT")),
                Err(_) => c.host(|c| c.execute_batch("ROLLBACK")),
            };
            let applied = applied?;
            ended?;
            Ok(applied)
        })
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
                    let event = match r.get_ref(1)? {
                        ValueRef::Text(json) => serde_json::from_slice(json)
                            .map_err(|e| format!("outbox row {seq} is not an event: {e}")),
                        other => Err(format!(
                            "outbox row {seq} is not an event: it holds {:?}, not JSON text",
                            other.data_type()
                        )),
                    };
                    Ok(OutboxRow { seq, event })
                })?;
                rows.collect()
            })
        })
        .await
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
                if result.is_err() {
                    c.execute_batch("ROLLBACK")?;
                }
                result
            })
        })
        .await
    }

    async fn sync(&self) -> Result<(), Error> {
        if self.durability == Durability::MachineCrash {
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

/// Runs new migrations inside the open transaction, each with its ledger
/// row; the caller commits or rolls back.
fn apply_migrations(c: &Sandboxed, new: &[(Migration, String)]) -> Result<Vec<String>, Error> {
    let now = crate::now_millis() as i64;
    for (m, checksum) in new {
        c.component(|c| c.execute_batch(&m.sql)).map_err(|e| {
            Error::InvalidQuery(format!("migration `{}` failed: {}", m.name, message(&e)))
        })?;
        c.host(|c| {
            c.execute(
                "INSERT INTO _agora_migrations (name, checksum, applied_at) VALUES (?1, ?2, ?3)",
                rusqlite::params![m.name, checksum, now],
            )
        })?;
    }
    Ok(new.iter().map(|(m, _)| m.name.clone()).collect())
}

fn message(e: &Error) -> &str {
    match e {
        Error::ConstraintViolation(m) | Error::InvalidQuery(m) | Error::Unavailable(m) => m,
    }
}

/// Owns the write connection from `BEGIN` until commit or drop.
struct SqliteTransaction {
    conn: Option<OwnedMutexGuard<Sandboxed>>,
}

impl SqliteTransaction {
    async fn run<R: Send + 'static>(
        &mut self,
        f: impl FnOnce(&Sandboxed) -> Result<R, Error> + Send + 'static,
    ) -> Result<R, Error> {
        let conn = self
            .conn
            .take()
            .ok_or_else(|| Error::InvalidQuery("the transaction has ended".into()))?;
        // If this is cancelled, the connection is released with the
        // transaction open; its next user rolls it back.
        let (conn, result) = on_connection(conn, f).await?;
        self.conn = Some(conn);
        result
    }
}

#[async_trait]
impl Transaction for SqliteTransaction {
    async fn query(&mut self, sql: &str, params: Vec<Value>) -> Result<RowSet, Error> {
        let sql = adapt_placeholders(sql);
        self.run(move |c| c.component(|c| run_query(c, &sql, &params)))
            .await
    }

    async fn execute(&mut self, sql: &str, params: Vec<Value>) -> Result<u64, Error> {
        let sql = adapt_placeholders(sql);
        self.run(move |c| c.component(|c| run_execute(c, &sql, &params)))
            .await
    }

    async fn enqueue(&mut self, event: &Envelope) -> Result<(), Error> {
        let json = serde_json::to_string(event).map_err(|e| Error::InvalidQuery(e.to_string()))?;
        self.run(move |c| {
            c.host(|c| c.execute("INSERT INTO _agora_outbox (event) VALUES (?1)", [json]))
                .map(|_| ())
        })
        .await
    }

    async fn commit(mut self: Box<Self>) -> Result<(), Error> {
        self.run(|c| c.host(|c| c.execute_batch("COMMIT"))).await?;
        // Committed: release the connection without the rollback in `drop`.
        self.conn.take();
        Ok(())
    }
}

impl Drop for SqliteTransaction {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            if let Err(e) = conn.host(|c| c.execute_batch("ROLLBACK")) {
                tracing::warn!(error = ?e, "rollback failed");
            }
        }
    }
}

fn run_query(conn: &Connection, sql: &str, params: &[Value]) -> rusqlite::Result<RowSet> {
    let mut stmt = conn.prepare_cached(sql)?;
    let columns: Vec<String> = stmt.column_names().into_iter().map(String::from).collect();
    let mut rows = stmt.query(params_from_iter(params.iter().map(to_sql)))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let mut values = Vec::with_capacity(columns.len());
        for i in 0..columns.len() {
            values.push(from_sql(row.get_ref(i)?));
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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
        SqliteDatabase::open("c".into(), dir.path().join("c.db"), durability).unwrap()
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
}
