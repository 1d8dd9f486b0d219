//! The model shapes `synth` can produce, and the `config.json` Hugging Face would write for each.
//!
//! The real presets copy the published shapes of Qwen2.5-0.5B/1.5B, Llama-3.2-1B/3B and
//! Llama-3.1-8B/70B, so that transfers between synthetic models exercise the same matrix sizes,
//! GQA ratios, biases and (un)tied embeddings as the real checkpoints (the large ones with
//! `--layers`, to measure time and memory at their widths). The two tiny presets keep the same structure at a
//! size that unit tests and CI can generate in milliseconds.

use serde_json::{json, Map, Value};

use crate::io::safetensors::FloatType;

/// A model shape to synthesize (`--preset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Preset {
    /// Qwen2.5-0.5B: 24 layers, hidden 896, 14/2 heads, q/k/v biases, tied embeddings.
    #[value(name = "qwen2.5-0.5b")]
    Qwen25_05b,
    /// Qwen2.5-1.5B: 28 layers, hidden 1536, 12/2 heads, q/k/v biases, tied embeddings.
    #[value(name = "qwen2.5-1.5b")]
    Qwen25_15b,
    /// Llama-3.2-1B: 16 layers, hidden 2048, 32/8 heads, tied embeddings.
    #[value(name = "llama-3.2-1b")]
    Llama32_1b,
    /// Llama-3.2-3B: 28 layers, hidden 3072, 24/8 heads, tied embeddings.
    #[value(name = "llama-3.2-3b")]
    Llama32_3b,
    /// Llama-3.1-8B: 32 layers, hidden 4096, MLP 14336, 32/8 heads, untied embeddings.
    #[value(name = "llama-3.1-8b")]
    Llama31_8b,
    /// Llama-3.1-70B: 80 layers, hidden 8192, MLP 28672, 64/8 heads, untied embeddings.
    #[value(name = "llama-3.1-70b")]
    Llama31_70b,
    /// A 4-layer Qwen2 (hidden 64) for tests.
    #[value(name = "tiny-qwen2")]
    TinyQwen2,
    /// A 6-layer Llama (hidden 96) for tests.
    #[value(name = "tiny-llama")]
    TinyLlama,
}

/// The two architectures the presets come from; they differ in config fields and in biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Qwen2,
    Llama,
}

/// Everything about a preset that decides its tensors and its `config.json`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    pub family: Family,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    /// `tie_word_embeddings`: when true there is no `lm_head.weight`.
    pub tied: bool,
    /// Qwen2 has biases on q/k/v (`self_attn.{q,k,v}_proj.bias`).
    pub qkv_bias: bool,
    pub max_position: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub bos: u64,
    pub eos: u64,
    /// The factor of Llama 3's `rope_scaling` (`rope_type: llama3`: 8 in 3.1, 32 in 3.2), as in
    /// the real configs.
    pub llama3_rope: Option<f64>,
}

impl Preset {
    /// Every preset, in `--help` order.
    pub const ALL: [Preset; 8] = [
        Preset::Qwen25_05b,
        Preset::Qwen25_15b,
        Preset::Llama32_1b,
        Preset::Llama32_3b,
        Preset::Llama31_8b,
        Preset::Llama31_70b,
        Preset::TinyQwen2,
        Preset::TinyLlama,
    ];

    /// The command-line name (`qwen2.5-0.5b`, ...); also mixed into the random streams so that two
    /// presets generated with the same seed are not accidentally correlated.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Qwen25_05b => "qwen2.5-0.5b",
            Preset::Qwen25_15b => "qwen2.5-1.5b",
            Preset::Llama32_1b => "llama-3.2-1b",
            Preset::Llama32_3b => "llama-3.2-3b",
            Preset::Llama31_8b => "llama-3.1-8b",
            Preset::Llama31_70b => "llama-3.1-70b",
            Preset::TinyQwen2 => "tiny-qwen2",
            Preset::TinyLlama => "tiny-llama",
        }
    }

    /// The preset's shape (published values for the real models).
    pub fn shape(self) -> Shape {
        let qwen = |hidden, intermediate, layers, heads, kv_heads, head_dim| Shape {
            family: Family::Qwen2,
            hidden,
            intermediate,
            layers,
            heads,
            kv_heads,
            head_dim,
            vocab: 151_936,
            tied: true,
            qkv_bias: true,
            max_position: 32_768,
            rope_theta: 1_000_000.0,
            rms_norm_eps: 1e-6,
            bos: 151_643,
            eos: 151_643,
            llama3_rope: None,
        };
        let llama = |hidden, intermediate, layers, heads, kv_heads, head_dim| Shape {
            family: Family::Llama,
            hidden,
            intermediate,
            layers,
            heads,
            kv_heads,
            head_dim,
            vocab: 128_256,
            tied: true,
            qkv_bias: false,
            max_position: 131_072,
            rope_theta: 500_000.0,
            rms_norm_eps: 1e-5,
            bos: 128_000,
            eos: 128_001,
            llama3_rope: Some(32.0),
        };
        // Llama 3.1: untied, its own end-of-text id and rope factor.
        let llama31 = |s: Shape| Shape {
            tied: false,
            eos: 128_009,
            llama3_rope: Some(8.0),
            ..s
        };
        // Tiny models: a 256-token vocabulary, so the special ids must be small too.
        let tiny = |s: Shape| Shape {
            vocab: 256,
            max_position: 2048,
            bos: 1,
            eos: 2,
            llama3_rope: None,
            ..s
        };
        match self {
            Preset::Qwen25_05b => qwen(896, 4864, 24, 14, 2, 64),
            Preset::Qwen25_15b => qwen(1536, 8960, 28, 12, 2, 128),
            Preset::Llama32_1b => llama(2048, 8192, 16, 32, 8, 64),
            Preset::Llama32_3b => llama(3072, 8192, 28, 24, 8, 128),
            Preset::Llama31_8b => llama31(llama(4096, 14336, 32, 32, 8, 128)),
            Preset::Llama31_70b => llama31(llama(8192, 28672, 80, 64, 8, 128)),
            Preset::TinyQwen2 => tiny(qwen(64, 176, 4, 4, 2, 16)),
            Preset::TinyLlama => tiny(llama(96, 256, 6, 6, 2, 16)),
        }
    }
}

impl Shape {
    /// The `config.json` Hugging Face writes for this shape with `layers` decoder layers, stored
    /// as `dtype`. Keys are sorted, as `PretrainedConfig.to_json_string` does.
    pub fn config_json(&self, layers: usize, dtype: FloatType) -> Value {
        let mut c = Map::new();
        let mut set = |k: &str, v: Value| {
            c.insert(k.to_string(), v);
        };
        set("attention_dropout", json!(0.0));
        set("bos_token_id", json!(self.bos));
        set("eos_token_id", json!(self.eos));
        set("head_dim", json!(self.head_dim));
        set("hidden_act", json!("silu"));
        set("hidden_size", json!(self.hidden));
        set("initializer_range", json!(0.02));
        set("intermediate_size", json!(self.intermediate));
        set("max_position_embeddings", json!(self.max_position));
        set("num_attention_heads", json!(self.heads));
        set("num_hidden_layers", json!(layers));
        set("num_key_value_heads", json!(self.kv_heads));
        set("rms_norm_eps", json!(self.rms_norm_eps));
        set("rope_theta", json!(self.rope_theta));
        set("tie_word_embeddings", json!(self.tied));
        set("torch_dtype", json!(dtype.torch_name()));
        set("transformers_version", json!("4.46.0"));
        set("use_cache", json!(true));
        set("vocab_size", json!(self.vocab));
        match self.family {
            Family::Qwen2 => {
                set("architectures", json!(["Qwen2ForCausalLM"]));
                set("model_type", json!("qwen2"));
                set("max_window_layers", json!(layers));
                set("sliding_window", json!(self.max_position));
                set("use_sliding_window", json!(false));
                set("rope_scaling", Value::Null);
            }
            Family::Llama => {
                set("architectures", json!(["LlamaForCausalLM"]));
                set("model_type", json!("llama"));
                set("attention_bias", json!(self.qkv_bias));
                set("mlp_bias", json!(false));
                set("pretraining_tp", json!(1));
                let scaling = if let Some(factor) = self.llama3_rope {
                    json!({
                        "factor": factor,
                        "high_freq_factor": 4.0,
                        "low_freq_factor": 1.0,
                        "original_max_position_embeddings": 8192,
                        "rope_type": "llama3"
                    })
                } else {
                    Value::Null
                };
                set("rope_scaling", scaling);
            }
        }
        sorted(c)
    }
}

/// A JSON object with its keys in sorted order (serde_json keeps insertion order here).
pub(crate) fn sorted(map: Map<String, Value>) -> Value {
    let mut entries: Vec<_> = map.into_iter().collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Value::Object(entries.into_iter().collect())
}
