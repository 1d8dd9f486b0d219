//! Tests of `names.rs`: GGUF names against the tables, the Q/K rows, the config.

use super::*;
use crate::io::gguf::config::config_json;
use crate::io::gguf::header::{TensorInfo, Value};
use std::collections::HashMap;

#[test]
fn gguf_module_names_invert_hf_names_for_every_table_projection() {
    for f in FAMILIES {
        let table = crate::arch::all()
            .iter()
            .find(|a| a.model_types.iter().any(|t| t == f.model_type))
            .unwrap();
        for spec in &table.modules {
            // llama.cpp's qwen2moe, qwen3moe, … have no dense MLP tensors.
            let dense = spec.block() == crate::arch::Block::Mlp;
            if dense && !f.dense_mlp() {
                assert_eq!(gguf_module(f, &spec.key), None, "{} {}", f.gguf, spec.key);
                continue;
            }
            // Latent attention's `kv_b_proj` and Qwen3-Next's `in_proj_qkvz` are two tensors
            // each (`joined.rs`).
            let split = match spec.key.as_str() {
                "self_attn.kv_b_proj" => f.latent_attention,
                "linear_attn.in_proj_qkvz" => f.fused_linear_attention,
                _ => false,
            };
            if split {
                assert_eq!(gguf_module(f, &spec.key), None);
                continue;
            }
            let gguf = gguf_module(f, &spec.key)
                .unwrap_or_else(|| panic!("{}: no GGUF name for {}", f.gguf, spec.key));
            if spec.expert {
                // Stacked experts are written, never read back as a base's.
                assert!(gguf.ends_with("_exps"), "{gguf}");
                continue;
            }
            assert_eq!(
                hf_name(f, &format!("blk.7.{gguf}.weight")).as_deref(),
                Some(format!("model.layers.7.{}.weight", spec.key).as_str()),
                "{}",
                f.gguf
            );
        }
    }
}

#[test]
fn stacked_experts_read_as_the_tables_name_them() {
    let mixtral = family_of("llama", true).unwrap();
    assert_eq!(mixtral.model_type, "mixtral");
    assert_eq!(family_of("llama", false).unwrap().model_type, "llama");
    for f in FAMILIES.iter().filter(|f| f.experts) {
        let table = crate::arch::all()
            .iter()
            .find(|a| a.model_types.iter().any(|t| t == f.model_type))
            .unwrap();
        // Every expert module's GGUF stack reads back as that module, one per expert.
        for spec in table.modules.iter().filter(|m| m.expert) {
            let gguf = gguf_module(f, &spec.key).unwrap();
            let name = format!("blk.4.{gguf}.weight");
            assert_eq!(
                expert_tensor(f, &name),
                Some((4, spec.key.as_str())),
                "{name}"
            );
        }
        let router = hf_name(f, "blk.2.ffn_gate_inp.weight").unwrap();
        assert_eq!(
            router,
            format!("model.layers.2.{}", table.router.as_deref().unwrap())
        );
    }
    // Early conversions of Mixtral: one tensor per expert.
    assert_eq!(
        hf_name(mixtral, "blk.1.ffn_up.7.weight").as_deref(),
        Some("model.layers.1.block_sparse_moe.experts.7.w3.weight")
    );
    assert_eq!(hf_name(mixtral, "blk.1.ffn_up.x7.weight"), None);
    let llama = family_of("llama", false).unwrap();
    assert_eq!(hf_name(llama, "blk.1.ffn_up.7.weight"), None);
    assert_eq!(expert_tensor(llama, "blk.0.ffn_down_exps.weight"), None);
    assert_eq!(hf_name(llama, "blk.0.ffn_gate_inp.weight"), None);
}

#[test]
fn every_family_has_its_architecture_table() {
    for f in FAMILIES {
        let table = crate::arch::all()
            .iter()
            .find(|a| a.model_types.iter().any(|t| t == f.model_type));
        let table = table.unwrap_or_else(|| panic!("no table for {}", f.model_type));
        // The table's name is the transformers module PEFT's auto_mapping names.
        assert_eq!(
            table.name,
            f.model_type.trim_end_matches("_text"),
            "{}",
            f.gguf
        );
    }
}

#[test]
fn names_map_per_family() {
    let llama = family_of("llama", false).unwrap();
    let gemma3 = family_of("gemma3", false).unwrap();
    let phi3 = family_of("phi3", false).unwrap();
    assert_eq!(
        hf_name(llama, "blk.3.attn_q.weight").unwrap(),
        "model.layers.3.self_attn.q_proj.weight"
    );
    assert_eq!(
        hf_name(llama, "blk.0.ffn_norm.weight").unwrap(),
        "model.layers.0.post_attention_layernorm.weight"
    );
    assert_eq!(
        hf_name(gemma3, "blk.0.ffn_norm.weight").unwrap(),
        "model.layers.0.pre_feedforward_layernorm.weight"
    );
    assert_eq!(
        hf_name(gemma3, "blk.1.post_ffw_norm.weight").unwrap(),
        "model.layers.1.post_feedforward_layernorm.weight"
    );
    assert_eq!(
        hf_name(phi3, "blk.2.ffn_up.weight").unwrap(),
        "model.layers.2.mlp.gate_up_proj.weight"
    );
    assert_eq!(
        hf_name(llama, "blk.2.attn_q.bias").unwrap(),
        "model.layers.2.self_attn.q_proj.bias"
    );
    assert_eq!(hf_name(llama, "rope_freqs.weight"), None);
    assert_eq!(hf_name(llama, "blk.x.attn_q.weight"), None);
}

/// The config rebuilt from the metadata carries what the engine's `Scales` read: Granite's
/// multipliers from llama.cpp's scale keys, and Gemma 2/3's query_pre_attn_scalar as
/// llama.cpp derives it (hidden/heads for the 27B models, head_dim for the others).
#[test]
fn config_carries_the_forward_pass_scales() {
    let config = |arch: &str, layers: u64, extra: &[(&str, Value)]| {
        let f = family_of(arch, false).unwrap();
        let mut m: HashMap<String, Value> = [
            ("block_count", Value::UInt(layers)),
            ("embedding_length", Value::UInt(4608)),
            ("feed_forward_length", Value::UInt(64)),
            ("attention.head_count", Value::UInt(32)),
            ("attention.key_length", Value::UInt(128)),
        ]
        .into_iter()
        .map(|(k, v)| (format!("{arch}.{k}"), v))
        .collect();
        m.extend(
            extra
                .iter()
                .map(|(k, v)| (format!("{arch}.{k}"), v.clone())),
        );
        let json = config_json(f, &m, &[]).unwrap();
        crate::io::checkpoint::ModelConfig::parse(&json.to_string(), std::path::Path::new("m.gguf"))
            .unwrap()
            .scales
    };
    let big = config("gemma2", 46, &[]);
    assert!(
        (big.attention - 1.0 / 144f64.sqrt()).abs() < 1e-12,
        "{big:?}"
    );
    let nine = config("gemma2", 42, &[]);
    assert!(
        (nine.attention - 1.0 / 128f64.sqrt()).abs() < 1e-12,
        "{nine:?}"
    );
    assert!((config("gemma3", 62, &[]).attention - 1.0 / 144f64.sqrt()).abs() < 1e-12);
    let granite = config(
        "granite",
        40,
        &[
            ("attention.scale", Value::Float(0.0078125)),
            ("embedding_scale", Value::Float(12.0)),
            ("residual_scale", Value::Float(0.22)),
        ],
    );
    assert_eq!(
        (granite.attention, granite.embedding, granite.residual),
        (0.0078125, 12.0, 0.22)
    );
}

/// A mixture's GGUF config: the experts' count under the family's own field, the shared expert's
/// width or count, the dense layers (those without a router), and GLM-4.5's multi-token-prediction
/// layers taken out of `block_count`.
#[test]
fn config_carries_dense_layers_and_the_shared_expert() {
    let config = |arch: &str, extra: &[(&str, u64)], routers: &[usize]| {
        let f = family_of(arch, true).unwrap();
        let mut m: HashMap<String, Value> = [
            ("block_count", 4),
            ("embedding_length", 64),
            ("feed_forward_length", 96),
            ("attention.head_count", 4),
            ("expert_count", 8),
            ("expert_feed_forward_length", 16),
        ]
        .iter()
        .chain(extra)
        .map(|(k, v)| (format!("{arch}.{k}"), Value::UInt(*v)))
        .collect();
        m.insert("general.architecture".into(), Value::Str(arch.into()));
        let json = config_json(f, &m, &routers_of(routers.iter().copied())).unwrap();
        let c = crate::io::checkpoint::ModelConfig::parse(&json.to_string(), "m.gguf".as_ref())
            .unwrap();
        (c.num_hidden_layers, c.experts.unwrap())
    };
    let (layers, e) = config(
        "qwen2moe",
        &[("expert_shared_feed_forward_length", 40)],
        &[0, 1, 2, 3],
    );
    assert_eq!(
        (layers, e.count, e.width, e.shared_width),
        (4, 8, 16, Some(40))
    );
    assert!(e.dense_layers.is_empty());
    // GLM-4.5: one leading dense layer, one prediction layer after the three of the model.
    let glm = [
        ("expert_shared_count", 1),
        ("leading_dense_block_count", 1),
        ("nextn_predict_layers", 1),
    ];
    let (layers, e) = config("glm4moe", &glm, &[1, 2, 3]);
    assert_eq!((layers, e.count, e.shared_width), (3, 8, Some(16)));
    assert_eq!(e.dense_layers, [0]);
    // A Qwen3-MoE layer without a router is dense, though the metadata cannot say so.
    let (_, e) = config("qwen3moe", &[], &[0, 2, 3]);
    assert_eq!(e.dense_layers, [1]);
    // Llama 4: experts every other layer, a shared expert of their width, and dense layers of
    // `feed_forward_length` (`intermediate_size_mlp`).
    let (_, e) = config("llama4", &[("interleave_moe_layer_step", 2)], &[1, 3]);
    assert_eq!((e.count, e.width, e.shared_width), (8, 16, Some(16)));
    assert_eq!(e.dense_layers, [0, 2]);
    // Its query/key norm, which llama.cpp's graph leaves out of the 128-expert model only.
    let f = family_of("llama4", true).unwrap();
    for (experts, qk_norm) in [(16, true), (128, false)] {
        let m: HashMap<String, Value> = [
            ("block_count", 2),
            ("embedding_length", 64),
            ("feed_forward_length", 96),
            ("attention.head_count", 4),
            ("expert_count", experts),
            ("expert_feed_forward_length", 16),
        ]
        .iter()
        .map(|(k, v)| (format!("llama4.{k}"), Value::UInt(*v)))
        .collect();
        let json = config_json(f, &m, &routers_of(0..2)).unwrap();
        assert_eq!(json["use_qk_norm"], qk_norm, "{experts} experts");
        assert_eq!(json["intermediate_size_mlp"], 96);
        assert_eq!(json["intermediate_size"], 16);
    }
    // A depth beyond any model is refused before the layers are looked at.
    let f = family_of("qwen3moe", true).unwrap();
    let m: HashMap<String, Value> = [("qwen3moe.block_count".to_string(), Value::UInt(1 << 40))]
        .into_iter()
        .collect();
    let e = config_json(f, &m, &[]).unwrap_err();
    assert!(e.contains("block_count"), "{e}");
}

/// Qwen3.5's GGUF config: linear attention's sizes from the converter's SSM keys, the interval
/// of softmax layers, its multi-token-prediction layer taken out of `block_count` (as GLM-4.5's),
/// and a mixture's width standing in for an absent `feed_forward_length`.
#[test]
fn config_carries_linear_attention() {
    let parse = |arch: &str, experts: bool, extra: &[(&str, u64)]| {
        let f = family_of(arch, experts).unwrap();
        let m: HashMap<String, Value> = [
            ("block_count", 9),
            ("nextn_predict_layers", 1),
            ("embedding_length", 64),
            ("attention.head_count", 4),
            ("attention.head_count_kv", 2),
            ("attention.key_length", 16),
            ("ssm.group_count", 2),
            ("ssm.time_step_rank", 4),
            ("ssm.state_size", 16),
            ("ssm.inner_size", 32),
            ("full_attention_interval", 4),
        ]
        .iter()
        .chain(extra)
        .map(|(k, v)| (format!("{arch}.{k}"), Value::UInt(*v)))
        .collect();
        // A router in each of the model's layers (none in the prediction layer).
        let routers = routers_of((0..8).filter(|_| experts));
        let json = config_json(f, &m, &routers).unwrap();
        crate::io::checkpoint::ModelConfig::parse(&json.to_string(), "m.gguf".as_ref()).unwrap()
    };
    let c = parse("qwen35", false, &[("feed_forward_length", 96)]);
    let linear = c.linear.as_ref().unwrap();
    assert_eq!(
        (c.model_type.as_str(), c.num_hidden_layers),
        ("qwen3_5_text", 8)
    );
    assert_eq!(
        (
            linear.key_heads,
            linear.value_heads,
            linear.key_head_dim,
            linear.value_head_dim
        ),
        (2, 4, 16, 8)
    );
    assert_eq!(linear.layers, [0, 1, 2, 4, 5, 6]);
    assert!(c.gated_query);
    let moe = [("expert_count", 8), ("expert_feed_forward_length", 24)];
    let c = parse("qwen35moe", true, &moe);
    assert_eq!((c.intermediate_size, c.experts.unwrap().width), (24, 24));
    // Qwen3-Next: the same keys, its fused projections' table.
    let c = parse("qwen3next", true, &moe);
    let linear = c.linear.as_ref().unwrap();
    assert_eq!(
        (c.model_type.as_str(), linear.value_heads),
        ("qwen3_next", 4)
    );
    assert!(c.gated_query);
    let f = family_of("qwen3next", true).unwrap();
    assert_eq!(
        hf_name(f, "blk.2.ssm_ba.weight").as_deref(),
        Some("model.layers.2.linear_attn.in_proj_ba.weight")
    );
    assert_eq!(hf_name(f, "blk.2.attn_qkv.weight"), None); // joined with attn_gate
}

/// DeepSeek's GGUF config (`deepseek2`): the heads' sizes from the `*_mla` keys (the plain ones
/// describe the converter's multi-query form over the latent), every head its own keys, the
/// leading dense layers from the layers without a router (GLM-4.7-Flash's converter may write
/// `leading_dense_block_count` 0), and V3's model where the router has a bias, V2's otherwise.
#[test]
fn config_carries_latent_attention() {
    let parse = |q_latent: bool, bias: bool, extra: &[(&str, Value)]| {
        let f = family_of("deepseek2", true).unwrap();
        let mut m: HashMap<String, Value> = [
            ("block_count", 4),
            ("embedding_length", 64),
            ("feed_forward_length", 96),
            ("attention.head_count", 4),
            ("attention.head_count_kv", 1),
            ("attention.key_length", 20),
            ("attention.value_length", 16),
            ("attention.key_length_mla", 12),
            ("attention.value_length_mla", 10),
            ("attention.kv_lora_rank", 16),
            ("rope.dimension_count", 4),
            ("expert_count", 8),
            ("expert_feed_forward_length", 16),
            ("expert_shared_count", 1),
            ("leading_dense_block_count", 0),
        ]
        .iter()
        .chain(q_latent.then_some(&("attention.q_lora_rank", 24)))
        .map(|(k, v)| (format!("deepseek2.{k}"), Value::UInt(*v)))
        .collect();
        m.insert("deepseek2.expert_weights_scale".into(), Value::Float(2.5));
        for (k, v) in extra {
            m.insert(format!("deepseek2.{k}"), v.clone());
        }
        let mut tensors = routers_of(2..4);
        if bias {
            tensors[0].name = "blk.2.exp_probs_b.bias".into();
            tensors.extend(routers_of(2..3));
        }
        let json = config_json(f, &m, &tensors).unwrap();
        let c = crate::io::checkpoint::ModelConfig::parse(&json.to_string(), "m.gguf".as_ref())
            .unwrap();
        (json, c)
    };
    let (json, c) = parse(true, true, &[]);
    let l = c.latent.unwrap();
    assert_eq!(
        (l.q_lora_rank, l.kv_lora_rank, l.qk_nope_head_dim),
        (Some(24), 16, 8)
    );
    assert_eq!((l.qk_rope_head_dim, l.v_head_dim), (4, 10));
    assert_eq!(
        (c.model_type.as_str(), c.num_key_value_heads),
        ("deepseek_v3", 4)
    );
    assert_eq!(c.experts.unwrap().dense_layers, [0, 1]);
    assert_eq!(json["first_k_dense_replace"], 2);
    assert_eq!(json["routed_scaling_factor"], 2.5);
    // Absent from the metadata, the top-k weights are not normalized (the converter writes the
    // key only when they are), whatever transformers' default.
    assert_eq!(json["norm_topk_prob"], false);
    let (json, c) = parse(false, false, &[]);
    assert_eq!(c.latent.unwrap().q_lora_rank, None);
    assert_eq!(json["architectures"][0], "DeepseekV2ForCausalLM");
    assert!(json.get("topk_method").is_none());
    // DeepSeek-V2 routes within groups.
    let grouped = [
        ("expert_group_count", Value::UInt(8)),
        ("expert_weights_norm", Value::Bool(true)),
    ];
    let (json, _) = parse(false, false, &grouped);
    assert_eq!(json["topk_method"], "group_limited_greedy");
    assert_eq!(json["norm_topk_prob"], true);
    let f = family_of("deepseek2", true).unwrap();
    for (gguf, hf) in [
        (
            "blk.1.attn_kv_a_norm.weight",
            "self_attn.kv_a_layernorm.weight",
        ),
        ("blk.1.attn_kv_b.weight", "self_attn.kv_b_proj.weight"),
        ("blk.1.exp_probs_b.bias", "mlp.gate.e_score_correction_bias"),
    ] {
        assert_eq!(hf_name(f, gguf).unwrap(), format!("model.layers.1.{hf}"));
    }
    assert_eq!(hf_name(f, "blk.1.attn_k_b.weight"), None);
    // GLM-4.5 keeps the same router bias.
    let glm = family_of("glm4moe", true).unwrap();
    assert_eq!(
        hf_name(glm, "blk.3.exp_probs_b.bias").unwrap(),
        "model.layers.3.mlp.gate.e_score_correction_bias"
    );
}

/// The header entries of routers (`ffn_gate_inp`, 8 experts) in `layers`.
fn routers_of(layers: impl Iterator<Item = usize>) -> Vec<TensorInfo> {
    layers
        .map(|l| TensorInfo {
            name: format!("blk.{l}.ffn_gate_inp.weight"),
            dims: vec![64, 8],
            ty: crate::io::gguf::quant::GgmlType::F32,
            start: 0,
            end: 0,
        })
        .collect()
}

#[test]
fn norms_of_their_own_names_are_read_by_them() {
    let hunyuan = family_of("hunyuan-dense", false).unwrap();
    let exaone = family_of("exaone4", false).unwrap();
    for (f, q, k) in [
        (hunyuan, "query_layernorm", "key_layernorm"),
        (exaone, "q_norm", "k_norm"),
    ] {
        assert_eq!(
            hf_name(f, "blk.1.attn_q_norm.weight").unwrap(),
            format!("model.layers.1.self_attn.{q}.weight")
        );
        assert_eq!(
            hf_name(f, "blk.1.attn_k_norm.weight").unwrap(),
            format!("model.layers.1.self_attn.{k}.weight")
        );
    }
    // GLM-4's norms after the blocks have names of their own.
    let glm4 = family_of("glm4", false).unwrap();
    for (gguf, hf) in [
        ("post_attention_norm", "post_self_attn_layernorm"),
        ("ffn_norm", "post_attention_layernorm"),
        ("post_ffw_norm", "post_mlp_layernorm"),
        ("ffn_up", "mlp.gate_up_proj"),
    ] {
        let got = hf_name(glm4, &format!("blk.0.{gguf}.weight")).unwrap();
        assert_eq!(got, format!("model.layers.0.{hf}.weight"));
    }
    // EXAONE 4's norms follow the blocks.
    assert_eq!(
        hf_name(exaone, "blk.0.post_ffw_norm.weight").unwrap(),
        "model.layers.0.post_feedforward_layernorm.weight"
    );
}

#[test]
fn fused_expert_families_read_their_own_names() {
    // Llama 4's dense layers and shared expert live under `feed_forward`.
    let llama4 = family_of("llama4", true).unwrap();
    for (gguf, hf) in [
        ("ffn_gate", "feed_forward.gate_proj.weight"),
        ("ffn_up", "feed_forward.up_proj.weight"),
        ("ffn_down", "feed_forward.down_proj.weight"),
        ("ffn_up_shexp", "feed_forward.shared_expert.up_proj.weight"),
        ("ffn_gate_inp", "feed_forward.router.weight"),
    ] {
        let got = hf_name(llama4, &format!("blk.2.{gguf}.weight")).unwrap();
        assert_eq!(got, format!("model.layers.2.{hf}"));
    }
    assert_eq!(
        expert_tensor(llama4, "blk.1.ffn_down_exps.weight"),
        Some((1, "feed_forward.experts.{expert}.down_proj"))
    );
    // GPT-OSS's attention sinks and experts' biases, joined again by `convert --gguf`.
    let gpt_oss = family_of("gpt-oss", true).unwrap();
    for (gguf, hf) in [
        ("attn_sinks.weight", "self_attn.sinks"),
        ("ffn_gate_exps.bias", "mlp.experts.gate_proj_bias"),
        ("ffn_up_exps.bias", "mlp.experts.up_proj_bias"),
        ("ffn_down_exps.bias", "mlp.experts.down_proj_bias"),
        ("ffn_gate_inp.bias", "mlp.router.bias"),
    ] {
        let got = hf_name(gpt_oss, &format!("blk.0.{gguf}")).unwrap();
        assert_eq!(got, format!("model.layers.0.{hf}"));
    }
    // A family that stores experts one module each has no such tensors.
    let qwen = family_of("qwen3moe", true).unwrap();
    assert_eq!(hf_name(qwen, "blk.0.ffn_down_exps.bias"), None);
}
