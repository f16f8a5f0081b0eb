//! Host bindings generated from `wit/` (world `agora:platform/platform`).
//!
//! Imports are async (backends do network I/O) and trappable (a host fault,
//! such as a stale resource handle, traps the instance rather than being
//! passed off as a guest-visible error).

wasmtime::component::bindgen!({
    path: "../wit",
    world: "platform",
    imports: { default: async | trappable },
    exports: { default: async },
    with: {
        "agora:platform/storage.transaction": crate::storage::TransactionHandle,
    },
});

pub use agora::platform::{cache, config, messaging, storage, token_issuer, tokens};
pub use exports::agora::platform::{schema, subscriber};
