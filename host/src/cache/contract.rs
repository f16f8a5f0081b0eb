//! The contract of [`CacheBackend`], run against every backend: the
//! embedded one always, Redis whenever 127.0.0.1:6379 answers (each test
//! under a key prefix of its own, so runs in parallel do not meet). A skipped
//! Redis run says so on stderr; with `AGORA_REQUIRE_SERVICES=1` (set by
//! `scripts/test`, which starts Redis first) a missing Redis fails instead.
//!
//! Expiry is checked by waiting for an entry to go (up to a generous
//! deadline) or by checking one is still there after its wrong TTL would
//! have passed, never by timing how fast something happens, so a busy
//! machine slows these tests down but does not fail them.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{CacheBackend, Error, MemoryCache, MemoryConfig, RedisCache, RedisConfig};

pub const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// Whether the local Redis answers; panics if it must and does not.
pub async fn redis_answers() -> bool {
    crate::testing::answers("Redis", "127.0.0.1:6379").await
}

/// A prefix no other test or run uses.
pub fn unique_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "agora-test/{}-{}-{}/",
        std::process::id(),
        crate::now_millis(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn redis_config(key_prefix: String) -> RedisConfig {
    RedisConfig {
        url: REDIS_URL.into(),
        key_prefix,
        connect_timeout_ms: 1000,
        command_timeout_ms: 1000,
        max_value_kib: 1024,
    }
}

/// Every backend, each limited to entries of about 1 MiB.
async fn backends() -> Vec<(&'static str, Arc<dyn CacheBackend>)> {
    let mut all: Vec<(&'static str, Arc<dyn CacheBackend>)> =
        vec![("memory", MemoryCache::start(&MemoryConfig { quota_mib: 1 }))];
    if redis_answers().await {
        let redis = RedisCache::connect(&redis_config(unique_prefix()))
            .await
            .unwrap();
        redis.ping().await.expect("redis answers ping");
        all.push(("redis", redis));
    }
    all
}

/// Waits until `key` is gone; false if it is still there after 10 s.
async fn disappears(cache: &dyn CacheBackend, key: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if cache.get(key).await.unwrap().is_none() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn get_set_delete() {
    for (name, cache) in backends().await {
        assert_eq!(cache.get("a:k").await.unwrap(), None, "{name}");
        let every_byte: Vec<u8> = (0..=255).collect();
        cache.set("a:k", every_byte.clone(), None).await.unwrap();
        assert_eq!(cache.get("a:k").await.unwrap(), Some(every_byte), "{name}");
        cache.set("a:k", b"two".to_vec(), None).await.unwrap();
        assert_eq!(
            cache.get("a:k").await.unwrap().as_deref(),
            Some(&b"two"[..])
        );
        cache.set("a:empty", Vec::new(), None).await.unwrap();
        assert_eq!(cache.get("a:empty").await.unwrap(), Some(vec![]), "{name}");
        assert!(cache.delete("a:k").await.unwrap(), "{name}");
        assert!(!cache.delete("a:k").await.unwrap(), "{name}");
        assert_eq!(cache.get("a:k").await.unwrap(), None, "{name}");
        assert!(cache.delete("a:empty").await.unwrap(), "{name}");
    }
}

#[tokio::test]
async fn entries_expire_after_their_ttl_only() {
    for (name, cache) in backends().await {
        let ttl = Some(Duration::from_millis(300));
        cache.set("a:short", b"v".to_vec(), ttl).await.unwrap();
        cache.set("a:kept", b"v".to_vec(), None).await.unwrap();
        let huge = Some(Duration::from_millis(u64::MAX));
        cache.set("a:long", b"v".to_vec(), huge).await.unwrap();
        assert!(disappears(&*cache, "a:short").await, "{name}");
        assert!(cache.get("a:kept").await.unwrap().is_some(), "{name}");
        assert!(cache.get("a:long").await.unwrap().is_some(), "{name}");
        // A zero TTL stores nothing that can be read.
        cache
            .set("a:kept", b"v".to_vec(), Some(Duration::ZERO))
            .await
            .unwrap();
        assert_eq!(cache.get("a:kept").await.unwrap(), None, "{name}");
        // Overwriting without a TTL makes an entry permanent again.
        cache.set("a:again", b"v".to_vec(), ttl).await.unwrap();
        cache.set("a:again", b"w".to_vec(), None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(cache.get("a:again").await.unwrap().is_some(), "{name}");
        for key in ["a:long", "a:again"] {
            cache.delete(key).await.unwrap();
        }
    }
}

#[tokio::test]
async fn increment_counts_and_creates_missing_keys() {
    for (name, cache) in backends().await {
        assert_eq!(cache.increment("a:n", 5, None).await.unwrap(), 5, "{name}");
        assert_eq!(
            cache.increment("a:n", -7, None).await.unwrap(),
            -2,
            "{name}"
        );
        // Integers are decimal text, readable with `get`.
        assert_eq!(cache.get("a:n").await.unwrap().as_deref(), Some(&b"-2"[..]));
        cache.set("a:n", b"40".to_vec(), None).await.unwrap();
        assert_eq!(cache.increment("a:n", 2, None).await.unwrap(), 42, "{name}");
        // Concurrent increments are atomic.
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.increment("a:c", 1, None).await.unwrap() })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(cache.get("a:c").await.unwrap().as_deref(), Some(&b"50"[..]));
        for key in ["a:n", "a:c"] {
            cache.delete(key).await.unwrap();
        }
    }
}

#[tokio::test]
async fn increment_sets_its_ttl_only_when_it_creates_the_key() {
    for (name, cache) in backends().await {
        let short = Some(Duration::from_millis(1500));
        let long = Some(Duration::from_secs(3600));
        assert_eq!(cache.increment("a:w", 1, short).await.unwrap(), 1);
        // A later increment with a longer TTL does not extend the window.
        assert_eq!(cache.increment("a:w", 1, long).await.unwrap(), 2);
        assert!(disappears(&*cache, "a:w").await, "{name}: TTL was extended");
        // ... and gives none to a key that exists without one, even one
        // holding 0 (so `result == delta` would wrongly look like creation).
        cache.set("a:p", b"0".to_vec(), None).await.unwrap();
        let tiny = Some(Duration::from_millis(100));
        assert_eq!(cache.increment("a:p", 5, tiny).await.unwrap(), 5);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            cache.get("a:p").await.unwrap().as_deref(),
            Some(&b"5"[..]),
            "{name}: an existing key got the increment's TTL"
        );
        cache.delete("a:p").await.unwrap();
    }
}

#[tokio::test]
async fn increment_of_a_non_integer_is_not_a_number_and_changes_nothing() {
    for (name, cache) in backends().await {
        for (value, delta) in [(&b"abc"[..], 1), (b"1.5", 1), (b"9223372036854775807", 1)] {
            cache.set("a:x", value.to_vec(), None).await.unwrap();
            let err = cache.increment("a:x", delta, None).await.unwrap_err();
            assert!(
                matches!(&err, Error::NotANumber(m) if m.contains("`x`")),
                "{name}: {err:?}"
            );
            assert_eq!(cache.get("a:x").await.unwrap().as_deref(), Some(value));
        }
        cache.delete("a:x").await.unwrap();
    }
}

#[tokio::test]
async fn delete_prefix_deletes_exactly_the_keys_under_it() {
    for (name, cache) in backends().await {
        // Glob characters in the prefix are literal.
        for key in [
            "a:/p*/1",
            "a:/p*/2?x=1",
            "a:/p*/2 user",
            "a:/p/3",
            "a:/q",
            "b:/p*/1",
        ] {
            cache.set(key, b"v".to_vec(), None).await.unwrap();
        }
        // Enough keys for several pages of a walk.
        for i in 0..1200 {
            cache
                .set(&format!("a:/many/{i}"), b"v".to_vec(), None)
                .await
                .unwrap();
        }
        assert_eq!(cache.delete_prefix("a:/p*/").await.unwrap(), 3, "{name}");
        for gone in ["a:/p*/1", "a:/p*/2?x=1", "a:/p*/2 user"] {
            assert_eq!(cache.get(gone).await.unwrap(), None, "{name}: {gone}");
        }
        for kept in ["a:/p/3", "a:/q", "b:/p*/1", "a:/many/7"] {
            assert!(cache.get(kept).await.unwrap().is_some(), "{name}: {kept}");
        }
        assert_eq!(
            cache.delete_prefix("a:/many/").await.unwrap(),
            1200,
            "{name}"
        );
        assert_eq!(
            cache.delete_prefix("a:/nothing").await.unwrap(),
            0,
            "{name}"
        );
    }
}

#[tokio::test]
async fn key_spaces_are_separate() {
    for (name, cache) in backends().await {
        cache.set("a:k", b"a".to_vec(), None).await.unwrap();
        cache.set("b:k", b"b".to_vec(), None).await.unwrap();
        cache.increment("agora/rate:k", 1, None).await.unwrap();
        // Protocol bytes in a key are only bytes of that key.
        let sneaky = "a:k\r\nSET b:k pwned\r\n";
        cache.set(sneaky, b"x".to_vec(), None).await.unwrap();
        assert_eq!(cache.get("a:k").await.unwrap().as_deref(), Some(&b"a"[..]));
        assert_eq!(cache.get("b:k").await.unwrap().as_deref(), Some(&b"b"[..]));
        assert!(cache.delete("a:k").await.unwrap(), "{name}");
        assert_eq!(cache.get("b:k").await.unwrap().as_deref(), Some(&b"b"[..]));
        assert_eq!(
            cache.get("agora/rate:k").await.unwrap().as_deref(),
            Some(&b"1"[..])
        );
        for key in ["b:k", "agora/rate:k", sneaky] {
            assert!(cache.delete(key).await.unwrap(), "{name}: {key:?}");
        }
    }
}

#[tokio::test]
async fn an_entry_beyond_the_limit_is_too_large_and_changes_nothing() {
    for (name, cache) in backends().await {
        cache.set("a:big", b"old".to_vec(), None).await.unwrap();
        let err = cache
            .set("a:big", vec![7; 2 * 1024 * 1024], None)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::TooLarge(_)), "{name}: {err:?}");
        assert_eq!(
            cache.get("a:big").await.unwrap().as_deref(),
            Some(&b"old"[..])
        );
        // Just below the limit is fine.
        cache.set("a:big", vec![7; 900 * 1024], None).await.unwrap();
        assert_eq!(
            cache.get("a:big").await.unwrap().map(|v| v.len()),
            Some(900 * 1024)
        );
        cache.delete("a:big").await.unwrap();
    }
}
