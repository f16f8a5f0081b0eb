//! The cache on Redis, through real hosts: components' keys, TTLs, rate
//! limits shared by two hosts, a hostile component after other components'
//! keys, and what happens when Redis cannot be reached.
//!
//! Each test uses a `key_prefix` of its own, so tests running in parallel on
//! one Redis never meet. Tests that need Redis are skipped, saying so, when
//! nothing answers on 127.0.0.1:6379, and fail instead under
//! `AGORA_REQUIRE_SERVICES=1` (as `scripts/test` runs them).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const REDIS: &str = "127.0.0.1:6379";

/// One window for a whole test (see gateway.rs): counts never reset halfway.
const ONE_WINDOW: &str = "1000000000";

async fn redis_answers() -> bool {
    service_answers("Redis", REDIS).await
}

/// A key prefix no other test or run uses.
fn unique_prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("agora-test/{test}-{}-{nanos}/", std::process::id())
}

fn redis_backend(url: &str, prefix: &str) -> String {
    format!(
        "[backends.cache]\nkind = \"redis\"\nurl = \"{url}\"\nkey_prefix = \"{prefix}\"\n\
         connect_timeout_ms = 500\ncommand_timeout_ms = 500\n"
    )
}

/// A URL on which nothing listens.
fn closed_port_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("redis://127.0.0.1:{port}")
}

/// Reads a key straight from Redis, as the test's own client (RESP).
async fn redis_get(key: &str) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(REDIS).await.unwrap();
    let command = format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len());
    stream.write_all(command.as_bytes()).await.unwrap();
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        reply.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&reply).into_owned();
        if text == "$-1\r\n" {
            return None;
        }
        if let Some((len, rest)) = text.strip_prefix('$').and_then(|t| t.split_once("\r\n")) {
            let len: usize = len.parse().unwrap();
            if rest.len() >= len + 2 {
                return Some(rest[..len].to_owned());
            }
        }
        assert!(n > 0, "redis closed the connection: {text:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_probe_caches_in_redis_under_its_own_name_and_entries_expire() {
    if !redis_answers().await {
        return;
    }
    let prefix = unique_prefix("probe");
    let host = TestHost::start(|ports, _| {
        format!(
            "{}{}",
            redis_backend(&format!("redis://{REDIS}"), &prefix),
            standard_config(ports, &component("probe"))
        )
    });
    let cache = |key: &str| host.url(&format!("/probe/cache/{key}"));
    assert_eq!(
        put(&cache("short?ttl_ms=300"), "soon gone").await.status,
        204
    );
    assert_eq!(put(&cache("long"), "stays").await.status, 204);
    assert_eq!(
        get(&host.url("/probe/cache/long")).await.json(),
        json!({"value": "stays"})
    );
    // In Redis, under the deployment's prefix and the component's name.
    assert_eq!(
        redis_get(&format!("{prefix}probe:long")).await.as_deref(),
        Some("stays")
    );
    eventually(
        "the short entry to expire",
        Duration::from_secs(10),
        || async { (get(&host.url("/probe/cache/short")).await.status == 404).then_some(()) },
    )
    .await;
    assert_eq!(redis_get(&format!("{prefix}probe:short")).await, None);
    assert_eq!(
        get(&host.url("/probe/cache/long")).await.json(),
        json!({"value": "stays"})
    );
    let ready = get(&host.url("/readyz")).await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json()["backends"]["cache"], "ok");
    assert_eq!(ready.json()["backends"]["storage"], "ok");
    assert_eq!(ready.json()["backends"]["messaging"], "ok");
}

#[tokio::test(flavor = "multi_thread")]
async fn login_attempts_are_counted_across_two_hosts_sharing_redis() {
    if !redis_answers().await {
        return;
    }
    let prefix = unique_prefix("rate");
    let config = |prefix: String| {
        shop_config(move |c| {
            let limited = c.replace(
                "requests = 20, window_seconds = 60, per = \"address\"",
                &format!("requests = 20, window_seconds = {ONE_WINDOW}, per = \"address\""),
            );
            assert_ne!(limited, c, "the login rule is in plugins.toml");
            format!(
                "{}{limited}",
                redis_backend(&format!("redis://{REDIS}"), &prefix)
            )
        })
    };
    let first = TestHost::start(config(prefix.clone()));
    let second = TestHost::start(config(prefix));
    let login = |host: &TestHost, i: u32| {
        let url = host.url("/auth/login");
        async move {
            post_json(
                &url,
                &json!({"email": format!("guess{i}@example.com"), "password": "x"}),
            )
            .await
        }
    };
    for i in 1..=20 {
        assert_error(&login(&first, i).await, 401, "invalid_credentials");
    }
    // The second host has seen none of them, and still refuses the 21st.
    assert_error(&login(&second, 21).await, 429, "rate_limited");
    assert_error(&login(&first, 22).await, 429, "rate_limited");
}

/// The shop and the hostile component (cache granted), on Redis.
fn shop_and_hostile(backend: String) -> impl FnOnce(&Ports, &std::path::Path) -> String {
    shop_config(move |text| {
        format!(
            "{backend}{text}\n[components.hostile]\nwasm = \"{}\"\nroutes = [\"/hostile\"]\n\
             grants = [\"storage\", \"cache\", \"messaging\"]\nlimits = {{ timeout_ms = 2000 }}\n",
            component("hostile").display()
        )
    })
}

async fn hostile_cache(host: &TestHost, op: &str, key: &str, value: &str) -> Reply {
    post_json(
        &host.url("/hostile/cache"),
        &json!({"op": op, "key": key, "value": value}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_component_cannot_reach_other_components_keys_on_redis() {
    if !redis_answers().await {
        return;
    }
    let prefix = unique_prefix("hostile");
    let host = TestHost::start(shop_and_hostile(redis_backend(
        &format!("redis://{REDIS}"),
        &prefix,
    )));
    // Identity keeps a login counter per account in the cache; catalog its
    // product pages (the first page of everything is `products::20:0:`
    // before any product is written). Make both exist.
    let login = post_json(
        &host.url("/auth/login"),
        &json!({"email": "victim@example.com", "password": "x"}),
    )
    .await;
    assert_error(&login, 401, "invalid_credentials");
    assert_eq!(get(&host.url("/products")).await.status, 200);
    let catalog_page = format!("{prefix}catalog:products::20:0:");
    let before = redis_get(&catalog_page).await;
    assert!(
        before.as_deref().is_some_and(|p| p.contains("\"total\":0")),
        "{before:?}"
    );

    // Every spelling of catalog's key that would reach it without the
    // host's prefix, and the host's own rate-limit space.
    let targets = [
        "catalog:products::20:0:".to_owned(),
        "../catalog:products::20:0:".to_owned(),
        format!("{prefix}catalog:products::20:0:"),
        ":catalog:products::20:0:".to_owned(),
        "*".to_owned(),
        "agora/rate:identity:0:addr:127.0.0.1:0".to_owned(),
        format!("x\r\nDEL {prefix}catalog:products::20:0:\r\n"),
    ];
    for key in &targets {
        let read = hostile_cache(&host, "get", key, "").await;
        assert_eq!(read.status, 200, "{key:?}: {}", read.text());
        assert_eq!(read.json()["value"], Value::Null, "{key:?} was readable");
        let deleted = hostile_cache(&host, "delete", key, "").await;
        assert_eq!(
            deleted.json()["value"],
            json!(false),
            "{key:?} was deletable"
        );
        assert_eq!(hostile_cache(&host, "set", key, "pwned").await.status, 200);
        assert_eq!(
            hostile_cache(&host, "increment", &format!("{key}#n"), "")
                .await
                .status,
            200
        );
    }
    // What it wrote stayed in its own space; catalog's key is untouched.
    assert_eq!(redis_get(&catalog_page).await, before);
    assert_eq!(
        redis_get(&format!("{prefix}hostile:catalog:products::20:0:"))
            .await
            .as_deref(),
        Some("pwned")
    );
    assert_eq!(get(&host.url("/products")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_redis_unreachable_the_cache_fails_fast_and_catalog_serves_from_storage() {
    // Fill the catalog with the embedded cache, then restart on a Redis URL
    // where nothing listens.
    let mut host = TestHost::start(shop_config(|c| c));
    let admin_login = |host: &TestHost| {
        let url = host.url("/auth/login");
        async move {
            post_json(
                &url,
                &json!({"email": "admin@example.com", "password": "admin-password"}),
            )
            .await
        }
    };
    let registered = post_json(
        &host.url("/users"),
        &json!({"email": "admin@example.com", "password": "admin-password", "name": "A"}),
    )
    .await;
    assert_eq!(registered.status, 201, "{}", registered.text());
    let admin = admin_login(&host).await.json()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let bearer = format!("Bearer {admin}");
    let body = json!({"name": "Lamp", "description": "bright", "price_cents": 1200, "stock": 3});
    let created = request(
        "POST",
        &host.url("/products"),
        &[
            ("authorization", &bearer),
            ("content-type", "application/json"),
        ],
        body.to_string().into_bytes(),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let id = created.json()["id"].as_str().unwrap().to_owned();

    let plugins = std::fs::read_to_string(host.plugins_path()).unwrap();
    std::fs::write(
        host.plugins_path(),
        format!("{}{plugins}", redis_backend(&closed_port_url(), "t/")),
    )
    .unwrap();
    let started = Instant::now();
    host.restart();
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the start waited for Redis"
    );

    // A bound far above the configured 500 ms timeouts, so a busy machine
    // cannot fail it, while a request waiting for Redis would.
    let bound = Duration::from_secs(8);
    let timed = |what: &'static str, reply: Reply, started: Instant| {
        assert!(
            started.elapsed() < bound,
            "{what} took {:?}",
            started.elapsed()
        );
        reply
    };

    let t = Instant::now();
    let ready = timed("/readyz", get(&host.url("/readyz")).await, t);
    assert_eq!(ready.status, 503, "{}", ready.text());
    let cache_state = ready.json()["backends"]["cache"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(cache_state.contains("is not reachable"), "{cache_state}");
    assert!(!cache_state.contains("127.0.0.1"), "{cache_state}");

    // The catalog serves from storage, reads and writes alike.
    let t = Instant::now();
    let shown = timed(
        "a product",
        get(&host.url(&format!("/products/{id}"))).await,
        t,
    );
    assert_eq!(shown.status, 200, "{}", shown.text());
    assert_eq!(shown.json()["name"], "Lamp");
    let t = Instant::now();
    let listed = timed("the list", get(&host.url("/products")).await, t);
    assert_eq!(listed.status, 200, "{}", listed.text());
    assert_eq!(listed.json()["total"], 1);
    let t = Instant::now();
    let patched = request(
        "PATCH",
        &host.url(&format!("/products/{id}")),
        &[
            ("authorization", &bearer),
            ("content-type", "application/json"),
        ],
        json!({"stock": 5}).to_string().into_bytes(),
    )
    .await;
    let patched = timed("an update", patched, t);
    assert_eq!(patched.status, 200, "{}", patched.text());
    assert_eq!(
        get(&host.url(&format!("/products/{id}"))).await.json()["stock"],
        5
    );

    // Identity passes the cache's failure on: a clear 503, at once. The
    // login rate limit cannot count and lets requests through (logged):
    // more than its 20 attempts all reach identity.
    for _ in 0..22 {
        let t = Instant::now();
        let login = timed("a login", admin_login(&host).await, t);
        assert_error(&login, 503, "unavailable");
        assert!(login.text().contains("cache"), "{}", login.text());
    }
    let log = host.logged("rate limiting skipped").await;
    assert!(log.contains("rate limiting skipped"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_production_file_runs_the_shop_on_postgres_redis_and_kafka() {
    if !redis_answers().await || !service_answers("Kafka", "127.0.0.1:9092").await {
        return;
    }
    let prefix = unique_prefix("production");
    let namespace = unique_namespace();
    // The file as shipped, but for a prefix of this test's own (its default
    // is empty), so the test cannot meet another run's keys. The URL stays
    // `${REDIS_URL:-...}`: its default is used, as REDIS_URL is unset here.
    let (in_file, ns) = (prefix.clone(), namespace.clone());
    let host = TestHost::start(repo_config("plugins.production.toml", move |c| {
        let edited = c
            .replace("${REDIS_KEY_PREFIX:-}", &in_file)
            .replace("${KAFKA_TOPIC_PREFIX:-}", &format!("{ns}."))
            .replace("${AGORA_NAMESPACE:-agora}", &ns);
        assert_ne!(edited, c, "the file has a key prefix setting");
        assert!(c.contains("${REDIS_URL:-redis://127.0.0.1:6379}"));
        assert!(c.contains("${DATABASE_URL:-postgres://agora:agora@127.0.0.1:5432/shop}"));
        assert!(c.contains("${KAFKA_BROKERS:-127.0.0.1:9092}"));
        edited
    }));
    let ready = get(&host.url("/readyz")).await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json()["backends"]["cache"], "ok");
    assert_eq!(ready.json()["backends"]["storage"], "ok");
    assert_eq!(ready.json()["backends"]["messaging"], "ok");
    assert_eq!(ready.json()["components"].as_object().unwrap().len(), 6);
    assert_eq!(get(&host.url("/products")).await.json()["total"], 0);
    // Identity and catalog keep their entries in Redis, under the prefix.
    let login = post_json(
        &host.url("/auth/login"),
        &json!({"email": "someone@example.com", "password": "x"}),
    )
    .await;
    assert_error(&login, 401, "invalid_credentials");
    let page = format!("{prefix}catalog:products::20:0:");
    assert!(redis_get(&page).await.is_some(), "no {page} in redis");
    // Identity's table is in its PostgreSQL schema.
    let tables = std::process::Command::new("psql")
        .args([
            POSTGRES_URL,
            "-qtAc",
            &format!(
                "SELECT tablename FROM pg_tables WHERE schemaname = '{namespace}_identity' \
                 ORDER BY tablename"
            ),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&tables.stdout).trim(),
        "external_users\nusers"
    );
}
