//! Running the binary and building CLI fixtures, shared by the end-to-end test files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

/// Runs `loraxfer ARGS`.
pub fn loraxfer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loraxfer"))
        .args(args)
        .output()
        .expect("the loraxfer binary runs")
}

/// Runs and insists on success; returns (stdout, stderr).
pub fn ok(args: &[&str]) -> (String, String) {
    let out = loraxfer(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{args:?} failed:\n{stderr}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
}

/// A path as a `&str` argument.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// `loraxfer synth KIND --out OUT EXTRA...`
pub fn synth(kind: &str, out: &Path, extra: &[&str]) {
    let mut args = vec!["synth", kind, "--out", s(out)];
    args.extend_from_slice(extra);
    ok(&args);
}

/// A tiny-qwen2 source, its 5% drifted derivative as target, and an adapter (r=16, alpha=32, all
/// seven projections) for the source, in one temporary directory that also holds the outputs.
pub struct Fixtures {
    pub root: TempDir,
    pub source: PathBuf,
    pub target: PathBuf,
    pub adapter: PathBuf,
}

impl Fixtures {
    pub fn new() -> Self {
        let root = tempfile::tempdir().expect("temp dir");
        let source = root.path().join("source");
        let target = root.path().join("target");
        let adapter = root.path().join("adapter");
        synth("model", &source, &["--like", "tiny-qwen2", "--seed", "1"]);
        synth(
            "model",
            &target,
            &["--derive-from", s(&source), "--drift", "0.05"],
        );
        synth("adapter", &adapter, &["--base", s(&source)]);
        Fixtures {
            root,
            source,
            target,
            adapter,
        }
    }
}

/// Reads a JSON file.
pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read JSON")).expect("valid JSON")
}

/// A safetensors file split into its header JSON (key order kept) and its data section.
pub struct Safetensors {
    pub header: serde_json::Map<String, serde_json::Value>,
    pub data: Vec<u8>,
}

impl Safetensors {
    /// Reads a whole file (8-byte length, header JSON, data).
    pub fn read(path: &Path) -> Self {
        let bytes = std::fs::read(path).expect("read safetensors");
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = serde_json::from_slice(&bytes[8..8 + n]).expect("header JSON");
        Safetensors {
            header,
            data: bytes[8 + n..].to_vec(),
        }
    }
}
