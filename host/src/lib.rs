//! Agora's host: loads WebAssembly components from `plugins.toml`, grants
//! them capabilities, routes HTTP requests and events to them, and replaces
//! them while it runs. See `DESIGN.md`-level docs in each module.

pub mod accounts;
pub mod admin;
pub mod bindings;
pub mod cache;
pub mod capability;
pub mod client;
pub mod compiled;
pub mod component;
pub mod config;
pub mod console;
pub mod coordination;
pub mod develop;
pub mod engine;
pub mod gateway;
pub mod http_out;
pub mod links;
pub mod messaging;
pub mod metrics;
pub mod outbox;
pub mod pg;
pub mod plugins;
pub mod registry;
pub mod response;
pub mod response_cache;
pub mod runtime;
pub mod scaffold;
pub mod secret;
pub mod server;
pub mod state;
pub mod storage;
pub mod telemetry;
#[cfg(test)]
mod testing;
pub mod tokens;
pub mod watch;

/// Milliseconds since the Unix epoch.
pub fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
