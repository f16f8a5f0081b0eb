//! Checkouts per second through the whole saga, on each backend set: the
//! shop of plugins.toml served by `agora up` (by one host, or by two sharing
//! the work), buyers placing orders back to back on keep-alive connections
//! for the run's duration, then the time until every acknowledged order is
//! paid (orders → payments → orders, over the outbox and the broker), and
//! the latency from an order's acknowledgement to its customer's "paid"
//! notification (orders → payments → notifications).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use crate::{free_port, root, Server};

pub const POSTGRES_URL: &str = "postgres://agora:agora@127.0.0.1:5432/shop";

/// Every backend set, one after the other.
pub async fn checkouts(scratch: &Path, duration: Duration, connections: usize) -> Result<()> {
    println!(
        "\n## Checkout: POST /orders, then the saga until paid, {connections} buyers, {}s",
        duration.as_secs()
    );
    run(&Run {
        label: "embedded (SQLite, memory cache)",
        backends: String::new(),
        namespace: None,
        hosts: 1,
        scratch,
        duration,
        connections,
    })
    .await?;
    let answers =
        |addr: &'static str| async move { tokio::net::TcpStream::connect(addr).await.is_ok() };
    if !answers("127.0.0.1:5432").await || !answers("127.0.0.1:6379").await {
        println!("postgres + redis: skipped (run scripts/services first)");
        return Ok(());
    }
    let kafka = answers("127.0.0.1:9092").await;
    let mut sets = vec![("postgres + redis", false, 1)];
    if kafka {
        sets.extend([
            ("postgres + redis + kafka", true, 1),
            ("... two hosts", true, 2),
        ]);
    } else {
        println!("kafka: skipped (run scripts/services first)");
    }
    for (label, kafka, hosts) in sets {
        let namespace = format!("bench{}_{hosts}{}", std::process::id(), u8::from(kafka));
        let mut backends = format!(
            "\n[backends.storage]\nkind = \"postgres\"\nurl = \"{POSTGRES_URL}\"\nnamespace = \"{namespace}\"\n\
             \n[backends.cache]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\nkey_prefix = \"{namespace}/\"\n"
        );
        if hosts > 1 {
            // Both hosts' pools under the local server's 100 connections.
            backends = backends.replacen(
                "[backends.cache]",
                "max_connections_per_component = 4\n\n[backends.cache]",
                1,
            );
        }
        if kafka {
            // The test broker (tansu) waits out every fetch: keep it short.
            backends.push_str(&format!(
                "\n[backends.messaging]\nkind = \"kafka\"\nbrokers = \"127.0.0.1:9092\"\n\
                 topic_prefix = \"{namespace}.\"\nfetch_max_wait_ms = 20\n\
                 \n[backends.coordination]\nkind = \"postgres\"\nurl = \"{POSTGRES_URL}\"\n\
                 namespace = \"{namespace}\"\n"
            ));
        }
        let result = run(&Run {
            label,
            backends,
            namespace: Some(namespace.clone()),
            hosts,
            scratch,
            duration,
            connections,
        })
        .await;
        drop_namespace(&namespace);
        result?;
    }
    Ok(())
}

/// How long the shop takes to be ready when its components are compiled
/// already (the compilation cache of an earlier start), and the host's
/// resident memory once it is idle with the five services loaded.
pub async fn ready_and_idle_memory(dir: &Path) -> Result<()> {
    println!("\n## Start and memory: the shop of plugins.toml, embedded backends");
    let started = Instant::now();
    drop(start_shop(dir, "", 1, |c| c).await?.0);
    println!(
        "first start (compiling):  {:>6.0} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    let mut ready = Vec::new();
    let mut resident = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let (servers, _, _) = start_shop(dir, "", 1, |c| c).await?;
        ready.push(started.elapsed());
        tokio::time::sleep(Duration::from_secs(2)).await;
        resident.push(resident_kib(servers[0].0.id())?);
    }
    let ms: Vec<String> = ready
        .iter()
        .map(|d| format!("{:.0}", d.as_secs_f64() * 1e3))
        .collect();
    println!("ready from a warm cache:  {} ms", ms.join(", "));
    let mib: Vec<String> = resident
        .iter()
        .map(|kib| format!("{:.1}", *kib as f64 / 1024.0))
        .collect();
    println!("resident when idle:       {} MiB", mib.join(", "));
    Ok(())
}

/// A process's resident memory, from /proc.
fn resident_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS in /proc/<pid>/status")
}

/// A host's admin listener and data directory (where its admin token is).
pub struct AdminOf {
    addr: SocketAddr,
    data: PathBuf,
}

/// Serves the shop of plugins.toml (with `edit` applied and `backends`
/// appended) from `dir` on `hosts` hosts sharing one token key, and waits
/// until each is ready. The hosts stop when the servers are dropped.
pub async fn start_shop(
    dir: &Path,
    backends: &str,
    hosts: usize,
    edit: impl FnOnce(String) -> String,
) -> Result<(Vec<Server>, Vec<SocketAddr>, Vec<AdminOf>)> {
    std::fs::create_dir_all(dir)?;
    let text = std::fs::read_to_string(root().join("plugins.toml"))?;
    let components = root().join("target/wasm32-wasip2/component");
    let config = edit(
        text.replace(
            "\"target/wasm32-wasip2/component/",
            &format!("\"{}/", components.display()),
        )
        .replace("\"docs/", &format!("\"{}/docs/", root().display()))
        // The hosts sign and accept the same tokens.
        .replace(
            "[tokens]\n",
            &format!(
                "[tokens]\nkey_file = \"{}\"\n",
                dir.join("tokens.key").display()
            ),
        )
        // The bench logs every buyer in from one address.
        .replace(
            "requests = 20, window_seconds = 60",
            "requests = 100000, window_seconds = 60",
        ),
    ) + backends;
    let config_path = dir.join("plugins.toml");
    std::fs::write(&config_path, config)?;
    let mut servers = Vec::new();
    let mut addrs: Vec<SocketAddr> = Vec::new();
    let mut admins = Vec::new();
    for host in 0..hosts {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let data = dir.join(format!("data{host}"));
        servers.push(Server(
            Command::new(root().join("target/release/agora"))
                .arg("up")
                .arg("--config")
                .arg(&config_path)
                .args(["--listen", &addr.to_string()])
                .args(["--admin-listen", &admin.to_string()])
                .arg("--data")
                .arg(&data)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        ));
        let started = Instant::now();
        while !matches!(call(addr, "GET", "/readyz", None, None).await, Ok((200, _))) {
            if started.elapsed() > Duration::from_secs(120) {
                bail!("agora did not become ready in {}", dir.display());
            }
            // Fine enough to time a start in milliseconds.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        addrs.push(addr);
        admins.push(AdminOf { addr: admin, data });
    }
    Ok((servers, addrs, admins))
}

/// One backend set's run.
struct Run<'a> {
    label: &'a str,
    /// Tables appended to plugins.toml.
    backends: String,
    /// The PostgreSQL namespace, where the backends are servers.
    namespace: Option<String>,
    hosts: usize,
    scratch: &'a Path,
    duration: Duration,
    connections: usize,
}

async fn run(run: &Run<'_>) -> Result<()> {
    let Run {
        label,
        duration,
        connections,
        ..
    } = *run;
    let dir = run.scratch.join(format!(
        "checkout-{}-{}",
        label.split(' ').next().unwrap_or("x"),
        run.hosts
    ));
    let (servers, addrs, admins) = start_shop(&dir, &run.backends, run.hosts, |c| c).await?;
    let addr = addrs[0];
    if run.hosts > 1 {
        // Each host has taken its share of the partitions.
        tokio::time::sleep(Duration::from_secs(3)).await;
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

    let counted_before = saga_counts(&admins).await?;
    let cpu_before = host_cpu_seconds(&servers)?;
    let sleeps_before = host_sleeps(&servers)?;

    // Load: each buyer on its own keep-alive connection.
    let placed = Arc::new(Mutex::new(Vec::<(String, usize, u64)>::new()));
    let latencies = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let failures = Arc::new(Mutex::new(HashMap::<u16, u64>::new()));
    let load_started = Instant::now();
    let end = load_started + duration;
    let tasks: Vec<_> = buyers
        .iter()
        .enumerate()
        .map(|(buyer, token)| {
            let (token, product) = (token.clone(), product.clone());
            let (placed, latencies, failures) =
                (placed.clone(), latencies.clone(), failures.clone());
            let addr = addrs[buyer % addrs.len()];
            tokio::spawn(async move {
                let mut sender = keep_alive(addr).await?;
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
                        placed
                            .lock()
                            .unwrap()
                            .push((id, buyer, agora_host::now_millis()));
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
    let load_cpu = host_cpu_seconds(&servers)? - cpu_before;
    let load_sleeps = sleeps_between(&sleeps_before, &host_sleeps(&servers)?);
    let placed = std::mem::take(&mut *placed.lock().unwrap());
    let acknowledged: HashMap<String, u64> =
        placed.iter().map(|(id, _, at)| (id.clone(), *at)).collect();
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

    // The saga: every acknowledged order must become paid. Polled by as
    // many keep-alive clients as there were buyers, newest orders first:
    // one client opening a connection per order took longer to look at
    // 4,000 orders (about 2 s) than the saga took to pay them.
    let sample = placed
        .last()
        .map(|(id, buyer, _)| (id.clone(), buyers[*buyer].clone()));
    let mut unpaid: Vec<(String, String)> = placed
        .into_iter()
        .rev()
        .map(|(id, buyer, _)| (id, buyers[buyer].clone()))
        .collect();
    let deadline = load_ended + Duration::from_secs(120);
    let pollers = connections.max(1);
    let mut polls = 0;
    while !unpaid.is_empty() && Instant::now() < deadline {
        polls += unpaid.len();
        let mut shares = vec![Vec::new(); pollers];
        for (i, order) in unpaid.into_iter().enumerate() {
            shares[i % pollers].push(order);
        }
        let tasks: Vec<_> = shares
            .into_iter()
            .enumerate()
            .filter(|(_, share)| !share.is_empty())
            .map(|(i, share)| tokio::spawn(still_unpaid(addrs[i % addrs.len()], share)))
            .collect();
        unpaid = Vec::new();
        for task in tasks {
            unpaid.extend(task.await??);
        }
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

    // Order acknowledged → its customer's "paid" notification stored.
    let deadline = Instant::now() + Duration::from_secs(60);
    let notified = loop {
        let notified = paid_notifications(run, &dir)?;
        if notified.len() >= acknowledged.len() || Instant::now() > deadline {
            break notified;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut delays: Vec<u64> = notified
        .iter()
        .filter_map(|(order, at)| Some(at.saturating_sub(*acknowledged.get(order)?)))
        .collect();
    delays.sort_unstable();
    let at = |p: f64| {
        delays
            .get(((delays.len() as f64 * p) as usize).min(delays.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{:<34} order → notification p50 {} ms, p99 {} ms ({} of {} notified)",
        "",
        at(0.50),
        at(0.99),
        delays.len(),
        acknowledged.len()
    );

    // Where an order's CPU goes: the saga's work per order, counted by the
    // hosts' own metrics over the run, less the bench's status polls (each
    // one an orders instance, and the storage calls one more poll makes).
    let orders = acknowledged.len().max(1) as f64;
    let mut counted = saga_counts(&admins).await?;
    for (name, before) in counted_before {
        *counted.entry(name).or_default() -= before;
    }
    *counted.entry("orders".into()).or_default() -= polls as f64;
    if let Some(sample) = sample {
        let storage = |counts: &HashMap<String, f64>| counts.get("storage").copied().unwrap_or(0.0);
        let before = storage(&saga_counts(&admins).await?);
        still_unpaid(addr, vec![sample]).await?;
        let per_poll = storage(&saga_counts(&admins).await?) - before;
        *counted.entry("storage".into()).or_default() -= polls as f64 * per_poll;
    }
    let per_order = |name: &str| counted.get(name).copied().unwrap_or(0.0) / orders;
    let instances: Vec<String> = ["orders", "catalog", "payments", "notifications", "identity"]
        .iter()
        .map(|c| format!("{c} {:.1}", per_order(c)))
        .collect();
    println!(
        "{:<34} per order: {:.2} ms of host CPU during the load ({:.2} cores), {:.0} times a host \
         thread went to sleep; instances made: {}; events delivered {:.1}; calls between \
         components {:.1}; storage calls {:.1}",
        "",
        load_cpu * 1e3 / orders,
        load_cpu / load_ended.duration_since(load_started).as_secs_f64(),
        load_sleeps as f64 / orders,
        instances.join(", "),
        per_order("delivered"),
        per_order("linked"),
        per_order("storage"),
    );
    drop(servers);
    Ok(())
}

/// CPU seconds (user and system) the hosts have used so far, from /proc.
fn host_cpu_seconds(servers: &[Server]) -> Result<f64> {
    // Clock ticks per second: 100 on every Linux build this bench meets.
    const TICKS: f64 = 100.0;
    let mut ticks = 0u64;
    for server in servers {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", server.0.id()))?;
        // Fields after the command name, which is in parentheses.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .context("no command name in /proc/<pid>/stat")?
            .1
            .split_whitespace()
            .collect();
        // utime and stime are fields 14 and 15, the 12th and 13th after it.
        for field in &fields[11..13] {
            ticks += field.parse::<u64>()?;
        }
    }
    Ok(ticks as f64 / TICKS)
}

/// How many times each of the hosts' threads has gone to sleep so far
/// (its voluntary context switches, from /proc), by thread id: each is a
/// hand-off between threads, or a wait for I/O, and what wakes it costs
/// more than most of the work a saga step does.
fn host_sleeps(servers: &[Server]) -> Result<HashMap<String, u64>> {
    let mut sleeps = HashMap::new();
    for server in servers {
        let tasks = format!("/proc/{}/task", server.0.id());
        for task in std::fs::read_dir(&tasks)? {
            let task = task?;
            // A thread that ended since the listing has no status: skipped.
            let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
                continue;
            };
            let count = status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .context("no voluntary_ctxt_switches in /proc/<pid>/task/<tid>/status")?;
            sleeps.insert(format!("{tasks}/{:?}", task.file_name()), count);
        }
    }
    Ok(sleeps)
}

/// The sleeps between two [`host_sleeps`]: of the threads alive at the
/// end, those since the start (all, for a thread started since). A thread
/// that ended in between is not counted, rather than taking its earlier
/// sleeps out of the others'.
fn sleeps_between(before: &HashMap<String, u64>, after: &HashMap<String, u64>) -> u64 {
    after
        .iter()
        .map(|(thread, n)| n.saturating_sub(before.get(thread).copied().unwrap_or(0)))
        .sum()
}

/// The hosts' counts of the saga's work: instances made per component
/// (by name), events delivered (`delivered`), calls between components
/// (`linked`), components' storage calls (`storage`), summed over the
/// hosts' `/metrics`.
async fn saga_counts(admins: &[AdminOf]) -> Result<HashMap<String, f64>> {
    let mut counts = HashMap::new();
    for admin in admins {
        let token = std::fs::read_to_string(admin.data.join("admin.token"))?;
        let (status, text) = request(admin.addr, "GET", "/metrics", Some(token.trim()), "").await?;
        if status != 200 {
            bail!("GET /metrics on {}: {status}", admin.addr);
        }
        let text = String::from_utf8_lossy(&text);
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let value: f64 = value.parse().unwrap_or(0.0);
            let name = if let Some(labels) =
                series.strip_prefix("agora_instantiation_duration_seconds_count{")
            {
                match labels.split_once("component=\"") {
                    Some((_, rest)) => rest.split('"').next().unwrap_or("").to_owned(),
                    None => continue,
                }
            } else if series.starts_with("agora_events_delivered_total{") {
                "delivered".to_owned()
            } else if series.starts_with("agora_link_calls_total{") {
                "linked".to_owned()
            } else if series.starts_with("agora_storage_calls_total{") {
                "storage".to_owned()
            } else {
                continue;
            };
            *counts.entry(name).or_default() += value;
        }
    }
    Ok(counts)
}

/// An HTTP/1.1 connection to `addr` for requests one after the other.
async fn keep_alive(
    addr: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// The orders of `share` (id, its buyer's token) not yet paid, asked on one
/// keep-alive connection.
async fn still_unpaid(
    addr: SocketAddr,
    share: Vec<(String, String)>,
) -> Result<Vec<(String, String)>> {
    let mut sender = keep_alive(addr).await?;
    let mut still = Vec::new();
    for (id, token) in share {
        let request = http::Request::get(format!("/orders/{id}"))
            .header("host", "bench")
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))?;
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        let order: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if status != 200 || order["status"] != "paid" {
            still.push((id, token));
        }
    }
    Ok(still)
}

/// When each order's "paid" notification was stored (ms since the epoch),
/// by order id, read from the notifications component's database.
fn paid_notifications(run: &Run, dir: &Path) -> Result<HashMap<String, u64>> {
    let sql = "SELECT subject, created_at FROM notifications WHERE kind = 'payment_received'";
    let rows: Vec<(String, u64)> = match &run.namespace {
        Some(ns) => {
            let out = Command::new("psql")
                .args([POSTGRES_URL, "-qtAF", "|", "-c"])
                .arg(format!("SET search_path = \"{ns}_notifications\"; {sql}"))
                .output()
                .context("psql")?;
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| {
                    let (subject, at) = l.rsplit_once('|')?;
                    Some((subject.to_owned(), at.trim().parse().ok()?))
                })
                .collect()
        }
        None => {
            let db = dir.join("data0/storage/notifications.db");
            let conn = rusqlite::Connection::open(&db)?;
            let mut stmt = conn.prepare(sql)?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
            rows.collect::<rusqlite::Result<_>>()?
        }
    };
    // "Your order <id> is paid"
    Ok(rows
        .into_iter()
        .filter_map(|(subject, at)| {
            let id = subject
                .strip_prefix("Your order ")?
                .strip_suffix(" is paid")?;
            Some((id.to_owned(), at))
        })
        .collect())
}

/// Registers a user and logs in; returns the token.
pub async fn sign_up(addr: SocketAddr, email: &str, password: &str) -> Result<String> {
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
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Result<(u16, Value)> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let (status, bytes) = request(addr, method, path, token, &body).await?;
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

/// One request on a connection of its own: status and body.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Result<(u16, Bytes)> {
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
    let response = sender
        .send_request(request.body(Full::new(Bytes::from(body.to_owned())))?)
        .await?;
    let status = response.status().as_u16();
    Ok((status, response.into_body().collect().await?.to_bytes()))
}

/// Drops the bench's PostgreSQL roles and schemas, through psql (best effort).
pub fn drop_namespace(namespace: &str) {
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
