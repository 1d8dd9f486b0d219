//! Hub names (`org/name[@revision]`) in place of directories, resolved in a Hugging Face cache
//! laid out as the hub libraries write it (refs → snapshots → links into blobs), with a sharded
//! checkpoint and an adapter in it; nothing is downloaded.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::cli::{read_json, s, Fixtures};
use loraxfer::io::safetensors::TensorFile;

/// Caches the files of `dir` as repo `name` at `commit`, with ref `refname` pointing at it.
fn cache_repo(cache: &Path, name: &str, dir: &Path, commit: &str, refname: &str) {
    let repo = cache.join(format!("models--{}", name.replace('/', "--")));
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_str().unwrap().to_string();
        let blob = format!("{commit}-{file}");
        std::fs::copy(&path, repo.join("blobs").join(&blob)).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snapshot.join(&file)).unwrap();
    }
    std::fs::write(repo.join("refs").join(refname), commit).unwrap();
}

/// The checkpoint in `dir` rewritten as a sharded one (an index and one shard).
fn as_sharded(dir: &Path) {
    let shard = "model-00001-of-00001.safetensors";
    std::fs::rename(dir.join("model.safetensors"), dir.join(shard)).unwrap();
    let names: Vec<String> = TensorFile::open(&dir.join(shard))
        .unwrap()
        .names()
        .map(str::to_string)
        .collect();
    let map: serde_json::Map<String, serde_json::Value> =
        names.into_iter().map(|n| (n, shard.into())).collect();
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

fn run(cache: &Path, cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loraxfer"))
        .args(args)
        .env("HF_HUB_CACHE", cache)
        .current_dir(cwd)
        .output()
        .unwrap()
}

fn transfer_args<'a>(
    source: &'a str,
    target: &'a str,
    adapter: &'a str,
    out: &'a str,
) -> Vec<&'a str> {
    vec![
        "transfer",
        "--source-base",
        source,
        "--target-base",
        target,
        "--adapter",
        adapter,
        "--out",
        out,
        "--rank",
        "8",
        "--device",
        "cpu",
    ]
}

#[test]
fn hub_names_resolve_in_the_local_cache() {
    let f = Fixtures::new();
    let root = f.root.path();
    let cache = root.join("hub");
    let (c1, c2, c3) = ("a".repeat(40), "b".repeat(40), "c".repeat(40));
    let sharded = root.join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    for entry in std::fs::read_dir(&f.source).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, sharded.join(p.file_name().unwrap())).unwrap();
    }
    as_sharded(&sharded);
    cache_repo(&cache, "acme/src", &sharded, &c1, "main");
    cache_repo(&cache, "acme/tgt", &f.target, &c2, "v2");
    cache_repo(&cache, "acme/lora", &f.adapter, &c3, "main");

    // By name (a ref other than main for the target), and from the directories themselves.
    let by_name = root.join("by-name");
    let out = run(
        &cache,
        root,
        &transfer_args("acme/src", "acme/tgt@v2", "acme/lora", s(&by_name)),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let by_dir = root.join("by-dir");
    let out = run(
        &cache,
        root,
        &transfer_args(s(&f.source), s(&f.target), s(&f.adapter), s(&by_dir)),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let weights = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert_eq!(
        weights(&by_name),
        weights(&by_dir),
        "the cached models give another adapter"
    );

    // The report keeps the names, their revisions and the snapshots they resolved to.
    let report = read_json(&by_name.join("transfer_report.json"));
    let hub = &report["hub"];
    assert_eq!(hub["source_base"]["name"], "acme/src");
    assert_eq!(hub["target_base"]["revision"], "v2");
    // The adapter names its base at the commit, not the tag, which may move on.
    let config = read_json(&by_name.join("adapter_config.json"));
    assert_eq!(config["base_model_name_or_path"], "acme/tgt");
    assert_eq!(config["revision"], c2.as_str(), "{config}");
    assert!(
        hub["adapter"]["snapshot"].as_str().unwrap().ends_with(&c3),
        "{hub}"
    );
    assert!(read_json(&by_dir.join("transfer_report.json"))
        .get("hub")
        .is_none());

    // A full commit hash names its snapshot directly.
    let by_commit = root.join("by-commit");
    let src = format!("acme/src@{c1}");
    let out = run(
        &cache,
        root,
        &transfer_args(&src, "acme/tgt@v2", "acme/lora", s(&by_commit)),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // inspect takes names too.
    let out = run(
        &cache,
        root,
        &[
            "inspect",
            "--source-base",
            "acme/src",
            "--target-base",
            "acme/tgt@v2",
            "--rank",
            "8",
            "--device",
            "cpu",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_uncached_name_says_where_it_looked_and_a_local_directory_wins() {
    let f = Fixtures::new();
    let root = f.root.path();
    let cache = root.join("hub");
    std::fs::create_dir_all(&cache).unwrap();
    let out_dir = root.join("out");
    let out = run(
        &cache,
        root,
        &transfer_args("acme/missing", s(&f.target), s(&f.adapter), s(&out_dir)),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("models--acme--missing") && err.contains("hf download acme/missing"),
        "{err}"
    );
    assert!(!out_dir.exists());
    // A directory `acme/missing` under the working directory is taken as it is.
    let local = root.join("acme").join("missing");
    std::fs::create_dir_all(root.join("acme")).unwrap();
    std::os::unix::fs::symlink(&f.source, &local).unwrap();
    let out = run(
        &cache,
        root,
        &transfer_args("acme/missing", s(&f.target), s(&f.adapter), s(&out_dir)),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(read_json(&out_dir.join("transfer_report.json"))
        .get("hub")
        .is_none());
}
