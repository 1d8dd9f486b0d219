//! Inputs the map mode cannot anchor, or anchors only in part: too few shared tokens (auto then
//! aligns, an explicit map says why), embeddings with no direction, an output head shorter than
//! the embedding. Between the synthetic tiny-qwen2 (64 wide, 4 layers) and tiny-llama (96 wide,
//! 6 layers), whose word-level vocabularies of 256 tokens are spelled alike.

mod common;

use std::path::{Path, PathBuf};

use common::cli::*;
use common::{rewrite, word_level_tokenizer, Tensor};

struct Pair {
    root: tempfile::TempDir,
    source: PathBuf,
    target: PathBuf,
    adapter: PathBuf,
}

impl Pair {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let (source, target, adapter) = (
            root.path().join("qwen"),
            root.path().join("llama"),
            root.path().join("adapter"),
        );
        synth("model", &source, &["--like", "tiny-qwen2", "--seed", "1"]);
        synth("model", &target, &["--like", "tiny-llama", "--seed", "2"]);
        synth("adapter", &adapter, &["--base", s(&source)]);
        Pair {
            root,
            source,
            target,
            adapter,
        }
    }

    fn transfer(&self, out: &str, extra: &[&str]) -> (std::process::Output, PathBuf) {
        let out = self.root.path().join(out);
        let mut args = vec!["transfer", "--out", s(&out), "--adapter", s(&self.adapter)];
        args.extend([
            "--source-base",
            s(&self.source),
            "--target-base",
            s(&self.target),
        ]);
        args.extend_from_slice(extra);
        (loraxfer(&args), out)
    }
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// An untied output head: the embedding's first `rows` rows, halved.
fn untie(dir: &Path, rows: usize) {
    let config = dir.join("config.json");
    let mut c = read_json(&config);
    c["tie_word_embeddings"] = false.into();
    std::fs::write(&config, c.to_string()).unwrap();
    rewrite(&dir.join("model.safetensors"), |tensors| {
        let embed = tensors
            .iter()
            .find(|t| t.name == "model.embed_tokens.weight")
            .unwrap();
        let width = embed.shape[1];
        tensors.push(Tensor {
            name: "lm_head.weight".into(),
            values: embed.values[..rows * width]
                .iter()
                .map(|x| x * 0.5)
                .collect(),
            shape: vec![rows, width],
            ty: embed.ty,
        });
    });
}

#[test]
fn too_few_shared_tokens_make_auto_align_and_map_say_why() {
    let p = Pair::new();
    // Only 20 of the target's words are spelled as the source's: fewer than the 64 a map
    // between widths 64 and 96 needs.
    word_level_tokenizer(&p.source, 256, &|i| i);
    word_level_tokenizer(&p.target, 256, &|i| i);
    let path = p.target.join("tokenizer.json");
    let mut json = read_json(&path);
    let vocab = json["model"]["vocab"].as_object_mut().unwrap();
    let renamed: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .map(|(w, id)| {
            let keep = id.as_u64().unwrap() < 20;
            (if keep { w.clone() } else { format!("x{w}") }, id.clone())
        })
        .collect();
    *vocab = renamed;
    std::fs::write(&path, json.to_string()).unwrap();

    let (run, out) = p.transfer("auto", &[]);
    assert!(run.status.success(), "{}", stderr(&run));
    let report = read_json(&out.join("transfer_report.json"));
    let reason = report["auto_reason"].as_str().unwrap_or_default();
    assert_eq!(report["mode"], "align", "{reason}");
    assert!(
        reason.contains("cannot anchor") && reason.contains("20 tokens"),
        "{reason}"
    );

    let (run, out) = p.transfer("map", &["--mode", "map"]);
    let err = stderr(&run);
    assert!(!run.status.success() && !out.exists());
    assert!(
        err.starts_with("error:")
            && err.contains(s(&path))
            && err.contains(s(&p.source.join("tokenizer.json")))
            && err.contains("--mode align"),
        "{err}"
    );
}

#[test]
fn embeddings_with_no_direction_are_refused_naming_them() {
    let p = Pair::new();
    // Every row the same: centered, the anchors are zero and no map can be fitted (the update
    // would be sent to zero without a word).
    rewrite(&p.target.join("model.safetensors"), |tensors| {
        for t in tensors
            .iter_mut()
            .filter(|t| t.name == "model.embed_tokens.weight")
        {
            t.values.fill(0.5);
        }
    });
    let (run, out) = p.transfer("map", &["--mode", "map"]);
    let err = stderr(&run);
    assert!(!run.status.success() && !out.exists(), "{err}");
    assert!(
        err.contains("model.embed_tokens.weight")
            && err.contains(s(&p.target))
            && err.contains("no direction"),
        "{err}"
    );
}

#[test]
fn an_output_head_shorter_than_the_embedding_anchors_on_the_rows_it_has() {
    let p = Pair::new();
    // Untied heads, the target's of 200 rows beside a 256-row embedding: the second anchor
    // set is the shared tokens both heads hold.
    untie(&p.source, 256);
    untie(&p.target, 200);
    let (run, out) = p.transfer("map", &["--mode", "map"]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(out.join("adapter_model.safetensors").is_file());
    // The map was fitted on every shared token of the embeddings (the heads add their 200).
    let map = &common::cli::read_json(&out.join("transfer_report.json"))["map"];
    assert_eq!(map["shared_tokens"], 256, "{map}");
    let fit = map["residual_fit"].as_f64().unwrap();
    assert!(fit.is_finite() && (0.0..=1.5).contains(&fit), "{fit}");
}
