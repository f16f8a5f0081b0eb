//! Hot swap from the file system: watches plugins.toml and every component
//! binary, and reconciles when one changes.
//!
//! Directories are watched rather than files, so a binary replaced by an
//! atomic rename is seen. Events are debounced: a build writes a file in
//! several steps, and a half-written binary would only be refused and
//! retried, but there is no point in trying it.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::runtime::Runtime;

/// Quiet time after the last change before reconciling.
const DEBOUNCE: Duration = Duration::from_millis(200);

fn watched_files(runtime: &Runtime) -> BTreeSet<PathBuf> {
    let plugins = runtime.plugins();
    let mut files: BTreeSet<PathBuf> = plugins
        .components
        .values()
        .map(|spec| plugins.resolve(&spec.wasm))
        .collect();
    files.insert(runtime.plugins_path().to_owned());
    files
        .into_iter()
        .filter_map(|p| std::path::absolute(p).ok())
        .collect()
}

pub fn start(runtime: Arc<Runtime>) -> Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<PathBuf>>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            let _ = tx.send(event.paths);
        }
    })?;
    tokio::spawn(async move {
        let mut watched_dirs = BTreeSet::new();
        loop {
            let files = watched_files(&runtime);
            for dir in files.iter().filter_map(|f| f.parent()) {
                if watched_dirs.insert(dir.to_owned()) {
                    if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch for changes");
                        watched_dirs.remove(dir);
                    }
                }
            }
            let relevant = |paths: &[PathBuf]| paths.iter().any(|p| files.contains(p));
            let Some(paths) = rx.recv().await else { return };
            if !relevant(&paths) {
                continue;
            }
            // Only changes to watched files restart the quiet period: other
            // files in the same directories (logs, databases) change all the time.
            let mut quiet_until = tokio::time::Instant::now() + DEBOUNCE;
            loop {
                tokio::select! {
                    event = rx.recv() => match event {
                        Some(paths) if relevant(&paths) => quiet_until = tokio::time::Instant::now() + DEBOUNCE,
                        Some(_) => {}
                        None => return,
                    },
                    _ = tokio::time::sleep_until(quiet_until) => break,
                }
            }
            if let Err(e) = runtime.reconcile().await {
                tracing::error!(error = %format!("{e:#}"), "hot swap refused");
            }
        }
    });
    Ok(())
}
