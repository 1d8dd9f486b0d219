//! A `config.json` rebuilt from a GGUF's metadata and tensor shapes: the sizes the engine reads,
//! in the fields and under the `model_type` of the family's Hugging Face configs, so that
//! `convert --gguf`'s output loads where the checkpoint it came from does.

use std::collections::HashMap;

use serde_json::{json, Value as Json};

use super::header::{TensorInfo, Value};
use super::names::Family;

/// A `config.json` for the engine, from the metadata and tensor shapes (the fields
/// [`crate::io::checkpoint::ModelConfig`] reads, plus the ones a reader of the report expects).
pub fn config_json(
    f: &Family,
    metadata: &HashMap<String, Value>,
    tensors: &[TensorInfo],
) -> Result<Json, String> {
    let key = |k: &str| format!("{}.{k}", f.gguf);
    let int = |k: &str| -> Result<u64, String> {
        let name = key(k);
        match metadata.get(&name) {
            Some(v) => v
                .as_u64()
                .or_else(|| {
                    // Some files give a per-layer array; the engine needs one value.
                    let a = v.as_array()?;
                    let first = a.first()?.as_u64()?;
                    a.iter().all(|x| x.as_u64() == Some(first)).then_some(first)
                })
                .ok_or_else(|| format!("metadata `{name}` is not a single integer ({v:?})")),
            None => Err(format!("metadata `{name}` is missing")),
        }
    };
    let mut layers = int("block_count")?;
    // Bounded before anything loops over the layers (config.json's own limit).
    if layers > 1 << 16 {
        return Err(format!(
            "metadata `{}` = {layers} is beyond any supported model (max 65536)",
            key("block_count")
        ));
    }
    // Multi-token-prediction layers (GLM-4.5's, Qwen3.5's) follow the model's own in
    // `block_count`.
    let extra = int("nextn_predict_layers").unwrap_or(0).min(layers);
    layers -= extra;
    let hidden = int("embedding_length")?;
    let heads = int("attention.head_count")?;
    let mut config = json!({
        "model_type": f.model_type,
        "architectures": [f.class],
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        // A mixture of experts with no dense MLP may give only the experts' width (Qwen3.5-MoE).
        "intermediate_size": int("feed_forward_length")
            .or_else(|e| int("expert_feed_forward_length").map_err(|_| e))?,
        "num_attention_heads": heads,
        "num_key_value_heads": int("attention.head_count_kv").unwrap_or(heads),
        "tie_word_embeddings": !tensors.iter().any(|t| t.name == "output.weight"),
        "torch_dtype": "float32",
    });
    let obj = config.as_object_mut().expect("an object");
    // Without `key_length` llama.cpp takes a head to be hidden / heads wide; the config says so,
    // since some families' defaults differ (GLM's 128).
    let head_dim = int("attention.key_length").unwrap_or(hidden / heads.max(1));
    obj.insert("head_dim".into(), head_dim.into());
    if let Some(embed) = tensors.iter().find(|t| t.name == "token_embd.weight") {
        obj.insert("vocab_size".into(), (*embed.dims.last().unwrap()).into());
    }
    if let Ok(n) = int("context_length") {
        obj.insert("max_position_embeddings".into(), n.into());
    }
    // Phi-3's converter writes 0 for a model without a window (Phi-4), which is what a
    // config's null says.
    if let Some(n) = int("attention.sliding_window").ok().filter(|&n| n > 0) {
        obj.insert("sliding_window".into(), n.into());
    }
    for (field, k) in [
        ("rms_norm_eps", "attention.layer_norm_rms_epsilon"),
        ("rope_theta", "rope.freq_base"),
        // Granite's multipliers, which llama.cpp calls scales.
        ("attention_multiplier", "attention.scale"),
        ("embedding_multiplier", "embedding_scale"),
        ("residual_multiplier", "residual_scale"),
        ("logits_scaling", "logit_scale"),
    ] {
        if let Some(v) = metadata.get(&key(k)).and_then(Value::as_f64) {
            obj.insert(field.into(), v.into());
        }
    }
    for (field, k) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ] {
        // An id past the embedding's rows would stop the model's embedding from being built
        // (`padding_idx` is checked against it).
        let vocab = obj
            .get("vocab_size")
            .and_then(Json::as_u64)
            .unwrap_or(u64::MAX);
        if let Some(v) = metadata
            .get(k)
            .and_then(Value::as_u64)
            .filter(|&v| v < vocab)
        {
            obj.insert(field.into(), v.into());
        }
    }
    // Gemma 2/3 scale the attention scores by `query_pre_attn_scalar^-½`, a config field GGUF
    // does not hold: llama.cpp takes hidden/heads for the 27B models (known by their depth) and
    // head_dim for the others, as Google's reference does.
    let query_pre_attn_scalar = match (f.gguf, layers) {
        ("gemma2", 46) | ("gemma3", 62) => Some(hidden / heads.max(1)),
        ("gemma2" | "gemma3", _) => int("attention.key_length").ok(),
        _ => None,
    };
    if let Some(q) = query_pre_attn_scalar {
        obj.insert("query_pre_attn_scalar".into(), q.into());
    }
    if f.experts {
        // Mixtral's experts are `intermediate_size` wide; Qwen3-MoE's have their own width.
        let count = match f.model_type {
            "mixtral" | "gpt_oss" | "llama4_text" => "num_local_experts",
            "glm4_moe" | "deepseek_v3" => "n_routed_experts",
            _ => "num_experts",
        };
        obj.insert(count.into(), int("expert_count")?.into());
        for (field, k) in [
            ("moe_intermediate_size", "expert_feed_forward_length"),
            ("num_experts_per_tok", "expert_used_count"),
            // Qwen2-MoE's shared expert has its own width; GLM-4.5 counts shared experts.
            (
                "shared_expert_intermediate_size",
                "expert_shared_feed_forward_length",
            ),
            ("n_shared_experts", "expert_shared_count"),
            ("first_k_dense_replace", "leading_dense_block_count"),
        ] {
            if let Ok(v) = int(k) {
                obj.insert(field.into(), v.into());
            }
        }
        // A layer without a router has a dense MLP (Qwen's `mlp_only_layers`, which the
        // metadata does not hold; GLM-4.5's leading dense layers).
        let names: std::collections::HashSet<&str> =
            tensors.iter().map(|t| t.name.as_str()).collect();
        let dense: Vec<u64> = (0..layers)
            .filter(|l| !names.contains(format!("blk.{l}.ffn_gate_inp.weight").as_str()))
            .collect();
        if f.gguf == "llama4" {
            // Llama 4's experts are `intermediate_size` wide and its dense MLP
            // `intermediate_size_mlp`; the layers with experts are listed.
            let dense_width = obj.remove("intermediate_size").expect("set above");
            obj.insert("intermediate_size_mlp".into(), dense_width);
            let width = obj.remove("moe_intermediate_size").ok_or_else(|| {
                format!(
                    "metadata `{}` is missing",
                    key("expert_feed_forward_length")
                )
            })?;
            obj.insert("intermediate_size".into(), width);
            let sparse: Vec<u64> = (0..layers).filter(|l| !dense.contains(l)).collect();
            obj.insert("moe_layers".into(), sparse.into());
            if let Ok(step) = int("interleave_moe_layer_step") {
                obj.insert("interleave_moe_layer_step".into(), step.into());
            }
            // llama.cpp's graph norms queries and keys except in the 128-expert model (Maverick),
            // as the releases' configs say; the metadata does not.
            let qk_norm = int("expert_count")? != 128;
            obj.insert("use_qk_norm".into(), qk_norm.into());
        } else if !dense.is_empty() {
            obj.insert("mlp_only_layers".into(), dense.into());
        }
    }
    if extra > 0 {
        // Qwen's configs call it by the block's own name.
        let field = match f.linear_attention || f.fused_linear_attention {
            true => "mtp_num_hidden_layers",
            false => "num_nextn_predict_layers",
        };
        obj.insert(field.into(), extra.into());
    }
    if f.latent_attention {
        super::latent::config(f.gguf, metadata, tensors, obj)?;
    } else if let Ok(rotary) = int("rope.dimension_count") {
        // The part of each head the rotation turns, said even where it is all of it: the
        // families' defaults differ (Qwen3.5's a quarter, GLM's a half; Phi-4-mini turns three
        // quarters with Phi-3's config, whose default is all). Latent attention's rotary part
        // is a head of its own.
        let factor = rotary as f64 / head_dim.max(1) as f64;
        obj.insert("partial_rotary_factor".into(), factor.into());
    }
    if f.linear_attention || f.fused_linear_attention {
        // Qwen3.5's and Qwen3-Next's linear attention, as the converter names its sizes (the
        // SSM's).
        let value_heads = int("ssm.time_step_rank")?;
        for (field, value) in [
            ("linear_num_key_heads", int("ssm.group_count")?),
            ("linear_num_value_heads", value_heads),
            ("linear_key_head_dim", int("ssm.state_size")?),
            (
                "linear_value_head_dim",
                int("ssm.inner_size")? / value_heads.max(1),
            ),
            (
                "full_attention_interval",
                int("full_attention_interval").unwrap_or(4),
            ),
        ] {
            obj.insert(field.into(), value.into());
        }
        if let Ok(kernel) = int("ssm.conv_kernel") {
            obj.insert("linear_conv_kernel_dim".into(), kernel.into());
        }
    }
    if let Some(name) = metadata.get("general.name").and_then(Value::as_str) {
        obj.insert("_name_or_path".into(), name.into());
    }
    Ok(config)
}
