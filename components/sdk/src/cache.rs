//! The cache: the component's own keys, with expiry.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::bindings::agora::platform::cache as wit;
use crate::http::Error;

impl From<wit::Error> for Error {
    fn from(e: wit::Error) -> Error {
        match e {
            wit::Error::Unavailable(m) => Error::unavailable(format!("cache: {m}")),
            wit::Error::NotANumber(m) | wit::Error::TooLarge(m) => {
                Error::internal(format!("cache: {m}"))
            }
        }
    }
}

fn millis(ttl: Option<Duration>) -> Option<u64> {
    ttl.map(|t| t.as_millis() as u64)
}

pub fn get(key: &str) -> Result<Option<Vec<u8>>, Error> {
    Ok(wit::get(key)?)
}

pub fn set(key: &str, value: &[u8], ttl: Option<Duration>) -> Result<(), Error> {
    Ok(wit::set(key, value, millis(ttl))?)
}

/// The value at `key` as JSON; an entry that no longer parses (written by
/// an older version) counts as a miss.
pub fn get_json<T: DeserializeOwned>(key: &str) -> Result<Option<T>, Error> {
    Ok(get(key)?.and_then(|bytes| serde_json::from_slice(&bytes).ok()))
}

pub fn set_json<T: Serialize + ?Sized>(
    key: &str,
    value: &T,
    ttl: Option<Duration>,
) -> Result<(), Error> {
    set(key, &serde_json::to_vec(value)?, ttl)
}

/// Returns whether the key existed.
pub fn delete(key: &str) -> Result<bool, Error> {
    Ok(wit::delete(key)?)
}

/// Adds `delta` atomically; `ttl` applies when this creates the key.
pub fn increment(key: &str, delta: i64, ttl: Option<Duration>) -> Result<i64, Error> {
    Ok(wit::increment(key, delta, millis(ttl))?)
}

/// Drops the responses the gateway keeps for this component (plugins.toml
/// `response_cache`) whose path and query start with `prefix`, for every
/// user; returns how many. Call it after a write that changes what those
/// GETs answer, e.g. `invalidate_responses("/products")` after a product
/// changed.
pub fn invalidate_responses(prefix: &str) -> Result<u64, Error> {
    Ok(wit::invalidate_responses(prefix)?)
}
