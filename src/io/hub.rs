//! Hub names (`org/name`, `org/name@revision`) resolved in the local Hugging Face cache, the way
//! the hub libraries lay it out: `<cache>/models--org--name/refs/<revision>` holds a commit,
//! `snapshots/<commit>/` holds the files (links into `blobs/`). The cache is `HF_HUB_CACHE`,
//! else `HF_HOME/hub`, else `~/.cache/huggingface/hub`. Nothing is downloaded: a name that is not
//! cached is an error that says where it looked and how to fetch it. A local directory of the
//! same name wins.

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// What a directory argument turned out to be.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HubModel {
    /// The name as given, without the revision.
    pub name: String,
    pub revision: String,
    /// The snapshot directory it resolved to.
    pub snapshot: PathBuf,
}

/// What the directory must hold to count as the thing asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A base model (`config.json`).
    Model,
    /// A PEFT adapter (`adapter_config.json`).
    Adapter,
}

impl Kind {
    fn marker(self) -> &'static str {
        match self {
            Kind::Model => "config.json",
            Kind::Adapter => "adapter_config.json",
        }
    }
}

/// The cache directory the hub libraries use.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        return dir.into();
    }
    // hf-hub reads HF_HOME, then falls back to ~/.cache/huggingface/hub.
    Cache::from_env().path().clone()
}

/// `org/name` or `org/name@revision`, when `arg` has that shape (one slash, hub characters).
fn parse_name(arg: &str) -> Option<(&str, &str)> {
    let (name, revision) = match arg.split_once('@') {
        Some((n, r)) if !r.is_empty() => (n, r),
        Some(_) => return None,
        None => (arg, "main"),
    };
    let (org, repo) = name.split_once('/')?;
    let ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (ok(org) && ok(repo)).then_some((name, revision))
}

/// `arg` as a directory: itself when it exists, else a hub name resolved in the cache at
/// `cache` (None for a plain path, Some with the snapshot for a name).
pub fn resolve_in(arg: &Path, kind: Kind, cache: &Path) -> Result<(PathBuf, Option<HubModel>)> {
    if arg.exists() {
        return Ok((arg.to_path_buf(), None));
    }
    let Some((name, revision)) = arg.to_str().and_then(parse_name) else {
        return Ok((arg.to_path_buf(), None));
    };
    let repo = Repo::with_revision(name.to_string(), RepoType::Model, revision.to_string());
    let repo_dir = cache.join(repo.folder_name());
    // A branch or tag is a ref; a full commit hash names its snapshot directly.
    let by_ref = Cache::new(cache.to_path_buf())
        .repo(repo.clone())
        .get(kind.marker())
        .and_then(|p| p.parent().map(Path::to_path_buf));
    let by_commit = || {
        let dir = repo_dir.join("snapshots").join(revision);
        (revision.len() == 40 && dir.join(kind.marker()).exists()).then_some(dir)
    };
    // A GGUF repository has no config.json: a model snapshot holding a .gguf file counts too.
    let gguf_snapshot = || {
        if kind != Kind::Model {
            return None;
        }
        let commit = if revision.len() == 40 {
            revision.to_string()
        } else {
            std::fs::read_to_string(repo_dir.join("refs").join(revision))
                .ok()?
                .trim()
                .to_string()
        };
        let dir = repo_dir.join("snapshots").join(commit);
        let has_gguf = std::fs::read_dir(&dir).ok()?.flatten().any(|e| {
            Path::new(&e.file_name())
                .extension()
                .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
        });
        has_gguf.then_some(dir)
    };
    match by_ref.or_else(by_commit).or_else(gguf_snapshot) {
        Some(snapshot) => Ok((
            snapshot.clone(),
            Some(HubModel {
                name: name.to_string(),
                revision: revision.to_string(),
                snapshot,
            }),
        )),
        None => {
            let what = match kind {
                Kind::Model => "a model",
                Kind::Adapter => "an adapter",
            };
            let at = if revision == "main" {
                String::new()
            } else {
                format!(" --revision {revision}")
            };
            Err(Error::config(
                arg,
                format!(
                    "neither a directory nor {what} in the Hugging Face cache: no snapshot of revision `{revision}` with {} under {} (download it with `hf download {name}{at}`, or set HF_HUB_CACHE / HF_HOME to the cache that has it)",
                    kind.marker(),
                    repo_dir.display()
                ),
            ))
        }
    }
}

/// [`resolve_in`] the hub libraries' cache ([`cache_dir`]).
pub fn resolve(arg: &Path, kind: Kind) -> Result<(PathBuf, Option<HubModel>)> {
    resolve_in(arg, kind, &cache_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_told_from_paths() {
        assert_eq!(
            parse_name("Qwen/Qwen2.5-1.5B"),
            Some(("Qwen/Qwen2.5-1.5B", "main"))
        );
        assert_eq!(
            parse_name("meta-llama/Llama-3.2-3B@v1.0"),
            Some(("meta-llama/Llama-3.2-3B", "v1.0"))
        );
        for path in [
            "model", "./a/b", "/abs/x", "a/b/c", "a/", "../x", "a/b@", "a b/c",
        ] {
            assert_eq!(parse_name(path), None, "{path}");
        }
    }
}
