//! The routing table and component registry: an immutable snapshot that the
//! control plane replaces whole (behind `ArcSwap` in the runtime). A request
//! loads the current snapshot without a lock and keeps its version alive
//! until it finishes, which is how in-flight requests complete on the old
//! version during a swap.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::component::ComponentVersion;

#[derive(Default)]
pub struct Registry {
    pub components: BTreeMap<String, Arc<ComponentVersion>>,
    /// (prefix, component), longest prefix first.
    routes: Vec<(String, String)>,
}

impl Registry {
    pub fn new(components: BTreeMap<String, Arc<ComponentVersion>>) -> Registry {
        let mut routes: Vec<(String, String)> = components
            .values()
            .flat_map(|c| c.spec.routes.iter().map(|r| (r.clone(), c.name.clone())))
            .collect();
        routes.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Registry { components, routes }
    }

    /// A copy with one component replaced or added.
    pub fn with(&self, version: Arc<ComponentVersion>) -> Registry {
        let mut components = self.components.clone();
        components.insert(version.name.clone(), version);
        Registry::new(components)
    }

    /// The component whose route is the longest prefix of `path`, matching
    /// whole segments: `/users` serves `/users` and `/users/me`, not `/usersettings`.
    pub fn route(&self, path: &str) -> Option<&Arc<ComponentVersion>> {
        self.routes
            .iter()
            .find(|(prefix, _)| prefix_matches(prefix, path))
            .and_then(|(_, name)| self.components.get(name))
    }
}

pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_matches;

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(prefix_matches("/users", "/users"));
        assert!(prefix_matches("/users", "/users/me"));
        assert!(!prefix_matches("/users", "/usersettings"));
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/api/", "/api/x"));
        assert!(!prefix_matches("/users/me", "/users"));
    }
}
