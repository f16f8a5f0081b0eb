//! Users of trusted OpenID Connect providers get a record on first use:
//! before such a user's first request reaches a component, the host calls
//! `agora:platform/accounts#provision` on the component that `[tokens]
//! accounts` names (identity, in the shop), so every service that looks the
//! user up (`agora:shop/users`) finds them.
//!
//! "First" is per host process: the users provisioned are remembered in
//! memory, so a user costs one call per host and restart, and none on the
//! request path after that. The export must therefore be idempotent, which
//! an upsert is. Remembering in the shared cache instead would save a call
//! per host but add a cache round trip to every request of such a user.
//! The memory is bounded: past [`MAX_REMEMBERED`] users it starts again,
//! which costs each user one more (idempotent) call.

use std::collections::HashSet;
use std::sync::Mutex;

use wasmtime::component::Val;

use crate::runtime::Runtime;
use crate::tokens::ExternalUser;

/// The exported interface, as the component names it.
const INTERFACE: &str = "agora:platform/accounts@0.1.0";

/// Users remembered as provisioned; about 100 bytes each.
const MAX_REMEMBERED: usize = 100_000;

pub struct Accounts {
    /// `[tokens] accounts`, read at start like the rest of `[tokens]`.
    component: Option<String>,
    provisioned: Mutex<HashSet<String>>,
}

impl Accounts {
    pub fn new(component: Option<String>) -> Accounts {
        Accounts {
            component,
            provisioned: Mutex::default(),
        }
    }

    /// Makes sure `user` has a record; an error says why it could not be made.
    pub async fn provision(
        &self,
        runtime: &Runtime,
        user: &ExternalUser,
        trace: opentelemetry::Context,
    ) -> Result<(), String> {
        let Some(component) = &self.component else {
            return Ok(());
        };
        if self.provisioned.lock().unwrap().contains(&user.id) {
            return Ok(());
        }
        let accounts = runtime
            .registry()
            .components
            .get(component)
            .cloned()
            .ok_or_else(|| format!("the accounts component `{component}` is not running"))?;
        let text = |s: &Option<String>| Val::Option(s.clone().map(|s| Box::new(Val::String(s))));
        let record = Val::Record(vec![
            ("id".into(), Val::String(user.id.clone())),
            ("issuer".into(), Val::String(user.issuer.clone())),
            ("subject".into(), Val::String(user.subject.clone())),
            ("email".into(), text(&user.email)),
            ("email-verified".into(), Val::Bool(user.email_verified)),
            ("name".into(), text(&user.name)),
        ]);
        let mut result = [Val::Bool(false)];
        accounts
            .call_export(INTERFACE, "provision", &[record], &mut result, trace)
            .await
            .map_err(|e| format!("{e:#}"))?;
        match &result[0] {
            Val::Result(Ok(_)) => {}
            Val::Result(Err(Some(reason))) => match &**reason {
                Val::String(reason) => return Err(reason.clone()),
                other => return Err(format!("{other:?}")),
            },
            other => return Err(format!("`provision` returned {other:?}")),
        }
        let mut provisioned = self.provisioned.lock().unwrap();
        if provisioned.len() >= MAX_REMEMBERED {
            provisioned.clear();
        }
        provisioned.insert(user.id.clone());
        Ok(())
    }
}
