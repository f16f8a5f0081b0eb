//! A component for the host's tests: one route per capability, plus
//! routes that trap, loop and exhaust memory on purpose.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use agora_sdk::prelude::*;
use serde::Deserialize;
use serde_json::json;

const VERSION: &str = if cfg!(feature = "v2") { "v2" } else { "v1" };

struct Probe;

impl Service for Probe {
    fn router() -> Router {
        Router::new()
            .get("/probe/version", version)
            .get("/probe/slow", slow)
            .put("/probe/kv/{key}", kv_put)
            .get("/probe/kv/{key}", kv_get)
            .put("/probe/cache/{key}", cache_put)
            .get("/probe/cache/{key}", cache_get)
            .get("/probe/counted/{key}", counted)
            .post("/probe/invalidate", invalidate)
            .post("/probe/publish", publish)
            .post("/probe/publish-together", publish_together)
            .get("/probe/received", received)
            .get("/probe/config/{key}", setting)
            .get("/probe/env/{name}", variable)
            .post("/probe/token", token)
            .post("/probe/token-as", token_as)
            .get("/probe/whoami", whoami)
            .get("/probe/trap", |_| panic!("the probe was asked to trap"))
            .get("/probe/loop", spin)
            .get("/probe/oom", exhaust_memory)
            .get("/probe/fetch", fetch)
            .post("/probe/write-beside-transaction", write_beside_transaction)
            .get("/probe/visits", visits)
            .post("/probe/keep-transaction", keep_transaction)
    }

    fn migrations() -> Vec<Migration> {
        let mut all = vec![Migration::new(
            "0001_init",
            include_str!("../migrations/0001_init.sql"),
        )];
        if cfg!(feature = "v2") {
            // A good migration of its own: a reload that carries v2 and is
            // refused must not leave it behind.
            all.push(Migration::new(
                "0002_v2_notes",
                "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL);",
            ));
        }
        if cfg!(feature = "bad-migration") {
            all.push(Migration::new(
                "0002_broken",
                "CREATE TABLE kv (this is not sql",
            ));
        }
        if cfg!(feature = "half-migration") {
            // Good on its own, and fatal to v1 if it stayed without the rest.
            all.push(Migration::new(
                "0002_replace_kv",
                "ALTER TABLE kv RENAME TO kv_v1;
                 CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, version BIGINT NOT NULL);",
            ));
            all.push(Migration::new(
                "0003_broken",
                "CREATE TABLE broken (this is not sql",
            ));
        }
        all
    }

    fn on_message(message: messaging::Message) -> Result<(), String> {
        let payload = String::from_utf8_lossy(&message.payload).into_owned();
        if payload.contains("fail-always") {
            return Err("the payload asks to fail".into());
        }
        if payload.contains("fail-once") && message.attempt == 1 {
            return Err("the first attempt fails".into());
        }
        if let Some(ms) = handling_ms(&payload) {
            std::thread::sleep(Duration::from_millis(ms));
        }
        // A bug that v2 fixes: its dead letters can be replayed.
        if payload.contains("fail-before-v2") && VERSION == "v1" {
            return Err("v1 cannot handle this payload".into());
        }
        storage::execute(
            "INSERT INTO received (id, topic, payload, attempt) VALUES ($1, $2, $3, $4)
             ON CONFLICT (id) DO NOTHING",
            params![message.id, message.topic, payload, message.attempt],
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    }
}

/// How long a payload `slow-<n>ms` asks its handler to take.
fn handling_ms(payload: &str) -> Option<u64> {
    let rest = &payload[payload.find("slow-")? + "slow-".len()..];
    rest[..rest.find("ms")?].parse().ok()
}

fn version(_: &Request) -> Result<Response> {
    Ok(Response::ok(&json!({ "version": VERSION })))
}

fn slow(req: &Request) -> Result<Response> {
    let ms = req.query_as::<u64>("ms")?.unwrap_or(500);
    std::thread::sleep(Duration::from_millis(ms));
    version(req)
}

/// `?after_ms=` waits before writing: a request its client may leave.
fn kv_put(req: &Request) -> Result<Response> {
    let value = String::from_utf8(req.body.clone())
        .map_err(|_| Error::bad_request("the value must be UTF-8"))?;
    if let Some(ms) = req.query_as::<u64>("after_ms")? {
        std::thread::sleep(Duration::from_millis(ms));
    }
    storage::execute(
        "INSERT INTO kv (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![req.param("key"), value],
    )?;
    Ok(Response::no_content())
}

fn kv_get(req: &Request) -> Result<Response> {
    let rows = storage::query(
        "SELECT value FROM kv WHERE key = $1",
        params![req.param("key")],
    )?;
    let row = rows
        .first()
        .ok_or_else(|| Error::not_found("no such key"))?;
    Ok(Response::ok(
        &json!({ "value": row.get::<String>("value")? }),
    ))
}

fn cache_put(req: &Request) -> Result<Response> {
    let ttl = req.query_as::<u64>("ttl_ms")?.map(Duration::from_millis);
    cache::set(req.param("key"), &req.body, ttl)?;
    Ok(Response::no_content())
}

fn cache_get(req: &Request) -> Result<Response> {
    match cache::get(req.param("key"))? {
        Some(value) => Ok(Response::ok(
            &json!({ "value": String::from_utf8_lossy(&value) }),
        )),
        None => Err(Error::not_found("not cached")),
    }
}

/// Counts its calls per key (so a test sees whether the component ran),
/// answering with the query's `cache-control`, `set-cookie` and `vary`
/// headers and the signed-in user, if any.
fn counted(req: &Request) -> Result<Response> {
    let calls = cache::increment(&format!("calls:{}", req.param("key")), 1, None)?;
    let user = req.user().map(|u| u.id);
    let mut response = Response::ok(&json!({ "calls": calls, "user": user }));
    for name in ["cache-control", "set-cookie", "vary"] {
        if let Some(value) = req.query(name) {
            response = response.with_header(name, value);
        }
    }
    Ok(response)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Invalidation {
    prefix: String,
}

fn invalidate(req: &Request) -> Result<Response> {
    let body: Invalidation = req.json()?;
    let dropped = cache::invalidate_responses(&body.prefix)?;
    Ok(Response::ok(&json!({ "dropped": dropped })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishRequest {
    topic: String,
    key: Option<String>,
    payload: serde_json::Value,
    /// Publish inside a transaction and commit it (true), or drop it (false).
    /// Absent: publish directly, outside any transaction.
    commit: Option<bool>,
}

fn publish(req: &Request) -> Result<Response> {
    let body: PublishRequest = req.json()?;
    let key = body.key.as_deref();
    let id = match body.commit {
        None => messaging::publish(&body.topic, key, &body.payload)?,
        Some(commit) => {
            let tx = storage::begin()?;
            // A row written beside the event: both commit or neither does.
            tx.execute(
                "INSERT INTO kv (key, value) VALUES ($1, $2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![format!("published-{}", body.payload), "x"],
            )?;
            let id = tx.publish(&body.topic, key, &body.payload)?;
            if commit {
                tx.commit()?;
            }
            id
        }
    };
    Ok(Response::created(&json!({ "id": id })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Event {
    topic: String,
    key: Option<String>,
    payload: serde_json::Value,
}

/// Publishes events in one transaction: they reach the log together.
fn publish_together(req: &Request) -> Result<Response> {
    let events: Vec<Event> = req.json()?;
    let tx = storage::begin()?;
    for event in &events {
        tx.publish(&event.topic, event.key.as_deref(), &event.payload)?;
    }
    tx.commit()?;
    Ok(Response::created(&json!({ "published": events.len() })))
}

fn received(_: &Request) -> Result<Response> {
    let rows = storage::query(
        "SELECT id, topic, payload, attempt FROM received ORDER BY payload",
        &[],
    )?;
    let items = rows
        .iter()
        .map(|r| {
            Ok(json!({
                "id": r.get::<String>("id")?,
                "topic": r.get::<String>("topic")?,
                "payload": r.get::<String>("payload")?,
                "attempt": r.get::<i64>("attempt")?,
            }))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Response::ok(&items))
}

fn setting(req: &Request) -> Result<Response> {
    let value = config::get(req.param("key")).ok_or_else(|| Error::not_found("no such setting"))?;
    Ok(Response::ok(&json!({ "value": value })))
}

fn variable(req: &Request) -> Result<Response> {
    let value =
        std::env::var(req.param("name")).map_err(|_| Error::not_found("no such variable"))?;
    Ok(Response::ok(&json!({ "value": value })))
}

fn token(req: &Request) -> Result<Response> {
    #[derive(Deserialize)]
    struct Subject {
        subject: String,
    }
    let body: Subject = req.json()?;
    let issued = tokens::issue(&body.subject, &["tester".to_owned()], None)?;
    Ok(Response::created(
        &json!({ "token": issued.token, "expires_in": issued.expires_in }),
    ))
}

/// Asks the host for a token with the roles and lifetime the caller names,
/// whether plugins.toml lets the probe issue them or not.
fn token_as(req: &Request) -> Result<Response> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Wanted {
        subject: String,
        roles: Vec<String>,
        ttl_seconds: Option<u64>,
    }
    let body: Wanted = req.json()?;
    let issued = tokens::issue(&body.subject, &body.roles, body.ttl_seconds)?;
    Ok(Response::created(
        &json!({ "token": issued.token, "expires_in": issued.expires_in }),
    ))
}

fn whoami(req: &Request) -> Result<Response> {
    let token = req
        .header("authorization")
        .and_then(|h| h.strip_prefix("Bearer "))
        .ok_or_else(|| Error::unauthorized("a bearer token is required"))?;
    let claims = tokens::verify(token)?;
    Ok(Response::ok(
        &json!({ "subject": claims.subject, "roles": claims.roles }),
    ))
}

/// Calls `url` through the host's outbound HTTP and reports what came back.
fn fetch(req: &Request) -> Result<Response> {
    let url = req
        .query("url")
        .ok_or_else(|| Error::bad_request("`url` is required"))?;
    let response = outbound::send("GET", url, &[], &[])?;
    Ok(Response::ok(&json!({
        "status": response.status,
        "body": String::from_utf8_lossy(&response.body),
    })))
}

/// Writes outside its own open transaction, which must fail, not hang.
fn write_beside_transaction(_: &Request) -> Result<Response> {
    let tx = storage::begin()?;
    tx.execute(
        "INSERT INTO kv (key, value) VALUES ('inside', 'x') ON CONFLICT (key) DO NOTHING",
        &[],
    )?;
    storage::execute("INSERT INTO kv (key, value) VALUES ('beside', 'x')", &[])?;
    tx.commit()?;
    Ok(Response::no_content())
}

/// Requests this instance has served: 1 on a fresh instance, more on a
/// reused one (`limits.reuse`).
fn visits(_: &Request) -> Result<Response> {
    static VISITS: AtomicU32 = AtomicU32::new(0);
    let visits = VISITS.fetch_add(1, Ordering::Relaxed) + 1;
    Ok(Response::ok(&json!({ "visits": visits })))
}

/// Writes in a transaction and keeps it open past the request, as a
/// component that hoped to finish it in the next one would.
fn keep_transaction(_: &Request) -> Result<Response> {
    static KEPT: Mutex<Option<storage::Transaction>> = Mutex::new(None);
    let tx = storage::begin()?;
    tx.execute("INSERT INTO kv (key, value) VALUES ('kept', 'x')", &[])?;
    *KEPT.lock().unwrap() = Some(tx);
    Ok(Response::no_content())
}

fn spin(_: &Request) -> Result<Response> {
    let mut n: u64 = 0;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

fn exhaust_memory(_: &Request) -> Result<Response> {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        hoard.push(vec![1u8; 1024 * 1024]);
        std::hint::black_box(&hoard);
    }
}

agora_sdk::service!(Probe);
