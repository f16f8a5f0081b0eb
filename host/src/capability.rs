//! Capabilities: what the host hands to components, one WIT interface each.
//!
//! Every capability follows one lifecycle (after Spin's `Factor` and
//! wasmCloud's `HostPlugin`):
//! 1. *init*: built once at start from `plugins.toml`, choosing its backend
//!    (each capability's `init`, whose inputs differ);
//! 2. [`Capability::add_to_linker`]: its host functions join the one linker;
//! 3. [`Capability::configure`]: once per component version, off the request
//!    path (open the component's database, namespace its keys, ...);
//! 4. *prepare per instance*: free, because the configured state is shared by
//!    `Arc` through [`ComponentCaps`]; per-instance resources (open
//!    transactions) live in the instance's resource table and die with it;
//! 5. [`Capability::shutdown`].
//!
//! A backend is a file inside its capability's directory behind that
//! capability's backend trait, so adding PostgreSQL or Kafka touches neither
//! this module nor the request path.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::path::Path;

use anyhow::{Context, Result};
use async_trait::async_trait;
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, HasData, Linker};
use wasmtime::Engine;

use crate::cache::CacheCapability;
use crate::config::ConfigCapability;
use crate::http_out::HttpOutCapability;
use crate::messaging::MessagingCapability;
use crate::metrics::PoolUse;
use crate::plugins::{ComponentSpec, Grant, Plugins, SHOP_INTERFACES};
use crate::state::InstanceState;
use crate::storage::StorageCapability;
use crate::tokens::{TokenIssuerCapability, TokensCapability};

#[async_trait]
pub trait Capability: Send + Sync + 'static {
    /// The name that grants it in `plugins.toml`.
    const GRANT: Grant;
    /// The interfaces (`package/name`, without version) whose functions need this grant.
    const INTERFACES: &'static [&'static str];
    /// What `configure` makes for one component, shared by all its instances.
    type ComponentState: Send + Sync + 'static;

    fn add_to_linker(linker: &mut Linker<InstanceState>) -> Result<()>;

    async fn configure(
        &self,
        component: &str,
        spec: &ComponentSpec,
    ) -> Result<Self::ComponentState>;

    /// Whether the backend is reachable (for `/readyz`).
    async fn ready(&self) -> Result<()> {
        Ok(())
    }

    async fn shutdown(&self) {}
}

/// Every capability the host offers, each with its chosen backend.
pub struct Capabilities {
    pub storage: StorageCapability,
    pub cache: CacheCapability,
    pub messaging: MessagingCapability,
    pub tokens: TokensCapability,
    pub token_issuer: TokenIssuerCapability,
    pub config: ConfigCapability,
    pub http_out: HttpOutCapability,
}

/// One component's configured capabilities; `None` where not granted.
pub struct ComponentCaps {
    pub name: String,
    /// The component's environment (`env` in plugins.toml).
    pub env: Vec<(String, String)>,
    pub storage: Option<<StorageCapability as Capability>::ComponentState>,
    pub cache: Option<<CacheCapability as Capability>::ComponentState>,
    pub messaging: Option<<MessagingCapability as Capability>::ComponentState>,
    pub tokens: Option<<TokensCapability as Capability>::ComponentState>,
    pub token_issuer: Option<<TokenIssuerCapability as Capability>::ComponentState>,
    pub config: Option<<ConfigCapability as Capability>::ComponentState>,
    pub outbound_hosts: Option<<HttpOutCapability as Capability>::ComponentState>,
}

/// What one capability's host functions see of an instance: the
/// component's state for that capability (if granted) and the component's
/// name, for errors; nothing of any other capability's state. The view
/// pattern of Spin's `FactorData` and wasi-http's `WasiHttpView`: each
/// capability's host functions are implemented on its view, not on the
/// whole [`InstanceState`], so one capability cannot reach another's state.
pub struct CapabilityView<'a, S> {
    state: Option<&'a S>,
    grant: Grant,
    component: &'a str,
}

impl<'a, S> CapabilityView<'a, S> {
    pub fn new(state: Option<&'a S>, grant: Grant, component: &'a str) -> Self {
        CapabilityView {
            state,
            grant,
            component,
        }
    }

    /// The component's state, or a trap if the capability is not granted
    /// (which the import check at load makes unreachable from a guest).
    pub fn granted(&self) -> wasmtime::Result<&'a S> {
        self.state.ok_or_else(|| {
            wasmtime::format_err!(
                "`{}` is not granted to `{}`",
                self.grant.name(),
                self.component
            )
        })
    }
}

/// The [`HasData`] of a [`CapabilityView`], for a capability's `add_to_linker`.
pub struct View<S>(PhantomData<fn() -> S>);

impl<S: 'static> HasData for View<S> {
    type Data<'a> = CapabilityView<'a, S>;
}

impl InstanceState {
    /// The view of the capability `grant`, whose state `pick` finds.
    pub fn view<S>(
        &self,
        grant: Grant,
        pick: fn(&ComponentCaps) -> Option<&S>,
    ) -> CapabilityView<'_, S> {
        CapabilityView::new(pick(&self.caps), grant, &self.caps.name)
    }
}

/// Interfaces every component may import: WASI's plumbing, which reaches
/// nothing outside the instance (no preopened directories are given).
const ALWAYS_ALLOWED: &[&str] = &[
    "wasi:io/",
    "wasi:clocks/",
    "wasi:random/",
    "wasi:cli/",
    "wasi:filesystem/",
    "wasi:http/types",
];

impl Capabilities {
    pub async fn init(plugins: &Plugins, data_dir: &Path) -> Result<Self> {
        let tokens = TokensCapability::init(&plugins.tokens, data_dir)
            .context("loading the token signing key")?;
        Ok(Capabilities {
            storage: StorageCapability::init(&plugins.backends.storage, data_dir)
                .await
                .context("starting the storage backend")?,
            cache: CacheCapability::init(&plugins.backends.cache)
                .await
                .context("starting the cache backend")?,
            messaging: MessagingCapability::init(
                &plugins.backends.messaging,
                &plugins.backends.coordination,
                data_dir,
            )
            .await
            .context("starting the messaging backend")?,
            token_issuer: TokenIssuerCapability::new(&tokens),
            tokens,
            config: ConfigCapability,
            http_out: HttpOutCapability,
        })
    }

    pub fn add_to_linker(linker: &mut Linker<InstanceState>) -> Result<()> {
        wasmtime_wasi::p2::add_to_linker_async(linker)?;
        StorageCapability::add_to_linker(linker)?;
        CacheCapability::add_to_linker(linker)?;
        MessagingCapability::add_to_linker(linker)?;
        TokensCapability::add_to_linker(linker)?;
        TokenIssuerCapability::add_to_linker(linker)?;
        ConfigCapability::add_to_linker(linker)?;
        HttpOutCapability::add_to_linker(linker)?;
        Ok(())
    }

    /// The grant an interface needs, or an error if no grant allows it.
    fn grant_for(interface: &str) -> Result<Option<Grant>, String> {
        let unversioned = interface.split('@').next().unwrap_or(interface);
        if ALWAYS_ALLOWED.iter().any(|p| unversioned.starts_with(p)) {
            return Ok(None);
        }
        let grants = [
            (StorageCapability::GRANT, StorageCapability::INTERFACES),
            (CacheCapability::GRANT, CacheCapability::INTERFACES),
            (MessagingCapability::GRANT, MessagingCapability::INTERFACES),
            (TokensCapability::GRANT, TokensCapability::INTERFACES),
            (
                TokenIssuerCapability::GRANT,
                TokenIssuerCapability::INTERFACES,
            ),
            (ConfigCapability::GRANT, ConfigCapability::INTERFACES),
            (HttpOutCapability::GRANT, HttpOutCapability::INTERFACES),
        ];
        grants
            .iter()
            .find(|(_, interfaces)| interfaces.contains(&unversioned))
            .map(|(grant, _)| Some(*grant))
            .ok_or_else(|| format!("`{interface}` is not a capability the host provides"))
    }

    /// Refuses a component that imports a capability it was not granted.
    ///
    /// An import counts only if it takes functions: an interface imported
    /// for its types alone (messaging names storage's `transaction`) reaches
    /// nothing.
    pub fn check_imports(
        engine: &Engine,
        name: &str,
        component: &Component,
        spec: &ComponentSpec,
    ) -> Result<()> {
        let ty = component.component_type();
        for (import, item) in ty.imports(engine) {
            let takes_functions = match &item.ty {
                ComponentItem::ComponentInstance(instance) => instance
                    .exports(engine)
                    .any(|(_, e)| matches!(e.ty, ComponentItem::ComponentFunc(_))),
                _ => true,
            };
            // `agora:shop` imports are linked to components, not granted.
            if !takes_functions || import.starts_with(SHOP_INTERFACES) {
                continue;
            }
            match Self::grant_for(import) {
                Ok(None) => {}
                Ok(Some(grant)) if spec.granted(grant) => {}
                Ok(Some(grant)) => anyhow::bail!(
                    "component `{name}` imports `{import}`, but plugins.toml does not grant it \
                     `{}` (add it to components.{name}.grants)",
                    grant.name()
                ),
                Err(reason) => anyhow::bail!("component `{name}` imports {reason}"),
            }
        }
        Ok(())
    }

    pub async fn configure(&self, name: &str, spec: &ComponentSpec) -> Result<ComponentCaps> {
        async fn granted<C: Capability>(
            cap: &C,
            name: &str,
            spec: &ComponentSpec,
        ) -> Result<Option<C::ComponentState>> {
            if !spec.granted(C::GRANT) {
                return Ok(None);
            }
            let state = cap
                .configure(name, spec)
                .await
                .with_context(|| format!("configuring `{}` for `{name}`", C::GRANT.name()))?;
            Ok(Some(state))
        }
        let storage = granted(&self.storage, name, spec).await?;
        let messaging = granted(&self.messaging, name, spec).await?;
        if let (Some(storage), Some(_)) = (&storage, &messaging) {
            // Events written inside this component's transactions leave
            // through its outbox; relay whatever a crash left behind, too.
            self.messaging.relay_outbox(name, storage.db.clone());
        }
        Ok(ComponentCaps {
            name: name.to_owned(),
            env: spec.env.clone().into_iter().collect(),
            storage,
            messaging,
            cache: granted(&self.cache, name, spec).await?,
            tokens: granted(&self.tokens, name, spec).await?,
            token_issuer: granted(&self.token_issuer, name, spec).await?,
            config: granted(&self.config, name, spec).await?,
            outbound_hosts: granted(&self.http_out, name, spec).await?,
        })
    }

    /// Each backend's reachability, by capability name.
    /// Every backend pool's use, for the metrics.
    pub fn pools(&self) -> Vec<PoolUse> {
        let mut pools = self.storage.pools();
        pools.extend(self.messaging.pools());
        pools
    }

    pub async fn readiness(&self) -> BTreeMap<&'static str, Result<()>> {
        BTreeMap::from([
            ("storage", self.storage.ready().await),
            ("cache", self.cache.ready().await),
            ("messaging", self.messaging.ready().await),
        ])
    }

    pub async fn shutdown(&self) {
        self.messaging.shutdown().await;
        self.storage.shutdown().await;
        self.cache.shutdown().await;
    }
}
