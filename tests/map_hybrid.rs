//! The map mode onto a hybrid model (Qwen3.5: linear attention in some layers, softmax attention
//! with a gated query in the others), on a target whose correspondence with the source is known
//! exactly: the source rewritten with its residual stream rotated, its norm gains folded into the
//! next weights, its softmax heads permuted within the GQA structure, its linear attention's
//! value heads within their key heads, its MLP neurons permuted, and, for a deeper target, its
//! layers repeated. From Qwen3.5 and from Qwen3 (softmax attention everywhere, no gate): the
//! adapter `map` writes must be the source adapter in the target's coordinates, the gate rows
//! moving with their heads (or empty where the source has no gate) and linear attention's heads
//! moving whole; what the map does not take is refused before any map is built.

mod common;
#[path = "map_hybrid/twin.rs"]
mod twin;

use std::collections::BTreeMap;
use std::path::Path;

use common::cli::*;
use common::*;
use loraxfer::io::adapter::Adapter;
use loraxfer::io::safetensors::FloatType;
use twin::*;

/// An adapter on the modules `pick` selects of the source model `model`.
fn write_adapter(dir: &Path, model: &Model, pick: &dyn Fn(usize, &str) -> bool, seed: u64) {
    let mut modules = BTreeMap::new();
    for l in 0..LAYERS {
        for (key, out, inp) in model.projections(l) {
            if pick(l, key) {
                let f = random_factors(out, inp, 4, 8.0, seed + l as u64, FloatType::F32);
                modules.insert(format!("model.layers.{l}.{key}"), f);
            }
        }
    }
    write_peft(dir, "source", 4, 8.0, serde_json::json!({}), &modules);
}

fn transfer(root: &Path, mode: &str, extra: &[&str]) -> std::process::Output {
    let path = |p: &str| root.join(p).to_str().unwrap().to_string();
    let (source, target, adapter, out) =
        (path("source"), path("target"), path("adapter"), path("out"));
    let mut args = vec![
        "transfer",
        "--source-base",
        &source,
        "--target-base",
        &target,
        "--adapter",
        &adapter,
        "--out",
        &out,
        "--mode",
        mode,
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    loraxfer(&args)
}

/// Maps an adapter from `family` onto its twin (target layer j from source layer `src_of[j]`;
/// `flip`: see [`write_pair`]) and checks every module against the source's update in the twin's
/// coordinates, and the report's depth map and heads (`extra`: more options).
fn check_twin(family: Family, src_of: &[usize], flip: bool, seed: u64, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let twin = write_pair(root, family, src_of, flip, seed);
    // Every projection the target has a counterpart for: softmax attention where the target
    // has it, linear attention (from Qwen3.5) where both have it, the MLP everywhere.
    let pick = |l: usize, key: &str| !key.starts_with("self_attn.") || full(l);
    write_adapter(
        &root.join("adapter"),
        &Model::source(family),
        &pick,
        seed + 10,
    );
    let out = transfer(root, "map", extra);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let src = Adapter::open(&root.join("adapter")).unwrap();
    let got = Adapter::open(&root.join("out")).unwrap();
    let mut checked = 0;
    for (j, &l) in src_of.iter().enumerate() {
        let at = format!("model.layers.{l}.");
        for name in src.modules.keys().filter(|n| n.starts_with(&at)) {
            let key = &name[at.len()..];
            let ds = update_of(&src, name);
            let want = twin.moved(key, &ds, l, family.gated(), None);
            let name_t = format!("model.layers.{j}.{key}");
            let have = update_of(&got, &name_t);
            let err = fro(&(&have - &want)) / fro(&want);
            assert!(err < 1e-4, "{name_t} (from {name}): relative error {err}");
            checked += 1;
        }
    }
    assert_eq!(checked, got.modules.len());
    let report = read_json(&root.join("out").join("transfer_report.json"));
    for (j, &l) in src_of.iter().enumerate() {
        assert_eq!(
            report["layer_map"][j.to_string()],
            l,
            "{}",
            report["layer_map"]
        );
    }
    // Heads matched where both layers have softmax attention, linear heads where both have
    // linear attention.
    let target = Model::twin(src_of);
    let layers = report["map"]["layers"].as_array().expect("map layers");
    assert_eq!(layers.len(), src_of.len());
    for layer in layers {
        let j = layer["target_layer"].as_u64().unwrap() as usize;
        let heads = layer["q_heads"].as_array().unwrap();
        assert_eq!(
            heads.len(),
            if target.full[j] { HEADS } else { 0 },
            "{layer}"
        );
        if target.full[j] {
            assert!(layer["head_similarity"].as_f64().unwrap() > 0.9, "{layer}");
        }
        let linear = &layer["linear_heads"];
        assert_eq!(
            linear.is_null(),
            target.full[j] || !family.gated(),
            "{layer}"
        );
        if !linear.is_null() {
            assert!(linear["similarity"].as_f64().unwrap() > 0.9, "{layer}");
            assert_eq!(
                linear["key_heads"],
                serde_json::json!(twin.key_heads),
                "{layer}"
            );
            assert_eq!(
                linear["value_heads"],
                serde_json::json!(twin.value_heads),
                "{layer}"
            );
        }
    }
}

const SAME_DEPTH: [usize; LAYERS] = [0, 1, 2, 3];
/// A deeper twin, not the evenly spread map (which takes 0 for layer 1 and 2 for layer 5): only
/// the depth program finds it.
const DEEPER: [usize; 8] = [0, 1, 1, 1, 2, 3, 3, 3];

#[test]
fn map_carries_a_qwen3_5_adapter_onto_its_twin_both_kinds_of_heads() {
    check_twin(Family::Qwen3_5, &SAME_DEPTH, false, 21, &[]);
}

#[test]
fn the_inner_fit_follows_flipped_value_coordinates_and_keeps_the_gates() {
    check_twin(
        Family::Qwen3_5,
        &SAME_DEPTH,
        true,
        25,
        &["--map-inner", "fit"],
    );
}

#[test]
fn map_carries_a_qwen3_adapter_onto_a_qwen3_5_twin_with_empty_gates() {
    check_twin(Family::Qwen3, &SAME_DEPTH, false, 22, &[]);
}

#[test]
fn the_depth_program_finds_a_deeper_hybrid_twin_layer_by_layer() {
    check_twin(Family::Qwen3_5, &DEEPER, false, 26, &[]);
    check_twin(Family::Qwen3, &DEEPER, false, 27, &[]);
}

/// `--mode auto` picks map for a deeper hybrid twin (the shapes differ, both models have a
/// vocabulary, map takes every update), and align, saying why, where map cannot take one.
#[test]
fn auto_picks_map_for_a_hybrid_pair_unless_an_update_has_no_mapping() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_pair(root, Family::Qwen3_5, &DEEPER, false, 28);
    let every = |_: usize, _: &str| true;
    write_adapter(
        &root.join("adapter"),
        &Model::source(Family::Qwen3_5),
        &every,
        7,
    );
    let auto = |extra: &[&str]| {
        let out = transfer(root, "auto", extra);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let report = read_json(&root.join("out").join("transfer_report.json"));
        let reason = report["auto_reason"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        (report["mode"].as_str().unwrap().to_string(), reason)
    };
    let (mode, reason) = auto(&[]);
    assert_eq!(mode, "map", "{reason}");
    // From the Qwen3.5 twin onto Qwen3: the query's gate has nowhere to go, so align, naming it.
    let qwen3 = tempfile::tempdir().unwrap();
    write_pair(qwen3.path(), Family::Qwen3, &SAME_DEPTH, false, 29);
    std::fs::remove_dir_all(root.join("source")).unwrap();
    std::fs::rename(root.join("target"), root.join("source")).unwrap();
    std::fs::rename(qwen3.path().join("source"), root.join("target")).unwrap();
    std::fs::remove_dir_all(root.join("adapter")).unwrap();
    let twin = Model::twin(&DEEPER);
    let mut modules = BTreeMap::new();
    for (l, &full) in twin.full.iter().enumerate() {
        for (key, out, inp) in twin.projections(l) {
            if key == "mlp.up_proj" || (full && key == "self_attn.q_proj") {
                let f = random_factors(out, inp, 4, 8.0, 30 + l as u64, FloatType::F32);
                modules.insert(format!("model.layers.{l}.{key}"), f);
            }
        }
    }
    write_peft(
        &root.join("adapter"),
        "twin",
        4,
        8.0,
        serde_json::json!({}),
        &modules,
    );
    let (mode, reason) = auto(&["--force"]);
    assert_eq!(mode, "align", "{reason}");
    assert!(
        reason.contains("map cannot take the adapter") && reason.contains("also updates the gate"),
        "{reason}"
    );
}

#[test]
fn map_refuses_linear_heads_of_other_sizes_and_a_gate_with_nowhere_to_go() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_pair(root, Family::Qwen3_5, &SAME_DEPTH, false, 23);
    // Linear attention whose value heads differ in size (4 of 6 against 8 of 3): refused, naming
    // the module and the modules that can go.
    let config = root.join("target").join("config.json");
    let mut c = read_json(&config);
    (c["linear_num_value_heads"], c["linear_value_head_dim"]) = (8.into(), 3.into());
    std::fs::write(&config, c.to_string()).unwrap();
    let qwen3_5 = Model::source(Family::Qwen3_5);
    let pick = |l: usize, key: &str| {
        key == "linear_attn.in_proj_qkv" || (full(l) && key == "self_attn.v_proj")
    };
    write_adapter(&root.join("adapter"), &qwen3_5, &pick, 5);
    let out = transfer(root, "map", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("`in_proj_qkv` is linear attention"), "{err}");
    assert!(
        err.contains("heads of 8 and 6 meet heads of 8 and 3"),
        "{err}"
    );
    assert!(err.contains("--modules v_proj"), "{err}");
    assert!(!root.join("out").exists());
    // A gated query onto a query without a gate: the Qwen3.5 twin as the source, a Qwen3 target.
    std::fs::rename(root.join("source"), root.join("first_source")).unwrap();
    std::fs::rename(root.join("target"), root.join("source")).unwrap();
    let mut c = read_json(&root.join("source").join("config.json"));
    (c["linear_num_value_heads"], c["linear_value_head_dim"]) = (4.into(), 6.into());
    std::fs::write(root.join("source").join("config.json"), c.to_string()).unwrap();
    std::fs::remove_dir_all(root.join("adapter")).unwrap();
    let qwen3 = tempfile::tempdir().unwrap();
    write_pair(qwen3.path(), Family::Qwen3, &SAME_DEPTH, false, 24);
    std::fs::rename(qwen3.path().join("source"), root.join("target")).unwrap();
    let pick = |l: usize, key: &str| full(l) && key == "self_attn.q_proj" || key == "mlp.up_proj";
    write_adapter(&root.join("adapter"), &qwen3_5, &pick, 6);
    let out = transfer(root, "map", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("`q_proj` also updates the gate"), "{err}");
    assert!(err.contains("--modules up_proj"), "{err}");
}
