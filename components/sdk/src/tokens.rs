//! Signed tokens, issued and verified by the host (the key stays there).

use crate::bindings::agora::platform::tokens as wit;
use crate::http::Error;

pub use wit::{Claims, IssuedToken};

impl From<wit::Error> for Error {
    fn from(e: wit::Error) -> Error {
        match e {
            wit::Error::Invalid(m) => Error::new(401, "invalid_token", m),
            wit::Error::Expired => Error::new(401, "token_expired", "the token has expired"),
        }
    }
}

/// Issues a token for `subject`; `ttl_seconds` defaults to the host's setting.
pub fn issue(
    subject: &str,
    roles: &[String],
    ttl_seconds: Option<u64>,
) -> Result<IssuedToken, Error> {
    Ok(wit::issue(subject, roles, ttl_seconds)?)
}

pub fn verify(token: &str) -> Result<Claims, Error> {
    Ok(wit::verify(token)?)
}
