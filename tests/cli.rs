//! End-to-end runs of the `loraxfer` binary on synthetic models: what a user sees (exit status,
//! stdout/stderr) and what lands on disk (the adapter and transfer_report.json), checked against
//! the inputs by parsing the safetensors files by hand.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

mod common;
use common::cli::*;
use common::PROJECTIONS;

const PEFT_PREFIX: &str = "base_model.model.";

impl Fixtures {
    /// A tiny-llama model (6 layers, hidden 96): a different architecture and different shapes.
    fn llama(&self) -> PathBuf {
        let dir = self.root.path().join("llama");
        synth("model", &dir, &["--like", "tiny-llama"]);
        dir
    }

    /// Transfers the fixture adapter from the source onto `target` into a new directory `name`;
    /// returns the output directory and the command's (stdout, stderr).
    fn transfer(&self, target: &Path, name: &str, extra: &[&str]) -> (PathBuf, String, String) {
        let out = self.root.path().join(name);
        let mut args = vec![
            "transfer",
            "--source-base",
            s(&self.source),
            "--target-base",
            s(target),
        ];
        args.extend(["--adapter", s(&self.adapter), "--out", s(&out)]);
        args.extend_from_slice(extra);
        let (stdout, stderr) = ok(&args);
        (out, stdout, stderr)
    }
}

impl Safetensors {
    fn names(&self) -> BTreeSet<String> {
        self.header
            .keys()
            .filter(|k| *k != "__metadata__")
            .cloned()
            .collect()
    }

    /// (dtype, shape) of a tensor.
    fn info(&self, name: &str) -> (String, Vec<u64>) {
        let e = &self.header[name];
        let shape = e["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        (e["dtype"].as_str().unwrap().to_string(), shape)
    }

    fn bytes(&self, name: &str) -> &[u8] {
        let o = &self.header[name]["data_offsets"];
        &self.data[o[0].as_u64().unwrap() as usize..o[1].as_u64().unwrap() as usize]
    }

    /// The values of an f32 tensor.
    fn f32s(&self, name: &str) -> Vec<f32> {
        assert_eq!(self.info(name).0, "F32", "{name}");
        self.bytes(name)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

fn adapter_weights(dir: &Path) -> Safetensors {
    Safetensors::read(&dir.join("adapter_model.safetensors"))
}

fn report(dir: &Path) -> Value {
    read_json(&dir.join("transfer_report.json"))
}

fn rows(report: &Value) -> &Vec<Value> {
    report["modules"].as_array().expect("modules is an array")
}

/// The lora_B key of a report row (its target module, as PEFT names it).
fn lora_b_key(row: &Value) -> String {
    format!(
        "{PEFT_PREFIX}{}.lora_B.weight",
        row["target_module"].as_str().unwrap()
    )
}

/// Skipped modules must not change the model: their lora_B is all zeros.
fn assert_skipped_with_zero_b(out: &Safetensors, row: &Value, reason_mentions: &str) {
    assert_eq!(row["transferred"], false, "{row}");
    let reason = row["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(reason_mentions),
        "reason `{reason}` lacks `{reason_mentions}`"
    );
    let b = out.f32s(&lora_b_key(row));
    assert!(
        b.iter().all(|&v| v == 0.0),
        "skipped module {} has a non-zero lora_B",
        row["target_module"]
    );
}

#[test]
fn demo_runs_end_to_end() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("demo");
    let (stdout, stderr) = ok(&["demo", "--out", s(&dir)]);
    assert!(stdout.contains("transferred"), "{stdout}");
    // Progress where stderr is not a terminal (a batch log): the choice of auto as soon as it is
    // made, then a line at the start and the end of each stage.
    let lines: Vec<&str> = stderr.lines().collect();
    let at = |prefix: &str| lines.iter().position(|l| l.starts_with(prefix));
    let (chose, first, last) = (
        at("auto chose rotate: "),
        at("transfer: 0/28 modules, "),
        at("transfer: 28/28 modules, "),
    );
    assert!(chose.is_some() && chose < first && first < last, "{stderr}");
    assert!(dir.join("transferred/adapter_model.safetensors").is_file());
    let report = report(&dir.join("transferred"));
    assert!(!rows(&report).is_empty(), "the demo report has no modules");
}

#[test]
fn transfer_to_a_derivative_projects_every_module() {
    let f = Fixtures::new();
    // Fields of the source's config that would mislead PEFT about the target.
    let source_config = f.adapter.join("adapter_config.json");
    let mut original = read_json(&source_config);
    original["target_modules"] =
        serde_json::json!(r".*\.layers\.[0-1]\.self_attn\.(q_proj|v_proj)");
    original["exclude_modules"] = serde_json::json!(["down_proj"]);
    original["revision"] = serde_json::json!("0123456789abcdef0123456789abcdef01234567");
    std::fs::write(&source_config, original.to_string()).unwrap();
    let (out, stdout, _) = f.transfer(&f.target, "out", &["--mode", "project"]);
    assert!(stdout.contains("transferred 28 of 28"), "{stdout}");
    let report = report(&out);

    // The top-level keys a consumer relies on; `summary` is the only extra one allowed.
    let wanted = [
        "source_base",
        "target_base",
        "adapter",
        "mode",
        "rank",
        "oversample",
        "power_iters",
        "seed",
        "threshold",
        "device",
        "layer_map",
        "timings_ms",
        "modules",
    ];
    let keys: BTreeSet<&str> = report
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for k in wanted {
        assert!(keys.contains(k), "report lacks `{k}`");
    }
    let extra: Vec<&&str> = keys
        .iter()
        .filter(|k| !wanted.contains(k) && **k != "summary")
        .collect();
    assert!(
        extra.is_empty(),
        "unexpected top-level report keys: {extra:?}"
    );
    assert_eq!(report["target_base"], s(&f.target));

    let rows = rows(&report);
    assert_eq!(rows.len(), 28, "4 layers x 7 projections");
    for row in rows {
        for k in [
            "source_key",
            "target_key",
            "source_shape",
            "target_shape",
            "mode",
            "similarity_u",
            "similarity_v",
            "similarity",
            "transferred",
            "energy_kept",
        ] {
            assert!(row.get(k).is_some(), "row lacks `{k}`: {row}");
        }
        assert_eq!(row["mode"], "project", "every module projected: {row}");
        assert_eq!(row["transferred"], true, "{row}");
        let (u, v, sim) = (
            row["similarity_u"].as_f64(),
            row["similarity_v"].as_f64(),
            row["similarity"].as_f64(),
        );
        let (u, v, sim) = (u.unwrap(), v.unwrap(), sim.unwrap());
        assert!(
            (sim - (u + v) / 2.0).abs() < 1e-9,
            "similarity is not the mean of u and v: {row}"
        );
        // A 5% drift keeps the subspaces close; a similarity never exceeds 1.
        assert!(
            sim > 0.5 && sim <= 1.0,
            "similarity {sim} outside (0.5, 1]: {row}"
        );
    }

    let config = read_json(&out.join("adapter_config.json"));
    let original = read_json(&f.adapter.join("adapter_config.json"));
    assert_eq!(config["base_model_name_or_path"], s(&f.target));
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["revision"], serde_json::Value::Null);
    assert_eq!(config["exclude_modules"], serde_json::Value::Null);
    // The modules written, by full name, whatever the source's config said: 4 layers × 7.
    let mut targets: Vec<String> = (0..4)
        .flat_map(|l| {
            common::PROJECTIONS.iter().enumerate().map(move |(i, p)| {
                // q, k, v, o in self_attn; gate, up, down in mlp.
                let block = if i < 4 { "self_attn" } else { "mlp" };
                format!("model.layers.{l}.{block}.{p}")
            })
        })
        .collect();
    let mut written: Vec<String> = config["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    written.sort();
    targets.sort();
    assert_eq!(written, targets);
    assert_eq!(config["r"], original["r"]);
    assert_eq!(config["lora_alpha"], original["lora_alpha"]);

    // Same model shapes, so the new adapter is a drop-in replacement of the old one.
    let (new, old) = (adapter_weights(&out), adapter_weights(&f.adapter));
    assert_eq!(new.names(), old.names());
    for name in old.names() {
        assert_eq!(new.info(&name), old.info(&name), "{name}");
    }
}

#[test]
fn cross_architecture_transfer_aligns_and_maps_layers() {
    let f = Fixtures::new();
    let llama = f.llama();
    let (out, _, _) = f.transfer(&llama, "out", &["--mode", "align"]);
    let report = report(&out);

    // 6 target layers from 4 source layers: j -> round(j * 3 / 5).
    assert_eq!(
        report["layer_map"],
        json!({"0": 0, "1": 1, "2": 1, "3": 2, "4": 2, "5": 3})
    );
    let rows = rows(&report);
    assert_eq!(rows.len(), 6 * 7);
    for row in rows {
        assert_eq!(row["mode"], "align", "every module aligned: {row}");
        assert!(
            row["similarity"].is_null(),
            "no similarity between spaces of different sizes: {row}"
        );
    }

    // Every target projection gets factors shaped for tiny-llama: B [out, r], A [r, in].
    let base = Safetensors::read(&llama.join("model.safetensors"));
    let new = adapter_weights(&out);
    let r = read_json(&out.join("adapter_config.json"))["r"]
        .as_u64()
        .unwrap();
    let mut expected = BTreeSet::new();
    for weight in base.names().into_iter().filter(|n| {
        PROJECTIONS
            .iter()
            .any(|p| n.ends_with(&format!("{p}.weight")))
    }) {
        let (_, shape) = base.info(&weight);
        let module = weight.trim_end_matches(".weight");
        let (a, b) = (
            format!("{PEFT_PREFIX}{module}.lora_A.weight"),
            format!("{PEFT_PREFIX}{module}.lora_B.weight"),
        );
        assert_eq!(new.info(&a).1, vec![r, shape[1]], "{a}");
        assert_eq!(new.info(&b).1, vec![shape[0], r], "{b}");
        expected.extend([a, b]);
    }
    assert_eq!(expected.len(), 6 * 7 * 2);
    assert_eq!(
        new.names(),
        expected,
        "the output adapter has exactly the target's projections"
    );

    // Source layers 1 and 2 serve two target layers each: their bases are computed once and
    // held for the second (a fresh cache sees each distinct decomposition once, and is never
    // asked again), and the adapter is the same.
    let cache = f.root.path().join("cache");
    let (cached, _, _) = f.transfer(
        &llama,
        "cached",
        &["--mode", "align", "--cache-dir", s(&cache)],
    );
    let use_of = read_json(&cached.join("transfer_report.json"))["basis_cache"].clone();
    assert_eq!(use_of["misses"], 4 * 7 + 6 * 7, "{use_of}");
    assert_eq!(use_of["hits"], 0, "{use_of}");
    let again = adapter_weights(&cached);
    assert!(again.header == new.header && again.data == new.data);
}

#[test]
fn map_mode_crosses_families_and_needs_both_vocabularies() {
    let f = Fixtures::new();
    let llama = f.llama();
    let (out, _, _) = f.transfer(&llama, "mapped", &["--mode", "map"]);
    let report = report(&out);
    let map = &report["map"];
    assert!(map["shared_tokens"].as_u64().unwrap() > 0, "{map}");
    assert_eq!(map["layers"].as_array().unwrap().len(), 6);
    for row in rows(&report) {
        assert_eq!(row["mode"], "map", "{row}");
        assert!(row["residual_fit"].as_f64().is_some(), "{row}");
        assert!(row["matched_similarity"].as_f64().is_some(), "{row}");
        assert!(row["energy_kept"].as_f64().unwrap() > 0.0, "{row}");
    }
    // The output loads as an adapter of the target's shapes.
    let weights = adapter_weights(&out);
    assert_eq!(weights.names().len(), 6 * 7 * 2);
    // Without a vocabulary there is nothing to pair the residual streams on.
    std::fs::remove_file(llama.join("tokenizer.json")).unwrap();
    let failed = loraxfer(&[
        "transfer",
        "--source-base",
        s(&f.source),
        "--target-base",
        s(&llama),
        "--adapter",
        s(&f.adapter),
        "--out",
        s(&f.root.path().join("no-vocab")),
        "--mode",
        "map",
    ]);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success());
    assert!(stderr.contains("tokenizer.json"), "{stderr}");
    assert!(!f.root.path().join("no-vocab").exists());
}

/// `auto` picks one mode for the pair: rotate for equal shapes, map across shapes, align when a
/// vocabulary is missing; the report and the output say which and why.
#[test]
fn auto_rotates_equal_shapes_maps_across_shapes_and_aligns_without_a_vocabulary() {
    let f = Fixtures::new();
    let llama = f.llama();
    for (target, mode, why) in [
        (&f.target, "rotate", "equal depths"),
        (&llama, "map", "depths differ"),
    ] {
        let (out, stdout, _) = f.transfer(target, mode, &[]);
        let report = report(&out);
        assert_eq!(report["mode"], mode, "{stdout}");
        let reason = report["auto_reason"].as_str().unwrap();
        assert!(reason.contains(why), "{reason}");
        assert!(stdout.contains(&format!("auto chose {mode}: ")), "{stdout}");
        let rows = rows(&report);
        assert!(!rows.is_empty());
        assert!(rows.iter().all(|row| row["mode"] == mode), "{rows:?}");
    }
    std::fs::remove_file(llama.join("tokenizer.json")).unwrap();
    let (out, _, _) = f.transfer(&llama, "aligned", &[]);
    let aligned = report(&out);
    assert_eq!(aligned["mode"], "align");
    let reason = aligned["auto_reason"].as_str().unwrap();
    assert!(reason.contains("tokenizer.json"), "{reason}");
    // A named mode is not second-guessed and records no reason.
    let (out, _, _) = f.transfer(&f.target, "named", &["--mode", "copy"]);
    assert!(report(&out).get("auto_reason").is_none());
}

#[test]
fn copy_mode_onto_the_same_model_keeps_the_factors() {
    let f = Fixtures::new();
    let (out, _, _) = f.transfer(&f.source, "out", &["--mode", "copy"]);
    let (new, old) = (adapter_weights(&out), adapter_weights(&f.adapter));
    assert_eq!(new.names(), old.names());
    for name in old.names() {
        assert_eq!(new.info(&name), old.info(&name), "{name}");
        assert!(
            new.bytes(&name) == old.bytes(&name),
            "{name} changed in copy mode"
        );
    }
    // No bases are computed, so the default k = 256 above the 64-wide weights caps nothing;
    // with a threshold copy decomposes to filter, and then k is capped.
    assert_eq!(report(&out)["summary"]["rank_capped"], 0);
    let (out, _, _) = f.transfer(
        &f.source,
        "filtered",
        &["--mode", "copy", "--threshold", "0.5"],
    );
    assert_eq!(report(&out)["summary"]["rank_capped"], 28);
}

#[test]
fn rotate_keeps_the_whole_update_on_a_drifted_target_and_gives_it_back_on_the_same_model() {
    let f = Fixtures::new();
    let (out, _, _) = f.transfer(&f.target, "rotated", &["--mode", "rotate", "--rank", "16"]);
    let report = report(&out);
    for row in rows(&report) {
        assert_eq!(row["mode"], "rotate", "{row}");
        let kept = row["energy_kept"].as_f64().unwrap();
        assert!((kept - 1.0).abs() < 1e-5, "rotate lost energy: {row}");
    }
    // It moves the update (a drifted target is not the source) ...
    let (new, old) = (adapter_weights(&out), adapter_weights(&f.adapter));
    let moved = old
        .names()
        .iter()
        .filter(|n| n.contains("lora_B"))
        .filter(|n| {
            let (a, b) = (new.f32s(n), old.f32s(n));
            a.iter()
                .zip(&b)
                .any(|(x, y)| (x - y).abs() > 1e-4 * y.abs().max(1e-2))
        })
        .count();
    assert!(moved > 0, "rotate onto a drifted target changed nothing");
    // ... and onto the source itself it is the copy, to rounding.
    let (same, _, _) = f.transfer(&f.source, "same", &["--mode", "rotate", "--rank", "16"]);
    let same = adapter_weights(&same);
    for name in old.names() {
        let (a, b) = (same.f32s(&name), old.f32s(&name));
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(err <= 1e-4 * scale, "{name} moved by {err} (scale {scale})");
    }
}

#[test]
fn threshold_skips_dissimilar_modules() {
    let f = Fixtures::new();
    let (out, _, _) = f.transfer(&f.target, "out", &["--threshold", "0.999"]);
    let report = report(&out);
    let weights = adapter_weights(&out);
    let skipped: Vec<&Value> = rows(&report)
        .iter()
        .filter(|r| r["transferred"] == false)
        .collect();
    assert!(
        !skipped.is_empty(),
        "a 5% drift puts some similarities below 0.999"
    );
    for row in &skipped {
        assert_skipped_with_zero_b(&weights, row, "threshold");
        assert!(row["similarity"].as_f64().unwrap() < 0.999, "{row}");
    }
    // Transferred modules are exactly those at or above the threshold.
    for row in rows(&report).iter().filter(|r| r["transferred"] == true) {
        assert!(row["similarity"].as_f64().unwrap() >= 0.999, "{row}");
    }
}

#[test]
fn modules_option_transfers_only_the_listed_types() {
    let f = Fixtures::new();
    let (out, _, _) = f.transfer(&f.target, "out", &["--modules", "q_proj,v_proj"]);
    let report = report(&out);
    let weights = adapter_weights(&out);
    let mut transferred = BTreeMap::new();
    for row in rows(&report) {
        let module = row["module"].as_str().unwrap();
        if module == "q_proj" || module == "v_proj" {
            assert_eq!(row["transferred"], true, "{row}");
            *transferred.entry(module.to_string()).or_insert(0) += 1;
            assert!(
                weights.f32s(&lora_b_key(row)).iter().any(|&v| v != 0.0),
                "{row}"
            );
        } else {
            assert_skipped_with_zero_b(&weights, row, "--modules");
        }
    }
    assert_eq!(
        transferred,
        BTreeMap::from([("q_proj".to_string(), 4), ("v_proj".to_string(), 4)])
    );
}

#[test]
fn timings_are_printed_on_stderr() {
    let f = Fixtures::new();
    let (_, stdout, stderr) = f.transfer(&f.target, "out", &["--timings"]);
    for phase in ["sketch", "orth", "eig", "total"] {
        assert!(
            stderr.contains(phase),
            "stderr lacks phase `{phase}`:\n{stderr}"
        );
    }
    assert!(
        !stdout.contains("orth"),
        "timings belong on stderr, not stdout"
    );
}

#[test]
fn inspect_json_lists_every_pair() {
    let f = Fixtures::new();
    let (stdout, _) = ok(&[
        "inspect",
        "--source-base",
        s(&f.source),
        "--target-base",
        s(&f.target),
        "--json",
    ]);
    let ins: Value = serde_json::from_str(&stdout).expect("inspect --json prints JSON only");
    assert_eq!(ins["layer_map"], json!({"0": 0, "1": 1, "2": 2, "3": 3}));
    let pairs = ins["pairs"].as_array().expect("pairs");
    assert_eq!(pairs.len(), 28, "4 layers x 7 projections");
    let modules: BTreeSet<&str> = pairs
        .iter()
        .map(|p| p["module"].as_str().unwrap())
        .collect();
    assert_eq!(modules, PROJECTIONS.into_iter().collect());
    assert!(
        pairs
            .iter()
            .all(|p| p["similarity"].as_f64().is_some_and(|x| x > 0.5)),
        "{stdout}"
    );
}

#[test]
fn transfers_are_deterministic() {
    let f = Fixtures::new();
    let (one, _, _) = f.transfer(&f.target, "one", &["--rank", "32"]);
    let (two, _, _) = f.transfer(&f.target, "two", &["--rank", "32"]);
    let bytes = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert!(
        bytes(&one) == bytes(&two),
        "two identical runs wrote different adapters"
    );
    // Timings differ between runs; the per-module numbers must not.
    assert_eq!(report(&one)["modules"], report(&two)["modules"]);
}

/// `loraxfer info` says what this build and machine can do, and why `auto` picks what it picks.
#[test]
fn info_reports_kernels_driver_and_the_auto_choice() {
    let info = |no_tensor_cores: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_loraxfer"));
        cmd.arg("info").env_remove("LORAXFER_NO_TENSOR_CORES");
        if no_tensor_cores {
            cmd.env("LORAXFER_NO_TENSOR_CORES", "1");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = info(false);
    assert!(out.starts_with("loraxfer "), "{out}");
    assert!(out.contains("backends: cpu"), "{out}");
    assert!(out.contains("--device auto picks: "), "{out}");
    if loraxfer::backend::cuda::kernels_compiled() {
        assert!(out.contains("compiled by nvcc"), "{out}");
        assert!(out.contains("tensor cores: on"), "{out}");
        assert!(info(true).contains("tensor cores: off"));
    } else {
        assert!(out.contains("built without CUDA kernels"), "{out}");
    }
    if loraxfer::backend::cuda::unavailable_reason().is_some() {
        assert!(out.contains("--device auto picks: cpu ("), "{out}");
    }
}
