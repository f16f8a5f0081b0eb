//! Request-scoped batch loading: one linked call for every key of a kind.
//!
//! async-graphql's `DataLoader` batches the keys that resolvers ask for
//! while it waits on a timer, which takes a spawner and a clock; this guest
//! has neither (its futures never wait). It does not need them: the parent
//! resolver knows its children's keys when it has loaded itself (the
//! orders resolver has every item's product id), so it announces them with
//! [`BatchLoader::want`], and the first child that asks for one loads all
//! the announced keys in one call. A key nobody announced is loaded on its
//! own, with any announced ones.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, PoisonError};

/// Fetches the values of these keys; a key without a value is left out.
pub type Fetch<V> = fn(&[String]) -> Result<HashMap<String, V>, String>;

pub struct BatchLoader<V> {
    fetch: Fetch<V>,
    state: Mutex<State<V>>,
}

struct State<V> {
    /// Announced and not loaded yet.
    wanted: BTreeSet<String>,
    /// Loaded: the value, or `None` for a key that has none.
    loaded: HashMap<String, Option<V>>,
    /// Why a fetch failed: later loads fail the same way instead of
    /// calling a failing service once per field.
    failed: Option<String>,
}

impl<V: Clone> BatchLoader<V> {
    pub fn new(fetch: Fetch<V>) -> BatchLoader<V> {
        BatchLoader {
            fetch,
            state: Mutex::new(State {
                wanted: BTreeSet::new(),
                loaded: HashMap::new(),
                failed: None,
            }),
        }
    }

    /// Announces keys that fields will load, so that the first load
    /// fetches them all.
    pub fn want(&self, keys: impl IntoIterator<Item = String>) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let new: Vec<String> = keys
            .into_iter()
            .filter(|key| !state.loaded.contains_key(key))
            .collect();
        state.wanted.extend(new);
    }

    /// The value of `key`, fetched with every announced key on a miss.
    pub fn load(&self, key: &str) -> Result<Option<V>, String> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(value) = state.loaded.get(key) {
            return Ok(value.clone());
        }
        if let Some(failure) = &state.failed {
            return Err(failure.clone());
        }
        let mut keys = std::mem::take(&mut state.wanted);
        keys.insert(key.to_owned());
        let keys: Vec<String> = keys.into_iter().collect();
        let mut found = match (self.fetch)(&keys) {
            Ok(found) => found,
            Err(e) => {
                state.failed = Some(e.clone());
                return Err(e);
            }
        };
        for key in keys {
            let value = found.remove(&key);
            state.loaded.insert(key, value);
        }
        Ok(state.loaded.get(key).cloned().flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static CALLS: AtomicUsize = AtomicUsize::new(0);

    /// Doubles numeric keys; other keys have no value.
    fn double(keys: &[String]) -> Result<HashMap<String, i64>, String> {
        CALLS.fetch_add(1, Ordering::SeqCst);
        Ok(keys
            .iter()
            .filter_map(|k| Some((k.clone(), k.parse::<i64>().ok()? * 2)))
            .collect())
    }

    #[test]
    fn announced_keys_load_in_one_call() {
        let loader = BatchLoader::new(double);
        loader.want(["1", "2", "x"].map(String::from));
        let before = CALLS.load(Ordering::SeqCst);
        assert_eq!(loader.load("2"), Ok(Some(4)));
        assert_eq!(loader.load("1"), Ok(Some(2)));
        assert_eq!(loader.load("x"), Ok(None));
        assert_eq!(CALLS.load(Ordering::SeqCst) - before, 1);
        // An unannounced key is one more call; loaded ones are not fetched again.
        loader.want(["1", "3"].map(String::from));
        assert_eq!(loader.load("4"), Ok(Some(8)));
        assert_eq!(loader.load("3"), Ok(Some(6)));
        assert_eq!(CALLS.load(Ordering::SeqCst) - before, 2);
    }

    #[test]
    fn a_failed_fetch_is_not_repeated() {
        let loader: BatchLoader<i64> = BatchLoader::new(|_| Err("down".into()));
        assert_eq!(loader.load("1"), Err("down".into()));
        assert_eq!(loader.load("2"), Err("down".into()));
    }
}
