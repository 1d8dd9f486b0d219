//! Mixture-of-experts fixtures whose layers differ: a dense MLP in some layers and experts in the
//! others, with a shared expert beside the experts (Qwen2-MoE, GLM-4.5), and adapters on every
//! module they have.

use std::collections::BTreeMap;
use std::path::Path;

use loraxfer::io::safetensors::FloatType;

use super::moe::{attention, expert_modules, weight, DIMS, LAYERS};
use super::refusals::edit_json;
use super::*;

/// The shared expert's width (Qwen2-MoE names it; GLM-4.5 has two experts' width, 2 × 12).
pub const SHARED: usize = 20;

/// Latent attention's sizes (DeepSeek): query latent, key-value latent, the heads' non-rotary
/// and rotary query/key widths, the value width.
pub const LATENT: (usize, usize, usize, usize, usize) = (24, 16, 8, 4, 12);

/// The projections of latent attention at hidden size `h` (with or without a query latent):
/// (key, out, in).
pub fn latent_attention(h: usize, q_latent: bool) -> Vec<(String, usize, usize)> {
    let (q_lora, kv_lora, nope, rope, v) = LATENT;
    let heads = DIMS.2;
    let mut all = match q_latent {
        true => vec![
            ("q_a_proj", q_lora, h),
            ("q_b_proj", heads * (nope + rope), q_lora),
        ],
        false => vec![("q_proj", heads * (nope + rope), h)],
    };
    all.extend([
        ("kv_a_proj_with_mqa", kv_lora + rope, h),
        ("kv_b_proj", heads * (nope + v), kv_lora),
        ("o_proj", h, heads * v),
    ]);
    all.into_iter()
        .map(|(n, out, inp)| (format!("self_attn.{n}"), out, inp))
        .collect()
}

/// A layered mixture of experts: what `family` names its shared expert (`qwen2_moe`:
/// `mlp.shared_expert`, `glm4_moe` and DeepSeek: `mlp.shared_experts`; `qwen3_moe` has none);
/// `deepseek_v3` has latent attention with a query latent, `deepseek_v2` without one (V2-Lite).
pub struct Layout {
    pub family: &'static str,
    pub experts: usize,
    /// Layers with a dense MLP (`intermediate_size` wide) instead of experts.
    pub dense: Vec<usize>,
}

impl Layout {
    pub fn shared_width(&self) -> Option<usize> {
        match self.family {
            "qwen2_moe" => Some(SHARED),
            "glm4_moe" | "deepseek_v3" | "deepseek_v2" => Some(2 * DIMS.5),
            _ => None,
        }
    }

    /// Every adaptable module of layer `l`: (key below the layer, out, in).
    pub fn modules(&self, l: usize) -> Vec<(String, usize, usize)> {
        let (h, inter, width) = (DIMS.0, DIMS.1, DIMS.5);
        let mlp = |block: &str, w: usize| {
            [("gate_proj", w, h), ("up_proj", w, h), ("down_proj", h, w)]
                .map(|(n, out, inp)| (format!("{block}.{n}"), out, inp))
        };
        let mut all = match self.family {
            "deepseek_v3" => latent_attention(h, true),
            "deepseek_v2" => latent_attention(h, false),
            _ => attention(h),
        };
        if self.dense.contains(&l) {
            all.extend(mlp("mlp", inter));
            return all;
        }
        for e in 0..self.experts {
            all.extend(expert_modules("qwen3_moe", e, width, h));
        }
        let shared = match self.family {
            "qwen2_moe" => "mlp.shared_expert",
            _ => "mlp.shared_experts",
        };
        if let Some(w) = self.shared_width() {
            all.extend(mlp(shared, w));
        }
        all
    }

    /// Writes the checkpoint (weights from `seed`, routers included) and its config.json.
    pub fn write(&self, dir: &Path, seed: u64) {
        let (h, inter, heads, kv, d, width) = DIMS;
        let mut t = BTreeMap::new();
        for l in 0..LAYERS {
            for (s, (name, out, inp)) in self.modules(l).into_iter().enumerate() {
                let w = gaussian(out, inp, seed, (l * 1000 + s) as u64);
                t.insert(format!("model.layers.{l}.{name}.weight"), weight(&w));
            }
            if !self.dense.contains(&l) {
                let router = gaussian(self.experts, h, seed, (l * 1000 + 999) as u64);
                t.insert(format!("model.layers.{l}.mlp.gate.weight"), weight(&router));
            }
        }
        let model = TinyModel {
            model_type: self.family,
            hidden: h,
            intermediate: inter,
            layers: LAYERS,
            heads,
            kv_heads: kv,
            head_dim: d,
        };
        write_checkpoint(dir, &model, &t, FloatType::F32);
        edit_json(&dir.join("config.json"), |c| {
            c.insert("moe_intermediate_size".into(), width.into());
            if self.family.starts_with("deepseek") {
                let (q_lora, kv_lora, nope, rope, v) = LATENT;
                let q_lora = (self.family == "deepseek_v3").then_some(q_lora);
                c.insert("q_lora_rank".into(), q_lora.into());
                c.insert("kv_lora_rank".into(), kv_lora.into());
                c.insert("qk_nope_head_dim".into(), nope.into());
                c.insert("qk_rope_head_dim".into(), rope.into());
                c.insert("v_head_dim".into(), v.into());
            }
            match self.family {
                "glm4_moe" | "deepseek_v3" | "deepseek_v2" => {
                    // GLM-4.5's and DeepSeek's dense layers come first.
                    assert!(self.dense.iter().enumerate().all(|(i, &l)| i == l));
                    c.insert("n_routed_experts".into(), self.experts.into());
                    c.insert("n_shared_experts".into(), 2.into());
                    c.insert("first_k_dense_replace".into(), self.dense.len().into());
                }
                family => {
                    c.insert("num_experts".into(), self.experts.into());
                    c.insert("mlp_only_layers".into(), self.dense.clone().into());
                    if family == "qwen2_moe" {
                        c.insert("shared_expert_intermediate_size".into(), SHARED.into());
                    }
                }
            }
        });
    }

    /// A PEFT adapter on every module of every layer, each module's factors its own.
    pub fn adapter(&self, dir: &Path) {
        let mut modules = BTreeMap::new();
        for l in 0..LAYERS {
            for (s, (name, out, inp)) in self.modules(l).into_iter().enumerate() {
                let seed = (l * 1000 + s) as u64;
                modules.insert(
                    format!("model.layers.{l}.{name}"),
                    random_factors(out, inp, 4, 8.0, seed, FloatType::F32),
                );
            }
        }
        write_peft(dir, self.family, 4, 8.0, serde_json::json!({}), &modules);
    }
}
