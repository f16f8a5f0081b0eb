//! The component's `settings` from plugins.toml.

use serde::de::DeserializeOwned;

use crate::bindings::agora::platform::config as wit;
use crate::http::Error;

/// A setting as text (non-string TOML values come as JSON).
pub fn get(key: &str) -> Option<String> {
    wit::get(key)
}

/// A setting parsed from JSON (strings must then be quoted in TOML as JSON).
pub fn get_json<T: DeserializeOwned>(key: &str) -> Result<Option<T>, Error> {
    get(key)
        .map(|v| {
            serde_json::from_str(&v)
                .map_err(|e| Error::internal(format!("setting `{key}` is malformed: {e}")))
        })
        .transpose()
}

pub fn all() -> Vec<(String, String)> {
    wit::get_all()
}
