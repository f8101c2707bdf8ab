//! A run folder's checkpoint files: their names (epochs completed and global step), listing,
//! rotation, and the pieces of the atomic write (the temporary name, the directory fsync).

use anyhow::{Context, Result};
use std::fs::File;
use std::path::{Path, PathBuf};

pub(super) fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// fsync the directory holding `path`, so the rename itself survives a crash.
pub(super) fn sync_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // Opening a directory read-only and fsyncing it is how POSIX persists a rename.
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync directory {}", dir.display()))?;
    Ok(())
}

/// The file name of the checkpoint after `epoch` epochs and `step` global steps.
pub fn file_name(prefix: &str, epoch: u64, step: u64) -> String {
    format!("{prefix}-e{epoch}-s{step}.safetensors")
}

/// Parse `(epoch, step)` from a name made by [`file_name`] with this prefix.
pub fn parse_file_name(prefix: &str, name: &str) -> Option<(u64, u64)> {
    let rest = name
        .strip_prefix(prefix)?
        .strip_prefix("-e")?
        .strip_suffix(".safetensors")?;
    let (epoch, step) = rest.split_once("-s")?;
    Some((epoch.parse().ok()?, step.parse().ok()?))
}

/// The checkpoints named by [`file_name`] with this prefix in `dir`, as `(step, epoch, path)`,
/// oldest first (by step, then epoch). Other files (a `.tmp` left by a crash among them) are
/// ignored.
pub fn list(dir: impl AsRef<Path>, prefix: &str) -> Result<Vec<(u64, u64, PathBuf)>> {
    let dir = dir.as_ref();
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        if let Some((epoch, step)) = name.to_str().and_then(|n| parse_file_name(prefix, n)) {
            found.push((step, epoch, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Keep the `keep_max` newest checkpoints named by [`file_name`] in `dir` (by step, then epoch)
/// and delete the rest; `keep_max == 0` keeps everything. Returns the deleted paths.
pub fn rotate(dir: impl AsRef<Path>, prefix: &str, keep_max: usize) -> Result<Vec<PathBuf>> {
    let found = list(dir, prefix)?;
    if keep_max == 0 || found.len() <= keep_max {
        return Ok(Vec::new());
    }
    let excess = found.len() - keep_max;
    let mut deleted = Vec::with_capacity(excess);
    for (_, _, path) in found.into_iter().take(excess) {
        std::fs::remove_file(&path)
            .with_context(|| format!("cannot delete old checkpoint {}", path.display()))?;
        deleted.push(path);
    }
    Ok(deleted)
}
