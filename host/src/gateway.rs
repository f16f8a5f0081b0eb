//! Gateway duties the host performs before a request reaches a component:
//! bearer-token verification and role checks from the component's `auth`
//! rules in plugins.toml.
//!
//! The verified user is passed in headers that only the host sets: any
//! `x-agora-user-*` header a client sends is removed first, so a component
//! can trust them. A valid token on an unprotected route is passed on too
//! (a component may personalise a public page); an invalid one there is
//! ignored, as if absent.

use http::{header, HeaderValue, Request, Response, StatusCode};

use crate::bindings::tokens::{Claims, Error as TokenError};
use crate::plugins::ComponentSpec;
use crate::registry::prefix_matches;
use crate::response::{self, Body};
use crate::tokens::Signer;

pub const USER_ID_HEADER: &str = "x-agora-user-id";
pub const USER_ROLES_HEADER: &str = "x-agora-user-roles";

/// Why the gateway refused a request.
#[derive(Debug)]
pub enum Refusal {
    Unauthorized { code: &'static str, message: String },
    Forbidden(String),
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
        .filter(|r| prefix_matches(&r.prefix, path))
        .filter(|r| r.methods.is_empty() || r.methods.iter().any(|m| m == method))
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
