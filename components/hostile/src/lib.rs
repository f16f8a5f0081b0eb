//! A component for the host's sandbox tests: it runs whatever SQL and
//! publishes whatever events the test asks for, as an attacker's component
//! would. Granted only `storage`, `cache` and `messaging` in the tests.
//!
//! A storage or messaging error comes back as 422 with the host's message,
//! so a test can check what was refused and that no host path shows.

use agora_sdk::messaging;
use agora_sdk::prelude::*;
use agora_sdk::storage::{self, Rows, Transaction};
use serde::Deserialize;
use serde_json::{json, Value as Json};

struct Hostile;

impl Service for Hostile {
    fn router() -> Router {
        Router::new()
            .post("/hostile/execute", execute)
            .post("/hostile/query", query)
            .post("/hostile/transaction", transaction)
            .post("/hostile/publish", publish)
            .post("/hostile/alternate", alternate)
            .post("/hostile/stall-in-transaction", stall_in_transaction)
            .post("/hostile/cache", cache_call)
    }

    fn migrations() -> Vec<Migration> {
        vec![Migration::new(
            "0001_init",
            include_str!("../migrations/0001_init.sql"),
        )]
    }
}

/// The host's answer to a refused or failed call, passed on as is.
fn refused(e: Error) -> Error {
    let message = e
        .message
        .strip_prefix("storage: ")
        .or_else(|| e.message.strip_prefix("messaging: "))
        .or_else(|| e.message.strip_prefix("cache: "))
        .unwrap_or(&e.message)
        .to_owned();
    Error::new(422, "refused", message)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Statement {
    sql: String,
    #[serde(default)]
    params: Vec<Json>,
}

fn params(values: &[Json]) -> Result<Vec<Value>> {
    values
        .iter()
        .map(|v| match v {
            Json::Null => Ok(Value::Null),
            Json::Bool(b) => Ok(Value::Boolean(*b)),
            Json::Number(n) => n
                .as_i64()
                .map(Value::Integer)
                .or_else(|| n.as_f64().map(Value::Real))
                .ok_or_else(|| Error::bad_request("a number out of range")),
            Json::String(s) => Ok(Value::Text(s.clone())),
            other => Err(Error::bad_request(format!("{other} is not a SQL value"))),
        })
        .collect()
}

fn rows_json(rows: &Rows) -> Json {
    let cell = |v: &Value| match v {
        Value::Null => Json::Null,
        Value::Boolean(b) => json!(b),
        Value::Integer(i) => json!(i),
        Value::Real(f) => json!(f),
        Value::Text(s) => json!(s),
        Value::Blob(b) => json!(b),
    };
    json!({
        "columns": rows.columns,
        "rows": rows.rows.iter().map(|r| r.iter().map(cell).collect::<Vec<_>>()).collect::<Vec<_>>(),
    })
}

fn execute(req: &Request) -> Result<Response> {
    let s: Statement = req.json()?;
    let changed = storage::execute(&s.sql, &params(&s.params)?).map_err(refused)?;
    Ok(Response::ok(&json!({ "changed": changed })))
}

fn query(req: &Request) -> Result<Response> {
    let s: Statement = req.json()?;
    let rows = storage::query(&s.sql, &params(&s.params)?).map_err(refused)?;
    Ok(Response::ok(&rows_json(&rows)))
}

/// One cache call with any key the test names (another component's, the
/// host's, protocol bytes): `{"op": "get" | "set" | "delete" | "increment",
/// "key": ..., "value": ...}`. Answers `{"value": ...}` (text, or null).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheCall {
    op: String,
    key: String,
    #[serde(default)]
    value: String,
}

fn cache_call(req: &Request) -> Result<Response> {
    let call: CacheCall = req.json()?;
    let key = call.key.as_str();
    let value = match call.op.as_str() {
        "get" => cache::get(key)
            .map_err(refused)?
            .map(|v| json!(String::from_utf8_lossy(&v))),
        "set" => {
            cache::set(key, call.value.as_bytes(), None).map_err(refused)?;
            None
        }
        "delete" => Some(json!(cache::delete(key).map_err(refused)?)),
        "increment" => Some(json!(cache::increment(key, 1, None).map_err(refused)?)),
        other => return Err(Error::bad_request(format!("no cache op `{other}`"))),
    };
    Ok(Response::ok(&json!({ "value": value })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Event {
    topic: String,
    key: Option<String>,
    payload: Json,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransactionRequest {
    /// Run in order inside one `begin()`; the first error ends the request
    /// and drops (rolls back) the transaction.
    statements: Vec<Statement>,
    #[serde(default)]
    publish: Vec<Event>,
    commit: bool,
    /// Carry on past a failed statement, as a component that logs and
    /// continues would; each statement's outcome is reported.
    #[serde(default)]
    ignore_errors: bool,
}

fn transaction(req: &Request) -> Result<Response> {
    let body: TransactionRequest = req.json()?;
    let tx = storage::begin().map_err(refused)?;
    let mut changed = Vec::new();
    for s in &body.statements {
        match tx.execute(&s.sql, &params(&s.params)?) {
            Ok(n) => changed.push(json!(n)),
            Err(e) if body.ignore_errors => changed.push(json!(e.message)),
            Err(e) => return Err(refused(e)),
        }
    }
    for e in &body.publish {
        match tx.publish(&e.topic, e.key.as_deref(), &e.payload) {
            Ok(_) => changed.push(json!("published")),
            Err(e) if body.ignore_errors => changed.push(json!(e.message)),
            Err(e) => return Err(refused(e)),
        }
    }
    if body.commit {
        if let Err(e) = tx.commit() {
            if !body.ignore_errors {
                return Err(refused(e));
            }
            return Ok(Response::ok(
                &json!({ "changed": changed, "commit": e.message }),
            ));
        }
    }
    Ok(Response::ok(&json!({ "changed": changed })))
}

fn publish(req: &Request) -> Result<Response> {
    let e: Event = req.json()?;
    let id = messaging::publish(&e.topic, e.key.as_deref(), &e.payload).map_err(refused)?;
    Ok(Response::created(&json!({ "id": id })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Alternate {
    topic: String,
    key: String,
    count: u32,
}

/// Publishes `count` events of one key, numbered from 0: even ones inside a
/// committed transaction (the outbox), odd ones directly. Subscribers must
/// see them in this order.
fn alternate(req: &Request) -> Result<Response> {
    let body: Alternate = req.json()?;
    let key = Some(body.key.as_str());
    for n in 0..body.count {
        if n % 2 == 0 {
            let tx: Transaction = storage::begin().map_err(refused)?;
            tx.publish(&body.topic, key, &n).map_err(refused)?;
            tx.commit().map_err(refused)?;
        } else {
            messaging::publish(&body.topic, key, &n).map_err(refused)?;
        }
    }
    Ok(Response::no_content())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Stall {
    key: String,
    /// A statement that runs past the request's deadline.
    slow_sql: String,
}

/// Writes inside a transaction, then overruns its deadline inside it: in a
/// slow statement, or spinning if the statement returns first.
fn stall_in_transaction(req: &Request) -> Result<Response> {
    let body: Stall = req.json()?;
    let tx = storage::begin().map_err(refused)?;
    tx.execute(
        "INSERT INTO kv (key, value) VALUES ($1, 'abandoned')",
        agora_sdk::params![body.key.as_str()],
    )
    .map_err(refused)?;
    let _ = tx.query(&body.slow_sql, &[]);
    let mut n: u64 = 0;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

agora_sdk::service!(Hostile);
