//! What llama.cpp's conversion changed, undone: GGUF tensor names back to the Hugging Face ones,
//! the row order of Q and K (llama-family converters interleave the two halves of each head for
//! their rotary kernel), and the `+ 1` Gemma's converters add to every norm weight (the
//! metadata's `config.json` is rebuilt in [`super::config`], the tensors beside the projections
//! read in [`super::state`]).

use crate::arch::{Block, Part, EXPERT_SLOT};

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
    /// GGUF modules whose Hugging Face name is the family's own (under the layer): Hunyuan's
    /// query and key norms, GLM-4's norms after the blocks.
    pub own_names: &'static [(&'static str, &'static str)],
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
    // GLM-4 (0414): separate q, k and v but a fused `gate_up_proj` (`ffn_up`), and a norm after
    // each block besides the ones before (`post_attention_norm`, `post_ffw_norm`).
    family("glm4", "glm4", "Glm4ForCausalLM", false, 0.0, false, true).with_names(&[
        ("post_attention_norm", "post_self_attn_layernorm"),
        ("post_ffw_norm", "post_mlp_layernorm"),
    ]),
    // GLM-4-9B in transformers' form (`GlmForCausalLM`), which llama.cpp converts as ChatGLM:
    // the same tensors without the norms after the blocks.
    family("chatglm", "glm", "GlmForCausalLM", false, 0.0, false, true),
    // Seed-OSS, ERNIE 4.5, Hunyuan (query and key norms named `query_layernorm`, `key_layernorm`)
    // and EXAONE 4 (norms after the blocks, as OLMo 2's): Llama's tensors, rows as stored.
    family(
        "seed_oss",
        "seed_oss",
        "SeedOssForCausalLM",
        false,
        0.0,
        false,
        false,
    ),
    family(
        "ernie4_5",
        "ernie4_5",
        "Ernie4_5ForCausalLM",
        false,
        0.0,
        false,
        false,
    ),
    family(
        "hunyuan-dense",
        "hunyuan_v1_dense",
        "HunYuanDenseV1ForCausalLM",
        false,
        0.0,
        false,
        false,
    )
    .with_names(&[
        ("attn_q_norm", "self_attn.query_layernorm"),
        ("attn_k_norm", "self_attn.key_layernorm"),
    ]),
    family(
        "exaone4",
        "exaone4",
        "Exaone4ForCausalLM",
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
    // Llama 4: the checkpoint's fused experts split (gate, up) and turned round to `[E, width,
    // in]` by the converter, as every family's; a shared expert in each MoE layer, dense layers
    // (`feed_forward.*`) where `interleave_moe_layer_step` leaves them; Q and K rows as stored.
    family(
        "llama4",
        "llama4_text",
        "Llama4ForCausalLM",
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
    // [`super::state`]); experts in every layer.
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
    // (`exp_probs_b`) or a sigmoid, V2's otherwise ([`super::latent::config`]); the tables are the same.
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
        own_names: &[],
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

    const fn with_names(mut self, names: &'static [(&'static str, &'static str)]) -> Family {
        self.own_names = names;
        self
    }

    const fn with_latent_attention(mut self) -> Family {
        self.latent_attention = true;
        self
    }

    /// Whether llama.cpp's architecture has dense MLP tensors (`ffn_gate`, …): every dense
    /// family, GLM-4.5 and DeepSeek for their leading dense layers, Llama 4 for those between
    /// its MoE layers; qwen2moe, qwen3moe, qwen35moe, qwen3next, olmoe, gpt-oss and Mixtral have
    /// experts in every layer.
    pub fn dense_mlp(&self) -> bool {
        !self.experts || matches!(self.gguf, "glm4moe" | "deepseek2" | "llama4")
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
        "mlp.gate_up_proj" if f.fused => "ffn_up",
        // The dense MLP's projections and a layer's experts (stacked by llama.cpp into one tensor
        // per projection), as the family's table names them (`mlp.up_proj`,
        // `mlp.experts.{expert}.up_proj`; Mixtral's `block_sparse_moe.experts.{expert}.w3`;
        // Llama 4's `feed_forward.up_proj`, `feed_forward.experts.{expert}.up_proj`).
        k if f.dense_mlp() && single_part_key(f, Block::Mlp, Part::Gate) == Some(k) => "ffn_gate",
        k if f.dense_mlp() && single_part_key(f, Block::Mlp, Part::Up) == Some(k) => "ffn_up",
        k if f.dense_mlp() && single_part_key(f, Block::Mlp, Part::Down) == Some(k) => "ffn_down",
        k if single_part_key(f, Block::Experts, Part::Gate) == Some(k) => "ffn_gate_exps",
        k if single_part_key(f, Block::Experts, Part::Up) == Some(k) => "ffn_up_exps",
        k if single_part_key(f, Block::Experts, Part::Down) == Some(k) => "ffn_down_exps",
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

/// The Hugging Face key of the projection of `part` alone in `block`, as the family's table
/// names it (`mlp.up_proj`; Llama 4's `feed_forward.up_proj`); None where the table fuses it
/// with another or has no such block.
fn single_part_key(f: &Family, block: Block, part: Part) -> Option<&'static str> {
    let spec = table_of(f)?.module_in(block, part)?;
    (spec.parts == [part]).then_some(spec.key.as_str())
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
    // DeepSeek-V3's and GLM-4.5's router bias, a tensor of its own in Hugging Face's naming.
    if module == "exp_probs_b" && (f.latent_attention || f.gguf == "glm4moe") {
        let router = table_of(f)?.router.as_deref()?.strip_suffix(".weight")?;
        return Some(format!(
            "model.layers.{layer}.{router}.e_score_correction_bias"
        ));
    }
    // GPT-OSS's attention sinks (a value per head), and its experts' biases, `[E, out]` per
    // projection, which the converter split as it split the weights: read so that `convert
    // --gguf` writes them back fused (`super::fuse_experts`); no LoRA touches them.
    let stored = table_of(f).and_then(|t| t.stored_experts.as_ref());
    if let Some((spec, experts)) =
        stored.and_then(|s| Some((s, s.gate_up.strip_suffix(".gate_up_proj")?)))
    {
        let found = match (module, kind) {
            ("attn_sinks", "weight") => "self_attn.sinks".to_string(),
            ("ffn_gate_exps", "bias") => format!("{experts}.gate_proj_bias"),
            ("ffn_up_exps", "bias") => format!("{experts}.up_proj_bias"),
            ("ffn_down_exps", "bias") => format!("{}_bias", spec.down),
            _ => String::new(),
        };
        if !found.is_empty() {
            return Some(format!("model.layers.{layer}.{found}"));
        }
    }
    // Early conversions of Mixtral kept one tensor per expert: `blk.3.ffn_gate.5.weight`.
    if let Some((projection, expert)) = module.rsplit_once('.') {
        let digits = !expert.is_empty() && expert.bytes().all(|b| b.is_ascii_digit());
        let stacked = format!("blk.{layer}.{projection}_exps.{kind}");
        let (_, key) = expert_tensor(f, &stacked).filter(|_| digits)?;
        let key = key.replace(EXPERT_SLOT, expert);
        return Some(format!("model.layers.{layer}.{key}.{kind}"));
    }
    if let Some((_, hf)) = f.own_names.iter().find(|(g, _)| *g == module) {
        return Some(format!("model.layers.{layer}.{hf}.{kind}"));
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
        "ffn_gate" => single_part_key(f, Block::Mlp, Part::Gate).unwrap_or("mlp.gate_proj"),
        // The router, where the family's table names it.
        "ffn_gate_inp" if f.experts => table_of(f)?.router.as_deref()?.strip_suffix(".weight")?,
        "ffn_up" if f.fused => "mlp.gate_up_proj",
        "ffn_up" => single_part_key(f, Block::Mlp, Part::Up).unwrap_or("mlp.up_proj"),
        "ffn_down" => single_part_key(f, Block::Mlp, Part::Down).unwrap_or("mlp.down_proj"),
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

#[cfg(test)]
#[path = "names_tests.rs"]
mod tests;
