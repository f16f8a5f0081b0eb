//! Secrets the host keeps in files of its data directory: the token
//! signing key and the admin API token.
//!
//! Created on first start with fresh randomness, readable by the owner only
//! (mode 0600), never overwritten: an operator may put their own in place
//! before the first start, and several hosts may share one file.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// `n` bytes from the operating system's random source.
pub fn random_bytes(n: usize) -> Result<Vec<u8>> {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness available: {e}"))?;
    Ok(bytes)
}

/// Reads the secret at `path`, or creates it there from `fresh` when the
/// file does not exist. `what` names it in errors and the log.
pub fn load_or_create(
    path: &Path,
    what: &str,
    fresh: impl FnOnce() -> Result<Vec<u8>>,
) -> Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(secret) => {
            warn_if_shared(path, what);
            return Ok(secret);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading the {what} {}", path.display())),
    }
    let secret = fresh()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Written whole to a file of our own, then linked into place: a host
    // starting beside us (or after a crash mid-write) sees the complete
    // secret or none, and a link never replaces a secret already there.
    let staged = path.with_extension(format!("new.{}", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = options.open(&staged).and_then(|mut file| {
        file.write_all(&secret)?;
        file.sync_all()
    });
    let linked = written.and_then(|()| std::fs::hard_link(&staged, path));
    let _ = std::fs::remove_file(&staged);
    match linked {
        Ok(()) => {}
        // Another host sharing the directory made it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return std::fs::read(path)
                .with_context(|| format!("reading the {what} {}", path.display()))
        }
        Err(e) => return Err(e).with_context(|| format!("writing the {what} {}", path.display())),
    }
    tracing::info!(path = %path.display(), "created a new {what}");
    Ok(secret)
}

/// A secret others can read is no secret: say so, but keep serving.
fn warn_if_shared(path: &Path, what: &str) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "the {what} is readable by other users; chmod 600 it");
            }
        }
    }
}
