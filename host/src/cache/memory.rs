//! Embedded cache: a map in the host process with per-entry expiry and a
//! memory quota per key space.
//!
//! Expired entries are invisible at once (checked on every read) and their
//! memory is reclaimed by a sweep every few seconds, so a key written once and
//! never read again does not stay forever. Entries do not survive a restart,
//! as a cache's need not.
//!
//! Quota: every key space (a component, or the host's own rate counters)
//! may hold at most `quota_mib` of keys and values. A write that would pass
//! it evicts that space's least recently used entries first, as Redis does
//! under `allkeys-lru`: a cache that forgets is still a cache, while one
//! that refuses writes breaks carts at the busiest moment. Only a single
//! value larger than the whole quota is refused, with `too-large`. One
//! component filling its space therefore evicts its own entries, never
//! another's, and the host's memory stays bounded by quota × spaces.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Deserialize;

use super::{CacheBackend, CacheSettings, Error};
use crate::plugins::BackendKind;

pub const KIND: BackendKind<dyn CacheSettings> = BackendKind {
    kind: "memory",
    parse: |table| Ok(Box::new(MemoryConfig::deserialize(table)?)),
};

/// How often expired entries are reclaimed.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// What an entry costs beyond its key and value bytes: the map slots, the
/// use-order node and the entry itself. Counted so that a flood of tiny
/// keys is bounded too.
const ENTRY_OVERHEAD: usize = 96;

/// `[backends.cache] kind = "memory"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// Memory per key space (each component's, and the host's own). 32 MiB
    /// holds tens of thousands of carts and product pages; five components
    /// at their quota stay far below the host's instance memory.
    pub quota_mib: u32,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig { quota_mib: 32 }
    }
}

#[async_trait]
impl CacheSettings for MemoryConfig {
    fn embedded(&self) -> bool {
        true
    }

    async fn start(&self) -> anyhow::Result<Arc<dyn CacheBackend>> {
        if self.quota_mib == 0 {
            anyhow::bail!("`quota_mib` of the memory cache backend must be above 0");
        }
        Ok(MemoryCache::start(self))
    }
}

pub struct MemoryCache {
    quota_bytes: usize,
    spaces: Mutex<HashMap<String, Space>>,
}

/// One key space's entries, in order of use.
#[derive(Default)]
struct Space {
    entries: HashMap<String, Entry>,
    /// Keys by the tick of their last use, oldest first: eviction order.
    by_use: BTreeMap<u64, String>,
    bytes: usize,
    tick: u64,
}

struct Entry {
    value: Vec<u8>,
    expires: Option<Instant>,
    used: u64,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|t| t > now)
    }
}

fn cost(key: &str, value: &[u8]) -> usize {
    // The key is held twice: in the map and in the use order.
    2 * key.len() + value.len() + ENTRY_OVERHEAD
}

impl Space {
    fn remove(&mut self, key: &str) -> Option<Entry> {
        let entry = self.entries.remove(key)?;
        self.by_use.remove(&entry.used);
        self.bytes -= cost(key, &entry.value);
        Some(entry)
    }

    /// The live entry at `key`, marked as just used; an expired one is dropped.
    fn touch(&mut self, key: &str, now: Instant) -> Option<&Entry> {
        let live = self.entries.get(key)?.live(now);
        if !live {
            self.remove(key);
            return None;
        }
        self.tick += 1;
        let tick = self.tick;
        let entry = self.entries.get_mut(key)?;
        self.by_use.remove(&entry.used);
        self.by_use.insert(tick, key.to_owned());
        entry.used = tick;
        Some(entry)
    }

    /// Stores an entry, evicting the least recently used ones until it fits.
    fn insert(
        &mut self,
        key: &str,
        value: Vec<u8>,
        expires: Option<Instant>,
        quota: usize,
    ) -> Result<(), Error> {
        let needed = cost(key, &value);
        if needed > quota {
            return Err(Error::TooLarge(format!(
                "an entry of {} bytes exceeds the cache quota of {} MiB",
                needed,
                quota / (1024 * 1024)
            )));
        }
        self.remove(key);
        while self.bytes + needed > quota {
            let Some((_, oldest)) = self.by_use.pop_first() else {
                break;
            };
            if let Some(entry) = self.entries.remove(&oldest) {
                self.bytes -= cost(&oldest, &entry.value);
            }
        }
        self.tick += 1;
        self.by_use.insert(self.tick, key.to_owned());
        self.bytes += needed;
        self.entries.insert(
            key.to_owned(),
            Entry {
                value,
                expires,
                used: self.tick,
            },
        );
        Ok(())
    }

    fn sweep(&mut self, now: Instant) {
        let expired: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.live(now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            self.remove(&key);
        }
    }
}

/// The key space of a key: what precedes the first `:` (see
/// [`CacheBackend`]).
fn split(key: &str) -> (&str, &str) {
    key.split_once(':').unwrap_or(("", key))
}

impl MemoryCache {
    /// Creates the cache and its sweeper, which ends when the cache is dropped.
    pub fn start(config: &MemoryConfig) -> Arc<Self> {
        let cache = Arc::new(MemoryCache {
            quota_bytes: config.quota_mib as usize * 1024 * 1024,
            spaces: Mutex::default(),
        });
        let weak: Weak<MemoryCache> = Arc::downgrade(&cache);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            loop {
                tick.tick().await;
                let Some(cache) = weak.upgrade() else { return };
                let now = Instant::now();
                let mut spaces = cache.spaces.lock().unwrap();
                for space in spaces.values_mut() {
                    space.sweep(now);
                }
                spaces.retain(|_, space| !space.entries.is_empty());
            }
        });
        cache
    }

    fn with_space<R>(&self, key: &str, f: impl FnOnce(&mut Space, &str) -> R) -> R {
        let (space, rest) = split(key);
        let mut spaces = self.spaces.lock().unwrap();
        f(spaces.entry(space.to_owned()).or_default(), rest)
    }
}

#[async_trait]
impl CacheBackend for MemoryCache {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        let now = Instant::now();
        Ok(self.with_space(key, |space, key| {
            space.touch(key, now).map(|e| e.value.clone())
        }))
    }

    async fn set(&self, key: &str, value: Vec<u8>, ttl: Option<Duration>) -> Result<(), Error> {
        let expires = ttl.map(|t| Instant::now() + t);
        let quota = self.quota_bytes;
        self.with_space(key, |space, key| space.insert(key, value, expires, quota))
    }

    async fn delete(&self, key: &str) -> Result<bool, Error> {
        let now = Instant::now();
        Ok(self.with_space(key, |space, key| {
            space.remove(key).is_some_and(|e| e.live(now))
        }))
    }

    async fn increment(&self, key: &str, delta: i64, ttl: Option<Duration>) -> Result<i64, Error> {
        let now = Instant::now();
        let quota = self.quota_bytes;
        self.with_space(key, |space, rest| {
            let (old, expires) = match space.touch(rest, now) {
                Some(e) => {
                    let text = std::str::from_utf8(&e.value).unwrap_or("");
                    let n = text.parse::<i64>().map_err(|_| {
                        Error::NotANumber(format!("the value at `{rest}` is not an integer"))
                    })?;
                    (n, e.expires)
                }
                None => (0, ttl.map(|t| now + t)),
            };
            let new = old
                .checked_add(delta)
                .ok_or_else(|| Error::NotANumber(format!("incrementing `{rest}` overflows")))?;
            space.insert(rest, new.to_string().into_bytes(), expires, quota)?;
            Ok(new)
        })
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, Error> {
        let now = Instant::now();
        Ok(self.with_space(prefix, |space, prefix| {
            let matching: Vec<String> = space
                .entries
                .keys()
                .filter(|k| k.starts_with(prefix))
                .cloned()
                .collect();
            matching
                .iter()
                .filter_map(|k| space.remove(k))
                .filter(|e| e.live(now))
                .count() as u64
        }))
    }

    async fn ping(&self) -> Result<(), Error> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(quota_mib: u32) -> Arc<MemoryCache> {
        MemoryCache::start(&MemoryConfig { quota_mib })
    }

    #[tokio::test]
    async fn a_full_space_evicts_its_least_recently_used_entries_only() {
        let cache = cache(1);
        let kib = vec![0u8; 1024];
        cache
            .set("other:kept", b"mine".to_vec(), None)
            .await
            .unwrap();
        cache.set("a:first", kib.clone(), None).await.unwrap();
        cache.set("a:second", kib.clone(), None).await.unwrap();
        // Reading `first` makes `second` the least recently used.
        cache.get("a:first").await.unwrap();
        for i in 0..2000 {
            cache
                .set(&format!("a:{i}"), kib.clone(), None)
                .await
                .unwrap();
            if i == 100 {
                assert!(cache.get("a:first").await.unwrap().is_some());
            }
        }
        assert_eq!(cache.get("a:second").await.unwrap(), None);
        assert!(cache.get("a:1999").await.unwrap().is_some());
        let held = cache.spaces.lock().unwrap()["a"].bytes;
        assert!(held <= 1024 * 1024, "{held} bytes held");
        assert_eq!(
            cache.get("other:kept").await.unwrap().as_deref(),
            Some(&b"mine"[..])
        );
    }

    #[tokio::test]
    async fn a_value_larger_than_the_quota_is_refused_and_changes_nothing() {
        let cache = cache(1);
        cache.set("a:k", b"old".to_vec(), None).await.unwrap();
        let err = cache
            .set("a:k", vec![0; 2 * 1024 * 1024], None)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::TooLarge(m) if m.contains("quota of 1 MiB")),
            "{err:?}"
        );
        assert_eq!(
            cache.get("a:k").await.unwrap().as_deref(),
            Some(&b"old"[..])
        );
    }

    #[tokio::test]
    async fn increments_count_within_the_quota() {
        let cache = cache(1);
        for _ in 0..3 {
            cache.increment("a:n", 2, None).await.unwrap();
        }
        assert_eq!(cache.increment("a:n", 1, None).await.unwrap(), 7);
        assert!(cache.delete("a:n").await.unwrap());
        assert_eq!(cache.spaces.lock().unwrap()["a"].bytes, 0);
    }
}
