//! Red-team reproductions against the issue-6 isolation guarantees. Each
//! test attacks a real host through the `hostile` component or a raw TCP
//! client. `explore_*` tests print what every probe got (run with
//! `--nocapture`); the other tests assert a break that was found.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// The shop of plugins.toml, plus the hostile component (storage, cache,
/// messaging; publishes only `hostile.events`).
fn shop_and_hostile() -> TestHost {
    TestHost::start(shop_config(|text| {
        format!(
            "{text}\n[components.hostile]\nwasm = \"{}\"\nroutes = [\"/hostile\"]\n\
             grants = [\"storage\", \"cache\", \"messaging\"]\n\
             publishes = [\"hostile.events\"]\nlimits = {{ timeout_ms = 2000 }}\n",
            component("hostile").display()
        )
    }))
}

async fn hostile(host: &TestHost, route: &str, body: Value) -> Reply {
    post_json(&host.url(&format!("/hostile/{route}")), &body).await
}

fn show(label: &str, reply: &Reply) {
    let text = reply.text();
    let text: String = text.chars().take(300).collect();
    println!("[{}] {label}\n      -> {text}", reply.status);
}

async fn sql(host: &TestHost, route: &str, sql: &str) -> Reply {
    let reply = hostile(host, route, json!({ "sql": sql })).await;
    show(&format!("{route}: {sql}"), &reply);
    reply
}

/// A raw HTTP/1.1 exchange; returns the status line and the whole reply.
fn raw(host: &TestHost, request: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", host.ports.public)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.lines().next().unwrap_or("").to_owned();
    (status, text)
}

fn peak_rss_kib(host: &TestHost) -> u64 {
    let pid = host_pid(host);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn host_pid(host: &TestHost) -> u32 {
    // The harness keeps the child private; find it by its data dir.
    let dir = host.data_dir();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd);
            if cmd.contains(&*dir.to_string_lossy()) && cmd.contains("up") {
                return pid;
            }
        }
    }
    panic!("host pid not found")
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "exploration: prints what each probe got; run with --nocapture"]
async fn explore_storage() {
    let host = shop_and_hostile();
    for s in [
        "SELECT 1; SELECT 2",
        "SELECT type, name, sql FROM sqlite_master",
        "SELECT * FROM sqlite_schema",
        "SELECT * FROM sqlite_temp_master",
        "SELECT * FROM sqlite_sequence",
        "SELECT * FROM sqlite_dbpage",
        "SELECT * FROM sqlite_stmt",
        "SELECT * FROM bytecode('SELECT * FROM _agora_outbox')",
        "SELECT * FROM tables_used('SELECT * FROM _agora_outbox')",
        "SELECT * FROM json_each('[1,2]')",
        "SELECT * FROM generate_series(1,3)",
        "SELECT m.name, p.name FROM sqlite_master m JOIN pragma_table_info(m.name) p",
        "SELECT * FROM pragma_index_list('_agora_outbox')",
        "SELECT * FROM pragma_index_info('sqlite_autoindex__agora_migrations_1')",
        "PRAGMA index_info(sqlite_autoindex__agora_migrations_1)",
        "PRAGMA foreign_key_check",
        "SELECT * FROM pragma_foreign_key_check",
        "PRAGMA main.table_info(kv)",
        "PRAGMA temp.table_info(kv)",
        "SELECT * FROM pragma_table_info('kv','main')",
        "SELECT * FROM \"main\".\"_AGORA_OUTBOX\"",
        "SELECT * FROM [_agora_outbox]",
        "SELECT sqlite_compileoption_get(0), sqlite_compileoption_get(1), sqlite_compileoption_get(2)",
        "SELECT fts3_tokenizer('simple')",
        "SELECT load_extension('/tmp/x')",
        "SELECT * FROM dbstat",
        "SELECT * FROM \"DbStat\"",
        "SELECT * FROM dbstat('main')",
        "SELECT count(*) FROM _agora_outbox_rejected",
        "SELECT * FROM nonexistent_table",
        "SELECT 1 FROM kv WHERE",
    ] {
        sql(&host, "query", s).await;
    }
    for s in [
        "CREATE TABLE squat (x TEXT)",
        "ALTER TABLE squat RENAME TO _agora_leases",
        "SELECT name FROM sqlite_master WHERE name LIKE '%agora%'",
        "CREATE TABLE seqtab (id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT)",
        "INSERT INTO seqtab (id, v) VALUES (9223372036854775807, 'x')",
        "UPDATE sqlite_sequence SET name = 'renamed' WHERE name = '_agora_outbox'",
        "DELETE FROM sqlite_sequence WHERE name = '_agora_outbox'",
        "UPDATE sqlite_sequence SET name = '_agora_outbox' WHERE name = 'seqtab'",
        "CREATE TABLE fkchild (x INTEGER REFERENCES _agora_outbox(seq))",
        "INSERT INTO fkchild VALUES (1)",
        "CREATE TABLE gen (a INTEGER, b AS (a * 2))",
        "CREATE TEMP VIEW tv AS SELECT * FROM main._agora_outbox",
        "SELECT * FROM tv",
        "CREATE TEMP TRIGGER tt AFTER INSERT ON main.kv BEGIN INSERT INTO _agora_outbox(event) VALUES ('{}'); END",
        "CREATE TEMP TABLE kvshadow (x)",
        "ANALYZE kv",
        "INSERT INTO sqlite_stat1 VALUES ('_agora_outbox', NULL, '1000000000')",
        "ANALYZE",
        "REINDEX",
        "DROP TABLE sqlite_sequence",
        "PRAGMA writable_schema",
        "PRAGMA user_version",
        "PRAGMA user_version = 7",
        "PRAGMA data_version",
        "INSERT INTO kv VALUES ('q', 'v') RETURNING key",
        "BEGIN",
        "END",
        "SAVEPOINT a",
        "RELEASE a",
        "VACUUM INTO '/tmp/x.db'",
        "ATTACH ':memory:' AS m",
        "CREATE VIRTUAL TABLE r USING rtree(id, a, b)",
        "CREATE VIRTUAL TABLE f USING fts5(x)",
    ] {
        sql(&host, "execute", s).await;
    }
    // Writes through the read path.
    sql(
        &host,
        "query",
        "INSERT INTO kv VALUES ('via-query', 'v') RETURNING key",
    )
    .await;
    sql(&host, "query", "CREATE TABLE via_query (x)").await;
    // Does the outbox still work after the sequence games?
    let reply = hostile(
        &host,
        "transaction",
        json!({ "statements": [], "publish": [{ "topic": "hostile.events", "key": "k", "payload": 1 }], "commit": true }),
    )
    .await;
    show("publish-in after sequence games", &reply);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let out = host.cli(&["events", "hostile.events"]);
    println!("events: {}", String::from_utf8_lossy(&out.stdout));
    let log = host.log();
    for line in log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
    {
        println!("LOG {line}");
    }
}

async fn kv_keys(host: &TestHost) -> Vec<String> {
    let reply = hostile(
        host,
        "query",
        json!({ "sql": "SELECT key FROM kv ORDER BY key" }),
    )
    .await;
    reply.json()["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[0].as_str().unwrap().to_owned())
        .collect()
}

/// A statement that fails with SQLITE_FULL inside a transaction makes
/// SQLite roll the whole transaction back on its own; the host's handle
/// does not notice, so the component's later statements and its outbox
/// event run in autocommit mode and are committed one by one, although
/// `commit()` then fails. The outbox's "commits with its transaction or
/// not at all" does not hold.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "open break: fails until the host notices SQLite's implicit rollback"]
async fn after_sqlite_rolls_back_a_transaction_its_later_writes_and_events_commit_alone() {
    let host = shop_and_hostile();
    for s in [
        "CREATE TABLE full_seq (id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT)",
        "INSERT INTO full_seq (id, v) VALUES (9223372036854775807, 'max')",
    ] {
        assert_eq!(sql(&host, "execute", s).await.status, 200);
    }
    let reply = hostile(
        &host,
        "transaction",
        json!({
            "statements": [
                { "sql": "INSERT INTO kv VALUES ('before', 'in the transaction')" },
                // SQLITE_FULL: no rowid left. SQLite rolls back the transaction.
                { "sql": "INSERT INTO full_seq (v) VALUES ('one more')" },
                { "sql": "INSERT INTO kv VALUES ('after', 'should never commit')" },
            ],
            "publish": [{ "topic": "hostile.events", "key": "k", "payload": "from a failed transaction" }],
            "commit": true,
            "ignore_errors": true,
        }),
    )
    .await;
    show("transaction", &reply);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(
        reply.json()["commit"].is_string(),
        "commit() was expected to fail: {}",
        reply.text()
    );
    // The transaction failed: none of it may be durable, no event may leave.
    // Today `after` is committed on its own and the event is relayed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let out = host.cli(&["events", "hostile.events"]);
    let events: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let keys = kv_keys(&host).await;
    assert!(
        keys.is_empty() && events.is_empty(),
        "a failed transaction left writes {keys:?} and events {events:?}"
    );
}

/// The AUTOINCREMENT counter of the host's outbox can be set through
/// `sqlite_sequence` by renaming rows (the authorizer lets `name` be
/// updated and rows be deleted), after which the component can no longer
/// publish in a transaction. The sandbox claims to refuse this.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "open break: sqlite_sequence rows can be renamed and deleted"]
async fn the_outbox_counter_can_be_set_through_sqlite_sequence() {
    let host = shop_and_hostile();
    for s in [
        "CREATE TABLE seqtab (id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT)",
        "INSERT INTO seqtab (id, v) VALUES (9223372036854775807, 'x')",
    ] {
        assert_eq!(sql(&host, "execute", s).await.status, 200);
    }
    // Today both are accepted, and every later publish-in fails with
    // "database or disk is full".
    for s in [
        "DELETE FROM sqlite_sequence WHERE name = '_agora_outbox'",
        "UPDATE sqlite_sequence SET name = '_agora_outbox' WHERE name = 'seqtab'",
    ] {
        let reply = sql(&host, "execute", s).await;
        assert_eq!(reply.status, 422, "not refused: {s}: {}", reply.text());
    }
    let reply = hostile(
        &host,
        "transaction",
        json!({ "statements": [], "publish": [{ "topic": "hostile.events", "key": "k", "payload": 1 }], "commit": true }),
    )
    .await;
    assert_eq!(
        reply.status,
        200,
        "the outbox no longer works: {}",
        reply.text()
    );
}

/// A component can rename its own table into the host's `_agora_` name
/// space (ALTER TABLE's authorizer call names only the old table), squatting
/// a name a later host version would create with IF NOT EXISTS.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "open break: ALTER TABLE ... RENAME TO _agora_* is accepted"]
async fn a_table_can_be_renamed_into_the_hosts_name_space() {
    let host = shop_and_hostile();
    assert_eq!(
        sql(&host, "execute", "CREATE TABLE squat (x TEXT)")
            .await
            .status,
        200
    );
    let reply = sql(
        &host,
        "execute",
        "ALTER TABLE squat RENAME TO _agora_leases",
    )
    .await;
    assert_eq!(reply.status, 422, "not refused: {}", reply.text());
    let reply = sql(
        &host,
        "query",
        "SELECT name FROM sqlite_master WHERE name LIKE '\\_agora\\_leases' ESCAPE '\\'",
    )
    .await;
    assert_eq!(reply.json()["rows"], json!([]), "the name was taken");
}

/// `query` runs on the read connections, but nothing makes them read-only:
/// writes and DDL go through it, outside the writer's lock, and beside the
/// instance's own open transaction (where `execute` is refused at once).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "open break: `query` writes through the read connections"]
async fn query_writes() {
    let host = shop_and_hostile();
    let reply = sql(
        &host,
        "query",
        "INSERT INTO kv VALUES ('via-query', 'v') RETURNING key",
    )
    .await;
    assert_eq!(reply.status, 422, "not refused: {}", reply.text());
    let reply = sql(&host, "query", "CREATE TEMP TABLE lingering (x)").await;
    assert_eq!(reply.status, 422, "not refused: {}", reply.text());
    assert!(kv_keys(&host).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "exploration: prints what each probe got; run with --nocapture"]
async fn explore_memory_and_cpu() {
    let host = shop_and_hostile();
    let base = peak_rss_kib(&host);
    println!("peak RSS at start: {} MiB", base / 1024);
    let reply = sql(&host, "query", "SELECT length(randomblob(900000000))").await;
    println!(
        "status {} peak RSS now: {} MiB",
        reply.status,
        peak_rss_kib(&host) / 1024
    );
    let reply = sql(&host, "query", "SELECT zeroblob(400000000)").await;
    println!(
        "status {} peak RSS now: {} MiB",
        reply.status,
        peak_rss_kib(&host) / 1024
    );
    let reply = sql(
        &host,
        "query",
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x, hex(randomblob(200)) FROM c",
    )
    .await;
    println!(
        "status {} peak RSS now: {} MiB",
        reply.status,
        peak_rss_kib(&host) / 1024
    );
    // CPU: several runaway queries at once; does the shop still answer?
    let mut bombs = Vec::new();
    for _ in 0..6 {
        let url = host.url("/hostile/query");
        bombs.push(tokio::spawn(async move {
            let started = std::time::Instant::now();
            let r = post_json(
                &url,
                &json!({ "sql": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c" }),
            )
            .await;
            (r.status, started.elapsed())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let products = get(&host.url("/products")).await;
    println!(
        "GET /products during the CPU bombs: {} in {:?}",
        products.status,
        started.elapsed()
    );
    for b in bombs {
        println!("bomb: {:?}", b.await.unwrap());
    }
    let started = std::time::Instant::now();
    let products = get(&host.url("/products")).await;
    println!(
        "GET /products after: {} in {:?}",
        products.status,
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "open break: component SQL allocates unbounded host memory"]
async fn sql_memory_is_bounded() {
    let host = shop_and_hostile();
    println!("peak RSS at start: {} MiB", peak_rss_kib(&host) / 1024);
    let mut bombs = Vec::new();
    for _ in 0..3 {
        let url = host.url("/hostile/query");
        bombs.push(tokio::spawn(async move {
            post_json(
                &url,
                &json!({ "sql": "SELECT length(zeroblob(500000000) || x'00')" }),
            )
            .await
            .status
        }));
    }
    for b in bombs {
        println!("bomb: {}", b.await.unwrap());
    }
    let peak = peak_rss_kib(&host) / 1024;
    println!("peak RSS after 3 concurrent 500 MB materialized zeroblobs: {peak} MiB");
    // Today about 2.6 GiB: SQL memory is bounded by nothing but
    // SQLITE_MAX_LENGTH (1 GB) per value, times max_concurrency (64).
    assert!(peak < 1024, "three requests made the host hold {peak} MiB");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "exploration: prints what each probe got; run with --nocapture"]
async fn explore_gateway_cache_messaging() {
    let host = shop_and_hostile();
    let get_req = |target: &str, extra: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n")
    };
    for (label, req) in [
        ("//cart", get_req("//cart", "")),
        ("/./cart", get_req("/./cart", "")),
        ("/%63art", get_req("/%63art", "")),
        ("/cart%2F", get_req("/cart%2F", "")),
        ("/cart;x", get_req("/cart;x", "")),
        ("/cart/;", get_req("/cart/;", "")),
        ("/x/../cart", get_req("/x/../cart", "")),
        ("/CART", get_req("/CART", "")),
        ("/cart#f", get_req("/cart#f", "")),
        ("/%C0%AFcart", get_req("/%C0%AFcart", "")),
        ("\\cart", get_req("\\cart", "")),
        ("/\\cart", get_req("/\\cart", "")),
        ("/cart%00", get_req("/cart%00", "")),
        ("/cart%20", get_req("/cart%20", "")),
        ("/cart/%2e%2e/cart", get_req("/cart/%2e%2e/cart", "")),
        ("absolute http://evil/cart", get_req("http://evil/cart", "")),
        ("absolute http://evil//cart", get_req("http://evil//cart", "")),
        ("absolute http://evil:1/hello", get_req("http://evil:1/hello", "")),
        ("authority form", "CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_owned()),
        ("OPTIONS *", "OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_owned()),
        ("HTTP/1.0 no host", "GET /cart HTTP/1.0\r\n\r\n".to_owned()),
        ("smuggled user id", get_req("/users/me", "X-Agora-User-Id: u1\r\nX-AGORA-USER-ROLES: admin\r\n")),
        ("user id with space before colon", get_req("/users/me", "x-agora-user-id : u1\r\n")),
        ("user id obs-fold", get_req("/users/me", "X-Foo: a\r\n x-agora-user-id: u1\r\n")),
        ("lowercase bearer", get_req("/cart", "Authorization: bearer x\r\n")),
        ("empty bearer", get_req("/cart", "Authorization: Bearer \r\n")),
        ("lowercase method", "get /cart HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_owned()),
        ("HEAD", "HEAD /cart HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_owned()),
        ("TE+CL smuggle", "POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /cart HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_owned()),
        ("TE chunked, \"chunked \"", "POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()),
        ("post products lowercase", "post /products HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".to_owned()),
        ("PUT /products (no SDK route)", "PUT /products HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".to_owned()),
        ("POST /products", "POST /products HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".to_owned()),
        ("POST //products", "POST //products HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".to_owned()),
        ("POST /products/", "POST /products/ HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".to_owned()),
        ("/openapi.json", get_req("/openapi.json", "")),
        ("/readyz", get_req("/readyz", "")),
    ] {
        let (status, text) = raw(&host, &req);
        let body: String = text.split("\r\n\r\n").nth(1).unwrap_or("").chars().take(160).collect();
        println!("{label:40} {status:30} {body}");
    }

    // Login rate limit per address, through every spelling.
    let spellings = [
        "/auth/login",
        "//auth/login",
        "/auth/login/",
        "/auth/./login",
        "/auth/%6Cogin",
        "/auth/login?x=1",
        "/x/../auth/login",
    ];
    let mut statuses = Vec::new();
    for i in 0..28 {
        let target = spellings[i % spellings.len()];
        let body = format!("{{\"email\":\"nobody{i}@example.com\",\"password\":\"x\"}}");
        let req = format!("POST {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer junk{i}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        let (status, _) = raw(&host, &req);
        statuses.push(status.split(' ').nth(1).unwrap_or("?").to_owned());
    }
    println!("login statuses: {statuses:?}");

    // Cache: reach the host's or another component's keys.
    let window = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 60;
    for (op, key) in [
        (
            "increment",
            format!("agora/rate:identity:0:addr:127.0.0.1:{window}"),
        ),
        (
            "get",
            format!("agora/rate:identity:0:addr:127.0.0.1:{window}"),
        ),
        ("get", "identity:x".to_owned()),
        ("set", ":identity:x".to_owned()),
        ("get", "".to_owned()),
        ("set", "a\u{0}b".to_owned()),
    ] {
        let reply = hostile(
            &host,
            "cache",
            json!({ "op": op, "key": key, "value": "v", "delta": -1000 }),
        )
        .await;
        show(&format!("cache {op} {key:?}"), &reply);
    }

    // Messaging: topics it may not publish.
    for topic in [
        "order.created",
        "payment.succeeded",
        "dead-letter.orders",
        "hostile.events\u{0}",
        "hostile.events ",
        "HOSTILE.EVENTS",
        "*",
        "hostile.*",
        "",
    ] {
        let reply = hostile(
            &host,
            "publish",
            json!({ "topic": topic, "key": "k", "payload": {} }),
        )
        .await;
        show(&format!("publish {topic:?}"), &reply);
        let reply = hostile(&host, "transaction", json!({ "statements": [], "publish": [{ "topic": topic, "key": "k", "payload": {} }], "commit": true })).await;
        show(&format!("publish-in {topic:?}"), &reply);
    }
}
