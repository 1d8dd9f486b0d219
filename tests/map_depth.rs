//! The map mode's depth program on a model whose layers are known: the target is the source with
//! some layers dropped (and its residual stream rotated), so the right depth map is the kept
//! layers, which the evenly spread default gets wrong.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::cli::*;
use common::{projection_key as key, *};
use faer::Mat;
use loraxfer::io::safetensors::FloatType;

const D: usize = 32;
const INTER: usize = 48;
const VOCAB: usize = 200;

fn model(layers: usize) -> TinyModel {
    TinyModel {
        model_type: "llama",
        hidden: D,
        intermediate: INTER,
        layers,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
    }
}

fn tokenizer(dir: &Path) {
    word_level_tokenizer(dir, VOCAB, &|i| i);
}

/// Four query heads and two key-value heads of 8.
fn shapes(p: &str) -> (usize, usize) {
    projection_shape(p, D, (4, 2, 8), INTER)
}

/// Writes the source (`layers` layers) and the target (the source's layers `kept`, rotated).
fn write_pair(root: &Path, layers: usize, kept: &[usize], seed: u64) {
    let q = orthonormal(D, D, seed, 3);
    let mut src = BTreeMap::new();
    let mut tgt = BTreeMap::new();
    let put = |m: &mut BTreeMap<String, (Vec<f32>, Vec<usize>)>, k: String, w: &Mat<f32>| {
        let shape = if w.nrows() == 1 {
            vec![w.ncols()]
        } else {
            vec![w.nrows(), w.ncols()]
        };
        m.insert(k, (row_major(w), shape));
    };
    let e = gaussian(VOCAB, D, seed, 1);
    put(&mut src, "model.embed_tokens.weight".into(), &e);
    put(
        &mut tgt,
        "model.embed_tokens.weight".into(),
        &(&e * q.transpose()),
    );
    let ones = Mat::from_fn(1, D, |_, _| 1.0f32);
    for m in [&mut src, &mut tgt] {
        put(m, "model.norm.weight".into(), &ones);
    }
    let mut modules = BTreeMap::new();
    for l in 0..layers {
        for (i, p) in PROJECTIONS.iter().enumerate() {
            let (o, inp) = shapes(p);
            let w = gaussian(o, inp, seed, 10 * (l as u64 + 1) + i as u64);
            put(&mut src, format!("{}.weight", key(l, p)), &w);
            let f = random_factors(o, inp, 4, 8.0, seed + l as u64, FloatType::F32);
            modules.insert(key(l, p), f);
            if let Some(j) = kept.iter().position(|&k| k == l) {
                let t = if matches!(*p, "o_proj" | "down_proj") {
                    &q * &w
                } else {
                    &w * q.transpose()
                };
                put(&mut tgt, format!("{}.weight", key(j, p)), &t);
            }
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            put(&mut src, format!("model.layers.{l}.{norm}.weight"), &ones);
            if let Some(j) = kept.iter().position(|&k| k == l) {
                put(&mut tgt, format!("model.layers.{j}.{norm}.weight"), &ones);
            }
        }
    }
    let (sd, td) = (root.join("source"), root.join("target"));
    write_checkpoint(&sd, &model(layers), &src, FloatType::F32);
    write_checkpoint(&td, &model(kept.len()), &tgt, FloatType::F32);
    tokenizer(&sd);
    tokenizer(&td);
    write_peft(
        &root.join("adapter"),
        "source",
        4,
        8.0,
        serde_json::json!({}),
        &modules,
    );
}

fn transfer(root: &Path, out: &str, extra: &[&str]) -> serde_json::Value {
    let [source, target, adapter, out] = ["source", "target", "adapter", out].map(|n| root.join(n));
    let mut args = vec![
        "transfer",
        "--source-base",
        s(&source),
        "--target-base",
        s(&target),
        "--adapter",
        s(&adapter),
        "--mode",
        "map",
        "--device",
        "cpu",
    ];
    args.extend_from_slice(&["--out", s(&out)]);
    args.extend_from_slice(extra);
    ok(&args);
    read_json(&out.join("transfer_report.json"))
}

fn layer_map(report: &serde_json::Value) -> Vec<u64> {
    let m = report["layer_map"].as_object().unwrap();
    (0..m.len())
        .map(|j| m[&j.to_string()].as_u64().unwrap())
        .collect()
}

#[test]
fn the_depth_program_finds_the_kept_layers() {
    let dir = tempfile::tempdir().unwrap();
    let kept = [0, 2, 3, 4];
    write_pair(dir.path(), 5, &kept, 21);
    let report = transfer(dir.path(), "out", &[]);
    assert_eq!(layer_map(&report), vec![0, 2, 3, 4]);
    let depth = &report["map"]["depth"];
    let (chosen, linear) = (
        depth["chosen_score"].as_f64().unwrap(),
        depth["linear_score"].as_f64().unwrap(),
    );
    assert!(chosen > 0.99 && chosen > linear + 0.05, "{depth}");
    // The kept layers correspond exactly, so their matchings are exact too.
    for layer in report["map"]["layers"].as_array().unwrap() {
        assert!(
            layer["neuron_similarity"].as_f64().unwrap() > 0.99,
            "{layer}"
        );
    }
    // The ablation spreads the layers evenly (round(j·4/3): 0, 1, 3, 4), and a layer-map file
    // overrides the program.
    let linear_report = transfer(dir.path(), "out-linear", &["--map-depth", "linear"]);
    assert_eq!(layer_map(&linear_report), vec![0, 1, 3, 4]);
    assert!(linear_report["map"]["depth"].is_null());
    let file = dir.path().join("layers.json");
    std::fs::write(&file, r#"{"1": 1}"#).unwrap();
    let forced = transfer(dir.path(), "out-file", &["--layer-map", s(&file)]);
    assert_eq!(layer_map(&forced), vec![0, 1, 3, 4]);
}

/// Runs a map transfer of the pair through the library with a progress sink that records every
/// step and, when `stop_at` is reached, sets the cancel flag (as a raising Python callback or
/// Ctrl-C does).
fn map_job(
    root: &Path,
    out: &str,
    stop_at: Option<(&'static str, u64)>,
) -> (
    loraxfer::error::Result<loraxfer::transfer::report::Report>,
    Vec<(String, u64, u64)>,
) {
    use loraxfer::progress::{Progress, Step};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let seen = Arc::new(Mutex::new(Vec::new()));
    let cancel = Arc::new(AtomicBool::new(false));
    let (sink_seen, sink_cancel) = (seen.clone(), cancel.clone());
    let progress = Progress {
        sink: Some(Arc::new(move |s: Step<'_>| {
            sink_seen
                .lock()
                .unwrap()
                .push((s.stage.to_string(), s.done, s.total));
            if stop_at == Some((s.stage, s.done)) {
                sink_cancel.store(true, Ordering::Relaxed);
            }
        })),
        cancel: Some(cancel),
        ..Progress::default()
    };
    let job = loraxfer::transfer::Job {
        hub: Default::default(),
        source_base: root.join("source"),
        target_base: root.join("target"),
        adapter: root.join("adapter"),
        out: root.join(out),
        options: loraxfer::plan::Options {
            mode: loraxfer::modes::Mode::Map,
            rank: 8,
            oversample: 4,
            ..Default::default()
        },
        layer_map_file: None,
        device: loraxfer::backend::Device::Cpu,
        cache_dir: None,
        force: false,
        gguf_adapter: false,
        fused_experts: false,
        progress,
    };
    let report = loraxfer::transfer::run(&job);
    let seen = seen.lock().unwrap().clone();
    (report, seen)
}

/// The steps of one stage, in the order they arrived.
fn stage(seen: &[(String, u64, u64)], name: &str) -> Vec<(u64, u64)> {
    seen.iter()
        .filter(|s| s.0 == name)
        .map(|s| (s.1, s.2))
        .collect()
}

#[test]
fn the_map_stages_report_progress_and_stop_when_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    write_pair(dir.path(), 5, &[0, 2, 3, 4], 21);
    // Residual: the embeddings' anchor set (no untied output embeddings), then the polar factor;
    // depth: the signatures of 5 source and 4 target layers; then map: the 4 target layers, and
    // with them the 28 modules, a layer's 7 once its map is built. Each stage counts from 0 to
    // its total.
    let (report, seen) = map_job(dir.path(), "out", None);
    report.unwrap();
    let order: Vec<&str> = seen.iter().map(|s| s.0.as_str()).collect();
    let first = |name: &str| order.iter().position(|s| *s == name).unwrap();
    assert!(first("residual") < first("depth"));
    assert!(first("depth") < first("map") && first("map") < first("transfer"));
    assert_eq!(
        stage(&seen, "residual"),
        (0..=2).map(|d| (d, 2)).collect::<Vec<_>>()
    );
    assert_eq!(
        stage(&seen, "depth"),
        (0..=9).map(|d| (d, 9)).collect::<Vec<_>>()
    );
    assert_eq!(
        stage(&seen, "map"),
        (0..=4).map(|d| (d, 4)).collect::<Vec<_>>()
    );
    assert_eq!(
        stage(&seen, "transfer"),
        (0..=28).map(|d| (d, 28)).collect::<Vec<_>>()
    );
    // Layer by layer: the modules of a layer run after its map is built, before the next one.
    let at = |name: &str, done: u64| {
        seen.iter()
            .position(|s| s.0 == name && s.1 == done)
            .unwrap()
    };
    for layer in 1..=4u64 {
        assert!(at("map", layer) < at("transfer", 7 * (layer - 1) + 1));
        if layer < 4 {
            assert!(at("transfer", 7 * layer) < at("map", layer + 1));
        }
    }

    // Cancelled inside each map stage: the job stops at the next step, before any module has
    // run, and writes nothing.
    for (at, out) in [
        (("residual", 1), "cancel-residual"),
        (("depth", 3), "cancel-depth"),
        (("map", 1), "cancel-map"),
    ] {
        let (report, seen) = map_job(dir.path(), out, Some(at));
        assert!(
            matches!(report, Err(loraxfer::error::Error::Cancelled)),
            "{at:?}: {report:?}"
        );
        assert_eq!(
            stage(&seen, at.0).last().map(|s| s.0),
            Some(at.1),
            "{seen:?}"
        );
        assert!(
            stage(&seen, "transfer").iter().all(|s| s.0 == 0),
            "{seen:?}"
        );
        assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(out)));
    }
}
