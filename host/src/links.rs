//! Service-to-service calls: a component's `agora:shop/*` imports, linked
//! in process to the component that exports each interface.
//!
//! The seeds made these gRPC calls. Here a call costs one instantiation of
//! the callee and a copy of its arguments; no socket, no protobuf. The
//! forwarding is generic: each imported function is defined with dynamic
//! values and passed through to the same-named export, so a new interface
//! in `wit/shop/` needs no host code. The callee runs as itself (its own
//! grants, data and limits) in an instance of its own (fresh, or warm with
//! its `limits.reuse`), and resolves by name at
//! call time, so a callee that is hot-swapped serves the next call at once.

use std::sync::Weak;

use anyhow::{anyhow, Result};
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Linker};
use wasmtime::Engine;

use crate::metrics::{metrics, LinkLabels};
use crate::plugins::{ComponentSpec, SHOP_INTERFACES};
use crate::runtime::Runtime;
use crate::state::InstanceState;
use crate::telemetry;

/// The linker for `component`: the shared one, plus forwarders for its
/// `agora:shop` imports if it has any.
pub fn linker_for(
    base: &Linker<InstanceState>,
    engine: &Engine,
    name: &str,
    component: &Component,
    spec: &ComponentSpec,
    runtime: &Weak<Runtime>,
) -> Result<Option<Linker<InstanceState>>> {
    let ty = component.component_type();
    let mut linker: Option<Linker<InstanceState>> = None;
    for (import, item) in ty.imports(engine) {
        let Some(rest) = import.strip_prefix(SHOP_INTERFACES) else {
            continue;
        };
        let unversioned = format!(
            "{SHOP_INTERFACES}{}",
            rest.split('@').next().unwrap_or(rest)
        );
        let target = spec.links.get(&unversioned).ok_or_else(|| {
            anyhow!(
                "component `{name}` imports `{import}`, but plugins.toml links it to no component \
                 (add `\"{unversioned}\" = \"<component>\"` to components.{name}.links)"
            )
        })?;
        let ComponentItem::ComponentInstance(instance) = &item.ty else {
            continue;
        };
        let linker = linker.get_or_insert_with(|| base.clone());
        let mut root = linker.root();
        let mut defined = root.instance(import)?;
        for (function, export) in instance.exports(engine) {
            if !matches!(export.ty, ComponentItem::ComponentFunc(_)) {
                continue;
            }
            let (runtime, target, interface, function_name) = (
                runtime.clone(),
                target.clone(),
                import.to_owned(),
                function.to_owned(),
            );
            // One series per linked function, looked up once per version.
            let calls = metrics()
                .link_calls
                .get_or_create(&LinkLabels {
                    caller: name.to_owned(),
                    callee: target.clone(),
                    function: format!("{unversioned}#{function}"),
                })
                .clone();
            defined.func_new_async(function, move |store, _ty, params, results| {
                let (runtime, target, interface, function_name) = (
                    runtime.clone(),
                    target.clone(),
                    interface.clone(),
                    function_name.clone(),
                );
                let trace = telemetry::child(&store.data().trace, SpanKind::Client, || {
                    (
                        format!("{target} {interface}#{function_name}"),
                        vec![
                            KeyValue::new("rpc.system", "agora"),
                            KeyValue::new("rpc.service", interface.clone()),
                            KeyValue::new("rpc.method", function_name.clone()),
                            KeyValue::new("agora.component", target.clone()),
                        ],
                    )
                });
                calls.inc();
                Box::new(async move {
                    let runtime = runtime
                        .upgrade()
                        .ok_or_else(|| wasmtime::format_err!("the host is shutting down"))?;
                    let callee = runtime
                        .registry()
                        .components
                        .get(&target)
                        .cloned()
                        .ok_or_else(|| {
                            wasmtime::format_err!(
                                "`{interface}` is linked to `{target}`, which is not running"
                            )
                        })?;
                    let called = callee
                        .call_export(&interface, &function_name, params, results, trace.clone())
                        .await;
                    telemetry::end(
                        &trace,
                        called.as_ref().err().map(|e| e.to_string()).as_deref(),
                    );
                    called
                })
            })?;
        }
    }
    Ok(linker)
}
