//! Gateway duties the host performs before a request reaches a component:
//! bearer-token verification and role checks from the component's `auth`
//! rules, and rate limits from its `rate_limits`, in plugins.toml.
//!
//! The verified user is passed in headers that only the host sets: any
//! `x-agora-user-*` header a client sends is removed first, so a component
//! can trust them. A valid token on an unprotected route is passed on too
//! (a component may personalise a public page); an invalid one there is
//! ignored, as if absent.

use std::net::SocketAddr;
use std::time::Duration;

use http::{header, HeaderValue, Request, Response, StatusCode};

use crate::bindings::tokens::{Claims, Error as TokenError};
use crate::cache::CacheBackend;
use crate::plugins::{ComponentSpec, RateLimit};
use crate::registry::prefix_matches;
use crate::response::{self, Body};
use crate::tokens::Signer;

pub const USER_ID_HEADER: &str = "x-agora-user-id";
pub const USER_ROLES_HEADER: &str = "x-agora-user-roles";

/// The peer address of the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// Why the gateway refused a request.
#[derive(Debug)]
pub enum Refusal {
    Unauthorized { code: &'static str, message: String },
    Forbidden(String),
    RateLimited { retry_after_seconds: u64 },
}

impl Refusal {
    pub fn response(&self) -> Response<Body> {
        match self {
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

/// Applies the component's auth rules to `request`; on success the request
/// carries the verified user, if any.
pub fn authorize<B>(
    spec: &ComponentSpec,
    signer: &Signer,
    request: &mut Request<B>,
) -> Result<(), Refusal> {
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
    let claims = token.map(|t| signer.verify(t));
    let user = match (rule, claims) {
        (None, Some(Ok(claims))) => Some(claims),
        (None, _) => None,
        (Some(_), None) => {
            return Err(unauthorized(
                "unauthorized",
                "this request needs a bearer token",
            ));
        }
        (Some(_), Some(Err(TokenError::Expired))) => {
            return Err(unauthorized(
                "token_expired",
                "the bearer token has expired",
            ));
        }
        (Some(_), Some(Err(TokenError::Invalid(reason)))) => {
            return Err(unauthorized(
                "invalid_token",
                format!("the bearer token is invalid: {reason}"),
            ));
        }
        (Some(rule), Some(Ok(claims))) => {
            if !rule.roles.is_empty() && !claims.roles.iter().any(|r| rule.roles.contains(r)) {
                return Err(Refusal::Forbidden(format!(
                    "this request needs the role {}",
                    rule.roles.join(" or ")
                )));
            }
            Some(claims)
        }
    };
    if let Some(Claims { subject, roles, .. }) = user {
        let headers = request.headers_mut();
        if let (Ok(id), Ok(roles)) = (
            HeaderValue::from_str(&subject),
            HeaderValue::from_str(&roles.join(",")),
        ) {
            headers.insert(USER_ID_HEADER, id);
            headers.insert(USER_ROLES_HEADER, roles);
        }
    }
    Ok(())
}

fn rule_applies(prefix: &str, methods: &[String], path: &str, method: &str) -> bool {
    prefix_matches(prefix, path) && (methods.is_empty() || methods.iter().any(|m| m == method))
}

/// Counts the request against every rate limit that applies to it, per
/// client: the verified user (so call it after [`authorize`]), else the
/// client address. Fixed windows, counted with the cache's atomic
/// increment. If the cache cannot be reached the request is let through:
/// a rate limit protects the service, it is not worth an outage of its own.
pub async fn admit<B>(
    component: &str,
    spec: &ComponentSpec,
    cache: &dyn CacheBackend,
    request: &Request<B>,
) -> Result<(), Refusal> {
    let path = request.uri().path();
    let method = request.method().as_str();
    let rules = spec
        .rate_limits
        .iter()
        .filter(|r| rule_applies(&r.prefix, &r.methods, path, method));
    let client = || match request
        .headers()
        .get(USER_ID_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        Some(user) => format!("user:{user}"),
        None => match request.extensions().get::<ClientAddr>() {
            Some(ClientAddr(addr)) => format!("addr:{}", addr.ip()),
            None => "addr:unknown".to_owned(),
        },
    };
    let now = crate::now_millis() / 1000;
    for rule in rules {
        let RateLimit {
            prefix,
            requests,
            window_seconds,
            ..
        } = rule;
        let window = now / window_seconds;
        // `/` cannot occur in a component name, so no component's keys
        // (prefixed `<name>:`) can collide with these.
        let key = format!("agora/rate:{component}:{prefix}:{}:{window}", client());
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
