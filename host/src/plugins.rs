//! `plugins.toml`: which components run, their routes, grants, limits and
//! settings, and which backend serves each capability.
//!
//! Parsing is strict (`deny_unknown_fields`): a misspelt key is an error that
//! names it, not a silently ignored setting. Every default lives on the field
//! it belongs to, with the reason for its value. Relative paths are resolved
//! against the directory of the file, so the host can be started from anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::gateway::{ClientAddressHeader, TrustedNet};
use crate::registry::canonical_path;
use crate::telemetry::TelemetrySettings;

#[derive(Debug, thiserror::Error)]
pub enum PluginsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// A capability a component can be granted, by its name in `grants`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Grant {
    Storage,
    Cache,
    Messaging,
    /// Verifying tokens (`agora:platform/tokens`).
    Tokens,
    /// Issuing tokens (`agora:platform/token-issuer`), with only the roles
    /// in `issues_roles`.
    TokensIssue,
    Config,
    HttpOut,
}

impl Grant {
    pub fn name(self) -> &'static str {
        match self {
            Grant::Storage => "storage",
            Grant::Cache => "cache",
            Grant::Messaging => "messaging",
            Grant::Tokens => "tokens",
            Grant::TokensIssue => "tokens-issue",
            Grant::Config => "config",
            Grant::HttpOut => "http-out",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plugins {
    #[serde(default)]
    pub host: HostSettings,
    #[serde(default)]
    pub backends: Backends,
    #[serde(default)]
    pub tokens: TokenSettings,
    /// Traces (OpenTelemetry over OTLP); off unless an endpoint is set.
    #[serde(default)]
    pub telemetry: TelemetrySettings,
    #[serde(default)]
    pub components: BTreeMap<String, ComponentSpec>,
    /// Directory of the plugins file; relative paths are resolved against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostSettings {
    /// Public HTTP listener. Loopback by default: exposing the shop is a
    /// deliberate act (`--listen 0.0.0.0:8080` or this key).
    pub listen: SocketAddr,
    /// Admin API (deploy, rollback, topic inspection). Loopback by default
    /// because it can replace code; never put it on a public interface.
    pub admin_listen: SocketAddr,
    /// Embedded databases, the message log, compiled code and the token key.
    pub data_dir: PathBuf,
    /// An OpenAPI document served at `/openapi.json`, read on each request
    /// so it is as current as the file.
    pub openapi: Option<PathBuf>,
    /// Seconds a client has to send a request's head (request line and
    /// headers): from when the connection opens until its first request, and
    /// in HTTP/1.1 again while a kept-alive connection waits for the next
    /// one. A real client sends its head in one packet; 10 s allows for a
    /// lossy mobile link while a slow-loris client holds a connection for no
    /// longer than that.
    pub header_read_timeout_seconds: u64,
    /// Seconds a client has to send a request's whole body, answered with
    /// 408 beyond. 30 s moves the default 1 MiB limit at 35 KB/s, slower
    /// than any working link, while a client trickling a body cannot hold
    /// its connection for longer.
    pub body_read_timeout_seconds: u64,
    /// Seconds a connection may stay open with no request in flight before
    /// the host closes it (HTTP/2 gets a GOAWAY first). 30 s lets a browser
    /// reuse its connection across page views; an idle connection costs a
    /// file descriptor. In HTTP/1.1 the header timeout runs while waiting
    /// too, so there the smaller of the two applies.
    pub idle_timeout_seconds: u64,
    /// Seconds a response may wait on its client, which accepts no byte of
    /// it (a full socket, an HTTP/2 window held at 0), before the host cuts
    /// the connection. Without it a client that stops reading holds its
    /// connection forever, since a request in flight is never idle. 30 s
    /// outlasts the stalls of a working link (TCP retransmits in well under
    /// that); time a component takes to produce its response is not counted.
    pub response_write_timeout_seconds: u64,
    /// Open connections on the public listener. Further clients wait in the
    /// kernel's accept queue, not refused, and are served as others close
    /// (the timeouts above make sure they do). 1024 fits the usual
    /// open-file limit; at start the cap is lowered, with a warning, to
    /// leave descriptors for the host's own files when `ulimit -n` is lower.
    pub max_connections: u32,
    /// Concurrent streams (requests) on one HTTP/2 connection; a client
    /// opening more gets `REFUSED_STREAM`. Each stream may hold a request
    /// body while it is read, before `max_waiting_requests` counts it, so
    /// request bodies being read take at most `max_connections` x this x
    /// `limits.max_body_kib`. 32 (hyper's default is 200) lets a browser
    /// fetch a page's assets in parallel, bounding that at 32 GiB with the
    /// other defaults; lower it, or `max_connections`, on a small machine.
    pub http2_max_concurrent_streams: u32,
    /// Requests that may wait for an instance slot of one component (its
    /// `limits.max_concurrency` busy); beyond it the host answers 503 with
    /// `Retry-After` at once. A waiting request holds its body, so this
    /// bounds that memory at `max_waiting_requests` x `limits.max_body_kib`
    /// per component; 128 rides out a burst of twice the default
    /// concurrency. 0 refuses whatever finds every slot busy.
    pub max_waiting_requests: u32,
    /// The proxies and load balancers in front of the host: addresses
    /// (`10.0.0.5`) or networks (`10.0.0.0/8`). A request that comes from
    /// one of them is taken to come from the client they name in
    /// `client_address_header`, for rate limits and the request log; from
    /// anyone else that header is ignored, since any client can write it.
    /// Empty (the default): the connection's peer is the client.
    pub trusted_proxies: Vec<TrustedNet>,
    /// The header the trusted proxies name the client in:
    /// `x-forwarded-for` (the default) or `forwarded` (RFC 7239).
    pub client_address_header: ClientAddressHeader,
}

impl Default for HostSettings {
    fn default() -> Self {
        HostSettings {
            listen: ([127, 0, 0, 1], 8080).into(),
            admin_listen: ([127, 0, 0, 1], 8081).into(),
            data_dir: PathBuf::from(".agora"),
            openapi: None,
            header_read_timeout_seconds: 10,
            body_read_timeout_seconds: 30,
            idle_timeout_seconds: 30,
            response_write_timeout_seconds: 30,
            max_connections: 1024,
            http2_max_concurrent_streams: 32,
            max_waiting_requests: 128,
            trusted_proxies: Vec::new(),
            client_address_header: ClientAddressHeader::default(),
        }
    }
}

/// Which backend serves each capability. The embedded ones need no server.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Backends {
    pub storage: crate::storage::BackendConfig,
    pub cache: crate::cache::BackendConfig,
    pub messaging: crate::messaging::BackendConfig,
    /// How several hosts share consumers and outbox relays; `local` (this
    /// host alone) by default.
    pub coordination: crate::coordination::BackendConfig,
}

impl Backends {
    /// Whether every capability is on an embedded backend (one that needs
    /// no server).
    pub fn all_embedded(&self) -> bool {
        self.storage.embedded()
            && self.cache.embedded()
            && self.messaging.embedded()
            && self.coordination.embedded()
    }
}

/// What an acknowledged write of an embedded backend (a commit, a publish)
/// survives: `durability = "process-crash"` or `"machine-crash"`.
///
/// Whatever the setting, components stay consistent with each other after a
/// machine crash: an event leaves a component's outbox only once the
/// transaction that wrote it is on disk, and its outbox row is removed only
/// once the broker's copy is. The setting decides what a client's
/// acknowledged write survives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// A crash of the host process, always; a crash of the machine (power
    /// loss, kernel panic) can take the last commits, never corrupt the
    /// data. SQLite WAL with `synchronous = NORMAL`: a commit is in the OS
    /// when it is acknowledged and reaches the disk at the next checkpoint.
    /// The default: on this project's reference machine a single connection
    /// committed about 28,000 inserts a second this way against about 760
    /// with an fsync per commit, and a host process crashes (a bug, an OOM
    /// kill, a deploy) far more often than its machine does.
    #[default]
    ProcessCrash,
    /// A crash of the machine too: every commit is fsynced before it is
    /// acknowledged (`synchronous = FULL`), at the cost above. For data
    /// that must survive power loss on one machine; or use PostgreSQL.
    MachineCrash,
}

/// One backend of a capability as `[backends.<capability>]` chooses it: its
/// `kind` and how its own settings are read (strictly: each backend's
/// settings struct denies unknown keys). A backend's file declares one; its
/// capability lists them. `S` is the capability's settings trait.
pub struct BackendKind<S: ?Sized> {
    pub kind: &'static str,
    pub parse: fn(toml::Table) -> Result<Box<S>, toml::de::Error>,
}

/// The backends of one capability: what `[backends.<capability>]` may
/// choose. Implemented on the capability's settings trait object (`dyn
/// CacheSettings`, say), so that [`BackendConfig`] serves every capability.
pub trait BackendRegistry {
    /// The capability's name in `[backends.<capability>]`.
    const CAPABILITY: &'static str;
    /// Every backend, by `kind`.
    fn kinds() -> &'static [BackendKind<Self>];
    /// The settings when the table is absent: the embedded backend.
    fn default_settings() -> Arc<Self>;
}

/// `[backends.<capability>]`: the chosen backend's settings (`S` is the
/// capability's settings trait object), read strictly by the backend's own
/// struct; the embedded backend by default.
pub struct BackendConfig<S: ?Sized>(Arc<S>);

impl<S: ?Sized> Clone for BackendConfig<S> {
    fn clone(&self) -> Self {
        BackendConfig(self.0.clone())
    }
}

impl<S: ?Sized + std::fmt::Debug> std::fmt::Debug for BackendConfig<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<S: ?Sized + BackendRegistry> Default for BackendConfig<S> {
    fn default() -> Self {
        BackendConfig(S::default_settings())
    }
}

impl<S: ?Sized> BackendConfig<S> {
    pub fn new(settings: Arc<S>) -> Self {
        BackendConfig(settings)
    }
}

impl<S: ?Sized> std::ops::Deref for BackendConfig<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.0
    }
}

impl<'de, S: ?Sized + BackendRegistry + 'static> Deserialize<'de> for BackendConfig<S> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let table = toml::Table::deserialize(deserializer)?;
        choose_backend(S::CAPABILITY, S::kinds(), table)
            .map(|settings| BackendConfig(settings.into()))
            .map_err(serde::de::Error::custom)
    }
}

/// Reads `[backends.<capability>]` with the backend its `kind` names. Errors
/// name the capability and the backend, e.g. "unknown field `urll`, expected
/// one of `url`, ... (the `redis` cache backend)".
pub fn choose_backend<S: ?Sized>(
    capability: &str,
    kinds: &[BackendKind<S>],
    mut table: toml::Table,
) -> Result<Box<S>, String> {
    let known = || {
        kinds
            .iter()
            .map(|k| format!("`{}`", k.kind))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let kind = match table.remove("kind") {
        Some(toml::Value::String(kind)) => kind,
        Some(_) => return Err(format!("`kind` must be a string: one of {}", known())),
        None => {
            return Err(format!(
                "`kind` is missing: the {capability} backend, one of {}",
                known()
            ))
        }
    };
    let backend = kinds.iter().find(|k| k.kind == kind).ok_or_else(|| {
        format!(
            "unknown {capability} backend `{kind}`: expected one of {}",
            known()
        )
    })?;
    (backend.parse)(table)
        .map_err(|e| format!("{} (the `{kind}` {capability} backend)", e.message()))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenSettings {
    /// `iss` of issued tokens; verification requires it.
    pub issuer: String,
    /// One hour: long enough for a shopping session, short enough that a
    /// leaked token is not a standing credential. Also the longest lifetime
    /// a component may ask for, so a component cannot mint a standing one.
    pub ttl_seconds: u64,
    /// HS256 key file. Created with 32 random bytes when missing, so tokens
    /// survive restarts; several hosts must share it. Default: `<data_dir>/tokens.key`.
    pub key_file: Option<PathBuf>,
    /// OpenID Connect providers whose tokens the gateway accepts beside the
    /// host's own, by a name of the operator's choosing (`[tokens.trusted_issuers.auth0]`).
    /// A user signed in there is `<name>:<subject>` to every component, so
    /// no provider can speak for a user of the host's or of another provider.
    pub trusted_issuers: BTreeMap<String, TrustedIssuerSettings>,
    /// The component that keeps user records: the host calls its
    /// `agora:platform/accounts` export the first time it sees a user of a
    /// trusted issuer, before the user's request reaches any component.
    pub accounts: Option<String>,
}

impl Default for TokenSettings {
    fn default() -> Self {
        TokenSettings {
            issuer: "agora".into(),
            ttl_seconds: 3600,
            key_file: None,
            trusted_issuers: BTreeMap::new(),
            accounts: None,
        }
    }
}

/// An OpenID Connect provider whose access or ID tokens (RS256 or ES256)
/// the gateway accepts.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedIssuerSettings {
    /// The tokens' `iss`, exactly (`https://example.eu.auth0.com/`).
    pub issuer: String,
    /// What `aud` must contain: the API's identifier at the provider.
    pub audience: String,
    /// Where the provider publishes its signing keys
    /// (`https://example.eu.auth0.com/.well-known/jwks.json`).
    pub jwks_url: String,
    /// The claim that identifies the user; `sub` by default, as OIDC says.
    #[serde(default = "default_user_claim")]
    pub user_claim: String,
    /// The claim that carries roles (a list of strings, or one string of
    /// space-separated names), e.g. Auth0's namespaced
    /// `"https://shop.example.com/roles"`. None by default.
    #[serde(default)]
    pub roles_claim: Option<String>,
    /// The roles of `roles_claim` that are believed; others are dropped, so
    /// a provider's admin is not the shop's unless listed here.
    #[serde(default)]
    pub allowed_roles: Vec<String>,
    /// Roles every user of this provider has (e.g. `["customer"]`).
    #[serde(default)]
    pub default_roles: Vec<String>,
    /// How long fetched keys are used before they are fetched again. An
    /// hour: providers publish a new key well before they sign with it,
    /// and a token naming a key not yet seen fetches the set at once.
    #[serde(default = "default_jwks_cache_seconds")]
    pub jwks_cache_seconds: u64,
}

fn default_user_claim() -> String {
    "sub".into()
}

fn default_jwks_cache_seconds() -> u64 {
    3600
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentSpec {
    /// The component binary (`.wasm`).
    pub wasm: PathBuf,
    /// Run by `agora up --build` (from the plugins file's directory) before loading.
    #[serde(default)]
    pub build: Option<String>,
    /// Sources (files or directories, relative to the plugins file) whose
    /// changes make `agora up --watch` run `build` again and swap in the
    /// result.
    #[serde(default)]
    pub watch: Vec<PathBuf>,
    /// Path prefixes routed to this component; the longest match wins.
    #[serde(default)]
    pub routes: Vec<String>,
    #[serde(default)]
    pub grants: BTreeSet<Grant>,
    /// Topics it may publish to (`"*"` for any). Needs the `messaging` grant.
    #[serde(default)]
    pub publishes: Vec<String>,
    /// Topics delivered to its `subscriber` export. Needs the `messaging` grant.
    #[serde(default)]
    pub subscribes: Vec<String>,
    /// Hosts (`name` or `name:port`) it may call. Needs the `http-out` grant.
    #[serde(default)]
    pub outbound_hosts: Vec<String>,
    /// Which component serves each `agora:shop/*` interface it imports,
    /// e.g. `{ "agora:shop/inventory" = "catalog" }`.
    #[serde(default)]
    pub links: BTreeMap<String, String>,
    /// Requests the host lets through only with a valid bearer token (and
    /// one of the roles, if given). The verified user reaches the component
    /// in `x-agora-user-id` and `x-agora-user-roles`, set by the host alone.
    #[serde(default)]
    pub auth: Vec<AuthRule>,
    /// Requests per client (see [`RateLimit::per`]) and time window.
    /// Counted in the cache backend, so on Redis the limit holds across hosts.
    #[serde(default)]
    pub rate_limits: Vec<RateLimit>,
    /// GET responses the gateway keeps in the cache backend and answers
    /// itself until they expire, or the component invalidates them.
    #[serde(default)]
    pub response_cache: Vec<ResponseCacheRule>,
    /// The roles it may put in the tokens it issues. Needs the `tokens-issue`
    /// grant; without this list it can issue only tokens without roles.
    /// A token is a credential the gateway trusts, so a component that may
    /// issue `admin` can make anyone an admin: list only what it must grant.
    #[serde(default)]
    pub issues_roles: Vec<String>,
    /// Read by the component through `agora:platform/config`.
    #[serde(default)]
    pub settings: BTreeMap<String, toml::Value>,
    /// The environment the component sees through WASI (`std::env`), and
    /// nothing of the host's: a standard wasi:http component that reads its
    /// settings from the environment runs unmodified. A value may name the
    /// host's variables (`"${TARGET_URL}"`), which is the only way one of
    /// them reaches a component.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub retry: RetryPolicy,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthRule {
    /// Path prefix, matched on whole segments like routes.
    pub prefix: String,
    /// Methods it covers; all when empty.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Roles of which the user needs one; any signed-in user when empty.
    #[serde(default)]
    pub roles: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Path prefix, matched on whole segments like routes.
    pub prefix: String,
    /// Methods it covers; all when empty.
    #[serde(default)]
    pub methods: Vec<String>,
    pub requests: u64,
    pub window_seconds: u64,
    /// Whom the requests are counted for; see [`RateLimitPer`].
    #[serde(default)]
    pub per: RateLimitPer,
}

/// A route's GET responses, kept by the gateway. The key is the path and
/// query, and the user when the request carries one, so no user is ever
/// answered with another's response. Only a `200` without `Set-Cookie` or
/// `Vary` is kept, and not when the component says `Cache-Control:
/// no-store`, `no-cache` or `private`; its `max-age` shortens the TTL.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseCacheRule {
    /// Path prefix, matched on whole segments like routes.
    pub prefix: String,
    /// How long a response is answered from the cache.
    pub ttl_seconds: u64,
    /// The largest body kept; larger responses pass through uncached.
    /// 256 KiB holds any product page while one response cannot take a
    /// large share of the cache.
    #[serde(default = "default_max_response_kib")]
    pub max_body_kib: u32,
}

fn default_max_response_kib() -> u32 {
    256
}

/// Whose requests a rate limit counts together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitPer {
    /// The signed-in user, else the client address (for IPv6, its /64,
    /// which one subscriber usually holds whole): users behind one
    /// address (an office, a carrier's NAT) each get their own budget.
    #[default]
    User,
    /// The client address, whatever token the request carries. For routes
    /// that guard credentials (login): there a token is no reason to trust
    /// the caller, and counting per user would give every account an
    /// attacker holds a budget of its own.
    Address,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Linear memory per instance. 64 MiB holds a JSON service's working set
    /// many times over while a memory bomb stops early.
    pub memory_mib: u32,
    /// Wall-clock deadline per request or message, enforced on CPU too
    /// (epoch interruption), so a tight loop stops. A request's runs from
    /// its arrival, a message's from when its instance slot is free. 10 s
    /// is far above a healthy handler and below a client's patience.
    pub timeout_ms: u64,
    /// Instances of this component running at once; further requests wait
    /// for a slot until their deadline, messages for as long as it takes
    /// (each whole deadline of waiting counted in `events_waited`, no
    /// attempt spent). Bounds memory at `memory_mib` times this.
    pub max_concurrency: u32,
    /// Largest request body accepted, answered with 413 beyond. 1 MiB fits
    /// any JSON API call; uploads belong elsewhere.
    pub max_body_kib: u32,
    /// Requests (or messages, or service calls) one instance may serve
    /// before it is replaced. 0, the default, is a fresh instance for each:
    /// nothing one request leaves in memory can reach the next. Above 0 an
    /// instance is kept warm and reused, which skips instantiation but lets
    /// state survive between requests of this component (never of
    /// another). An instance that trapped, ran out of time or memory, or
    /// still holds a host resource (an open transaction, a stream) when it
    /// returns is discarded, never reused.
    pub reuse: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_mib: 64,
            timeout_ms: 10_000,
            max_concurrency: 64,
            max_body_kib: 1024,
            reuse: 0,
        }
    }
}

/// How a failing subscriber is retried before its message is dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Deliveries before dead-lettering. Five rides out a brief outage of a
    /// dependency without holding up the topic for long. A delivery that
    /// found no free instance slot for a whole deadline ran no handler and
    /// is not counted: it waits again.
    pub max_attempts: u32,
    /// First backoff; doubled after each failure, capped at 30 s.
    pub backoff_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            backoff_ms: 200,
        }
    }
}

/// Paths the host answers itself; no component may claim them.
pub const RESERVED_ROUTES: &[&str] = &["/healthz", "/readyz", "/openapi.json"];

/// The prefix of service-to-service interfaces, linked with `links`.
pub const SHOP_INTERFACES: &str = "agora:shop/";

/// The most memory any one instance may be given. The pooling allocator
/// reserves address space for this per slot.
pub const MAX_MEMORY_MIB: u32 = 1024;

impl Plugins {
    pub fn load(path: &Path) -> Result<Plugins, PluginsError> {
        let text = std::fs::read_to_string(path).map_err(|source| PluginsError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses the file, substituting environment variables in its string
    /// values (see [`substitute_env`]) before the values reach their types,
    /// so a port, a path or a URL can each come from the environment.
    pub fn parse(text: &str, path: &Path) -> Result<Plugins, PluginsError> {
        let parse_error = |mut e: toml::de::Error| {
            // Spans point into the original text, so errors show the line as written.
            e.set_input(Some(text));
            PluginsError::Parse {
                path: path.to_owned(),
                message: e.to_string(),
            }
        };
        let mut root = toml::de::DeTable::parse(text).map_err(parse_error)?;
        substitute_table(root.get_mut(), &mut Vec::new(), &|name| {
            std::env::var(name).ok()
        })
        .map_err(|(key, message)| PluginsError::Invalid {
            path: path.to_owned(),
            key,
            message,
        })?;
        let mut plugins =
            Plugins::deserialize(toml::de::Deserializer::from(root)).map_err(parse_error)?;
        plugins.base_dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_owned();
        plugins.validate(path)?;
        Ok(plugins)
    }

    /// Resolves a path from the file against the file's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.base_dir.join(path)
        }
    }

    fn validate(&self, path: &Path) -> Result<(), PluginsError> {
        let invalid = |key: String, message: String| PluginsError::Invalid {
            path: path.to_owned(),
            key,
            message,
        };
        let host = &self.host;
        for (key, value) in [
            (
                "host.header_read_timeout_seconds",
                host.header_read_timeout_seconds,
            ),
            (
                "host.body_read_timeout_seconds",
                host.body_read_timeout_seconds,
            ),
            ("host.idle_timeout_seconds", host.idle_timeout_seconds),
            (
                "host.response_write_timeout_seconds",
                host.response_write_timeout_seconds,
            ),
            ("host.max_connections", host.max_connections.into()),
            (
                "host.http2_max_concurrent_streams",
                host.http2_max_concurrent_streams.into(),
            ),
        ] {
            if value == 0 {
                return Err(invalid(key.into(), "must be above 0".into()));
            }
        }
        self.validate_tokens()
            .map_err(|(key, message)| invalid(key, message))?;
        let mut route_owner: BTreeMap<&str, &str> = BTreeMap::new();
        for (name, spec) in &self.components {
            let key = |field: &str| format!("components.{name}.{field}");
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
            {
                return Err(invalid(
                    format!("components.{name}"),
                    "component names use a-z, 0-9, '-' and '_' only".into(),
                ));
            }
            if spec.wasm.as_os_str().is_empty() {
                return Err(invalid(key("wasm"), "must name a .wasm file".into()));
            }
            for (variable, value) in &spec.env {
                if variable.is_empty() || variable.contains(['=', '\0']) || value.contains('\0') {
                    return Err(invalid(
                        format!("{}.{variable}", key("env")),
                        "a variable's name must be non-empty without '=' or NUL, its value without NUL".into(),
                    ));
                }
            }
            for (i, route) in spec.routes.iter().enumerate() {
                check_canonical(route)
                    .map_err(|m| invalid(format!("{}[{i}]", key("routes")), m))?;
                if RESERVED_ROUTES.contains(&route.as_str()) {
                    return Err(invalid(
                        format!("{}[{i}]", key("routes")),
                        format!("route {route:?} is reserved by the host"),
                    ));
                }
                if let Some(other) = route_owner.insert(route, name) {
                    return Err(invalid(
                        format!("{}[{i}]", key("routes")),
                        format!("route {route:?} is already routed to component `{other}`"),
                    ));
                }
            }
            let needs = |list_empty: bool, field: &str, grant: Grant| {
                if !list_empty && !spec.grants.contains(&grant) {
                    Err(invalid(
                        key(field),
                        format!("needs the `{}` grant in `grants`", grant.name()),
                    ))
                } else {
                    Ok(())
                }
            };
            needs(spec.publishes.is_empty(), "publishes", Grant::Messaging)?;
            needs(spec.subscribes.is_empty(), "subscribes", Grant::Messaging)?;
            needs(
                spec.outbound_hosts.is_empty(),
                "outbound_hosts",
                Grant::HttpOut,
            )?;
            needs(
                spec.issues_roles.is_empty(),
                "issues_roles",
                Grant::TokensIssue,
            )?;
            if let Some(role) = spec.issues_roles.iter().find(|r| !is_role_name(r)) {
                return Err(invalid(
                    key("issues_roles"),
                    format!("{role:?} is not a role name (no spaces or commas)"),
                ));
            }
            for (i, topic) in spec.subscribes.iter().chain(&spec.publishes).enumerate() {
                if topic.is_empty() || topic.chars().any(char::is_whitespace) {
                    return Err(invalid(
                        key(if i < spec.subscribes.len() {
                            "subscribes"
                        } else {
                            "publishes"
                        }),
                        format!("{topic:?} is not a topic name"),
                    ));
                }
            }
            for (interface, target) in &spec.links {
                let key = format!("{}.\"{interface}\"", key("links"));
                if !interface.starts_with(SHOP_INTERFACES) || interface.contains('@') {
                    return Err(invalid(
                        key,
                        format!(
                            "links name `{SHOP_INTERFACES}<interface>` interfaces, without version"
                        ),
                    ));
                }
                if !self.components.contains_key(target) || target == name {
                    return Err(invalid(
                        key,
                        format!("`{target}` is not another component of this file"),
                    ));
                }
            }
            for (i, rule) in spec.auth.iter().enumerate() {
                let key = format!("{}[{i}]", key("auth"));
                check_canonical(&rule.prefix).map_err(|m| invalid(format!("{key}.prefix"), m))?;
                check_methods(&rule.methods).map_err(|m| invalid(format!("{key}.methods"), m))?;
            }
            for (i, rule) in spec.rate_limits.iter().enumerate() {
                let key = format!("{}[{i}]", key("rate_limits"));
                check_canonical(&rule.prefix).map_err(|m| invalid(format!("{key}.prefix"), m))?;
                check_methods(&rule.methods).map_err(|m| invalid(format!("{key}.methods"), m))?;
                if rule.requests == 0 || rule.window_seconds == 0 {
                    return Err(invalid(
                        key,
                        "`requests` and `window_seconds` must be above 0".into(),
                    ));
                }
            }
            for (i, rule) in spec.response_cache.iter().enumerate() {
                let key = format!("{}[{i}]", key("response_cache"));
                check_canonical(&rule.prefix).map_err(|m| invalid(format!("{key}.prefix"), m))?;
                if rule.ttl_seconds == 0 || rule.max_body_kib == 0 {
                    return Err(invalid(
                        key,
                        "`ttl_seconds` and `max_body_kib` must be above 0".into(),
                    ));
                }
            }
            let limits = &spec.limits;
            if limits.memory_mib == 0 || limits.memory_mib > MAX_MEMORY_MIB {
                return Err(invalid(
                    key("limits.memory_mib"),
                    format!("must be between 1 and {MAX_MEMORY_MIB}"),
                ));
            }
            if limits.timeout_ms == 0 {
                return Err(invalid(key("limits.timeout_ms"), "must be above 0".into()));
            }
            if limits.max_concurrency == 0 {
                return Err(invalid(
                    key("limits.max_concurrency"),
                    "must be above 0".into(),
                ));
            }
            if spec.retry.max_attempts == 0 {
                return Err(invalid(key("retry.max_attempts"), "must be above 0".into()));
            }
        }
        Ok(())
    }

    /// `[tokens]`: trusted issuers that can be told from the host's own
    /// tokens and from each other, and an `accounts` component that exists.
    fn validate_tokens(&self) -> Result<(), (String, String)> {
        let tokens = &self.tokens;
        if let Some(accounts) = &tokens.accounts {
            if !self.components.contains_key(accounts) {
                return Err((
                    "tokens.accounts".into(),
                    format!("`{accounts}` is not a component of this file"),
                ));
            }
        }
        let mut issuers = BTreeMap::new();
        for (name, trusted) in &tokens.trusted_issuers {
            let key = |field: &str| format!("tokens.trusted_issuers.{name}.{field}");
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err((
                    format!("tokens.trusted_issuers.{name}"),
                    "issuer names use a-z, A-Z, 0-9, '-' and '_' only (they prefix user ids)"
                        .into(),
                ));
            }
            if trusted.issuer.is_empty() || trusted.issuer == tokens.issuer {
                return Err((
                    key("issuer"),
                    "must be the provider's `iss`, and not the host's own `tokens.issuer`".into(),
                ));
            }
            if let Some(other) = issuers.insert(&trusted.issuer, name) {
                return Err((
                    key("issuer"),
                    format!("`{}` is trusted already as `{other}`", trusted.issuer),
                ));
            }
            if trusted.audience.is_empty() {
                return Err((key("audience"), "must not be empty".into()));
            }
            // Keys decide who signs in: they come over TLS, but from this
            // machine (a test provider, a local proxy).
            let url: Result<http::Uri, _> = trusted.jwks_url.parse();
            let acceptable = url
                .as_ref()
                .is_ok_and(|u| match (u.scheme_str(), u.host()) {
                    (Some("https"), Some(_)) => true,
                    (Some("http"), Some(host)) => {
                        host == "localhost"
                            || host
                                .trim_matches(['[', ']'])
                                .parse::<std::net::IpAddr>()
                                .is_ok_and(|ip| ip.is_loopback())
                    }
                    _ => false,
                });
            if !acceptable {
                return Err((
                    key("jwks_url"),
                    format!(
                        "`{}` is not an https:// URL (http:// only to this machine)",
                        trusted.jwks_url
                    ),
                ));
            }
            if trusted.user_claim.is_empty() {
                return Err((key("user_claim"), "must name a claim".into()));
            }
            if trusted.jwks_cache_seconds == 0 {
                return Err((key("jwks_cache_seconds"), "must be above 0".into()));
            }
            if let Some(role) = trusted
                .allowed_roles
                .iter()
                .chain(&trusted.default_roles)
                .find(|r| !is_role_name(r))
            {
                return Err((
                    key("allowed_roles"),
                    format!("{role:?} is not a role name (no spaces or commas)"),
                ));
            }
        }
        Ok(())
    }
}

/// Roles travel to components comma-separated in a header.
pub fn is_role_name(role: &str) -> bool {
    !role.is_empty()
        && !role
            .chars()
            .any(|c| c == ',' || c.is_whitespace() || c.is_control())
}

/// Substitutes every string value of a table, recursively; an error names
/// the key (as a dotted path) and what is wrong.
fn substitute_table(
    table: &mut toml::de::DeTable<'_>,
    path: &mut Vec<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), (String, String)> {
    for (key, value) in table.iter_mut() {
        path.push(key.get_ref().to_string());
        substitute_value(value.get_mut(), path, env)?;
        path.pop();
    }
    Ok(())
}

fn substitute_value(
    value: &mut toml::de::DeValue<'_>,
    path: &mut Vec<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), (String, String)> {
    match value {
        toml::de::DeValue::String(s) if s.contains('$') => {
            *s = substitute_env(s, env)
                .map_err(|m| (path.join("."), m))?
                .into();
        }
        toml::de::DeValue::Table(t) => substitute_table(t, path, env)?,
        toml::de::DeValue::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let last = path.pop().unwrap_or_default();
                path.push(format!("{last}[{i}]"));
                substitute_value(item.get_mut(), path, env)?;
                path.pop();
                path.push(last);
            }
        }
        _ => {}
    }
    Ok(())
}

/// Environment variables in a value of plugins.toml, so one file serves a
/// laptop and a container: `${NAME}` is the variable's value and an error
/// when it is unset; `${NAME:-default}` is the default when the variable is
/// unset or empty (as in a shell or Compose). `$${` stands for a literal
/// `${`. Any other `$` is kept as written (`$1` in SQL, a `$` in a
/// password), so no existing value changes meaning. Names are
/// `[A-Za-z_][A-Za-z0-9_]*`; defaults are taken literally (no nesting).
pub fn substitute_env(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
            continue;
        }
        let Some(body) = rest.strip_prefix("${") else {
            out.push('$');
            rest = &rest[1..];
            continue;
        };
        let end = body
            .find('}')
            .ok_or_else(|| format!("`${{` without a closing `}}` in {text:?}"))?;
        let (name, default) = match body[..end].split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (&body[..end], None),
        };
        let valid = name
            .chars()
            .enumerate()
            .all(|(i, c)| c == '_' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit()));
        if name.is_empty() || !valid {
            return Err(format!(
                "`${{{}}}` does not name an environment variable (write `${{NAME}}` or \
                 `${{NAME:-default}}`, and `$${{` for a literal `${{`)",
                &body[..end]
            ));
        }
        match (
            env(name).filter(|v| !v.is_empty() || default.is_none()),
            default,
        ) {
            (Some(value), _) => out.push_str(&value),
            (None, Some(default)) => out.push_str(default),
            (None, None) => {
                return Err(format!(
                    "environment variable `{name}` is not set (give a default with \
                     `${{{name}:-default}}`)"
                ))
            }
        }
        rest = &body[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Routes and rule prefixes are compared with canonical request paths (see
/// [`canonical_path`]), so one written otherwise would never match: an auth
/// rule on `/admin/` would silently protect nothing.
fn check_canonical(path: &str) -> Result<(), String> {
    match canonical_path(path) {
        Ok(canonical) if canonical == path => Ok(()),
        Ok(canonical) => Err(format!(
            "{path:?} is not a canonical path (write {canonical:?}): requests are matched \
             after the host normalizes their path"
        )),
        Err(_) if !path.starts_with('/') => Err(format!("{path:?} must start with '/'")),
        Err(e) => Err(format!("{path:?}: {e}")),
    }
}

/// Methods in rules are HTTP methods in capitals, as requests carry them.
fn check_methods(methods: &[String]) -> Result<(), String> {
    match methods
        .iter()
        .find(|m| http::Method::from_bytes(m.as_bytes()).is_err() || m.to_uppercase() != **m)
    {
        Some(m) => Err(format!("{m:?} is not an HTTP method in capitals")),
        None => Ok(()),
    }
}

impl ComponentSpec {
    pub fn granted(&self, grant: Grant) -> bool {
        self.grants.contains(&grant)
    }

    pub fn may_publish(&self, topic: &str) -> bool {
        self.publishes.iter().any(|t| t == "*" || t == topic)
    }

    /// Settings as the config capability hands them out: strings verbatim,
    /// anything else as JSON.
    pub fn settings_as_strings(&self) -> BTreeMap<String, String> {
        self.settings
            .iter()
            .map(|(k, v)| {
                let text = match v {
                    toml::Value::String(s) => s.clone(),
                    other => serde_json::to_string(other).unwrap_or_default(),
                };
                (k.clone(), text)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Plugins, PluginsError> {
        Plugins::parse(text, Path::new("/etc/agora/plugins.toml"))
    }

    #[test]
    fn defaults_fill_a_minimal_file() {
        let p =
            parse("[components.hello]\nwasm = \"hello.wasm\"\nroutes = [\"/hello\"]\n").unwrap();
        let hello = &p.components["hello"];
        assert_eq!(hello.limits, Limits::default());
        assert_eq!(p.resolve(&hello.wasm), Path::new("/etc/agora/hello.wasm"));
        assert_eq!(p.host.listen.port(), 8080);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("[components.hello]\nwasm = \"h.wasm\"\nroute = [\"/x\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `route`"), "{err}");
        assert!(err.contains("plugins.toml"), "{err}");
    }

    #[test]
    fn unknown_grant_is_named() {
        let err = parse("[components.a]\nwasm = \"a.wasm\"\ngrants = [\"sockets\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sockets"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("routes = [\"hello\"]", "components.a.routes[0]"),
            ("env = { \"A=B\" = \"x\" }", "components.a.env.A=B"),
            (
                "limits = { memory_mib = 0 }",
                "components.a.limits.memory_mib",
            ),
            (
                "limits = { timeout_ms = 0 }",
                "components.a.limits.timeout_ms",
            ),
            ("subscribes = [\"x\"]", "components.a.subscribes"),
            ("outbound_hosts = [\"x\"]", "components.a.outbound_hosts"),
            ("routes = [\"/healthz\"]", "components.a.routes[0]"),
            (
                "auth = [{ prefix = \"/a\", methods = [\"get\"] }]",
                "components.a.auth[0].methods",
            ),
            (
                "rate_limits = [{ prefix = \"/a\", requests = 0, window_seconds = 1 }]",
                "components.a.rate_limits[0]",
            ),
            ("routes = [\"/a/\"]", "components.a.routes[0]"),
            (
                "auth = [{ prefix = \"/a//b\" }]",
                "components.a.auth[0].prefix",
            ),
            (
                "rate_limits = [{ prefix = \"/a/%62\", requests = 1, window_seconds = 1 }]",
                "components.a.rate_limits[0].prefix",
            ),
            ("issues_roles = [\"admin\"]", "components.a.issues_roles"),
            (
                "grants = [\"tokens-issue\"]\nissues_roles = [\"a,b\"]",
                "components.a.issues_roles",
            ),
        ];
        for (line, key) in cases {
            let err = parse(&format!("[components.a]\nwasm = \"a.wasm\"\n{line}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{line}: {err}");
        }
    }

    #[test]
    fn a_non_canonical_prefix_names_its_canonical_form() {
        let err = parse("[components.a]\nwasm = \"a.wasm\"\nauth = [{ prefix = \"/admin/\" }]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("write \"/admin\""), "{err}");
    }

    #[test]
    fn rate_limits_count_per_user_unless_told_per_address() {
        let p = parse(
            "[components.a]\nwasm = \"a.wasm\"\nrate_limits = [\n\
             { prefix = \"/a\", requests = 1, window_seconds = 1 },\n\
             { prefix = \"/b\", requests = 1, window_seconds = 1, per = \"address\" },\n]\n",
        )
        .unwrap();
        let per: Vec<_> = p.components["a"]
            .rate_limits
            .iter()
            .map(|r| r.per)
            .collect();
        assert_eq!(per, [RateLimitPer::User, RateLimitPer::Address]);
    }

    #[test]
    fn trusted_issuers_are_told_apart_and_fetch_their_keys_over_tls() {
        let table = |name: &str, issuer: &str, jwks: &str| {
            format!(
                "[tokens.trusted_issuers.{name}]\nissuer = \"{issuer}\"\naudience = \"api\"\n\
                 jwks_url = \"{jwks}\"\n"
            )
        };
        let ok = table(
            "auth0",
            "https://id.example/",
            "https://id.example/jwks.json",
        ) + &table("local", "https://other.example/", "http://127.0.0.1:9/jwks")
            + &table("v6", "https://v6.example/", "http://[::1]:9/jwks");
        let p = parse(&ok).unwrap();
        assert_eq!(p.tokens.trusted_issuers["auth0"].user_claim, "sub");
        assert_eq!(p.tokens.trusted_issuers["local"].jwks_cache_seconds, 3600);
        for (bad, key, says) in [
            (
                table("a", "https://id.example/", "http://id.example/jwks.json"),
                "tokens.trusted_issuers.a.jwks_url",
                "https://",
            ),
            (
                table("a", "agora", "https://id.example/jwks.json"),
                "tokens.trusted_issuers.a.issuer",
                "host's own",
            ),
            (
                table("a", "https://id.example/", "https://x/j")
                    + &table("b", "https://id.example/", "https://x/j"),
                "tokens.trusted_issuers.b.issuer",
                "trusted already as `a`",
            ),
            (
                table("a:b", "https://id.example/", "https://x/j").replace("a:b", "\"a:b\""),
                "tokens.trusted_issuers.a:b",
                "prefix user ids",
            ),
            (
                "[tokens]\naccounts = \"nobody\"\n".to_owned(),
                "tokens.accounts",
                "not a component",
            ),
        ] {
            let err = parse(&bad).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn host_limits_of_zero_name_their_key() {
        for key in [
            "header_read_timeout_seconds",
            "body_read_timeout_seconds",
            "idle_timeout_seconds",
            "response_write_timeout_seconds",
            "max_connections",
            "http2_max_concurrent_streams",
        ] {
            let err = parse(&format!("[host]\n{key} = 0\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("host.{key}")), "{err}");
        }
        let p = parse("[host]\nmax_waiting_requests = 0\n").unwrap();
        assert_eq!(p.host.max_waiting_requests, 0);
    }

    #[test]
    fn a_route_claimed_twice_names_both_components() {
        let err = parse(
            "[components.a]\nwasm = \"a.wasm\"\nroutes = [\"/x\"]\n\
             [components.b]\nwasm = \"b.wasm\"\nroutes = [\"/x\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("components.b.routes[0]") && err.contains("`a`"),
            "{err}"
        );
    }

    #[test]
    fn durability_is_a_setting_of_the_embedded_backends() {
        let p = parse("").unwrap();
        assert!(
            format!("{:?}", p.backends.storage)
                .contains("durability: ProcessCrash, max_size_mib: 1024"),
            "{:?}",
            p.backends.storage
        );
        let p = parse(
            "[backends.storage]\nkind = \"sqlite\"\ndurability = \"machine-crash\"\n\
             max_size_mib = 5\n[backends.messaging]\nkind = \"embedded\"\ndurability = \"machine-crash\"\n",
        )
        .unwrap();
        assert!(
            format!("{:?}", p.backends.storage)
                .contains("durability: MachineCrash, max_size_mib: 5"),
            "{:?}",
            p.backends.storage
        );
        assert!(
            format!("{:?}", p.backends.messaging).contains("durability: MachineCrash"),
            "{:?}",
            p.backends.messaging
        );
        let err = parse("[backends.storage]\nkind = \"sqlite\"\ndurability = \"power-loss\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("power-loss") && err.contains("machine-crash"),
            "{err}"
        );
        let err = parse("[backends.storage]\nkind = \"sqlite\"\nmax_size_mib = 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`max_size_mib` must be above 0")
                && err.contains("`sqlite` storage backend"),
            "{err}"
        );
    }

    #[test]
    fn environment_variables_are_substituted() {
        let env = |name: &str| match name {
            "HOST" => Some("db.internal".to_owned()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        let sub = |text: &str| substitute_env(text, &env);
        assert_eq!(
            sub("redis://${HOST}:6379").unwrap(),
            "redis://db.internal:6379"
        );
        assert_eq!(sub("${MISSING:-redis://x}").unwrap(), "redis://x");
        assert_eq!(sub("${HOST:-other}").unwrap(), "db.internal");
        // Set but empty: `${X}` is empty, `${X:-d}` takes the default.
        assert_eq!(sub("[${EMPTY}]").unwrap(), "[]");
        assert_eq!(sub("${EMPTY:-d}").unwrap(), "d");
        assert_eq!(sub("${MISSING:-}").unwrap(), "");
        assert_eq!(sub("${A:-x}${B:-y}").unwrap(), "xy");
        // Any other `$` is kept: SQL placeholders, passwords, prices.
        assert_eq!(
            sub("$1 and $ and $HOST and $$").unwrap(),
            "$1 and $ and $HOST and $$"
        );
        assert_eq!(sub("$${HOST}").unwrap(), "${HOST}");
        let err = sub("x${MISSING}").unwrap_err();
        assert!(err.contains("`MISSING` is not set"), "{err}");
        for bad in ["${HOST", "${}", "${1X}", "${A-B}", "${A:-b}${"] {
            assert!(sub(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn values_in_the_file_name_environment_variables() {
        // Unique names, as tests run in parallel within one process.
        std::env::set_var("AGORA_TEST_PLUGINS_PORT", "9999");
        let p = parse(
            "[host]\nlisten = \"127.0.0.1:${AGORA_TEST_PLUGINS_PORT}\"\n\
             data_dir = \"${AGORA_TEST_PLUGINS_UNSET:-/var/lib/agora}\"\n\
             [components.a]\nwasm = \"a.wasm\"\nsettings = { list = [\"${AGORA_TEST_PLUGINS_PORT}\"] }\n",
        )
        .unwrap();
        assert_eq!(p.host.listen.port(), 9999);
        assert_eq!(p.host.data_dir, Path::new("/var/lib/agora"));
        assert_eq!(
            p.components["a"].settings_as_strings()["list"],
            "[\"9999\"]"
        );
        let err = parse(
            "[components.a]\nwasm = \"a.wasm\"\n\
             settings = { list = [\"ok\", \"${AGORA_TEST_PLUGINS_UNSET}\"] }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("components.a.settings.list[1]")
                && err.contains("`AGORA_TEST_PLUGINS_UNSET` is not set"),
            "{err}"
        );
        // Errors after substitution still point at the line as written.
        let err = parse("[host]\nlisten = \"${AGORA_TEST_PLUGINS_PORT}\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 2") && err.contains("${AGORA_TEST_PLUGINS_PORT}"),
            "{err}"
        );
    }

    #[test]
    fn the_cache_backend_is_chosen_by_kind_and_its_keys_are_checked() {
        let p = parse("[backends.cache]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\n")
            .unwrap();
        assert!(format!("{:?}", p.backends.cache).contains("RedisConfig"));
        let p = parse("[backends.cache]\nkind = \"memory\"\nquota_mib = 4\n").unwrap();
        assert!(format!("{:?}", p.backends.cache).contains("quota_mib: 4"));
        for (text, expected) in [
            (
                "kind = \"redis\"\nurll = \"redis://x\"",
                &["unknown field `urll`", "`redis` cache backend"][..],
            ),
            (
                "kind = \"redis\"",
                &["missing field `url`", "`redis` cache backend"],
            ),
            (
                "kind = \"memory\"\nurl = \"redis://x\"",
                &["unknown field `url`", "`memory` cache backend"],
            ),
            (
                "kind = \"mongo\"",
                &["unknown cache backend `mongo`", "`memory`, `redis`"],
            ),
            ("quota_mib = 1", &["`kind` is missing"]),
        ] {
            let err = parse(&format!("[backends.cache]\n{text}\n"))
                .unwrap_err()
                .to_string();
            for part in expected {
                assert!(err.contains(part), "{text}: {err}");
            }
        }
    }

    #[test]
    fn settings_are_strings_or_json() {
        let p = parse(
            "[components.a]\nwasm = \"a.wasm\"\n\
             settings = { name = \"x\", limit = 5, admins = [\"a@b.c\"] }\n",
        )
        .unwrap();
        let s = p.components["a"].settings_as_strings();
        assert_eq!(s["name"], "x");
        assert_eq!(s["limit"], "5");
        assert_eq!(s["admins"], "[\"a@b.c\"]");
    }
}
