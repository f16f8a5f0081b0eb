//! Checkouts per second through the whole saga, on each backend set: the
//! shop of plugins.toml served by `agora up`, buyers placing orders back to
//! back on keep-alive connections for the run's duration, then the time
//! until every acknowledged order is paid (orders → payments → orders, over
//! the outbox and the broker).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use crate::{free_port, root, Server};

const POSTGRES_URL: &str = "postgres://agora:agora@127.0.0.1:5432/shop";

/// Both backend sets, one after the other.
pub async fn checkouts(scratch: &Path, duration: Duration, connections: usize) -> Result<()> {
    println!(
        "\n## Checkout: POST /orders, then the saga until paid, {connections} buyers, {}s",
        duration.as_secs()
    );
    run(
        "embedded (SQLite, memory cache)",
        "",
        scratch,
        duration,
        connections,
    )
    .await?;
    let namespace = format!("bench{}", std::process::id());
    if tokio::net::TcpStream::connect("127.0.0.1:5432")
        .await
        .is_err()
        || tokio::net::TcpStream::connect("127.0.0.1:6379")
            .await
            .is_err()
    {
        println!("postgres + redis: skipped (run scripts/services first)");
        return Ok(());
    }
    let backends = format!(
        "\n[backends.storage]\nkind = \"postgres\"\nurl = \"{POSTGRES_URL}\"\nnamespace = \"{namespace}\"\n\
         \n[backends.cache]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\nkey_prefix = \"{namespace}/\"\n"
    );
    let result = run(
        "postgres + redis",
        &backends,
        scratch,
        duration,
        connections,
    )
    .await;
    drop_namespace(&namespace);
    result
}

async fn run(
    label: &str,
    backends: &str,
    scratch: &Path,
    duration: Duration,
    connections: usize,
) -> Result<()> {
    let dir = scratch.join(format!(
        "checkout-{}",
        label.split(' ').next().unwrap_or("x")
    ));
    std::fs::create_dir_all(&dir)?;
    let text = std::fs::read_to_string(root().join("plugins.toml"))?;
    let components = root().join("target/wasm32-wasip2/component");
    let config =
        text.replace(
            "\"target/wasm32-wasip2/component/",
            &format!("\"{}/", components.display()),
        )
        .replace("\"docs/", &format!("\"{}/docs/", root().display()))
        // The bench logs every buyer in from one address.
        .replace(
            "requests = 20, window_seconds = 60",
            "requests = 100000, window_seconds = 60",
        ) + backends;
    let config_path = dir.join("plugins.toml");
    std::fs::write(&config_path, config)?;
    let (public, admin) = (free_port(), free_port());
    let addr: SocketAddr = format!("127.0.0.1:{public}").parse()?;
    let _server = Server(
        Command::new(root().join("target/release/agora"))
            .arg("up")
            .arg("--config")
            .arg(&config_path)
            .args(["--listen", &addr.to_string()])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .arg("--data")
            .arg(dir.join("data"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let started = Instant::now();
    while !matches!(call(addr, "GET", "/readyz", None, None).await, Ok((200, _))) {
        if started.elapsed() > Duration::from_secs(120) {
            bail!("{label}: agora did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let admin_token = sign_up(addr, "admin@example.com", "admin-password").await?;
    let product = json!({"name": "Lamp", "description": "bench", "price_cents": 1000, "stock": 1_000_000_000});
    let (status, body) = call(addr, "POST", "/products", Some(&admin_token), Some(product)).await?;
    if status != 201 {
        bail!("{label}: creating the product: {status} {body}");
    }
    let product = body["id"].as_str().context("product id")?.to_owned();
    let mut buyers = Vec::new();
    for i in 0..connections {
        buyers.push(
            sign_up(
                addr,
                &format!("buyer{i}@example.com"),
                "correct horse battery",
            )
            .await?,
        );
    }

    // Load: each buyer on its own keep-alive connection.
    let placed = Arc::new(Mutex::new(Vec::<(String, usize)>::new()));
    let latencies = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let failures = Arc::new(Mutex::new(HashMap::<u16, u64>::new()));
    let end = Instant::now() + duration;
    let tasks: Vec<_> = buyers
        .iter()
        .enumerate()
        .map(|(buyer, token)| {
            let (token, product) = (token.clone(), product.clone());
            let (placed, latencies, failures) =
                (placed.clone(), latencies.clone(), failures.clone());
            tokio::spawn(async move {
                let stream = tokio::net::TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(conn);
                let order = serde_json::to_vec(
                    &json!({"items": [{"product_id": product, "quantity": 1}]}),
                )?;
                while Instant::now() < end {
                    let request = http::Request::post("/orders")
                        .header("host", "bench")
                        .header("authorization", format!("Bearer {token}"))
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(order.clone())))?;
                    let sent = Instant::now();
                    sender.ready().await?;
                    let response = sender.send_request(request).await?;
                    let status = response.status().as_u16();
                    let body = response.into_body().collect().await?.to_bytes();
                    let took = sent.elapsed();
                    if status == 201 {
                        let body: Value = serde_json::from_slice(&body)?;
                        let id = body["id"].as_str().context("order id")?.to_owned();
                        placed.lock().unwrap().push((id, buyer));
                        latencies.lock().unwrap().push(took);
                    } else {
                        *failures.lock().unwrap().entry(status).or_default() += 1;
                    }
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let load_ended = Instant::now();
    let placed = std::mem::take(&mut *placed.lock().unwrap());
    let mut latencies = std::mem::take(&mut *latencies.lock().unwrap());
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "{label:<34} {:>6.0} orders/s  (p50 {:.1} ms, p99 {:.1} ms, {} placed, failures {:?})",
        placed.len() as f64 / duration.as_secs_f64(),
        pct(0.50),
        pct(0.99),
        placed.len(),
        failures.lock().unwrap()
    );

    // The saga: every acknowledged order must become paid.
    let mut unpaid = placed;
    let deadline = load_ended + Duration::from_secs(120);
    while !unpaid.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for (id, buyer) in unpaid {
            let (_, body) = call(
                addr,
                "GET",
                &format!("/orders/{id}"),
                Some(&buyers[buyer]),
                None,
            )
            .await?;
            if body["status"] != "paid" {
                still.push((id, buyer));
            }
        }
        unpaid = still;
        if !unpaid.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    if unpaid.is_empty() {
        println!(
            "{:<34} every order paid {:.2} s after the load ended",
            "",
            load_ended.elapsed().as_secs_f64()
        );
    } else {
        println!(
            "{:<34} {} orders still unpaid 120 s after the load",
            "",
            unpaid.len()
        );
    }
    Ok(())
}

/// Registers a user and logs in; returns the token.
async fn sign_up(addr: SocketAddr, email: &str, password: &str) -> Result<String> {
    let user = json!({"email": email, "name": "Bench", "password": password});
    let (status, body) = call(addr, "POST", "/users", None, Some(user)).await?;
    if status != 201 {
        bail!("registering {email}: {status} {body}");
    }
    let login = json!({"email": email, "password": password});
    let (status, body) = call(addr, "POST", "/auth/login", None, Some(login)).await?;
    if status != 200 {
        bail!("logging {email} in: {status} {body}");
    }
    Ok(body["token"].as_str().context("token")?.to_owned())
}

/// One request on a connection of its own; the body as JSON (null if none).
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Result<(u16, Value)> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let response = sender
        .send_request(request.body(Full::new(Bytes::from(body)))?)
        .await?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

/// Drops the bench's PostgreSQL roles and schemas, through psql (best effort).
fn drop_namespace(namespace: &str) {
    let _ = Command::new("psql")
        .args([
            POSTGRES_URL,
            "-qtAc",
            &agora_host::storage::PostgresBackend::drop_namespace_sql(namespace),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}
