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
//! Durability: WAL with `synchronous=NORMAL` survives a crash of the host
//! process (every commit is in the OS before it is acknowledged); only a
//! power loss can take the last commits.
//!
//! rusqlite is blocking, so every call runs on tokio's blocking pool.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{params_from_iter, Connection, ErrorCode};
use sha2::{Digest, Sha256};
use tokio::sync::OwnedMutexGuard;

use super::{Database, Error, Migration, RowSet, StorageBackend, Transaction, Value};
use crate::messaging::Envelope;

pub struct SqliteBackend {
    dir: PathBuf,
    open: Mutex<HashMap<String, Arc<SqliteDatabase>>>,
}

impl SqliteBackend {
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        Ok(SqliteBackend {
            dir: dir.to_owned(),
            open: Mutex::default(),
        })
    }
}

#[async_trait]
impl StorageBackend for SqliteBackend {
    async fn open(&self, component: &str) -> Result<Arc<dyn Database>, Error> {
        if let Some(db) = self.open.lock().unwrap().get(component) {
            return Ok(db.clone());
        }
        let path = self.dir.join(format!("{component}.db"));
        let db = tokio::task::spawn_blocking(move || SqliteDatabase::open(path))
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))??;
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
        tokio::task::spawn_blocking(move || {
            std::fs::metadata(&dir)
                .map(|_| ())
                .map_err(|e| Error::Unavailable(format!("{}: {e}", dir.display())))
        })
        .await
        .map_err(|e| Error::Unavailable(e.to_string()))?
    }
}

struct SqliteDatabase {
    path: PathBuf,
    writer: Arc<tokio::sync::Mutex<Connection>>,
    readers: Arc<Mutex<Vec<Connection>>>,
}

/// Read connections kept open per database; more are opened under load and
/// closed afterwards.
const IDLE_READERS: usize = 4;

fn connect(path: &Path) -> Result<Connection, Error> {
    let conn = Connection::open(path)
        .map_err(|e| Error::Unavailable(format!("{}: {e}", path.display())))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = NORMAL;
         PRAGMA foreign_keys = ON;
         PRAGMA busy_timeout = 5000;",
    )
    .map_err(map_err)?;
    Ok(conn)
}

impl SqliteDatabase {
    fn open(path: PathBuf) -> Result<Self, Error> {
        let conn = connect(&path)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS _agora_migrations (
                 name TEXT PRIMARY KEY,
                 checksum TEXT NOT NULL,
                 applied_at INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS _agora_outbox (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 event TEXT NOT NULL
             );",
        )
        .map_err(map_err)?;
        Ok(SqliteDatabase {
            path,
            writer: Arc::new(tokio::sync::Mutex::new(conn)),
            readers: Arc::default(),
        })
    }

    async fn lock_writer(&self) -> OwnedMutexGuard<Connection> {
        self.writer.clone().lock_owned().await
    }

    async fn with_writer<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<R, Error> + Send + 'static,
    ) -> Result<R, Error> {
        let mut conn = self.lock_writer().await;
        blocking(move || f(&mut conn)).await
    }

    async fn with_reader<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, Error> + Send + 'static,
    ) -> Result<R, Error> {
        let readers = self.readers.clone();
        let path = self.path.clone();
        blocking(move || {
            let pooled = readers.lock().unwrap().pop();
            let conn = match pooled {
                Some(conn) => conn,
                None => connect(&path)?,
            };
            let result = f(&conn);
            let mut idle = readers.lock().unwrap();
            if idle.len() < IDLE_READERS {
                idle.push(conn);
            }
            result
        })
        .await
    }
}

async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, Error> + Send + 'static,
) -> Result<R, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Unavailable(format!("storage task failed: {e}")))?
}

#[async_trait]
impl Database for SqliteDatabase {
    async fn query(&self, sql: &str, params: Vec<Value>) -> Result<RowSet, Error> {
        let sql = adapt_placeholders(sql);
        self.with_reader(move |c| run_query(c, &sql, &params)).await
    }

    async fn execute(&self, sql: &str, params: Vec<Value>) -> Result<u64, Error> {
        let sql = adapt_placeholders(sql);
        self.with_writer(move |c| run_execute(c, &sql, &params))
            .await
    }

    async fn begin(&self) -> Result<Box<dyn Transaction>, Error> {
        let mut tx = SqliteTransaction {
            conn: Some(self.lock_writer().await),
        };
        tx.run(|c| {
            // A transaction left open by a failed task must not leak into this one.
            if !c.is_autocommit() {
                c.execute_batch("ROLLBACK").map_err(map_err)?;
            }
            c.execute_batch("BEGIN IMMEDIATE").map_err(map_err)
        })
        .await?;
        Ok(Box::new(tx))
    }

    async fn migrate(&self, migrations: &[Migration]) -> Result<Vec<String>, Error> {
        let migrations = migrations.to_vec();
        self.with_writer(move |c| {
            let mut applied = Vec::new();
            for m in migrations {
                let checksum = hex(&Sha256::digest(m.sql.as_bytes()));
                let recorded: Option<String> = c
                    .query_row(
                        "SELECT checksum FROM _agora_migrations WHERE name = ?1",
                        [&m.name],
                        |r| r.get(0),
                    )
                    .map(Some)
                    .or_else(|e| match e {
                        rusqlite::Error::QueryReturnedNoRows => Ok(None),
                        e => Err(map_err(e)),
                    })?;
                match recorded {
                    Some(sum) if sum == checksum => continue,
                    Some(_) => {
                        return Err(Error::InvalidQuery(format!(
                            "migration `{}` was changed after it was applied; \
                             add a new migration instead",
                            m.name
                        )))
                    }
                    None => {}
                }
                let tx = c.transaction().map_err(map_err)?;
                tx.execute_batch(&m.sql).map_err(|e| {
                    Error::InvalidQuery(format!("migration `{}` failed: {e}", m.name))
                })?;
                tx.execute(
                    "INSERT INTO _agora_migrations (name, checksum, applied_at) VALUES (?1, ?2, ?3)",
                    rusqlite::params![m.name, checksum, crate::now_millis() as i64],
                )
                .map_err(map_err)?;
                tx.commit().map_err(map_err)?;
                applied.push(m.name);
            }
            Ok(applied)
        })
        .await
    }

    async fn outbox_pending(&self, limit: usize) -> Result<Vec<(i64, Envelope)>, Error> {
        self.with_reader(move |c| {
            let mut stmt = c
                .prepare_cached("SELECT seq, event FROM _agora_outbox ORDER BY seq LIMIT ?1")
                .map_err(map_err)?;
            let rows = stmt
                .query_map([limit as i64], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                })
                .map_err(map_err)?;
            rows.map(|row| {
                let (seq, json) = row.map_err(map_err)?;
                let event = serde_json::from_str(&json)
                    .map_err(|e| Error::InvalidQuery(format!("outbox row {seq}: {e}")))?;
                Ok((seq, event))
            })
            .collect()
        })
        .await
    }

    async fn outbox_remove(&self, seqs: &[i64]) -> Result<(), Error> {
        let seqs = seqs.to_vec();
        self.with_writer(move |c| {
            let tx = c.transaction().map_err(map_err)?;
            for seq in seqs {
                tx.execute("DELETE FROM _agora_outbox WHERE seq = ?1", [seq])
                    .map_err(map_err)?;
            }
            tx.commit().map_err(map_err)
        })
        .await
    }
}

/// Owns the write connection from `BEGIN` until commit or drop.
struct SqliteTransaction {
    conn: Option<OwnedMutexGuard<Connection>>,
}

impl SqliteTransaction {
    async fn run<R: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut Connection) -> Result<R, Error> + Send + 'static,
    ) -> Result<R, Error> {
        let mut conn = self
            .conn
            .take()
            .ok_or_else(|| Error::InvalidQuery("the transaction has ended".into()))?;
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let result = f(&mut conn);
            (conn, result)
        })
        .await
        .map_err(|e| Error::Unavailable(format!("storage task failed: {e}")))?;
        self.conn = Some(conn);
        result
    }
}

#[async_trait]
impl Transaction for SqliteTransaction {
    async fn query(&mut self, sql: &str, params: Vec<Value>) -> Result<RowSet, Error> {
        let sql = adapt_placeholders(sql);
        self.run(move |c| run_query(c, &sql, &params)).await
    }

    async fn execute(&mut self, sql: &str, params: Vec<Value>) -> Result<u64, Error> {
        let sql = adapt_placeholders(sql);
        self.run(move |c| run_execute(c, &sql, &params)).await
    }

    async fn enqueue(&mut self, event: &Envelope) -> Result<(), Error> {
        let json = serde_json::to_string(event).map_err(|e| Error::InvalidQuery(e.to_string()))?;
        self.run(move |c| {
            c.execute("INSERT INTO _agora_outbox (event) VALUES (?1)", [json])
                .map(|_| ())
                .map_err(map_err)
        })
        .await
    }

    async fn commit(mut self: Box<Self>) -> Result<(), Error> {
        self.run(|c| c.execute_batch("COMMIT").map_err(map_err))
            .await?;
        // Committed: release the connection without the rollback in `drop`.
        self.conn.take();
        Ok(())
    }
}

impl Drop for SqliteTransaction {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            if let Err(e) = conn.execute_batch("ROLLBACK") {
                tracing::warn!(error = %e, "rollback failed");
            }
        }
    }
}

fn run_query(conn: &Connection, sql: &str, params: &[Value]) -> Result<RowSet, Error> {
    let mut stmt = conn.prepare_cached(sql).map_err(map_err)?;
    let columns: Vec<String> = stmt.column_names().into_iter().map(String::from).collect();
    let mut rows = stmt
        .query(params_from_iter(params.iter().map(to_sql)))
        .map_err(map_err)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(map_err)? {
        let mut values = Vec::with_capacity(columns.len());
        for i in 0..columns.len() {
            values.push(from_sql(row.get_ref(i).map_err(map_err)?));
        }
        out.push(values);
    }
    Ok(RowSet { columns, rows: out })
}

fn run_execute(conn: &Connection, sql: &str, params: &[Value]) -> Result<u64, Error> {
    let mut stmt = conn.prepare_cached(sql).map_err(map_err)?;
    // Stepping through rows (rather than `Statement::execute`) lets a
    // statement with RETURNING run as an execute too.
    let mut rows = stmt
        .query(params_from_iter(params.iter().map(to_sql)))
        .map_err(map_err)?;
    while rows.next().map_err(map_err)?.is_some() {}
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

fn map_err(e: rusqlite::Error) -> Error {
    match e.sqlite_error_code() {
        Some(ErrorCode::ConstraintViolation) => Error::ConstraintViolation(e.to_string()),
        Some(
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::CannotOpen
            | ErrorCode::OutOfMemory,
        ) => Error::Unavailable(e.to_string()),
        _ => Error::InvalidQuery(e.to_string()),
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
    use super::adapt_placeholders;

    #[test]
    fn placeholders_are_adapted_outside_literals() {
        assert_eq!(
            adapt_placeholders("SELECT '$1', \"$2\" FROM t WHERE a = $1 AND b = $12 -- $3\n"),
            "SELECT '$1', \"$2\" FROM t WHERE a = ?1 AND b = ?12 -- $3\n"
        );
    }
}
