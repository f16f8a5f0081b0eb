//! Signed tokens, issued and verified by the host (the key stays there).
//!
//! Verifying needs the `tokens` grant, issuing the `tokens-issue` grant;
//! the host issues only the roles plugins.toml lists in `issues_roles`.

use crate::bindings::agora::platform::token_issuer as issuer;
use crate::bindings::agora::platform::tokens as wit;
use crate::http::Error;

pub use issuer::IssuedToken;
pub use wit::Claims;

impl From<wit::Error> for Error {
    fn from(e: wit::Error) -> Error {
        match e {
            wit::Error::Invalid(m) => Error::new(401, "invalid_token", m),
            wit::Error::Expired => Error::new(401, "token_expired", "the token has expired"),
        }
    }
}

/// A refused issue is the component's own fault or its configuration's, never the client's: 500.
impl From<issuer::Error> for Error {
    fn from(e: issuer::Error) -> Error {
        match e {
            issuer::Error::RoleNotGranted(m) => Error::new(500, "role_not_granted", m),
            issuer::Error::Invalid(m) => Error::new(500, "invalid_token_request", m),
        }
    }
}

/// Issues a token for `subject`; `ttl_seconds` defaults to the host's
/// setting, which is also the longest allowed.
pub fn issue(
    subject: &str,
    roles: &[String],
    ttl_seconds: Option<u64>,
) -> Result<IssuedToken, Error> {
    Ok(issuer::issue(subject, roles, ttl_seconds)?)
}

pub fn verify(token: &str) -> Result<Claims, Error> {
    Ok(wit::verify(token)?)
}
