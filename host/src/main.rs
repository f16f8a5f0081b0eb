//! `agora`: the command line. `up` serves, `check` validates, and `deploy`,
//! `rollback`, `rewind` and `events` talk to a running host's admin API.
//!
//! Run beside a host (the same plugins.toml, found like `up` finds it), the
//! admin commands need no flags: the admin address comes from
//! `host.admin_listen` and the token from `<data_dir>/admin.token`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use agora_host::admin::Admin;
use agora_host::plugins::Plugins;
use agora_host::runtime::Runtime;
use agora_host::{admin, client, develop, scaffold, server, telemetry, watch};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::{Method, Request};

#[derive(Parser)]
#[command(
    name = "agora",
    version,
    about = "Hosts e-commerce services as WebAssembly components"
)]
struct Cli {
    /// How log lines are written: `text` for people, `json` (one object a
    /// line) for log shippers.
    #[arg(long, global = true, value_enum, env = "AGORA_LOG_FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// How the admin commands find the host's admin API and its token.
#[derive(clap::Args)]
struct AdminArgs {
    /// The host's plugins.toml, for its admin address and data directory.
    #[arg(long, env = "AGORA_CONFIG", default_value = "plugins.toml")]
    config: PathBuf,
    /// The host's data directory (if `up` was given `--data`).
    #[arg(long, env = "AGORA_DATA")]
    data: Option<PathBuf>,
    /// The admin API's URL (default: from host.admin_listen).
    #[arg(long, env = "AGORA_ADMIN")]
    admin: Option<String>,
    /// A file holding the admin token (default: <data_dir>/admin.token).
    /// The token itself may be given in AGORA_ADMIN_TOKEN instead; there is
    /// no flag for it, so it never shows in the process list.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the components of plugins.toml, hot-swapping them as they change.
    Up {
        #[arg(long, env = "AGORA_CONFIG", default_value = "plugins.toml")]
        config: PathBuf,
        /// Public address (overrides host.listen).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Admin address (overrides host.admin_listen).
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
        /// Data directory (overrides host.data_dir).
        #[arg(long, env = "AGORA_DATA")]
        data: Option<PathBuf>,
        /// Run each component's build command first.
        #[arg(long)]
        build: bool,
        /// Build first, then rebuild a component and swap it in whenever
        /// its sources (`watch` in plugins.toml) change. A failed build
        /// leaves the serving version in place.
        #[arg(long)]
        watch: bool,
    },
    /// Create a component crate from a template (a router, a migration and
    /// a subscriber) and add its table to plugins.toml.
    New {
        name: String,
        #[arg(long, env = "AGORA_CONFIG", default_value = "plugins.toml")]
        config: PathBuf,
        /// Where component crates go, relative to plugins.toml.
        #[arg(long, default_value = "components")]
        dir: PathBuf,
        /// The guest SDK crate (default: <dir>/sdk).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Validate plugins.toml and load every component (compile, check grants,
    /// link, apply migrations to a scratch database) without serving.
    Check {
        #[arg(long, env = "AGORA_CONFIG", default_value = "plugins.toml")]
        config: PathBuf,
    },
    /// Deploy a new binary of a component to a running host.
    Deploy {
        name: String,
        file: PathBuf,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Restore a component's previous version on a running host.
    Rollback {
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Make a subscriber handle a topic's events again, from offset `to`.
    Rewind {
        topic: String,
        component: String,
        #[arg(long, default_value_t = 0)]
        to: u64,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print a topic's events (dead letters: `dead-letter.<component>`).
    Events {
        topic: String,
        #[arg(long, default_value_t = 0)]
        from: u64,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Lines are written by a thread of their own, so a request never waits
    // on stdout's lock or its write (a fifth of a hello-world request's
    // cost). Not lossy: when the thread falls 128k lines behind, loggers
    // wait for it rather than drop lines. Flushed when `_flushed` drops,
    // as `main` returns.
    let (stdout, _flushed) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("agora-log")
        .finish(std::io::stdout());
    let logs = tracing_subscriber::fmt()
        .with_writer(stdout)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,wasmtime=warn,cranelift=warn".into()),
        );
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Up {
            config,
            listen,
            admin_listen,
            data,
            build,
            watch,
        } => {
            let plugins_path = std::path::absolute(&config)?;
            let plugins = Plugins::load(&plugins_path)?;
            if build || watch {
                let all: Vec<String> = plugins.components.keys().cloned().collect();
                match develop::build(&plugins, &all).await {
                    Ok(()) => {}
                    // Watching: serve what was built before, and try again
                    // at the next change.
                    Err(e) if watch => tracing::error!(error = %format!("{e:#}"), "a build failed"),
                    Err(e) => return Err(e),
                }
            }
            let data_dir = resolve_data_dir(&plugins, data)?;
            up(
                plugins.clone(),
                &plugins_path,
                &data_dir,
                listen.unwrap_or(plugins.host.listen),
                admin_listen.unwrap_or(plugins.host.admin_listen),
                watch,
            )
            .await
        }
        Command::New {
            name,
            config,
            dir,
            sdk,
        } => {
            let made = scaffold::create(&scaffold::NewComponent {
                name: &name,
                plugins: &config,
                dir: &dir,
                sdk: sdk.as_deref(),
            })?;
            println!("created {}", made.crate_dir.display());
            println!("added [components.{name}] to {}", config.display());
            if !made.in_workspace {
                println!("the crate is a Cargo workspace of its own");
            }
            println!("serve it: agora up --watch   (then: curl localhost:8080/{name})");
            Ok(())
        }
        Command::Check { config } => {
            let plugins_path = std::path::absolute(&config)?;
            let mut plugins = Plugins::load(&plugins_path)?;
            // Loading applies migrations: against the embedded backends in a
            // scratch directory, so that a check never changes the
            // operator's databases.
            if !plugins.backends.all_embedded() {
                println!(
                    "server backends are not contacted: components are loaded on the embedded ones"
                );
                plugins.backends = Default::default();
            }
            let scratch = tempdir()?;
            let runtime = match Runtime::start(plugins, &plugins_path, &scratch).await {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&scratch);
                    return Err(e);
                }
            };
            for (name, c) in &runtime.registry().components {
                println!(
                    "ok  {name}  version {}  routes {:?}",
                    c.version, c.spec.routes
                );
            }
            // The relays and consumers use the scratch directory until then.
            runtime.capabilities.shutdown().await;
            let _ = std::fs::remove_dir_all(&scratch);
            Ok(())
        }
        Command::Deploy { name, file, admin } => {
            let wasm =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let reply = admin_call(
                admin,
                Method::POST,
                &format!("/components/{name}/deploy"),
                wasm,
            )
            .await?;
            println!(
                "deployed {name} version {} in {:.1} ms",
                reply["version"].as_str().unwrap_or("?"),
                reply["swap_ms"].as_f64().unwrap_or(0.0)
            );
            Ok(())
        }
        Command::Rollback { name, admin } => {
            let reply = admin_call(
                admin,
                Method::POST,
                &format!("/components/{name}/rollback"),
                vec![],
            )
            .await?;
            println!(
                "rolled back {name} to version {}",
                reply["version"].as_str().unwrap_or("?")
            );
            Ok(())
        }
        Command::Rewind {
            topic,
            component,
            to,
            admin,
        } => {
            let path = format!("/topics/{topic}/subscribers/{component}/rewind?to={to}");
            admin_call(admin, Method::POST, &path, vec![]).await?;
            println!("{component} will handle {topic} again from offset {to}");
            Ok(())
        }
        Command::Events { topic, from, admin } => {
            let reply = admin_call(
                admin,
                Method::GET,
                &format!("/topics/{topic}/events?from={from}"),
                vec![],
            )
            .await?;
            println!("{}", serde_json::to_string_pretty(&reply["events"])?);
            Ok(())
        }
    }
}

async fn up(
    plugins: Plugins,
    plugins_path: &Path,
    data_dir: &Path,
    listen: SocketAddr,
    admin_listen: SocketAddr,
    watch_sources: bool,
) -> Result<()> {
    // Before the admin listener: whoever can connect finds the token.
    let token = admin::load_or_create_token(data_dir)?;
    let public = server::bind(listen, "public API").await?;
    let admin_listener = server::bind(admin_listen, "admin API").await?;
    let (public_limits, admin_limits) = (
        server::Limits::public(&plugins.host),
        server::Limits::admin(&plugins.host),
    );
    let exporting = telemetry::init(&plugins.telemetry)?;
    let runtime = Runtime::start(plugins, plugins_path, data_dir).await?;
    let admin = Arc::new(Admin::new(runtime.clone(), token));
    watch::start(runtime.clone())?;
    if watch_sources {
        develop::watch_sources(runtime.clone())?;
    }
    tracing::info!(
        public = %public.local_addr()?,
        admin = %admin_listener.local_addr()?,
        data = %data_dir.display(),
        pooling_allocator = runtime.pooling,
        "agora is serving"
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let rt = runtime.clone();
    let public = tokio::spawn(server::serve(
        public,
        public_limits,
        move |req| server::handle(rt.clone(), req),
        stopped.clone(),
    ));
    let admin_server = tokio::spawn(server::serve(
        admin_listener,
        admin_limits,
        move |req| admin::handle(admin.clone(), req),
        stopped,
    ));
    shutdown_signal().await;
    tracing::info!("shutting down: finishing requests in flight");
    stop.send_replace(true);
    let _ = tokio::join!(public, admin_server);
    runtime.until_idle(GUESTS_GRACE).await;
    runtime.capabilities.shutdown().await;
    tokio::task::spawn_blocking(move || exporting.shutdown()).await?;
    Ok(())
}

/// How long a stopping host waits for guests still running once the
/// servers have drained (those whose clients went away): as long as a
/// default deadline, so such a guest ends by its deadline, not by the stop.
const GUESTS_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("agora-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The data directory: `--data`, else `host.data_dir` from plugins.toml.
fn resolve_data_dir(plugins: &Plugins, data: Option<PathBuf>) -> Result<PathBuf> {
    let dir = data.unwrap_or_else(|| plugins.resolve(&plugins.host.data_dir));
    Ok(std::path::absolute(dir)?)
}

/// Where a host's admin API is, and the token it wants.
struct AdminApi {
    base: String,
    token: String,
}

impl AdminArgs {
    /// Finds the admin API: flags and environment first, then the host's
    /// plugins.toml (read only if they leave something open).
    fn resolve(self) -> Result<AdminApi> {
        let plugins = || -> Result<Plugins> {
            Plugins::load(&std::path::absolute(&self.config)?).context(
                "finding the host's admin API: run beside its plugins.toml or pass --config \
                 (or --admin with --data, --admin-token-file or AGORA_ADMIN_TOKEN)",
            )
        };
        let base = match self.admin {
            Some(base) => base,
            None => {
                let mut addr = plugins()?.host.admin_listen;
                // A host listening on every interface is reached on loopback.
                if addr.ip().is_unspecified() {
                    addr.set_ip(match addr {
                        SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                        SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                    });
                }
                format!("http://{addr}")
            }
        };
        let token = match (self.admin_token_file, std::env::var("AGORA_ADMIN_TOKEN")) {
            (Some(file), _) => read_token_file(&file)?,
            (None, Ok(token)) => token.trim().to_owned(),
            (None, Err(_)) => {
                let data = match self.data {
                    Some(data) => std::path::absolute(data)?,
                    None => resolve_data_dir(&plugins()?, None)?,
                };
                read_token_file(&data.join(admin::TOKEN_FILE))?
            }
        };
        Ok(AdminApi { base, token })
    }
}

fn read_token_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "reading the admin token {} (the host makes it on its first start)",
            path.display()
        )
    })?;
    admin::read_token(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The admin API's largest reply: a topic's events, each at most 256 KiB,
/// a page at a time.
const ADMIN_REPLY_LIMIT: usize = 256 * 1024 * 1024;

/// One request to a running host's admin API.
async fn admin_call(
    admin: AdminArgs,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> Result<serde_json::Value> {
    let AdminApi { base, token } = admin.resolve()?;
    let uri: http::Uri = format!("{}{path}", base.trim_end_matches('/'))
        .parse()
        .with_context(|| format!("`{base}` is not a URL"))?;
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Bytes::from(body))?;
    let response = client::send(request, ADMIN_REPLY_LIMIT)
        .await
        .with_context(|| {
            format!("cannot reach the admin API at {base} (is `agora up` running?)")
        })?;
    let status = response.status();
    let bytes = response.into_body();
    let reply: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
    });
    if !status.is_success() {
        let message = reply["error"]["message"].as_str().map(str::to_owned);
        bail!("{status}: {}", message.unwrap_or_else(|| reply.to_string()));
    }
    Ok(reply)
}
