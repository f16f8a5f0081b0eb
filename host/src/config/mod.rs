//! `agora:platform/config`: a component's own `settings` from plugins.toml.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Result;
use async_trait::async_trait;
use wasmtime::component::Linker;

use crate::bindings::config as wit;
use crate::capability::{Capability, CapabilityView, View};
use crate::plugins::{ComponentSpec, Grant};
use crate::state::InstanceState;

pub struct ConfigCapability;

/// A component's settings, as strings.
pub type Settings = Arc<BTreeMap<String, String>>;

#[async_trait]
impl Capability for ConfigCapability {
    const GRANT: Grant = Grant::Config;
    const INTERFACES: &'static [&'static str] = &["agora:platform/config"];
    type ComponentState = Settings;

    fn add_to_linker(linker: &mut Linker<InstanceState>) -> Result<()> {
        Ok(wit::add_to_linker::<_, View<Settings>>(linker, |s| {
            s.view(Grant::Config, |c| c.config.as_ref())
        })?)
    }

    async fn configure(
        &self,
        _component: &str,
        spec: &ComponentSpec,
    ) -> Result<Self::ComponentState> {
        Ok(Arc::new(spec.settings_as_strings()))
    }
}

impl wit::Host for CapabilityView<'_, Settings> {
    async fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.granted()?.get(&key).cloned())
    }

    async fn get_all(&mut self) -> wasmtime::Result<Vec<(String, String)>> {
        Ok(self
            .granted()?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}
