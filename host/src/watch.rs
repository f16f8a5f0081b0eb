//! Hot swap from the file system: watches plugins.toml and every component
//! binary, and reconciles when one changes.
//!
//! Directories are watched rather than files, so a binary replaced by an
//! atomic rename is seen. Events are debounced: a build writes a file in
//! several steps, and a half-written binary would only be refused and
//! retried, but there is no point in trying it.
//!
//! Only events that change a file count. inotify also reports opening and
//! reading (`Access`), and the host reads plugins.toml and the binaries on
//! every reconcile: counting those made each reload wake the next, about
//! five a second forever.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::plugins::Plugins;
use crate::runtime::Runtime;

/// Quiet time after the last change before reconciling.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// plugins.toml and the binaries it names: as the file is now where it
/// parses (a component just added is refused until its binary exists, and
/// that binary's arrival must be seen), else as the host serves it.
fn watched_files(runtime: &Runtime) -> BTreeSet<PathBuf> {
    let plugins = Plugins::load(runtime.plugins_path()).unwrap_or_else(|_| runtime.plugins());
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
            if changes_content(&event.kind) {
                let _ = tx.send(event.paths);
            }
        }
    })?;
    let mut watched_dirs = BTreeSet::new();
    let mut watch_dirs_of = move |files: &BTreeSet<PathBuf>| {
        for dir in files.iter().filter_map(|f| f.parent()) {
            if watched_dirs.insert(dir.to_owned()) {
                if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot watch for changes");
                    watched_dirs.remove(dir);
                }
            }
        }
    };
    // Watching before the host says it serves: a change made as soon as it
    // does must not be missed.
    let mut files = watched_files(&runtime);
    watch_dirs_of(&files);
    tokio::spawn(async move {
        loop {
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
            tracing::info!("a watched file changed; reloading");
            if let Err(e) = runtime.reconcile().await {
                tracing::error!(error = %format!("{e:#}"), "hot swap refused");
            }
            files = watched_files(&runtime);
            watch_dirs_of(&files);
        }
    });
    Ok(())
}

/// Whether an event can mean new contents: a write, a create, a rename into
/// place or a removal; not an open, a read, a close after reading or a
/// change of metadata alone.
fn changes_content(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
    match kind {
        // A file closed after writing: the end of an in-place rewrite.
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Other | EventKind::Modify(ModifyKind::Metadata(_)) => {
            false
        }
        EventKind::Any | EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => true,
    }
}
