//! The contract of a refused run, shared by the bad-input tests: a non-zero exit, one `error:`
//! line naming what is wrong, and no output (not even a staging directory).

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::{Map, Value};

use super::cli::{loraxfer, s, Fixtures};

/// The refused-run helpers, a trait so that a test file with `Fixtures` methods of its own of
/// the same names (tests/cli.rs) does not clash with them.
pub trait Refusals {
    /// Where every failing transfer writes; it must never appear.
    fn out(&self) -> PathBuf;

    fn source_weights(&self) -> PathBuf;

    fn adapter_weights(&self) -> PathBuf;

    /// A transfer into `out()` from explicit inputs.
    fn transfer_with(&self, source: &Path, target: &Path, adapter: &Path, extra: &[&str])
        -> Output;

    /// A transfer between the standard fixtures.
    fn transfer(&self, extra: &[&str]) -> Output;

    /// The contract of a refused run; `needles` are substrings the message must contain.
    fn assert_refused(&self, out: &Output, needles: &[&str]);

    /// The staging directory `.out.tmp-*` must be cleaned up whatever happened.
    fn assert_no_staging_left(&self);
}

impl Refusals for Fixtures {
    fn out(&self) -> PathBuf {
        self.root.path().join("out")
    }

    fn source_weights(&self) -> PathBuf {
        self.source.join("model.safetensors")
    }

    fn adapter_weights(&self) -> PathBuf {
        self.adapter.join("adapter_model.safetensors")
    }

    fn transfer_with(
        &self,
        source: &Path,
        target: &Path,
        adapter: &Path,
        extra: &[&str],
    ) -> Output {
        let out = self.out();
        let mut args = vec!["transfer", "--out", s(&out), "--adapter", s(adapter)];
        args.extend(["--source-base", s(source), "--target-base", s(target)]);
        args.extend_from_slice(extra);
        loraxfer(&args)
    }

    fn transfer(&self, extra: &[&str]) -> Output {
        self.transfer_with(&self.source, &self.target, &self.adapter, extra)
    }

    fn assert_refused(&self, out: &Output, needles: &[&str]) {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "expected a failure, got success; stderr: {stderr}"
        );
        // Progress lines may come first; the error is the rest.
        let error = stderr
            .lines()
            .skip_while(|l| !l.starts_with("error:"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(!error.is_empty(), "stderr has no `error:` line: {stderr}");
        for n in needles {
            assert!(error.contains(n), "the error lacks `{n}`: {stderr}");
        }
        assert!(!self.out().exists(), "--out was created by a failed run");
        self.assert_no_staging_left();
    }

    fn assert_no_staging_left(&self) {
        let leftovers: Vec<String> = std::fs::read_dir(self.root.path())
            .expect("read temp dir")
            .map(|e| {
                e.expect("dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .filter(|n| n.starts_with(".out.tmp-"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "staging directories left behind: {leftovers:?}"
        );
    }
}

/// Reads a JSON file, lets `edit` change it, writes it back.
pub fn edit_json(path: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    let mut v: Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}
