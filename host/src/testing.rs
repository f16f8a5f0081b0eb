//! What the contract suites share: the test servers, and a run that says so
//! (or fails, under `AGORA_REQUIRE_SERVICES=1`) when one is missing.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub const POSTGRES_URL: &str = "postgres://agora:agora@127.0.0.1:5432/shop";
pub const POSTGRES_ADDR: &str = "127.0.0.1:5432";
pub const KAFKA_ADDR: &str = "127.0.0.1:9092";

/// Whether `service` answers on `addr`. A skipped run says so on stderr;
/// with `AGORA_REQUIRE_SERVICES=1` (set by `scripts/test`, which starts the
/// servers first) a missing server fails the test instead.
pub async fn answers(service: &str, addr: &str) -> bool {
    let up = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .is_ok_and(|c| c.is_ok());
    if !up {
        assert!(
            std::env::var("AGORA_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "AGORA_REQUIRE_SERVICES=1 but {service} does not answer on {addr}"
        );
        eprintln!("SKIPPED the {service} run: nothing answers on {addr}");
    }
    up
}

/// A name no other test run uses: for PostgreSQL namespaces and topics.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}_{}",
        crate::now_millis() % 1_000_000_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Drops what a host made under a PostgreSQL namespace.
pub async fn drop_namespace(ns: &str) {
    // One at a time: revoking on the database updates one catalog row,
    // which concurrent revokes fail on ("tuple concurrently updated"); and
    // again when a host of another test granted on it meanwhile.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = ONE_AT_A_TIME.lock().await;
    let (client, connection) = tokio_postgres::connect(POSTGRES_URL, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let sql = crate::storage::PostgresBackend::drop_namespace_sql(ns);
    for attempt in 1.. {
        match client.batch_execute(&sql).await {
            Ok(()) => break,
            // "tuple concurrently updated"
            Err(e) if attempt < 5 && e.code().is_some_and(|c| c.code() == "XX000") => {
                tokio::time::sleep(std::time::Duration::from_millis(20 * attempt)).await;
            }
            Err(e) => panic!("dropping namespace {ns}: {e}"),
        }
    }
}
