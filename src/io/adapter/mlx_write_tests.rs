//! Tests of `mlx_write.rs`: modules placed and keyed as mlx-lm names them, experts stacked, and
//! every module's update read back from what is written.

use super::*;
use crate::io::adapter::mlx::is_mlx;
use crate::io::adapter::{write_adapter, AdapterConfig, EncodedFactors, LoraModule};
use std::collections::BTreeMap;

#[test]
fn modules_are_placed_and_keyed_as_mlx_lm_names_them() {
    let placed = |m: &str| place(m).unwrap();
    assert_eq!(
        placed("model.layers.3.self_attn.q_proj"),
        (
            "model.layers.3.self_attn.q_proj".to_string(),
            "self_attn.q_proj".to_string(),
            Some(3)
        )
    );
    // transformers 5's multimodal name, and mlx-lm's.
    for name in [
        "model.language_model.layers.12.mlp.down_proj",
        "language_model.model.layers.12.mlp.down_proj",
    ] {
        let (path, key, layer) = placed(name);
        assert_eq!(path, "language_model.model.layers.12.mlp.down_proj");
        assert_eq!((key.as_str(), layer), ("mlp.down_proj", Some(12)));
    }
    assert_eq!(placed("lm_head").1, "lm_head");
    let err = place("model.vision_tower.encoder.layers.0.self_attn.q_proj").unwrap_err();
    assert!(
        err.contains("not under the language model's layers"),
        "{err}"
    );
}

/// The PEFT adapter of `modules` under `config`, written in `dir/peft`, opened, and exported
/// without a base into `dir/mlx`: (the PEFT adapter, the MLX directory, what was written).
fn exported(
    dir: &Path,
    config: &serde_json::Value,
    modules: &BTreeMap<String, EncodedFactors>,
) -> (Adapter, std::path::PathBuf, WrittenMlx) {
    let peft = dir.join("peft");
    std::fs::create_dir(&peft).unwrap();
    write_adapter(&peft, config.as_object().unwrap(), modules).unwrap();
    let opened = Adapter::open(&peft).unwrap();
    let out = dir.join("mlx");
    std::fs::create_dir(&out).unwrap();
    let written = write_mlx(&opened, None, &out, "base").unwrap();
    (opened, out, written)
}

/// A module `[m, n]` of rank r with Gaussian factors drawn for (seed, id).
fn random_module(
    seed: u64,
    id: u64,
    (r, alpha): (usize, f64),
    n: usize,
    m: usize,
) -> EncodedFactors {
    let draw = |stream: u64, len: usize| -> Vec<f32> {
        (0..len)
            .map(|i| crate::linalg::philox::gaussian4(seed, stream, i as u32, 0)[0])
            .collect()
    };
    LoraModule {
        a: draw(2 * id, r * n),
        b: draw(2 * id + 1, m * r),
        r,
        in_features: n,
        out_features: m,
        alpha,
        ty: FloatType::F32,
    }
    .encode()
}

/// s·B·A of a module, `[out, in]` in f64.
fn update(cfg: &AdapterConfig, f: &super::super::LoraFactors) -> Vec<f64> {
    let s = cfg.scale(f.r, f.alpha);
    let mut d = vec![0f64; f.out_features * f.in_features];
    for o in 0..f.out_features {
        for i in 0..f.in_features {
            d[o * f.in_features + i] = s
                * (0..f.r)
                    .map(|k| f.b[o * f.r + k] as f64 * f.a[k * f.in_features + i] as f64)
                    .sum::<f64>();
        }
    }
    d
}

#[test]
fn experts_modules_and_stacks_name_each_other() {
    use crate::io::quantized::mlx::{expert_module, stack_of};
    for (parent, proj, e, module) in [
        (
            "model.layers.3.mlp",
            "gate_proj",
            0,
            "model.layers.3.mlp.experts.0.gate_proj",
        ),
        (
            "model.layers.3.mlp",
            "down_proj",
            17,
            "model.layers.3.mlp.experts.17.down_proj",
        ),
        (
            "model.layers.1.block_sparse_moe",
            "up_proj",
            5,
            "model.layers.1.block_sparse_moe.experts.5.w3",
        ),
    ] {
        assert_eq!(expert_module(parent, proj, e), module);
        assert_eq!(stack_of(module), Some((parent, proj, e)));
    }
    for not_an_expert in [
        "model.layers.3.mlp.gate_proj",
        "model.layers.3.mlp.shared_experts.gate_proj",
        "model.layers.3.mlp.experts.01.gate_proj",
        "model.layers.3.mlp.experts.x.gate_proj",
        "model.layers.3.mlp.experts.0.w1",
        "model.layers.3.block_sparse_moe.experts.0.gate_proj",
    ] {
        assert_eq!(stack_of(not_an_expert), None, "{not_an_expert}");
    }
}

#[test]
fn a_peft_adapter_written_for_mlx_reads_back_with_every_modules_update() {
    // Two modules: rank 2 (alpha 8, of the config: scale 4) and rank 3 with its own alpha
    // 1.5 (scale 0.5), which the one rank 3 and scale 4 of the MLX adapter must carry.
    let dir = tempfile::tempdir().unwrap();
    let seed = crate::linalg::fresh_seed();
    let module =
        |r: usize, alpha: f64, n: usize, m: usize| random_module(seed, r as u64, (r, alpha), n, m);
    let modules: BTreeMap<String, EncodedFactors> = [
        (
            "model.layers.0.self_attn.q_proj".to_string(),
            module(2, 8.0, 5, 6),
        ),
        (
            "model.layers.1.mlp.down_proj".to_string(),
            module(3, 1.5, 7, 4),
        ),
    ]
    .into();
    let config = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 8.0,
        "rank_pattern": {"down_proj": 3}, "alpha_pattern": {"down_proj": 1.5},
        "base_model_name_or_path": "base"});
    let (opened, out, written) = exported(dir.path(), &config, &modules);
    assert_eq!(written.num_layers, -1);
    assert_eq!((written.rank, written.scale), (3, 4.0));
    assert_eq!(written.keys, ["mlp.down_proj", "self_attn.q_proj"]);
    assert!(is_mlx(&out));
    let back = Adapter::open(&out).unwrap();
    assert_eq!((back.config.r, back.config.lora_alpha), (3, 12.0));
    for name in opened.modules.keys() {
        let (want, got) = (opened.factors(name).unwrap(), back.factors(name).unwrap());
        assert_eq!(
            (got.in_features, got.out_features, got.r),
            (want.in_features, want.out_features, 3)
        );
        let (want, got) = (update(&opened.config, &want), update(&back.config, &got));
        assert_close(&got, &want, name, seed);
    }
}

/// Two updates equal to f32's precision.
fn assert_close(got: &[f64], want: &[f64], name: &str, seed: u64) {
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= 1e-6 * w.abs().max(1.0),
            "{name}: {g} vs {w} (seed {seed})"
        );
    }
}

/// Experts' modules are written as mlx-lm's LoRASwitchLinear stacks (`switch_mlp`, lora_a
/// `[E, rank, in]`, lora_b `[E, out, rank]`), an expert without an update as zeros, and read
/// back one module per expert with the update each had.
#[test]
fn experts_are_written_as_stacks_and_read_back_one_module_per_expert() {
    let dir = tempfile::tempdir().unwrap();
    let seed = crate::linalg::fresh_seed();
    let module = |id: u64, r: usize, alpha: f64, n: usize, m: usize| {
        random_module(seed, id, (r, alpha), n, m)
    };
    let modules: BTreeMap<String, EncodedFactors> = [
        ("model.layers.0.self_attn.q_proj", module(1, 2, 8.0, 5, 5)),
        (
            "model.layers.0.mlp.experts.0.gate_proj",
            module(2, 2, 8.0, 5, 6),
        ),
        (
            "model.layers.0.mlp.experts.2.gate_proj",
            module(3, 3, 1.5, 5, 6),
        ),
        (
            "model.layers.1.block_sparse_moe.experts.1.w2",
            module(4, 2, 8.0, 6, 5),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let config = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 8.0,
        "rank_pattern": {"mlp.experts.2.gate_proj": 3},
        "alpha_pattern": {"mlp.experts.2.gate_proj": 1.5},
        "base_model_name_or_path": "base"});
    let (opened, out, written) = exported(dir.path(), &config, &modules);
    assert_eq!((written.rank, written.scale), (3, 4.0));
    assert_eq!(
        written.keys,
        [
            "block_sparse_moe.switch_mlp.down_proj",
            "mlp.switch_mlp.gate_proj",
            "self_attn.q_proj"
        ]
    );
    let file = crate::io::safetensors::TensorFile::open(&out.join(MLX_WEIGHTS_FILE)).unwrap();
    let shape = |k: &str| file.entry(k).unwrap().shape.clone();
    assert_eq!(
        shape("model.layers.0.mlp.switch_mlp.gate_proj.lora_a"),
        [3, 3, 5]
    );
    assert_eq!(
        shape("model.layers.0.mlp.switch_mlp.gate_proj.lora_b"),
        [3, 6, 3]
    );
    assert_eq!(
        shape("model.layers.1.block_sparse_moe.switch_mlp.down_proj.lora_b"),
        [2, 5, 3]
    );
    let back = Adapter::open(&out).unwrap();
    let filled = [
        "model.layers.0.mlp.experts.1.gate_proj",
        "model.layers.1.block_sparse_moe.experts.0.w2",
    ];
    let mut names: Vec<&str> = opened.modules.keys().map(String::as_str).collect();
    names.extend(filled);
    names.sort();
    assert_eq!(back.modules.keys().collect::<Vec<_>>(), names);
    for name in names {
        let got = update(&back.config, &back.factors(name).unwrap());
        if filled.contains(&name) {
            assert!(got.iter().all(|&v| v == 0.0), "{name}");
            continue;
        }
        let want = update(&opened.config, &opened.factors(name).unwrap());
        assert_close(&got, &want, name, seed);
    }
}

/// Without a base, Llama 4's experts (under `feed_forward`) go into mlx-lm's `experts` holder,
/// the others' into `switch_mlp`.
#[test]
fn llama_4_experts_are_stacked_as_mlx_lm_names_them() {
    let dir = tempfile::tempdir().unwrap();
    let seed = crate::linalg::fresh_seed();
    let modules: BTreeMap<String, EncodedFactors> = [
        "language_model.model.layers.1.feed_forward.experts.0.gate_proj",
        "model.layers.0.mlp.experts.1.down_proj",
    ]
    .into_iter()
    .enumerate()
    .map(|(i, k)| (k.to_string(), random_module(seed, i as u64, (2, 4.0), 5, 6)))
    .collect();
    let config = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4.0});
    let (_, out, written) = exported(dir.path(), &config, &modules);
    assert_eq!(
        written.keys,
        ["feed_forward.experts.gate_proj", "mlp.switch_mlp.down_proj"]
    );
    let file = crate::io::safetensors::TensorFile::open(&out.join(MLX_WEIGHTS_FILE)).unwrap();
    let stack = "language_model.model.layers.1.feed_forward.experts.gate_proj.lora_a";
    assert_eq!(file.entry(stack).unwrap().shape, [1, 2, 5]);
}
