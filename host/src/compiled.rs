//! Compiled components, kept on disk and mapped into memory from there.
//!
//! wasmtime's own cache keeps compiled code compressed and reads it back
//! into anonymous memory, so every loaded component's code counts in the
//! host's resident memory from the start, run or not (the shop's six
//! components: about 7 MiB). Here each component is kept as wasmtime's
//! precompiled artifact and loaded with [`Component::deserialize_file`],
//! which maps the file: its pages are the page cache's, read when first
//! touched and shared by every version and restart that loads them, and a
//! start from warm artifacts is an `mmap` per component instead of a
//! decompression.
//!
//! Trust: an artifact is native code, loaded after wasmtime's check of its
//! header (wasmtime's version and the engine's settings) and nothing more.
//! The files live in the host's data directory, which only the host writes:
//! components have no file system, and deploys carry Wasm, never artifacts.
//! Whoever can write there can already replace the host's token key and
//! databases; wasmtime's own cache trusts its directory the same way.
//!
//! Artifacts are named by the SHA-256 of the Wasm and a hash of the engine's
//! settings, so a changed binary or engine compiles again rather than
//! loading code that does not fit. A used artifact is touched, and beyond
//! [`KEPT_ARTIFACTS`] the least recently used are deleted (a mapped file
//! stays readable to the host that maps it until it unmaps it).

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

/// Artifacts kept in the directory: every version a host serves or may
/// roll back to, many times over, while a long `--watch` session's builds
/// do not fill the disk (an artifact is a few MiB).
const KEPT_ARTIFACTS: usize = 64;

const EXTENSION: &str = "cwasm";

/// Where wasmtime's own cache kept compiled code in this directory, for
/// hosts before these artifacts.
const SUPERSEDED_CACHE: &str = "modules";

/// A component's Wasm and its SHA-256, hashed once where the Wasm arrives
/// (read from plugins.toml's path or deployed): the digest names the
/// artifact and, shortened, the version, and a reload compares it to tell
/// whether a running component changed. Built only by hashing, so a
/// digest never stands for other bytes.
#[derive(Clone)]
pub struct Wasm {
    bytes: Arc<[u8]>,
    digest: [u8; 32],
}

impl Wasm {
    pub fn new(bytes: Arc<[u8]>) -> Wasm {
        let digest = Sha256::digest(&bytes).into();
        Wasm { bytes, digest }
    }

    pub fn bytes(&self) -> &Arc<[u8]> {
        &self.bytes
    }

    fn hex(&self) -> String {
        self.digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The version a deploy shows: the digest's first 12 hex digits.
    pub fn version(&self) -> String {
        self.hex()[..12].to_owned()
    }
}

/// The directory of compiled artifacts of one engine, and the engine.
pub struct CompiledCache {
    engine: Engine,
    dir: PathBuf,
    /// Hex of the engine's settings hash: artifacts of another engine (or
    /// wasmtime version) are never loaded.
    engine_key: String,
}

/// Makes temporary names unique among a host's concurrent compiles.
static TEMPORARY: AtomicU64 = AtomicU64::new(0);

impl CompiledCache {
    pub fn new(engine: Engine, dir: PathBuf) -> Result<CompiledCache> {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the compiled code directory {}", dir.display()))?;
        // wasmtime's own cache, which hosts before these artifacts kept
        // here: nothing reads it any more, and it would hold its megabytes
        // for good.
        let superseded = dir.join(SUPERSEDED_CACHE);
        if superseded.is_dir() {
            match std::fs::remove_dir_all(&superseded) {
                Ok(()) => {
                    tracing::info!(path = %superseded.display(), "deleted wasmtime's old compilation cache")
                }
                Err(e) => {
                    tracing::warn!(path = %superseded.display(), error = %e, "cannot delete wasmtime's old compilation cache")
                }
            }
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(CompiledCache {
            engine,
            dir,
            engine_key: format!("{:016x}", hasher.finish()),
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn path_of(&self, wasm: &Wasm) -> PathBuf {
        self.dir
            .join(format!("{}-{}.{EXTENSION}", wasm.hex(), self.engine_key))
    }

    /// The component compiled from `wasm`: mapped from its artifact if one
    /// is kept, else compiled (blocking: call it off the async threads),
    /// kept, and mapped. Says whether it compiled. An artifact that does
    /// not load (cut short by a crash, say) is compiled again.
    pub fn load(&self, wasm: &Wasm) -> Result<(Component, bool)> {
        let engine = &self.engine;
        let path = self.path_of(wasm);
        if path.exists() {
            // SAFETY: the artifact was written by `precompile_component`
            // of an engine with these settings (its name says so) into the
            // host's own directory; see the module docs on trust.
            match unsafe { Component::deserialize_file(engine, &path) } {
                Ok(component) => {
                    touch(&path);
                    return Ok((component, false));
                }
                Err(e) => tracing::warn!(
                    path = %path.display(),
                    error = %format!("{e:#}"),
                    "a compiled artifact does not load; compiling again"
                ),
            }
        }
        let artifact = engine.precompile_component(&wasm.bytes)?;
        let temporary = self.dir.join(format!(
            ".{}.{}.tmp",
            std::process::id(),
            TEMPORARY.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&temporary, &artifact)
            .and_then(|()| std::fs::rename(&temporary, &path))
            .with_context(|| format!("keeping compiled code in {}", path.display()))?;
        self.prune();
        // SAFETY: as above; written just now from `precompile_component`.
        let component = unsafe { Component::deserialize_file(engine, &path) }?;
        Ok((component, true))
    }

    /// Deletes the least recently used artifacts beyond [`KEPT_ARTIFACTS`].
    fn prune(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut artifacts: Vec<(SystemTime, PathBuf)> = entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == EXTENSION))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if artifacts.len() <= KEPT_ARTIFACTS {
            return;
        }
        artifacts.sort();
        for (_, path) in &artifacts[..artifacts.len() - KEPT_ARTIFACTS] {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot delete an old compiled artifact");
            }
        }
    }
}

/// Marks an artifact used now, for [`CompiledCache::prune`].
fn touch(path: &Path) {
    let _ = std::fs::File::options()
        .append(true)
        .open(path)
        .and_then(|f| f.set_modified(SystemTime::now()));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty component, made distinct by a custom section named `tag`.
    fn component(tag: u8) -> Vec<u8> {
        let mut wasm = b"\0asm\x0d\x00\x01\x00".to_vec();
        wasm.extend([0, 2, 1, tag]);
        wasm
    }

    /// Loads `wasm` from `cache`; true if it had to be compiled.
    fn compiles(cache: &CompiledCache, wasm: &[u8]) -> bool {
        cache.load(&Wasm::new(wasm.into())).unwrap().1
    }

    fn artifacts(dir: &Path) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == EXTENSION))
            .collect();
        found.sort();
        found
    }

    #[test]
    fn a_component_is_compiled_once_then_mapped_and_a_damaged_artifact_compiled_again() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CompiledCache::new(Engine::default(), dir.path().into()).unwrap();
        let wasm = component(b'a');
        assert!(compiles(&cache, &wasm), "compiled the first time");
        assert!(!compiles(&cache, &wasm), "mapped the second time");
        let [artifact] = artifacts(dir.path()).try_into().unwrap();

        std::fs::write(&artifact, b"not an artifact").unwrap();
        assert!(
            compiles(&cache, &wasm),
            "a damaged artifact is compiled again"
        );
        assert!(!compiles(&cache, &wasm));

        // Another engine's settings never load this engine's code.
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        let other = CompiledCache::new(Engine::new(&config).unwrap(), dir.path().into()).unwrap();
        assert!(compiles(&other, &wasm));
        assert_eq!(artifacts(dir.path()).len(), 2);
    }

    #[test]
    fn the_compilation_cache_of_earlier_hosts_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join(SUPERSEDED_CACHE).join("wasmtime-48.0.8");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join("mod-1234"), b"compressed code").unwrap();
        let cache = CompiledCache::new(Engine::default(), dir.path().into()).unwrap();
        assert!(!dir.path().join(SUPERSEDED_CACHE).exists());
        assert!(compiles(&cache, &component(b'a')));
    }

    #[test]
    fn the_least_recently_used_artifacts_beyond_the_kept_number_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CompiledCache::new(Engine::default(), dir.path().into()).unwrap();
        let first = component(0);
        let _ = compiles(&cache, &first);
        for tag in 1..=KEPT_ARTIFACTS as u8 {
            let _ = compiles(&cache, &component(tag));
            if tag == 1 {
                // Used again after the second was written: the second is
                // now the least recently used.
                std::thread::sleep(std::time::Duration::from_millis(10));
                assert!(!compiles(&cache, &first));
            }
        }
        assert_eq!(artifacts(dir.path()).len(), KEPT_ARTIFACTS);
        assert!(!compiles(&cache, &first), "kept: used recently");
        assert!(
            compiles(&cache, &component(1)),
            "deleted: least recently used"
        );
    }
}
