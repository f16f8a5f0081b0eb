//! Embedded cache: a map in the host process with per-entry expiry.
//!
//! Expired entries are invisible at once (checked on every read) and their
//! memory is reclaimed by a sweep every few seconds, so a key written once and
//! never read again does not stay forever. Entries do not survive a restart,
//! as a cache's need not.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{CacheBackend, Error};

/// How often expired entries are reclaimed.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct MemoryCache {
    entries: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    value: Vec<u8>,
    expires: Option<Instant>,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|t| t > now)
    }
}

impl MemoryCache {
    /// Creates the cache and its sweeper, which ends when the cache is dropped.
    pub fn start() -> Arc<Self> {
        let cache = Arc::new(MemoryCache::default());
        let weak: Weak<MemoryCache> = Arc::downgrade(&cache);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            loop {
                tick.tick().await;
                let Some(cache) = weak.upgrade() else { return };
                let now = Instant::now();
                cache.entries.lock().unwrap().retain(|_, e| e.live(now));
            }
        });
        cache
    }
}

#[async_trait]
impl CacheBackend for MemoryCache {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        let entries = self.entries.lock().unwrap();
        Ok(entries
            .get(key)
            .filter(|e| e.live(Instant::now()))
            .map(|e| e.value.clone()))
    }

    async fn set(&self, key: &str, value: Vec<u8>, ttl: Option<Duration>) -> Result<(), Error> {
        let expires = ttl.map(|t| Instant::now() + t);
        self.entries
            .lock()
            .unwrap()
            .insert(key.to_owned(), Entry { value, expires });
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<bool, Error> {
        let removed = self.entries.lock().unwrap().remove(key);
        Ok(removed.is_some_and(|e| e.live(Instant::now())))
    }

    async fn increment(&self, key: &str, delta: i64, ttl: Option<Duration>) -> Result<i64, Error> {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap();
        let current = entries.get(key).filter(|e| e.live(now));
        let (old, expires) = match current {
            Some(e) => {
                let text = std::str::from_utf8(&e.value).unwrap_or("");
                let n = text.parse::<i64>().map_err(|_| {
                    Error::NotANumber(format!("the value at `{key}` is not an integer"))
                })?;
                (n, e.expires)
            }
            None => (0, ttl.map(|t| now + t)),
        };
        let new = old
            .checked_add(delta)
            .ok_or_else(|| Error::NotANumber(format!("incrementing `{key}` overflows")))?;
        entries.insert(
            key.to_owned(),
            Entry {
                value: new.to_string().into_bytes(),
                expires,
            },
        );
        Ok(new)
    }

    async fn ping(&self) -> Result<(), Error> {
        Ok(())
    }
}
