//! Atomic output directories: everything is written into a hidden temporary sibling of `--out`,
//! which is renamed into place only when complete. An existing output is replaced only with
//! `--force`, and then only after the new one is fully written.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A temporary directory that becomes `target` on [`commit`](Self::commit) and disappears if dropped.
#[derive(Debug)]
pub struct StagedDir {
    target: PathBuf,
    temp: PathBuf,
    force: bool,
    committed: bool,
}

impl StagedDir {
    /// Checks `target` (refusing an existing one without `force`) and creates the staging directory.
    pub fn create(target: &Path, force: bool) -> Result<Self> {
        check_target(target, force)?;
        let name = target
            .file_name()
            .ok_or_else(|| {
                Error::arg(
                    "--out",
                    format!("`{}` has no directory name", target.display()),
                )
            })?
            .to_string_lossy()
            .into_owned();
        let parent = parent_of(target);
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, "cannot create", e))?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let temp = parent.join(format!(".{name}.tmp-{}-{stamp}", std::process::id()));
        std::fs::create_dir(&temp).map_err(|e| Error::io(&temp, "cannot create", e))?;
        Ok(StagedDir {
            target: target.to_path_buf(),
            temp,
            force,
            committed: false,
        })
    }

    /// Where to write the files.
    pub fn path(&self) -> &Path {
        &self.temp
    }

    /// Moves the finished directory into place (replacing an old one only under `--force`).
    pub fn commit(mut self) -> Result<PathBuf> {
        sync_dir(&self.temp);
        if self.target.exists() {
            if !self.force {
                // Someone created it while we were working: keep theirs, report it.
                return Err(Error::OutputExists {
                    path: self.target.clone(),
                });
            }
            let old = self.temp.with_extension("old");
            std::fs::rename(&self.target, &old)
                .map_err(|e| Error::io(&self.target, "cannot move aside the old output", e))?;
            std::fs::rename(&self.temp, &self.target)
                .map_err(|e| Error::io(&self.target, "cannot move the new output into place", e))?;
            remove_any(&old);
        } else {
            std::fs::rename(&self.temp, &self.target)
                .map_err(|e| Error::io(&self.target, "cannot move the new output into place", e))?;
        }
        sync_dir(&parent_of(&self.target));
        self.committed = true;
        Ok(self.target.clone())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            remove_any(&self.temp);
        }
    }
}

/// Refuses an existing output without `force`, and an output that is a file rather than a directory.
pub fn check_target(target: &Path, force: bool) -> Result<()> {
    if target.exists() {
        if !force {
            return Err(Error::OutputExists {
                path: target.to_path_buf(),
            });
        }
        if !target.is_dir() {
            return Err(Error::arg(
                "--out",
                format!("`{}` exists and is not a directory", target.display()),
            ));
        }
    }
    Ok(())
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn remove_any(path: &Path) {
    if path.is_dir() {
        let _ = std::fs::remove_dir_all(path);
    } else {
        let _ = std::fs::remove_file(path);
    }
}

/// Flushes a directory's entries so a rename survives a crash (best effort).
fn sync_dir(path: &Path) {
    if let Ok(dir) = std::fs::File::open(path) {
        let _ = dir.sync_all();
    }
}
