//! Agora's benchmark. Prints numbers; asserts nothing.
//!
//! 1. Per-request instantiation of a hello-world component, in process.
//! 2. The same component served over HTTP by a native hyper handler
//!    returning the same bytes, by `agora up` with fresh instances and with
//!    `limits.reuse`, and by `wasmtime serve` (if installed), under the same
//!    load, taking turns over two rounds, with ratios per round. Each is
//!    loaded twice: by the in-process client below and by wrk (if
//!    installed), an outside load generator, because the two disagree and
//!    neither alone is the truth.
//! 3. A hot swap of an already compiled version through the admin API.
//! 4. Storage calls per second, one caller: on the embedded backend at
//!    each `durability` setting (what an fsync per commit costs) and on
//!    PostgreSQL (what its round trips cost).
//! 5. The shop's start from a warm compilation cache, and the host's
//!    memory when idle with its five services (`checkout.rs`).
//! 6. `GET /products/{id}` and `GET /products` with and without the
//!    gateway's response cache (`products.rs`), to set beside hello world.
//! 7. Checkouts per second through the shop, and the time until the saga
//!    has paid every order, on the embedded backends and on PostgreSQL +
//!    Redis (+ Kafka, one host and two) (`checkout.rs`).
//!
//! Usage: `agora-bench [seconds per HTTP run] [connections]` (default 10, 32);
//! `agora-bench http [seconds] [connections]` runs section 2 alone,
//! `agora-bench storage` section 4, `agora-bench start` section 5,
//! `agora-bench products [seconds] [connections]` section 6, and
//! `agora-bench checkout [seconds] [buyers]` section 7.

mod checkout;
mod products;

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_host::bindings::storage::Value;
use agora_host::plugins::{Durability, Plugins};
use agora_host::runtime::Runtime;
use agora_host::storage::{
    Migration, PostgresBackend, PostgresConfig, SqliteBackend, SqliteSettings, StorageBackend,
};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;

const BODY: &[u8] = b"Hello, world!\n";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn component(name: &str) -> PathBuf {
    root()
        .join("target/test-components")
        .join(format!("{name}.wasm"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("native-server") {
        return native_server(args[2].parse()?);
    }
    let only = args
        .get(1)
        .map(String::as_str)
        .filter(|a| matches!(*a, "checkout" | "http" | "products" | "start" | "storage"))
        .map(str::to_owned);
    let args = &args[usize::from(only.is_some())..];
    let number = |at: usize, what: &str, default: u64| -> Result<u64> {
        args.get(at).map_or(Ok(default), |s| {
            s.parse().with_context(|| {
                format!(
                    "{what} must be a whole number, not `{s}`\n\
                     usage: agora-bench [checkout|http|products|start|storage] [seconds] [connections]"
                )
            })
        })
    };
    let seconds = number(1, "seconds", 10)?;
    let connections = number(2, "connections", 32)? as usize;
    let rt = tokio::runtime::Runtime::new()?;
    let duration = Duration::from_secs(seconds);
    if let Some(only) = only {
        let scratch = std::env::temp_dir().join(format!("agora-bench-{}", std::process::id()));
        let result = rt.block_on(async {
            match only.as_str() {
                "checkout" => checkout::checkouts(&scratch, duration, connections).await,
                "start" => checkout::ready_and_idle_memory(&scratch.join("ready")).await,
                "storage" => storage(&scratch.join("storage")).await,
                "http" => http(&hello_config(&scratch)?, &scratch, duration, connections).await,
                _ => products::products(&scratch, duration, connections).await,
            }
        });
        let _ = std::fs::remove_dir_all(&scratch);
        return result;
    }
    rt.block_on(run(duration, connections))
}

async fn run(duration: Duration, connections: usize) -> Result<()> {
    let scratch = std::env::temp_dir().join(format!("agora-bench-{}", std::process::id()));
    let config = hello_config(&scratch)?;

    instantiation(&config, &scratch.join("in-process")).await?;

    http(&config, &scratch, duration, connections).await?;
    swap(&config, &scratch.join("swap")).await?;
    storage(&scratch.join("storage")).await?;
    checkout::ready_and_idle_memory(&scratch.join("ready")).await?;
    products::products(&scratch, duration, connections).await?;
    checkout::checkouts(&scratch, duration, connections).await?;
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

/// The plugins.toml of the hello-world runs: hello world on `/`, and the
/// probe with every grant, which the swap run redeploys.
fn hello_config(scratch: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(scratch)?;
    let config = scratch.join("plugins.toml");
    std::fs::write(
        &config,
        format!(
            "[components.hello]\nwasm = \"{}\"\nroutes = [\"/\"]\n\n\
             [components.probe]\nwasm = \"{}\"\nroutes = [\"/probe\"]\n\
             grants = [\"storage\", \"cache\", \"messaging\", \"tokens\", \"tokens-issue\", \"config\", \"http-out\"]\n",
            component("hello").display(),
            component("probe").display()
        ),
    )?;
    Ok(config)
}

/// Rounds of the HTTP comparison: the servers take turns, so a machine
/// that slows down during the run slows them all.
const HTTP_ROUNDS: usize = 2;

/// Hello world served by native hyper, `agora up` with fresh instances and
/// with reuse, and `wasmtime serve`, in turns, with the ratios per round.
async fn http(config: &Path, scratch: &Path, duration: Duration, connections: usize) -> Result<()> {
    println!(
        "\n## HTTP: GET / on a hello-world component, {connections} connections, {}s each, {HTTP_ROUNDS} rounds",
        duration.as_secs()
    );
    // The same component with `limits.reuse`: an instance serves up to
    // 10,000 requests.
    let reusing = scratch.join("plugins-reuse.toml");
    std::fs::write(
        &reusing,
        std::fs::read_to_string(config)?.replace(
            "routes = [\"/\"]\n",
            "routes = [\"/\"]\nlimits = { reuse = 10000 }\n",
        ),
    )?;
    let admin = free_port();
    let agora = |config: PathBuf, data: PathBuf| {
        move |addr: SocketAddr| {
            let mut cmd = Command::new(root().join("target/release/agora"));
            cmd.arg("up")
                .arg("--config")
                .arg(&config)
                .args(["--listen", &addr.to_string()])
                .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
                .arg("--data")
                .arg(&data)
                .env("RUST_LOG", "warn");
            cmd
        }
    };
    let fresh = agora(config.to_owned(), scratch.join("agora"));
    let reuse = agora(reusing, scratch.join("agora-reuse"));
    let wasmtime = match Command::new("wasmtime").arg("--version").output() {
        Ok(out) if String::from_utf8_lossy(&out.stdout).starts_with("wasmtime 48.0.8") => true,
        _ => {
            println!("wasmtime serve: skipped (install: cargo install wasmtime-cli --version 48.0.8 --locked)");
            false
        }
    };
    let serve = |addr: SocketAddr| {
        let mut cmd = Command::new("wasmtime");
        cmd.args(["serve", "-Scli", "--addr", &addr.to_string()])
            .arg(component("hello"));
        cmd
    };
    for round in 1..=HTTP_ROUNDS {
        println!("\n### Round {round}");
        let native = serve_and_load("native hyper", native_command, duration, connections).await?;
        let agora = serve_and_load("agora up", &fresh, duration, connections).await?;
        let reused = serve_and_load("agora up, reuse", &reuse, duration, connections).await?;
        let wasmtime = match wasmtime {
            true => {
                Some(serve_and_load("wasmtime serve 48.0.8", serve, duration, connections).await?)
            }
            false => None,
        };
        for (load, pick) in [
            (
                "wrk",
                (|t: &Throughput| t.wrk) as fn(&Throughput) -> Option<f64>,
            ),
            ("in-process client", |t: &Throughput| Some(t.client)),
        ] {
            let (Some(native), Some(agora), Some(reused)) =
                (pick(&native), pick(&agora), pick(&reused))
            else {
                continue;
            };
            let versus_wasmtime = wasmtime
                .as_ref()
                .and_then(pick)
                .map(|w| format!("agora / wasmtime serve {:.2}x, ", agora / w))
                .unwrap_or_default();
            println!(
                "ratios under {load}: {versus_wasmtime}agora / native {:.3}x, agora with reuse / native {:.3}x",
                agora / native,
                reused / native
            );
        }
    }
    Ok(())
}

/// Instantiating the hello component from its pre-linked form, as every request does.
async fn instantiation(config: &Path, data: &Path) -> Result<()> {
    let plugins = Plugins::load(config)?;
    let runtime = Runtime::start(plugins, config, data).await?;
    let hello = runtime.registry().components["hello"].clone();
    println!(
        "## Instantiation (in process, pooling allocator: {})",
        runtime.pooling
    );
    let deadline = Instant::now() + Duration::from_secs(3600);
    let mut samples = Vec::with_capacity(20_000);
    for _ in 0..20_000 {
        let started = Instant::now();
        let mut store = hello.new_store(deadline);
        let instance = hello.instance_pre().instantiate_async(&mut store).await?;
        samples.push(started.elapsed());
        drop((instance, store));
    }
    report("store + instantiate", &mut samples[2_000..].to_vec());
    runtime.capabilities.shutdown().await;
    Ok(())
}

fn report(what: &str, samples: &mut [Duration]) {
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize];
    println!(
        "{what}: mean {:.1} µs, p50 {:.1} µs, p99 {:.1} µs ({} samples)",
        mean.as_secs_f64() * 1e6,
        pct(0.5).as_secs_f64() * 1e6,
        pct(0.99).as_secs_f64() * 1e6,
        samples.len()
    );
}

fn native_command(addr: SocketAddr) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["native-server", &addr.to_string()]);
    cmd
}

/// The native baseline: hyper answering with the same bytes, no Wasm.
fn native_server(addr: SocketAddr) -> Result<()> {
    tokio::runtime::Runtime::new()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        loop {
            let (stream, _) = listener.accept().await?;
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    let mut response = http::Response::new(Full::new(Bytes::from_static(BODY)));
                    response
                        .headers_mut()
                        .insert("content-type", http::HeaderValue::from_static("text/plain"));
                    Ok::<_, Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Requests per second of one run, under each load generator.
struct Throughput {
    client: f64,
    wrk: Option<f64>,
}

async fn serve_and_load(
    name: &str,
    command: impl Fn(SocketAddr) -> Command,
    duration: Duration,
    connections: usize,
) -> Result<Throughput> {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let _server = Server(
        command(addr)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?,
    );
    let started = Instant::now();
    loop {
        if let Ok(reply) = get(addr).await {
            if reply == BODY {
                break;
            }
            bail!("{name} answered {:?}", String::from_utf8_lossy(&reply));
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("{name} did not start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (count, failures) = load(addr, "/", duration, connections).await;
    let rps = count as f64 / duration.as_secs_f64();
    println!("{name:<22} {rps:>9.0} req/s  ({count} ok, {failures} failed; in-process client)");
    let wrk = match wrk(addr, "/", duration, connections) {
        Ok((wrk_rps, summary)) => {
            println!("{name:<22} {summary} (wrk)");
            Some(wrk_rps)
        }
        Err(e) => {
            println!("{name:<22} wrk skipped: {e:#}");
            None
        }
    };
    Ok(Throughput { client: rps, wrk })
}

/// The same load from wrk: requests per second, and a line with them and
/// the latency percentiles.
fn wrk(
    addr: SocketAddr,
    path: &str,
    duration: Duration,
    connections: usize,
) -> Result<(f64, String)> {
    let out = Command::new("wrk")
        .args(["-t2", &format!("-c{connections}")])
        .arg(format!("-d{}s", duration.as_secs()))
        .arg("--latency")
        .arg(format!("http://{addr}{path}"))
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(|v| v.split_whitespace().next().unwrap_or("").to_owned())
    };
    let rps: f64 = field("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))?;
    let errors = field("Non-2xx or 3xx responses:").unwrap_or_else(|| "0".into());
    let summary = format!(
        "{rps:>9.0} req/s  (p50 {}, p99 {}, {errors} non-2xx)",
        field("50%").unwrap_or_default(),
        field("99%").unwrap_or_default()
    );
    Ok((rps, summary))
}

async fn get(addr: SocketAddr) -> Result<Bytes> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = http::Request::get("/")
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())?;
    Ok(sender
        .send_request(request)
        .await?
        .into_body()
        .collect()
        .await?
        .to_bytes())
}

/// Keep-alive connections sending requests back to back for `duration`.
async fn load(addr: SocketAddr, path: &str, duration: Duration, connections: usize) -> (u64, u64) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + duration;
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (ok, failed, path) = (ok.clone(), failed.clone(), path.to_owned());
            tokio::spawn(async move {
                let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
                    return;
                };
                let _ = stream.set_nodelay(true);
                let Ok((mut sender, conn)) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
                else {
                    return;
                };
                tokio::spawn(conn);
                while Instant::now() < end {
                    let request = http::Request::get(&path)
                        .header("host", "bench")
                        .body(Empty::<Bytes>::new())
                        .unwrap();
                    let done = async {
                        sender.ready().await?;
                        let response = sender.send_request(request).await?;
                        let status = response.status();
                        response.into_body().collect().await?;
                        Ok::<_, hyper::Error>(status.is_success())
                    };
                    match done.await {
                        Ok(true) => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
}

/// Swapping between two compiled versions through the admin API.
async fn swap(config: &Path, data: &Path) -> Result<()> {
    let (public, admin) = (free_port(), free_port());
    let _server = Server(
        Command::new(root().join("target/release/agora"))
            .arg("up")
            .arg("--config")
            .arg(config)
            .args(["--listen", &format!("127.0.0.1:{public}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .arg("--data")
            .arg(data)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let admin: SocketAddr = format!("127.0.0.1:{admin}").parse()?;
    let started = Instant::now();
    while tokio::net::TcpStream::connect(admin).await.is_err() {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("agora did not start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Made by the host before it listens.
    let token = std::fs::read_to_string(data.join("admin.token"))?;
    let binaries = [
        std::fs::read(component("probe-v2"))?,
        std::fs::read(component("probe"))?,
    ];
    let mut server_ms = Vec::new();
    let mut round_trip = Vec::new();
    for i in 0..22 {
        let started = Instant::now();
        let reply = deploy(admin, token.trim(), &binaries[i % 2]).await?;
        let elapsed = started.elapsed();
        // The first two deploys compile; the rest swap precompiled versions.
        if i >= 2 {
            server_ms.push(reply["swap_ms"].as_f64().unwrap_or(f64::NAN));
            round_trip.push(elapsed);
        }
    }
    server_ms.sort_by(f64::total_cmp);
    println!(
        "\n## Hot swap of a precompiled version (admin API, {} swaps)",
        server_ms.len()
    );
    println!(
        "host-side swap: median {:.1} ms, max {:.1} ms",
        server_ms[server_ms.len() / 2],
        server_ms[server_ms.len() - 1]
    );
    report("deploy round trip", &mut round_trip);
    Ok(())
}

async fn deploy(admin: SocketAddr, token: &str, wasm: &[u8]) -> Result<serde_json::Value> {
    let stream = tokio::net::TcpStream::connect(admin).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = http::Request::post("/components/probe/deploy")
        .header("host", admin.to_string())
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::copy_from_slice(wasm)))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("deploy failed: {}", String::from_utf8_lossy(&body));
    }
    Ok(serde_json::from_slice(&body)?)
}

/// One caller's storage calls per second, each a round trip through the
/// backend: a single-row insert committed in a transaction, the same as a
/// plain `execute`, and a `query` by key; on SQLite at each `durability`
/// setting and on PostgreSQL (`scripts/services`' server, skipped if it does
/// not answer).
async fn storage(dir: &Path) -> Result<()> {
    println!("\n## Storage: one caller, a single-row insert + commit, or a query by key, 2 s each");
    let mut backends: Vec<(String, Arc<dyn StorageBackend>)> = Vec::new();
    for (durability, name) in [
        (Durability::ProcessCrash, "process-crash (default)"),
        (Durability::MachineCrash, "machine-crash"),
    ] {
        let settings = SqliteSettings {
            durability,
            max_size_mib: 1024,
        };
        let backend = SqliteBackend::new(&dir.join(name), settings)?;
        backends.push((format!("sqlite, {name}"), Arc::new(backend)));
    }
    let namespace = format!("benchstorage{}", std::process::id());
    let postgres = PostgresConfig {
        url: checkout::POSTGRES_URL.into(),
        namespace: namespace.clone(),
        max_connections_per_component: 8,
        max_connections: 16,
        connect_timeout_ms: 2000,
        migration_timeout_seconds: 60,
    };
    let on_postgres = match PostgresBackend::connect(&postgres).await {
        Ok(backend) => {
            backends.push(("postgres".into(), Arc::new(backend)));
            true
        }
        Err(e) => {
            println!("postgres skipped: {e:#}");
            false
        }
    };
    let measured = storage_calls(&backends).await;
    if on_postgres {
        checkout::drop_namespace(&namespace);
    }
    measured
}

async fn storage_calls(backends: &[(String, Arc<dyn StorageBackend>)]) -> Result<()> {
    for (label, backend) in backends {
        let db = backend.open("bench", Duration::from_secs(10)).await?;
        db.migrate(&[Migration {
            name: "0001".into(),
            sql: "CREATE TABLE rows (n BIGINT PRIMARY KEY)".into(),
        }])
        .await?;
        let mut next = 0i64;
        for how in ["transaction", "plain execute", "query by key"] {
            let started = Instant::now();
            let mut calls = 0u64;
            while started.elapsed() < Duration::from_secs(2) {
                let insert = "INSERT INTO rows (n) VALUES ($1)";
                let row = vec![Value::Integer(next)];
                match how {
                    "transaction" => {
                        let mut tx = db.begin().await?;
                        tx.execute(insert, row).await?;
                        tx.commit().await?;
                        next += 1;
                    }
                    "plain execute" => {
                        db.execute(insert, row).await?;
                        next += 1;
                    }
                    _ => {
                        let key = vec![Value::Integer(calls as i64 % next.max(1))];
                        db.query("SELECT n FROM rows WHERE n = $1", key).await?;
                    }
                }
                calls += 1;
            }
            let rate = calls as f64 / started.elapsed().as_secs_f64();
            println!("{label:<32} {how:<14} {rate:>8.0} /s");
        }
    }
    Ok(())
}
