//! Redis cache, through `fred`: `[backends.cache] kind = "redis"`.
//!
//! Several hosts sharing one Redis share every component's entries and the
//! rate-limit counters, so a limit holds across hosts. Keys are the host's
//! `<space>:<key>` (see [`CacheBackend`]) behind the optional `key_prefix`;
//! Redis speaks a length-prefixed protocol, so no byte of a key or value can
//! change the command it travels in.
//!
//! One multiplexed connection carries every command, pipelined: a cache
//! call costs a round trip, not a connection. When Redis is down or stalls
//! nothing waits for it: a command fails at once while the connection is
//! down, and after `command_timeout_ms` otherwise, with `unavailable`;
//! meanwhile the client reconnects in the background (100 ms to 2 s apart).
//! The host starts without Redis too (the cache is not the system of
//! record), reporting the backend not ready on `/readyz` until it answers.
//!
//! Memory: the embedded backend's quota per component has no Redis
//! equivalent (Redis has no per-prefix limits). Bound Redis as a whole with
//! its own `maxmemory` and an eviction policy such as `allkeys-lru`, as for
//! any cache; `max_value_kib` bounds what one write can add.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use fred::prelude::{
    Builder, Client, ClientLike, Config, Error as RedisError, ErrorKind, Expiration, KeysInterface,
    LuaInterface, Options, ReconnectPolicy,
};
use futures_util::StreamExt;
use serde::Deserialize;

use super::{CacheBackend, CacheSettings, Error};
use crate::metrics::metrics;
use crate::plugins::BackendKind;

pub const KIND: BackendKind<dyn CacheSettings> = BackendKind {
    kind: "redis",
    parse: |table| Ok(Box::new(RedisConfig::deserialize(table)?)),
};

/// `[backends.cache] kind = "redis"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host[:port][/database]`, e.g.
    /// `"${REDIS_URL:-redis://127.0.0.1:6379}"`. No default: the server is
    /// the operator's.
    pub url: String,
    /// Put before every key, so several deployments (or tests) can share
    /// one Redis database without seeing each other's keys. It must end
    /// with `/` or `:` so that it cannot run into a component's name.
    /// Empty by default: a deployment usually has its Redis to itself.
    #[serde(default)]
    pub key_prefix: String,
    /// How long connecting may take. 1 s: a Redis on the same network
    /// answers in a millisecond, while one that is down is noticed quickly.
    #[serde(default = "default_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// How long one command may take before the component gets
    /// `unavailable`. 1 s: a healthy Redis answers in well under a
    /// millisecond even under load, so this only fires when it is stalled,
    /// and a request then still has most of its deadline (10 s by default)
    /// to fall back to storage.
    #[serde(default = "default_timeout_ms")]
    pub command_timeout_ms: u64,
    /// The largest entry (key and value) one write may store; larger ones
    /// are refused with `too-large`. 1 MiB holds any product page or cart,
    /// while Redis, which runs one command at a time, is not held up for
    /// everyone by a component writing huge values.
    #[serde(default = "default_max_value_kib")]
    pub max_value_kib: u32,
}

fn default_timeout_ms() -> u64 {
    1000
}

fn default_max_value_kib() -> u32 {
    1024
}

/// The atomic increment, in one round trip: `INCRBY`, and `PEXPIRE` only if
/// the key did not exist before, so a counter expires a fixed time after it
/// was created however often it is incremented (a rate window). Checking
/// existence rather than comparing the result with the delta keeps a key
/// that existed with `0` from getting a TTL. A value that is not an integer
/// comes back as an error of our own prefix, so it is told apart from a
/// failure without reading Redis's message.
const INCREMENT: &str = r#"
local existed = redis.call('EXISTS', KEYS[1])
local n = redis.pcall('INCRBY', KEYS[1], ARGV[1])
if type(n) == 'table' and n.err then
  return redis.error_reply('AGORA_NOT_A_NUMBER')
end
if existed == 0 and ARGV[2] ~= '' then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return n
"#;
const NOT_A_NUMBER: &str = "AGORA_NOT_A_NUMBER";

/// TTLs are capped so that Redis, which refuses an expiry past the end of
/// its clock, accepts any TTL a component asks for (this is ~146 million
/// years).
const MAX_TTL_MS: u64 = i64::MAX as u64 / 2;

pub struct RedisCache {
    client: Client,
    /// Applied to every command: fail at once while disconnected, and
    /// after the command timeout otherwise.
    options: Options,
    key_prefix: String,
    max_entry_bytes: usize,
    increment_sha: String,
    /// How long a walk of the key space may take: its pages add up, so a
    /// command's timeout per page times a generous number of them.
    scan_timeout: Duration,
    /// Where Redis is, for messages: host and port, never the password.
    server: String,
}

#[async_trait]
impl CacheSettings for RedisConfig {
    fn embedded(&self) -> bool {
        false
    }

    async fn start(&self) -> Result<Arc<dyn CacheBackend>> {
        Ok(RedisCache::connect(self).await?)
    }
}

impl RedisCache {
    pub async fn connect(config: &RedisConfig) -> Result<Arc<Self>> {
        if !(config.key_prefix.is_empty()
            || config.key_prefix.ends_with('/')
            || config.key_prefix.ends_with(':'))
        {
            bail!(
                "`key_prefix` {:?} of the redis cache backend must end with '/' or ':'",
                config.key_prefix
            );
        }
        if config.connect_timeout_ms == 0 || config.command_timeout_ms == 0 {
            bail!("the timeouts of the redis cache backend must be above 0");
        }
        // Only a single server over plain TCP is built in (fred's TLS,
        // cluster and sentinel support would add dependencies no test runs).
        if !config.url.starts_with("redis://") && !config.url.starts_with("valkey://") {
            bail!(
                "`url` of the redis cache backend must start with `redis://` (TLS, cluster \
                 and sentinel URLs are not supported)"
            );
        }
        let mut redis = Config::from_url(&config.url)
            .map_err(|e| anyhow::anyhow!("{}", e.details()))
            .context("`url` of the redis cache backend")?;
        // Start without Redis and keep reconnecting: see the module docs.
        redis.fail_fast = false;
        let server = format!("{:?}", redis.server.hosts());
        let connect_timeout = Duration::from_millis(config.connect_timeout_ms);
        let command_timeout = Duration::from_millis(config.command_timeout_ms);
        let client = Builder::from_config(redis)
            .with_connection_config(|c| {
                c.connection_timeout = connect_timeout;
                c.internal_command_timeout = command_timeout;
            })
            .with_performance_config(|p| p.default_command_timeout = command_timeout)
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2000, 2))
            .build()
            .context("configuring the redis cache backend")?;
        // The connection task lives as long as the client; `quit` on drop ends it.
        client.connect();
        let connected = tokio::time::timeout(connect_timeout, client.wait_for_connect()).await;
        if !matches!(connected, Ok(Ok(()))) && !client.is_connected() {
            tracing::warn!(
                %server,
                "the redis cache is not reachable yet: cache calls answer `unavailable` \
                 until it is"
            );
        }
        Ok(Arc::new(RedisCache {
            client,
            options: Options {
                fail_fast: true,
                timeout: Some(command_timeout),
                ..Options::default()
            },
            key_prefix: config.key_prefix.clone(),
            max_entry_bytes: config.max_value_kib as usize * 1024,
            increment_sha: fred::util::sha1_hash(INCREMENT),
            scan_timeout: command_timeout * 10,
            server,
        }))
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.key_prefix)
    }

    /// An error for the component: what failed, without the server's
    /// address (a component has no business knowing the topology).
    fn unavailable(&self, what: &str, e: &RedisError) -> Error {
        tracing::warn!(server = %self.server, error = %e, "redis cache: {what} failed");
        metrics().backend_error("cache", KIND.kind);
        let why = match e.kind() {
            ErrorKind::Timeout => "timed out",
            ErrorKind::IO | ErrorKind::Canceled | ErrorKind::Backpressure => "is not reachable",
            _ => "failed",
        };
        Error::Unavailable(format!("the cache {why} ({what})"))
    }
}

impl Drop for RedisCache {
    fn drop(&mut self) {
        let client = self.client.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = client.quit().await;
            });
        }
    }
}

/// Keys asked for per SCAN page, and unlinked per command.
const SCAN_PAGE: u32 = 500;

/// `text` as a SCAN pattern that matches only itself.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

fn ttl_ms(ttl: Duration) -> i64 {
    ttl.as_millis().min(MAX_TTL_MS as u128) as i64
}

#[async_trait]
impl CacheBackend for RedisCache {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        self.client
            .with_options(&self.options)
            .get::<Option<Vec<u8>>, _>(self.key(key))
            .await
            .map_err(|e| self.unavailable("get", &e))
    }

    async fn set(&self, key: &str, value: Vec<u8>, ttl: Option<Duration>) -> Result<(), Error> {
        let size = key.len() + value.len();
        if size > self.max_entry_bytes {
            return Err(Error::TooLarge(format!(
                "an entry of {size} bytes exceeds the cache's limit of {} KiB",
                self.max_entry_bytes / 1024
            )));
        }
        let client = self.client.with_options(&self.options);
        let result = match ttl.map(ttl_ms) {
            // Redis refuses a zero expiry; an entry that expires at once is
            // one that is gone.
            Some(0) => client.del::<(), _>(self.key(key)).await,
            ttl => {
                client
                    .set::<(), _, _>(self.key(key), value, ttl.map(Expiration::PX), None, false)
                    .await
            }
        };
        result.map_err(|e| self.unavailable("set", &e))
    }

    async fn delete(&self, key: &str) -> Result<bool, Error> {
        self.client
            .with_options(&self.options)
            .del::<i64, _>(self.key(key))
            .await
            .map(|n| n > 0)
            .map_err(|e| self.unavailable("delete", &e))
    }

    async fn increment(&self, key: &str, delta: i64, ttl: Option<Duration>) -> Result<i64, Error> {
        let client = self.client.with_options(&self.options);
        let full_key = self.key(key);
        let args = vec![
            delta.to_string(),
            ttl.map(|t| ttl_ms(t).to_string()).unwrap_or_default(),
        ];
        let mut result = client
            .evalsha::<i64, _, _, _>(&self.increment_sha, full_key.clone(), args.clone())
            .await;
        // After a restart or SCRIPT FLUSH Redis no longer knows the script:
        // send it whole, which caches it again.
        if matches!(&result, Err(e) if e.details().starts_with("NOSCRIPT")) {
            result = client.eval::<i64, _, _, _>(INCREMENT, full_key, args).await;
        }
        result.map_err(|e| {
            if e.details().contains(NOT_A_NUMBER) {
                let (_, key) = key.split_once(':').unwrap_or(("", key));
                Error::NotANumber(format!(
                    "the value at `{key}` is not an integer, or adding {delta} to it overflows"
                ))
            } else {
                self.unavailable("increment", &e)
            }
        })
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, Error> {
        // SCAN walks the whole key space a page at a time (Redis keeps
        // serving meanwhile); each page's matches are unlinked at once. A
        // scan does not fail fast by itself while Redis is away: check.
        if !self.client.is_connected() {
            return Err(self.unavailable(
                "delete by prefix",
                &RedisError::new(ErrorKind::IO, "not connected"),
            ));
        }
        let pattern = format!("{}*", glob_escape(&self.key(prefix)));
        let walk = async {
            let mut deleted = 0;
            let mut pages = std::pin::pin!(self
                .client
                .scan_buffered(pattern, Some(SCAN_PAGE), None)
                .chunks(SCAN_PAGE as usize));
            while let Some(keys) = pages.next().await {
                let keys = keys.into_iter().collect::<Result<Vec<_>, _>>()?;
                deleted += self
                    .client
                    .with_options(&self.options)
                    .unlink::<u64, _>(keys)
                    .await?;
            }
            Ok::<_, RedisError>(deleted)
        };
        match tokio::time::timeout(self.scan_timeout, walk).await {
            Ok(walked) => walked.map_err(|e| self.unavailable("delete by prefix", &e)),
            Err(_) => Err(self.unavailable(
                "delete by prefix",
                &RedisError::new(ErrorKind::Timeout, "the key walk took too long"),
            )),
        }
    }

    async fn ping(&self) -> Result<(), Error> {
        self.client
            .with_options(&self.options)
            .ping::<()>(None)
            .await
            .map_err(|e| self.unavailable("ping", &e))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::cache::contract::{redis_answers, redis_config, unique_prefix};

    fn config(url: String) -> RedisConfig {
        RedisConfig {
            url,
            command_timeout_ms: 300,
            connect_timeout_ms: 300,
            ..redis_config(String::new())
        }
    }

    /// Every call returns `unavailable`, well before the deadline a request
    /// would have; `bound` is far above the configured timeouts so that a
    /// busy machine cannot fail this, while a hang would.
    async fn all_unavailable(cache: &RedisCache) {
        let bound = Duration::from_secs(8);
        let start = Instant::now();
        let results = [
            cache.get("a:k").await.map(drop),
            cache.set("a:k", b"v".to_vec(), None).await,
            cache.delete("a:k").await.map(drop),
            cache.increment("a:n", 1, None).await.map(drop),
            cache.ping().await,
        ];
        for result in results {
            match result {
                Err(Error::Unavailable(m)) => assert!(!m.contains("127.0.0.1"), "{m}"),
                other => panic!("{other:?}"),
            }
        }
        assert!(start.elapsed() < bound, "took {:?}", start.elapsed());
    }

    #[tokio::test]
    async fn a_closed_port_answers_unavailable_without_waiting() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let start = Instant::now();
        let cache = RedisCache::connect(&config(format!("redis://127.0.0.1:{port}")))
            .await
            .unwrap();
        assert!(start.elapsed() < Duration::from_secs(8));
        all_unavailable(&cache).await;
    }

    #[tokio::test]
    async fn a_server_that_never_answers_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // Accepts connections and holds them without a word.
        let _server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let cache = RedisCache::connect(&config(format!("redis://127.0.0.1:{port}")))
            .await
            .unwrap();
        all_unavailable(&cache).await;
    }

    #[tokio::test]
    async fn bad_settings_are_refused_at_start() {
        for (config, expected) in [
            (
                RedisConfig {
                    key_prefix: "tenant".into(),
                    ..redis_config(String::new())
                },
                "must end with '/' or ':'",
            ),
            (config("http://127.0.0.1:6379".into()), "`url`"),
            (
                RedisConfig {
                    command_timeout_ms: 0,
                    ..redis_config(String::new())
                },
                "above 0",
            ),
        ] {
            let err = RedisCache::connect(&config).await.err().unwrap();
            assert!(format!("{err:#}").contains(expected), "{err:#}");
        }
    }

    #[tokio::test]
    async fn keys_are_stored_under_the_prefix_and_space() {
        if !redis_answers().await {
            return;
        }
        let prefix = unique_prefix();
        let cache = RedisCache::connect(&redis_config(prefix.clone()))
            .await
            .unwrap();
        let raw = RedisCache::connect(&redis_config(String::new()))
            .await
            .unwrap();
        cache.set("shop:k", b"v".to_vec(), None).await.unwrap();
        let stored = format!("{prefix}shop:k");
        assert_eq!(raw.get(&stored).await.unwrap().as_deref(), Some(&b"v"[..]));
        assert_eq!(raw.get("shop:k").await.unwrap(), None);
        assert!(raw.delete(&stored).await.unwrap());
    }

    #[tokio::test]
    async fn increment_reloads_its_script_after_redis_forgets_it() {
        if !redis_answers().await {
            return;
        }
        let cache = RedisCache::connect(&redis_config(unique_prefix()))
            .await
            .unwrap();
        assert_eq!(cache.increment("a:n", 1, None).await.unwrap(), 1);
        cache.client.script_flush(false).await.unwrap();
        assert_eq!(cache.increment("a:n", 1, None).await.unwrap(), 2);
        cache.delete("a:n").await.unwrap();
    }
}
