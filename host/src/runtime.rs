//! The runtime: the engine, the linker, the capabilities, and the registry
//! of running component versions, with the control plane that changes it.
//!
//! Changes (start, `plugins.toml` edits, replaced wasm files, admin deploys
//! and rollbacks) are serialised by one async mutex and prepared completely
//! off the request path; the request path only ever sees a finished
//! registry, swapped in atomically. A change that fails anywhere is refused
//! as a whole and the running versions keep serving.
//!
//! Each component has its own database, so the migrations of a change of
//! several components cannot commit as one transaction. A change is
//! therefore made in two phases: first every new version is compiled,
//! checked and linked, the links of the whole are checked and, when the
//! change has several new versions, their migrations are rehearsed
//! (applied and rolled back), with nothing committed; only then are the
//! migrations committed, one component at a time. What the
//! rehearsal cannot foresee (a full disk, a write by the serving version
//! between rehearsal and commit that a new constraint refuses) can still
//! fail the second of two components after the first one committed: the
//! change is refused, and the first component's running version serves on
//! its new schema, as it does whenever a deploy is refused after its
//! migration committed. Migrations are meant to be backward compatible
//! (expand, then contract in a later version) for this and for rollback.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Context, Result};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use wasmtime::component::Linker;

use crate::accounts::Accounts;
use crate::bindings::messaging::Message;
use crate::capability::Capabilities;
use crate::compiled::CompiledCache;
use crate::compiled::Wasm;
use crate::component::ComponentVersion;
use crate::engine;
use crate::gateway::Proxies;
use crate::messaging::{Deliver, Undelivered};
use crate::metrics::{metrics, ComponentLabels, PartitionLabels};
use crate::plugins::{ComponentSpec, Plugins};
use crate::registry::Registry;
use crate::state::InstanceState;

/// Replaced versions kept per component for `rollback`.
const KEPT_VERSIONS: usize = 5;

/// Changes kept for the console's deploy history.
const KEPT_CHANGES: usize = 100;

/// A change of a component's serving version, or one refused.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Change {
    /// Milliseconds since the Unix epoch.
    pub at: u64,
    /// `*` for a reload refused as a whole.
    pub component: String,
    /// `deployed`, `rolled_back` or `refused`.
    pub outcome: &'static str,
    pub version: Option<String>,
    pub error: Option<String>,
}

impl Change {
    fn deployed(version: &ComponentVersion) -> Change {
        Change {
            at: crate::now_millis(),
            component: version.name.clone(),
            outcome: "deployed",
            version: Some(version.version.clone()),
            error: None,
        }
    }

    fn refused(component: &str, error: &anyhow::Error) -> Change {
        Change {
            at: crate::now_millis(),
            component: component.to_owned(),
            outcome: "refused",
            version: None,
            error: Some(format!("{error:#}")),
        }
    }
}

/// How long a scrape waits for the components' outbox depths and lags:
/// well under Prometheus' default scrape timeout (10 s).
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Runtime {
    compiled: Arc<CompiledCache>,
    pub pooling: bool,
    linker: Linker<InstanceState>,
    pub capabilities: Capabilities,
    registry: ArcSwap<Registry>,
    previous: Mutex<HashMap<String, Vec<Arc<ComponentVersion>>>>,
    plugins_path: PathBuf,
    plugins: Mutex<Plugins>,
    data_dir: PathBuf,
    /// `host.max_waiting_requests`, read at start like the rest of `[host]`.
    max_waiting: usize,
    /// Who a request's client is: `host.trusted_proxies`, read at start.
    pub proxies: Proxies,
    /// Provisions the users of trusted providers: `[tokens] accounts`.
    pub accounts: Accounts,
    control: tokio::sync::Mutex<()>,
    history: Mutex<VecDeque<Change>>,
    /// Held by a metrics scrape.
    scraping: tokio::sync::Mutex<()>,
    /// Consumers reach the runtime weakly, so it is not kept alive by them.
    this: Weak<Runtime>,
}

impl Runtime {
    /// Starts every component of `plugins`; fails if any of them fails.
    pub async fn start(
        plugins: Plugins,
        plugins_path: &Path,
        data_dir: &Path,
    ) -> Result<Arc<Runtime>> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
        let engine::EngineInfo {
            engine,
            pooling,
            compiled,
        } = engine::build(data_dir)?;
        let mut linker = Linker::new(&engine);
        Capabilities::add_to_linker(&mut linker)?;
        let capabilities = Capabilities::init(&plugins, data_dir).await?;
        let runtime = Arc::new_cyclic(|this| Runtime {
            this: this.clone(),
            compiled: Arc::new(compiled),
            pooling,
            linker,
            capabilities,
            registry: ArcSwap::from_pointee(Registry::default()),
            previous: Mutex::default(),
            plugins_path: plugins_path.to_owned(),
            plugins: Mutex::new(plugins.clone()),
            data_dir: data_dir.to_owned(),
            max_waiting: plugins.host.max_waiting_requests as usize,
            proxies: Proxies::new(
                plugins.host.trusted_proxies.clone(),
                plugins.host.client_address_header,
            ),
            accounts: Accounts::new(plugins.tokens.accounts.clone()),
            control: tokio::sync::Mutex::new(()),
            history: Mutex::default(),
            scraping: tokio::sync::Mutex::new(()),
        });
        let components = runtime.load_all(&plugins, &Registry::default()).await?;
        let registry = Registry::new(components);
        runtime.grant_publishes(&registry);
        runtime.registry.store(Arc::new(registry));
        runtime.sync_subscriptions();
        Ok(runtime)
    }

    pub fn registry(&self) -> arc_swap::Guard<Arc<Registry>> {
        self.registry.load()
    }

    /// The registry, to hold across awaits (a [`Self::registry`] guard is
    /// for short reads).
    pub fn registry_snapshot(&self) -> Arc<Registry> {
        self.registry.load_full()
    }

    pub fn plugins(&self) -> Plugins {
        self.plugins.lock().unwrap().clone()
    }

    pub fn plugins_path(&self) -> &Path {
        &self.plugins_path
    }

    /// Where admin deploys are kept, so they survive a restart.
    fn deployed_path(&self, name: &str) -> PathBuf {
        self.data_dir.join("deployed").join(format!("{name}.wasm"))
    }

    /// The binary to run for a component: its file from plugins.toml, or the
    /// last admin deploy if that is newer.
    fn read_source(
        &self,
        plugins: &Plugins,
        name: &str,
        spec: &ComponentSpec,
    ) -> Result<Arc<[u8]>> {
        let file = plugins.resolve(&spec.wasm);
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let deployed = self.deployed_path(name);
        let path = match (modified(&deployed), modified(&file)) {
            (Some(d), Some(f)) if d > f => deployed,
            (Some(_), None) => deployed,
            _ => file,
        };
        let bytes = std::fs::read(&path).with_context(|| {
            format!(
                "component `{name}`: cannot read {} (is it built? `agora up --build` runs its build command)",
                path.display()
            )
        })?;
        Ok(bytes.into())
    }

    async fn load(
        &self,
        name: &str,
        spec: &ComponentSpec,
        wasm: Wasm,
    ) -> Result<Arc<ComponentVersion>> {
        let version = ComponentVersion::load(
            &self.compiled,
            &self.linker,
            &self.capabilities,
            &self.this,
            name,
            spec,
            wasm,
        )
        .await?
        .with_max_waiting(self.max_waiting);
        tracing::info!(component = %name, version = %version.version, routes = ?spec.routes, "component loaded");
        Ok(Arc::new(version))
    }

    /// Every component of `plugins`, reusing the running versions that did
    /// not change.
    async fn load_all(
        &self,
        plugins: &Plugins,
        current: &Registry,
    ) -> Result<BTreeMap<String, Arc<ComponentVersion>>> {
        let mut components = BTreeMap::new();
        let mut fresh = Vec::new();
        for (name, spec) in &plugins.components {
            let wasm = Wasm::new(self.read_source(plugins, name, spec)?);
            let running = current
                .components
                .get(name)
                .filter(|c| c.spec == *spec && c.version == wasm.version());
            let version = match running {
                Some(running) => running.clone(),
                None => {
                    let version = self.load(name, spec, wasm).await?;
                    fresh.push(version.clone());
                    version
                }
            };
            components.insert(name.clone(), version);
        }
        check_links(&components)?;
        // One component's migrations commit in one transaction or not at
        // all; only several need a rehearsal to be refused as a whole.
        if fresh.len() > 1 {
            for version in &fresh {
                version.rehearse_migrations().await?;
            }
        }
        // Everything passed and nothing is committed yet: now the migrations.
        for version in &fresh {
            version.migrate().await?;
        }
        Ok(components)
    }

    /// Swaps in a new registry, keeping the versions it replaces for rollback.
    fn swap(&self, next: Registry, keep_replaced: bool) {
        self.grant_publishes(&next);
        let replaced = self.registry.swap(Arc::new(next));
        let current = self.registry.load();
        // A rolled-back version serves again.
        for version in current.components.values() {
            version.set_serving(true);
        }
        let mut previous = self.previous.lock().unwrap();
        previous.retain(|name, _| current.components.contains_key(name));
        for (name, old) in &replaced.components {
            let changed = match current.components.get(name) {
                Some(new) if Arc::ptr_eq(new, old) => continue,
                new => new.is_some(),
            };
            // Replaced or removed: it keeps no warm instances.
            old.set_serving(false);
            if keep_replaced && changed {
                let kept = previous.entry(name.clone()).or_default();
                kept.push(old.clone());
                if kept.len() > KEPT_VERSIONS {
                    kept.remove(0);
                }
            }
        }
        drop(previous);
        self.sync_subscriptions();
    }

    /// Re-reads plugins.toml and the component files, and applies what changed.
    pub async fn reconcile(&self) -> Result<()> {
        let _serial = self.control.lock().await;
        let plugins = Plugins::load(&self.plugins_path)?;
        let current = self.registry.load_full();
        let components = match self.load_all(&plugins, &current).await {
            Ok(components) => components,
            Err(e) => {
                // Which component failed is in the error, not a label.
                let e = e.context("the change was refused; the running versions keep serving");
                self.record(Change::refused("*", &e));
                return Err(e);
            }
        };
        let mut unchanged = components.len() == current.components.len();
        for (name, component) in &components {
            if !current
                .components
                .get(name)
                .is_some_and(|old| Arc::ptr_eq(old, component))
            {
                self.record(Change::deployed(component));
                unchanged = false;
            }
        }
        *self.plugins.lock().unwrap() = plugins;
        if !unchanged {
            self.swap(Registry::new(components), true);
            tracing::info!("configuration applied");
        }
        Ok(())
    }

    /// Deploys a new binary for a running component.
    pub async fn deploy(&self, name: &str, wasm: Vec<u8>) -> Result<Arc<ComponentVersion>> {
        let deployed = self.replace(name, wasm).await;
        self.record(match &deployed {
            Ok(version) => Change::deployed(version),
            Err(e) => Change::refused(name, e),
        });
        deployed
    }

    async fn replace(&self, name: &str, wasm: Vec<u8>) -> Result<Arc<ComponentVersion>> {
        let _serial = self.control.lock().await;
        let current = self.registry.load_full();
        let running = current
            .components
            .get(name)
            .ok_or_else(|| anyhow!("no component named `{name}` is running"))?;
        let version = self
            .load(name, &running.spec.clone(), Wasm::new(wasm.into()))
            .await?;
        let next = current.with(version.clone());
        check_links(&next.components)?;
        version.migrate().await?;
        self.persist(&version)?;
        self.swap(next, true);
        Ok(version)
    }

    /// Restores the version a component ran before its last change.
    pub async fn rollback(&self, name: &str) -> Result<Arc<ComponentVersion>> {
        let restored = self.restore_previous(name).await;
        self.record(match &restored {
            Ok(version) => Change {
                outcome: "rolled_back",
                ..Change::deployed(version)
            },
            Err(e) => Change::refused(name, e),
        });
        restored
    }

    async fn restore_previous(&self, name: &str) -> Result<Arc<ComponentVersion>> {
        let _serial = self.control.lock().await;
        let current = self.registry.load_full();
        if !current.components.contains_key(name) {
            return Err(anyhow!("no component named `{name}` is running"));
        }
        let version = self
            .previous
            .lock()
            .unwrap()
            .get_mut(name)
            .and_then(Vec::pop);
        let version =
            version.ok_or_else(|| anyhow!("component `{name}` has no previous version"))?;
        self.persist(&version)?;
        self.swap(current.with(version.clone()), false);
        tracing::info!(component = %name, version = %version.version, "rolled back");
        Ok(version)
    }

    /// Hands a message to the component's serving version.
    pub async fn deliver_now(
        &self,
        component: &str,
        message: Message,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), Undelivered> {
        let version = self
            .registry()
            .components
            .get(component)
            .cloned()
            .ok_or_else(|| {
                Undelivered::Failed(format!("component `{component}` is not running"))
            })?;
        version.deliver(message, stop).await
    }

    /// Counts a change and keeps it in the history.
    fn record(&self, change: Change) {
        metrics().deploy(&change.component, change.outcome);
        let mut history = self.history.lock().unwrap();
        if history.len() == KEPT_CHANGES {
            history.pop_front();
        }
        history.push_back(change);
    }

    /// The latest changes of serving versions, oldest first.
    pub fn history(&self) -> Vec<Change> {
        self.history.lock().unwrap().iter().cloned().collect()
    }

    /// Every metric, in the OpenMetrics text format: first reads what the
    /// metrics show as state rather than count (slots, lag, outbox depth,
    /// pools); see [`crate::metrics`]. Scrapes take turns, so one never
    /// encodes what another has just cleared. The components' backends are
    /// asked all at once and given [`OBSERVE_TIMEOUT`] together: a backend
    /// that does not answer leaves its series out of this scrape rather than
    /// stalling it.
    pub async fn scrape(&self) -> String {
        let _turn = self.scraping.lock().await;
        let m = metrics();
        let registry = self.registry_snapshot();
        m.clear_observed();
        let backlogs = registry.components.values().map(|component| async move {
            let labels = ComponentLabels {
                component: component.name.clone(),
            };
            let (in_use, waiting) = component.slots();
            m.slots_in_use.get_or_create(&labels).set(in_use as i64);
            m.slots_waiting.get_or_create(&labels).set(waiting as i64);
            if let Some(db) = component.outbox() {
                match db.outbox_depth().await {
                    Ok(depth) => {
                        m.outbox_depth.get_or_create(&labels).set(depth as i64);
                    }
                    Err(e) => tracing::debug!(component = %component.name, error = %e, "outbox depth unknown"),
                }
            }
            for topic in &component.spec.subscribes {
                let messaging = &self.capabilities.messaging;
                match messaging.progress(&component.name, topic).await {
                    Ok(partitions) => {
                        for progress in partitions {
                            m.consumer_lag
                                .get_or_create(&PartitionLabels {
                                    subscriber: component.name.clone(),
                                    topic: topic.clone(),
                                    partition: progress.partition.to_string(),
                                })
                                .set(progress.lag as i64);
                        }
                    }
                    Err(e) => tracing::debug!(component = %component.name, %topic, error = %format!("{e:#}"), "consumer lag unknown"),
                }
            }
        });
        let observed = futures_util::future::join_all(backlogs);
        if tokio::time::timeout(OBSERVE_TIMEOUT, observed)
            .await
            .is_err()
        {
            tracing::warn!("metrics: the backends took over {OBSERVE_TIMEOUT:?} to say outbox depths and lags; this scrape shows what they said");
        }
        for pool in self.capabilities.pools() {
            m.observe_pool(&pool);
        }
        m.encode()
    }

    /// Waits, at most `grace`, until no instance of a serving component runs.
    pub async fn until_idle(&self, grace: Duration) {
        let registry = self.registry();
        let idle = registry.components.values().map(|c| c.until_idle());
        let _ = tokio::time::timeout(grace, futures_util::future::join_all(idle)).await;
    }

    /// Previous versions of a component, newest last.
    pub fn previous_versions(&self, name: &str) -> Vec<String> {
        let previous = self.previous.lock().unwrap();
        previous
            .get(name)
            .map(|v| v.iter().map(|c| c.version.clone()).collect())
            .unwrap_or_default()
    }

    fn persist(&self, version: &ComponentVersion) -> Result<()> {
        let path = self.deployed_path(&version.name);
        let dir = path.parent().expect("deployed path has a parent");
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(".{}.{}.tmp", version.name, version.version));
        std::fs::write(&tmp, &version.wasm)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .with_context(|| format!("saving the deployed version to {}", path.display()))?;
        // Newer than the plugins.toml file from now on, so it wins at restart.
        let file = std::fs::File::options().write(true).open(&path)?;
        file.set_modified(SystemTime::now())?;
        Ok(())
    }

    /// Lets the outbox relays pass what `next`'s versions may publish,
    /// before they serve (see [`MessagingCapability::grant`]).
    ///
    /// [`MessagingCapability::grant`]: crate::messaging::MessagingCapability::grant
    fn grant_publishes(&self, next: &Registry) {
        self.capabilities.messaging.grant(
            next.components
                .values()
                .map(|c| (c.name.as_str(), c.spec.publishes.as_slice())),
        );
    }

    /// Messaging follows the serving versions' subscriptions.
    fn sync_subscriptions(&self) {
        let registry = self.registry.load();
        let wanted: Vec<_> = registry
            .components
            .values()
            .flat_map(|c| {
                c.spec
                    .subscribes
                    .iter()
                    .map(|t| (c.name.clone(), t.clone(), c.spec.retry))
            })
            .collect();
        let dispatch = Arc::new(Dispatch(self.this.clone()));
        self.capabilities
            .messaging
            .sync_subscriptions(dispatch, &wanted);
    }
}

/// Every link must point at a component that exports the interface.
fn check_links(components: &BTreeMap<String, Arc<ComponentVersion>>) -> Result<()> {
    for (name, component) in components {
        for (interface, target) in &component.spec.links {
            if !components.get(target).is_some_and(|t| t.exports(interface)) {
                return Err(anyhow!(
                    "components.{name}.links: `{target}` does not export `{interface}`"
                ));
            }
        }
    }
    Ok(())
}

/// Routes a delivery to the component's current version.
struct Dispatch(Weak<Runtime>);

#[async_trait]
impl Deliver for Dispatch {
    async fn deliver(
        &self,
        component: &str,
        message: Message,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), Undelivered> {
        let runtime = self
            .0
            .upgrade()
            .ok_or_else(|| Undelivered::Failed("the host is shutting down".into()))?;
        runtime.deliver_now(component, message, stop).await
    }
}
