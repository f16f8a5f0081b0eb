//! The Agora guest SDK: write a component as a small service.
//!
//! ```ignore
//! use agora_sdk::prelude::*;
//!
//! struct Hello;
//!
//! impl Service for Hello {
//!     fn router() -> Router {
//!         Router::new().get("/hello/{name}", |req| {
//!             Ok(Response::json(200, &serde_json::json!({ "hello": req.param("name") })))
//!         })
//!     }
//! }
//!
//! agora_sdk::service!(Hello);
//! ```
//!
//! Handlers get a parsed [`Request`](http::Request) and return a
//! [`Response`](http::Response) or an [`Error`](http::Error) that becomes
//! `{"error":{"code":"...","message":"..."}}` with its status. Capabilities
//! are plain functions ([`storage::query`], [`cache::get_json`],
//! [`messaging::publish`], ...) over the WIT imports; the host grants them.

pub mod accounts;
pub mod cache;
pub mod config;
pub mod http;
pub mod messaging;
pub mod outbound;
pub mod storage;
pub mod tokens;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "agora:platform/service",
        with: {
            "wasi:http/types@0.2.12": wasip2::http::types,
            "wasi:http/outgoing-handler@0.2.12": wasip2::http::outgoing_handler,
            "wasi:io/error@0.2.12": wasip2::io::error,
            "wasi:io/poll@0.2.12": wasip2::io::poll,
            "wasi:io/streams@0.2.12": wasip2::io::streams,
            "wasi:clocks/monotonic-clock@0.2.12": wasip2::clocks::monotonic_clock,
        },
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "agora_sdk::bindings",
    });
}

/// A component: its routes, its schema and what it does with events.
pub trait Service {
    /// The HTTP routes, matched on the full request path.
    fn router() -> http::Router {
        http::Router::new()
    }

    /// Every migration of this version, oldest first; the host applies the
    /// new ones before the version serves.
    fn migrations() -> Vec<storage::Migration> {
        Vec::new()
    }

    /// Handles an event of a subscribed topic. An error makes the host retry
    /// with backoff and finally dead-letter the event, so return one only
    /// when trying again could help or the event must not be lost silently.
    fn on_message(message: messaging::Message) -> Result<(), String> {
        Err(format!(
            "this component does not handle topic `{}`",
            message.topic
        ))
    }
}

/// Exports a [`Service`] implementation as the component's entry points.
#[macro_export]
macro_rules! service {
    ($service:ty) => {
        struct __AgoraComponent;

        impl $crate::bindings::exports::wasi::http::incoming_handler::Guest for __AgoraComponent {
            fn handle(
                request: $crate::__wasip2::http::types::IncomingRequest,
                out: $crate::__wasip2::http::types::ResponseOutparam,
            ) {
                $crate::http::serve(<$service as $crate::Service>::router(), request, out)
            }
        }

        impl $crate::bindings::exports::agora::platform::schema::Guest for __AgoraComponent {
            fn migrations() -> Vec<$crate::bindings::exports::agora::platform::schema::Migration> {
                <$service as $crate::Service>::migrations()
                    .into_iter()
                    .map(Into::into)
                    .collect()
            }
        }

        impl $crate::bindings::exports::agora::platform::subscriber::Guest for __AgoraComponent {
            fn handle(
                message: $crate::bindings::agora::platform::messaging::Message,
            ) -> Result<(), String> {
                <$service as $crate::Service>::on_message(message.into())
            }
        }

        $crate::bindings::__export_world!(__AgoraComponent);
    };
}

#[doc(hidden)]
pub use wasip2 as __wasip2;

/// A new random id (a UUID v4 in text), for rows and orders.
pub fn new_id() -> String {
    let mut b = wasip2::random::random::get_random_bytes(16);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Wall-clock time in milliseconds since the Unix epoch.
pub fn now_millis() -> i64 {
    let now = wasip2::clocks::wall_clock::now();
    (now.seconds as i64) * 1000 + i64::from(now.nanoseconds / 1_000_000)
}

/// What a component usually needs in scope.
pub mod prelude {
    pub use crate::http::{Error, Request, Response, Result, Router, User};
    pub use crate::storage::{Migration, Value};
    pub use crate::{
        cache, config, messaging, new_id, now_millis, outbound, params, storage, tokens, Service,
    };
}
