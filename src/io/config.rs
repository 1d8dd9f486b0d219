//! `config.json`: the fields the engine uses (for multimodal configs, those of `text_config`),
//! each checked against the sizes a model can have: depth, widths, heads, the constant factors
//! of the forward pass and, for a mixture of experts, the experts' count and width.

use std::path::Path;

use crate::error::{Error, Result};

/// The fields of `config.json` the engine uses (for multimodal configs, those of `text_config`).
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub model_type: String,
    pub architectures: Vec<String>,
    pub num_hidden_layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// Constant factors of the forward pass (the map mode carries them).
    pub scales: Scales,
    /// The experts of a mixture-of-experts model (Mixtral, Qwen3-MoE, OLMoE); none for a dense one.
    pub experts: Option<Experts>,
    /// Multi-head latent attention (DeepSeek-V2/V3, Kimi K2, GLM-4.7-Flash); none for the others.
    pub latent: Option<Latent>,
    /// Linear attention in some layers (Qwen3.5's Gated DeltaNet); none where every layer has
    /// softmax attention.
    pub linear: Option<LinearAttention>,
    /// Each head's `q_proj` rows are its query followed by as many of its output gate (Qwen3.5,
    /// Qwen3-Next), so `q_proj` is twice `heads · head_dim`.
    pub gated_query: bool,
    /// The whole file, kept so that unknown fields survive a rewrite.
    pub raw: serde_json::Value,
}

/// Constant factors a family applies in its forward pass, which the weights do not show.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scales {
    /// The embedding's factor before the first layer (`embedding_multiplier`, Granite; 1).
    pub embedding: f64,
    /// The factor of every block's output before it joins the residual
    /// (`residual_multiplier`, Granite; 1).
    pub residual: f64,
    /// The attention scores' factor: `attention_multiplier` (Granite, 1 where absent), else
    /// `query_pre_attn_scalar^-½` (Gemma 2/3), else `head_dim^-½`.
    pub attention: f64,
}

/// Multi-head latent attention's sizes: queries through a rank-`q_lora_rank` latent (or one
/// `q_proj` where it is null), keys and values through a shared rank-`kv_lora_rank` latent plus a
/// rotary key of `qk_rope_head_dim` every head shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latent {
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
}

/// Linear attention's sizes (Qwen3.5's Gated DeltaNet: `in_proj_qkv` gives keys, queries and
/// values, `in_proj_z` the output gate, `in_proj_b` and `in_proj_a` a value per value head,
/// `out_proj` writes back) and the layers that have it instead of softmax attention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearAttention {
    pub key_heads: usize,
    pub value_heads: usize,
    pub key_head_dim: usize,
    pub value_head_dim: usize,
    /// The layers with linear attention, in ascending order.
    pub layers: Vec<usize>,
}

impl LinearAttention {
    /// Whether `layer`'s attention is linear (else softmax attention).
    pub fn holds(&self, layer: usize) -> bool {
        self.layers.binary_search(&layer).is_ok()
    }
}

/// The expert MLPs of a mixture-of-experts model: how many each layer has, their width, the
/// shared expert beside them, and which layers keep a dense MLP instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Experts {
    /// `num_local_experts` (Mixtral), `num_experts` (Qwen-MoE, OLMoE) or `n_routed_experts`
    /// (GLM-4.5).
    pub count: usize,
    /// Each expert's hidden width: `moe_intermediate_size` (Qwen-MoE), else `intermediate_size`
    /// (Llama 4's, whose dense MLP is `intermediate_size_mlp` wide).
    pub width: usize,
    /// The width of the MLP every token passes through beside its experts (Qwen2-MoE's
    /// `shared_expert_intermediate_size`; GLM-4.5's `n_shared_experts` experts wide, stored as one
    /// MLP; Llama 4's of the experts' width); none where the layers have no shared expert.
    pub shared_width: Option<usize>,
    /// The layers whose MLP is dense, `intermediate_size` wide (Qwen's `mlp_only_layers` and
    /// `decoder_sparse_step`, GLM-4.5's first `first_k_dense_replace`, those Llama 4's
    /// `moe_layers` leaves out), in ascending order.
    pub dense_layers: Vec<usize>,
}

impl Experts {
    /// Whether `layer`'s MLP is experts (else dense).
    pub fn sparse(&self, layer: usize) -> bool {
        self.dense_layers.binary_search(&layer).is_err()
    }
}

impl ModelConfig {
    /// Parses a `config.json` text; `path` is for messages only.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let raw: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::config(path, format!("invalid JSON: {e}")))?;
        let top = raw
            .as_object()
            .ok_or_else(|| Error::config(path, "config.json is not a JSON object"))?;
        // Multimodal wrappers (Gemma 3 and others) keep the language model's fields in text_config.
        let text = top
            .get("text_config")
            .and_then(|v| v.as_object())
            .unwrap_or(top);
        let model_type = top
            .get("model_type")
            .or_else(|| text.get("model_type"))
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::config(path, "no `model_type` field"))?
            .to_string();
        let architectures = top
            .get("architectures")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let get = |key: &str| -> Result<usize> {
            text.get(key)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| Error::config(path, format!("missing or non-integer field `{key}`")))
        };
        let num_hidden_layers = get("num_hidden_layers")?;
        let hidden_size = get("hidden_size")?;
        // A mixture of experts without dense MLPs may give none (Qwen3.5-MoE): the experts' width
        // stands in for it.
        let intermediate_size = match get("intermediate_size") {
            Err(_) if text.contains_key("moe_intermediate_size") => get("moe_intermediate_size")?,
            other => other?,
        };
        // Llama 4 names its dense MLP's width `intermediate_size_mlp` and its experts'
        // `intermediate_size`.
        let (dense_key, intermediate_size, expert_width) =
            match text.contains_key("intermediate_size_mlp") {
                true => (
                    "intermediate_size_mlp",
                    get("intermediate_size_mlp")?,
                    intermediate_size,
                ),
                false => ("intermediate_size", intermediate_size, intermediate_size),
            };
        let num_attention_heads = get("num_attention_heads")?;
        let num_key_value_heads = get("num_key_value_heads").unwrap_or(num_attention_heads);
        // Limits far above any real model keep every product of sizes inside usize.
        for (key, value, max) in [
            ("num_hidden_layers", num_hidden_layers, 1 << 16),
            ("hidden_size", hidden_size, 1 << 24),
            (dense_key, intermediate_size, 1 << 24),
            ("intermediate_size", expert_width, 1 << 24),
            ("num_attention_heads", num_attention_heads, 1 << 16),
            ("num_key_value_heads", num_key_value_heads, 1 << 16),
        ] {
            if value > max {
                return Err(Error::config(
                    path,
                    format!("`{key}` = {value} is beyond any supported model (max {max})"),
                ));
            }
        }
        if num_attention_heads == 0
            || num_hidden_layers == 0
            || hidden_size == 0
            || intermediate_size == 0
            || expert_width == 0
            || num_key_value_heads == 0
        {
            return Err(Error::config(
                path,
                "num_hidden_layers, hidden_size, intermediate_size, num_attention_heads and \
                 num_key_value_heads must be positive",
            ));
        }
        // Grouped-query attention: each key/value head serves a whole group of query heads.
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::config(
                path,
                format!(
                    "`num_attention_heads` = {num_attention_heads} is not a multiple of \
                     `num_key_value_heads` = {num_key_value_heads}"
                ),
            ));
        }
        let head_dim = text
            .get("head_dim")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .unwrap_or(hidden_size / num_attention_heads);
        if head_dim == 0 || head_dim > 1 << 16 {
            return Err(Error::config(
                path,
                format!("`head_dim` = {head_dim} must be between 1 and 65536"),
            ));
        }
        // Bounded so that every product with them stays a normal f32.
        let scale = |key: &str| -> Result<Option<f64>> {
            let Some(v) = text.get(key).filter(|v| !v.is_null()) else {
                return Ok(None);
            };
            match v.as_f64() {
                Some(x) if (1e-12..=1e12).contains(&x) => Ok(Some(x)),
                _ => Err(Error::config(
                    path,
                    format!("`{key}` = {v} must be a number between 1e-12 and 1e12"),
                )),
            }
        };
        let (attention, query_pre_attn_scalar) = (
            scale("attention_multiplier")?,
            scale("query_pre_attn_scalar")?,
        );
        let scales = Scales {
            embedding: scale("embedding_multiplier")?.unwrap_or(1.0),
            residual: scale("residual_multiplier")?.unwrap_or(1.0),
            // Granite's default multiplier is 1 (transformers' GraniteConfig).
            attention: attention.unwrap_or_else(|| match query_pre_attn_scalar {
                _ if model_type == "granite" => 1.0,
                Some(q) => 1.0 / q.sqrt(),
                None => 1.0 / (head_dim as f64).sqrt(),
            }),
        };
        let experts = parse_experts(text, &model_type, expert_width, num_hidden_layers, path)?;
        let latent = parse_latent(text, path)?;
        let linear = parse_linear(text, num_hidden_layers, path)?;
        // Qwen3.5 and Qwen3-Next gate each head's attention output by a second half of its
        // `q_proj` rows; no field says so.
        let gated_query = matches!(
            model_type.as_str(),
            "qwen3_5" | "qwen3_5_text" | "qwen3_5_moe" | "qwen3_5_moe_text" | "qwen3_next"
        );
        Ok(ModelConfig {
            model_type,
            architectures,
            num_hidden_layers,
            hidden_size,
            intermediate_size,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            scales,
            experts,
            latent,
            linear,
            gated_query,
            raw,
        })
    }
}

/// The experts of a mixture-of-experts config (None when it names none): their count and width,
/// the shared expert's width, and the layers that keep a dense MLP.
fn parse_experts(
    text: &serde_json::Map<String, serde_json::Value>,
    model_type: &str,
    intermediate_size: usize,
    layers: usize,
    path: &Path,
) -> Result<Option<Experts>> {
    let field = |key: &str| text.get(key).filter(|v| !v.is_null());
    // A non-negative integer field up to `max`; `default` where absent.
    let integer = |key: &str, default: u64, max: u64| -> Result<u64> {
        match field(key) {
            None => Ok(default),
            Some(v) => v.as_u64().filter(|&n| n <= max).ok_or_else(|| {
                Error::config(
                    path,
                    format!("`{key}` = {v} must be an integer between 0 and {max}"),
                )
            }),
        }
    };
    let Some(key) = ["num_local_experts", "num_experts", "n_routed_experts"]
        .into_iter()
        .find(|k| field(k).is_some())
    else {
        return Ok(None);
    };
    let count = match integer(key, 0, 1 << 16)? {
        0 => return Ok(None),
        n => n as usize,
    };
    let width = match integer("moe_intermediate_size", intermediate_size as u64, 1 << 24)? {
        0 => {
            return Err(Error::config(
                path,
                "`moe_intermediate_size` must be a positive integer up to 2^24",
            ))
        }
        w => w as usize,
    };
    // Qwen2-MoE names the shared expert's width; GLM-4.5 and DeepSeek count shared experts of
    // the experts' width, fused into one MLP.
    let shared_width = match integer("shared_expert_intermediate_size", 0, 1 << 24)? {
        // Every Llama 4 MoE layer has one shared expert of the experts' width; no field says so.
        0 if model_type.starts_with("llama4") => width,
        0 => integer("n_shared_experts", 0, 1 << 8)? as usize * width,
        w => w as usize,
    };
    let shared_width = (shared_width > 0).then_some(shared_width);
    // transformers' rules: a `mlp_layer_types` list ("dense" or "sparse" per layer: GLM-4.7-Flash,
    // whose default is layer 0 dense) says it all; otherwise Qwen's layer is sparse unless listed
    // in `mlp_only_layers` or off the `decoder_sparse_step`, GLM-4.5's and DeepSeek's from
    // `first_k_dense_replace` on (every `moe_layer_freq`-th, a field of DeepSeek's own code).
    // Llama 4's `interleave_moe_layer_step` is Qwen's step, and its `moe_layers` lists the layers
    // with experts (transformers writes it; it overrides the step).
    let step = match field("interleave_moe_layer_step") {
        Some(_) => integer("interleave_moe_layer_step", 1, 1 << 16)?,
        None => integer("decoder_sparse_step", 1, 1 << 16)?,
    };
    let first_sparse = integer("first_k_dense_replace", 0, 1 << 16)? as usize;
    let frequency = integer("moe_layer_freq", 1, 1 << 16)?;
    if step == 0 || frequency == 0 {
        return Err(Error::config(
            path,
            "`decoder_sparse_step`, `interleave_moe_layer_step` and `moe_layer_freq` must be \
             at least 1",
        ));
    }
    let mut dense = vec![false; layers];
    if let Some(v) = field("mlp_only_layers") {
        let bad = || {
            Error::config(
                path,
                format!("`mlp_only_layers` = {v} must be a list of layer indices below {layers}"),
            )
        };
        for x in v.as_array().ok_or_else(bad)? {
            dense[x
                .as_u64()
                .filter(|&l| (l as usize) < layers)
                .ok_or_else(bad)? as usize] = true;
        }
    }
    for (l, d) in dense.iter_mut().enumerate() {
        *d |= (l as u64 + 1) % step != 0 || l < first_sparse || l as u64 % frequency != 0;
    }
    if let Some(v) = field("moe_layers") {
        let bad = || {
            Error::config(
                path,
                format!("`moe_layers` = {v} must be a list of layer indices below {layers}"),
            )
        };
        dense = vec![true; layers];
        for x in v.as_array().ok_or_else(bad)? {
            dense[x
                .as_u64()
                .filter(|&l| (l as usize) < layers)
                .ok_or_else(bad)? as usize] = false;
        }
    }
    match field("mlp_layer_types") {
        Some(v) => dense = layer_kinds(v, "mlp_layer_types", ("dense", "sparse"), layers, path)?,
        // transformers' GLM-4.7-Flash reads no other field: layer 0 dense, the rest experts.
        None if model_type == "glm4_moe_lite" => dense = (0..layers).map(|l| l == 0).collect(),
        None => {}
    }
    let dense_layers: Vec<usize> = (0..layers).filter(|&l| dense[l]).collect();
    if dense_layers.len() == layers {
        return Err(Error::config(
            path,
            format!("`{key}` = {count} experts, but the config leaves every layer's MLP dense"),
        ));
    }
    Ok(Some(Experts {
        count,
        width,
        shared_width,
        dense_layers,
    }))
}

/// The latent attention's sizes, where the config gives `kv_lora_rank` (None otherwise).
fn parse_latent(
    text: &serde_json::Map<String, serde_json::Value>,
    path: &Path,
) -> Result<Option<Latent>> {
    let field = |key: &str| text.get(key).filter(|v| !v.is_null());
    if field("kv_lora_rank").is_none() {
        return Ok(None);
    }
    let size = |key: &str| -> Result<usize> {
        let v = field(key)
            .ok_or_else(|| Error::config(path, format!("latent attention without `{key}`")))?;
        v.as_u64()
            .filter(|&n| n > 0 && n <= 1 << 20)
            .map(|n| n as usize)
            .ok_or_else(|| {
                Error::config(
                    path,
                    format!("`{key}` = {v} must be a positive integer up to 2^20"),
                )
            })
    };
    Ok(Some(Latent {
        q_lora_rank: match field("q_lora_rank") {
            None => None,
            Some(_) => Some(size("q_lora_rank")?),
        },
        kv_lora_rank: size("kv_lora_rank")?,
        qk_nope_head_dim: size("qk_nope_head_dim")?,
        qk_rope_head_dim: size("qk_rope_head_dim")?,
        v_head_dim: size("v_head_dim")?,
    }))
}

/// Linear attention's sizes and layers, where the config gives `linear_num_value_heads` (None
/// otherwise): `layer_types` names each layer's attention ("linear_attention" or
/// "full_attention"); without it, as transformers does, every `full_attention_interval`-th layer
/// (4 by default) has softmax attention and the others linear.
fn parse_linear(
    text: &serde_json::Map<String, serde_json::Value>,
    layers: usize,
    path: &Path,
) -> Result<Option<LinearAttention>> {
    let field = |key: &str| text.get(key).filter(|v| !v.is_null());
    if field("linear_num_value_heads").is_none() {
        return Ok(None);
    }
    let size = |key: &str, max: u64| -> Result<usize> {
        let v = field(key)
            .ok_or_else(|| Error::config(path, format!("linear attention without `{key}`")))?;
        v.as_u64()
            .filter(|&n| n > 0 && n <= max)
            .map(|n| n as usize)
            .ok_or_else(|| {
                Error::config(
                    path,
                    format!("`{key}` = {v} must be a positive integer up to {max}"),
                )
            })
    };
    let kinds = ("linear_attention", "full_attention");
    let linear: Vec<bool> = match field("layer_types") {
        Some(v) => layer_kinds(v, "layer_types", kinds, layers, path)?,
        None => {
            let interval = match field("full_attention_interval") {
                None => 4,
                Some(_) => size("full_attention_interval", 1 << 16)?,
            };
            (0..layers).map(|l| (l + 1) % interval != 0).collect()
        }
    };
    let (key_heads, value_heads) = (
        size("linear_num_key_heads", 1 << 16)?,
        size("linear_num_value_heads", 1 << 16)?,
    );
    // Each key head serves a whole group of value heads.
    if value_heads % key_heads != 0 {
        return Err(Error::config(
            path,
            format!(
                "`linear_num_value_heads` = {value_heads} is not a multiple of \
                 `linear_num_key_heads` = {key_heads}"
            ),
        ));
    }
    Ok(Some(LinearAttention {
        key_heads,
        value_heads,
        key_head_dim: size("linear_key_head_dim", 1 << 16)?,
        value_head_dim: size("linear_value_head_dim", 1 << 16)?,
        layers: (0..layers).filter(|&l| linear[l]).collect(),
    }))
}

/// A per-layer list of one of two kinds (`mlp_layer_types`: "dense" or "sparse"; `layer_types`:
/// "linear_attention" or "full_attention"), true where it names the first; refused, naming the
/// field, unless it names one of the two for each of the `layers` layers.
fn layer_kinds(
    value: &serde_json::Value,
    key: &str,
    (first, second): (&str, &str),
    layers: usize,
    path: &Path,
) -> Result<Vec<bool>> {
    let kinds: Option<Vec<bool>> = value.as_array().and_then(|a| {
        a.iter()
            .map(|k| match k.as_str() {
                Some(k) if k == first => Some(true),
                Some(k) if k == second => Some(false),
                _ => None,
            })
            .collect()
    });
    kinds.filter(|k| k.len() == layers).ok_or_else(|| {
        Error::config(
            path,
            format!(
                "`{key}` = {value} must list \"{first}\" or \"{second}\" for each of the \
                 {layers} layers"
            ),
        )
    })
}
