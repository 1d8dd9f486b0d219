//! Mixture-of-experts fixtures: small Qwen3-MoE and Mixtral checkpoints (routers included),
//! adapters on them, and transfers on the CPU.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use faer::Mat;
use loraxfer::io::safetensors::FloatType;
use loraxfer::modes::Mode;
use loraxfer::plan::Options;
use loraxfer::transfer::{self, Job};

use super::refusals::edit_json;
use super::*;

// hidden, dense MLP width, heads, kv heads, head_dim, expert width.
pub const DIMS: (usize, usize, usize, usize, usize, usize) = (32, 48, 4, 2, 8, 12);
pub const LAYERS: usize = 2;

/// A mixture-of-experts checkpoint: `family` picks the names (`qwen3_moe`: `mlp.experts.E.*_proj`,
/// `mixtral`: `block_sparse_moe.experts.E.w1|w2|w3`), `experts` the count; `seed` the weights.
pub fn moe_model(dir: &Path, family: &'static str, experts: usize, seed: u64) {
    moe_model_with(dir, family, &(0..experts).collect::<Vec<_>>(), seed, DIMS.0);
}

/// The same, with the model of `seed`'s experts `kept` (in this order: an expert-pruned model
/// when they are fewer) at hidden size `h`.
pub fn moe_model_with(dir: &Path, family: &'static str, kept: &[usize], seed: u64, h: usize) {
    let (_, inter, heads, kv, d, width) = DIMS;
    let experts = kept.len();
    let mut t = BTreeMap::new();
    for l in 0..LAYERS {
        for (s, (name, out, inp)) in attention(h).into_iter().enumerate() {
            let w = gaussian(out, inp, seed, (l * 100 + s) as u64);
            t.insert(format!("model.layers.{l}.{name}.weight"), weight(&w));
        }
        let router = gaussian(16, h, seed, (l * 100 + 99) as u64);
        let rows = Mat::from_fn(experts, h, |k, c| router[(kept[k], c)]);
        let block = if family == "mixtral" {
            "block_sparse_moe"
        } else {
            "mlp"
        };
        t.insert(
            format!("model.layers.{l}.{block}.gate.weight"),
            weight(&rows),
        );
        for (k, &e) in kept.iter().enumerate() {
            for (s, (name, out, inp)) in expert_modules(family, k, width, h).into_iter().enumerate()
            {
                let w = gaussian(out, inp, seed, (l * 100 + 10 + e * 3 + s) as u64);
                t.insert(format!("model.layers.{l}.{name}.weight"), weight(&w));
            }
        }
    }
    let model = TinyModel {
        model_type: family,
        hidden: h,
        intermediate: inter,
        layers: LAYERS,
        heads,
        kv_heads: kv,
        head_dim: d,
    };
    write_checkpoint(dir, &model, &t, FloatType::F32);
    edit_json(&dir.join("config.json"), |c| match family {
        "mixtral" => {
            c.insert("num_local_experts".into(), experts.into());
            c.insert("intermediate_size".into(), width.into());
        }
        _ => {
            c.insert("num_experts".into(), experts.into());
            c.insert("moe_intermediate_size".into(), width.into());
        }
    });
}

pub fn weight(w: &Mat<f32>) -> (Vec<f32>, Vec<usize>) {
    (row_major(w), vec![w.nrows(), w.ncols()])
}

/// The attention projections of a layer at hidden size `h`: (key, out, in).
pub fn attention(h: usize) -> Vec<(String, usize, usize)> {
    let (_, _, heads, kv, d, _) = DIMS;
    [
        ("q", heads * d, h),
        ("k", kv * d, h),
        ("v", kv * d, h),
        ("o", h, heads * d),
    ]
    .into_iter()
    .map(|(p, out, inp)| (format!("self_attn.{p}_proj"), out, inp))
    .collect()
}

/// Expert `e`'s gate, up and down under `family`'s names: (key, out, in).
pub fn expert_modules(
    family: &str,
    e: usize,
    width: usize,
    h: usize,
) -> Vec<(String, usize, usize)> {
    let names = match family {
        "mixtral" => [
            ("block_sparse_moe", "w1"),
            ("block_sparse_moe", "w3"),
            ("block_sparse_moe", "w2"),
        ],
        _ => [
            ("mlp", "gate_proj"),
            ("mlp", "up_proj"),
            ("mlp", "down_proj"),
        ],
    };
    let shapes = [(width, h), (width, h), (h, width)];
    names
        .iter()
        .zip(shapes)
        .map(|(&(block, n), (out, inp))| (format!("{block}.experts.{e}.{n}"), out, inp))
        .collect()
}

/// A PEFT adapter on `family` with every attention module and every expert's modules, each
/// expert's factors its own.
pub fn moe_adapter(dir: &Path, family: &str, experts: usize, with_experts: bool) {
    let mut modules = BTreeMap::new();
    for l in 0..LAYERS {
        let mut all = attention(DIMS.0);
        if with_experts {
            for e in 0..experts {
                all.extend(expert_modules(family, e, DIMS.5, DIMS.0));
            }
        }
        for (s, (name, out, inp)) in all.into_iter().enumerate() {
            let seed = (l * 1000 + s) as u64;
            modules.insert(
                format!("model.layers.{l}.{name}"),
                random_factors(out, inp, 4, 8.0, seed, FloatType::F32),
            );
        }
    }
    write_peft(dir, family, 4, 8.0, serde_json::json!({}), &modules);
}

pub fn job(source: &Path, target: &Path, adapter: &Path, out: &Path, mode: Mode) -> Job {
    let options = Options {
        mode,
        rank: 64,
        oversample: 4,
        ..Options::default()
    };
    cpu_job(source, target, adapter, out, options)
}

/// An adapter on `base` (a model type) with one module of shape `out × inp`.
pub fn one_module_adapter(dir: &Path, base: &str, module: &str, out: usize, inp: usize) {
    let mut modules = BTreeMap::new();
    let f = random_factors(out, inp, 2, 4.0, 1, FloatType::F32);
    modules.insert(module.to_string(), f);
    write_peft(dir, base, 2, 4.0, serde_json::json!({}), &modules);
}

pub struct Dirs {
    _tmp: tempfile::TempDir,
    pub root: PathBuf,
}

impl Dirs {
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        Dirs {
            root: tmp.path().to_path_buf(),
            _tmp: tmp,
        }
    }
    pub fn p(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

pub fn err_of(j: &Job) -> String {
    transfer::run(j).unwrap_err().to_string()
}
