//! End-to-end checks of the synthetic inputs: they open with the crate's own readers, are
//! reproducible, drift by the requested amount and have decaying spectra.

use std::path::Path;

use faer::MatRef;

use super::*;
use crate::io::adapter::Adapter;
use crate::io::checkpoint::{Checkpoint, ModelConfig};
use crate::io::safetensors::FloatType;

fn tiny(preset: Preset, dtype: FloatType, seed: u64) -> ModelSpec {
    ModelSpec {
        dtype,
        seed,
        ..ModelSpec::new(preset)
    }
}

fn write(spec: &ModelSpec, dir: &Path) {
    write_model(spec, dir, |done, total| assert!(done <= total)).unwrap();
}

fn frobenius(v: &[f32]) -> f64 {
    v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt()
}

#[test]
fn tiny_qwen2_round_trips_with_hf_names_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    write(&tiny(Preset::TinyQwen2, FloatType::Bf16, 1), dir.path());
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let c = &ckpt.config;
    assert_eq!(c.model_type, "qwen2");
    assert_eq!(c.architectures, vec!["Qwen2ForCausalLM"]);
    assert_eq!(
        (c.num_hidden_layers, c.hidden_size, c.intermediate_size),
        (4, 64, 176)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (4, 2, 16)
    );
    assert_eq!(c.raw["tie_word_embeddings"], true);
    assert_eq!(c.raw["torch_dtype"], "bfloat16");
    assert_eq!(c.raw["vocab_size"], 256);
    // 1 embedding + 4 × (2 norms + 7 weights + 3 biases) + final norm; no lm_head (tied).
    assert_eq!(ckpt.names().count(), 1 + 4 * 12 + 1);
    assert!(!ckpt.has("lm_head.weight"));
    let shape = |n: &str| ckpt.shape(n).unwrap().to_vec();
    assert_eq!(shape("model.embed_tokens.weight"), vec![256, 64]);
    assert_eq!(
        shape("model.layers.3.self_attn.q_proj.weight"),
        vec![64, 64]
    );
    assert_eq!(
        shape("model.layers.3.self_attn.k_proj.weight"),
        vec![32, 64]
    );
    assert_eq!(shape("model.layers.3.self_attn.v_proj.bias"), vec![32]);
    assert_eq!(
        shape("model.layers.0.self_attn.o_proj.weight"),
        vec![64, 64]
    );
    assert_eq!(shape("model.layers.0.mlp.gate_proj.weight"), vec![176, 64]);
    assert_eq!(shape("model.layers.0.mlp.down_proj.weight"), vec![64, 176]);
    assert_eq!(
        shape("model.layers.2.post_attention_layernorm.weight"),
        vec![64]
    );
    assert_eq!(shape("model.norm.weight"), vec![64]);
    assert_eq!(
        ckpt.float_type("model.layers.0.mlp.up_proj.weight"),
        Some(FloatType::Bf16)
    );
    // Magnitudes as in trained models.
    let up = ckpt
        .read_rows_f32("model.layers.1.mlp.up_proj.weight", 0..176)
        .unwrap();
    let rms = frobenius(&up) / (up.len() as f64).sqrt();
    assert!((0.015..0.025).contains(&rms), "rms {rms}");
    let norm = ckpt.read_rows_f32("model.norm.weight", 0..64).unwrap();
    assert!(norm.iter().all(|x| (0.7..1.3).contains(x)));
}

#[test]
fn real_preset_configs_parse_with_published_shapes() {
    let expected = [
        (
            Preset::Qwen25_05b,
            "qwen2",
            896,
            4864,
            24,
            14,
            2,
            64,
            151_936,
        ),
        (
            Preset::Qwen25_15b,
            "qwen2",
            1536,
            8960,
            28,
            12,
            2,
            128,
            151_936,
        ),
        (
            Preset::Llama32_1b,
            "llama",
            2048,
            8192,
            16,
            32,
            8,
            64,
            128_256,
        ),
        (
            Preset::Llama32_3b,
            "llama",
            3072,
            8192,
            28,
            24,
            8,
            128,
            128_256,
        ),
        (
            Preset::Llama31_8b,
            "llama",
            4096,
            14336,
            32,
            32,
            8,
            128,
            128_256,
        ),
        (
            Preset::Llama31_70b,
            "llama",
            8192,
            28672,
            80,
            64,
            8,
            128,
            128_256,
        ),
        (Preset::TinyLlama, "llama", 96, 256, 6, 6, 2, 16, 256),
    ];
    for (preset, ty, h, f, l, heads, kv, hd, vocab) in expected {
        let shape = preset.shape();
        let text = shape.config_json(shape.layers, FloatType::Bf16).to_string();
        let c = ModelConfig::parse(&text, Path::new("config.json")).unwrap();
        assert_eq!(c.model_type, ty);
        assert_eq!(
            (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
            (h, f, l)
        );
        assert_eq!(
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            (heads, kv, hd)
        );
        assert_eq!(c.raw["vocab_size"], vocab);
        // Llama 3.1 has its own output embedding (lm_head) and rope factor 8.
        let v31 = matches!(preset, Preset::Llama31_8b | Preset::Llama31_70b);
        assert_eq!(c.raw["tie_word_embeddings"], !v31);
        if ty == "llama" && vocab > 256 {
            let factor = if v31 { 8.0 } else { 32.0 };
            assert_eq!(c.raw["rope_scaling"]["factor"], factor);
        }
        assert!(c.raw["bos_token_id"].as_u64().unwrap() < vocab as u64);
        assert!(c.raw["eos_token_id"].as_u64().unwrap() < vocab as u64);
        assert_eq!(shape.qkv_bias, ty == "qwen2");
        let names = model_tensors(&shape, 2, FloatType::Bf16);
        let per_layer = if shape.qkv_bias { 12 } else { 9 };
        assert_eq!(names.len(), 2 + 2 * per_layer + usize::from(v31));
        assert_eq!(names.iter().any(|t| t.name == "lm_head.weight"), v31);
    }
    // Value names on the command line.
    use clap::ValueEnum;
    for p in Preset::ALL {
        assert_eq!(p.to_possible_value().unwrap().get_name(), p.name());
    }
    assert_eq!(
        Preset::from_str("llama-3.2-3b", false),
        Ok(Preset::Llama32_3b)
    );
}

#[test]
fn layer_override_and_reproducible_bytes() {
    let spec = ModelSpec {
        layers: Some(2),
        ..tiny(Preset::TinyLlama, FloatType::F32, 7)
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write(&spec, a.path());
    write(&spec, b.path());
    for file in ["config.json", "model.safetensors"] {
        let x = std::fs::read(a.path().join(file)).unwrap();
        let y = std::fs::read(b.path().join(file)).unwrap();
        assert!(x == y, "{file} differs between two runs of the same spec");
    }
    let ckpt = Checkpoint::open(a.path()).unwrap();
    assert_eq!(ckpt.config.num_hidden_layers, 2);
    assert!(!ckpt.has("model.layers.2.mlp.up_proj.weight"));
    assert!(!ckpt.has("model.layers.0.self_attn.q_proj.bias"));
    // Another seed gives other weights.
    let c = tempfile::tempdir().unwrap();
    write(&ModelSpec { seed: 8, ..spec }, c.path());
    let other = Checkpoint::open(c.path()).unwrap();
    let name = "model.layers.1.self_attn.o_proj.weight";
    assert_ne!(
        ckpt.read_rows_f32(name, 0..1).unwrap(),
        other.read_rows_f32(name, 0..1).unwrap()
    );
}

#[test]
fn derived_model_drifts_by_the_requested_amount() {
    let (src, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write(&tiny(Preset::TinyQwen2, FloatType::F32, 3), src.path());
    let drift = 0.1;
    let spec = ModelSpec {
        derive_from: Some(src.path().to_path_buf()),
        drift,
        seed: 11,
        // Ignored when deriving: shapes, depth and dtype come from the source.
        layers: Some(1),
        ..tiny(Preset::TinyLlama, FloatType::Bf16, 0)
    };
    write(&spec, out.path());
    let (w, d) = (
        Checkpoint::open(src.path()).unwrap(),
        Checkpoint::open(out.path()).unwrap(),
    );
    assert_eq!(d.config.raw, w.config.raw);
    assert_eq!(d.names().count(), w.names().count());
    for name in [
        "model.layers.2.mlp.gate_proj.weight",
        "model.embed_tokens.weight",
    ] {
        let rows = w.shape(name).unwrap()[0];
        assert_eq!(d.shape(name).unwrap(), w.shape(name).unwrap());
        assert_eq!(d.float_type(name), Some(FloatType::F32));
        let a = w.read_rows_f32(name, 0..rows).unwrap();
        let b = d.read_rows_f32(name, 0..rows).unwrap();
        let diff: Vec<f32> = a.iter().zip(&b).map(|(x, y)| y - x).collect();
        let rel = frobenius(&diff) / frobenius(&a);
        assert!(
            (rel - drift as f64).abs() < 0.2 * drift as f64,
            "{name}: {rel}"
        );
    }
    // Drift 0 is an exact copy.
    let same = tempfile::tempdir().unwrap();
    write(&ModelSpec { drift: 0.0, ..spec }, same.path());
    assert_eq!(
        std::fs::read(src.path().join("model.safetensors")).unwrap(),
        std::fs::read(same.path().join("model.safetensors")).unwrap()
    );
}

#[test]
fn projections_have_decaying_spectra() {
    let dir = tempfile::tempdir().unwrap();
    write(&tiny(Preset::TinyLlama, FloatType::F32, 5), dir.path());
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.4.mlp.down_proj.weight",
    ] {
        let shape = ckpt.shape(name).unwrap().to_vec();
        let w = ckpt.read_rows_f32(name, 0..shape[0]).unwrap();
        let m = MatRef::from_row_major_slice(&w, shape[0], shape[1]);
        let s = m.singular_values().unwrap();
        assert!(s[0] / s[19] > 3.0, "{name}: σ1/σ20 = {}", s[0] / s[19]);
        assert!(s[0] / s[4] > 1.5, "{name}: σ1/σ5 = {}", s[0] / s[4]);
    }
}

#[test]
fn spectrum_scales_give_the_target_rms_at_real_sizes() {
    // Expected mean square of X·diag(d)·Y + s·G is s² + Σ d_j², independent of the draw.
    for (m, n) in [(3072, 3072), (8192, 3072), (64, 896), (2, 3)] {
        let r = 64.min(m).min(n);
        let (s, d) = model::spectrum(m, n, r);
        let ms = (s as f64).powi(2) + d.iter().map(|&x| (x as f64).powi(2)).sum::<f64>();
        assert!((ms.sqrt() - 0.02).abs() < 1e-6, "{m}x{n}: {}", ms.sqrt());
        // The top planted value stands well above the noise bulk.
        let top = d[0] as f64 * ((m * n) as f64).sqrt();
        let edge = s as f64 * ((m as f64).sqrt() + (n as f64).sqrt());
        assert!((top / edge - 10.0).abs() < 1e-3);
    }
}

#[test]
fn adapter_for_tiny_llama_loads_with_every_module() {
    let (base, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write(&tiny(Preset::TinyLlama, FloatType::Bf16, 2), base.path());
    write_adapter(base.path(), &AdapterSpec::default(), out.path()).unwrap();
    let adapter = Adapter::open(out.path()).unwrap();
    assert_eq!(adapter.modules.len(), 6 * 7);
    assert_eq!(adapter.config.r, 16);
    assert_eq!(adapter.config.lora_alpha, 32.0);
    let raw = &adapter.config.raw;
    assert_eq!(raw["peft_type"], "LORA");
    assert_eq!(raw["task_type"], "CAUSAL_LM");
    assert_eq!(
        raw["base_model_name_or_path"],
        base.path().display().to_string()
    );
    let targets: Vec<&str> = raw["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        targets,
        [
            "down_proj",
            "gate_proj",
            "k_proj",
            "o_proj",
            "q_proj",
            "up_proj",
            "v_proj"
        ]
    );
    let k = &adapter.modules["model.layers.5.self_attn.k_proj"];
    assert_eq!((k.r, k.in_features, k.out_features), (16, 96, 32));
    assert_eq!(k.ty, FloatType::F32);
    let down = &adapter.modules["model.layers.0.mlp.down_proj"];
    assert_eq!((down.in_features, down.out_features), (256, 96));
    for f in adapter.read_all().unwrap().values() {
        assert!(f.b.iter().any(|&x| x != 0.0));
        let bound = 1.0 / (f.in_features as f32).sqrt();
        assert!(f.a.iter().all(|x| x.abs() <= bound) && f.a.iter().any(|&x| x != 0.0));
    }
}

#[test]
fn adapter_targets_are_checked_and_selected() {
    let (base, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write(&tiny(Preset::TinyQwen2, FloatType::Bf16, 2), base.path());
    let spec = AdapterSpec {
        r: 4,
        alpha: 8.0,
        targets: vec!["v_proj".into(), "q_proj".into()],
        dtype: FloatType::Bf16,
        ..AdapterSpec::default()
    };
    write_adapter(base.path(), &spec, out.path()).unwrap();
    let adapter = Adapter::open(out.path()).unwrap();
    assert_eq!(adapter.modules.len(), 4 * 2);
    assert_eq!(
        adapter.config.raw["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    assert!(adapter.modules.values().all(|f| f.ty == FloatType::Bf16));

    let bad = AdapterSpec {
        targets: vec!["qkv_proj".into()],
        ..AdapterSpec::default()
    };
    let err = write_adapter(base.path(), &bad, out.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("--targets") && err.contains("qkv_proj") && err.contains("gate_proj"));
}

#[test]
fn streams_agree_whatever_the_slicing() {
    let mut whole = vec![0f32; 23];
    fill_normal(7, 3, 5, &mut whole);
    let mut parts = vec![0f32; 23];
    let (a, b) = parts.split_at_mut(6);
    fill_normal(7, 3, 5, a);
    fill_normal(7, 3, 11, b);
    assert_eq!(whole, parts);
    let mut u = vec![0f32; 1000];
    fill_uniform_pm1(1, 2, 3, &mut u);
    assert!(u.iter().all(|x| x.abs() < 1.0));
    let mean = u.iter().sum::<f32>() / 1000.0;
    assert!(mean.abs() < 0.1, "{mean}");
}
