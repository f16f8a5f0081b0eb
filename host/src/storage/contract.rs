//! The contract of [`StorageBackend`] and [`Database`], run against every
//! backend: SQLite always, PostgreSQL whenever 127.0.0.1:5432 answers (each
//! test under a namespace of its own, dropped afterwards; see
//! [`crate::testing::answers`]).

use std::sync::Arc;
use std::time::Duration;

use crate::testing;

use super::{
    Database, Error, Migration, PostgresBackend, PostgresConfig, SqliteBackend, SqliteSettings,
    StorageBackend, Value,
};

/// A backend under test, and what to remove when the test is done.
struct Subject {
    name: &'static str,
    backend: Arc<dyn StorageBackend>,
    _dir: Option<tempfile::TempDir>,
    namespace: Option<String>,
}

impl Subject {
    async fn open(&self) -> Arc<dyn Database> {
        self.backend
            .open("c", Duration::from_secs(10))
            .await
            .unwrap()
    }

    /// Drops the namespace's schemas and roles.
    async fn clean_up(self) {
        if let Some(ns) = self.namespace {
            testing::drop_namespace(&ns).await;
        }
    }
}

async fn subjects() -> Vec<Subject> {
    let dir = tempfile::tempdir().unwrap();
    let mut all = vec![Subject {
        name: "sqlite",
        backend: Arc::new(SqliteBackend::new(dir.path(), SqliteSettings::default()).unwrap()),
        _dir: Some(dir),
        namespace: None,
    }];
    if testing::answers("PostgreSQL", testing::POSTGRES_ADDR).await {
        let ns = testing::unique("k");
        let config = PostgresConfig {
            url: testing::POSTGRES_URL.into(),
            namespace: ns.clone(),
            max_connections_per_component: 4,
            max_connections: 8,
            connect_timeout_ms: 2000,
            migration_timeout_seconds: 60,
        };
        all.push(Subject {
            name: "postgres",
            backend: Arc::new(PostgresBackend::connect(&config).await.unwrap()),
            _dir: None,
            namespace: Some(ns),
        });
    }
    all
}

/// Values compare by their debug form: the WIT bindings derive no equality.
fn debug(value: impl std::fmt::Debug) -> String {
    format!("{value:?}")
}

fn migration(name: &str, sql: &str) -> Migration {
    Migration {
        name: name.into(),
        sql: sql.into(),
    }
}

const TABLE: &str = "CREATE TABLE t (
    id BIGINT PRIMARY KEY,
    flag BOOLEAN,
    ratio DOUBLE PRECISION,
    label TEXT,
    data BYTEA
)";

async fn with_table(subject: &Subject) -> Arc<dyn Database> {
    let db = subject.open().await;
    db.migrate(&[migration("0001_t", TABLE)]).await.unwrap();
    db
}

fn ids(rows: &[Vec<Value>]) -> Vec<i64> {
    rows.iter()
        .map(|r| match r[0] {
            Value::Integer(i) => i,
            ref other => panic!("not an id: {other:?}"),
        })
        .collect()
}

async fn all_ids(db: &dyn Database) -> Vec<i64> {
    ids(&db
        .query("SELECT id FROM t ORDER BY id", vec![])
        .await
        .unwrap()
        .rows)
}

#[tokio::test]
async fn values_of_every_type_round_trip() {
    for subject in subjects().await {
        let db = with_table(&subject).await;
        let every_byte: Vec<u8> = (0..=255).collect();
        let changed = db
            .execute(
                "INSERT INTO t (id, flag, ratio, label, data) VALUES ($1, $2, $3, $4, $5)",
                vec![
                    Value::Integer(i64::MAX),
                    Value::Boolean(true),
                    Value::Real(-1.5),
                    Value::Text("naïve ✓ 'quoted'".into()),
                    Value::Blob(every_byte.clone()),
                ],
            )
            .await
            .unwrap();
        assert_eq!(changed, 1, "{}", subject.name);
        db.execute(
            "INSERT INTO t (id, flag, ratio, label, data) VALUES ($1, $2, $3, $4, $5)",
            vec![
                Value::Integer(i64::MIN),
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
            ],
        )
        .await
        .unwrap();
        let rows = db
            .query(
                "SELECT id, flag, ratio, label, data FROM t ORDER BY id DESC",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(
            rows.columns,
            ["id", "flag", "ratio", "label", "data"],
            "{}",
            subject.name
        );
        let first = &rows.rows[0];
        assert_eq!(
            debug(&first[0]),
            debug(Value::Integer(i64::MAX)),
            "{}",
            subject.name
        );
        // SQLite keeps booleans as integers.
        assert!(
            matches!(first[1], Value::Boolean(true) | Value::Integer(1)),
            "{}: {:?}",
            subject.name,
            first[1]
        );
        assert_eq!(
            debug(&first[2]),
            debug(Value::Real(-1.5)),
            "{}",
            subject.name
        );
        assert_eq!(
            debug(&first[3]),
            debug(Value::Text("naïve ✓ 'quoted'".into())),
            "{}",
            subject.name
        );
        assert_eq!(
            debug(&first[4]),
            debug(Value::Blob(every_byte)),
            "{}",
            subject.name
        );
        assert_eq!(
            debug(&rows.rows[1]),
            debug([
                Value::Integer(i64::MIN),
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null
            ]),
            "{}",
            subject.name
        );
        subject.clean_up().await;
    }
}

#[tokio::test]
async fn errors_say_what_kind_they_are() {
    for subject in subjects().await {
        let db = with_table(&subject).await;
        let insert = "INSERT INTO t (id) VALUES ($1)";
        db.execute(insert, vec![Value::Integer(1)]).await.unwrap();
        let duplicate = db.execute(insert, vec![Value::Integer(1)]).await;
        assert!(
            matches!(duplicate, Err(Error::ConstraintViolation(_))),
            "{}: {duplicate:?}",
            subject.name
        );
        let wrong = db.execute("INSERT INTO nowhere VALUES (1)", vec![]).await;
        assert!(
            matches!(wrong, Err(Error::InvalidQuery(_))),
            "{}: {wrong:?}",
            subject.name
        );
        let write = db.query("INSERT INTO t (id) VALUES (2)", vec![]).await;
        assert!(
            matches!(write, Err(Error::InvalidQuery(_))),
            "{}: query wrote: {write:?}",
            subject.name
        );
        assert_eq!(all_ids(&*db).await, [1], "{}", subject.name);
        subject.clean_up().await;
    }
}

#[tokio::test]
async fn a_transaction_commits_whole_or_not_at_all() {
    for subject in subjects().await {
        let db = with_table(&subject).await;
        let insert = "INSERT INTO t (id) VALUES ($1)";
        let mut tx = db.begin().await.unwrap();
        tx.execute(insert, vec![Value::Integer(1)]).await.unwrap();
        // A failed statement undoes itself only; the transaction goes on.
        let failed = tx.execute(insert, vec![Value::Integer(1)]).await;
        assert!(
            matches!(failed, Err(Error::ConstraintViolation(_))),
            "{}",
            subject.name
        );
        tx.execute(insert, vec![Value::Integer(2)]).await.unwrap();
        let inside = tx
            .query("SELECT id FROM t ORDER BY id", vec![])
            .await
            .unwrap();
        assert_eq!(ids(&inside.rows), [1, 2], "{}", subject.name);
        tx.commit().await.unwrap();
        assert_eq!(all_ids(&*db).await, [1, 2], "{}", subject.name);

        // Dropped without commit: rolled back, and the connection serves on.
        let mut tx = db.begin().await.unwrap();
        tx.execute(insert, vec![Value::Integer(3)]).await.unwrap();
        drop(tx);
        db.execute(insert, vec![Value::Integer(4)]).await.unwrap();
        assert_eq!(all_ids(&*db).await, [1, 2, 4], "{}", subject.name);
        subject.clean_up().await;
    }
}

#[tokio::test]
async fn migrations_apply_once_together_or_not_at_all() {
    for subject in subjects().await {
        let db = subject.open().await;
        let first = migration("0001_t", TABLE);
        let broken = migration("0002_broken", "CREATE TABLE u (x BIGINT); CREATE TABLE (");
        let refused = db.migrate(&[first.clone(), broken]).await;
        assert!(
            matches!(&refused, Err(Error::InvalidQuery(m)) if m.contains("0002_broken")),
            "{}: {refused:?}",
            subject.name
        );
        // Nothing of either applied: `t` does not exist.
        assert!(
            db.query("SELECT id FROM t", vec![]).await.is_err(),
            "{}",
            subject.name
        );

        // A rehearsal commits nothing either.
        db.rehearse_migrations(std::slice::from_ref(&first))
            .await
            .unwrap();
        assert!(
            db.query("SELECT id FROM t", vec![]).await.is_err(),
            "{}",
            subject.name
        );

        assert_eq!(
            db.migrate(std::slice::from_ref(&first)).await.unwrap(),
            ["0001_t"]
        );
        assert!(db
            .migrate(std::slice::from_ref(&first))
            .await
            .unwrap()
            .is_empty());
        let changed = migration("0001_t", "CREATE TABLE t (id TEXT)");
        let refused = db.migrate(&[changed]).await;
        assert!(
            matches!(&refused, Err(Error::InvalidQuery(m)) if m.contains("changed after it was applied")),
            "{}: {refused:?}",
            subject.name
        );
        assert!(
            db.query("SELECT id FROM t", vec![]).await.is_ok(),
            "{}",
            subject.name
        );
        subject.clean_up().await;
    }
}

#[tokio::test]
async fn a_transactions_records_and_statements_commit_together_in_order() {
    for subject in subjects().await {
        let db = with_table(&subject).await;
        // More than a backend may hold back before it writes them.
        let records: Vec<String> = (0..40)
            .map(|i| format!("{i:02}{}", "x".repeat(10_000)))
            .collect();
        let mut tx = db.begin().await.unwrap();
        for record in &records {
            tx.enqueue(record).await.unwrap();
        }
        tx.execute("INSERT INTO t (id) VALUES (1)", vec![])
            .await
            .unwrap();
        tx.enqueue("last").await.unwrap();
        tx.commit().await.unwrap();
        let pending = db.outbox_pending(0, 100).await.unwrap();
        let written: Vec<&[u8]> = pending
            .iter()
            .map(|row| row.record.as_deref().unwrap())
            .collect();
        let mut expected: Vec<&[u8]> = records.iter().map(|r| r.as_bytes()).collect();
        expected.push(b"last");
        assert!(
            written == expected,
            "{}: records out of order or missing",
            subject.name
        );
        assert_eq!(all_ids(&*db).await, [1], "{}", subject.name);

        // A failed statement after an enqueue, then a drop: nothing of it.
        let mut tx = db.begin().await.unwrap();
        tx.enqueue("dropped").await.unwrap();
        let failed = tx.execute("INSERT INTO t (id) VALUES (1)", vec![]).await;
        assert!(
            matches!(failed, Err(Error::ConstraintViolation(_))),
            "{}",
            subject.name
        );
        drop(tx);
        assert_eq!(
            db.outbox_pending(0, 100).await.unwrap().len(),
            41,
            "{}",
            subject.name
        );

        // A transaction that does nothing commits, and the next one works.
        db.begin().await.unwrap().commit().await.unwrap();
        db.execute("INSERT INTO t (id) VALUES (2)", vec![])
            .await
            .unwrap();
        assert_eq!(all_ids(&*db).await, [1, 2], "{}", subject.name);
        subject.clean_up().await;
    }
}

#[tokio::test]
async fn outbox_records_come_out_in_commit_order_and_only_when_committed() {
    for subject in subjects().await {
        let db = with_table(&subject).await;
        for (id, commit) in [("e1", true), ("dropped", false), ("e2", true)] {
            let mut tx = db.begin().await.unwrap();
            tx.enqueue(id).await.unwrap();
            if commit {
                tx.commit().await.unwrap();
            }
        }
        let pending = db.outbox_pending(0, 10).await.unwrap();
        let records: Vec<&[u8]> = pending
            .iter()
            .map(|row| row.record.as_deref().unwrap())
            .collect();
        assert_eq!(records, [&b"e1"[..], b"e2"], "{}", subject.name);
        assert!(pending[0].seq < pending[1].seq, "{}", subject.name);
        let after_first = db.outbox_pending(pending[0].seq, 10).await.unwrap();
        assert_eq!(after_first.len(), 1, "{}", subject.name);

        db.outbox_settle(&[pending[0].seq], &[(pending[1].seq, "not granted".into())])
            .await
            .unwrap();
        assert!(
            db.outbox_pending(0, 10).await.unwrap().is_empty(),
            "{}",
            subject.name
        );
        db.sync().await.unwrap();
        subject.clean_up().await;
    }
}
