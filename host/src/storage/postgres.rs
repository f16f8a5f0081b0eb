//! PostgreSQL storage, through tokio-postgres pooled by deadpool-postgres:
//! `[backends.storage] kind = "postgres"`.
//!
//! Isolation is PostgreSQL's own, not string checks. The host creates, per
//! component, a login role and a schema of the same name
//! (`<namespace>_<component>`): the role may use and create in its schema
//! and nothing else. Component SQL runs on connections that log in *as*
//! that role, never on the host's, so there is no role to escape back to:
//! `SET ROLE`, `RESET ROLE` and `SET SESSION AUTHORIZATION` can only reach
//! roles the session user already is. Another component's schema, the
//! host's schema, files (`COPY ... TO`, `pg_read_file`) and superuser-only
//! functions are refused with "permission denied". The database's default
//! `CONNECT` and `TEMP` grants to `PUBLIC`, and `public` schema rights, are
//! revoked. What a role can still see is the catalog (`pg_class` lists
//! every table's name, not its rows), as in any PostgreSQL database.
//!
//! The host's role is a member of every component role (not the other way
//! round), so an operator with the host's credentials can read, repair and
//! back up every component's data.
//!
//! The host's tables (the migration ledger and the outbox) live in the
//! `<namespace>` schema, on which no component role has even `USAGE`, so
//! it cannot name them (naming is enough to queue for a lock: `PREPARE`
//! and `CREATE RULE` lock a table before its privileges are checked). Yet an
//! outbox event and a ledger row must be written in the component's own
//! transaction, on its connection. They go through two `SECURITY DEFINER`
//! functions, alone in the schema `<namespace>$api`, that a component role
//! may call but that act only when given
//! the key the host derived for that very connection (from a secret that
//! never leaves the host's memory, and the connection's backend pid,
//! registered by the host when the connection was made). A component that
//! calls them itself has no key and is refused. The outbox function also
//! locks the component's row in the host's table until the transaction
//! ends, so outbox rows commit in the order of their `seq`: the relay reads
//! `seq > last`, and a row committed later with a lower `seq` would be
//! skipped. Transactions that enqueue events are thereby serialised per
//! component from their first event to their commit; SQLite serialises all
//! writes anyway.
//!
//! Statements: each runs in a transaction that the host opens with
//! `SET LOCAL statement_timeout` set to the component's deadline and the
//! search path set to its schema (`query` in a `READ ONLY` one). Inside
//! `begin()`, each statement runs under a savepoint, so a failed statement
//! undoes only itself and the transaction goes on, as on SQLite. A
//! transaction dropped without commit (by its guest, or by a caller that
//! stopped waiting) is rolled back before its connection returns to the
//! pool, its running statement cancelled first; a connection whose
//! rollback fails is closed instead. Closing on every drop would reconnect
//! once per refused checkout (the catalog drops its transaction when stock
//! is short).
//!
//! Pools: one per component (`max_connections_per_component`), all under
//! one cap on connections in use (`max_connections`), plus a small one for
//! the host's own statements. While PostgreSQL is down every call fails at
//! once with `unavailable` (the shop answers 503); pooled connections that
//! died are replaced on their next use, so the host reconnects by itself.
//!
//! What this does not isolate: components share one server's lock table,
//! memory and CPU. A hostile component can fill the lock table (thousands
//! of advisory or relation locks in one statement) or ask for large
//! `work_mem`, within its statement timeout, and others' statements fail
//! meanwhile. Revoking `pg_advisory*` from `PUBLIC` (as a superuser)
//! narrows that; components that must not affect each other at all need
//! servers of their own. A component's own `COMMIT` or `ROLLBACK` inside
//! `begin()` (or a migration) ends its transaction early: that breaks its
//! own atomicity only (the transaction fails from then on), never another
//! component's. The catalog statistics views show other tables' row
//! counts and sizes, not their rows.
//!
//! Durability: a commit is acknowledged after PostgreSQL made it durable
//! (its `synchronous_commit`, on by default), so it survives a crash of
//! the host and of the database's machine; [`Database::sync`] has nothing
//! to add.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use deadpool_postgres::{Hook, HookError, Object, Pool, PoolBuilder, PoolError};
use futures_util::TryStreamExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use tokio_postgres::{NoTls, SimpleQueryMessage, Statement};

use super::ledger;
use super::message;
use super::{
    Database, Error, Migration, OutboxRow, RowSet, StorageBackend, StorageSettings, Transaction,
    Value, MAX_RESULT_BYTES,
};
use crate::metrics::{metrics, PoolUse};
use crate::pg::{self, ident, literal, pool, redacted};
use crate::plugins::BackendKind;

pub const KIND: BackendKind<dyn StorageSettings> = BackendKind {
    kind: "postgres",
    parse: |table| {
        let config = PostgresConfig::deserialize(table)?;
        config.check().map_err(serde::de::Error::custom)?;
        Ok(Box::new(config))
    },
};

/// `[backends.storage] kind = "postgres"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user[:password]@host[:port]/database`, e.g.
    /// `"${DATABASE_URL:-postgres://agora@127.0.0.1:5432/shop}"`. No
    /// default: the server is the operator's. The user must be able to
    /// create roles (`CREATEROLE`) and own the database.
    pub url: String,
    /// Names the host's schema and prefixes every component's role and
    /// schema (`<namespace>_<component>`). Roles are shared by every
    /// database of a PostgreSQL server, so deployments (or tests) sharing a
    /// server need their own. `agora` by default.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Connections one component may hold. 8: a component's instances wait
    /// for a connection beyond it rather than crowd out the others.
    #[serde(default = "default_per_component")]
    pub max_connections_per_component: usize,
    /// Connections all components together may have in use. 64: well
    /// under PostgreSQL's default `max_connections` of 100, leaving room
    /// for the host's own pool and an operator's psql. Not room for a
    /// second host under load: several hosts on one server need its
    /// `max_connections` raised (compose.yaml sets 300) or smaller pools.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// How long connecting, or waiting for a free connection, may take
    /// before a call fails with `unavailable`. 2 s: a server that is down
    /// refuses at once; one that is overloaded should not hold requests
    /// longer than a client waits.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// How long a version's migrations may run. 5 minutes: a migration may
    /// rewrite a large table, and it runs off the request path.
    #[serde(default = "default_migration_timeout_seconds")]
    pub migration_timeout_seconds: u64,
}

fn default_namespace() -> String {
    "agora".into()
}
fn default_per_component() -> usize {
    8
}
fn default_max_connections() -> usize {
    64
}
fn default_connect_timeout_ms() -> u64 {
    2_000
}
fn default_migration_timeout_seconds() -> u64 {
    300
}

/// Connections of the host's own pool: outbox relays and the ledger.
const HOST_CONNECTIONS: usize = 4;

impl PostgresConfig {
    fn check(&self) -> Result<(), String> {
        pg::check_namespace(&self.namespace)?;
        for (key, value) in [
            (
                "max_connections_per_component",
                self.max_connections_per_component as u64,
            ),
            ("max_connections", self.max_connections as u64),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("migration_timeout_seconds", self.migration_timeout_seconds),
        ] {
            if value == 0 {
                return Err(format!("`{key}` must be above 0"));
            }
        }
        self.url
            .parse::<tokio_postgres::Config>()
            .map_err(|e| format!("`url` is not a PostgreSQL URL: {e}"))?;
        Ok(())
    }
}

#[async_trait]
impl StorageSettings for PostgresConfig {
    fn embedded(&self) -> bool {
        false
    }

    async fn start(&self, _data_dir: &Path) -> anyhow::Result<Arc<dyn StorageBackend>> {
        Ok(Arc::new(PostgresBackend::connect(self).await?))
    }
}

pub struct PostgresBackend {
    config: PostgresConfig,
    server: tokio_postgres::Config,
    host: Pool,
    /// Derives each connection's key; never leaves the process.
    host_secret: [u8; 32],
    /// Makes component role passwords; kept in the host's schema, so every
    /// host of a deployment derives the same ones.
    role_secret: String,
    in_use: Arc<Semaphore>,
    pools: Mutex<HashMap<String, Pool>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update(part);
        hash.update([0]);
    }
    hex(&hash.finalize())
}

fn build(pool: PoolBuilder) -> Result<Pool, Error> {
    pool.build()
        .map_err(|e| Error::Unavailable(format!("cannot make a PostgreSQL pool: {e}")))
}

impl PostgresBackend {
    pub async fn connect(config: &PostgresConfig) -> anyhow::Result<Self> {
        config.check().map_err(anyhow::Error::msg)?;
        let mut server: tokio_postgres::Config = config.url.parse()?;
        let timeout = Duration::from_millis(config.connect_timeout_ms);
        server.connect_timeout(timeout);
        server.application_name("agora");
        let host = build(pool(server.clone(), HOST_CONNECTIONS, timeout))?;
        let mut host_secret = [0u8; 32];
        getrandom::fill(&mut host_secret)
            .map_err(|e| anyhow::anyhow!("no randomness available: {e}"))?;
        let mut backend = PostgresBackend {
            config: config.clone(),
            server,
            host,
            host_secret,
            role_secret: String::new(),
            in_use: Arc::new(Semaphore::new(config.max_connections)),
            pools: Mutex::default(),
        };
        backend.role_secret = backend.create_host_schema().await.map_err(|e| {
            anyhow::anyhow!("preparing PostgreSQL at {}: {e}", redacted(&config.url))
        })?;
        Ok(backend)
    }

    fn ns(&self) -> String {
        ident(&self.config.namespace)
    }

    /// SQL that removes what a host made under `namespace`: its schemas,
    /// the components' schemas (with their data) and roles. For operators
    /// retiring a deployment, and for tests; run it as the host's role.
    pub fn drop_namespace_sql(namespace: &str) -> String {
        let pattern = literal(&format!("{}\\_%", namespace.replace('_', "\\_")));
        format!(
            "DO $d$ DECLARE r TEXT; BEGIN
               EXECUTE format('DROP SCHEMA IF EXISTS %I CASCADE', {ns});
               EXECUTE format('DROP SCHEMA IF EXISTS %I CASCADE', {api});
               FOR r IN SELECT rolname FROM pg_roles WHERE rolname LIKE {pattern} LOOP
                 -- A role cannot be dropped while a host's connections use it.
                 PERFORM pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = r;
                 EXECUTE format('DROP SCHEMA IF EXISTS %I CASCADE', r);
                 EXECUTE format('REVOKE ALL ON DATABASE %I FROM %I', current_database(), r);
                 EXECUTE format('DROP ROLE %I', r);
               END LOOP;
             END $d$;",
            ns = literal(namespace),
            api = literal(&format!("{namespace}$api")),
        )
    }

    /// The schema of the two functions components may call:
    /// `<namespace>$api`, a name no component's schema can take (`$` is not
    /// allowed in component names). Components get no `USAGE` on the
    /// host's schema itself: with it they could name the host's tables,
    /// and `PREPARE` or `CREATE RULE` on a name locks it before the
    /// privilege check refuses, stalling the outbox.
    fn api(&self) -> String {
        ident(&format!("{}$api", self.config.namespace))
    }

    async fn host_conn(&self) -> Result<Object, Error> {
        self.host.get().await.map_err(pool_error)
    }

    /// Creates the host's schema, tables and functions (idempotently, and
    /// safely beside another host doing the same), and returns the secret
    /// role passwords derive from.
    async fn create_host_schema(&self) -> Result<String, Error> {
        let (ns, api) = (self.ns(), self.api());
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret)
            .map_err(|e| Error::Unavailable(format!("no randomness available: {e}")))?;
        let sql = format!(
            "CREATE SCHEMA IF NOT EXISTS {ns};
             REVOKE ALL ON SCHEMA {ns} FROM PUBLIC;
             CREATE SCHEMA IF NOT EXISTS {api};
             REVOKE ALL ON SCHEMA {api} FROM PUBLIC;
             CREATE TABLE IF NOT EXISTS {ns}.secret (
                 id INT PRIMARY KEY CHECK (id = 1), value TEXT NOT NULL);
             INSERT INTO {ns}.secret VALUES (1, {secret}) ON CONFLICT DO NOTHING;
             CREATE TABLE IF NOT EXISTS {ns}.components (
                 name TEXT PRIMARY KEY, role TEXT NOT NULL UNIQUE);
             CREATE TABLE IF NOT EXISTS {ns}.migrating (name TEXT PRIMARY KEY);
             CREATE TABLE IF NOT EXISTS {ns}.connections (
                 pid INT PRIMARY KEY, component TEXT NOT NULL, key TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS {ns}.migrations (
                 component TEXT NOT NULL, name TEXT NOT NULL, checksum TEXT NOT NULL,
                 applied_at BIGINT NOT NULL, PRIMARY KEY (component, name));
             CREATE TABLE IF NOT EXISTS {ns}.outbox (
                 seq BIGSERIAL PRIMARY KEY, component TEXT NOT NULL, event TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS outbox_by_component ON {ns}.outbox (component, seq);
             CREATE TABLE IF NOT EXISTS {ns}.outbox_rejected (
                 seq BIGINT PRIMARY KEY, component TEXT NOT NULL, event TEXT,
                 reason TEXT NOT NULL, rejected_at BIGINT NOT NULL);
             CREATE OR REPLACE FUNCTION {ns}.caller(key TEXT) RETURNS TEXT
                 LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
                 AS $f$ SELECT c.component FROM {ns}.connections c
                        JOIN {ns}.components k ON k.name = c.component
                        WHERE c.pid = pg_catalog.pg_backend_pid() AND c.key = $1
                          AND k.role = session_user $f$;
             REVOKE ALL ON FUNCTION {ns}.caller(TEXT) FROM PUBLIC;
             CREATE OR REPLACE FUNCTION {api}.enqueue(key TEXT, event TEXT) RETURNS VOID
                 LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
                 AS $f$ DECLARE who TEXT := {ns}.caller(key);
                 BEGIN
                     IF who IS NULL THEN
                         RAISE EXCEPTION 'permission denied: only the host writes to the outbox'
                             USING ERRCODE = '42501';
                     END IF;
                     PERFORM 1 FROM {ns}.components WHERE name = who FOR UPDATE;
                     INSERT INTO {ns}.outbox (component, event) VALUES (who, event);
                 END $f$;
             REVOKE ALL ON FUNCTION {api}.enqueue(TEXT, TEXT) FROM PUBLIC;
             CREATE OR REPLACE FUNCTION {api}.record_migration(key TEXT, name TEXT, checksum TEXT)
                 RETURNS VOID
                 LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
                 AS $f$ DECLARE who TEXT := {ns}.caller(key);
                 BEGIN
                     IF who IS NULL THEN
                         RAISE EXCEPTION 'permission denied: only the host records migrations'
                             USING ERRCODE = '42501';
                     END IF;
                     INSERT INTO {ns}.migrations VALUES
                         (who, name, checksum, (extract(epoch FROM now()) * 1000)::BIGINT);
                 END $f$;
             REVOKE ALL ON FUNCTION {api}.record_migration(TEXT, TEXT, TEXT) FROM PUBLIC;
             REVOKE ALL ON SCHEMA public FROM PUBLIC;
             DO $d$ BEGIN
                 EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
             EXCEPTION WHEN insufficient_privilege THEN
                 RAISE WARNING 'agora: cannot revoke PUBLIC''s rights on this database';
             END $d$;",
            secret = literal(&hex(&secret)),
        );
        let conn = self.host_conn().await?;
        // Two hosts starting together race on CREATE ... IF NOT EXISTS.
        pg::run_with_retry(&conn, &sql).await.map_err(pg_error)?;
        let row = conn
            .query_one(&format!("SELECT value FROM {ns}.secret"), &[])
            .await
            .map_err(pg_error)?;
        Ok(row.get(0))
    }

    /// Creates (or updates) the component's role and schema.
    async fn create_component(&self, component: &str, role: &str) -> Result<(), Error> {
        let (ns, api, r) = (self.ns(), self.api(), ident(role));
        let password = sha256_hex(&[self.role_secret.as_bytes(), role.as_bytes()]);
        let sql = format!(
            "DO $d$ BEGIN CREATE ROLE {r} LOGIN;
             EXCEPTION WHEN duplicate_object THEN NULL; END $d$;
             ALTER ROLE {r} LOGIN NOCREATEDB NOCREATEROLE NOINHERIT
                 CONNECTION LIMIT {limit} PASSWORD {password};
             DO $d$ BEGIN
                 IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {role}
                            AND (rolsuper OR rolreplication OR rolbypassrls)) THEN
                     RAISE EXCEPTION 'role % exists with superuser, replication or bypassrls: \
                                      refusing to run a component as it', {role};
                 END IF;
             END $d$;
             ALTER ROLE {r} RESET ALL;
             ALTER ROLE {r} SET search_path = {r};
             GRANT {r} TO CURRENT_USER;
             CREATE SCHEMA IF NOT EXISTS {r};
             REVOKE ALL ON SCHEMA {r} FROM PUBLIC;
             GRANT USAGE, CREATE ON SCHEMA {r} TO {r};
             REVOKE ALL ON SCHEMA {ns} FROM {r};
             GRANT USAGE ON SCHEMA {api} TO {r};
             GRANT EXECUTE ON FUNCTION {api}.enqueue(TEXT, TEXT) TO {r};
             GRANT EXECUTE ON FUNCTION {api}.record_migration(TEXT, TEXT, TEXT) TO {r};
             DO $d$ BEGIN
                 EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), {role});
             END $d$;
             INSERT INTO {ns}.components VALUES ({name}, {role}) ON CONFLICT DO NOTHING;
             INSERT INTO {ns}.migrating VALUES ({name}) ON CONFLICT DO NOTHING;",
            // Twice the pool: a connection being closed still counts until
            // its backend exits, while the pool already opens the next.
            limit = 2 * self.config.max_connections_per_component,
            password = literal(&password),
            role = literal(role),
            name = literal(component),
        );
        pg::run_with_retry(&*self.host_conn().await?, &sql)
            .await
            .map_err(pg_error)
    }

    fn component_pool(&self, component: &str, role: &str) -> Result<Pool, Error> {
        if let Some(pool) = self.pools.lock().unwrap().get(component) {
            return Ok(pool.clone());
        }
        let mut server = self.server.clone();
        server
            .user(role)
            .password(sha256_hex(&[self.role_secret.as_bytes(), role.as_bytes()]))
            .application_name(format!("agora:{component}"));
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        let (host, ns, secret, name) = (
            self.host.clone(),
            self.ns(),
            self.host_secret,
            component.to_owned(),
        );
        let pool = pool(server, self.config.max_connections_per_component, timeout).post_create(
            Hook::async_fn(move |client, _| {
                let (host, ns, name) = (host.clone(), ns.clone(), name.clone());
                Box::pin(async move {
                    // Register the connection's key, so the outbox and ledger
                    // functions act for this connection, and only it.
                    let pid: i32 = client
                        // Qualified: the role's own defaults may put a
                        // function of that name before pg_catalog.
                        .query_one("SELECT pg_catalog.pg_backend_pid()", &[])
                        .await
                        .map_err(HookError::Backend)?
                        .get(0);
                    let host = host
                        .get()
                        .await
                        .map_err(|e| HookError::Message(e.to_string().into()))?;
                    host.execute(
                        &format!(
                            "INSERT INTO {ns}.connections VALUES ($1, $2, $3)
                             ON CONFLICT (pid) DO UPDATE
                             SET component = excluded.component, key = excluded.key"
                        ),
                        &[&pid, &name, &connection_key(&secret, pid)],
                    )
                    .await
                    .map_err(HookError::Backend)?;
                    Ok(())
                })
            }),
        );
        let pool = build(pool)?;
        Ok(self
            .pools
            .lock()
            .unwrap()
            .entry(component.to_owned())
            .or_insert(pool)
            .clone())
    }
}

fn connection_key(secret: &[u8; 32], pid: i32) -> String {
    sha256_hex(&[secret, &pid.to_be_bytes()])
}

#[async_trait]
impl StorageBackend for PostgresBackend {
    async fn open(
        &self,
        component: &str,
        statement_timeout: Duration,
    ) -> Result<Arc<dyn Database>, Error> {
        let role = format!("{}_{component}", self.config.namespace);
        if role.len() > 63 {
            return Err(Error::InvalidQuery(format!(
                "`{role}` is longer than PostgreSQL's 63-byte names: shorten the component's name or the namespace"
            )));
        }
        self.create_component(component, &role).await?;
        Ok(Arc::new(PostgresDatabase {
            component: component.to_owned(),
            schema: ident(&role),
            ns: self.ns(),
            api: self.api(),
            pool: self.component_pool(component, &role)?,
            host: self.host.clone(),
            host_secret: self.host_secret,
            in_use: self.in_use.clone(),
            statement_timeout,
            migration_timeout: Duration::from_secs(self.config.migration_timeout_seconds),
            wait: Duration::from_millis(self.config.connect_timeout_ms),
        }))
    }

    async fn ping(&self) -> Result<(), Error> {
        let conn = self.host_conn().await?;
        conn.simple_query("SELECT 1").await.map_err(pg_error)?;
        Ok(())
    }

    fn pools(&self) -> Vec<PoolUse> {
        let components = self.pools.lock().unwrap();
        std::iter::once(pg::pool_use("storage", "host", &self.host))
            .chain(
                components
                    .iter()
                    .map(|(component, pool)| pg::pool_use("storage", component, pool)),
            )
            .collect()
    }
}

struct PostgresDatabase {
    component: String,
    /// The component's schema, quoted.
    schema: String,
    /// The host's schema, quoted.
    ns: String,
    /// The schema of the functions components call, quoted.
    api: String,
    pool: Pool,
    host: Pool,
    host_secret: [u8; 32],
    in_use: Arc<Semaphore>,
    statement_timeout: Duration,
    migration_timeout: Duration,
    wait: Duration,
}

/// A component connection in use. If it is dropped inside a transaction (a
/// guest dropped it, or its caller stopped waiting), a statement still
/// running is cancelled and the transaction rolled back before the
/// connection returns to the pool; if the rollback fails the connection is
/// closed. It never returns to the pool with a transaction open.
struct Conn {
    object: Option<Object>,
    in_transaction: bool,
    /// A statement was sent and its answer not yet read.
    busy: bool,
    _permit: OwnedSemaphorePermit,
}

impl Conn {
    fn client(&self) -> &deadpool_postgres::ClientWrapper {
        self.object.as_ref().expect("a connection until dropped")
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if !self.in_transaction {
            return;
        }
        let Some(object) = self.object.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to roll back on: closing the connection does it.
            drop(Object::take(object));
            return;
        };
        let busy = self.busy;
        runtime.spawn(async move {
            // A statement its caller stopped waiting for is cancelled first,
            // so the rollback does not wait for it.
            if busy {
                let _ = object.cancel_token().cancel_query(NoTls).await;
            }
            if let Err(e) = object.batch_execute("ROLLBACK").await {
                tracing::warn!(error = %e, "closed a PostgreSQL connection whose rollback failed");
                drop(Object::take(object));
            }
        });
    }
}

impl PostgresDatabase {
    async fn conn(&self) -> Result<Conn, Error> {
        let permit = tokio::time::timeout(self.wait, self.in_use.clone().acquire_owned())
            .await
            .map_err(|_| {
                Error::Unavailable(format!(
                    "every PostgreSQL connection is in use (waited {} ms)",
                    self.wait.as_millis()
                ))
            })?
            .expect("the semaphore is never closed");
        let object = self.pool.get().await.map_err(pool_error)?;
        Ok(Conn {
            object: Some(object),
            in_transaction: false,
            busy: false,
            _permit: permit,
        })
    }

    /// `BEGIN` with the component's timeout and search path; returns the
    /// connection's key for the host functions.
    async fn begin_on(
        &self,
        conn: &mut Conn,
        mode: &str,
        timeout: Duration,
    ) -> Result<String, Error> {
        conn.in_transaction = true;
        conn.busy = true;
        let messages = conn
            .client()
            .simple_query(&format!(
                "BEGIN {mode}; SET LOCAL statement_timeout = {}; \
                 SET LOCAL search_path = {}; SELECT pg_catalog.pg_backend_pid()",
                timeout.as_millis().max(1),
                self.schema
            ))
            .await
            .map_err(pg_error)?;
        let pid = messages
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(row) => row.get(0).and_then(|p| p.parse::<i32>().ok()),
                _ => None,
            })
            .ok_or_else(|| Error::Unavailable("PostgreSQL did not say its backend pid".into()))?;
        conn.busy = false;
        Ok(connection_key(&self.host_secret, pid))
    }

    async fn end(conn: &mut Conn, commit: bool) -> Result<(), Error> {
        let sql = if commit { "COMMIT" } else { "ROLLBACK" };
        conn.busy = true;
        conn.client().batch_execute(sql).await.map_err(pg_error)?;
        conn.busy = false;
        conn.in_transaction = false;
        Ok(())
    }

    /// One statement in a transaction of its own.
    async fn single<R>(
        &self,
        mode: &str,
        sql: &str,
        run: impl AsyncFnOnce(&Conn, &Statement) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let mut conn = self.conn().await?;
        self.begin_on(&mut conn, mode, self.statement_timeout)
            .await?;
        conn.busy = true;
        let result = match conn.client().prepare_cached(sql).await {
            Ok(stmt) => run(&conn, &stmt).await,
            Err(e) => Err(pg_error(e)),
        };
        Self::end(&mut conn, result.is_ok()).await?;
        result
    }

    async fn with_host<R>(
        &self,
        run: impl AsyncFnOnce(&tokio_postgres::Client) -> Result<R, tokio_postgres::Error>,
    ) -> Result<R, Error> {
        let conn = self.host.get().await.map_err(pool_error)?;
        run(&conn).await.map_err(pg_error)
    }

    async fn run_migrations(
        &self,
        migrations: &[Migration],
        commit: bool,
    ) -> Result<Vec<String>, Error> {
        // The host's lock on the component's ledger, held until the end: two
        // hosts deploying at once migrate one after the other.
        let mut host = self.host.get().await.map_err(pool_error)?;
        let lock = host.transaction().await.map_err(pg_error)?;
        lock.execute(
            &format!(
                "SELECT 1 FROM {}.migrating WHERE name = $1 FOR UPDATE",
                self.ns
            ),
            &[&self.component],
        )
        .await
        .map_err(pg_error)?;
        let recorded: HashMap<String, String> = lock
            .query(
                &format!(
                    "SELECT name, checksum FROM {}.migrations WHERE component = $1",
                    self.ns
                ),
                &[&self.component],
            )
            .await
            .map_err(pg_error)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let pending = ledger::plan(&recorded, migrations)?;
        if pending.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let key = self.begin_on(&mut conn, "", self.migration_timeout).await?;
        conn.busy = true;
        let mut result = Ok(());
        for p in &pending {
            if let Err(e) = conn.client().batch_execute(&p.migration.sql).await {
                result = Err(ledger::failed(&p.migration, message(&pg_error(e))));
                break;
            }
            if let Err(e) = conn
                .client()
                .execute(
                    &format!("SELECT {}.record_migration($1, $2, $3)", self.api),
                    &[&key, &p.migration.name, &p.checksum],
                )
                .await
            {
                result = Err(pg_error(e));
                break;
            }
        }
        Self::end(&mut conn, commit && result.is_ok()).await?;
        result?;
        lock.commit().await.map_err(pg_error)?;
        Ok(pending.into_iter().map(|p| p.migration.name).collect())
    }
}

#[async_trait]
impl Database for PostgresDatabase {
    fn shared(&self) -> bool {
        true
    }

    async fn query(&self, sql: &str, params: Vec<Value>) -> Result<RowSet, Error> {
        self.single("READ ONLY", sql, async |conn, stmt| {
            run_query(conn.client(), stmt, &params).await
        })
        .await
    }

    async fn execute(&self, sql: &str, params: Vec<Value>) -> Result<u64, Error> {
        self.single("", sql, async |conn, stmt| {
            run_execute(conn.client(), stmt, &params).await
        })
        .await
    }

    async fn begin(&self) -> Result<Box<dyn Transaction>, Error> {
        let mut conn = self.conn().await?;
        let key = self.begin_on(&mut conn, "", self.statement_timeout).await?;
        Ok(Box::new(PostgresTransaction {
            conn,
            key,
            api: self.api.clone(),
            aborted: None,
        }))
    }

    async fn migrate(&self, migrations: &[Migration]) -> Result<Vec<String>, Error> {
        self.run_migrations(migrations, true).await
    }

    async fn rehearse_migrations(&self, migrations: &[Migration]) -> Result<(), Error> {
        self.run_migrations(migrations, false).await.map(|_| ())
    }

    async fn outbox_pending(&self, after: i64, limit: usize) -> Result<Vec<OutboxRow>, Error> {
        let sql = format!(
            "SELECT seq, event FROM {}.outbox WHERE component = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            self.ns
        );
        let rows = self
            .with_host(async |c| {
                c.query(&sql, &[&self.component, &after, &(limit as i64)])
                    .await
            })
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let seq: i64 = r.get(0);
                OutboxRow {
                    seq,
                    record: Ok(r.get::<_, &str>(1).as_bytes().to_vec()),
                }
            })
            .collect())
    }

    async fn outbox_depth(&self) -> Result<u64, Error> {
        let sql = format!(
            "SELECT count(*) FROM {}.outbox WHERE component = $1",
            self.ns
        );
        let row = self
            .with_host(async |c| c.query_one(&sql, &[&self.component]).await)
            .await?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    async fn outbox_settle(
        &self,
        relayed: &[i64],
        rejected: &[(i64, String)],
    ) -> Result<(), Error> {
        let ns = &self.ns;
        let mut host = self.host.get().await.map_err(pool_error)?;
        let tx = host.transaction().await.map_err(pg_error)?;
        let now = crate::now_millis() as i64;
        for (seq, reason) in rejected {
            tx.execute(
                &format!(
                    "INSERT INTO {ns}.outbox_rejected
                     SELECT seq, component, event, $2, $3 FROM {ns}.outbox WHERE seq = $1
                     ON CONFLICT DO NOTHING"
                ),
                &[seq, reason, &now],
            )
            .await
            .map_err(pg_error)?;
        }
        let done: Vec<i64> = relayed
            .iter()
            .copied()
            .chain(rejected.iter().map(|(seq, _)| *seq))
            .collect();
        tx.execute(
            &format!("DELETE FROM {ns}.outbox WHERE component = $1 AND seq = ANY($2)"),
            &[&self.component, &done],
        )
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)
    }

    async fn sync(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// Owns a component connection from `BEGIN` until commit or drop.
struct PostgresTransaction {
    conn: Conn,
    key: String,
    /// The schema of the host's functions, quoted.
    api: String,
    /// The error after which PostgreSQL aborted the transaction: every
    /// later call fails, and `commit()` too.
    aborted: Option<String>,
}

impl PostgresTransaction {
    fn check(&self) -> Result<(), Error> {
        match &self.aborted {
            Some(cause) => Err(Error::InvalidQuery(format!(
                "the transaction was rolled back after an earlier error: {cause}"
            ))),
            None if !self.conn.in_transaction => {
                Err(Error::InvalidQuery("the transaction has ended".into()))
            }
            None => Ok(()),
        }
    }

    /// Runs one component statement under a savepoint: a failure undoes
    /// that statement only, as on SQLite, and the transaction goes on.
    async fn statement<R>(
        &mut self,
        sql: &str,
        run: impl AsyncFnOnce(&deadpool_postgres::ClientWrapper, &Statement) -> Result<R, Error>,
    ) -> Result<R, Error> {
        self.check()?;
        self.conn.busy = true;
        let client = self.conn.client();
        let (saved, stmt) = tokio::join!(
            client.batch_execute("SAVEPOINT agora_statement"),
            client.prepare_cached(sql)
        );
        if let Err(e) = saved {
            return Err(self.abort(pg_error(e)));
        }
        let result = match stmt {
            Ok(stmt) => run(client, &stmt).await,
            Err(e) => Err(pg_error(e)),
        };
        let end = if result.is_ok() {
            "RELEASE SAVEPOINT agora_statement"
        } else {
            "ROLLBACK TO SAVEPOINT agora_statement"
        };
        if let Err(e) = client.batch_execute(end).await {
            let e = pg_error(e);
            return Err(self.abort(e));
        }
        self.conn.busy = false;
        result
    }

    fn abort(&mut self, e: Error) -> Error {
        self.aborted = Some(message(&e).to_owned());
        e
    }
}

#[async_trait]
impl Transaction for PostgresTransaction {
    async fn query(&mut self, sql: &str, params: Vec<Value>) -> Result<RowSet, Error> {
        self.statement(sql, async |c, stmt| run_query(c, stmt, &params).await)
            .await
    }

    async fn execute(&mut self, sql: &str, params: Vec<Value>) -> Result<u64, Error> {
        self.statement(sql, async |c, stmt| run_execute(c, stmt, &params).await)
            .await
    }

    async fn enqueue(&mut self, record: &str) -> Result<(), Error> {
        self.check()?;
        let sql = format!("SELECT {}.enqueue($1, $2)", self.api);
        self.conn.busy = true;
        let result = self
            .conn
            .client()
            .execute(&sql, &[&self.key, &record])
            .await
            .map_err(pg_error);
        self.conn.busy = false;
        result.map(|_| ()).map_err(|e| self.abort(e))
    }

    async fn commit(mut self: Box<Self>) -> Result<(), Error> {
        self.check()?;
        PostgresDatabase::end(&mut self.conn, true).await
    }
}

/// A parameter as PostgreSQL inferred its type: each value converts to the
/// types that hold it without loss, and to nothing else.
#[derive(Debug)]
struct Param<'a>(&'a Value);

impl ToSql for Param<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let mismatch = |what: &str| -> Box<dyn std::error::Error + Sync + Send> {
            format!("{what} cannot be stored in a column of type {ty}").into()
        };
        match self.0 {
            Value::Null => Ok(IsNull::Yes),
            Value::Boolean(b) if *ty == Type::BOOL => b.to_sql(ty, out),
            Value::Boolean(_) => Err(mismatch("a boolean")),
            Value::Integer(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)
                    .map_err(|_| mismatch(&format!("{i} (beyond 32 bits)")))?
                    .to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)
                    .map_err(|_| mismatch(&format!("{i} (beyond 16 bits)")))?
                    .to_sql(ty, out),
                Type::FLOAT8 => (*i as f64).to_sql(ty, out),
                _ => Err(mismatch("an integer")),
            },
            Value::Real(f) => match *ty {
                Type::FLOAT8 => f.to_sql(ty, out),
                Type::FLOAT4 => (*f as f32).to_sql(ty, out),
                _ => Err(mismatch("a real")),
            },
            Value::Text(s) => match *ty {
                Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                    s.as_str().to_sql(&Type::TEXT, out)
                }
                _ => Err(mismatch("a text")),
            },
            Value::Blob(b) if *ty == Type::BYTEA => b.as_slice().to_sql(ty, out),
            Value::Blob(_) => Err(mismatch("a blob")),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// A cell of a supported type.
struct Cell(Value);

impl<'a> FromSql<'a> for Cell {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Cell(match *ty {
            Type::BOOL => Value::Boolean(bool::from_sql(ty, raw)?),
            Type::INT2 => Value::Integer(i16::from_sql(ty, raw)?.into()),
            Type::INT4 => Value::Integer(i32::from_sql(ty, raw)?.into()),
            Type::INT8 => Value::Integer(i64::from_sql(ty, raw)?),
            Type::OID => Value::Integer(u32::from_sql(ty, raw)?.into()),
            Type::FLOAT4 => Value::Real(f32::from_sql(ty, raw)?.into()),
            Type::FLOAT8 => Value::Real(f64::from_sql(ty, raw)?),
            Type::BYTEA => Value::Blob(raw.to_vec()),
            _ => Value::Text(<&str>::from_sql(&Type::TEXT, raw)?.to_owned()),
        }))
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Cell(Value::Null))
    }

    fn accepts(ty: &Type) -> bool {
        supported(ty)
    }
}

fn supported(ty: &Type) -> bool {
    matches!(
        *ty,
        Type::BOOL
            | Type::INT2
            | Type::INT4
            | Type::INT8
            | Type::OID
            | Type::FLOAT4
            | Type::FLOAT8
            | Type::BYTEA
            | Type::TEXT
            | Type::VARCHAR
            | Type::BPCHAR
            | Type::NAME
            | Type::UNKNOWN
    )
}

fn params(values: &[Value]) -> Vec<Param<'_>> {
    values.iter().map(Param).collect()
}

async fn run_query(
    client: &tokio_postgres::Client,
    stmt: &Statement,
    values: &[Value],
) -> Result<RowSet, Error> {
    let columns: Vec<String> = stmt.columns().iter().map(|c| c.name().to_owned()).collect();
    if let Some(c) = stmt.columns().iter().find(|c| !supported(c.type_())) {
        return Err(Error::InvalidQuery(format!(
            "column `{}` has type {}, which storage does not carry: cast it in the query \
             (::bigint, ::double precision or ::text)",
            c.name(),
            c.type_()
        )));
    }
    let params = params(values);
    let rows = client
        .query_raw(stmt, params.iter())
        .await
        .map_err(pg_error)?;
    let mut rows = std::pin::pin!(rows);
    let (mut out, mut bytes) = (Vec::new(), 0);
    while let Some(row) = rows.try_next().await.map_err(pg_error)? {
        let mut values = Vec::with_capacity(columns.len());
        for i in 0..columns.len() {
            let Cell(value) = row.try_get(i).map_err(pg_error)?;
            bytes += match &value {
                Value::Text(t) => t.len(),
                Value::Blob(b) => b.len(),
                _ => 8,
            };
            if bytes > MAX_RESULT_BYTES {
                return Err(Error::InvalidQuery(format!(
                    "the result exceeds {} MiB: read it in pages (LIMIT, or a WHERE on the last key)",
                    MAX_RESULT_BYTES >> 20
                )));
            }
            values.push(value);
        }
        out.push(values);
    }
    Ok(RowSet { columns, rows: out })
}

async fn run_execute(
    client: &tokio_postgres::Client,
    stmt: &Statement,
    values: &[Value],
) -> Result<u64, Error> {
    let params = params(values);
    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as _).collect();
    client.execute(stmt, &refs).await.map_err(pg_error)
}

fn pool_error(e: PoolError) -> Error {
    match e {
        PoolError::Backend(e) => pg_error(e),
        PoolError::Timeout(_) => unavailable("PostgreSQL did not answer in time".into()),
        e => unavailable(format!("PostgreSQL is unreachable: {e}")),
    }
}

/// The server failed, not the statement: counted for the operator.
fn unavailable(text: String) -> Error {
    metrics().backend_error("storage", KIND.kind);
    Error::Unavailable(text)
}

/// A PostgreSQL error as a component sees it: constraint violations and
/// refusals by their message, an unreachable or restarting server as
/// `unavailable`.
fn pg_error(e: tokio_postgres::Error) -> Error {
    let Some(db) = e.as_db_error() else {
        if e.is_closed() {
            return unavailable("the connection to PostgreSQL was lost".into());
        }
        let cause = std::error::Error::source(&e)
            .map(|s| format!(": {s}"))
            .unwrap_or_default();
        return match e.to_string() {
            m if m.contains("parameter") || m.contains("column") => {
                Error::InvalidQuery(format!("{m}{cause}"))
            }
            m => unavailable(format!("PostgreSQL: {m}{cause}")),
        };
    };
    let code = db.code().code();
    let text = match db.detail() {
        Some(detail) => format!("{} ({detail})", db.message()),
        None => db.message().to_owned(),
    };
    match &code[..2] {
        "23" => Error::ConstraintViolation(text),
        // Connection, resources, shutdown, and a statement cancelled by
        // its timeout: retrying later may work.
        "08" | "53" | "57" | "58" => unavailable(text),
        "40" => Error::Unavailable(format!("{text}: retry the transaction")),
        _ => Error::InvalidQuery(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        let parse = |text: &str| (KIND.parse)(text.parse::<toml::Table>().unwrap()).map(|_| ());
        assert!(parse("url = \"postgres://agora@127.0.0.1/shop\"").is_ok());
        for (text, expected) in [
            (
                "url = \"postgres://a@h/d\"\nnamespace = \"Bad-Name\"",
                "`namespace` must be",
            ),
            (
                "url = \"postgres://a@h/d\"\nmax_connections = 0",
                "`max_connections` must be above 0",
            ),
            ("url = \"mysql://x\"", "`url` is not a PostgreSQL URL"),
            ("urll = \"postgres://a@h/d\"", "unknown field `urll`"),
        ] {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }
}
