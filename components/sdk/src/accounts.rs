//! Provisioning the users of trusted OpenID Connect providers, for the
//! component named in plugins.toml as `[tokens] accounts`.
//!
//! ```ignore
//! struct Identity;
//!
//! impl agora_sdk::accounts::AccountProvider for Identity {
//!     fn provision(user: ExternalUser) -> Result<(), String> {
//!         // INSERT ... ON CONFLICT (id) DO NOTHING
//!         Ok(())
//!     }
//! }
//!
//! agora_sdk::account_provider!(Identity);
//! ```
//!
//! The export lives in a world of its own (`agora:platform/account-provider`),
//! so only the component that keeps users carries it.

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "agora:platform/account-provider",
        pub_export_macro: true,
        export_macro_name: "__export_accounts",
        default_bindings_module: "agora_sdk::accounts::bindings",
    });
}

pub use bindings::exports::agora::platform::accounts::ExternalUser;

/// The host calls [`AccountProvider::provision`] the first time it sees a
/// user who signed in at a trusted provider, before the user's request
/// reaches any component, and again after restarts and on every host: it
/// must create the record only if there is none. An error refuses the
/// user's request with 503.
pub trait AccountProvider {
    fn provision(user: ExternalUser) -> Result<(), String>;
}

/// Exports an [`AccountProvider`] implementation.
#[macro_export]
macro_rules! account_provider {
    ($provider:ty) => {
        struct __AgoraAccounts;

        impl $crate::accounts::bindings::exports::agora::platform::accounts::Guest
            for __AgoraAccounts
        {
            fn provision(user: $crate::accounts::ExternalUser) -> Result<(), String> {
                <$provider as $crate::accounts::AccountProvider>::provision(user)
            }
        }

        $crate::accounts::bindings::__export_accounts!(__AgoraAccounts);
    };
}
