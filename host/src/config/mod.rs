//! `agora:platform/config`: a component's own `settings` from plugins.toml.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Result;
use async_trait::async_trait;
use wasmtime::component::{HasSelf, Linker};

use crate::bindings::config as wit;
use crate::capability::Capability;
use crate::plugins::{ComponentSpec, Grant};
use crate::state::InstanceState;

pub struct ConfigCapability;

#[async_trait]
impl Capability for ConfigCapability {
    const GRANT: Grant = Grant::Config;
    const INTERFACES: &'static [&'static str] = &["agora:platform/config"];
    type ComponentState = Arc<BTreeMap<String, String>>;

    fn add_to_linker(linker: &mut Linker<InstanceState>) -> Result<()> {
        Ok(wit::add_to_linker::<_, HasSelf<InstanceState>>(
            linker,
            |s| s,
        )?)
    }

    async fn configure(
        &self,
        _component: &str,
        spec: &ComponentSpec,
    ) -> Result<Self::ComponentState> {
        Ok(Arc::new(spec.settings_as_strings()))
    }
}

impl InstanceState {
    fn settings(&self) -> wasmtime::Result<&BTreeMap<String, String>> {
        self.caps
            .config
            .as_deref()
            .ok_or_else(|| wasmtime::format_err!("config is not granted to `{}`", self.caps.name))
    }
}

impl wit::Host for InstanceState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.settings()?.get(&key).cloned())
    }

    async fn get_all(&mut self) -> wasmtime::Result<Vec<(String, String)>> {
        Ok(self.settings()?.clone().into_iter().collect())
    }
}
