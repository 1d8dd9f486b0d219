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

/// A layered mixture of experts: what `family` names its shared expert (`qwen2_moe`:
/// `mlp.shared_expert`, `glm4_moe`: `mlp.shared_experts`; `qwen3_moe` has none).
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
            "glm4_moe" => Some(2 * DIMS.5),
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
        let mut all = attention(h);
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
            match self.family {
                "glm4_moe" => {
                    // GLM-4.5's dense layers come first.
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
