//! Atomic output directories: everything is written into a hidden temporary sibling of `--out`,
//! which is renamed into place only when complete. An existing output is replaced only with
//! `--force`, only when it holds nothing but the files a loraxfer output holds (never a directory
//! of other work, never one of the run's inputs or a directory above one), and then only after
//! the new one is fully written. A run interrupted by SIGINT,
//! SIGTERM or SIGHUP removes its temporary directory; one killed outright leaves it behind, and
//! the next run into the same parent removes it and says so. An `--out` that is a symbolic link
//! names where the link points: the output is written there (the link kept), so a link to a
//! directory on another disk, or to one not made yet, works as a user expects.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::error::{Error, Result};

/// Temporary directories and files of this process that a signal must remove.
fn live_dirs() -> &'static Mutex<Vec<PathBuf>> {
    static DIRS: OnceLock<Mutex<Vec<PathBuf>>> = OnceLock::new();
    DIRS.get_or_init(|| Mutex::new(Vec::new()))
}

/// Set (under the lock of [`live_dirs`]) once an output has been renamed into place.
static PUBLISHED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Installs the SIGINT/SIGTERM/SIGHUP handler (once): remove live temporary directories, exit 130.
pub fn install_signal_cleanup() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = ctrlc::set_handler(|| {
            // Holding the lock until exit keeps a commit from renaming a directory we are removing.
            let dirs = live_dirs().lock().unwrap_or_else(|e| e.into_inner());
            for d in dirs.iter() {
                remove_any(d);
            }
            // A signal that waited for a commit to finish comes after a complete output (and
            // the demo commits several).
            if PUBLISHED.load(std::sync::atomic::Ordering::SeqCst) {
                eprintln!(
                    "interrupted: outputs completed before it are kept, nothing else written"
                );
            } else {
                eprintln!("interrupted: no output written");
            }
            std::process::exit(130);
        });
    });
}

/// A temporary directory that becomes `target` on [`commit`](Self::commit) and disappears if dropped.
#[derive(Debug)]
pub struct StagedDir {
    /// `--out` as given (what the caller reports).
    given: PathBuf,
    /// `--out` with its symbolic links followed (what is written).
    target: PathBuf,
    temp: PathBuf,
    force: bool,
    /// The run's inputs, checked again at the commit (see [`check_target`]).
    inputs: Vec<PathBuf>,
    committed: bool,
}

impl StagedDir {
    /// Checks `target` ([`check_target`]) and creates the staging directory.
    pub fn create(given: &Path, force: bool, inputs: &[&Path]) -> Result<Self> {
        check_target(given, force, inputs)?;
        let target = resolve_links(given)?;
        let temp = staging_path(&target, &dir_name(&target)?)?;
        {
            let mut live = live_dirs().lock().unwrap_or_else(|e| e.into_inner());
            std::fs::create_dir(&temp).map_err(|e| Error::io(&temp, "cannot create", e))?;
            live.push(temp.clone());
        }
        Ok(StagedDir {
            given: given.to_path_buf(),
            target,
            temp,
            force,
            inputs: inputs.iter().map(|p| p.to_path_buf()).collect(),
            committed: false,
        })
    }

    /// Where to write the files.
    pub fn path(&self) -> &Path {
        &self.temp
    }

    /// Moves the finished directory into place (replacing an old one only under `--force`, and
    /// only when it still passes [`check_target`]: a directory made at `--out` while this run
    /// worked is checked like one that was there at the start). Returns `--out` as given.
    pub fn commit(mut self) -> Result<PathBuf> {
        sync_tree(&self.temp);
        let mut live = live_dirs().lock().unwrap_or_else(|e| e.into_inner());
        if self.target.exists() {
            if !self.force {
                // Someone created it while we were working: keep theirs, report it.
                return Err(Error::OutputExists {
                    path: self.given.clone(),
                });
            }
            let inputs: Vec<&Path> = self.inputs.iter().map(PathBuf::as_path).collect();
            check_target(&self.target, true, &inputs)?;
            // `.{name}.old-{pid}-…`: unique, and not a staging directory, so that no later run
            // removes it (a run killed between the two renames leaves it for the user).
            let file = self.temp.file_name().unwrap_or_default().to_string_lossy();
            let old = self.temp.with_file_name(file.replacen(".tmp-", ".old-", 1));
            std::fs::rename(&self.target, &old)
                .map_err(|e| Error::io(&self.target, "cannot move aside the old output", e))?;
            if let Err(e) = self.rename_into_place() {
                // Put the old output back: a failed replacement must lose nothing.
                if let Err(back) = std::fs::rename(&old, &self.target) {
                    eprintln!("error: {e}");
                    return Err(Error::io(
                        &old,
                        "could not put back the old output, which is kept at",
                        back,
                    ));
                }
                return Err(e);
            }
            remove_any(&old);
        } else {
            self.rename_into_place()?;
        }
        // Still under the lock: a signal handled after it sees a published output and no
        // staging directory.
        live.retain(|d| d != &self.temp);
        PUBLISHED.store(true, std::sync::atomic::Ordering::SeqCst);
        drop(live);
        sync_dir(&parent_of(&self.target));
        self.committed = true;
        Ok(self.given.clone())
    }

    fn rename_into_place(&self) -> Result<()> {
        std::fs::rename(&self.temp, &self.target).map_err(|e| {
            // rename(2) onto a non-empty directory fails: another run finished first.
            if self.target.is_dir() && !self.force {
                Error::OutputExists {
                    path: self.given.clone(),
                }
            } else {
                Error::io(&self.target, "cannot move the new output into place", e)
            }
        })
    }

    fn forget(&self) {
        let mut live = live_dirs().lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|d| d != &self.temp);
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            remove_any(&self.temp);
            self.forget();
        }
    }
}

/// A temporary sibling file that becomes `target` on [`commit`](Self::commit) and disappears if
/// dropped: the one-file counterpart of [`StagedDir`]. An existing target is replaced only with
/// `--force`, and only when `replaceable` recognizes it as an earlier output of the same kind;
/// never when it is one of the inputs.
#[derive(Debug)]
pub struct StagedFile {
    given: PathBuf,
    target: PathBuf,
    temp: PathBuf,
    force: bool,
    /// The run's inputs and what `--force` may replace, checked again at the commit.
    inputs: Vec<PathBuf>,
    replaceable: fn(&Path) -> bool,
    committed: bool,
}

impl StagedFile {
    /// Checks `given` and reserves the temporary file's name beside it.
    pub fn create(
        given: &Path,
        force: bool,
        inputs: &[&Path],
        replaceable: fn(&Path) -> bool,
    ) -> Result<Self> {
        let target = resolve_links(given)?;
        check_file_target(given, &target, force, inputs, replaceable)?;
        let temp = staging_path(&target, &file_name(&target)?)?;
        live_dirs()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(temp.clone());
        Ok(StagedFile {
            given: given.to_path_buf(),
            target,
            temp,
            force,
            inputs: inputs.iter().map(|p| p.to_path_buf()).collect(),
            replaceable,
            committed: false,
        })
    }

    /// Where to write the file.
    pub fn path(&self) -> &Path {
        &self.temp
    }

    /// Renames the finished file into place, replacing a file there only when it still passes
    /// the checks of [`create`](Self::create) (one made at the target while this run worked is
    /// judged like one that was there at the start). Returns the target as given.
    pub fn commit(mut self) -> Result<PathBuf> {
        let mut live = live_dirs().lock().unwrap_or_else(|e| e.into_inner());
        let inputs: Vec<&Path> = self.inputs.iter().map(PathBuf::as_path).collect();
        check_file_target(
            &self.given,
            &self.target,
            self.force,
            &inputs,
            self.replaceable,
        )?;
        std::fs::rename(&self.temp, &self.target)
            .map_err(|e| Error::io(&self.target, "cannot move the new output into place", e))?;
        live.retain(|d| d != &self.temp);
        PUBLISHED.store(true, std::sync::atomic::Ordering::SeqCst);
        drop(live);
        sync_dir(&parent_of(&self.target));
        self.committed = true;
        Ok(self.given.clone())
    }
}

/// Refuses an existing file output without `force`; with it, one that is a directory, one that
/// `replaceable` does not recognize as an earlier output, and one that is an input.
fn check_file_target(
    given: &Path,
    target: &Path,
    force: bool,
    inputs: &[&Path],
    replaceable: fn(&Path) -> bool,
) -> Result<()> {
    if target.exists() {
        if !force {
            return Err(Error::OutputExists {
                path: given.to_path_buf(),
            });
        }
        let why = if target.is_dir() {
            Some("is a directory")
        } else if !replaceable(target) {
            Some("is not an earlier output of this command")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(Error::arg(
                "--out",
                format!(
                    "`{}` {why}: --force replaces only an earlier output of its kind",
                    target.display()
                ),
            ));
        }
    }
    let out = std::fs::canonicalize(target).ok();
    if let Some(input) = inputs
        .iter()
        .find(|i| out.is_some() && std::fs::canonicalize(i).ok() == out)
    {
        return Err(Error::arg(
            "--out",
            format!("`{}` is the input `{}`", given.display(), input.display()),
        ));
    }
    Ok(())
}

/// The last component of a file output's path.
fn file_name(target: &Path) -> Result<String> {
    target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::arg("--out", format!("`{}` has no file name", target.display())))
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.committed {
            remove_any(&self.temp);
            let mut live = live_dirs().lock().unwrap_or_else(|e| e.into_inner());
            live.retain(|d| d != &self.temp);
        }
    }
}

/// Refuses an existing output without `force`; with it, refuses an output that is a file rather
/// than a directory, one that is or holds any of `inputs`, and one holding anything a loraxfer
/// output does not (a subdirectory, a file of another name): `--force` replaces an earlier
/// output, never other work. A symbolic link is judged by what it points to.
pub fn check_target(given: &Path, force: bool, inputs: &[&Path]) -> Result<()> {
    let target = &resolve_links(given)?;
    if !target.exists() {
        return Ok(());
    }
    if !force {
        return Err(Error::OutputExists {
            path: given.to_path_buf(),
        });
    }
    if !target.is_dir() {
        return Err(Error::arg(
            "--out",
            format!("`{}` exists and is not a directory", target.display()),
        ));
    }
    check_not_above_inputs(target, inputs)?;
    check_only_outputs(target, &[])
}

/// The files loraxfer writes into an output directory: adapters, their reports, and models (whole
/// or sharded, with their config, and the tokenizer files a derived model copies).
pub fn is_output_file(name: &str) -> bool {
    matches!(
        name,
        "adapter_config.json"
            | "adapter_model.safetensors"
            | "adapter_model.gguf"
            | "adapters.safetensors"
            | "transfer_report.json"
            | "config.json"
            | "model.safetensors"
            | "model.safetensors.index.json"
    ) || (name.starts_with("model-") && name.ends_with(".safetensors"))
        || crate::synth::derive::COPIED_FILES.contains(&name)
}

/// Refuses `target` when it is, or lies above, one of `inputs` (replacing it would delete them).
fn check_not_above_inputs(target: &Path, inputs: &[&Path]) -> Result<()> {
    let Ok(out) = std::fs::canonicalize(target) else {
        return Ok(());
    };
    for input in inputs {
        if let Ok(input) = std::fs::canonicalize(input) {
            if input.starts_with(&out) {
                return Err(Error::arg(
                    "--out",
                    format!(
                        "`{}` {} the input `{}`: --force would delete it",
                        target.display(),
                        if input == out { "is" } else { "holds" },
                        input.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Refuses `dir` unless every entry is an output file ([`is_output_file`]), or one of `subdirs`
/// holding only output files (the demo's models, adapter and result) or the staging directory of
/// one of them left by a process that is gone, and unless its weights
/// say loraxfer wrote them (the producer mark of [`pt_metadata`]): file names alone would let a
/// model or adapter saved by other tools pass for an earlier output.
///
/// [`pt_metadata`]: crate::io::safetensors::pt_metadata
pub fn check_only_outputs(dir: &Path, subdirs: &[&str]) -> Result<()> {
    let refuse = |why: String| {
        Error::arg(
            "--out",
            format!(
                "`{}` {why}: --force replaces only an earlier loraxfer output; move or remove \
                 the directory yourself",
                dir.display()
            ),
        )
    };
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, "cannot list", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, "cannot list", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(true);
        let staging_of_a_subdir = subdirs
            .iter()
            .any(|s| name.starts_with(&format!(".{s}.tmp-")));
        if is_dir && staging_of_a_subdir && staging_pid(&name).is_some_and(|p| !process_alive(p)) {
            // Left by a run killed while writing one of `subdirs` (a demo killed outright):
            // its own partial output, which goes with the directory.
            continue;
        }
        if is_dir && subdirs.contains(&name.as_str()) {
            check_only_outputs(&entry.path(), &[])?;
        } else if is_dir || !is_output_file(&name) {
            return Err(refuse(format!(
                "holds `{name}`, which is not part of a loraxfer output"
            )));
        } else if (name.ends_with(".safetensors")
            && !crate::io::safetensors::written_by_loraxfer(&entry.path()))
            || (name.ends_with(".gguf") && !crate::io::gguf::lora::is_lora_gguf(&entry.path()))
        {
            return Err(refuse(format!(
                "holds `{name}`, which loraxfer did not write"
            )));
        }
    }
    Ok(())
}

/// The staging path `.{name}.tmp-{pid}-{stamp}` beside `target` (named `name`): its parent
/// made, and stale staging paths of killed runs into the same target removed.
fn staging_path(target: &Path, name: &str) -> Result<PathBuf> {
    let parent = parent_of(target);
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, "cannot create", e))?;
    remove_stale(&parent, name);
    let stamp = crate::timing::epoch_nanos();
    Ok(parent.join(format!(".{name}.tmp-{}-{stamp}", std::process::id())))
}

fn dir_name(target: &Path) -> Result<String> {
    target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| {
            Error::arg(
                "--out",
                format!("`{}` has no directory name", target.display()),
            )
        })
}

/// Removes `.{name}.tmp-{pid}-*` siblings left by runs that were killed, when that process is
/// gone, and says so on stderr.
fn remove_stale(parent: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        if !file.starts_with(&prefix) {
            continue;
        }
        let Some(pid) = staging_pid(&file) else {
            continue;
        };
        if !process_alive(pid) {
            remove_any(&entry.path());
            eprintln!(
                "removed {}, left by an interrupted run (process {pid})",
                entry.path().display()
            );
        }
    }
}

/// The process that made a staging directory `.{name}.tmp-{pid}-{stamp}`, from its name.
fn staging_pid(file: &str) -> Option<u32> {
    let (_, rest) = file.strip_prefix('.')?.rsplit_once(".tmp-")?;
    let (pid, stamp) = rest.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(pid) && digits(stamp)).then(|| pid.parse().ok())?
}

pub(crate) fn process_alive(pid: u32) -> bool {
    // Our own directories are live; where /proc is missing, assume alive: never remove another
    // run's work in doubt.
    pid == std::process::id()
        || !Path::new("/proc/self").exists()
        || Path::new(&format!("/proc/{pid}")).exists()
}

/// `path` with its symbolic links followed to the end of the chain (the chain may end at a path
/// that does not exist yet: the output is made there). Only the last component is followed; the
/// directories above are left as given, and a chain that loops is an error.
pub fn resolve_links(path: &Path) -> Result<PathBuf> {
    // Without a trailing separator (`out/` as shells complete it): with one, the link itself
    // would be followed by every call below and never seen as a link.
    let mut current: PathBuf = path.components().collect();
    for _ in 0..40 {
        let is_link = std::fs::symlink_metadata(&current).is_ok_and(|m| m.file_type().is_symlink());
        if !is_link {
            return Ok(current);
        }
        let next = std::fs::read_link(&current)
            .map_err(|e| Error::io(&current, "cannot read the symbolic link", e))?;
        current = parent_of(&current).join(next);
    }
    Err(Error::arg(
        "--out",
        format!(
            "`{}` is a symbolic link that loops (or a chain of more than 40)",
            path.display()
        ),
    ))
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

/// Flushes the files of a directory and the directory itself, so that a rename after it
/// publishes complete files even across a crash (best effort).
fn sync_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if let Ok(f) = std::fs::File::open(e.path()) {
                let _ = f.sync_all();
            }
        }
    }
    sync_dir(dir);
}

fn sync_dir(path: &Path) {
    if let Ok(dir) = std::fs::File::open(path) {
        let _ = dir.sync_all();
    }
}

/// The name a path ends in, absolute (`.` resolved), as a model or adapter name: the name a
/// user gave an output, not its staging directory's.
pub fn name_of(path: &Path) -> String {
    std::path::absolute(path)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_names_give_their_process() {
        assert_eq!(staging_pid(".out.tmp-123-456"), Some(123));
        assert_eq!(staging_pid(".my.tmp-dir.tmp-7-8"), Some(7));
        for not_staging in [
            "out.tmp-123-456",
            ".out.old-123-456",
            ".out.tmp-123",
            ".out.tmp--456",
            ".out.tmp-12a-456",
            ".out.tmp-123-45x",
        ] {
            assert_eq!(staging_pid(not_staging), None, "{not_staging}");
        }
    }

    #[test]
    fn commit_checks_again_a_directory_made_while_working() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        let input = root.path().join("input");
        std::fs::create_dir(&input).unwrap();
        for (made, why) in [
            ("notes.txt", "not part of a loraxfer output"),
            ("input", "is the input"),
        ] {
            let staged = StagedDir::create(&target, true, &[&input]).unwrap();
            std::fs::write(staged.path().join("transfer_report.json"), b"{}").unwrap();
            // Another process makes --out meanwhile: other work, or a link to an input.
            if made == "input" {
                std::os::unix::fs::symlink(&input, &target).unwrap();
            } else {
                std::fs::create_dir(&target).unwrap();
                std::fs::write(target.join(made), b"keep me").unwrap();
            }
            let temp = staged.path().to_path_buf();
            let err = staged.commit().unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
            assert!(!temp.exists(), "the staging directory was left");
            if made == "input" {
                assert!(input.is_dir());
                std::fs::remove_file(&target).unwrap();
            } else {
                assert_eq!(std::fs::read(target.join(made)).unwrap(), b"keep me");
                std::fs::remove_dir_all(&target).unwrap();
            }
        }
    }
}
