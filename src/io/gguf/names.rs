//! What llama.cpp's conversion changed, undone: GGUF tensor names back to the Hugging Face ones,
//! the row order of Q and K (llama-family converters interleave the two halves of each head for
//! their rotary kernel), the `+ 1` Gemma's converters add to every norm weight, and a
//! `config.json` rebuilt from the metadata.

use std::collections::HashMap;

use serde_json::{json, Value as Json};

use crate::io::gguf::header::{TensorInfo, Value};

/// How one GGUF architecture was converted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Family {
    /// `general.architecture`.
    pub gguf: &'static str,
    /// The Hugging Face `model_type` and model class.
    pub model_type: &'static str,
    pub class: &'static str,
    /// Q and K rows were permuted for the rotary kernel (llama.cpp's `LlamaModel.permute`).
    pub permuted_qk: bool,
    /// Added to every `*norm.weight` by the converter (Gemma stores g − 1; its GGUF stores g).
    pub norm_shift: f32,
    /// Gemma 2/3: `ffn_norm` is the pre-feed-forward norm; elsewhere it is
    /// `post_attention_layernorm`, which where it follows the attention (Gemma 2/3, OLMo 2/3)
    /// GGUF calls `post_attention_norm`.
    pub sandwich_norms: bool,
    /// Phi-3: `attn_qkv` and `ffn_up` hold the fused `qkv_proj` and `gate_up_proj`.
    pub fused: bool,
    /// A mixture of experts (`<arch>.expert_count`): each layer's experts stacked in one tensor
    /// per projection (`ffn_gate_exps`, …), its router `ffn_gate_inp`.
    pub experts: bool,
}

/// Every architecture a GGUF base model may have here (Mistral models convert to `llama`, OLMo 3
/// to `olmo2`).
pub const FAMILIES: &[Family] = &[
    family(
        "llama",
        "llama",
        "LlamaForCausalLM",
        true,
        0.0,
        false,
        false,
    ),
    family(
        "qwen2",
        "qwen2",
        "Qwen2ForCausalLM",
        false,
        0.0,
        false,
        false,
    ),
    family(
        "qwen3",
        "qwen3",
        "Qwen3ForCausalLM",
        false,
        0.0,
        false,
        false,
    ),
    family(
        "gemma",
        "gemma",
        "GemmaForCausalLM",
        false,
        1.0,
        false,
        false,
    ),
    family(
        "gemma2",
        "gemma2",
        "Gemma2ForCausalLM",
        false,
        1.0,
        true,
        false,
    ),
    family(
        "gemma3",
        "gemma3_text",
        "Gemma3ForCausalLM",
        false,
        1.0,
        true,
        false,
    ),
    family("phi3", "phi3", "Phi3ForCausalLM", false, 0.0, false, true),
    // Granite converts as a Llama with its multipliers in the metadata.
    family(
        "granite",
        "granite",
        "GraniteForCausalLM",
        true,
        0.0,
        false,
        false,
    ),
    // OLMo 3 converts as OLMo 2 (its sliding windows change no weight); their norms follow the
    // blocks (`post_attention_norm`, `post_ffw_norm`), and their query/key norms span all heads.
    family(
        "olmo2",
        "olmo2",
        "Olmo2ForCausalLM",
        false,
        0.0,
        false,
        false,
    ),
    // Mixtures of experts; Mixtral converts as a Llama with experts.
    family(
        "qwen3moe",
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        false,
        0.0,
        false,
        false,
    )
    .with_experts(),
    family(
        "olmoe",
        "olmoe",
        "OlmoeForCausalLM",
        false,
        0.0,
        false,
        false,
    )
    .with_experts(),
    family(
        "llama",
        "mixtral",
        "MixtralForCausalLM",
        true,
        0.0,
        false,
        false,
    )
    .with_experts(),
    // llama.cpp converts SmolLM3 as a Llama (its NoPE layers change no weight).
    family(
        "smollm3",
        "smollm3",
        "SmolLM3ForCausalLM",
        true,
        0.0,
        false,
        false,
    ),
];

const fn family(
    gguf: &'static str,
    model_type: &'static str,
    class: &'static str,
    permuted_qk: bool,
    norm_shift: f32,
    sandwich_norms: bool,
    fused: bool,
) -> Family {
    Family {
        gguf,
        model_type,
        class,
        permuted_qk,
        norm_shift,
        sandwich_norms,
        fused,
        experts: false,
    }
}

impl Family {
    const fn with_experts(mut self) -> Family {
        self.experts = true;
        self
    }
}

/// The family of a `general.architecture` value, for a model with or without experts.
pub fn family_of(arch: &str, experts: bool) -> Option<&'static Family> {
    FAMILIES
        .iter()
        .find(|f| f.gguf == arch && f.experts == experts)
}

/// A layer's stacked experts tensor (`blk.3.ffn_up_exps.weight`): its layer and the key of one
/// expert's module below the layer, `{expert}` where the index goes, as the family's table names
/// it (`mlp.experts.{expert}.up_proj`; Mixtral's `block_sparse_moe.experts.{expert}.w3`).
pub fn expert_tensor(f: &Family, gguf: &str) -> Option<(usize, &'static str)> {
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    let mixtral = f.model_type == "mixtral";
    let key = match (rest, mixtral) {
        ("ffn_gate_exps.weight", false) => "mlp.experts.{expert}.gate_proj",
        ("ffn_up_exps.weight", false) => "mlp.experts.{expert}.up_proj",
        ("ffn_down_exps.weight", false) => "mlp.experts.{expert}.down_proj",
        ("ffn_gate_exps.weight", true) => "block_sparse_moe.experts.{expert}.w1",
        ("ffn_up_exps.weight", true) => "block_sparse_moe.experts.{expert}.w3",
        ("ffn_down_exps.weight", true) => "block_sparse_moe.experts.{expert}.w2",
        _ => return None,
    };
    f.experts.then_some((layer, key))
}

/// The GGUF module name (`attn_q`, `ffn_up`, …) of a layer projection's Hugging Face key below
/// the layer (`self_attn.q_proj`): the inverse of [`hf_name`] on projections.
pub fn gguf_module(f: &Family, key: &str) -> Option<&'static str> {
    Some(match key {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.qkv_proj" if f.fused => "attn_qkv",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" if !f.fused => "ffn_up",
        "mlp.gate_up_proj" if f.fused => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        // A layer's experts, stacked by llama.cpp into one tensor per projection (written as
        // LoRA tensors; bases with experts are not read).
        "mlp.experts.{expert}.gate_proj" | "block_sparse_moe.experts.{expert}.w1" => {
            "ffn_gate_exps"
        }
        "mlp.experts.{expert}.up_proj" | "block_sparse_moe.experts.{expert}.w3" => "ffn_up_exps",
        "mlp.experts.{expert}.down_proj" | "block_sparse_moe.experts.{expert}.w2" => {
            "ffn_down_exps"
        }
        _ => return None,
    })
}

/// The Hugging Face name of a GGUF tensor, or None for tensors the engine does not read
/// (rotary tables, …).
pub fn hf_name(f: &Family, gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_qkv" if f.fused => "self_attn.qkv_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_gate_inp" if f.model_type == "mixtral" => "block_sparse_moe.gate",
        "ffn_gate_inp" if f.experts => "mlp.gate",
        "ffn_up" if f.fused => "mlp.gate_up_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "ffn_norm" if f.sandwich_norms => "pre_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        // The norms of the blocks' outputs (Gemma 2/3, OLMo 2/3).
        "post_attention_norm" => "post_attention_layernorm",
        "post_ffw_norm" => "post_feedforward_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Heads whose rows the converter permuted in this tensor (Q: attention heads, K: key-value
/// heads), or None when its rows are stored in Hugging Face order.
pub fn permuted_heads(f: &Family, hf: &str, heads: usize, kv_heads: usize) -> Option<usize> {
    if !f.permuted_qk {
        return None;
    }
    if hf.ends_with("self_attn.q_proj.weight") || hf.ends_with("self_attn.q_proj.bias") {
        Some(heads)
    } else if hf.ends_with("self_attn.k_proj.weight") || hf.ends_with("self_attn.k_proj.bias") {
        Some(kv_heads)
    } else {
        None
    }
}

/// The stored row of Hugging Face row `row` in a tensor of `rows` rows whose `heads` heads were
/// permuted: each head's rows `[first half; second half]` were interleaved as
/// `(h, i, j) ← (h, j, i)`, i.e. HF row `h·d + j·d/2 + i` is stored at `h·d + 2i + j`.
pub fn stored_row(row: usize, rows: usize, heads: usize) -> usize {
    let d = rows / heads;
    let (h, r) = (row / d, row % d);
    let (j, i) = (r / (d / 2), r % (d / 2));
    h * d + 2 * i + j
}

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
    let layers = int("block_count")?;
    let hidden = int("embedding_length")?;
    let heads = int("attention.head_count")?;
    let mut config = json!({
        "model_type": f.model_type,
        "architectures": [f.class],
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "intermediate_size": int("feed_forward_length")?,
        "num_attention_heads": heads,
        "num_key_value_heads": int("attention.head_count_kv").unwrap_or(heads),
        "tie_word_embeddings": !tensors.iter().any(|t| t.name == "output.weight"),
        "torch_dtype": "float32",
    });
    let obj = config.as_object_mut().expect("an object");
    if let Ok(d) = int("attention.key_length") {
        obj.insert("head_dim".into(), d.into());
    }
    if let Some(embed) = tensors.iter().find(|t| t.name == "token_embd.weight") {
        obj.insert("vocab_size".into(), (*embed.dims.last().unwrap()).into());
    }
    if let Ok(n) = int("context_length") {
        obj.insert("max_position_embeddings".into(), n.into());
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
    ] {
        if let Some(v) = metadata.get(k).and_then(Value::as_u64) {
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
        let count = if f.model_type == "mixtral" {
            "num_local_experts"
        } else {
            "num_experts"
        };
        obj.insert(count.into(), int("expert_count")?.into());
        if let Ok(width) = int("expert_feed_forward_length") {
            obj.insert("moe_intermediate_size".into(), width.into());
        }
        if let Ok(used) = int("expert_used_count") {
            obj.insert("num_experts_per_tok".into(), used.into());
        }
    }
    if let Some(name) = metadata.get("general.name").and_then(Value::as_str) {
        obj.insert("_name_or_path".into(), name.into());
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_module_names_invert_hf_names_for_every_table_projection() {
        for f in FAMILIES {
            let table = crate::arch::all()
                .iter()
                .find(|a| a.model_types.iter().any(|t| t == f.model_type))
                .unwrap();
            for spec in &table.modules {
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
        let llama = family_of("llama", false).unwrap();
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

    /// The inverse of llama.cpp's `permute`: reshape(heads, 2, d/2, ·).swapaxes(1, 2).
    #[test]
    fn stored_rows_invert_the_converters_permutation() {
        let (heads, d) = (3, 8);
        let rows = heads * d;
        // The converter's permutation of HF rows 0..rows, written as numpy would.
        let mut permuted = vec![0; rows];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..d / 2 {
                    // HF (h, j, i) goes to position (h, i, j).
                    permuted[h * d + i * 2 + j] = h * d + j * (d / 2) + i;
                }
            }
        }
        for row in 0..rows {
            assert_eq!(permuted[stored_row(row, rows, heads)], row);
        }
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
            crate::io::checkpoint::ModelConfig::parse(
                &json.to_string(),
                std::path::Path::new("m.gguf"),
            )
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
}
