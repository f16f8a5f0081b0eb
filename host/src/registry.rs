//! The routing table and component registry: an immutable snapshot that the
//! control plane replaces whole (behind `ArcSwap` in the runtime). A request
//! loads the current snapshot without a lock and keeps its version alive
//! until it finishes, which is how in-flight requests complete on the old
//! version during a swap.
//!
//! Paths are matched in one canonical form, made once per request by
//! [`canonical_path`] before routing, auth rules and rate limits, and handed
//! to the component in place of what the client sent. Two spellings of a
//! path (`/x//y`, `/x/./y`, `/x/%79`) can then never get two decisions: the
//! gateway and the component's router see the same segments. The host
//! rewrites rather than refuses where the spelling is harmless (a trailing
//! slash, `..` from a client that did not resolve it), and refuses only what
//! has no single meaning: an encoded `/`, a broken escape, bytes that are
//! not UTF-8.

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

    /// The component whose route is the longest prefix of the canonical
    /// `path`, matching whole segments: `/users` serves `/users` and
    /// `/users/me`, not `/usersettings`.
    /// Returns the route (the prefix) with the component.
    pub fn route(&self, path: &str) -> Option<(&str, &Arc<ComponentVersion>)> {
        self.routes
            .iter()
            .find(|(prefix, _)| prefix_matches(prefix, path))
            .and_then(|(prefix, name)| Some((prefix.as_str(), self.components.get(name)?)))
    }
}

/// Whether the canonical `prefix` covers the canonical `path`, on whole segments.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

/// Why a request path has no canonical form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the request target must be a path starting with '/'")]
    NotAbsolute,
    #[error("the path has a malformed percent-escape in segment {0:?}")]
    BadEscape(String),
    #[error(
        "the path has an encoded '/' (%2F) in segment {0:?}; a '/' inside a segment \
         has no single meaning"
    )]
    EncodedSlash(String),
    #[error("the path is not UTF-8 once percent-decoded, in segment {0:?}")]
    NotUtf8(String),
}

/// The canonical form of a request path: percent-decoded segment by
/// segment, empty and `.` segments dropped, `..` resolved (never above the
/// root), then each segment re-encoded the one way [`encode_segment`] does.
/// No trailing slash except for the root itself.
///
/// The component's router (the SDK's) splits on `/`, skips empty segments
/// and percent-decodes each segment once, so it sees exactly the decoded
/// segments the gateway matched.
pub fn canonical_path(path: &str) -> Result<String, PathError> {
    let rest = path.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
    let mut segments: Vec<String> = Vec::new();
    for raw in rest.split('/') {
        match decode_segment(raw)?.as_str() {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            decoded => segments.push(encode_segment(decoded)),
        }
    }
    Ok(format!("/{}", segments.join("/")))
}

fn decode_segment(raw: &str) -> Result<String, PathError> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let escape = bytes
                .get(i + 1)
                .copied()
                .and_then(hex)
                .zip(bytes.get(i + 2).copied().and_then(hex));
            let Some((high, low)) = escape else {
                return Err(PathError::BadEscape(raw.to_owned()));
            };
            let byte = high * 16 + low;
            if byte == b'/' {
                return Err(PathError::EncodedSlash(raw.to_owned()));
            }
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| PathError::NotUtf8(raw.to_owned()))
}

/// Percent-encodes everything but RFC 3986's unreserved characters and the
/// sub-delimiters a path segment may hold (`+` excepted: form decoders read
/// it as a space, so it is always sent as `%2B`).
fn encode_segment(decoded: &str) -> String {
    let mut out = String::with_capacity(decoded.len());
    for &byte in decoded.as_bytes() {
        match byte {
            b'A'..=b'Z'
            | b'a'..=b'z'
            | b'0'..=b'9'
            | b'-'
            | b'.'
            | b'_'
            | b'~'
            | b'!'
            | b'$'
            | b'&'
            | b'\''
            | b'('
            | b')'
            | b'*'
            | b','
            | b';'
            | b'='
            | b':'
            | b'@' => out.push(byte as char),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(prefix_matches("/users", "/users"));
        assert!(prefix_matches("/users", "/users/me"));
        assert!(!prefix_matches("/users", "/usersettings"));
        assert!(prefix_matches("/", "/anything"));
        assert!(!prefix_matches("/users/me", "/users"));
    }

    #[test]
    fn every_spelling_of_a_path_has_one_canonical_form() {
        for spelling in [
            "/x/y",
            "/x//y",
            "//x/y/",
            "/x/./y",
            "/x/%2E/y",
            "/x/z/../y",
            "/x/z/%2e%2E/y",
            "/x/z/.%2E/y",
            "/%78/%79",
            "/x/%79/",
            "/../x/y",
        ] {
            assert_eq!(
                canonical_path(spelling).as_deref(),
                Ok("/x/y"),
                "{spelling}"
            );
        }
        assert_eq!(canonical_path("/").as_deref(), Ok("/"));
        assert_eq!(canonical_path("//").as_deref(), Ok("/"));
        assert_eq!(canonical_path("/..").as_deref(), Ok("/"));
        // One encoding for what must stay encoded, upper-case hex.
        assert_eq!(
            canonical_path("/a b/caf%c3%a9/1+1/%3F%23%25").as_deref(),
            Ok("/a%20b/caf%C3%A9/1%2B1/%3F%23%25")
        );
        assert_eq!(
            canonical_path("/a:b@c!$&'()*,;=").as_deref(),
            Ok("/a:b@c!$&'()*,;=")
        );
    }

    #[test]
    fn paths_without_one_meaning_are_refused() {
        assert!(matches!(
            canonical_path("/x%2Fy"),
            Err(PathError::EncodedSlash(_))
        ));
        assert!(matches!(
            canonical_path("/x/%2f"),
            Err(PathError::EncodedSlash(_))
        ));
        assert!(matches!(
            canonical_path("/x/%zz"),
            Err(PathError::BadEscape(_))
        ));
        assert!(matches!(
            canonical_path("/x/%4"),
            Err(PathError::BadEscape(_))
        ));
        assert!(matches!(
            canonical_path("/x/%"),
            Err(PathError::BadEscape(_))
        ));
        assert!(matches!(
            canonical_path("/x/%FF"),
            Err(PathError::NotUtf8(_))
        ));
        assert_eq!(canonical_path("*"), Err(PathError::NotAbsolute));
        assert_eq!(canonical_path(""), Err(PathError::NotAbsolute));
    }
}
