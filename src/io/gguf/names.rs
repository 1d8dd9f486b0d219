//! What llama.cpp's conversion changed, undone: GGUF tensor names back to the Hugging Face ones,
//! the row order of Q and K (llama-family converters interleave the two halves of each head for
//! their rotary kernel), the `+ 1` Gemma's converters add to every norm weight, and a
//! `config.json` rebuilt from the metadata.

use std::collections::HashMap;

use serde_json::{json, Value as Json};

use crate::arch::{Block, Part, EXPERT_SLOT};
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
    /// Qwen3.5: linear attention in most layers (`attn_qkv`, `attn_gate`, `ssm_beta`,
    /// `ssm_alpha`, `ssm_out`), its value heads reordered by the converter ([`super::reorder`]).
    pub linear_attention: bool,
    /// Qwen3-Next: linear attention in fused projections, `in_proj_qkvz` regrouped by the
    /// converter into `attn_qkv` and `attn_gate` and joined again on read ([`super::joined`]),
    /// `in_proj_ba` as `ssm_ba`.
    pub fused_linear_attention: bool,
    /// DeepSeek-V2/V3, Kimi K2 and GLM-4.7-Flash (`deepseek2`): latent attention (`attn_q_a`,
    /// `attn_q_b`, `attn_kv_a_mqa`), its `kv_b_proj` split by the converter into `attn_k_b`
    /// (each head's key rows transposed) and `attn_v_b`, joined again on read ([`super::latent`]).
    pub latent_attention: bool,
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
    // Qwen2-MoE and GLM-4.5 add a shared expert (`ffn_*_shexp`) and may keep dense layers.
    family(
        "qwen2moe",
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
        false,
        0.0,
        false,
        false,
    )
    .with_experts(),
    family(
        "glm4moe",
        "glm4_moe",
        "Glm4MoeForCausalLM",
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
    // GPT-OSS: the converter splits the fused `gate_up_proj` (gate and up outputs alternating,
    // stored `[E, in, 2·width]`) into `ffn_gate_exps` and `ffn_up_exps`, each `[E, width, in]`
    // as every family's, so each expert reads as the others' do; its experts are MXFP4 when the
    // release's were.
    family(
        "gpt-oss",
        "gpt_oss",
        "GptOssForCausalLM",
        false,
        0.0,
        false,
        false,
    )
    .with_experts(),
    // Qwen3.5, with experts or without: norms stored as g (Hugging Face's g − 1, as Gemma's); the
    // text model of a multimodal release, as its causal-LM class loads it.
    family(
        "qwen35",
        "qwen3_5_text",
        "Qwen3_5ForCausalLM",
        false,
        1.0,
        false,
        false,
    )
    .with_linear_attention(),
    family(
        "qwen35moe",
        "qwen3_5_moe_text",
        "Qwen3_5MoeForCausalLM",
        false,
        1.0,
        false,
        false,
    )
    .with_experts()
    .with_linear_attention(),
    // Qwen3-Next: norms stored as g, as Qwen3.5's (its linear attention's gated norm excepted,
    // which the engine does not read); experts in every layer.
    family(
        "qwen3next",
        "qwen3_next",
        "Qwen3NextForCausalLM",
        false,
        1.0,
        false,
        false,
    )
    .with_experts()
    .with_fused_linear_attention(),
    // DeepSeek-V2/V3, Kimi K2 and GLM-4.7-Flash: latent attention, leading dense layers, a
    // shared expert. The metadata's model is DeepSeek-V3's where the router has its bias
    // (`exp_probs_b`) or a sigmoid, V2's otherwise (`config_json`); the tables are the same.
    family(
        "deepseek2",
        "deepseek_v3",
        "DeepseekV3ForCausalLM",
        false,
        0.0,
        false,
        false,
    )
    .with_experts()
    .with_latent_attention(),
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
        linear_attention: false,
        fused_linear_attention: false,
        latent_attention: false,
    }
}

impl Family {
    const fn with_experts(mut self) -> Family {
        self.experts = true;
        self
    }

    const fn with_linear_attention(mut self) -> Family {
        self.linear_attention = true;
        self
    }

    const fn with_fused_linear_attention(mut self) -> Family {
        self.fused_linear_attention = true;
        self
    }

    const fn with_latent_attention(mut self) -> Family {
        self.latent_attention = true;
        self
    }

    /// Whether llama.cpp's architecture has dense MLP tensors (`ffn_gate`, …): every dense
    /// family, and GLM-4.5 and DeepSeek for their leading dense layers; qwen2moe, qwen3moe,
    /// qwen35moe, olmoe, gpt-oss and Mixtral have experts in every layer.
    pub fn dense_mlp(&self) -> bool {
        !self.experts || matches!(self.gguf, "glm4moe" | "deepseek2")
    }
}

/// The family of a `general.architecture` value, for a model with or without experts.
pub fn family_of(arch: &str, experts: bool) -> Option<&'static Family> {
    FAMILIES
        .iter()
        .find(|f| f.gguf == arch && f.experts == experts)
}

/// The architecture table of a family (every family has one: a test holds it).
fn table_of(f: &Family) -> Option<&'static crate::arch::Arch> {
    crate::arch::all()
        .iter()
        .find(|a| a.model_types.iter().any(|t| t == f.model_type))
}

/// A layer's stacked experts tensor (`blk.3.ffn_up_exps.weight`): its layer and the key of one
/// expert's module below the layer, `{expert}` where the index goes, as the family's table names
/// it (`mlp.experts.{expert}.up_proj`; Mixtral's `block_sparse_moe.experts.{expert}.w3`): the
/// table's expert module whose GGUF name ([`gguf_module`]) it is.
pub fn expert_tensor(f: &Family, gguf: &str) -> Option<(usize, &'static str)> {
    if !f.experts {
        return None;
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let module = rest.strip_suffix(".weight")?;
    let spec = table_of(f)?
        .modules
        .iter()
        .find(|m| m.expert && gguf_module(f, &m.key) == Some(module))?;
    Some((layer.parse().ok()?, spec.key.as_str()))
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
        // Latent attention's (`self_attn.kv_b_proj` is two tensors: see [`super::latent`]).
        "self_attn.q_a_proj" if f.latent_attention => "attn_q_a",
        "self_attn.q_b_proj" if f.latent_attention => "attn_q_b",
        "self_attn.kv_a_proj_with_mqa" if f.latent_attention => "attn_kv_a_mqa",
        // Qwen3.5's linear attention.
        "linear_attn.in_proj_qkv" if f.linear_attention => "attn_qkv",
        "linear_attn.in_proj_z" if f.linear_attention => "attn_gate",
        "linear_attn.in_proj_b" if f.linear_attention => "ssm_beta",
        "linear_attn.in_proj_a" if f.linear_attention => "ssm_alpha",
        "linear_attn.out_proj" if f.linear_attention || f.fused_linear_attention => "ssm_out",
        // Qwen3-Next's (`in_proj_qkvz` is two tensors: see [`super::joined`]).
        "linear_attn.in_proj_ba" if f.fused_linear_attention => "ssm_ba",
        "mlp.gate_proj" if f.dense_mlp() => "ffn_gate",
        "mlp.up_proj" if !f.fused && f.dense_mlp() => "ffn_up",
        "mlp.gate_up_proj" if f.fused => "ffn_up",
        "mlp.down_proj" if f.dense_mlp() => "ffn_down",
        // A layer's experts, stacked by llama.cpp into one tensor per projection.
        "mlp.experts.{expert}.gate_proj" | "block_sparse_moe.experts.{expert}.w1" => {
            "ffn_gate_exps"
        }
        "mlp.experts.{expert}.up_proj" | "block_sparse_moe.experts.{expert}.w3" => "ffn_up_exps",
        "mlp.experts.{expert}.down_proj" | "block_sparse_moe.experts.{expert}.w2" => {
            "ffn_down_exps"
        }
        // The shared expert beside them, where the family's table has one.
        k if shared_expert_key(f, Part::Gate) == Some(k) => "ffn_gate_shexp",
        k if shared_expert_key(f, Part::Up) == Some(k) => "ffn_up_shexp",
        k if shared_expert_key(f, Part::Down) == Some(k) => "ffn_down_shexp",
        _ => return None,
    })
}

/// The Hugging Face key of the shared expert's projection of `part`, as the family's table names
/// it (`mlp.shared_expert.up_proj`; GLM-4.5's `mlp.shared_experts.up_proj`).
fn shared_expert_key(f: &Family, part: Part) -> Option<&'static str> {
    let spec = table_of(f)?.module_in(Block::SharedExpert, part)?;
    Some(spec.key.as_str())
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
    // DeepSeek-V3's router bias, a tensor of its own in Hugging Face's naming.
    if module == "exp_probs_b" && f.latent_attention {
        let router = table_of(f)?.router.as_deref()?.strip_suffix(".weight")?;
        return Some(format!(
            "model.layers.{layer}.{router}.e_score_correction_bias"
        ));
    }
    // Early conversions of Mixtral kept one tensor per expert: `blk.3.ffn_gate.5.weight`.
    if let Some((projection, expert)) = module.rsplit_once('.') {
        let digits = !expert.is_empty() && expert.bytes().all(|b| b.is_ascii_digit());
        let stacked = format!("blk.{layer}.{projection}_exps.{kind}");
        let (_, key) = expert_tensor(f, &stacked).filter(|_| digits)?;
        let key = key.replace(EXPERT_SLOT, expert);
        return Some(format!("model.layers.{layer}.{key}.{kind}"));
    }
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_qkv" if f.fused => "self_attn.qkv_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_a" if f.latent_attention => "self_attn.q_a_proj",
        "attn_q_b" if f.latent_attention => "self_attn.q_b_proj",
        "attn_kv_a_mqa" if f.latent_attention => "self_attn.kv_a_proj_with_mqa",
        // Conversions before llama.cpp split it kept `kv_b_proj` whole.
        "attn_kv_b" if f.latent_attention => "self_attn.kv_b_proj",
        "attn_q_a_norm" if f.latent_attention => "self_attn.q_a_layernorm",
        "attn_kv_a_norm" if f.latent_attention => "self_attn.kv_a_layernorm",
        "attn_qkv" if f.linear_attention => "linear_attn.in_proj_qkv",
        "attn_gate" if f.linear_attention => "linear_attn.in_proj_z",
        "ssm_beta" if f.linear_attention => "linear_attn.in_proj_b",
        "ssm_alpha" if f.linear_attention => "linear_attn.in_proj_a",
        "ssm_out" if f.linear_attention || f.fused_linear_attention => "linear_attn.out_proj",
        "ssm_ba" if f.fused_linear_attention => "linear_attn.in_proj_ba",
        // Conversions before llama.cpp regrouped it kept `in_proj_qkvz` whole.
        "ssm_in" if f.fused_linear_attention => "linear_attn.in_proj_qkvz",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        // The router, where the family's table names it.
        "ffn_gate_inp" if f.experts => table_of(f)?.router.as_deref()?.strip_suffix(".weight")?,
        "ffn_up" if f.fused => "mlp.gate_up_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "ffn_gate_shexp" if f.experts => shared_expert_key(f, Part::Gate)?,
        "ffn_up_shexp" if f.experts => shared_expert_key(f, Part::Up)?,
        "ffn_down_shexp" if f.experts => shared_expert_key(f, Part::Down)?,
        // The shared expert's own gate (Qwen2-MoE, Qwen3-Next, Qwen3.5-MoE).
        "ffn_gate_inp_shexp" if f.experts => "mlp.shared_expert_gate",
        "ffn_norm" if f.sandwich_norms => "pre_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        // The norms of the blocks' outputs (Gemma 2/3, OLMo 2/3).
        "post_attention_norm" => "post_attention_layernorm",
        "post_ffw_norm" => "post_feedforward_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
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
    if let Ok(d) = int("attention.key_length") {
        obj.insert("head_dim".into(), d.into());
    }
    if let Some(embed) = tensors.iter().find(|t| t.name == "token_embd.weight") {
        obj.insert("vocab_size".into(), (*embed.dims.last().unwrap()).into());
    }
    if let Ok(n) = int("context_length") {
        obj.insert("max_position_embeddings".into(), n.into());
    }
    if let Ok(n) = int("attention.sliding_window") {
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
        let count = match f.model_type {
            "mixtral" | "gpt_oss" => "num_local_experts",
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
        if !dense.is_empty() {
            obj.insert("mlp_only_layers".into(), dense.into());
        }
    }
    if extra > 0 {
        obj.insert("num_nextn_predict_layers".into(), extra.into());
    }
    if f.latent_attention {
        super::latent::config(f.gguf, metadata, tensors, obj)?;
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
    }
    if let Some(name) = metadata.get("general.name").and_then(Value::as_str) {
        obj.insert("_name_or_path".into(), name.into());
    }
    Ok(config)
}

#[cfg(test)]
#[path = "names_tests.rs"]
mod tests;
