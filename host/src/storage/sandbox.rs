//! The SQLite sandbox: a component's SQL reaches exactly its own tables.
//!
//! Component SQL is hostile by assumption, and SQLite is a library in the
//! host's process that can open any file the host can. So every connection
//! that runs component SQL is closed down with SQLite's own guards rather
//! than by inspecting SQL text (which a quoted name, a comment or a view
//! would get past):
//!
//! - an **authorizer** (`sqlite3_set_authorizer`), which SQLite consults for
//!   every table, column, pragma, function and schema change while it
//!   compiles a statement, including statements inside triggers and views
//!   and the `ATTACH` that `VACUUM` runs internally. It refuses:
//!   - `ATTACH`/`DETACH`, and so `VACUUM` and `VACUUM INTO` (no other file);
//!   - `BEGIN`/`COMMIT`/`ROLLBACK` and savepoints: transactions are the
//!     host's, through `begin()`, so an outbox event commits with its
//!     transaction and no component holds its database locked past a request;
//!   - any read, write or schema change of a host table (`_agora_*`, such
//!     as the outbox, whose rows would be forged events), and setting an
//!     AUTOINCREMENT counter (SQLite itself refuses writes to its schema
//!     table);
//!   - PRAGMAs other than reading [`SCHEMA_PRAGMAS`] and
//!     [`SETTING_PRAGMAS`] (`database_list` would show host paths,
//!     `journal_mode` or `synchronous` would change the host's durability);
//!   - virtual tables and the `dbstat` table (they read pages, not rows),
//!     and the `load_extension` and `fts3_tokenizer` functions;
//!   - anything it does not recognise.
//! - `SQLITE_LIMIT_ATTACHED = 0`, so no database can be attached even past
//!   the authorizer;
//! - `SQLITE_DBCONFIG_DEFENSIVE`, which forbids editing the schema table or
//!   raw pages, and `trusted_schema` off, so views and triggers a component
//!   creates run only side-effect-free functions;
//! - no URI filenames in the open flags and no extension loading (never
//!   enabled).
//!
//! The host's own statements (transactions, the outbox, the migration
//! ledger) run in [`Sandboxed::host`], which lifts the authorizer for their
//! duration, except for what a trigger or a view would do on their behalf:
//! the host uses neither, so one there was made by a component. They are
//! never cached: the authorizer runs when a statement is
//! compiled, so a cached host statement found again by a component sending
//! the same text would skip it. Component statements are cached as before;
//! they were authorized when compiled, and SQLite recompiles (and so
//! re-authorizes) them after a schema change.
//!
//! A refusal comes back as an error that says what was refused and why,
//! never a host path.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::config::DbConfig;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::limits::Limit;
use rusqlite::{Connection, ErrorCode, OpenFlags};

use super::Error;

/// PRAGMAs a component may run, and only to read: each describes the
/// component's own schema or reports a setting, and none shows a path or
/// changes anything. These take a table or index name (never a host
/// table's: `table_info(_agora_outbox)` is refused like any other access).
pub const SCHEMA_PRAGMAS: &[&str] = &[
    "table_info",
    "table_xinfo",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
    "foreign_key_check",
];

/// Settings a component may read (`PRAGMA foreign_keys`), never set.
pub const SETTING_PRAGMAS: &[&str] = &["foreign_keys", "user_version", "data_version"];

/// The prefix of the host's own tables in a component's database.
const HOST_TABLE_PREFIX: &str = "_agora_";

/// A connection whose component SQL runs inside the sandbox.
pub struct Sandboxed {
    conn: Connection,
    guard: Arc<Guard>,
}

/// What the authorizer of one connection shares with it.
#[derive(Default)]
struct Guard {
    /// Set while the host runs its own statements.
    host: AtomicBool,
    /// Why the authorizer refused the statement being compiled.
    refusal: Mutex<Option<String>>,
}

impl Sandboxed {
    /// Opens (creating) a database with the sandbox in place. `setup` is the
    /// host's own PRAGMAs, run before the sandbox closes.
    pub fn open(path: &Path, setup: &str) -> rusqlite::Result<Sandboxed> {
        // Default flags minus SQLITE_OPEN_URI: the path is a plain file name.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags)?;
        conn.execute_batch(setup)?;
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_TRUSTED_SCHEMA, false)?;
        conn.set_limit(Limit::SQLITE_LIMIT_ATTACHED, 0)?;
        let guard = Arc::new(Guard::default());
        let shared = guard.clone();
        conn.authorizer(Some(move |ctx: AuthContext<'_>| {
            let verdict = if shared.host.load(Ordering::Relaxed) {
                judge_host(&ctx)
            } else {
                judge(&ctx)
            };
            match verdict {
                Ok(()) => Authorization::Allow,
                Err(reason) => {
                    // The first refusal is the one the statement failed on.
                    shared.refusal.lock().unwrap().get_or_insert(reason);
                    Authorization::Deny
                }
            }
        }));
        Ok(Sandboxed { conn, guard })
    }

    /// Runs component SQL. A refused statement fails with the reason.
    pub fn component<R>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<R>,
    ) -> Result<R, Error> {
        self.run(f)
    }

    /// Runs `f`; a statement the authorizer refused fails with its reason.
    fn run<R>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<R>) -> Result<R, Error> {
        self.guard.refusal.lock().unwrap().take();
        f(&self.conn).map_err(|e| match self.guard.refusal.lock().unwrap().take() {
            Some(reason) => Error::InvalidQuery(reason),
            None => map_err(e),
        })
    }

    /// Runs the host's own statements, past the authorizer. Never give it
    /// component SQL, and never cache a statement in it (see module docs).
    pub fn host<R>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<R>) -> Result<R, Error> {
        struct Lift<'a>(&'a AtomicBool);
        impl Drop for Lift<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Relaxed);
            }
        }
        self.guard.host.store(true, Ordering::Relaxed);
        let _lift = Lift(&self.guard.host);
        self.run(f)
    }

    /// The connection, for calls that compile no SQL (`is_autocommit`,
    /// interrupt handles).
    pub fn raw(&self) -> &Connection {
        &self.conn
    }
}

/// Storage errors from SQLite errors (the sandbox's refusals aside).
pub fn map_err(e: rusqlite::Error) -> Error {
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

fn is_host_table(name: &str) -> bool {
    name.get(..HOST_TABLE_PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(HOST_TABLE_PREFIX))
}

const OWN_DATABASE: &str = "a component reaches only its own database";
const OWN_TRANSACTIONS: &str =
    "transactions are opened with `begin()` and end with its commit or drop";

/// The host's own statements are let through, but never what a trigger or
/// a view runs for them: the host uses neither, so one there was made by a
/// component (say, on a table it renamed to a host table's name) to act
/// with the host's rights.
fn judge_host(ctx: &AuthContext<'_>) -> Result<(), String> {
    match ctx.accessor {
        None => Ok(()),
        Some(name) => Err(format!(
            "`{name}` is a component's trigger or view: it cannot run for the host"
        )),
    }
}

/// The authorizer's decision on one action of a component's statement.
fn judge(ctx: &AuthContext<'_>) -> Result<(), String> {
    use AuthAction::*;
    let host_table = |name: &str| -> Result<(), String> {
        if is_host_table(name) {
            Err(format!(
                "`{name}` is one of the host's tables: a component reaches only its own tables"
            ))
        } else {
            Ok(())
        }
    };
    let names = |names: &[&str]| names.iter().try_for_each(|n| host_table(n));
    // SQLite's own DDL writes its tables through these same checks (a
    // rename updates `sqlite_sequence.name`, a drop deletes its row), and
    // SQLite refuses direct writes to its schema table itself (defensive
    // mode). What is left to refuse is setting an AUTOINCREMENT counter,
    // such as the outbox's, where no further row could be numbered.
    let sequence_counter = |table: &str, column: Option<&str>| -> Result<(), String> {
        if table.eq_ignore_ascii_case("sqlite_sequence") && column != Some("name") {
            Err("setting AUTOINCREMENT counters in `sqlite_sequence` is not allowed".into())
        } else {
            Ok(())
        }
    };
    match ctx.action {
        Select | Recursive => Ok(()),
        Read { table_name, .. } => {
            host_table(table_name)?;
            if table_name.eq_ignore_ascii_case("dbstat") {
                return Err("reading `dbstat` is not allowed: it reads pages, not rows".into());
            }
            // `pragma_*` table-valued functions run their PRAGMA, which this
            // authorizer judges like any other.
            Ok(())
        }
        Insert { table_name } => {
            host_table(table_name)?;
            sequence_counter(table_name, None)
        }
        Update {
            table_name,
            column_name,
        } => {
            host_table(table_name)?;
            sequence_counter(table_name, Some(column_name))
        }
        Delete { table_name } => host_table(table_name),
        CreateTable { table_name }
        | CreateTempTable { table_name }
        | DropTable { table_name }
        | DropTempTable { table_name }
        | Analyze { table_name } => names(&[table_name]),
        CreateView { view_name }
        | CreateTempView { view_name }
        | DropView { view_name }
        | DropTempView { view_name } => names(&[view_name]),
        CreateIndex {
            index_name,
            table_name,
        }
        | CreateTempIndex {
            index_name,
            table_name,
        }
        | DropIndex {
            index_name,
            table_name,
        }
        | DropTempIndex {
            index_name,
            table_name,
        } => names(&[index_name, table_name]),
        CreateTrigger {
            trigger_name,
            table_name,
        }
        | CreateTempTrigger {
            trigger_name,
            table_name,
        }
        | DropTrigger {
            trigger_name,
            table_name,
        }
        | DropTempTrigger {
            trigger_name,
            table_name,
        } => names(&[trigger_name, table_name]),
        AlterTable { table_name, .. } => names(&[table_name]),
        Reindex { index_name } => names(&[index_name]),
        Pragma {
            pragma_name,
            pragma_value,
        } => {
            let name = pragma_name.to_ascii_lowercase();
            let schema = SCHEMA_PRAGMAS.contains(&name.as_str());
            if !schema && !SETTING_PRAGMAS.contains(&name.as_str()) {
                return Err(format!(
                    "PRAGMA {name} is not allowed: components may only read {}",
                    [SCHEMA_PRAGMAS, SETTING_PRAGMAS].concat().join(", ")
                ));
            }
            match pragma_value {
                Some(table) if schema => host_table(table.trim_matches(['\'', '"', '`', '[', ']'])),
                Some(_) => Err(format!(
                    "PRAGMA {name} may be read, not set: the host owns the connection's settings"
                )),
                None => Ok(()),
            }
        }
        Function { function_name } => {
            let name = function_name.to_ascii_lowercase();
            if name == "load_extension" || name == "fts3_tokenizer" {
                Err(format!(
                    "the function {name}() is not allowed: components cannot load code into the host"
                ))
            } else {
                Ok(())
            }
        }
        Attach { .. } => Err(format!(
            "ATTACH is not allowed (nor VACUUM, which attaches its copy): {OWN_DATABASE}"
        )),
        Detach { .. } => Err(format!("DETACH is not allowed: {OWN_DATABASE}")),
        Transaction { .. } => Err(format!(
            "transaction control (BEGIN, COMMIT, ROLLBACK) is not allowed in SQL: {OWN_TRANSACTIONS}"
        )),
        Savepoint { .. } => Err(format!(
            "SAVEPOINT and RELEASE are not allowed: {OWN_TRANSACTIONS}"
        )),
        CreateVtable { .. } | DropVtable { .. } => Err(
            "virtual tables are not allowed: components use the SQL subset PostgreSQL shares"
                .into(),
        ),
        _ => Err("this statement is not allowed in a component's database".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &tempfile::TempDir) -> Sandboxed {
        let db = Sandboxed::open(&dir.path().join("c.db"), "PRAGMA journal_mode = WAL;").unwrap();
        db.host(|c| {
            c.execute_batch(
                "CREATE TABLE _agora_outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, event TEXT NOT NULL);",
            )
        })
        .unwrap();
        db.component(|c| {
            c.execute_batch("CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);")
        })
        .unwrap();
        db
    }

    fn refused(db: &Sandboxed, sql: &str) -> String {
        match db.component(|c| c.execute_batch(sql)) {
            Err(Error::InvalidQuery(m)) => m,
            other => panic!("`{sql}` was not refused: {other:?}"),
        }
    }

    #[test]
    fn attacks_are_refused_with_their_reason() {
        let dir = tempfile::TempDir::new().unwrap();
        let db = open(&dir);
        let other = dir.path().join("other.db");
        let copy = dir.path().join("copy.db");
        let cases = [
            (
                format!("ATTACH '{}' AS o", other.display()),
                "ATTACH is not allowed",
            ),
            (
                format!("ATTACH 'file:{}?mode=rwc' AS o", other.display()),
                "ATTACH is not allowed",
            ),
            (
                format!("VACUUM INTO '{}'", copy.display()),
                "ATTACH is not allowed",
            ),
            ("VACUUM".into(), "ATTACH is not allowed"),
            ("DETACH temp".into(), "DETACH is not allowed"),
            ("BEGIN IMMEDIATE".into(), "transaction control"),
            ("COMMIT".into(), "transaction control"),
            ("ROLLBACK".into(), "transaction control"),
            ("SAVEPOINT s".into(), "SAVEPOINT"),
            (
                "PRAGMA database_list".into(),
                "PRAGMA database_list is not allowed",
            ),
            (
                "SELECT * FROM pragma_database_list".into(),
                "PRAGMA database_list is not allowed",
            ),
            (
                "PRAGMA journal_mode = DELETE".into(),
                "PRAGMA journal_mode is not allowed",
            ),
            (
                "PRAGMA writable_schema = ON".into(),
                "PRAGMA writable_schema is not allowed",
            ),
            ("PRAGMA foreign_keys = OFF".into(), "may be read, not set"),
            (
                "PRAGMA table_info(_agora_outbox)".into(),
                "`_agora_outbox` is one of the host's tables",
            ),
            (
                "SELECT * FROM pragma_table_info('_agora_outbox')".into(),
                "`_agora_outbox` is one of the host's tables",
            ),
            (
                "SELECT load_extension('x')".into(),
                "load_extension() is not allowed",
            ),
            (
                "SELECT count(*) FROM _agora_outbox".into(),
                "`_agora_outbox` is one of the host's tables",
            ),
            (
                "SELECT event FROM main._agora_outbox".into(),
                "`_agora_outbox`",
            ),
            (
                "INSERT INTO _agora_outbox (event) VALUES ('{}')".into(),
                "`_agora_outbox`",
            ),
            ("DELETE FROM \"_AGORA_OUTBOX\"".into(), "`_agora_outbox`"),
            ("DROP TABLE _agora_outbox".into(), "`_agora_outbox`"),
            (
                "ALTER TABLE _agora_outbox RENAME TO mine".into(),
                "`_agora_outbox`",
            ),
            (
                "CREATE TEMP TABLE _agora_outbox (x)".into(),
                "`_agora_outbox`",
            ),
            (
                "CREATE TRIGGER t AFTER DELETE ON _agora_outbox BEGIN SELECT 1; END".into(),
                "`_agora_outbox`",
            ),
            (
                "CREATE INDEX i ON _agora_outbox (event)".into(),
                "`_agora_outbox`",
            ),
            (
                "UPDATE sqlite_sequence SET seq = 9223372036854775807".into(),
                "AUTOINCREMENT counters",
            ),
            (
                "INSERT INTO sqlite_sequence VALUES ('_agora_outbox', 1)".into(),
                "AUTOINCREMENT counters",
            ),
            ("SELECT * FROM dbstat".into(), "dbstat"),
            (
                "CREATE VIRTUAL TABLE f USING fts5(body)".into(),
                "virtual tables",
            ),
        ];
        for (sql, reason) in cases {
            let message = refused(&db, &sql);
            assert!(message.contains(reason), "`{sql}`: {message}");
            assert!(
                !message.contains(&*dir.path().to_string_lossy()),
                "`{sql}` shows a path: {message}"
            );
        }
        assert!(!other.exists() && !copy.exists(), "a file was created");
        assert!(db.raw().is_autocommit());
    }

    #[test]
    fn views_and_triggers_cannot_reach_host_tables() {
        let dir = tempfile::TempDir::new().unwrap();
        let db = open(&dir);
        // Creating them is allowed; using them compiles their body as the
        // component's statement, so the authorizer sees the host table.
        db.component(|c| {
            c.execute_batch(
                "CREATE VIEW v AS SELECT event FROM _agora_outbox;
                 CREATE TRIGGER forge AFTER INSERT ON kv BEGIN
                     INSERT INTO _agora_outbox (event) VALUES (new.value);
                 END;",
            )
        })
        .unwrap();
        let message = refused(&db, "SELECT * FROM v");
        assert!(message.contains("_agora_outbox"), "{message}");
        let message = refused(&db, "INSERT INTO kv VALUES ('k', '{}')");
        assert!(message.contains("_agora_outbox"), "{message}");
        let forged: i64 = db
            .host(|c| c.query_row("SELECT count(*) FROM _agora_outbox", [], |r| r.get(0)))
            .unwrap();
        assert_eq!(forged, 0);
    }

    #[test]
    fn own_tables_and_read_only_pragmas_work() {
        let dir = tempfile::TempDir::new().unwrap();
        let db = open(&dir);
        db.component(|c| {
            c.execute_batch(
                "INSERT INTO kv VALUES ('a', '1');
                 CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT);
                 INSERT INTO t (v) SELECT value FROM kv;
                 CREATE INDEX t_v ON t (v);
                 CREATE VIEW kv_view AS SELECT key FROM kv;
                 ALTER TABLE t ADD COLUMN w TEXT;
                 ALTER TABLE t RENAME TO t2;
                 DROP TABLE t2;
                 ANALYZE kv;",
            )
        })
        .unwrap();
        let columns: i64 = db
            .component(|c| {
                c.query_row("SELECT count(*) FROM pragma_table_info('kv')", [], |r| {
                    r.get(0)
                })
            })
            .unwrap();
        assert_eq!(columns, 2);
        db.component(|c| c.query_row("PRAGMA foreign_keys", [], |r| r.get::<_, i64>(0)))
            .unwrap();
        // SQLite refuses this one itself.
        assert!(db
            .component(|c| c.execute_batch("UPDATE sqlite_master SET sql = ''"))
            .is_err());
        let keys: i64 = db
            .component(|c| c.query_row("SELECT count(*) FROM kv_view", [], |r| r.get(0)))
            .unwrap();
        assert_eq!(keys, 1);
        // The host's own statements still run, transactions included.
        db.host(|c| c.execute_batch("BEGIN IMMEDIATE; DELETE FROM _agora_outbox; COMMIT;"))
            .unwrap();
    }
}
