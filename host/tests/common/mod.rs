//! Test harness: runs the real `agora` binary on free loopback ports with a
//! scratch data directory, and talks to it over HTTP.

#![allow(dead_code)]

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tempfile::TempDir;

/// The components built by `scripts/build-components --test-variants`.
pub fn component(name: &str) -> PathBuf {
    let dir = std::env::var_os("AGORA_TEST_COMPONENTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-components"));
    let path = dir.join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run scripts/test, which builds the test components",
        path.display()
    );
    path
}

/// A free loopback port, from below Linux's ephemeral range (32768 up).
/// A port from `bind(0)` is in that range, where every client socket on
/// the machine takes its own port too, so one could take it between this
/// check and the host's bind: the host then failed to start ("Address
/// already in use"). Each test process starts at its own offset, and
/// takes the ports in turn from there.
pub fn free_port() -> u16 {
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static TAKEN: AtomicU32 = AtomicU32::new(0);
    let offset = std::process::id().wrapping_mul(2_654_435_761) % COUNT;
    loop {
        let port = (FIRST + (offset + TAKEN.fetch_add(1, Ordering::Relaxed)) % COUNT) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The backend set every host of this run uses, from
/// `AGORA_TEST_BACKENDS`: unset (or `embedded`) keeps what each test's
/// plugins file says (the embedded backends by default); `postgres,redis`
/// puts storage on the PostgreSQL and the cache on the Redis on 127.0.0.1
/// (as `scripts/services` sets them up), wherever the file chooses no
/// backend itself; `kafka` adds messaging on the test broker, coordinated
/// through that PostgreSQL. Each host gets its own PostgreSQL namespace and Redis key
/// prefix, so hosts of parallel tests never meet.
fn chosen_backends(config: &str, namespace: &str) -> String {
    let chosen = std::env::var("AGORA_TEST_BACKENDS").unwrap_or_default();
    let mut tables = String::new();
    for backend in chosen.split(',').map(str::trim).filter(|b| !b.is_empty()) {
        match backend {
            "embedded" => {}
            "postgres" if !config.contains("[backends.storage]") => {
                tables.push_str(&format!(
                    "\n[backends.storage]\nkind = \"postgres\"\nurl = \"{POSTGRES_URL}\"\nnamespace = \"{namespace}\"\n"
                ))
            }
            "redis" if !config.contains("[backends.cache]") => tables.push_str(&format!(
                "\n[backends.cache]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\nkey_prefix = \"{namespace}/\"\n"
            )),
            // Kafka on the test broker, under a topic prefix of this host's
            // own; consumer offsets and leases in PostgreSQL.
            "kafka" if !config.contains("[backends.messaging]") => tables.push_str(&format!(
                "\n[backends.messaging]\nkind = \"kafka\"\nbrokers = \"127.0.0.1:9092\"\n\
                 topic_prefix = \"{namespace}.\"\nfetch_max_wait_ms = 20\n\
                 [backends.coordination]\nkind = \"postgres\"\nurl = \"{POSTGRES_URL}\"\n\
                 namespace = \"{namespace}\"\n"
            )),
            "postgres" | "redis" | "kafka" => {}
            other => panic!("AGORA_TEST_BACKENDS: unknown backend `{other}` (postgres, redis, kafka, embedded)"),
        }
    }
    tables
}

/// Whether `service` answers on `addr`; a skipped test says so, and under
/// `AGORA_REQUIRE_SERVICES=1` (set by `scripts/test`, which starts the
/// servers first) a missing server fails it instead.
pub async fn service_answers(service: &str, addr: &str) -> bool {
    let up = tokio::net::TcpStream::connect(addr).await.is_ok();
    if !up {
        assert!(
            std::env::var("AGORA_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "AGORA_REQUIRE_SERVICES=1 but {service} does not answer on {addr}"
        );
        eprintln!("SKIPPED: {service} does not answer on {addr}");
    }
    up
}

/// The database `scripts/services` creates for the tests and for
/// plugins.production.toml.
pub const POSTGRES_URL: &str = "postgres://agora:agora@127.0.0.1:5432/shop";

/// A PostgreSQL namespace no other host, test or run uses: `t` and the
/// time in nanoseconds, base 36 (13 characters).
pub fn unique_namespace() -> String {
    let mut n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let mut digits = Vec::new();
    while n > 0 {
        digits.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize]);
        n /= 36;
    }
    digits.reverse();
    format!("t{}", String::from_utf8(digits).unwrap())
}

/// Drops what a host made in PostgreSQL under `namespace`: its schemas and
/// the components' roles. Best effort, through psql.
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

pub struct Ports {
    pub public: u16,
    pub admin: u16,
}

/// A running host. Killed (SIGKILL, like a crash) when dropped.
pub struct TestHost {
    child: Option<Child>,
    pub dir: TempDir,
    pub ports: Ports,
    /// `ulimit` options for the host (`-v KiB`: where the instance pool
    /// cannot fit; `-n N`: few file descriptors).
    ulimit: Option<String>,
    /// More flags for `agora up`, and environment variables.
    flags: Vec<String>,
    env: Vec<(String, String)>,
    /// The PostgreSQL namespace of this host's storage, dropped with it.
    namespace: Option<String>,
}

/// hello on /hello, probe (every grant) on /probe.
pub fn standard_config(ports: &Ports, probe: &Path) -> String {
    format!(
        r#"
[components.hello]
wasm = "{hello}"
routes = ["/hello"]

[components.probe]
wasm = "{probe}"
routes = ["/probe"]
grants = ["storage", "cache", "messaging", "tokens", "tokens-issue", "config", "http-out"]
issues_roles = ["tester"]
publishes = ["*"]
subscribes = ["test.events"]
outbound_hosts = ["127.0.0.1:{port}"]
settings = {{ greeting = "hi", admins = ["a@example.com"] }}
limits = {{ timeout_ms = 6000, memory_mib = 32 }}
retry = {{ max_attempts = 3, backoff_ms = 20 }}
"#,
        hello = component("hello").display(),
        probe = probe.display(),
        port = ports.public,
    )
}

impl TestHost {
    /// Writes plugins.toml from `config` and starts a host on it.
    pub fn start(config: impl FnOnce(&Ports, &Path) -> String) -> TestHost {
        TestHost::start_with_ulimit(config, None)
    }

    /// A host with at most `address_space_kib` of address space.
    pub fn start_limited(
        config: impl FnOnce(&Ports, &Path) -> String,
        address_space_kib: Option<u64>,
    ) -> TestHost {
        TestHost::start_with_ulimit(config, address_space_kib.map(|kib| format!("-v {kib}")))
    }

    /// A host that may open at most `files` file descriptors.
    pub fn start_with_open_files(
        config: impl FnOnce(&Ports, &Path) -> String,
        files: u64,
    ) -> TestHost {
        TestHost::start_with_ulimit(config, Some(format!("-n {files}")))
    }

    /// A host started with more `agora up` flags (`--watch`) and
    /// environment variables.
    pub fn start_with_flags(
        config: impl FnOnce(&Ports, &Path) -> String,
        flags: &[&str],
        env: &[(&str, &str)],
    ) -> TestHost {
        TestHost::launch(
            config,
            None,
            flags.iter().map(|f| f.to_string()).collect(),
            env.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn start_with_ulimit(
        config: impl FnOnce(&Ports, &Path) -> String,
        ulimit: Option<String>,
    ) -> TestHost {
        TestHost::launch(config, ulimit, Vec::new(), Vec::new())
    }

    fn launch(
        config: impl FnOnce(&Ports, &Path) -> String,
        ulimit: Option<String>,
        flags: Vec<String>,
        env: Vec<(String, String)>,
    ) -> TestHost {
        let dir = TempDir::new().unwrap();
        let ports = Ports {
            public: free_port(),
            admin: free_port(),
        };
        let mut config = config(&ports, dir.path());
        let namespace = unique_namespace();
        let backends = chosen_backends(&config, &namespace);
        // Before the test's own tables where that is safe (the file starts
        // with a table), so a test that cuts its file at a table keeps them.
        let first = config
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'));
        if first.is_none_or(|l| l.starts_with('[')) {
            config = backends + &config;
        } else {
            config.push_str(&backends);
        }
        // Whatever PostgreSQL namespace the file names, chosen here or by
        // the test, is dropped with the host.
        let namespace = config.lines().find_map(|line| {
            let value = line.trim().strip_prefix("namespace = \"")?;
            Some(value.strip_suffix('"')?.to_owned())
        });
        std::fs::write(dir.path().join("plugins.toml"), config).unwrap();
        let mut host = TestHost {
            child: None,
            dir,
            ports,
            ulimit,
            flags,
            env,
            namespace,
        };
        host.spawn();
        host
    }

    pub fn standard() -> TestHost {
        TestHost::start(|ports, _| standard_config(ports, &component("probe")))
    }

    pub fn plugins_path(&self) -> PathBuf {
        self.dir.path().join("plugins.toml")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("host.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The log once it holds `what` (or after 10 s, as it is then): the
    /// host writes its lines from a thread of its own, a moment after the
    /// request that logged one was answered.
    pub async fn logged(&self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if log.contains(what) || Instant::now() > deadline {
                return log;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn spawn(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut command = match &self.ulimit {
            Some(ulimit) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("ulimit {ulimit} && exec \"$0\" \"$@\""))
                    .arg(env!("CARGO_BIN_EXE_agora"));
                sh
            }
            None => Command::new(env!("CARGO_BIN_EXE_agora")),
        };
        let child = command
            .arg("up")
            .arg("--config")
            .arg(self.plugins_path())
            .args(["--listen", &format!("127.0.0.1:{}", self.ports.public)])
            .args(["--admin-listen", &format!("127.0.0.1:{}", self.ports.admin)])
            .arg("--data")
            .arg(self.data_dir())
            .args(&self.flags)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_until_serving();
    }

    fn wait_until_serving(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(300);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the host exited ({status}) while starting:\n{}", self.log());
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.ports.public)).is_ok()
                && self.log().contains("agora is serving")
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "the host did not start within 300 s (a first build included):\n{}",
            self.log()
        );
    }

    /// Kills the host without warning, as a crash would.
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Crashes the host and starts it again on the same data and config.
    pub fn restart(&mut self) {
        self.crash();
        self.spawn();
    }

    /// The host process's resident memory, from /proc.
    pub fn resident_kib(&self) -> u64 {
        self.memory_kib("VmRSS")
    }

    /// The most memory the host process has held resident so far.
    pub fn peak_resident_kib(&self) -> u64 {
        self.memory_kib("VmHWM")
    }

    /// The CPU time the host process has used so far (user and system),
    /// from /proc.
    pub fn cpu_time(&self) -> Duration {
        let pid = self.child.as_ref().expect("the host runs").id();
        ProcStat::read(&format!("/proc/{pid}/stat"))
            .expect("the host runs")
            .cpu_time()
    }

    /// Each thread of the host by its id: the CPU time it has used so far
    /// and its scheduling policy (`libc::SCHED_*`).
    pub fn threads(&self) -> std::collections::HashMap<u64, (Duration, u64)> {
        let pid = self.child.as_ref().expect("the host runs").id();
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
        tasks
            .filter_map(|task| {
                let task = task.ok()?.path();
                let tid = task.file_name()?.to_str()?.parse().ok()?;
                // A thread may end between the listing and the read.
                let stat = ProcStat::read(task.join("stat").to_str()?)?;
                Some((tid, (stat.cpu_time(), stat.field(41))))
            })
            .collect()
    }

    fn memory_kib(&self, field: &str) -> u64 {
        let pid = self.child.as_ref().expect("the host runs").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/<pid>/status"))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ports.public)
    }

    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.admin)
    }

    /// The admin API's token, made by the host on its first start.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("admin.token"))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// A request to the admin API, with its token.
    pub async fn admin(&self, method: &str, path: &str, body: Vec<u8>) -> Reply {
        let bearer = format!("Bearer {}", self.admin_token());
        let url = format!("{}{path}", self.admin_url());
        request(method, &url, &[("authorization", &bearer)], body).await
    }

    /// Runs an `agora` subcommand against this host's admin API, pointed at
    /// the host's plugins.toml and data directory (the harness passes
    /// `--data` and `--admin-listen` to `up`, so the file alone does not say).
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        let (config, data, admin) = (self.plugins_path(), self.data_dir(), self.admin_url());
        all.extend(["--config", config.to_str().unwrap()]);
        all.extend(["--data", data.to_str().unwrap(), "--admin", &admin]);
        agora(&all)
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        self.crash();
        if let Some(namespace) = &self.namespace {
            drop_namespace(namespace);
        }
    }
}

pub fn agora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agora"))
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("AGORA_ADMIN_TOKEN")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Replaces a file atomically, as a deploy pipeline should.
pub fn replace_atomically(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `code` of a `{"error":{"code","message"}}` body.
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

pub async fn request(method: &str, url: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Reply {
    try_request(method, url, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

/// A request whose connection may fail (a host that was killed).
pub async fn try_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<Reply, Box<dyn std::error::Error + Send + Sync>> {
    let uri: http::Uri = url.parse()?;
    let authority = uri.authority().ok_or("no authority")?.clone();
    let stream = tokio::net::TcpStream::connect(authority.as_str()).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut builder = http::Request::builder()
        .method(method)
        .uri(uri.path_and_query().ok_or("no path")?.as_str());
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        builder = builder.header("host", authority.as_str());
    }
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let response = sender
        .send_request(builder.body(Full::new(Bytes::from(body)))?)
        .await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await?.to_bytes().to_vec();
    Ok(Reply {
        status,
        headers,
        body,
    })
}

pub async fn get(url: &str) -> Reply {
    request("GET", url, &[], Vec::new()).await
}

pub async fn put(url: &str, body: &str) -> Reply {
    request("PUT", url, &[], body.as_bytes().to_vec()).await
}

pub async fn post_json(url: &str, value: &serde_json::Value) -> Reply {
    request(
        "POST",
        url,
        &[("content-type", "application/json")],
        value.to_string().into_bytes(),
    )
    .await
}

/// Asserts an error reply: its status and its `{"error":{"code"}}`.
pub fn assert_error(reply: &Reply, status: u16, code: &str) {
    assert_eq!(
        (reply.status, reply.error_code().as_str()),
        (status, code),
        "{}",
        reply.text()
    );
}

/// A process's or thread's `stat` file in /proc.
struct ProcStat(Vec<u64>);

impl ProcStat {
    fn read(path: &str) -> Option<ProcStat> {
        let stat = std::fs::read_to_string(path).ok()?;
        // The fields after the command, which is in parentheses and may
        // hold spaces; the state, the 3rd field, comes first.
        let fields = stat[stat.rfind(')')? + 2..].split(' ');
        Some(ProcStat(fields.map(|f| f.parse().unwrap_or(0)).collect()))
    }

    /// The `n`th field, counted from 1 as proc(5) does.
    fn field(&self, n: usize) -> u64 {
        self.0[n - 3]
    }

    /// utime and stime, the 14th and 15th fields, in clock ticks.
    fn cpu_time(&self) -> Duration {
        // SAFETY: sysconf only reads a setting.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_millis((self.field(14) + self.field(15)) * 1000 / ticks)
    }
}

/// Polls `check` until it returns `Some`, or fails after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The repository's own plugins.toml, pointed at the built components and
/// with `edit` applied (to change settings for a test).
pub fn shop_config(edit: impl FnOnce(String) -> String) -> impl FnOnce(&Ports, &Path) -> String {
    repo_config("plugins.toml", edit)
}

/// A plugins file of the repository (`plugins.toml`,
/// `plugins.production.toml`), as [`shop_config`] makes it.
pub fn repo_config(
    file: &'static str,
    edit: impl FnOnce(String) -> String,
) -> impl FnOnce(&Ports, &Path) -> String {
    move |_, _| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let components = component("identity").parent().unwrap().to_owned();
        edit(
            text.replace(
                "\"target/wasm32-wasip2/component/",
                &format!("\"{}/", components.display()),
            )
            .replace("\"docs/", &format!("\"{}/docs/", root.display())),
        )
    }
}

/// A stand-in for an outside HTTP service (payment provider, email
/// webhook): records every request and answers with `reply`.
pub struct Recorder {
    pub port: u16,
    pub requests: std::sync::Arc<std::sync::Mutex<Vec<Recorded>>>,
}

#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    pub idempotency_key: Option<String>,
    pub traceparent: Option<String>,
    pub body: serde_json::Value,
}

impl Recorder {
    pub async fn start(reply: serde_json::Value) -> Recorder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = requests.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (log, reply) = (log.clone(), reply.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (log, reply) = (log.clone(), reply.clone());
                            async move {
                                let path = req.uri().path().to_owned();
                                let header = |name: &str| {
                                    req.headers()
                                        .get(name)
                                        .and_then(|v| v.to_str().ok())
                                        .map(str::to_owned)
                                };
                                let key = header("idempotency-key");
                                let traceparent = header("traceparent");
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                log.lock().unwrap().push(Recorded {
                                    path,
                                    idempotency_key: key,
                                    traceparent,
                                    body: serde_json::from_slice(&body).unwrap_or_default(),
                                });
                                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                    Bytes::from(reply.to_string()),
                                )))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Recorder { port, requests }
    }

    pub fn recorded(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

/// A span as an OTLP collector receives it.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    /// OTLP's: 2 server, 3 client, 5 consumer.
    pub kind: i32,
    pub attributes: std::collections::BTreeMap<String, String>,
}

/// A small OTLP/HTTP collector: takes `POST /v1/traces` (protobuf) and
/// keeps the spans.
pub struct Collector {
    pub port: u16,
    spans: std::sync::Arc<std::sync::Mutex<Vec<ReceivedSpan>>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Collector {
    pub async fn start() -> Collector {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use prost::Message;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = spans.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let kept = kept.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let kept = kept.clone();
                            async move {
                                assert_eq!(req.uri().path(), "/v1/traces");
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let export = ExportTraceServiceRequest::decode(body).unwrap();
                                let mut kept = kept.lock().unwrap();
                                for resource in export.resource_spans {
                                    for scope in resource.scope_spans {
                                        for span in scope.spans {
                                            let attributes = span
                                                .attributes
                                                .iter()
                                                .map(|kv| {
                                                    use opentelemetry_proto::tonic::common::v1::any_value::Value;
                                                    let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                                                        Some(Value::StringValue(s)) => s.clone(),
                                                        Some(Value::IntValue(i)) => i.to_string(),
                                                        other => format!("{other:?}"),
                                                    };
                                                    (kv.key.clone(), value)
                                                })
                                                .collect();
                                            kept.push(ReceivedSpan {
                                                trace_id: hex(&span.trace_id),
                                                span_id: hex(&span.span_id),
                                                parent_span_id: hex(&span.parent_span_id),
                                                name: span.name,
                                                kind: span.kind,
                                                attributes,
                                            });
                                        }
                                    }
                                }
                                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                    Bytes::new(),
                                )))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Collector { port, spans }
    }

    /// The spans of one trace received so far.
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        let spans = self.spans.lock().unwrap();
        spans
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

/// A call of the hostile component's `route` (`components/hostile`).
pub async fn hostile(host: &TestHost, route: &str, body: serde_json::Value) -> Reply {
    post_json(&host.url(&format!("/hostile/{route}")), &body).await
}

/// Asserts that the hostile component's call was refused with `reason`, and
/// that the message shows no path of the host's.
pub fn assert_refused(host: &TestHost, what: &str, reply: &Reply, reason: &str) {
    assert_eq!(reply.status, 422, "{what}: {}", reply.text());
    let message = reply.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.contains(reason),
        "{what}: refused with {message:?}, not for {reason:?}"
    );
    let dir = host.dir.path().to_string_lossy();
    assert!(!message.contains(&*dir), "{what}: shows a path: {message}");
}

/// The rows of `sql` in a component's database, read directly from its file.
pub fn rows(database: &Path, sql: &str) -> Vec<Vec<String>> {
    let conn =
        rusqlite::Connection::open_with_flags(database, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut stmt = conn.prepare(sql).unwrap();
    let columns = stmt.column_count();
    let rows = stmt
        .query_map([], |r| {
            (0..columns)
                .map(|i| {
                    Ok(match r.get_ref(i)? {
                        rusqlite::types::ValueRef::Null => "NULL".to_owned(),
                        rusqlite::types::ValueRef::Integer(n) => n.to_string(),
                        rusqlite::types::ValueRef::Real(f) => f.to_string(),
                        rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                            String::from_utf8_lossy(t).into_owned()
                        }
                    })
                })
                .collect()
        })
        .unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

/// A component's database file in the host's data directory.
/// A component database's schema and migration ledger, to compare before
/// and after a change that must leave both alone.
/// A component's schema and its migration ledger, on whichever backend the
/// host's storage is: to show that a refused change altered neither.
pub fn schema_and_ledger(host: &TestHost, component: &str) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
    match &host.namespace {
        Some(ns) => (
            psql_rows(&format!(
                "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns \
                 WHERE table_schema = '{ns}_{component}' ORDER BY 1, 2"
            )),
            psql_rows(&format!(
                "SELECT name, checksum FROM \"{ns}\".migrations WHERE component = '{component}' ORDER BY name"
            )),
        ),
        None => {
            let database = database(host, component);
            (
                rows(
                    &database,
                    "SELECT type, name, sql FROM sqlite_master ORDER BY name",
                ),
                rows(
                    &database,
                    "SELECT name, checksum FROM _agora_migrations ORDER BY name",
                ),
            )
        }
    }
}

/// The rows of `sql` run as the host's PostgreSQL role.
pub fn psql_rows(sql: &str) -> Vec<Vec<String>> {
    let out = Command::new("psql")
        .args([POSTGRES_URL, "-qtAX", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| line.split('|').map(str::to_owned).collect())
        .collect()
}

pub fn database(host: &TestHost, component: &str) -> std::path::PathBuf {
    host.data_dir()
        .join("storage")
        .join(format!("{component}.db"))
}

/// A TCP proxy in front of a server that can be cut (every connection
/// dropped, new ones refused) and restored: an outage of the server as the
/// host sees it, without stopping the server other tests use.
pub struct Outage {
    pub port: u16,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    generation: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
}

impl Outage {
    /// A proxy to `target` (`host:port`) on a port of its own.
    pub async fn start(target: &str) -> Outage {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let generation = Arc::new(generation);
        let (d, g, target) = (down.clone(), generation.clone(), target.to_owned());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                if d.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let mut cut = g.subscribe();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Outage {
            port,
            down,
            generation,
        }
    }

    pub fn cut(&self) {
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.down.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The production backends for one deployment under `namespace`: storage
/// and coordination on the PostgreSQL, the cache on the Redis, messaging on
/// the Kafka at `brokers` (under a topic prefix of the namespace's), as
/// `scripts/services` sets them up. `coordination` adds settings to its table.
/// Pools of 4 per component: several hosts of the shop's six components
/// share one server of PostgreSQL's default 100 connections here (compose
/// raises it to 300), and under load each pool fills up.
pub fn server_backends(namespace: &str, brokers: &str, coordination: &str) -> String {
    format!(
        "[backends.storage]\nkind = \"postgres\"\nurl = \"{POSTGRES_URL}\"\nnamespace = \"{namespace}\"\n\
         max_connections_per_component = 4\n\
         [backends.cache]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\nkey_prefix = \"{namespace}/\"\n\
         [backends.messaging]\nkind = \"kafka\"\nbrokers = \"{brokers}\"\n\
         topic_prefix = \"{namespace}.\"\nfetch_max_wait_ms = 20\n\
         [backends.coordination]\nkind = \"postgres\"\nurl = \"{POSTGRES_URL}\"\n\
         namespace = \"{namespace}\"\n{coordination}"
    )
}

/// A JSON request with an optional bearer token, whose connection may fail
/// (a host that was killed).
pub async fn try_json(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> Result<Reply, Box<dyn std::error::Error + Send + Sync>> {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(b) = &bearer {
        headers.push(("authorization", b.as_str()));
    }
    let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    try_request(method, url, &headers, body).await
}

/// [`try_json`] where the connection must not fail.
pub async fn json_call(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> Reply {
    try_json(method, url, token, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

/// The value of one series (name and labels, exactly as the exposition
/// writes them) in a metrics scrape.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// `GET /metrics` from the host's admin listener.
pub async fn scrape(host: &TestHost) -> String {
    let reply = host.admin("GET", "/metrics", Vec::new()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(reply.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    reply.text()
}
