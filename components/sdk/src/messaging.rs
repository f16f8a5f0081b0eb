//! Events: publish them, receive them in [`crate::Service::on_message`].
//!
//! Delivery is at least once: handlers must be idempotent on [`Message::id`].

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::bindings::agora::platform::messaging as wit;
use crate::http::Error;

/// An event delivered to this component.
#[derive(Debug, Clone)]
pub struct Message {
    pub id: String,
    pub topic: String,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
    pub published_at: u64,
    /// 1 on the first delivery, then 2, 3, ... on retries.
    pub attempt: u32,
}

impl Message {
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            format!(
                "event {} on `{}` is not the expected JSON: {e}",
                self.id, self.topic
            )
        })
    }
}

impl From<wit::Message> for Message {
    fn from(m: wit::Message) -> Message {
        Message {
            id: m.id,
            topic: m.topic,
            key: m.key,
            payload: m.payload,
            headers: m.headers,
            published_at: m.published_at,
            attempt: m.attempt,
        }
    }
}

impl From<wit::Error> for Error {
    fn from(e: wit::Error) -> Error {
        match e {
            wit::Error::TopicNotGranted(m) => Error::internal(m),
            wit::Error::Invalid(m) => Error::internal(format!("messaging: {m}")),
            wit::Error::Unavailable(m) => Error::unavailable(format!("messaging: {m}")),
        }
    }
}

pub(crate) fn outgoing<T: Serialize + ?Sized>(
    topic: &str,
    key: Option<&str>,
    event: &T,
) -> Result<wit::OutgoingMessage, Error> {
    Ok(wit::OutgoingMessage {
        topic: topic.to_owned(),
        key: key.map(str::to_owned),
        payload: serde_json::to_vec(event)?,
        headers: vec![("content-type".into(), "application/json".into())],
    })
}

/// Publishes `event` as JSON, durably, and returns its id. To publish only
/// if a transaction commits, use [`crate::storage::Transaction::publish`].
pub fn publish<T: Serialize + ?Sized>(
    topic: &str,
    key: Option<&str>,
    event: &T,
) -> Result<String, Error> {
    Ok(wit::publish(&outgoing(topic, key, event)?)?)
}
