//! The storage sandbox and the outbox, attacked: a hostile component,
//! granted only `storage`, `cache` and `messaging`, runs beside the default
//! shop and tries to reach what it was not granted. Each attack must be
//! refused with an error that names what was refused (and no host path),
//! and must change nothing.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// The shop of plugins.toml, plus the hostile component.
fn shop_and_hostile() -> TestHost {
    shop_and_hostile_with("")
}

/// The same, with `extra` (TOML tables) appended to the config.
fn shop_and_hostile_with(extra: &str) -> TestHost {
    TestHost::start(shop_config(|text| {
        format!(
            "{text}\n[components.hostile]\nwasm = \"{}\"\nroutes = [\"/hostile\"]\n\
             grants = [\"storage\", \"cache\", \"messaging\"]\n\
             publishes = [\"hostile.events\"]\nlimits = {{ timeout_ms = 2000 }}\n{extra}",
            component("hostile").display()
        )
    }))
}

/// Runs one statement through the hostile component's `query` or `execute`.
async fn sql(host: &TestHost, route: &str, sql: &str) -> Reply {
    hostile(host, route, json!({ "sql": sql })).await
}

/// The rows of a query through the hostile component, which must succeed.
async fn query_rows(host: &TestHost, query: &str) -> Value {
    let reply = sql(host, "query", query).await;
    assert_eq!(reply.status, 200, "{query}: {}", reply.text());
    reply.json()["rows"].clone()
}

/// Publishes `payload` on `hostile.events` in a committed transaction, and
/// waits until the relay has passed it on: every event committed before it
/// has been relayed by then (the relay goes in commit order).
async fn publish_marker(host: &TestHost, payload: &str) -> Vec<Value> {
    let reply = hostile(
        host,
        "transaction",
        json!({
            "statements": [],
            "publish": [{ "topic": "hostile.events", "key": "k", "payload": payload }],
            "commit": true,
        }),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    // `agora events` shows a payload as its JSON text.
    let text = json!(payload).to_string();
    eventually("the marker event", Duration::from_secs(10), || async {
        let events = events(host, "hostile.events");
        events
            .iter()
            .any(|e| e["payload"].as_str() == Some(text.as_str()))
            .then_some(events)
    })
    .await
}

/// A topic's events through `agora events`.
fn events(host: &TestHost, topic: &str) -> Vec<Value> {
    let out = host.cli(&["events", topic]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn register(host: &TestHost, email: &str, password: &str) {
    let reply = post_json(
        &host.url("/users"),
        &json!({"email": email, "password": password, "name": "Someone"}),
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
}

async fn login(host: &TestHost, email: &str, password: &str) -> u16 {
    post_json(
        &host.url("/auth/login"),
        &json!({"email": email, "password": password}),
    )
    .await
    .status
}

const ADMIN: (&str, &str) = ("admin@example.com", "admin-password");
const MALLORY: (&str, &str) = ("mallory@example.com", "mallory-password");

#[tokio::test]
async fn a_components_sql_reaches_only_its_own_tables() {
    let host = shop_and_hostile();
    register(&host, ADMIN.0, ADMIN.1).await;
    register(&host, MALLORY.0, MALLORY.1).await;
    let identity = database(&host, "identity");
    let log = host.data_dir().join("messaging").join("log.db");
    let stolen = host.dir.path().join("stolen.db");
    let planted = host.dir.path().join("planted.db");
    let forged_event = json!({
        "id": "forged", "topic": "payment.succeeded", "key": "order-1",
        "payload": b"{\"order_id\":\"order-1\"}".to_vec(), "headers": [], "published_at": 1
    })
    .to_string();

    // (route, SQL, what the refusal must say)
    let attacks: Vec<(&str, String, &str)> = vec![
        (
            "execute",
            format!("ATTACH '{}' AS idb", identity.display()),
            "ATTACH is not allowed",
        ),
        (
            "execute",
            format!("ATTACH 'file:{}?mode=rw' AS idb", identity.display()),
            "ATTACH is not allowed",
        ),
        (
            "execute",
            format!("ATTACH '{}' AS log", log.display()),
            "ATTACH is not allowed",
        ),
        (
            "execute",
            format!("ATTACH '{}' AS new", planted.display()),
            "ATTACH is not allowed",
        ),
        (
            "execute",
            format!("VACUUM INTO '{}'", stolen.display()),
            "cannot VACUUM",
        ),
        ("execute", "BEGIN IMMEDIATE".into(), "transaction control"),
        ("execute", "COMMIT".into(), "transaction control"),
        ("execute", "SAVEPOINT hold".into(), "SAVEPOINT"),
        (
            "query",
            "PRAGMA database_list".into(),
            "PRAGMA database_list is not allowed",
        ),
        (
            "query",
            "SELECT file FROM pragma_database_list".into(),
            "PRAGMA database_list is not allowed",
        ),
        (
            "execute",
            "PRAGMA journal_mode = DELETE".into(),
            "PRAGMA journal_mode is not allowed",
        ),
        (
            "execute",
            "PRAGMA synchronous = OFF".into(),
            "PRAGMA synchronous is not allowed",
        ),
        (
            "execute",
            "PRAGMA foreign_keys = OFF".into(),
            "may be read, not set",
        ),
        (
            "execute",
            "PRAGMA writable_schema = ON".into(),
            "PRAGMA writable_schema is not allowed",
        ),
        (
            "query",
            "SELECT load_extension('/tmp/evil.so')".into(),
            "load_extension() is not allowed",
        ),
        (
            "query",
            "SELECT name, checksum FROM _agora_migrations".into(),
            "`_agora_migrations` is one of the host's tables",
        ),
        (
            "query",
            "SELECT count(*) FROM _agora_outbox".into(),
            "`_agora_outbox` is one of the host's tables",
        ),
        (
            "execute",
            format!("INSERT INTO _agora_outbox (event) VALUES ('{forged_event}')"),
            "`_agora_outbox` is one of the host's tables",
        ),
        (
            "execute",
            "DELETE FROM _agora_migrations".into(),
            "`_agora_migrations` is one of the host's tables",
        ),
        (
            "execute",
            "CREATE VIEW outbox_view AS SELECT * FROM _agora_outbox".into(),
            "",
        ),
        (
            "query",
            "SELECT * FROM outbox_view".into(),
            "`_agora_outbox` is one of the host's tables",
        ),
    ];
    for (route, sql, reason) in &attacks {
        let reply = hostile(&host, route, json!({ "sql": sql })).await;
        if reason.is_empty() {
            // Creating the view is harmless; reading through it is not.
            assert_eq!(reply.status, 200, "{sql}: {}", reply.text());
        } else {
            assert_refused(&host, sql, &reply, reason);
        }
    }

    // Inside a transaction: no transaction control, no forged outbox row,
    // and a trigger does not act with the host's rights either.
    let in_transaction: Vec<(Vec<&str>, &str)> = vec![
        (vec!["COMMIT"], "transaction control"),
        (vec!["ROLLBACK"], "transaction control"),
        (vec!["SAVEPOINT s", "RELEASE s"], "SAVEPOINT"),
        (
            vec!["INSERT INTO kv VALUES ('x', 'y')", "COMMIT"],
            "transaction control",
        ),
    ];
    for (statements, reason) in in_transaction {
        let statements: Vec<Value> = statements.iter().map(|s| json!({ "sql": s })).collect();
        let reply = hostile(
            &host,
            "transaction",
            json!({ "statements": statements, "commit": true }),
        )
        .await;
        assert_refused(&host, &format!("{statements:?}"), &reply, reason);
    }
    let forge = json!({
        "statements": [{ "sql": "INSERT INTO _agora_outbox (event) VALUES ($1)", "params": [forged_event] }],
        "commit": true,
    });
    let reply = hostile(&host, "transaction", forge).await;
    assert_refused(
        &host,
        "forging inside a transaction",
        &reply,
        "`_agora_outbox`",
    );
    let trigger = json!({
        "sql": "CREATE TRIGGER forge AFTER INSERT ON kv BEGIN \
                INSERT INTO _agora_outbox (event) VALUES (new.value); END"
    });
    assert_eq!(hostile(&host, "execute", trigger).await.status, 200);
    let reply = hostile(
        &host,
        "execute",
        json!({ "sql": "INSERT INTO kv (key, value) VALUES ('k', $1)", "params": [forged_event] }),
    )
    .await;
    assert_refused(
        &host,
        "forging through a trigger",
        &reply,
        "`_agora_outbox`",
    );
    // Publishing a topic it was not granted is refused as before.
    let reply = hostile(
        &host,
        "publish",
        json!({ "topic": "payment.succeeded", "payload": { "order_id": "order-1" } }),
    )
    .await;
    assert_refused(&host, "publish", &reply, "not granted");

    // Its own tables and the read-only PRAGMAs still work, and the refused
    // BEGIN left no transaction behind: this write is acknowledged and stays.
    let reply = hostile(&host, "execute", json!({ "sql": "DROP TRIGGER forge" })).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = hostile(
        &host,
        "execute",
        json!({ "sql": "INSERT INTO kv (key, value) VALUES ('mine', 'kept')" }),
    )
    .await;
    assert_eq!(reply.json()["changed"], 1, "{}", reply.text());
    let reply = hostile(
        &host,
        "query",
        json!({ "sql": "SELECT name FROM pragma_table_info('kv')" }),
    )
    .await;
    assert_eq!(
        reply.json()["rows"],
        json!([["key"], ["value"]]),
        "{}",
        reply.text()
    );

    // Nothing changed: the admin's password is the admin's, no file was
    // written, no event was forged, the host's tables are as the host left them.
    assert_eq!(login(&host, ADMIN.0, ADMIN.1).await, 200);
    assert_eq!(login(&host, ADMIN.0, MALLORY.1).await, 401);
    assert!(!stolen.exists(), "VACUUM INTO wrote a copy");
    assert!(!planted.exists(), "ATTACH created a file");
    assert_eq!(events(&host, "payment.succeeded"), Vec::<Value>::new());
    let mut host = host;
    host.restart();
    let hostile_db = database(&host, "hostile");
    assert_eq!(
        rows(&hostile_db, "SELECT count(*) FROM _agora_outbox"),
        [["0"]]
    );
    assert_eq!(
        rows(&hostile_db, "SELECT name FROM _agora_migrations"),
        [["0001_init"]]
    );
    assert_eq!(
        rows(&hostile_db, "SELECT value FROM kv WHERE key = 'mine'"),
        [["kept"]]
    );
    assert_eq!(events(&host, "payment.succeeded"), Vec::<Value>::new());
}

#[tokio::test]
async fn an_outbox_row_it_may_not_publish_is_set_aside_and_later_events_flow() {
    let mut host = shop_and_hostile();
    let publish_in = |n: u32| {
        json!({
            "statements": [],
            "publish": [{ "topic": "hostile.events", "key": "k", "payload": n }],
            "commit": true,
        })
    };
    assert_eq!(
        hostile(&host, "transaction", publish_in(1)).await.status,
        200
    );
    eventually("the first event", Duration::from_secs(10), || async {
        (events(&host, "hostile.events").len() == 1).then_some(())
    })
    .await;

    // Rows that got into the outbox past the sandbox (a bug, a hand edit, a
    // backend with weaker guards): an event on a topic the component may not
    // publish, and a row that is not an event at all.
    host.crash();
    let forged = json!({
        "id": "forged", "topic": "payment.succeeded", "key": "order-1",
        "payload": b"{\"order_id\":\"order-1\"}".to_vec(), "headers": [], "published_at": 1
    });
    let conn = rusqlite::Connection::open(database(&host, "hostile")).unwrap();
    conn.execute(
        "INSERT INTO _agora_outbox (event) VALUES (?1), ('not an event')",
        [forged.to_string()],
    )
    .unwrap();
    drop(conn);
    host.restart();

    assert_eq!(
        hostile(&host, "transaction", publish_in(2)).await.status,
        200
    );
    let relayed = eventually(
        "the event after the bad rows",
        Duration::from_secs(10),
        || async {
            let events = events(&host, "hostile.events");
            (events.len() == 2).then_some(events)
        },
    )
    .await;
    assert_eq!(relayed[1]["payload"], "2");
    assert_eq!(events(&host, "payment.succeeded"), Vec::<Value>::new());
    eventually(
        "the set-aside rows to leave the outbox",
        Duration::from_secs(10),
        || async {
            let log = host.log();
            (log.matches("outbox event set aside").count() == 2).then_some(())
        },
    )
    .await;
    host.crash();
    let hostile_db = database(&host, "hostile");
    assert_eq!(
        rows(&hostile_db, "SELECT count(*) FROM _agora_outbox"),
        [["0"]]
    );
    let rejected = rows(
        &hostile_db,
        "SELECT reason FROM _agora_outbox_rejected ORDER BY seq",
    );
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    assert!(
        rejected[0][0].contains("may not publish to `payment.succeeded`"),
        "{rejected:?}"
    );
    assert!(rejected[1][0].contains("is not an event"), "{rejected:?}");
}

#[tokio::test]
async fn a_transaction_abandoned_at_its_deadline_never_swallows_a_later_write() {
    let mut host = shop_and_hostile();
    // Writes in a transaction, then overruns the deadline inside one of its
    // statements (this one never ends on its own).
    let stall = json!({
        "key": "abandoned",
        "slow_sql": "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) \
                     SELECT count(*) FROM n",
    });
    let reply = hostile(&host, "stall-in-transaction", stall).await;
    assert_error(&reply, 504, "deadline_exceeded");

    let reply = hostile(
        &host,
        "execute",
        json!({ "sql": "INSERT INTO kv (key, value) VALUES ('after', 'acknowledged')" }),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["changed"], 1);
    // A later transaction must not undo it.
    let later = json!({
        "statements": [{ "sql": "INSERT INTO kv (key, value) VALUES ('later', 'x')" }],
        "commit": true,
    });
    assert_eq!(hostile(&host, "transaction", later).await.status, 200);
    let keys = json!({ "sql": "SELECT key FROM kv ORDER BY key" });
    let reply = hostile(&host, "query", keys.clone()).await;
    assert_eq!(reply.json()["rows"], json!([["after"], ["later"]]));
    host.restart();
    let reply = hostile(&host, "query", keys).await;
    assert_eq!(reply.json()["rows"], json!([["after"], ["later"]]));
}

#[tokio::test]
async fn a_refused_version_leaves_the_schema_exactly_as_it_was() {
    let host = TestHost::standard();
    assert_eq!(put(&host.url("/probe/kv/before"), "kept").await.status, 204);
    let before = schema_and_ledger(&host, "probe");

    // A good migration (it replaces `kv`), then a broken one.
    let half = component("probe-half-migration");
    let out = host.cli(&["deploy", "probe", half.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("migration `0003_broken` failed"),
        "{}",
        stderr(&out)
    );

    assert_eq!(schema_and_ledger(&host, "probe"), before);
    let version = get(&host.url("/probe/version")).await.json();
    assert_eq!(version["version"], "v1");
    assert_eq!(
        get(&host.url("/probe/kv/before")).await.json()["value"],
        "kept"
    );
    assert_eq!(
        put(&host.url("/probe/kv/after"), "v1 writes").await.status,
        204
    );
}

#[tokio::test]
async fn direct_and_outbox_publishes_of_one_key_keep_their_order() {
    let host = shop_and_hostile();
    let reply = hostile(
        &host,
        "alternate",
        json!({ "topic": "hostile.events", "key": "one-key", "count": 30 }),
    )
    .await;
    assert_eq!(reply.status, 204, "{}", reply.text());
    let events = eventually("30 events", Duration::from_secs(10), || async {
        let events = events(&host, "hostile.events");
        (events.len() == 30).then_some(events)
    })
    .await;
    let order: Vec<String> = events
        .iter()
        .map(|e| e["payload"].as_str().unwrap().to_owned())
        .collect();
    let published: Vec<String> = (0..30).map(|n| n.to_string()).collect();
    assert_eq!(order, published);
}

/// SQLite rolls a whole transaction back by itself after some errors (here
/// SQLITE_FULL: the AUTOINCREMENT counter is at its maximum); the
/// component's later statements and outbox event must not then commit one
/// by one, and `commit()` must fail.
#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_the_database_rolled_back_commits_nothing_after() {
    let host = shop_and_hostile();
    for s in [
        "CREATE TABLE full_seq (id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT)",
        "INSERT INTO full_seq (id, v) VALUES (9223372036854775807, 'max')",
    ] {
        assert_eq!(sql(&host, "execute", s).await.status, 200, "{s}");
    }
    let reply = hostile(
        &host,
        "transaction",
        json!({
            "statements": [
                { "sql": "INSERT INTO kv VALUES ('before', 'in the transaction')" },
                { "sql": "INSERT INTO full_seq (v) VALUES ('one more')" },
                { "sql": "INSERT INTO kv VALUES ('after', 'must never commit')" },
            ],
            "publish": [{ "topic": "hostile.events", "key": "k", "payload": "from a failed transaction" }],
            "commit": true,
            "ignore_errors": true,
        }),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let outcome = reply.json();
    let later = "the transaction was rolled back by the database after an earlier error";
    let said = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    assert!(
        said(&outcome["changed"][1]).contains("the database rolled back the transaction"),
        "{outcome}"
    );
    for refused in [
        &outcome["changed"][2],
        &outcome["changed"][3],
        &outcome["commit"],
    ] {
        assert!(said(refused).contains(later), "{outcome}");
    }
    // Nothing of it is durable, and its event never leaves: the marker
    // published after it is the only event.
    let events = publish_marker(&host, "marker").await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(query_rows(&host, "SELECT key FROM kv").await, json!([]));
    assert!(!host.log().contains("rollback failed"), "{}", host.log());
}

/// The AUTOINCREMENT counters live in `sqlite_sequence`, the outbox's among
/// them: a component cannot set, delete or rename one (after which the
/// outbox could number no further event), while SQLite still keeps the
/// counters of the component's own tables through DROP and RENAME.
#[tokio::test(flavor = "multi_thread")]
async fn a_component_cannot_write_the_autoincrement_counters() {
    let host = shop_and_hostile();
    publish_marker(&host, "first").await;
    for s in [
        "CREATE TABLE seqtab (id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT)",
        "INSERT INTO seqtab (id, v) VALUES (9223372036854775807, 'x')",
        "CREATE TABLE dropped (id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT)",
        "INSERT INTO dropped (v) VALUES ('x')",
        "ALTER TABLE dropped RENAME TO renamed",
        "DROP TABLE renamed",
    ] {
        let reply = sql(&host, "execute", s).await;
        assert_eq!(reply.status, 200, "{s}: {}", reply.text());
    }
    let counters = "SELECT name, seq FROM sqlite_sequence ORDER BY name";
    let before = query_rows(&host, counters).await;
    assert_eq!(
        before,
        json!([["_agora_outbox", 1], ["seqtab", 9223372036854775807i64]])
    );
    for s in [
        "DELETE FROM sqlite_sequence WHERE name = '_agora_outbox'",
        "UPDATE sqlite_sequence SET name = '_agora_outbox' WHERE name = 'seqtab'",
        "UPDATE sqlite_sequence SET seq = 9223372036854775807",
        "INSERT INTO sqlite_sequence VALUES ('_agora_outbox', 9223372036854775807)",
    ] {
        let reply = sql(&host, "execute", s).await;
        assert_refused(&host, s, &reply, "writing `sqlite_sequence` is not allowed");
    }
    assert_eq!(query_rows(&host, counters).await, before);
    let events = publish_marker(&host, "second").await;
    assert_eq!(events.len(), 2, "{events:?}");
}

/// `ALTER TABLE .. RENAME` shows the authorizer only the old name, so the
/// host checks the schema after it: a component cannot squat a name in the
/// host's `_agora_` space, which a later host version would create with IF
/// NOT EXISTS, in autocommit mode or in a transaction.
#[tokio::test(flavor = "multi_thread")]
async fn a_component_cannot_rename_a_table_into_the_hosts_name_space() {
    let host = shop_and_hostile();
    assert_eq!(
        sql(&host, "execute", "CREATE TABLE squat (x TEXT)")
            .await
            .status,
        200
    );
    let schema = "SELECT type, name FROM sqlite_schema ORDER BY name";
    let before = query_rows(&host, schema).await;
    for rename in [
        "ALTER TABLE squat RENAME TO _agora_leases",
        "ALTER TABLE squat RENAME TO \"_AGORA_Leases\"",
    ] {
        let reply = sql(&host, "execute", rename).await;
        assert_refused(&host, rename, &reply, "is in the host's name space");
        let reply = hostile(
            &host,
            "transaction",
            json!({
                "statements": [{ "sql": "INSERT INTO kv VALUES ('in', 'transaction')" }, { "sql": rename }],
                "commit": true,
            }),
        )
        .await;
        assert_refused(&host, rename, &reply, "is in the host's name space");
    }
    assert_eq!(query_rows(&host, schema).await, before);
    assert_eq!(query_rows(&host, "SELECT key FROM kv").await, json!([]));
    let reply = sql(&host, "execute", "ALTER TABLE squat RENAME TO mine").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

/// `query` only reads: a write through it would run on a read connection,
/// outside the writer's lock and beside the instance's open transaction.
/// And no temporary object outlives its request on a shared connection
/// (a temporary trigger would run in later requests).
#[tokio::test(flavor = "multi_thread")]
async fn query_only_reads_and_nothing_temporary_outlives_a_request() {
    let host = shop_and_hostile();
    let schema = "SELECT type, name FROM sqlite_schema ORDER BY name";
    let before = query_rows(&host, schema).await;
    for s in [
        "INSERT INTO kv VALUES ('via-query', 'v') RETURNING key",
        "CREATE TABLE via_query (x)",
        "DELETE FROM kv",
    ] {
        let reply = sql(&host, "query", s).await;
        assert_refused(&host, s, &reply, "query is read-only: use execute");
    }
    for (route, s) in [
        ("query", "CREATE TEMP TABLE lingering (x)"),
        ("execute", "CREATE TEMP TABLE lingering (x)"),
        ("execute", "CREATE TABLE temp.lingering (x)"),
        ("execute", "CREATE TEMP VIEW lingering AS SELECT 1"),
        (
            "execute",
            "CREATE TEMP TRIGGER lingering AFTER INSERT ON main.kv \
             BEGIN INSERT INTO kv VALUES ('planted', 'v'); END",
        ),
        (
            "execute",
            "CREATE TRIGGER temp.lingering AFTER INSERT ON main.kv \
             BEGIN INSERT INTO kv VALUES ('planted', 'v'); END",
        ),
    ] {
        let reply = sql(&host, route, s).await;
        assert_refused(&host, s, &reply, "temporary");
    }
    // A write with RETURNING goes through execute; no planted trigger runs.
    let reply = sql(
        &host,
        "execute",
        "INSERT INTO kv VALUES ('mine', 'v') RETURNING key",
    )
    .await;
    assert_eq!(reply.json()["changed"], 1, "{}", reply.text());
    assert_eq!(
        query_rows(&host, "SELECT key FROM kv").await,
        json!([["mine"]])
    );
    assert_eq!(query_rows(&host, schema).await, before);
}

/// Component SQL cannot make the host hold unbounded memory: a value is
/// capped (`SQLITE_LIMIT_LENGTH`), SQLite's heap is capped process-wide,
/// and so is a query's result. Without them, three such requests at once
/// took the host from about 80 MiB to 2.7 GiB.
#[tokio::test(flavor = "multi_thread")]
async fn sql_cannot_make_the_host_hold_unbounded_memory() {
    let host = shop_and_hostile();
    // 40 columns of 8 MB each: every value under the cap, 320 MB a row.
    let wide = format!(
        "SELECT {}",
        vec!["zeroblob(8000000) || x'00'"; 40].join(", ")
    );
    let bombs = [
        "SELECT length(zeroblob(500000000) || x'00')",
        "SELECT length(randomblob(900000000))",
        wide.as_str(),
    ];
    for bomb in bombs {
        let mut running = Vec::new();
        for _ in 0..3 {
            let url = host.url("/hostile/query");
            let body = json!({ "sql": bomb });
            running.push(tokio::spawn(async move { post_json(&url, &body).await }));
        }
        for reply in running {
            let reply = reply.await.unwrap();
            let what: String = bomb.chars().take(60).collect();
            assert_eq!(reply.status, 422, "{what}: {}", reply.text());
        }
    }
    let peak_mib = host.peak_resident_kib() / 1024;
    assert!(
        peak_mib < 1024,
        "the bombs made the host hold {peak_mib} MiB"
    );
    // The host still serves, its storage included.
    let reply = sql(&host, "execute", "INSERT INTO kv VALUES ('after', 'v')").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(get(&host.url("/products")).await.status, 200);
}

/// Runs `write` through `execute`, which must end at the deadline, and
/// then a small write, which must succeed at once: the write connection
/// is free, so the statement has stopped.
async fn assert_write_stops_at_deadline(host: &TestHost, write: &str, what: &str) {
    let reply = sql(host, "execute", write).await;
    assert_error(&reply, 504, "deadline_exceeded");
    let after = "INSERT OR REPLACE INTO kv (key, value) VALUES ('after', 'v')";
    let reply = sql(host, "execute", after).await;
    assert_eq!(reply.status, 200, "after {what}: {}", reply.text());
}

/// Nothing runs on after a deadline: the host is idle.
async fn assert_idle(host: &TestHost) {
    let before = host.cpu_time();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = host.cpu_time() - before;
    assert!(
        used < Duration::from_secs(1),
        "the idle host used {used:?} of CPU in 3 s"
    );
}

/// A statement stops at its deadline whatever it calls. SQLite's own
/// `LIKE`, `GLOB`, `instr`, `replace` and `trim(x, set)` each did work
/// quadratic in their arguments inside one instruction of its VM, where
/// the deadline's interrupt does not reach: one call on megabytes ran for
/// minutes, holding a core and, in `execute`, the component's write
/// connection.
#[tokio::test]
async fn a_statement_stops_at_its_deadline_whatever_it_calls() {
    let host = shop_and_hostile();
    let long = "WITH t(x, y, p) AS (SELECT printf('%.*c', 8000000, 'a'), \
                printf('%.*c', 2000000, 'a') || 'b', printf('%.*c', 40000, 'a')) ";
    let slow = [
        "x LIKE '%' || p || 'b%'",
        "x GLOB '*' || p || 'b*'",
        "x LIKE '%' || p || '_b' ESCAPE '!'",
    ];
    for expr in slow {
        let write = format!("{long} INSERT INTO kv (key, value) SELECT 'q', {expr} FROM t");
        assert_write_stops_at_deadline(&host, &write, expr).await;
        let reply = sql(&host, "query", &format!("{long} SELECT {expr} FROM t")).await;
        assert_error(&reply, 504, "deadline_exceeded");
    }
    // These are linear now, and answer well within the deadline.
    let fast = [
        ("instr(x || 'b', y)", 6_000_001),
        ("length(replace(x || 'b', y, ''))", 6_000_000),
        (
            "length(trim(x || 'b', printf('%.*c', 40000, 'c') || 'a'))",
            1,
        ),
    ];
    for (expr, expected) in fast {
        let rows = query_rows(&host, &format!("{long} SELECT {expr} FROM t")).await;
        assert_eq!(rows, json!([[expected]]), "{expr}");
    }
    assert_idle(&host).await;
}

/// A statement without a loop, where SQLite never looks at the interrupt
/// (one row of thousands of terms), also stops at its deadline: at its next
/// large allocation or call of a replaced function. Each of these ran for
/// half a minute or more past the 2 s deadline before, holding a core and,
/// through `execute`, the component's write connection.
#[tokio::test(flavor = "multi_thread")]
async fn a_statement_without_a_loop_stops_at_its_deadline() {
    let host = shop_and_hostile();
    let big = "INSERT OR REPLACE INTO kv (key, value) VALUES ('big', printf('%.*c', 8000000, 'a'))";
    assert_eq!(sql(&host, "execute", big).await.status, 200);
    // 4,000 terms, 500 to a column (SQLite's expression depth is 1,000).
    let terms = |term: &str| -> String {
        let column = vec![term; 500].join(" + ");
        vec![column; 8].join(", ")
    };
    let from_big = "FROM kv WHERE key = 'big'";
    let statements = [
        // Each allocates its 8 MB result: stopped by the allocator.
        (terms("octet_length(randomblob(8000000))"), ""),
        (terms("unicode(upper(value))"), from_big),
        // This walks the value without allocating: stopped by the replaced
        // function's look at the interrupt.
        (terms("unicode(substr(value, 7999999))"), from_big),
    ];
    for (columns, from) in &statements {
        let head = &columns[..30];
        let reply = sql(&host, "query", &format!("SELECT {columns} {from}")).await;
        assert_error(&reply, 504, "deadline_exceeded");
        // Only the abandoned call's large allocations are refused: the next
        // query, maybe on the same blocking thread, makes its own.
        let padded = format!("SELECT length('{}')", "x".repeat(20_000));
        assert_eq!(
            query_rows(&host, &padded).await,
            json!([[20_000]]),
            "after {head}"
        );
        let write = format!("INSERT INTO kv (key, value) SELECT 'q', json_array({columns}) {from}");
        assert_write_stops_at_deadline(&host, &write, head).await;
    }
    assert_idle(&host).await;
}

/// A statement that outruns every checkpoint, terms that walk a large
/// value without allocating, cannot take the CPU from the rest of the
/// host: past its deadline it runs on only at idle priority, and only as
/// many as its database has query slots (4), however many the component
/// starts at once; while they run on, its next statements are refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_statement_that_outruns_its_deadline_gets_only_idle_cpu() {
    let host = shop_and_hostile();
    let digits =
        "INSERT OR REPLACE INTO kv (key, value) VALUES ('digits', printf('%.*c', 8000000, '7'))";
    assert_eq!(sql(&host, "execute", digits).await.status, 200);
    // 26 ms a term: 2,000 terms are most of a minute of a core.
    let column = vec!["(value + 0)"; 250].join(" + ");
    let outrun = format!(
        "SELECT {} FROM kv WHERE key = 'digits'",
        vec![column; 8].join(", ")
    );
    let replies =
        futures_util::future::join_all((0..6).map(|_| sql(&host, "query", &outrun))).await;
    for reply in &replies {
        assert_error(reply, 504, "deadline_exceeded");
    }
    // Lowered 100 ms after the deadline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = host.threads();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = host.threads();
    let lowered = after
        .values()
        .filter(|(_, policy)| *policy == libc::SCHED_IDLE as u64)
        .count();
    assert_eq!(lowered, 4, "threads at idle priority");
    for (tid, (cpu, policy)) in &after {
        let used = *cpu - before.get(tid).map_or(Duration::ZERO, |(cpu, _)| *cpu);
        assert!(
            *policy == libc::SCHED_IDLE as u64 || used < Duration::from_millis(300),
            "thread {tid} (policy {policy}) used {used:?} of CPU in 2 s"
        );
    }
    let reply = sql(&host, "query", "SELECT 1").await;
    assert_refused(&host, "a query", &reply, "still running long after");
    let reply = sql(&host, "execute", "INSERT INTO kv VALUES ('k', 'v')").await;
    assert_refused(&host, "a write", &reply, "still running long after");
    // The others' storage is not held up.
    assert_eq!(get(&host.url("/products")).await.status, 200);
}

/// One component cannot fill the disk the others share: its database stops
/// at the backend's `max_size_mib`, with a clear error, and the others
/// write on.
#[tokio::test(flavor = "multi_thread")]
async fn a_components_database_stops_at_its_size_limit() {
    let host = shop_and_hostile_with("[backends.storage]\nkind = \"sqlite\"\nmax_size_mib = 2\n");
    let mut refusal = None;
    for i in 0..10 {
        let reply = hostile(
            &host,
            "execute",
            json!({ "sql": "INSERT INTO kv VALUES ($1, hex(randomblob(500000)))", "params": [i.to_string()] }),
        )
        .await;
        if reply.status != 200 {
            refusal = Some(reply);
            break;
        }
    }
    let reply = refusal.expect("2 MiB took 10 MB of writes");
    assert_refused(&host, "filling the disk", &reply, "size limit");
    register(&host, ADMIN.0, ADMIN.1).await;
    let pages = rows(&database(&host, "hostile"), "PRAGMA page_count");
    let pages: u64 = pages[0][0].parse().unwrap();
    assert!(pages * 4096 <= 2 << 20, "{pages} pages");
}
