//! Architecture tables, kept as data (`tables/*.json`): where each adaptable projection lives in
//! a checkpoint, and which canonical parts (q, k, v, o, gate, up, down) a fused projection holds.
//! Adding an architecture is adding a JSON file here.

use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::io::checkpoint::{Checkpoint, ModelConfig};

mod check;
mod stored_experts;
pub use check::parse_table;
pub use stored_experts::StoredExperts;

/// The canonical projections every decoder layer has, fused or not.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
    /// Latent attention's projections (DeepSeek-V2/V3): the query's down and up projections
    /// through its latent, and the key-value latent's (`kv_a_proj_with_mqa`, which also carries
    /// the shared rotary key) and its up projection to every head's keys and values.
    #[serde(rename = "q_a")]
    QA,
    #[serde(rename = "q_b")]
    QB,
    #[serde(rename = "kv_a")]
    KvA,
    #[serde(rename = "kv_b")]
    KvB,
    /// Linear attention's projections (Qwen3.5's Gated DeltaNet, in the layers the config names):
    /// `in_proj_qkv` (queries, keys and values), `in_proj_z` (the output gate), `in_proj_b` and
    /// `in_proj_a` (one value per value head), and `out_proj`, which writes the residual.
    #[serde(rename = "lin_qkv")]
    LinQkv,
    #[serde(rename = "lin_z")]
    LinZ,
    #[serde(rename = "lin_b")]
    LinB,
    #[serde(rename = "lin_a")]
    LinA,
    #[serde(rename = "lin_out")]
    LinOut,
    /// Qwen3-Next's forms of the same: `in_proj_qkvz` (queries, keys, values and the output
    /// gate, interleaved per key head) and `in_proj_ba` (b and a, interleaved per key head),
    /// each taken whole.
    #[serde(rename = "lin_qkvz")]
    LinQkvz,
    #[serde(rename = "lin_ba")]
    LinBa,
}

impl Part {
    /// The seven canonical parts, in the order of a decoder layer (latent and linear attention's
    /// are not among them: the map mode, which reads these, takes neither).
    pub const ALL: [Part; 7] = [
        Part::Q,
        Part::K,
        Part::V,
        Part::O,
        Part::Gate,
        Part::Up,
        Part::Down,
    ];

    /// `(out, in)` of this projection for a model config (a latent or linear part without its
    /// sizes in the config: no rows).
    pub fn shape(self, c: &ModelConfig) -> (usize, usize) {
        let (heads, h) = (c.num_attention_heads, c.hidden_size);
        let q = heads * c.head_dim;
        if let Some(l) = &c.linear {
            let keys = l.key_heads * l.key_head_dim;
            let values = l.value_heads * l.value_head_dim;
            match self {
                Part::LinQkv => return (2 * keys + values, h),
                Part::LinZ => return (values, h),
                Part::LinB | Part::LinA => return (l.value_heads, h),
                Part::LinOut => return (h, values),
                Part::LinQkvz => return (2 * keys + 2 * values, h),
                Part::LinBa => return (2 * l.value_heads, h),
                _ => {}
            }
        }
        let kv = c.num_key_value_heads * c.head_dim;
        if let Some(l) = c.latent {
            let qk = heads * (l.qk_nope_head_dim + l.qk_rope_head_dim);
            let q_in = l.q_lora_rank.unwrap_or(0);
            match self {
                Part::Q => return (qk, h),
                Part::O => return (h, heads * l.v_head_dim),
                Part::QA => return (q_in, h),
                Part::QB => return (qk, q_in),
                Part::KvA => return (l.kv_lora_rank + l.qk_rope_head_dim, h),
                Part::KvB => return (heads * (l.qk_nope_head_dim + l.v_head_dim), l.kv_lora_rank),
                _ => {}
            }
        }
        match self {
            Part::Q if c.gated_query => (2 * q, h),
            Part::Q => (q, h),
            Part::K | Part::V => (kv, h),
            Part::O => (h, q),
            Part::Gate | Part::Up => (c.intermediate_size, h),
            Part::Down => (h, c.intermediate_size),
            Part::QA | Part::QB | Part::KvA | Part::KvB => (0, h),
            Part::LinQkv | Part::LinZ | Part::LinB | Part::LinA => (0, h),
            Part::LinQkvz | Part::LinBa => (0, h),
            Part::LinOut => (h, 0),
        }
    }

    /// Whether this is one of the MLP's projections (gate, up, down).
    pub fn mlp(self) -> bool {
        matches!(self, Part::Gate | Part::Up | Part::Down)
    }

    /// Whether this is one of latent attention's own projections.
    pub fn latent(self) -> bool {
        matches!(self, Part::QA | Part::QB | Part::KvA | Part::KvB)
    }

    /// Whether this is one of linear attention's projections.
    pub fn linear(self) -> bool {
        matches!(
            self,
            Part::LinQkv
                | Part::LinZ
                | Part::LinB
                | Part::LinA
                | Part::LinOut
                | Part::LinQkvz
                | Part::LinBa
        )
    }

    /// The unfused module name of this part (`q_proj`, ...), as used by `--modules`.
    pub fn module_name(self) -> &'static str {
        match self {
            Part::Q => "q_proj",
            Part::K => "k_proj",
            Part::V => "v_proj",
            Part::O => "o_proj",
            Part::Gate => "gate_proj",
            Part::Up => "up_proj",
            Part::Down => "down_proj",
            Part::QA => "q_a_proj",
            Part::QB => "q_b_proj",
            Part::KvA => "kv_a_proj_with_mqa",
            Part::KvB => "kv_b_proj",
            Part::LinQkv => "in_proj_qkv",
            Part::LinZ => "in_proj_z",
            Part::LinB => "in_proj_b",
            Part::LinA => "in_proj_a",
            Part::LinOut => "out_proj",
            Part::LinQkvz => "in_proj_qkvz",
            Part::LinBa => "in_proj_ba",
        }
    }
}

/// One adaptable module type of an architecture (`q_proj`, or fused `qkv_proj`).
#[derive(Debug, Clone, Deserialize)]
pub struct ModuleSpec {
    #[serde(skip)]
    pub name: String,
    /// Path below the layer prefix, e.g. `self_attn.q_proj`; an expert's holds `{expert}` where
    /// the expert's index goes (`mlp.experts.{expert}.gate_proj`).
    pub key: String,
    /// Canonical parts stacked along the output rows, in order.
    pub parts: Vec<Part>,
    /// One module per expert of a mixture-of-experts layer (the key holds `{expert}`).
    #[serde(skip)]
    pub expert: bool,
    /// A part of the MLP every token passes through beside its experts (Qwen2-MoE's
    /// `mlp.shared_expert`, GLM-4.5's `mlp.shared_experts`).
    #[serde(default)]
    pub shared_expert: bool,
}

/// The block of a layer a module belongs to, which says in which layers it exists and how wide
/// its MLP is: attention in every layer (softmax or, in the layers a hybrid model's config
/// names, linear); a dense MLP in a dense model's layers and in a
/// mixture-of-experts model's dense layers; experts, and the shared expert beside them, in the
/// others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Block {
    Attention,
    LinearAttention,
    Mlp,
    Experts,
    SharedExpert,
}

impl Block {
    /// How the block is named in messages.
    pub fn describe(self) -> &'static str {
        match self {
            Block::Attention => "attention",
            Block::LinearAttention => "linear attention",
            Block::Mlp => "dense MLP",
            Block::Experts => "experts",
            Block::SharedExpert => "shared expert",
        }
    }
}

/// Where an expert module's key takes the expert's index.
pub const EXPERT_SLOT: &str = "{expert}";

impl ModuleSpec {
    /// The block of a layer this module belongs to.
    pub fn block(&self) -> Block {
        if self.expert {
            Block::Experts
        } else if self.shared_expert {
            Block::SharedExpert
        } else if self.parts.iter().all(|p| p.mlp()) {
            Block::Mlp
        } else if self.parts.iter().all(|p| p.linear()) {
            Block::LinearAttention
        } else {
            Block::Attention
        }
    }

    /// `(out, in)` of `part` in this module: an expert's MLP parts are an expert wide, the
    /// shared expert's as wide as the config says.
    pub fn part_shape(&self, part: Part, c: &ModelConfig) -> (usize, usize) {
        let width = match (self.block(), &c.experts) {
            (Block::Experts, Some(e)) => Some(e.width),
            (Block::SharedExpert, Some(e)) => e.shared_width,
            _ => None,
        };
        match width {
            Some(w) if part == Part::Down => (c.hidden_size, w),
            Some(w) => (w, c.hidden_size),
            None => part.shape(c),
        }
    }

    /// `(out, in)` of the whole (possibly fused) module.
    pub fn shape(&self, c: &ModelConfig) -> (usize, usize) {
        let n = self.part_shape(self.parts[0], c).1;
        (self.parts.iter().map(|&p| self.part_shape(p, c).0).sum(), n)
    }

    /// The output rows that belong to `part` inside this module.
    pub fn rows_of(&self, part: Part, c: &ModelConfig) -> Option<Range<usize>> {
        let mut start = 0;
        for &p in &self.parts {
            let len = self.part_shape(p, c).0;
            if p == part {
                return Some(start..start + len);
            }
            start += len;
        }
        None
    }

    /// Whether a model of this config has this module at all: with latent attention, the query
    /// goes through `q_a_proj` and `q_b_proj` where the config gives `q_lora_rank`, else through
    /// `q_proj`.
    pub fn present_in(&self, c: &ModelConfig) -> bool {
        let q_latent = c.latent.is_some_and(|l| l.q_lora_rank.is_some());
        self.parts.iter().all(|&p| match p {
            Part::QA | Part::QB => q_latent,
            Part::Q => !q_latent,
            _ => true,
        })
    }

    /// The last part of the key (`gate_proj` of `mlp.experts.{expert}.gate_proj`): the name
    /// PEFT's `target_modules` select it by.
    pub fn key_tail(&self) -> &str {
        self.key.rsplit('.').next().unwrap_or(&self.key)
    }

    /// Each instance of this module in a layer: one per expert for an expert's module, else one.
    pub fn instances(&self, c: &ModelConfig) -> Vec<Option<usize>> {
        match (self.expert, &c.experts) {
            (true, Some(e)) => (0..e.count).map(Some).collect(),
            _ => vec![None],
        }
    }

    /// The key of this module for one expert (None for a module that is not an expert's).
    pub fn key_at(&self, expert: Option<usize>) -> String {
        match expert {
            Some(e) if self.expert => self.key.replace(EXPERT_SLOT, &e.to_string()),
            _ => self.key.clone(),
        }
    }
}

/// An architecture table.
#[derive(Debug, Clone, Deserialize)]
pub struct Arch {
    pub name: String,
    pub model_types: Vec<String>,
    pub layer_prefixes: Vec<String>,
    /// Where transformers' causal-LM class names the layers whatever the checkpoint's layout,
    /// where that differs: Qwen3.5's releases store `model.language_model.layers` (the
    /// multimodal model's), which `AutoModelForCausalLM` loads as `model.layers`. Adapters'
    /// module names are written under it (and read under any of the prefixes), unless an
    /// adapter of the same family names them otherwise (`transfer::output_names`).
    #[serde(default)]
    pub module_prefix: Option<String>,
    #[serde(deserialize_with = "modules_in_order")]
    pub modules: Vec<ModuleSpec>,
    /// A mixture-of-experts layer's router (one row of logits weights per expert), below the
    /// layer; every table with expert modules names it.
    #[serde(default)]
    pub router: Option<String>,
    /// Where a checkpoint of this family stores each layer's experts fused, one tensor per
    /// projection for all experts (GPT-OSS), instead of one module per expert: the reader
    /// presents them one expert at a time under the expert modules' keys.
    #[serde(default)]
    pub stored_experts: Option<StoredExperts>,
    /// Where the residual stream's anchors and norm gains live (the `map` mode reads them).
    pub residual: Residual,
}

/// The residual stream's conventions: the embedding, the norm before each block, and how the
/// family scales them.
#[derive(Debug, Clone, Deserialize)]
pub struct Residual {
    /// The embedding, below the layer prefix's parent (`model.layers` → `model.embed_tokens.weight`).
    pub embed: String,
    /// The norm whose output the attention projections (q, k, v) read, below the layer; none
    /// where the blocks read the residual as it is (OLMo 2/3 normalize only their outputs).
    #[serde(default)]
    pub attn_norm: Option<String>,
    /// The norm whose output the MLP's gate and up read, below the layer (none: as above).
    #[serde(default)]
    pub mlp_norm: Option<String>,
    /// Added to a stored norm weight to get its gain (Gemma stores g − 1).
    pub gain_offset: f32,
    /// The same in an MLX conversion, where mlx-lm stores the gains otherwise: it adds 1 to
    /// Qwen3-Next's and Qwen3.5's norm weights as it converts them (0 there); none: as above.
    #[serde(default)]
    pub mlx_gain_offset: Option<f32>,
    /// The embedding is multiplied by √hidden_size before the first layer (Gemma).
    pub embed_scale_sqrt_hidden: bool,
    /// The norms o's and down's outputs pass through before they join the residual (Gemma 2/3,
    /// OLMo 2/3).
    #[serde(default)]
    pub output_norms: Option<OutputNorms>,
    /// The norms of queries and keys (per head: Qwen3, Gemma 3; across heads: OLMo 2/3), below
    /// the layer.
    #[serde(default)]
    pub head_norms: Option<HeadNorms>,
    /// The final norm before the output embedding, below the layer prefix's parent.
    #[serde(default = "default_final_norm")]
    pub final_norm: String,
}

fn default_final_norm() -> String {
    "norm.weight".into()
}

/// Norms applied to a block's output before it joins the residual, below the layer.
#[derive(Debug, Clone, Deserialize)]
pub struct OutputNorms {
    pub attn: String,
    pub mlp: String,
}

/// RMSNorms of queries and keys, below the layer: per head (one gain vector of head_dim that
/// every head shares), or `across_heads` (one norm over all of q's or k's rows, with a gain per
/// row: OLMo 2/3).
#[derive(Debug, Clone, Deserialize)]
pub struct HeadNorms {
    pub q: String,
    pub k: String,
    #[serde(default)]
    pub across_heads: bool,
}

fn modules_in_order<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<ModuleSpec>, D::Error> {
    // serde_json keeps object order (preserve_order), so the table's order is the module order.
    let map = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
    map.into_iter()
        .map(|(name, v)| {
            let mut spec: ModuleSpec =
                serde_json::from_value(v).map_err(serde::de::Error::custom)?;
            spec.expert = spec.key.contains(EXPERT_SLOT);
            spec.name = name;
            Ok(spec)
        })
        .collect()
}

// `TABLES`: every file of `tables/`, found by build.rs.
include!(concat!(env!("OUT_DIR"), "/arch_tables.rs"));

/// Every built-in table, each checked by [`parse_table`] (a broken one is a build defect, caught
/// by the test that loads them all).
pub fn all() -> &'static [Arch] {
    static ARCHS: OnceLock<Vec<Arch>> = OnceLock::new();
    ARCHS.get_or_init(|| {
        TABLES
            .iter()
            .map(|(file, text)| {
                parse_table(text).unwrap_or_else(|e| panic!("built-in table {file}.json: {e}"))
            })
            .collect()
    })
}

/// The built-in tables' file stems and texts, for checks of the files themselves.
pub fn table_sources() -> &'static [(&'static str, &'static str)] {
    TABLES
}

/// The table for a config's `model_type`, or an error naming the supported ones.
pub fn for_config(config: &ModelConfig, path: &Path) -> Result<&'static Arch> {
    all()
        .iter()
        .find(|a| a.model_types.iter().any(|t| t == &config.model_type))
        .ok_or_else(|| Error::UnknownArchitecture {
            path: path.to_path_buf(),
            model_type: config.model_type.clone(),
            supported: all()
                .iter()
                .flat_map(|a| a.model_types.iter().cloned())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

impl Arch {
    /// The module type of this name.
    pub fn module(&self, name: &str) -> Option<&ModuleSpec> {
        self.modules.iter().find(|m| m.name == name)
    }

    /// The module type holding `part` in a dense layer (in an expert layer, for a table whose
    /// layers all have experts).
    pub fn module_with(&self, part: Part) -> &ModuleSpec {
        let block = match part {
            Part::Q | Part::K | Part::V | Part::O => Block::Attention,
            p if p.latent() => Block::Attention,
            p if p.linear() => Block::LinearAttention,
            _ if self.has_block(Block::Mlp) => Block::Mlp,
            _ => Block::Experts,
        };
        self.module_in(block, part)
            .expect("the map mode reads tables that cover all seven parts")
    }

    /// The module type of `block` holding `part`, if the table has that block.
    pub fn module_in(&self, block: Block, part: Part) -> Option<&ModuleSpec> {
        self.modules
            .iter()
            .find(|m| m.block() == block && m.parts.contains(&part))
    }

    /// Whether this table's linear attention (if any) is in split projections (Qwen3.5's
    /// `in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`), not fused (Qwen3-Next's).
    pub fn splits_linear_attention(&self) -> bool {
        self.module_in(Block::LinearAttention, Part::LinQkv)
            .is_some()
    }

    /// Whether this table's attention is latent (DeepSeek's).
    pub fn latent_attention(&self) -> bool {
        self.modules
            .iter()
            .any(|m| m.parts.iter().any(|p| p.latent()))
    }

    /// Whether some module of this table belongs to `block`.
    pub fn has_block(&self, block: Block) -> bool {
        self.modules.iter().any(|m| m.block() == block)
    }

    /// The layer prefix this checkpoint uses: the first whose layer-0 modules (any of them, so a
    /// checkpoint holding only some projections still works) exist.
    pub fn detect_prefix(&self, ckpt: &Checkpoint) -> Result<&str> {
        self.layer_prefixes
            .iter()
            .find(|p| {
                self.modules
                    .iter()
                    .any(|m| ckpt.has(&format!("{p}.0.{}.weight", m.key_at(Some(0)))))
            })
            .map(String::as_str)
            .ok_or_else(|| Error::MissingTensor {
                path: ckpt.dir.clone(),
                tensor: format!(
                    "{}.0.{}.weight",
                    self.layer_prefixes[0],
                    self.modules[0].key_at(Some(0))
                ),
                hint: format!(
                    " (the {} table expects layer weights under one of: {})",
                    self.name,
                    self.layer_prefixes.join(", ")
                ),
            })
    }

    /// The PEFT module name of a module at a layer (and expert, for an expert's module), e.g.
    /// `model.layers.3.self_attn.q_proj` or `model.layers.3.mlp.experts.5.up_proj`.
    pub fn module_path(
        &self,
        prefix: &str,
        layer: usize,
        expert: Option<usize>,
        module: &ModuleSpec,
    ) -> String {
        format!("{prefix}.{layer}.{}", module.key_at(expert))
    }

    /// Whether this architecture's MLPs are experts (a mixture-of-experts table).
    pub fn has_experts(&self) -> bool {
        self.modules.iter().any(|m| m.expert)
    }

    /// The embedding tensor's name for a layer prefix.
    pub fn embed_name(&self, prefix: &str) -> String {
        self.top_level_name(prefix, &self.residual.embed)
    }

    /// A tensor next to the embedding (below the layer prefix's parent), e.g. the final norm.
    pub fn top_level_name(&self, prefix: &str, below: &str) -> String {
        let parent = prefix.rsplit_once('.').map(|(p, _)| p).unwrap_or("");
        if parent.is_empty() {
            below.to_string()
        } else {
            format!("{parent}.{below}")
        }
    }

    /// Splits a module name into (layer, expert, module type), if it is one of this table's
    /// modules (the expert's index for an expert's module, else None).
    pub fn parse_module(
        &self,
        prefix: &str,
        name: &str,
    ) -> Option<(usize, Option<usize>, &ModuleSpec)> {
        let rest = name.strip_prefix(prefix)?.strip_prefix('.')?;
        let (layer, key) = rest.split_once('.')?;
        let layer = layer.parse().ok()?;
        self.modules.iter().find_map(|m| {
            if !m.expert {
                return (m.key == key).then_some((layer, None, m));
            }
            let (head, tail) = m.key.split_once(EXPERT_SLOT)?;
            let index = key.strip_prefix(head)?.strip_suffix(tail)?;
            // Digits only, as a layer index: `+3` or `03` would name no tensor of the model.
            let canonical = !index.is_empty()
                && index.bytes().all(|b| b.is_ascii_digit())
                && (index == "0" || !index.starts_with('0'));
            let expert = index.parse().ok().filter(|_| canonical)?;
            Some((layer, Some(expert), m))
        })
    }
}
