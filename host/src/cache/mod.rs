//! `agora:platform/cache`: a key-value cache with expiry.
//!
//! Each component gets its own key space: the host prefixes every key with
//! `<component>:` before it reaches the backend, so components sharing one
//! Redis cannot read each other's entries.
//!
//! Backends: one file each, declaring its `kind`, its settings and its
//! constructor ([`CacheSettings`]), and one line in [`BACKENDS`]. Every
//! backend passes the contract suite in `contract.rs`.

#[cfg(test)]
mod contract;
mod memory;
mod redis;

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;
use wasmtime::component::Linker;

use crate::bindings::cache::{self as wit, Error};
use crate::capability::{Capability, CapabilityView, View};
use crate::plugins::{BackendKind, BackendRegistry, ComponentSpec, Grant};
use crate::state::InstanceState;

pub use memory::{MemoryCache, MemoryConfig};
pub use redis::{RedisCache, RedisConfig};

/// Every cache backend, by the `kind` that chooses it in `[backends.cache]`.
const BACKENDS: &[BackendKind<dyn CacheSettings>] = &[memory::KIND, redis::KIND];

/// A cache backend's settings from `[backends.cache]`, which start it.
#[async_trait]
pub trait CacheSettings: Debug + Send + Sync {
    /// Whether the backend runs inside the host, needing no server.
    fn embedded(&self) -> bool;
    async fn start(&self) -> Result<Arc<dyn CacheBackend>>;
}

/// `[backends.cache]`: the `memory` backend by default, which needs no server.
pub type BackendConfig = crate::plugins::BackendConfig<dyn CacheSettings>;

impl BackendRegistry for dyn CacheSettings {
    const CAPABILITY: &'static str = "cache";
    fn kinds() -> &'static [BackendKind<Self>] {
        BACKENDS
    }
    fn default_settings() -> Arc<Self> {
        Arc::new(MemoryConfig::default())
    }
}

/// A cache backend. Every key arrives as `<space>:<key>`, the space being a
/// component's name (added by [`Namespace`]) or the host's own (`agora/...`,
/// which no component name can be): backends that bound memory do it per
/// space. Errors: `unavailable` when the backend cannot answer (within its
/// timeout, never hanging), `not-a-number` from `increment` on a value that
/// is not a decimal integer, `too-large` for an entry beyond the backend's
/// limit, which then changes nothing.
#[async_trait]
pub trait CacheBackend: Send + Sync {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Error>;
    async fn set(&self, key: &str, value: Vec<u8>, ttl: Option<Duration>) -> Result<(), Error>;
    async fn delete(&self, key: &str) -> Result<bool, Error>;
    /// Integers are stored as decimal text, as Redis does.
    async fn increment(&self, key: &str, delta: i64, ttl: Option<Duration>) -> Result<i64, Error>;
    /// Deletes every key that starts with `prefix` (itself `<space>:...`)
    /// and returns how many there were. It walks the key space, so it is
    /// for rare invalidations (the gateway's response cache), never for a
    /// request path.
    async fn delete_prefix(&self, prefix: &str) -> Result<u64, Error>;
    async fn ping(&self) -> Result<(), Error>;
}

/// A component's view of the cache: its keys only.
#[derive(Clone)]
pub struct Namespace {
    component: String,
    prefix: String,
    backend: Arc<dyn CacheBackend>,
}

impl Namespace {
    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

pub struct CacheCapability {
    backend: Arc<dyn CacheBackend>,
}

impl CacheCapability {
    /// The backend itself, for the host's own keys (rate limits).
    pub fn backend(&self) -> Arc<dyn CacheBackend> {
        self.backend.clone()
    }

    pub async fn init(config: &BackendConfig) -> Result<Self> {
        Ok(CacheCapability {
            backend: config.start().await?,
        })
    }
}

#[async_trait]
impl Capability for CacheCapability {
    const GRANT: Grant = Grant::Cache;
    const INTERFACES: &'static [&'static str] = &["agora:platform/cache"];
    type ComponentState = Namespace;

    fn add_to_linker(linker: &mut Linker<InstanceState>) -> Result<()> {
        Ok(wit::add_to_linker::<_, View<Namespace>>(linker, |s| {
            s.view(Grant::Cache, |c| c.cache.as_ref())
        })?)
    }

    async fn configure(&self, component: &str, _spec: &ComponentSpec) -> Result<Namespace> {
        Ok(Namespace {
            component: component.to_owned(),
            prefix: format!("{component}:"),
            backend: self.backend.clone(),
        })
    }

    async fn ready(&self) -> Result<()> {
        self.backend.ping().await.map_err(|e| match e {
            Error::Unavailable(m) | Error::NotANumber(m) | Error::TooLarge(m) => anyhow::anyhow!(m),
        })
    }
}

fn ttl(ms: Option<u64>) -> Option<Duration> {
    ms.map(Duration::from_millis)
}

impl wit::Host for CapabilityView<'_, Namespace> {
    async fn get(&mut self, key: String) -> wasmtime::Result<Result<Option<Vec<u8>>, Error>> {
        let ns = self.granted()?;
        Ok(ns.backend.get(&ns.key(&key)).await)
    }

    async fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> wasmtime::Result<Result<(), Error>> {
        let ns = self.granted()?;
        Ok(ns.backend.set(&ns.key(&key), value, ttl(ttl_ms)).await)
    }

    async fn delete(&mut self, key: String) -> wasmtime::Result<Result<bool, Error>> {
        let ns = self.granted()?;
        Ok(ns.backend.delete(&ns.key(&key)).await)
    }

    async fn increment(
        &mut self,
        key: String,
        delta: i64,
        ttl_ms: Option<u64>,
    ) -> wasmtime::Result<Result<i64, Error>> {
        let ns = self.granted()?;
        Ok(ns
            .backend
            .increment(&ns.key(&key), delta, ttl(ttl_ms))
            .await)
    }

    async fn invalidate_responses(
        &mut self,
        prefix: String,
    ) -> wasmtime::Result<Result<u64, Error>> {
        let ns = self.granted()?;
        Ok(crate::response_cache::invalidate(&*ns.backend, &ns.component, &prefix).await)
    }
}
