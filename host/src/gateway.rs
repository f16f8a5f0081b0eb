//! Gateway duties the host performs before a request reaches a component:
//! path normalization, bearer-token verification and role checks from the
//! component's `auth` rules, and rate limits from its `rate_limits`, in
//! plugins.toml.
//!
//! [`normalize`] runs first and replaces the request's path with its
//! canonical form ([`canonical_path`]), so routing, every rule and the
//! component all see one path: no spelling of an admin-only path slips past
//! its rule while the component's router still reaches the handler.
//!
//! The verified user is passed in headers that only the host sets: any
//! `x-agora-user-*` header a client sends is removed first, so a component
//! can trust them. A valid token on an unprotected route is passed on too
//! (a component may personalise a public page); an invalid one there is
//! ignored, as if absent.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use http::uri::PathAndQuery;
use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use ipnet::IpNet;

use crate::bindings::tokens::Claims;
use crate::cache::CacheBackend;
use crate::console::COOKIE as CONSOLE_COOKIE;
use crate::plugins::{ComponentSpec, RateLimit, RateLimitPer};
use crate::registry::{canonical_path, prefix_matches};
use crate::response::{self, Body};
use crate::tokens::{Authenticator, ExternalUser, Rejection, Verified};

pub const USER_ID_HEADER: &str = "x-agora-user-id";
pub const USER_ROLES_HEADER: &str = "x-agora-user-roles";

/// The peer address of the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// A proxy or load balancer the host trusts to say who the client is: an
/// address (`10.0.0.5`) or a network (`10.0.0.0/8`) in `trusted_proxies`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct TrustedNet(IpNet);

impl TryFrom<String> for TrustedNet {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
            .map(TrustedNet)
            .map_err(|_| format!("`{text}` is neither an address nor a network (`10.0.0.0/8`)"))
    }
}

/// The header trusted proxies name the client in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAddressHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (HAProxy's `option
    /// forwardfor`, nginx, most balancers).
    #[default]
    XForwardedFor,
    /// RFC 7239's `Forwarded: for=client, for=proxy1`.
    Forwarded,
}

impl ClientAddressHeader {
    fn name(self) -> header::HeaderName {
        match self {
            ClientAddressHeader::XForwardedFor => {
                header::HeaderName::from_static("x-forwarded-for")
            }
            ClientAddressHeader::Forwarded => header::FORWARDED,
        }
    }
}

/// Who the client of a request is, given the proxies in front of the host.
#[derive(Debug, Clone, Default)]
pub struct Proxies {
    trusted: Vec<TrustedNet>,
    header: ClientAddressHeader,
}

impl Proxies {
    pub fn new(trusted: Vec<TrustedNet>, header: ClientAddressHeader) -> Proxies {
        Proxies { trusted, header }
    }

    /// Whether `ip` is a trusted proxy; an IPv4 peer of a dual-stack
    /// listener (`::ffff:10.0.0.5`) counts as its IPv4 address.
    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted.iter().any(|net| net.0.contains(&ip))
    }

    /// The client's address: the connection's peer, unless that is a
    /// trusted proxy; then the nearest address in the proxies' header that
    /// is not one. Each proxy appends the address it was reached from, so
    /// the header is read from its end; whatever lies beyond the last
    /// trusted hop was written by the client and is not believed. An entry
    /// that is not an address (`unknown`, an obfuscated name) stops the
    /// walk at the hop that wrote it.
    pub fn client(&self, peer: IpAddr, headers: &http::HeaderMap) -> IpAddr {
        if self.trusted.is_empty() || !self.trusts(peer) {
            return peer;
        }
        let entries: Vec<&str> = headers
            .get_all(self.header.name())
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect();
        let mut client = peer;
        for entry in entries.iter().rev() {
            if !self.trusts(client) {
                break;
            }
            let address = match self.header {
                ClientAddressHeader::XForwardedFor => Some(entry.trim()),
                ClientAddressHeader::Forwarded => forwarded_for(entry),
            };
            match address.and_then(parse_node) {
                Some(ip) => client = ip.to_canonical(),
                None => break,
            }
        }
        client
    }
}

/// The `for=` of one `Forwarded` element (`for=192.0.2.1;proto=https`).
fn forwarded_for(element: &str) -> Option<&str> {
    element.split(';').find_map(|pair| {
        let (name, value) = pair.trim().split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("for")
            .then(|| value.trim().trim_matches('"'))
    })
}

/// An address as proxies write it: `192.0.2.1`, `192.0.2.1:4711`,
/// `2001:db8::1`, `[2001:db8::1]` or `[2001:db8::1]:4711`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = node.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    node.parse::<SocketAddr>().ok().map(|s| s.ip())
}

/// Why the gateway refused a request.
#[derive(Debug)]
pub enum Refusal {
    InvalidPath(String),
    InvalidHost,
    Unauthorized {
        code: &'static str,
        message: String,
    },
    Forbidden(String),
    RateLimited {
        retry_after_seconds: u64,
    },
    /// The token's provider, or the accounts component, cannot be reached.
    Unavailable {
        code: &'static str,
        message: String,
    },
}

impl Refusal {
    pub fn response(&self) -> Response<Body> {
        match self {
            Refusal::InvalidPath(message) => {
                response::error(StatusCode::BAD_REQUEST, "invalid_path", message.clone())
            }
            Refusal::InvalidHost => response::error(
                StatusCode::BAD_REQUEST,
                "invalid_host",
                "the Host header is not a host[:port]",
            ),
            Refusal::Unauthorized { code, message } => {
                let mut response = response::error(StatusCode::UNAUTHORIZED, code, message.clone());
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                response
            }
            Refusal::Forbidden(message) => {
                response::error(StatusCode::FORBIDDEN, "forbidden", message.clone())
            }
            Refusal::Unavailable { code, message } => {
                response::error(StatusCode::SERVICE_UNAVAILABLE, code, message.clone())
            }
            Refusal::RateLimited {
                retry_after_seconds,
            } => {
                let mut response = response::error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!("too many requests; retry in {retry_after_seconds} s"),
                );
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_seconds));
                response
            }
        }
    }
}

fn unauthorized(code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal::Unauthorized {
        code,
        message: message.into(),
    }
}

/// Replaces the request's path with its canonical form (the query is kept
/// as sent), or refuses a path that has none with 400 `invalid_path`, and a
/// `Host` that is not `host[:port]` with 400 `invalid_host` (hyper lets
/// spaces and more through; components and the response cache read it).
pub fn normalize<B>(request: &mut Request<B>) -> Result<(), Refusal> {
    if let Some(host) = request.headers().get(header::HOST) {
        let authority = host
            .to_str()
            .ok()
            .and_then(|h| h.parse::<http::uri::Authority>().ok());
        if authority.is_none_or(|a| a.as_str().contains('@')) {
            return Err(Refusal::InvalidHost);
        }
    }
    let uri = request.uri();
    let canonical = canonical_path(uri.path()).map_err(|e| Refusal::InvalidPath(e.to_string()))?;
    if canonical == uri.path() {
        return Ok(());
    }
    let path_and_query = match uri.query() {
        Some(query) => format!("{canonical}?{query}"),
        None => canonical,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(
        PathAndQuery::try_from(path_and_query)
            .map_err(|e| Refusal::InvalidPath(format!("the path cannot be normalized: {e}")))?,
    );
    *request.uri_mut() = Uri::from_parts(parts)
        .map_err(|e| Refusal::InvalidPath(format!("the path cannot be normalized: {e}")))?;
    Ok(())
}

/// Removes the console's session cookie from a request for a component.
/// Browsers send a cookie to every port of its host (RFC 6265 ignores
/// ports), so an operator signed in to the console on the admin port sends
/// it to the public listener too, where a component would read it.
pub fn strip_console_cookie(headers: &mut http::HeaderMap) {
    let holds_it = |v: &http::HeaderValue| {
        v.as_bytes()
            .windows(CONSOLE_COOKIE.len())
            .any(|w| w == CONSOLE_COOKIE.as_bytes())
    };
    if !headers.get_all(http::header::COOKIE).iter().any(holds_it) {
        return;
    }
    let kept: Vec<String> = headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| {
            !pair.is_empty() && pair.split('=').next().map(str::trim) != Some(CONSOLE_COOKIE)
        })
        .map(str::to_owned)
        .collect();
    headers.remove(http::header::COOKIE);
    if let Ok(value) = http::HeaderValue::from_str(&kept.join("; ")) {
        if !kept.is_empty() {
            headers.insert(http::header::COOKIE, value);
        }
    }
}

/// Applies the component's auth rules to `request`; on success the request
/// carries the verified user, if any, and a user of a trusted provider is
/// returned for provisioning.
pub async fn authorize<B>(
    spec: &ComponentSpec,
    authenticator: &Authenticator,
    request: &mut Request<B>,
) -> Result<Option<ExternalUser>, Refusal> {
    let headers = request.headers_mut();
    headers.remove(USER_ID_HEADER);
    headers.remove(USER_ROLES_HEADER);
    let path = request.uri().path();
    let method = request.method().as_str();
    let rule = spec
        .auth
        .iter()
        .filter(|r| rule_applies(&r.prefix, &r.methods, path, method))
        .max_by_key(|r| r.prefix.len());
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim());
    let verified = match token {
        Some(token) => Some(authenticator.verify(token).await),
        None => None,
    };
    let user = match (rule, verified) {
        (None, Some(Ok(verified))) => Some(verified),
        (None, _) => None,
        (Some(_), None) => {
            return Err(unauthorized(
                "unauthorized",
                "this request needs a bearer token",
            ));
        }
        (Some(_), Some(Err(Rejection::Expired))) => {
            return Err(unauthorized(
                "token_expired",
                "the bearer token has expired",
            ));
        }
        (Some(_), Some(Err(Rejection::Invalid(reason)))) => {
            return Err(unauthorized(
                "invalid_token",
                format!("the bearer token is invalid: {reason}"),
            ));
        }
        (Some(_), Some(Err(Rejection::Unavailable(message)))) => {
            return Err(Refusal::Unavailable {
                code: "issuer_unavailable",
                message,
            });
        }
        (Some(rule), Some(Ok(verified))) => {
            let roles = &verified.claims.roles;
            if !rule.roles.is_empty() && !roles.iter().any(|r| rule.roles.contains(r)) {
                return Err(Refusal::Forbidden(format!(
                    "this request needs the role {}",
                    rule.roles.join(" or ")
                )));
            }
            Some(verified)
        }
    };
    let Some(Verified {
        claims: Claims { subject, roles, .. },
        external,
    }) = user
    else {
        return Ok(None);
    };
    let headers = request.headers_mut();
    if let (Ok(id), Ok(roles)) = (
        HeaderValue::from_str(&subject),
        HeaderValue::from_str(&roles.join(",")),
    ) {
        headers.insert(USER_ID_HEADER, id);
        headers.insert(USER_ROLES_HEADER, roles);
    }
    Ok(external)
}

fn rule_applies(prefix: &str, methods: &[String], path: &str, method: &str) -> bool {
    prefix_matches(prefix, path) && (methods.is_empty() || methods.iter().any(|m| m == method))
}

/// The network a client address stands for: an IPv4 address itself, and
/// the /64 of an IPv6 one, because a single IPv6 subscriber is routinely
/// given a whole /64 and could otherwise rotate through 2^64 budgets.
fn client_network(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
        v4 => v4,
    }
}

/// Counts the request against every rate limit that applies to it, per
/// client as each rule's `per` says: the verified user, else the client
/// address (so call it after [`authorize`]), or the client address alone.
/// Fixed windows, counted with the cache's atomic increment. If the cache
/// cannot be reached the request is let through: a rate limit protects the
/// service, it is not worth an outage of its own.
pub async fn admit<B>(
    component: &str,
    spec: &ComponentSpec,
    cache: &dyn CacheBackend,
    request: &Request<B>,
) -> Result<(), Refusal> {
    let path = request.uri().path();
    let method = request.method().as_str();
    let address = || match request.extensions().get::<ClientAddr>() {
        Some(ClientAddr(addr)) => format!("addr:{}", client_network(addr.ip())),
        None => "addr:unknown".to_owned(),
    };
    let user = || {
        request
            .headers()
            .get(USER_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(|user| format!("user:{user}"))
    };
    let now = crate::now_millis() / 1000;
    for (index, rule) in spec.rate_limits.iter().enumerate() {
        let RateLimit {
            prefix,
            methods,
            requests,
            window_seconds,
            per,
        } = rule;
        if !rule_applies(prefix, methods, path, method) {
            continue;
        }
        let client = match per {
            RateLimitPer::User => user().unwrap_or_else(address),
            RateLimitPer::Address => address(),
        };
        let window = now / window_seconds;
        // One counter per rule (two rules on one prefix must not share
        // one). `/` cannot occur in a component name, so no component's
        // keys (prefixed `<name>:`) can collide with these.
        let key = format!("agora/rate:{component}:{index}:{client}:{window}");
        match cache
            .increment(&key, 1, Some(Duration::from_secs(*window_seconds)))
            .await
        {
            Ok(count) if count as u64 > *requests => {
                return Err(Refusal::RateLimited {
                    retry_after_seconds: (window + 1) * window_seconds - now,
                });
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(%component, error = ?e, "rate limiting skipped: the cache failed")
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_is_the_nearest_untrusted_hop_and_only_proxies_are_believed() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let nets = |list: &[&str]| {
            list.iter()
                .map(|s| TrustedNet::try_from(s.to_string()).unwrap())
                .collect::<Vec<_>>()
        };
        let headers = |name: &str, values: &[&str]| {
            let mut headers = http::HeaderMap::new();
            for v in values {
                headers.append(
                    http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            headers
        };
        let xff = Proxies::new(
            nets(&["10.0.0.0/8", "127.0.0.1"]),
            ClientAddressHeader::XForwardedFor,
        );
        // A client's own "X-Forwarded-For" is ignored.
        let forged = headers("x-forwarded-for", &["6.6.6.6"]);
        assert_eq!(xff.client(ip("203.0.113.9"), &forged), ip("203.0.113.9"));
        // Through two trusted proxies: the address the first one saw; what the
        // client wrote before that is not believed.
        let chain = headers("x-forwarded-for", &["6.6.6.6, 198.51.100.7", "10.1.2.3"]);
        assert_eq!(xff.client(ip("127.0.0.1"), &chain), ip("198.51.100.7"));
        // Unparsable: the proxy that wrote it is the client.
        let junk = headers("x-forwarded-for", &["unknown"]);
        assert_eq!(xff.client(ip("10.9.9.9"), &junk), ip("10.9.9.9"));
        // No trusted proxies: nothing is believed.
        let none = Proxies::default();
        assert_eq!(none.client(ip("127.0.0.1"), &chain), ip("127.0.0.1"));

        let rfc = Proxies::new(nets(&["10.0.0.0/8"]), ClientAddressHeader::Forwarded);
        let forwarded = headers(
            "forwarded",
            &[r#"for=6.6.6.6, for="[2001:db8:cafe::17]:4711";proto=https, for=10.0.0.2"#],
        );
        assert_eq!(
            rfc.client(ip("10.0.0.1"), &forwarded),
            ip("2001:db8:cafe::17")
        );
        assert!(TrustedNet::try_from("not an address".to_owned()).is_err());
        // A dual-stack listener sees an IPv4 proxy as ::ffff:a.b.c.d.
        let mapped = headers("x-forwarded-for", &["198.51.100.7"]);
        assert_eq!(
            xff.client(ip("::ffff:127.0.0.1"), &mapped),
            ip("198.51.100.7")
        );
    }

    #[test]
    fn a_component_never_sees_the_console_session() {
        let mut headers = http::HeaderMap::new();
        headers.append(
            "cookie",
            "theme=dark; agora_console=secret".parse().unwrap(),
        );
        headers.append("cookie", "agora_console=other".parse().unwrap());
        strip_console_cookie(&mut headers);
        let left: Vec<_> = headers.get_all("cookie").iter().collect();
        assert_eq!(left, ["theme=dark"]);
        let mut only = http::HeaderMap::new();
        only.insert("cookie", "agora_console=secret".parse().unwrap());
        strip_console_cookie(&mut only);
        assert!(only.get("cookie").is_none());
    }

    #[test]
    fn an_ipv6_client_counts_as_its_64() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(client_network(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(client_network(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(
            client_network(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            client_network(ip("2001:db8:1:2::1"))
        );
        assert_ne!(
            client_network(ip("2001:db8:1:2::1")),
            client_network(ip("2001:db8:1:3::1"))
        );
    }
}
