//! Storage on PostgreSQL, through real hosts: a hostile component after
//! other components' schemas, the host's tables, roles and files, refused
//! by PostgreSQL itself; and an outage of the database under load.
//!
//! Each host gets a namespace of its own (its roles and schemas), dropped
//! with it. Tests are skipped, saying so, when nothing answers on
//! 127.0.0.1:5432, and fail instead under `AGORA_REQUIRE_SERVICES=1` (as
//! `scripts/test` runs them, after `scripts/services` made the `agora` role
//! and the `shop` database).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

async fn postgres_answers() -> bool {
    service_answers("PostgreSQL", "127.0.0.1:5432").await
}

/// Runs `sql` as the host's own role (the `agora` of [`POSTGRES_URL`]):
/// one row, its columns joined by `|`.
fn psql(sql: &str) -> String {
    psql_rows(sql)
        .into_iter()
        .map(|row| row.join("|"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The shop and the hostile component on PostgreSQL at `url`, under
/// `namespace`; `coordinated` adds messaging on the test Kafka with
/// coordination (leases, offsets, outbox locks) in the same PostgreSQL.
fn shop_and_hostile(url: &str, namespace: &str, coordinated: bool) -> TestHost {
    let coordination = match coordinated {
        true => format!(
            "[backends.messaging]\nkind = \"kafka\"\nbrokers = \"127.0.0.1:9092\"\n\
             topic_prefix = \"{namespace}.\"\nfetch_max_wait_ms = 20\n\
             [backends.coordination]\nkind = \"postgres\"\nurl = \"{url}\"\nnamespace = \"{namespace}\"\n"
        ),
        false => String::new(),
    };
    let (url, namespace) = (url.to_owned(), namespace.to_owned());
    TestHost::start(shop_config(move |text| {
        format!(
            "{text}\n[components.hostile]\nwasm = \"{}\"\nroutes = [\"/hostile\"]\n\
             grants = [\"storage\", \"cache\", \"messaging\"]\n\
             publishes = [\"hostile.events\"]\nlimits = {{ timeout_ms = 2000 }}\n\
             [backends.storage]\nkind = \"postgres\"\nurl = \"{url}\"\nnamespace = \"{namespace}\"\n\
             connect_timeout_ms = 500\n{coordination}",
            component("hostile").display()
        )
    }))
}

/// What the host's tables and the identity component's hold, to show that
/// the attacks changed nothing.
fn snapshot(ns: &str) -> String {
    psql(&format!(
        "SELECT (SELECT string_agg(email || password_hash, ',' ORDER BY id) FROM \"{ns}_identity\".users) \
         || '|' || (SELECT count(*) FROM \"{ns}\".outbox) \
         || '|' || (SELECT string_agg(component || name || checksum, ',' ORDER BY component, name) FROM \"{ns}\".migrations)"
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_component_reaches_only_its_own_schema() {
    if !postgres_answers().await {
        return;
    }
    let ns = unique_namespace();
    let kafka = service_answers("Kafka", "127.0.0.1:9092").await;
    let host = shop_and_hostile(POSTGRES_URL, &ns, kafka);
    let signup = post_json(
        &host.url("/users"),
        &json!({"email": "victim@example.com", "name": "V", "password": "correct horse battery"}),
    )
    .await;
    assert_eq!(signup.status, 201, "{}", signup.text());

    // Its own tables work, found through its search path.
    let own = hostile(
        &host,
        "execute",
        json!({"sql": "INSERT INTO kv (key, value) VALUES ('a', 'b')"}),
    )
    .await;
    assert_eq!(own.status, 200, "{}", own.text());
    let own = hostile(&host, "query", json!({"sql": "SELECT value FROM kv"})).await;
    assert_eq!(own.json()["rows"], json!([["b"]]), "{}", own.text());

    let before = snapshot(&ns);
    let attacks = [
        (
            format!("SELECT * FROM \"{ns}_identity\".users"),
            "permission denied for schema",
        ),
        (
            format!("UPDATE \"{ns}_identity\".users SET password_hash = 'x'"),
            "permission denied for schema",
        ),
        (
            format!("SELECT * FROM \"{ns}\".outbox"),
            "permission denied for schema",
        ),
        (
            format!("INSERT INTO \"{ns}\".outbox (component, event) VALUES ('payments', '{{}}')"),
            "permission denied for schema",
        ),
        (
            format!("DELETE FROM \"{ns}\".migrations"),
            "permission denied for schema",
        ),
        (
            format!("SELECT * FROM \"{ns}\".connections"),
            "permission denied for schema",
        ),
        // Naming a host table at all would queue for its lock.
        (
            format!("PREPARE hold AS SELECT 1 FROM \"{ns}\".components"),
            "permission denied for schema",
        ),
        (
            format!("CREATE RULE r AS ON UPDATE TO \"{ns}\".components DO INSTEAD NOTHING"),
            "permission denied for schema",
        ),
        (
            format!("SELECT \"{ns}$api\".enqueue('guessed', '{{}}')"),
            "only the host writes to the outbox",
        ),
        (
            format!("SELECT \"{ns}$api\".record_migration('guessed', 'x', 'y')"),
            "only the host records migrations",
        ),
        (
            format!("SELECT \"{ns}\".caller('guessed')"),
            "permission denied for schema",
        ),
        // Coordination's tables: another host's leases, offsets and locks.
        (
            format!("UPDATE \"{ns}\".consumer_offsets SET next = 0, holder = 'me'"),
            "permission denied for schema",
        ),
        (
            format!("SELECT 1 FROM \"{ns}\".locks FOR UPDATE"),
            "permission denied for schema",
        ),
        (
            format!("DELETE FROM \"{ns}\".hosts"),
            "permission denied for schema",
        ),
        ("SET ROLE agora".into(), "permission denied to set role"),
        (
            "SET SESSION AUTHORIZATION agora".into(),
            "permission denied to set session authorization",
        ),
        (
            "SELECT pg_read_file('/etc/passwd')".into(),
            "permission denied for function pg_read_file",
        ),
        (
            "COPY (SELECT 1) TO '/tmp/agora-hostile'".into(),
            "COPY to a file",
        ),
        ("CREATE EXTENSION dblink".into(), "permission denied"),
        (
            format!("CREATE TABLE \"{ns}_identity\".mine (x BIGINT)"),
            "permission denied for schema",
        ),
        (
            "CREATE TABLE public.mine (x BIGINT)".into(),
            "permission denied for schema public",
        ),
        (
            "CREATE SCHEMA mine".into(),
            "permission denied for database",
        ),
        (
            "ALTER ROLE CURRENT_USER SUPERUSER".into(),
            "must be superuser",
        ),
    ];
    for (sql, reason) in &attacks {
        let reply = hostile(&host, "execute", json!({ "sql": sql })).await;
        assert_refused(&host, sql, &reply, reason);
    }
    if kafka {
        // Coordination's rows are there (once the host has beaten), and
        // still the host's.
        let coordination = format!(
            "SELECT (SELECT count(*) FROM \"{ns}\".consumer_offsets WHERE holder IS NOT NULL) > 0, \
                    (SELECT count(*) FROM \"{ns}\".consumer_offsets WHERE holder = 'me'), \
                    (SELECT count(*) FROM \"{ns}\".hosts)"
        );
        eventually(
            "the host to hold its leases",
            Duration::from_secs(30),
            || async { (psql(&coordination) == "t|0|1").then_some(()) },
        )
        .await;
    }
    // A type storage does not carry is named, with its column.
    let reply = hostile(
        &host,
        "query",
        json!({"sql": "SELECT 1.5::numeric AS price"}),
    )
    .await;
    assert_refused(&host, "numeric", &reply, "column `price` has type numeric");
    // `query` only reads.
    let reply = hostile(
        &host,
        "query",
        json!({"sql": "INSERT INTO kv (key, value) VALUES ('c', 'd')"}),
    )
    .await;
    assert_refused(&host, "write in query", &reply, "read-only transaction");
    assert_eq!(snapshot(&ns), before, "an attack changed something");

    // A function named like the one the host asks for its connection's
    // pid, first on the role's own search path, then a reconnect: the host
    // must still register its true pid, so that identity's connection keeps
    // its key and identity can still write events to its outbox.
    for sql in [
        "CREATE TABLE targets (n BIGSERIAL PRIMARY KEY, pid INT)".to_owned(),
        "CREATE FUNCTION pg_backend_pid() RETURNS INT LANGUAGE sql AS \
         $$ SELECT coalesce((SELECT pid FROM targets ORDER BY n DESC LIMIT 1), pg_catalog.pg_backend_pid()) $$"
            .to_owned(),
        format!("ALTER ROLE CURRENT_USER SET search_path = \"{ns}_hostile\", pg_catalog"),
        format!("INSERT INTO targets (pid) SELECT pid FROM pg_stat_activity WHERE usename = '{ns}_identity'"),
    ] {
        let reply = hostile(&host, "execute", json!({ "sql": sql })).await;
        assert_eq!(reply.status, 200, "{sql}: {}", reply.text());
    }
    let targets = hostile(
        &host,
        "query",
        json!({"sql": "SELECT count(*) FROM targets"}),
    )
    .await;
    assert_ne!(
        targets.json()["rows"],
        json!([[0]]),
        "identity has no connection to aim at"
    );
    // Its connections end; the pool makes new ones.
    let _ = hostile(
        &host,
        "execute",
        json!({"sql": "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = CURRENT_USER"}),
    )
    .await;
    let _ = hostile(&host, "query", json!({"sql": "SELECT 1"})).await;
    let signup = post_json(
        &host.url("/users"),
        &json!({"email": "second@example.com", "name": "S", "password": "correct horse battery"}),
    )
    .await;
    assert_eq!(
        signup.status,
        201,
        "identity lost its key: {}",
        signup.text()
    );
    // The victim still signs in with the password it chose.
    let login = post_json(
        &host.url("/auth/login"),
        &json!({"email": "victim@example.com", "password": "correct horse battery"}),
    )
    .await;
    assert_eq!(login.status, 200, "{}", login.text());
}

async fn checkout(host: &TestHost, token: &str, product: &str) -> Reply {
    request(
        "POST",
        &host.url("/orders"),
        &[
            ("authorization", &format!("Bearer {token}")),
            ("content-type", "application/json"),
        ],
        serde_json::to_vec(&json!({"items": [{"product_id": product, "quantity": 1}]})).unwrap(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outage_of_postgres_gives_fast_503s_and_loses_no_acknowledged_order() {
    if !postgres_answers().await {
        return;
    }
    let outage = Outage::start("127.0.0.1:5432").await;
    let ns = unique_namespace();
    let url = format!("postgres://agora:agora@127.0.0.1:{}/shop", outage.port);
    let host = shop_and_hostile(&url, &ns, false);
    let mut token = String::new();
    for (email, password) in [
        ("admin@example.com", "admin-password"),
        ("buyer@example.com", "correct horse battery"),
    ] {
        let body = json!({"email": email, "name": "B", "password": password});
        let signup = post_json(&host.url("/users"), &body).await;
        assert_eq!(signup.status, 201, "{}", signup.text());
        let body = json!({"email": email, "password": password});
        token = post_json(&host.url("/auth/login"), &body).await.json()["token"]
            .as_str()
            .unwrap()
            .to_owned();
        if email.starts_with("admin") {
            let body =
                json!({"name": "Lamp", "description": "d", "price_cents": 100, "stock": 1_000_000});
            let created = request(
                "POST",
                &host.url("/products"),
                &[
                    ("authorization", &format!("Bearer {token}")),
                    ("content-type", "application/json"),
                ],
                serde_json::to_vec(&body).unwrap(),
            )
            .await;
            assert_eq!(created.status, 201, "{}", created.text());
        }
    }
    let products = get(&host.url("/products")).await.json();
    let product = products["items"][0]["id"].as_str().unwrap().to_owned();

    // Checkouts before, during and after the outage.
    let mut acknowledged = Vec::new();
    let mut during = Vec::new();
    for phase in ["before", "during", "after"] {
        match phase {
            "during" => outage.cut(),
            "after" => outage.restore(),
            _ => {}
        }
        let until = Instant::now() + Duration::from_secs(3);
        let mut served = 0;
        while Instant::now() < until || (phase == "after" && served == 0) {
            let started = Instant::now();
            let reply = checkout(&host, &token, &product).await;
            let took = started.elapsed();
            match reply.status {
                201 => {
                    served += 1;
                    acknowledged.push(reply.json()["id"].as_str().unwrap().to_owned());
                }
                503 if phase != "before" => {
                    if phase == "during" {
                        during.push(took);
                    }
                }
                status => panic!("{phase}: {status} {}", reply.text()),
            }
            if phase == "after" && Instant::now() > until + Duration::from_secs(20) {
                panic!("the host did not reconnect within 20 s");
            }
        }
    }
    assert!(
        !during.is_empty(),
        "no checkout was refused during the outage"
    );
    // Fails fast: no refusal waited for a timeout of the component (10 s).
    let slowest = during.iter().max().unwrap();
    assert!(
        *slowest < Duration::from_secs(5),
        "a refusal took {slowest:?}"
    );
    // Every acknowledged order is there, and no other.
    let stored = psql(&format!(
        "SELECT count(*) FROM \"{ns}_orders\".orders WHERE id = ANY(ARRAY['{}'])",
        acknowledged.join("','")
    ));
    assert_eq!(stored, acknowledged.len().to_string());
}
