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
//!   - `ATTACH`/`DETACH`, and so `VACUUM INTO` (no other file; SQLite
//!     itself refuses `VACUUM` in the savepoint every write runs in);
//!   - `BEGIN`/`COMMIT`/`ROLLBACK` and savepoints: transactions are the
//!     host's, through `begin()`, so an outbox event commits with its
//!     transaction and no component holds its database locked past a request;
//!   - any read, write or schema change of a host table (`_agora_*`, such
//!     as the outbox, whose rows would be forged events);
//!   - any write of `sqlite_sequence`, where the AUTOINCREMENT counters
//!     (the outbox's among them) live, except SQLite's own bookkeeping of
//!     a DROP or a rename, which it runs as a nested statement of that DDL
//!     and which is let through within that one statement (SQLite itself
//!     refuses writes to its schema table);
//!   - temporary tables, views, indexes and triggers: they live on the
//!     connection, and connections serve one request after another;
//!   - PRAGMAs other than reading [`SCHEMA_PRAGMAS`] and
//!     [`SETTING_PRAGMAS`] (`database_list` would show host paths,
//!     `journal_mode` or `synchronous` would change the host's durability);
//!   - virtual tables and the `dbstat` table (they read pages, not rows),
//!     and the `load_extension` and `fts3_tokenizer` functions;
//!   - anything it does not recognise.
//! - a **schema check after DDL**, for the two things SQLite does not show
//!   the authorizer: the new name of `ALTER TABLE .. RENAME` (a component
//!   must not squat a name in the host's `_agora_` space, which a later
//!   host version would create with IF NOT EXISTS) and the schema of
//!   `CREATE TRIGGER temp.t ON main.x`. Every component write runs in a
//!   savepoint ([`Sandboxed::component_write`]) or a migration's
//!   transaction, so a statement the check refuses is undone. The check
//!   runs only after a statement the authorizer saw create or alter
//!   something, so plain reads and writes pay one savepoint and no query.
//!   The alternative, parsing the new name out of the SQL, is what this
//!   module avoids throughout;
//! - **read-only queries**: `query` runs on connections opened
//!   `SQLITE_OPEN_READONLY`, and `run_query` (`sqlite.rs`) refuses any
//!   statement SQLite reports as writing (`sqlite3_stmt_readonly`), also
//!   on the writer inside a transaction; writes go through `execute`,
//!   which holds the write lock;
//! - **memory bounds**: `SQLITE_LIMIT_LENGTH` of [`MAX_VALUE_BYTES`] (one
//!   string, blob or row), `SQLITE_LIMIT_SQL_LENGTH` of 1 MiB, SQLite's
//!   process-wide soft and hard heap limits ([`HARD_HEAP_LIMIT`]), and a
//!   cap on what a `query` result may carry (`sqlite.rs`). A statement
//!   past them fails with an error; the host's memory stays bounded
//!   however many run at once. Runaway CPU is bounded by the request's
//!   deadline, which interrupts the statement at the bottom of SQLite's
//!   loops; SQLite's quadratic string functions, which ran for minutes in
//!   one instruction, are replaced (`functions.rs`). A statement without a
//!   loop stops at its next large allocation (`allocator.rs`) or call of a
//!   replaced function; one of many terms that neither allocate nor call
//!   (comparisons, numbers from large texts) runs on until its text is
//!   done, but only on idle CPU, while its own component's SQL is refused
//!   (`threads.rs`, which says what it still holds);
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
use std::sync::{Arc, Mutex, Once};

use rusqlite::config::DbConfig;
use rusqlite::fallible_iterator::FallibleIterator;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::limits::Limit;
use rusqlite::{Batch, Connection, ErrorCode, OpenFlags};

use super::{allocator, functions, Error};

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

/// The host's tables (see `HOST_SCHEMA` in `sqlite.rs`): the only names in
/// the host's name space a component's database may hold.
pub const HOST_TABLES: &[&str] = &[
    "_agora_migrations",
    "_agora_outbox",
    "_agora_outbox_rejected",
];

/// The longest string or blob component SQL may make or store
/// (`SQLITE_LIMIT_LENGTH`, which also bounds a row): 8 MiB, eight times the
/// default request body and an eighth of an instance's default memory, so
/// nothing a component could receive is cut, while `zeroblob(1e9)` fails
/// at once instead of taking a gigabyte of the host.
pub const MAX_VALUE_BYTES: i32 = 8 << 20;

/// The longest SQL statement (`SQLITE_LIMIT_SQL_LENGTH`): 1 MiB, far above
/// any migration, and the default request body.
const MAX_SQL_BYTES: i32 = 1 << 20;

/// The heap of every SQLite connection in the process (component databases
/// and the message log alike), which SQLite counts itself. Above the soft
/// limit it recycles page-cache memory rather than allocate more; the hard
/// limit makes an allocation past it fail with SQLITE_NOMEM, so concurrent
/// statements that each stay under [`MAX_VALUE_BYTES`] per value (a row of
/// many large columns, a large sort) end with an error, not with the host
/// killed by the OOM killer. 512 MiB is many times what page caches and
/// statements of a working shop use (a few MiB); the price is that one
/// component's bomb can fail others' statements with "out of memory" while
/// it runs, which they survive and the host does too.
const SOFT_HEAP_LIMIT: i64 = 256 << 20;
const HARD_HEAP_LIMIT: i64 = 512 << 20;

/// What a connection may do to its database file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    /// Opened `SQLITE_OPEN_READONLY`: SQLite refuses every write to the
    /// file, whatever the statement.
    ReadOnly,
}

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
    compiling: Mutex<Compiling>,
}

/// What the authorizer learned about the statement being compiled.
#[derive(Default)]
struct Compiling {
    /// Why it refused the statement (the first refusal, the one the
    /// statement failed on).
    refusal: Option<String>,
    /// The statement drops or alters a table, so SQLite's own bookkeeping
    /// of AUTOINCREMENT counters may write `sqlite_sequence` for it.
    bookkeeping: Option<Bookkeeping>,
    /// Something was created or altered since the host last checked the
    /// schema (see [`Sandboxed::check_schema`]); kept across statements.
    schema_changed: bool,
}

/// What SQLite writes to `sqlite_sequence` on a component's DDL: a dropped
/// table's row is deleted, a renamed table's row renamed (both through the
/// authorizer, as nested statements of the DROP or ALTER).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bookkeeping {
    Drop,
    Alter,
}

/// Why component SQL failed: SQLite's error (an authorizer's refusal among
/// them), or the host's refusal of a statement SQLite would run.
pub enum Failure {
    Sqlite(rusqlite::Error),
    Refused(String),
}

impl From<rusqlite::Error> for Failure {
    fn from(e: rusqlite::Error) -> Self {
        Failure::Sqlite(e)
    }
}

/// Sets up SQLite for the whole process, once, before any connection
/// opens: the allocator that stops interrupted statements
/// (`allocator.rs`), then the heap limits (see [`HARD_HEAP_LIMIT`]), whose
/// call initializes SQLite. Every connection the host opens calls it.
pub fn prepare_sqlite() {
    static PREPARED: Once = Once::new();
    PREPARED.call_once(|| {
        if !allocator::install() {
            // A security bound lost, not a failure to serve: said loudly.
            tracing::error!(
                "SQLite initialized before the host could wrap its allocator: \
                 an abandoned statement without a loop runs to its end"
            );
        }
        // SAFETY: both only set a process-wide limit, are thread-safe, and
        // take any value.
        unsafe {
            rusqlite::ffi::sqlite3_soft_heap_limit64(SOFT_HEAP_LIMIT);
            rusqlite::ffi::sqlite3_hard_heap_limit64(HARD_HEAP_LIMIT);
        }
    });
}

/// Query plans that do not depend on bound values (SQLite's query planner
/// stability guarantee), on every connection the host opens. Without it,
/// SQLite compiles the value bound to `LIMIT ?` (or a `LIKE ?` pattern)
/// into the plan and marks the statement expired whenever that parameter
/// is bound again, so a cached statement was compiled afresh on every run:
/// the message log's reads, a component's paged lists (6% of a checkout's
/// CPU, in `sqlite3Reprepare`). What it gives up needs `ANALYZE` data,
/// which the host never gathers, or an index on a `LIKE` column.
pub fn stable_plans(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .map(drop)
}

impl Sandboxed {
    /// Opens (creating, if `ReadWrite`) a database with the sandbox in
    /// place. `setup` is the host's own PRAGMAs, run before the sandbox
    /// closes.
    pub fn open(path: &Path, access: Access, setup: &str) -> rusqlite::Result<Sandboxed> {
        prepare_sqlite();
        // Default flags minus SQLITE_OPEN_URI: the path is a plain file name.
        let flags = match access {
            Access::ReadWrite => OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
            Access::ReadOnly => OpenFlags::SQLITE_OPEN_READ_ONLY,
        } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags)?;
        conn.execute_batch(setup)?;
        stable_plans(&conn)?;
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_TRUSTED_SCHEMA, false)?;
        conn.set_limit(Limit::SQLITE_LIMIT_ATTACHED, 0)?;
        conn.set_limit(Limit::SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)?;
        conn.set_limit(Limit::SQLITE_LIMIT_SQL_LENGTH, MAX_SQL_BYTES)?;
        functions::install(&conn)?;
        let guard = Arc::new(Guard::default());
        let shared = guard.clone();
        conn.authorizer(Some(move |ctx: AuthContext<'_>| {
            let mut compiling = shared.compiling.lock().unwrap();
            let verdict = if shared.host.load(Ordering::Relaxed) {
                judge_host(&ctx)
            } else {
                judge(&ctx, &mut compiling)
            };
            match verdict {
                Ok(()) => Authorization::Allow,
                Err(reason) => {
                    compiling.refusal.get_or_insert(reason);
                    Authorization::Deny
                }
            }
        }));
        Ok(Sandboxed { conn, guard })
    }

    /// Runs component SQL of one statement at a time (one `prepare`). A
    /// refused statement fails with the reason.
    pub fn component<R, E: Into<Failure>>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, E>,
    ) -> Result<R, Error> {
        self.run(f)
    }

    /// Runs one component statement that may write, in a savepoint, so
    /// that what SQLite's authorizer cannot see while it compiles (the new
    /// name of a renamed table, see [`Sandboxed::check_schema`]) is
    /// undone with the statement when the host refuses it afterwards. In
    /// autocommit mode the savepoint is the statement's transaction, as
    /// SQLite's implicit one would be.
    pub fn component_write<R, E: Into<Failure>>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, E>,
    ) -> Result<R, Error> {
        let outermost = self.conn.is_autocommit();
        self.host(|c| c.execute_batch("SAVEPOINT agora_statement"))?;
        let result = self.run(f).and_then(|r| self.check_schema().map(|()| r));
        if self.conn.is_autocommit() {
            // SQLite rolled the whole transaction back after an error
            // (SQLITE_FULL, NOMEM, IOERR, INTERRUPT, an OR ROLLBACK
            // conflict): the savepoint went with it.
            return result;
        }
        let end = match result {
            Ok(_) => "RELEASE agora_statement",
            Err(_) => "ROLLBACK TO agora_statement; RELEASE agora_statement",
        };
        if let Err(e) = self.host(|c| c.execute_batch(end)) {
            if outermost && !self.conn.is_autocommit() {
                // The RELEASE that commits failed (busy, disk full): leave
                // no transaction open behind an error.
                self.host(|c| c.execute_batch("ROLLBACK"))?;
            }
            return Err(e);
        }
        result
    }

    /// Runs component SQL of any number of statements (a migration), one
    /// statement at a time, so that what the authorizer lets SQLite do for
    /// one (its bookkeeping of a DROP) is not allowed for the next. The
    /// caller runs it in a transaction, which an error rolls back.
    pub fn component_batch(&self, sql: &str) -> Result<(), Error> {
        let mut batch = Batch::new(&self.conn, sql);
        while self.run(|_| -> rusqlite::Result<bool> {
            let Some(mut stmt) = batch.next()? else {
                return Ok(false);
            };
            let mut rows = stmt.raw_query();
            while rows.next()?.is_some() {}
            Ok(true)
        })? {}
        self.check_schema()
    }

    /// Runs `f`; a statement the authorizer refused fails with its reason.
    fn run<R, E: Into<Failure>>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, E>,
    ) -> Result<R, Error> {
        {
            let mut compiling = self.guard.compiling.lock().unwrap();
            compiling.refusal = None;
            compiling.bookkeeping = None;
        }
        f(&self.conn).map_err(|e| {
            let refusal = self.guard.compiling.lock().unwrap().refusal.take();
            match (e.into(), refusal) {
                (Failure::Refused(reason), _) | (Failure::Sqlite(_), Some(reason)) => {
                    Error::InvalidQuery(reason)
                }
                (Failure::Sqlite(e), None) => map_err(e),
            }
        })
    }

    /// Checks, after a statement that created or altered something, what
    /// the authorizer cannot see while SQLite compiles it: the new name of
    /// `ALTER TABLE .. RENAME` (SQLite shows only the old one), and the
    /// schema of `CREATE TRIGGER temp.t ON main.x` (reported as a trigger
    /// of `main`). The schema may then hold no `_agora_` name but the
    /// host's tables, and nothing temporary; otherwise the statement fails,
    /// before the savepoint or transaction around it ends, and so is
    /// undone. Only after DDL: SQLite authorizes every compile, including
    /// the recompile of a cached statement after the schema changed, so no
    /// DDL runs unseen, and other statements pay nothing.
    fn check_schema(&self) -> Result<(), Error> {
        if !std::mem::take(&mut self.guard.compiling.lock().unwrap().schema_changed) {
            return Ok(());
        }
        let (names, temporary): (Vec<String>, Vec<String>) = self.host(|c| {
            let names = |sql: &str| -> rusqlite::Result<Vec<String>> {
                let mut stmt = c.prepare(sql)?;
                let names = stmt.query_map([], |r| r.get(0))?;
                names.collect()
            };
            Ok((
                names("SELECT name FROM sqlite_schema WHERE name LIKE '\\_agora\\_%' ESCAPE '\\'")?,
                names("SELECT name FROM sqlite_temp_schema")?,
            ))
        })?;
        if let Some(name) = names
            .iter()
            .find(|n| !HOST_TABLES.iter().any(|t| t.eq_ignore_ascii_case(n)))
        {
            return Err(Error::InvalidQuery(format!(
                "`{name}` is in the host's name space (`{HOST_TABLE_PREFIX}`): \
                 a component cannot rename a table into it"
            )));
        }
        if let Some(name) = temporary.first() {
            return Err(Error::InvalidQuery(format!(
                "`{name}` would be temporary: temporary objects are not allowed, \
                 they would outlive the request on a shared connection"
            )));
        }
        Ok(())
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
            | ErrorCode::CannotOpen
            | ErrorCode::OutOfMemory,
        ) => Error::Unavailable(e.to_string()),
        Some(ErrorCode::DiskFull) => Error::Unavailable(format!(
            "{e}: the database reached its size limit, or the disk is full"
        )),
        Some(ErrorCode::TooBig) => Error::InvalidQuery(format!(
            "{e}: a string or blob may hold at most {} MiB, a statement {} MiB",
            MAX_VALUE_BYTES >> 20,
            MAX_SQL_BYTES >> 20
        )),
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
fn judge(ctx: &AuthContext<'_>, compiling: &mut Compiling) -> Result<(), String> {
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
    // `sqlite_sequence` holds the AUTOINCREMENT counters, the outbox's
    // among them: a component must not set, delete or rename one. SQLite's
    // own DDL writes it through the authorizer too, as a nested statement
    // of the component's (a DROP deletes the table's row, a rename renames
    // it), so exactly that is let through, within that statement and never
    // for a trigger. (SQLite itself refuses direct writes to its schema
    // table, in defensive mode.)
    let sequence = |table: &str, allowed: bool| -> Result<(), String> {
        if table.eq_ignore_ascii_case("sqlite_sequence") && !(allowed && ctx.accessor.is_none()) {
            Err(
                "writing `sqlite_sequence` is not allowed: AUTOINCREMENT counters are SQLite's"
                    .into(),
            )
        } else {
            Ok(())
        }
    };
    let temporary = |what: &str| -> Result<(), String> {
        Err(format!(
            "temporary {what} are not allowed: they would outlive the request on a shared connection"
        ))
    };
    let in_temp = ctx
        .database_name
        .is_some_and(|d| d.eq_ignore_ascii_case("temp"));
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
            sequence(table_name, false)
        }
        Update {
            table_name,
            column_name,
        } => {
            host_table(table_name)?;
            let renaming = compiling.bookkeeping == Some(Bookkeeping::Alter);
            sequence(table_name, renaming && column_name.eq_ignore_ascii_case("name"))
        }
        Delete { table_name } => {
            host_table(table_name)?;
            sequence(
                table_name,
                compiling.bookkeeping == Some(Bookkeeping::Drop),
            )
        }
        DropTable { table_name } => {
            host_table(table_name)?;
            compiling.bookkeeping = Some(Bookkeeping::Drop);
            Ok(())
        }
        AlterTable { table_name, .. } => {
            host_table(table_name)?;
            compiling.bookkeeping = Some(Bookkeeping::Alter);
            compiling.schema_changed = true;
            Ok(())
        }
        // Temporary objects live on the connection, not in the file, and
        // connections are shared between requests and instances: a
        // temporary table would be read by the next request, a temporary
        // trigger would run in it. (`CREATE TABLE temp.x` is reported as a
        // CREATE TABLE in the database `temp`; `CREATE TRIGGER temp.t ON
        // main.x` as a trigger of `main`, which `check_schema` catches.)
        CreateTempTable { .. } | DropTempTable { .. } => temporary("tables"),
        CreateTempView { .. } | DropTempView { .. } => temporary("views"),
        CreateTempIndex { .. } | DropTempIndex { .. } => temporary("indexes"),
        CreateTempTrigger { .. } | DropTempTrigger { .. } => temporary("triggers"),
        CreateTable { .. } | CreateView { .. } | CreateIndex { .. } | CreateTrigger { .. }
            if in_temp =>
        {
            temporary("objects")
        }
        CreateTable { table_name } => {
            compiling.schema_changed = true;
            names(&[table_name])
        }
        CreateView { view_name } => {
            compiling.schema_changed = true;
            names(&[view_name])
        }
        CreateIndex {
            index_name,
            table_name,
        } => {
            compiling.schema_changed = true;
            names(&[index_name, table_name])
        }
        CreateTrigger {
            trigger_name,
            table_name,
        } => {
            compiling.schema_changed = true;
            names(&[trigger_name, table_name])
        }
        Analyze { table_name } => names(&[table_name]),
        DropView { view_name } => names(&[view_name]),
        DropIndex {
            index_name,
            table_name,
        } => names(&[index_name, table_name]),
        DropTrigger {
            trigger_name,
            table_name,
        } => names(&[trigger_name, table_name]),
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
        let path = dir.path().join("c.db");
        let db = Sandboxed::open(&path, Access::ReadWrite, "PRAGMA journal_mode = WAL;").unwrap();
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
        match db.component_write(|c| c.execute_batch(sql)) {
            Err(Error::InvalidQuery(m)) => m,
            other => panic!("`{sql}` was not refused: {other:?}"),
        }
    }

    #[test]
    fn a_cached_statement_is_not_compiled_again_for_a_new_limit() {
        let dir = tempfile::TempDir::new().unwrap();
        let db = open(&dir);
        let sql = "SELECT key FROM kv ORDER BY key LIMIT $1";
        let recompiled = db
            .component(|c| {
                for limit in [1, 2, 3] {
                    c.prepare_cached(sql)?
                        .query_map([limit], |r| r.get::<_, String>(0))?
                        .for_each(drop);
                }
                Ok::<_, rusqlite::Error>(
                    c.prepare_cached(sql)?
                        .get_status(rusqlite::StatementStatus::RePrepare),
                )
            })
            .unwrap();
        assert_eq!(recompiled, 0, "recompiled for each new LIMIT");
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
            // Refused by SQLite itself in the savepoint every write runs in;
            // the authorizer refuses the ATTACH it would run otherwise.
            (format!("VACUUM INTO '{}'", copy.display()), "cannot VACUUM"),
            ("VACUUM".into(), "cannot VACUUM"),
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
                "temporary tables are not allowed",
            ),
            (
                "CREATE TEMP TABLE scratch (x)".into(),
                "temporary tables are not allowed",
            ),
            (
                "CREATE TABLE temp.scratch (x)".into(),
                "temporary objects are not allowed",
            ),
            (
                "CREATE VIEW temp.v AS SELECT 1".into(),
                "temporary objects are not allowed",
            ),
            (
                "CREATE TRIGGER temp.t AFTER INSERT ON main.kv BEGIN SELECT 1; END".into(),
                "temporary objects are not allowed",
            ),
            (
                "CREATE TEMP VIEW v AS SELECT 1".into(),
                "temporary views are not allowed",
            ),
            (
                "CREATE TEMP TRIGGER t AFTER INSERT ON main.kv BEGIN SELECT 1; END".into(),
                "temporary triggers are not allowed",
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
                "writing `sqlite_sequence` is not allowed",
            ),
            (
                "UPDATE sqlite_sequence SET name = '_agora_outbox' WHERE name = 'kv'".into(),
                "writing `sqlite_sequence` is not allowed",
            ),
            (
                "DELETE FROM sqlite_sequence WHERE name = '_agora_outbox'".into(),
                "writing `sqlite_sequence` is not allowed",
            ),
            (
                "INSERT INTO sqlite_sequence VALUES ('_agora_outbox', 1)".into(),
                "writing `sqlite_sequence` is not allowed",
            ),
            (
                "SELECT length(zeroblob(500000000))".into(),
                "string or blob too big",
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

    fn sequence(db: &Sandboxed) -> Vec<(String, i64)> {
        db.host(|c| {
            let mut s = c.prepare("SELECT name, seq FROM sqlite_sequence ORDER BY name")?;
            let rows = s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
        .unwrap()
    }

    #[test]
    fn sqlite_keeps_its_sequence_through_drop_and_rename_but_a_component_cannot_write_it() {
        let dir = tempfile::TempDir::new().unwrap();
        let db = open(&dir);
        db.host(|c| c.execute_batch("INSERT INTO _agora_outbox (event) VALUES ('{}')"))
            .unwrap();
        db.component_batch(
            "CREATE TABLE a (id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT);
             CREATE TABLE b (id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT);
             INSERT INTO a (v) VALUES ('x');
             INSERT INTO b (v) VALUES ('y');",
        )
        .unwrap();
        // SQLite's own bookkeeping, as nested statements of the DDL.
        db.component_write(|c| c.execute_batch("ALTER TABLE a RENAME TO a2"))
            .unwrap();
        db.component_write(|c| c.execute_batch("DROP TABLE b"))
            .unwrap();
        let expected = vec![("_agora_outbox".to_owned(), 1), ("a2".to_owned(), 1)];
        assert_eq!(sequence(&db), expected);
        // Within one migration, the DROP's allowance ends with the DROP.
        let message = match db.component_batch(
            "CREATE TABLE c (id INTEGER PRIMARY KEY AUTOINCREMENT);
             DROP TABLE c;
             DELETE FROM sqlite_sequence WHERE name = '_agora_outbox';",
        ) {
            Err(Error::InvalidQuery(m)) => m,
            other => panic!("not refused: {other:?}"),
        };
        assert!(message.contains("sqlite_sequence"), "{message}");
        // Nor through a trigger, fired by a statement that drops nothing.
        db.component_batch(
            "CREATE TRIGGER reset AFTER INSERT ON kv BEGIN
                 DELETE FROM sqlite_sequence;
             END;",
        )
        .unwrap();
        let message = refused(&db, "INSERT INTO kv VALUES ('k', 'v')");
        assert!(message.contains("sqlite_sequence"), "{message}");
        assert_eq!(sequence(&db), expected);
    }

    #[test]
    fn a_table_cannot_be_renamed_into_the_hosts_name_space() {
        let dir = tempfile::TempDir::new().unwrap();
        let db = open(&dir);
        let names = |db: &Sandboxed| -> Vec<String> {
            db.host(|c| {
                let mut s = c.prepare("SELECT name FROM sqlite_schema ORDER BY name")?;
                let rows = s.query_map([], |r| r.get(0))?;
                rows.collect()
            })
            .unwrap()
        };
        let before = names(&db);
        for rename in [
            "ALTER TABLE kv RENAME TO _agora_leases",
            "ALTER TABLE kv RENAME TO \"_AGORA_Leases\"",
        ] {
            // In autocommit mode, twice (the second from the statement cache).
            for _ in 0..2 {
                let refused = db.component_write(|c| {
                    let mut stmt = c.prepare_cached(rename)?;
                    stmt.raw_execute()
                });
                assert!(
                    matches!(&refused, Err(Error::InvalidQuery(m)) if m.contains("host's name space")),
                    "{rename}: {refused:?}"
                );
                assert_eq!(names(&db), before);
                assert!(db.raw().is_autocommit());
            }
            // In a migration, which the caller then rolls back.
            db.host(|c| c.execute_batch("BEGIN")).unwrap();
            let refused = db.component_batch(&format!("CREATE TABLE x (v); {rename};"));
            assert!(
                matches!(&refused, Err(Error::InvalidQuery(m)) if m.contains("host's name space"))
            );
            db.host(|c| c.execute_batch("ROLLBACK")).unwrap();
            assert_eq!(names(&db), before);
        }
        // In a transaction, the statement alone is undone.
        db.host(|c| c.execute_batch("BEGIN IMMEDIATE")).unwrap();
        db.component_write(|c| c.execute_batch("INSERT INTO kv VALUES ('kept', 'v')"))
            .unwrap();
        assert!(db
            .component_write(|c| c.execute_batch("ALTER TABLE kv RENAME TO _agora_x"))
            .is_err());
        db.host(|c| c.execute_batch("COMMIT")).unwrap();
        assert_eq!(names(&db), before);
        let kept: i64 = db
            .component(|c| c.query_row("SELECT count(*) FROM kv", [], |r| r.get(0)))
            .unwrap();
        assert_eq!(kept, 1);
        // Other renames work.
        db.component_write(|c| c.execute_batch("ALTER TABLE kv RENAME TO agora_kv"))
            .unwrap();
    }

    #[test]
    fn a_read_only_connection_refuses_writes() {
        let dir = tempfile::TempDir::new().unwrap();
        let db = open(&dir);
        let path = dir.path().join("c.db");
        let reader = Sandboxed::open(&path, Access::ReadOnly, "").unwrap();
        let result = reader.component(|c| c.execute_batch("INSERT INTO kv VALUES ('k', 'v')"));
        assert!(
            matches!(&result, Err(Error::InvalidQuery(m)) if m.contains("readonly")),
            "{result:?}"
        );
        let keys: i64 = db
            .component(|c| c.query_row("SELECT count(*) FROM kv", [], |r| r.get(0)))
            .unwrap();
        assert_eq!(keys, 0);
    }
}
