//! Architecture tables: every table loads and names its modules; fused projections (Phi-3's
//! qkv_proj, gate_up_proj) are split and re-fused with the right rows, ranks and scales; Gemma 3's
//! nested layer prefix is found.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use faer::Mat;
use loraxfer::arch::{self, Block, Part};
use loraxfer::io::adapter::{Adapter, LoraTensors};
use loraxfer::io::checkpoint::{Checkpoint, ModelConfig};
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
fn every_table_loads_and_round_trips_module_names() {
    let names: Vec<&str> = arch::all().iter().map(|a| a.name.as_str()).collect();
    for expected in [
        "llama",
        "qwen2",
        "qwen3",
        "mistral",
        "gemma",
        "gemma2",
        "gemma3",
        "phi3",
        "smollm3",
        "olmo2",
        "olmo3",
        "granite",
        "glm",
        "glm4",
        "qwen3_moe",
        "qwen2_moe",
        "glm4_moe",
        "deepseek_v2",
        "deepseek_v3",
        "glm4_moe_lite",
        "mixtral",
        "olmoe",
        "qwen3_5",
        "qwen3_5_moe",
        "seed_oss",
        "ernie4_5",
        "hunyuan_v1_dense",
        "exaone4",
        "qwen3_next",
    ] {
        assert!(names.contains(&expected), "no table for {expected}");
    }
    for a in arch::all() {
        for spec in &a.modules {
            let expert = spec.expert.then_some(11);
            let path = a.module_path(&a.layer_prefixes[0], 5, expert, spec);
            let (layer, e, parsed) = a.parse_module(&a.layer_prefixes[0], &path).unwrap();
            assert_eq!(
                (layer, e, parsed.name.as_str()),
                (5, expert, spec.name.as_str())
            );
        }
        // The attention's four parts (latent attention's six), linear attention's five, and
        // each MLP block's three.
        let blocks: std::collections::BTreeSet<Block> =
            a.modules.iter().map(|m| m.block()).collect();
        for block in &blocks {
            let of = a.modules.iter().filter(|m| m.block() == *block);
            let mut parts: Vec<_> = of.flat_map(|m| m.parts.clone()).collect();
            parts.sort();
            let want = match block {
                Block::Attention if a.latent_attention() => {
                    vec![Part::Q, Part::O, Part::QA, Part::QB, Part::KvA, Part::KvB]
                }
                Block::Attention => vec![Part::Q, Part::K, Part::V, Part::O],
                // Qwen3-Next's fused forms, or Qwen3.5's five.
                Block::LinearAttention if a.modules.iter().any(|m| m.parts == [Part::LinQkvz]) => {
                    vec![Part::LinOut, Part::LinQkvz, Part::LinBa]
                }
                Block::LinearAttention => {
                    vec![
                        Part::LinQkv,
                        Part::LinZ,
                        Part::LinB,
                        Part::LinA,
                        Part::LinOut,
                    ]
                }
                _ => vec![Part::Gate, Part::Up, Part::Down],
            };
            assert_eq!(parts, want, "{} {block:?}", a.name);
        }
        assert!(blocks.contains(&Block::Mlp) || blocks.contains(&Block::Experts));
        assert_eq!(a.has_experts(), a.router.is_some(), "{}", a.name);
    }
}

#[test]
fn every_table_file_is_found_and_validated() {
    let sources = arch::table_sources();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/arch/tables");
    let on_disk = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "json")
        })
        .count();
    assert_eq!(
        sources.len(),
        on_disk,
        "every JSON file in {dir:?} is built in"
    );
    let mut model_types = std::collections::BTreeMap::new();
    for (stem, text) in sources {
        let table = arch::parse_table(text).unwrap_or_else(|e| panic!("{stem}.json: {e}"));
        assert_eq!(
            &table.name, stem,
            "{stem}.json names itself `{}`",
            table.name
        );
        for t in &table.model_types {
            if let Some(other) = model_types.insert(t.clone(), table.name.clone()) {
                panic!(
                    "model_type `{t}` is claimed by both {other} and {}",
                    table.name
                );
            }
        }
    }
    assert_eq!(arch::all().len(), sources.len());
    // The checks reject a broken table.
    let bad = r#"{"name":"x","model_types":["x"],"layer_prefixes":["model.layers"],
        "modules":{"q_proj":{"key":"self_attn.q_proj","parts":["q","k","v","o","gate","up"]}}}"#;
    assert!(arch::parse_table(bad).is_err());
    // Linear attention whole in one of its two forms, not a mix of them; adapters named under a
    // prefix the table does not read.
    let qwen3_5 = include_str!("../src/arch/tables/qwen3_5.json");
    assert!(arch::parse_table(qwen3_5).is_ok());
    let mixed = qwen3_5.replace(r#"["lin_z"]"#, r#"["lin_qkvz"]"#);
    let e = arch::parse_table(&mixed).unwrap_err();
    assert!(e.contains("lin_qkvz, lin_ba, lin_out"), "{e}");
    let elsewhere = qwen3_5.replace(
        r#""module_prefix": "model.layers""#,
        r#""module_prefix": "language_model.layers""#,
    );
    let e = arch::parse_table(&elsewhere).unwrap_err();
    assert!(e.contains("module_prefix `language_model.layers`"), "{e}");
}

#[test]
fn config_model_types_select_tables() {
    for (mt, table) in [
        ("llama", "llama"),
        ("qwen2", "qwen2"),
        ("mistral", "mistral"),
        ("gemma", "gemma"),
        ("gemma2", "gemma2"),
        ("gemma3_text", "gemma3"),
        ("phi3", "phi3"),
        ("smollm3", "smollm3"),
        ("olmo2", "olmo2"),
        ("olmo3", "olmo3"),
        ("granite", "granite"),
        ("glm", "glm"),
        ("glm4", "glm4"),
        ("qwen3_moe", "qwen3_moe"),
        ("mixtral", "mixtral"),
        ("olmoe", "olmoe"),
        ("seed_oss", "seed_oss"),
        ("ernie4_5", "ernie4_5"),
        ("hunyuan_v1_dense", "hunyuan_v1_dense"),
        ("exaone4", "exaone4"),
    ] {
        let text = format!(
            r#"{{"model_type": "{mt}", "num_hidden_layers": 2, "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2}}"#
        );
        let c = ModelConfig::parse(&text, Path::new("config.json")).unwrap();
        assert_eq!(
            arch::for_config(&c, Path::new("config.json")).unwrap().name,
            table
        );
    }
    let c = ModelConfig::parse(r#"{"model_type": "rwkv", "num_hidden_layers": 2, "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2}"#, Path::new("m/config.json")).unwrap();
    let e = arch::for_config(&c, Path::new("m/config.json"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rwkv") && e.contains("m/config.json") && e.contains("phi3"),
        "{e}"
    );
    // Gemma 3's multimodal config keeps the text model's fields in text_config.
    let c = ModelConfig::parse(r#"{"model_type": "gemma3", "text_config": {"num_hidden_layers": 3, "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4}}"#, Path::new("c")).unwrap();
    assert_eq!(
        (c.num_hidden_layers, c.num_key_value_heads, c.head_dim),
        (3, 1, 4)
    );
}

/// The forward pass's constant factors, which the map mode carries: Granite's multipliers,
/// Gemma's query_pre_attn_scalar, 1/√head_dim elsewhere; a value no model can have is refused
/// naming the field.
#[test]
fn config_scales_follow_the_family_fields() {
    let parse = |extra: &str| {
        let text = format!(
            r#"{{"model_type": "granite", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 16, "num_attention_heads": 4{extra}}}"#
        );
        ModelConfig::parse(&text, Path::new("g/config.json"))
    };
    // Granite's defaults (transformers' GraniteConfig): every multiplier 1.
    let plain = parse("").unwrap().scales;
    assert_eq!(
        (plain.embedding, plain.residual, plain.attention),
        (1.0, 1.0, 1.0)
    );
    let granite = parse(r#", "embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.0078125"#)
        .unwrap()
        .scales;
    assert_eq!(
        (granite.embedding, granite.residual, granite.attention),
        (12.0, 0.22, 0.0078125)
    );
    let other = |model_type: &str, extra: &str| {
        let text = format!(
            r#"{{"model_type": "{model_type}", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 16, "num_attention_heads": 4{extra}}}"#
        );
        ModelConfig::parse(&text, Path::new("c")).unwrap().scales
    };
    let gemma2 = other("gemma2", r#", "query_pre_attn_scalar": 144"#);
    assert!((gemma2.attention - 1.0 / 12.0).abs() < 1e-12);
    assert_eq!(other("llama", "").attention, 0.25); // 1/√head_dim, head_dim 16
    for (bad, field) in [
        (r#", "residual_multiplier": 0"#, "residual_multiplier"),
        (r#", "embedding_multiplier": -1.5"#, "embedding_multiplier"),
        (r#", "attention_multiplier": "x""#, "attention_multiplier"),
        (r#", "residual_multiplier": 1e300"#, "residual_multiplier"),
        (
            r#", "attention_multiplier": 0.1, "query_pre_attn_scalar": -4"#,
            "query_pre_attn_scalar",
        ),
    ] {
        let e = parse(bad).unwrap_err().to_string();
        assert!(e.contains("g/config.json") && e.contains(field), "{e}");
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
