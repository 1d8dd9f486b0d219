//! Transfers through the architecture tables: fused projections (Phi-3's qkv_proj, gate_up_proj)
//! are split and re-fused with the right rows, ranks and scales; Gemma 3's nested layer prefix is
//! found. (The tables as data: `tests/architecture_tables.rs`.)

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use faer::Mat;
use loraxfer::arch;
use loraxfer::io::adapter::{Adapter, LoraTensors};
use loraxfer::io::checkpoint::Checkpoint;
use loraxfer::io::safetensors::FloatType;
use loraxfer::modes::Mode;
use loraxfer::plan::Options;
use loraxfer::transfer;

const DIMS: (usize, usize, usize, usize, usize) = (32, 48, 4, 2, 8); // hidden, inter, heads, kv, head_dim

fn tiny(model_type: &'static str, layers: usize) -> TinyModel {
    let (hidden, intermediate, heads, kv_heads, head_dim) = DIMS;
    TinyModel {
        model_type,
        hidden,
        intermediate,
        layers,
        heads,
        kv_heads,
        head_dim,
    }
}

/// Unfused projections of one layer: (name, out, in).
fn projections() -> Vec<(&'static str, usize, usize)> {
    let (h, i, heads, kv, d) = DIMS;
    vec![
        ("self_attn.q_proj", heads * d, h),
        ("self_attn.k_proj", kv * d, h),
        ("self_attn.v_proj", kv * d, h),
        ("self_attn.o_proj", h, heads * d),
        ("mlp.gate_proj", i, h),
        ("mlp.up_proj", i, h),
        ("mlp.down_proj", h, i),
    ]
}

/// Random llama-layout weights under `prefix`.
fn llama_weights(
    prefix: &str,
    layers: usize,
    seed: u64,
) -> BTreeMap<String, (Vec<f32>, Vec<usize>)> {
    let mut t = BTreeMap::new();
    for l in 0..layers {
        for (s, (name, out, inp)) in projections().into_iter().enumerate() {
            let w = gaussian(out, inp, seed, (l * 10 + s) as u64);
            t.insert(
                format!("{prefix}.{l}.{name}.weight"),
                (
                    row_major(&w).iter().map(|x| x * 0.05).collect(),
                    vec![out, inp],
                ),
            );
        }
    }
    t
}

/// The same weights with q,k,v and gate,up stacked as Phi-3 stores them.
fn fuse_to_phi3(
    llama: &BTreeMap<String, (Vec<f32>, Vec<usize>)>,
    layers: usize,
) -> BTreeMap<String, (Vec<f32>, Vec<usize>)> {
    let mut t = BTreeMap::new();
    let get = |l: usize, n: &str| llama[&format!("model.layers.{l}.{n}.weight")].clone();
    for l in 0..layers {
        for (fused, parts) in [
            (
                "self_attn.qkv_proj",
                vec!["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            ),
            ("mlp.gate_up_proj", vec!["mlp.gate_proj", "mlp.up_proj"]),
        ] {
            let mut data = Vec::new();
            let mut rows = 0;
            let mut cols = 0;
            for p in parts {
                let (d, s) = get(l, p);
                data.extend(d);
                rows += s[0];
                cols = s[1];
            }
            t.insert(
                format!("model.layers.{l}.{fused}.weight"),
                (data, vec![rows, cols]),
            );
        }
        for n in ["self_attn.o_proj", "mlp.down_proj"] {
            t.insert(format!("model.layers.{l}.{n}.weight"), get(l, n));
        }
    }
    t
}

fn run(
    source: &Path,
    target: &Path,
    adapter: &Path,
    out: &Path,
    mode: Mode,
) -> transfer::report::Report {
    run_k(source, target, adapter, out, mode, 8)
}

fn run_k(
    source: &Path,
    target: &Path,
    adapter: &Path,
    out: &Path,
    mode: Mode,
    rank: usize,
) -> transfer::report::Report {
    let options = Options {
        mode,
        rank,
        oversample: 4,
        ..Options::default()
    };
    let job = cpu_job(source, target, adapter, out, options);
    transfer::run(&job).unwrap()
}

fn rows(m: &Mat<f32>, start: usize, len: usize) -> Mat<f32> {
    m.subrows(start, len).to_owned()
}

struct Fixture {
    _dir: tempfile::TempDir,
    llama: PathBuf,
    phi3: PathBuf,
    adapter: PathBuf,
    root: PathBuf,
}

/// A 2-layer llama, the same weights as a Phi-3 checkpoint, and a llama adapter whose k_proj has
/// its own alpha and v_proj its own rank, so re-fusion must reconcile scales and ranks.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let weights = llama_weights("model.layers", 2, 1);
    write_checkpoint(
        &root.join("llama"),
        &tiny("llama", 2),
        &weights,
        FloatType::F32,
    );
    write_checkpoint(
        &root.join("phi3"),
        &tiny("phi3", 2),
        &fuse_to_phi3(&weights, 2),
        FloatType::F32,
    );
    let mut modules = BTreeMap::new();
    for l in 0..2 {
        for (s, (name, out, inp)) in projections().into_iter().enumerate() {
            let r = if name.ends_with("v_proj") { 8 } else { 4 };
            let alpha = if name.ends_with("k_proj") { 64.0 } else { 8.0 };
            modules.insert(
                format!("model.layers.{l}.{name}"),
                random_factors(out, inp, r, alpha, (l * 7 + s) as u64, FloatType::F32),
            );
        }
    }
    let extra =
        serde_json::json!({"rank_pattern": {"v_proj": 8}, "alpha_pattern": {"k_proj": 64.0}});
    write_peft(&root.join("adapter"), "llama", 4, 8.0, extra, &modules);
    Fixture {
        llama: root.join("llama"),
        phi3: root.join("phi3"),
        adapter: root.join("adapter"),
        root,
        _dir: dir,
    }
}

#[test]
fn unfused_to_fused_refuses_parts_into_blocks_with_their_scales() {
    let f = fixture();
    let report = run(
        &f.llama,
        &f.phi3,
        &f.adapter,
        &f.root.join("out"),
        Mode::Copy,
    );
    // 2 layers × (q,k,v + o + gate,up + down) = 14 units.
    assert_eq!(report.modules.len(), 14);
    let src = Adapter::open(&f.adapter).unwrap();
    let out = Adapter::open(&f.root.join("out")).unwrap();
    let (_, _, heads, kv, d) = DIMS;
    for l in 0..2 {
        let qkv = format!("model.layers.{l}.self_attn.qkv_proj");
        assert_eq!(
            out.modules[&qkv].r,
            4 + 4 + 8,
            "fused rank is the sum of the parts' ranks"
        );
        let fused = update_of(&out, &qkv);
        let parts = [
            ("q_proj", 0, heads * d),
            ("k_proj", heads * d, kv * d),
            ("v_proj", (heads + kv) * d, kv * d),
        ];
        for (p, start, len) in parts {
            let expected = update_of(&src, &format!("model.layers.{l}.self_attn.{p}"));
            let err = max_abs_diff(&rows(&fused, start, len), &expected);
            assert!(
                err < 1e-5 * fro(&expected).max(1e-3),
                "layer {l} {p}: fused block differs by {err}"
            );
        }
        let gate_up = update_of(&out, &format!("model.layers.{l}.mlp.gate_up_proj"));
        let gate = update_of(&src, &format!("model.layers.{l}.mlp.gate_proj"));
        assert!(max_abs_diff(&rows(&gate_up, 0, DIMS.1), &gate) < 1e-6);
    }
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(f.root.join("out/adapter_config.json")).unwrap(),
    )
    .unwrap();
    let targets: Vec<&str> = cfg["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    // Every module written, by its full name.
    let mut types: Vec<&str> = targets
        .iter()
        .map(|t| t.rsplit('.').next().unwrap())
        .collect();
    types.sort();
    types.dedup();
    assert_eq!(types, ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]);
    assert!(
        targets.contains(&"model.layers.0.self_attn.qkv_proj"),
        "{targets:?}"
    );
    assert_eq!(cfg["rank_pattern"]["model.layers.0.self_attn.qkv_proj"], 16);
}

#[test]
fn fused_to_unfused_and_back_keeps_every_update() {
    let f = fixture();
    run(
        &f.llama,
        &f.phi3,
        &f.adapter,
        &f.root.join("phi"),
        Mode::Copy,
    );
    // Phi-3 → llama: each projection takes its rows of lora_B and the shared lora_A.
    run(
        &f.phi3,
        &f.llama,
        &f.root.join("phi"),
        &f.root.join("back"),
        Mode::Copy,
    );
    let src = Adapter::open(&f.adapter).unwrap();
    let back = Adapter::open(&f.root.join("back")).unwrap();
    assert_eq!(
        src.modules.keys().collect::<Vec<_>>(),
        back.modules.keys().collect::<Vec<_>>()
    );
    for name in src.modules.keys() {
        let (a, b) = (update_of(&src, name), update_of(&back, name));
        assert!(
            max_abs_diff(&a, &b) < 1e-5 * fro(&a).max(1e-3),
            "{name} changed in the round trip"
        );
        // The fused module's B is block-diagonal: each part keeps only its own block's ranks,
        // not the other parts' zero columns (the update above shows its alpha kept its scale).
        assert_eq!(
            back.modules[name].r, src.modules[name].r,
            "{name}: rank after the round trip"
        );
    }
    // Phi-3 → Phi-3 keeps the fused modules whole: the same tensors.
    run(
        &f.phi3,
        &f.phi3,
        &f.root.join("phi"),
        &f.root.join("same"),
        Mode::Copy,
    );
    let phi = Adapter::open(&f.root.join("phi")).unwrap();
    let same = Adapter::open(&f.root.join("same")).unwrap();
    let (phi, same) = (phi.read_all().unwrap(), same.read_all().unwrap());
    assert_eq!(
        phi.keys().collect::<Vec<_>>(),
        same.keys().collect::<Vec<_>>()
    );
    for (name, m) in &phi {
        assert_eq!(m.b, same[name].b, "{name}");
        assert_eq!(m.a, same[name].a, "{name}");
    }
}

#[test]
fn fused_parts_project_like_their_unfused_twins() {
    // Project mode on a fused target decomposes each part's rows separately, so llama → Phi-3
    // (same weights) gives the same blocks as llama → llama. k covers k_proj's full rank, so the
    // bases are exact whatever Ω each run draws.
    let f = fixture();
    run_k(
        &f.llama,
        &f.phi3,
        &f.adapter,
        &f.root.join("p"),
        Mode::Project,
        64,
    );
    run_k(
        &f.llama,
        &f.llama,
        &f.adapter,
        &f.root.join("l"),
        Mode::Project,
        64,
    );
    let (p, l) = (
        Adapter::open(&f.root.join("p")).unwrap(),
        Adapter::open(&f.root.join("l")).unwrap(),
    );
    let fused = update_of(&p, "model.layers.1.self_attn.qkv_proj");
    let (_, _, heads, kv, d) = DIMS;
    let k = update_of(&l, "model.layers.1.self_attn.k_proj");
    assert!(max_abs_diff(&rows(&fused, heads * d, kv * d), &k) < 1e-4 * fro(&k));
}

#[test]
fn gemma3_nested_prefix_is_detected_and_used() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let prefix = "model.language_model.layers";
    write_checkpoint(
        &root.join("g"),
        &tiny("gemma3", 2),
        &llama_weights(prefix, 2, 3),
        FloatType::Bf16,
    );
    let ckpt = Checkpoint::open(&root.join("g")).unwrap();
    let table = arch::for_config(&ckpt.config, &root.join("g")).unwrap();
    assert_eq!(table.detect_prefix(&ckpt).unwrap(), prefix);
    // A llama adapter moves onto it; keys follow Gemma 3's prefix.
    write_checkpoint(
        &root.join("l"),
        &tiny("llama", 2),
        &llama_weights("model.layers", 2, 4),
        FloatType::Bf16,
    );
    let mut modules = BTreeMap::new();
    for (s, (name, out, inp)) in projections().into_iter().enumerate() {
        modules.insert(
            format!("model.layers.0.{name}"),
            random_factors(out, inp, 4, 8.0, s as u64, FloatType::Bf16),
        );
        modules.insert(
            format!("model.layers.1.{name}"),
            random_factors(out, inp, 4, 8.0, 9 + s as u64, FloatType::Bf16),
        );
    }
    write_peft(
        &root.join("a"),
        "l",
        4,
        8.0,
        serde_json::json!({}),
        &modules,
    );
    run(
        &root.join("l"),
        &root.join("g"),
        &root.join("a"),
        &root.join("o"),
        Mode::Auto,
    );
    let out = Adapter::open(&root.join("o")).unwrap();
    assert!(
        out.modules.keys().all(|k| k.starts_with(prefix)),
        "{:?}",
        out.modules.keys().next()
    );
    assert_eq!(out.modules.len(), 14);
    assert!(
        out.modules
            .values()
            .all(|m: &LoraTensors| m.ty == FloatType::Bf16),
        "dtype kept"
    );
}
