//! What the PostgreSQL backends (storage, coordination) share: pools,
//! quoting, DDL that tolerates a second host doing the same, and URLs
//! safe to print.

use std::time::Duration;

use crate::metrics::PoolUse;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolBuilder, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

/// A pool of up to `size` connections to `server`, where connecting,
/// waiting for a connection and checking one each take at most `timeout`.
pub fn pool(server: tokio_postgres::Config, size: usize, timeout: Duration) -> PoolBuilder {
    let manager = Manager::from_config(
        server,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(timeout))
        .wait_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
}

/// How `pool` (named `name`) of a capability's PostgreSQL backend is used now.
pub fn pool_use(capability: &'static str, name: &str, pool: &Pool) -> PoolUse {
    let status = pool.status();
    PoolUse {
        capability,
        backend: "postgres",
        pool: name.to_owned(),
        connections: status.size,
        in_use: status.size.saturating_sub(status.available),
        waiting: status.waiting,
    }
}

/// `name` as a quoted SQL identifier.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `text` as a SQL string literal.
pub fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The URL without its password, for messages.
pub fn redacted(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(c) => format!(
            "{}@{:?}/{}",
            c.get_user().unwrap_or("?"),
            c.get_hosts(),
            c.get_dbname().unwrap_or("?")
        ),
        Err(_) => "the configured URL".into(),
    }
}

/// Checks a namespace: it names schemas and prefixes roles.
pub fn check_namespace(ns: &str) -> Result<(), String> {
    if ns.is_empty()
        || ns.len() > 20
        || !ns.starts_with(|c: char| c.is_ascii_lowercase())
        || !ns
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(format!(
            "`namespace` must be 1 to 20 of a-z, 0-9 and '_', starting with a letter; got `{ns}`"
        ));
    }
    Ok(())
}

/// Runs `sql` in a transaction, again if a concurrent host made one of the
/// same objects first.
pub async fn run_with_retry(
    conn: &tokio_postgres::Client,
    sql: &str,
) -> Result<(), tokio_postgres::Error> {
    let mut attempt = 0;
    loop {
        // A lock someone holds on an object named here fails the attempt
        // rather than hanging the host.
        let result = conn
            .batch_execute(&format!(
                "BEGIN; SET LOCAL lock_timeout = '5s'; {sql}; COMMIT"
            ))
            .await;
        match result {
            Ok(()) => return Ok(()),
            Err(e) => {
                let _ = conn.batch_execute("ROLLBACK").await;
                let racing = e.code().is_some_and(|c| {
                    [
                        SqlState::UNIQUE_VIOLATION,
                        SqlState::DUPLICATE_OBJECT,
                        SqlState::DUPLICATE_SCHEMA,
                        SqlState::DUPLICATE_TABLE,
                        SqlState::T_R_SERIALIZATION_FAILURE,
                    ]
                    .contains(c)
                        || c.code() == "XX000" // "tuple concurrently updated"
                });
                attempt += 1;
                if !racing || attempt == 5 {
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
            }
        }
    }
}
