//! The developer loop: builds before serving (`agora up --build`) and on
//! every change of a component's sources (`agora up --watch`).
//!
//! A build is the component's own `build` command, run from the plugins
//! file's directory with its output passed through, so the developer sees
//! cargo's progress and errors where the host logs. The loop does not swap
//! anything itself: a successful build rewrites the component's binary, and
//! the binary watcher ([`crate::watch`]) swaps it in like any other
//! replaced file. A failed build writes no binary, so the serving version
//! stays, and the log says which version that is and why.
//!
//! Sources are the component's `watch` paths, recursively, minus build
//! output (`target/`) and editors' scratch files. Changes are debounced
//! ([`QUIET`]) because an editor's save or a `git checkout` is several
//! writes; builds run one at a time, and a change during a build makes one
//! more build after it, not one per change.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::plugins::Plugins;
use crate::runtime::Runtime;

/// Quiet time after the last source change before building.
const QUIET: Duration = Duration::from_millis(300);
/// How often a running build says it is still running.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Runs the build commands of `components` (each distinct command once), in
/// order, passing their output through; fails at the first that fails.
pub async fn build(plugins: &Plugins, components: &[String]) -> Result<()> {
    let mut done = BTreeSet::new();
    for name in components {
        let Some(command) = plugins.components.get(name).and_then(|c| c.build.clone()) else {
            continue;
        };
        if !done.insert(command.clone()) {
            continue;
        }
        tracing::info!(component = %name, %command, "building");
        let started = Instant::now();
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&command)
            .current_dir(&plugins.base_dir)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("running the build of `{name}`"))?;
        let mut progress =
            tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
        let status = loop {
            tokio::select! {
                status = child.wait() => break status?,
                _ = progress.tick() => tracing::info!(
                    component = %name,
                    "still building ({} s)",
                    started.elapsed().as_secs()
                ),
            }
        };
        if !status.success() {
            bail!("the build of component `{name}` failed ({status}): {command}");
        }
        tracing::info!(component = %name, seconds = format!("{:.1}", started.elapsed().as_secs_f64()), "built");
    }
    Ok(())
}

/// Whether a changed path, relative to the watched directory that holds
/// it, is a source: not build output (`target/`) or an editor's scratch
/// file.
fn is_source(relative: &Path) -> bool {
    let scratch = relative
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| {
            n.starts_with('.') || n.ends_with('~') || n.ends_with(".swp") || n.ends_with(".tmp")
        });
    !scratch && !relative.components().any(|c| c.as_os_str() == "target")
}

/// The components with a build whose `watch` paths hold the source `path`.
fn owners(plugins: &Plugins, path: &Path) -> Vec<String> {
    plugins
        .components
        .iter()
        .filter(|(_, spec)| {
            spec.build.is_some()
                && spec.watch.iter().any(|root| {
                    let root = plugins.resolve(root);
                    path.strip_prefix(&root)
                        .is_ok_and(|relative| path == root || is_source(relative))
                })
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// What each source file held when last seen: a build that writes into its
/// own sources (generated bindings, a lock file) would otherwise wake the
/// next build, and that one the next, for ever. A file is a change when
/// its content is, not when it is touched.
#[derive(Default)]
struct Seen(HashMap<PathBuf, Option<u64>>);

impl Seen {
    fn changed(&mut self, path: &Path) -> bool {
        if path.is_dir() {
            return false;
        }
        let content = std::fs::read(path).ok().map(|bytes| {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            bytes.hash(&mut hasher);
            hasher.finish()
        });
        self.0.insert(path.to_owned(), content) != Some(content)
    }
}

/// How often the watch list follows plugins.toml, and components added
/// without a binary are built.
const REFRESH: Duration = Duration::from_secs(1);

/// Rebuilds a component whenever its sources change, until the host stops.
/// Components that plugins.toml gains while the host runs (`agora new`) are
/// watched within [`REFRESH`], and built at once if their binary is missing.
pub fn watch_sources(runtime: Arc<Runtime>) -> Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<PathBuf>>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            if !matches!(event.kind, notify::EventKind::Access(_)) {
                let _ = tx.send(event.paths);
            }
        }
    })?;
    let mut watched = BTreeSet::new();
    let mut watch_sources_of = move |plugins: &Plugins| {
        for (name, spec) in &plugins.components {
            for path in &spec.watch {
                let path = plugins.resolve(path);
                if watched.insert(path.clone()) {
                    if let Err(e) = watcher.watch(&path, RecursiveMode::Recursive) {
                        tracing::warn!(component = %name, path = %path.display(), error = %e, "cannot watch the sources");
                        watched.remove(&path);
                    }
                }
            }
        }
    };
    // Watching before the host says it serves, so no early edit is missed.
    let mut plugins = runtime.plugins();
    watch_sources_of(&plugins);
    tokio::spawn(async move {
        let mut known: BTreeSet<String> = plugins.components.keys().cloned().collect();
        let mut seen = Seen::default();
        let mut refresh = tokio::time::interval(REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // The file as it is now, not what the host serves: a component
            // added without a binary is refused by the host until it is built.
            if let Ok(current) = Plugins::load(runtime.plugins_path()) {
                plugins = current;
            }
            watch_sources_of(&plugins);
            // New since the last look, without a binary: build it now.
            let added: Vec<String> = plugins
                .components
                .iter()
                .filter(|(name, spec)| {
                    !known.contains(*name)
                        && spec.build.is_some()
                        && !plugins.resolve(&spec.wasm).exists()
                })
                .map(|(name, _)| name.clone())
                .collect();
            known = plugins.components.keys().cloned().collect();
            let mut changed: BTreeSet<String> = added.into_iter().collect();
            if changed.is_empty() {
                let paths = tokio::select! {
                    paths = rx.recv() => match paths {
                        Some(paths) => paths,
                        None => return,
                    },
                    _ = refresh.tick() => continue,
                };
                changed.extend(
                    paths
                        .iter()
                        .filter(|p| seen.changed(p))
                        .flat_map(|p| owners(&plugins, p)),
                );
                if changed.is_empty() {
                    continue;
                }
                let mut quiet_until = tokio::time::Instant::now() + QUIET;
                loop {
                    tokio::select! {
                        event = rx.recv() => match event {
                            Some(paths) => {
                                let more: Vec<String> = paths
                                    .iter()
                                    .filter(|p| seen.changed(p))
                                    .flat_map(|p| owners(&plugins, p))
                                    .collect();
                                if !more.is_empty() {
                                    changed.extend(more);
                                    quiet_until = tokio::time::Instant::now() + QUIET;
                                }
                            }
                            None => return,
                        },
                        _ = tokio::time::sleep_until(quiet_until) => break,
                    }
                }
            }
            let changed: Vec<String> = changed.into_iter().collect();
            tracing::info!(components = ?changed, "sources changed; rebuilding");
            if let Err(e) = build(&plugins, &changed).await {
                let registry = runtime.registry();
                let serving: Vec<String> = changed
                    .iter()
                    .filter_map(|name| registry.components.get(name))
                    .map(|c| format!("{} {}", c.name, c.version))
                    .collect();
                tracing::error!(
                    error = %format!("{e:#}"),
                    serving = ?serving,
                    "the build failed (its output is above); the serving versions stay"
                );
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_output_and_scratch_files_are_not_sources() {
        assert!(is_source(Path::new("src/lib.rs")));
        assert!(!is_source(Path::new("target/debug/x")));
        assert!(!is_source(Path::new("src/.lib.rs.swp")));
        assert!(!is_source(Path::new("src/lib.rs~")));
    }

    #[test]
    fn a_file_is_a_change_when_its_content_is() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lib.rs");
        let mut seen = Seen::default();
        std::fs::write(&file, "a").unwrap();
        assert!(seen.changed(&file));
        std::fs::write(&file, "a").unwrap();
        assert!(!seen.changed(&file), "rewritten with the same content");
        std::fs::write(&file, "b").unwrap();
        assert!(seen.changed(&file));
        std::fs::remove_file(&file).unwrap();
        assert!(seen.changed(&file), "removed");
    }
}
