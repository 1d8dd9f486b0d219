//! Synthetic PEFT LoRA adapters for a base checkpoint, shaped from the base's own tensors and
//! saved exactly as PEFT saves them.
//!
//! Unlike a freshly initialized PEFT adapter (whose lora_B is zero, so ΔW = 0 and a transfer
//! has nothing to carry), both factors are non-zero: A is drawn like PEFT's Kaiming-uniform
//! init, uniform in ±1/√in, and B is small Gaussian, as after some training.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::{json, Value};

use super::presets::sorted;
use super::{fill_normal, fill_uniform_pm1, stream_id};
use crate::arch::ModuleSpec;
use crate::error::{Error, Result};
use crate::io::adapter::{self as peft, LoraFactors};
use crate::io::checkpoint::Checkpoint;
use crate::io::safetensors::FloatType;

/// Standard deviation of lora_B entries.
const B_STD: f32 = 0.01;

/// What adapter to synthesize (`loraxfer synth adapter`).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    /// LoRA rank.
    pub r: usize,
    pub alpha: f64,
    /// Module type names of the base's architecture table (`q_proj`, ...); empty means all.
    pub targets: Vec<String>,
    pub seed: u64,
    /// Storage type of the factors.
    pub dtype: FloatType,
}

impl Default for AdapterSpec {
    /// r = 16, alpha = 32 (PEFT examples' usual pair), every module, f32 (PEFT's default).
    fn default() -> Self {
        AdapterSpec {
            r: 16,
            alpha: 32.0,
            targets: Vec::new(),
            seed: 0,
            dtype: FloatType::F32,
        }
    }
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` for the checkpoint at `base_dir`
/// into `out_dir` (which must exist): every layer, every targeted module type.
pub fn write_adapter(base_dir: &Path, spec: &AdapterSpec, out_dir: &Path) -> Result<()> {
    if spec.r == 0 {
        return Err(Error::arg("--r", "the LoRA rank must be at least 1"));
    }
    if !(spec.alpha.is_finite() && spec.alpha > 0.0) {
        return Err(Error::arg(
            "--alpha",
            format!("{} is not a positive number", spec.alpha),
        ));
    }
    let ckpt = Checkpoint::open(base_dir)?;
    let side = crate::plan::ModelSide::new(&ckpt)?;
    let table = side.arch;
    let targets = select_targets(&table.modules, &spec.targets)?;

    let mut modules = BTreeMap::new();
    for layer in 0..ckpt.config.num_hidden_layers {
        // The modules this layer has: a dense MLP or experts, the query whole or through its
        // latent, as the config says.
        let held = targets.iter().filter(|m| side.holds(layer, m));
        for (module, expert) in
            held.flat_map(|m| m.instances(&ckpt.config).into_iter().map(move |e| (m, e)))
        {
            // Named as an adapter names it; its weight where the checkpoint stores it.
            let name = table.module_path(&side.names, layer, expert, module);
            let weight = format!(
                "{}.weight",
                table.module_path(&side.prefix, layer, expert, module)
            );
            let (out_features, in_features) = match *ckpt.shape(&weight)? {
                [m, n] => (m, n),
                ref other => {
                    return Err(Error::bad_tensor(
                        base_dir,
                        &weight,
                        format!("shape {other:?} is not 2-D"),
                    ))
                }
            };
            let factors = factors(spec, &name, in_features, out_features);
            modules.insert(name, factors.encode());
        }
    }

    if modules.is_empty() {
        let names: Vec<&str> = targets.iter().map(|m| m.name.as_str()).collect();
        return Err(Error::arg(
            "--targets",
            format!(
                "{} name(s) no module of this model (its config leaves them out: a dense MLP \
                 where every layer has experts, `q_proj` where the query has a latent, …)",
                names.join(", ")
            ),
        ));
    }
    // As PEFT's users name them, by the last part of the key (`gate_proj` for every block's gate
    // projection), unless that would name modules left out: then each module in full.
    let tails: BTreeSet<String> = targets.iter().map(|m| m.key_tail().to_string()).collect();
    let whole = table
        .modules
        .iter()
        .filter(|m| tails.contains(m.key_tail()))
        .all(|m| targets.iter().any(|t| t.name == m.name));
    let target_names: Vec<String> = match whole {
        true => tails.into_iter().collect(),
        false => modules.keys().cloned().collect(),
    };
    let target_names: Vec<&str> = target_names.iter().map(String::as_str).collect();
    let config = adapter_config(base_dir, spec, &target_names);
    let Value::Object(mut config) = config else {
        unreachable!("adapter_config builds an object")
    };
    if table.stored_experts.is_some() {
        // A family whose experts are fused on disk (GPT-OSS) is adapted on the fused parameters,
        // as PEFT does it: written in that form, as a transfer onto it is.
        let text = Value::Object(config.clone()).to_string();
        let read = peft::AdapterConfig::parse(&text, &out_dir.join(peft::CONFIG_FILE))?;
        let fused = crate::transfer::fused_out::fuse_experts(&mut config, modules, &read, &side)?;
        return peft::write_adapter(out_dir, &config, &fused);
    }
    peft::write_adapter(out_dir, &config, &modules)
}

/// The module types named by `--targets` (all of them when none are named), or an error listing
/// the valid names.
fn select_targets<'a>(all: &'a [ModuleSpec], names: &[String]) -> Result<Vec<&'a ModuleSpec>> {
    if names.is_empty() {
        return Ok(all.iter().collect());
    }
    let mut chosen: Vec<&ModuleSpec> = Vec::new();
    for name in names {
        // A module type's name, or the last part of keys (`gate_proj`: every block's).
        let named: Vec<&ModuleSpec> = all
            .iter()
            .filter(|m| &m.name == name || m.key_tail() == name)
            .collect();
        if named.is_empty() {
            let valid: Vec<&str> = all.iter().map(|m| m.name.as_str()).collect();
            return Err(Error::arg(
                "--targets",
                format!(
                    "unknown module `{name}` for this architecture (valid: {})",
                    valid.join(", ")
                ),
            ));
        }
        for m in named {
            if !chosen.iter().any(|c| c.name == m.name) {
                chosen.push(m);
            }
        }
    }
    Ok(chosen)
}

/// Factors of one module: A uniform in ±1/√in (`[r, in]`), B Gaussian with std [`B_STD`]
/// (`[out, r]`), each from its own stream keyed by the module name.
fn factors(
    spec: &AdapterSpec,
    module: &str,
    in_features: usize,
    out_features: usize,
) -> LoraFactors {
    let r = spec.r;
    let mut a = vec![0f32; r * in_features];
    fill_uniform_pm1(spec.seed, stream_id(&["lora_A", module]), 0, &mut a);
    let bound = 1.0 / (in_features as f32).sqrt();
    a.iter_mut().for_each(|x| *x *= bound);
    let mut b = vec![0f32; out_features * r];
    fill_normal(spec.seed, stream_id(&["lora_B", module]), 0, &mut b);
    b.iter_mut().for_each(|x| *x *= B_STD);
    LoraFactors {
        a,
        b,
        r,
        in_features,
        out_features,
        alpha: spec.alpha,
        ty: spec.dtype,
    }
}

/// `adapter_config.json` as PEFT's `save_pretrained` writes it for a plain LoRA (keys sorted,
/// as PEFT does).
fn adapter_config(base_dir: &Path, spec: &AdapterSpec, targets: &[&str]) -> Value {
    // PEFT users write `lora_alpha=32`, which JSON keeps as an integer.
    let alpha = if spec.alpha.fract() == 0.0 && spec.alpha.abs() < 1e15 {
        json!(spec.alpha as i64)
    } else {
        json!(spec.alpha)
    };
    let fields = json!({
        "alpha_pattern": {},
        "base_model_name_or_path": base_dir.display().to_string(),
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": spec.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": false,
    });
    match fields {
        Value::Object(map) => sorted(map),
        _ => unreachable!(),
    }
}
