//! An adapter written as an MLX adapter (`export-mlx`), for mlx-lm to load onto the same base:
//! `adapters.safetensors` with each module's `lora_a = Aᵀ` `[in, rank]` and `lora_b = Bᵀ`
//! `[rank, out]`, and an `adapter_config.json` whose `lora_parameters` give one rank and one
//! scale for every module, as mlx-lm's LoRA layers have. A module of a smaller rank is padded
//! with zero ranks (which add nothing); a module whose scale differs from the config's (an
//! `alpha_pattern` entry, rslora) has the ratio folded into its `lora_b`, written in f32.
//!
//! mlx-lm puts LoRA layers on the modules `keys` names under each of the last `num_layers`
//! layers (their paths under the layer, `self_attn.q_proj`), and on modules named by their whole
//! path; `load_adapters` refuses a tensor no LoRA layer has. Its models name their modules as
//! Hugging Face's do, under `model.layers` (and `language_model.model.layers` where transformers
//! 5 says `model.language_model.layers`); a module elsewhere (a vision tower's) is refused.
//! With the base given, every module's weight is looked up there (under `language_model` too,
//! where mlx-lm's multimodal ports keep the language model) and its shape checked, and
//! `num_layers` counts from the first adapted layer to the base's last, which every mlx-lm reads
//! alike; without, it is −1, which mlx-lm reads as all layers since 0.22.

use std::path::Path;

use super::mlx::{unsupported, MLX_WEIGHTS_FILE};
use super::{Adapter, CONFIG_FILE};
use crate::error::{Error, Result};
use crate::io::checkpoint::Checkpoint;
use crate::io::quantized::mlx::{expert_module, stack_of, stack_parts};
use crate::io::safetensors::{self as st, FloatType, OutTensor};
use crate::plan::ModelSide;
use std::collections::BTreeMap;

/// What [`write_mlx`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WrittenMlx {
    /// The directory written (empty until committed).
    pub path: String,
    pub modules: usize,
    pub rank: usize,
    pub scale: f64,
    pub num_layers: i64,
    /// The module paths `lora_parameters.keys` names.
    pub keys: Vec<String>,
}

/// `export-mlx`: the adapter at `adapter` (a PEFT or MLX directory, or a cached hub name)
/// written at `out` as an MLX adapter, atomically; an existing `out` is replaced only with
/// `force`, and only when it is an earlier output. `base` (a directory or a cached hub name),
/// where given, is the MLX model it is for: every module is checked against its weights.
pub fn export(adapter: &Path, base: Option<&Path>, out: &Path, force: bool) -> Result<WrittenMlx> {
    use crate::io::hub::{self, Kind};
    let (dir, hub_name) = hub::resolve(adapter, Kind::Adapter)?;
    let base = match base {
        Some(b) => Some(Checkpoint::open(&hub::resolve(b, Kind::Model)?.0)?),
        None => None,
    };
    // A LoRA on fused expert parameters is read as the base's family lays them out (GPT-OSS's
    // gate and up rows alternate), one module per expert under the base's names.
    // (A base of a family without a table is no error until such a LoRA needs one.)
    let side = base.as_ref().map(ModelSide::new);
    let opened = match &side {
        Some(Ok(side)) => {
            let mut opened = Adapter::open_with(&dir, side.experts_layout())?;
            crate::plan::experts::name_fused_experts(&mut opened, side)?;
            opened
        }
        _ => Adapter::open(&dir)?,
    };
    if let Some((module, _)) = (opened.modules.iter()).find(|(_, m)| m.a.expert.is_some()) {
        match side {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e),
            None => {
                return Err(unsupported(
                    &dir,
                    format!(
                        "`{module}` is read out of a LoRA on fused expert parameters, which the \
                         base's family lays out: give --base (the model it is for)"
                    ),
                ))
            }
        }
    }
    let name = match &base {
        Some(b) => b.dir.to_string_lossy().into_owned(),
        None => opened
            .config
            .raw
            .get("base_model_name_or_path")
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .or(hub_name.map(|h| h.name))
            .unwrap_or_default(),
    };
    let mut inputs = vec![dir.as_path()];
    inputs.extend(base.as_ref().map(|b| b.dir.as_path()));
    let staged = crate::io::output::StagedDir::create(out, force, &inputs)?;
    let written = write_mlx(&opened, base.as_ref(), staged.path(), &name)?;
    let path = staged.commit()?.to_string_lossy().into_owned();
    Ok(WrittenMlx { path, ..written })
}

/// Where a module goes in mlx-lm's model: its path there, the key `lora_parameters.keys` names
/// it by, and its layer (None: a module outside the layers, keyed by its whole path).
fn place(module: &str) -> std::result::Result<(String, String, Option<usize>), String> {
    let parts: Vec<&str> = module.split('.').collect();
    let at = parts
        .windows(2)
        .position(|w| w[0] == "layers" && w[1].parse::<usize>().is_ok());
    let Some(at) = at.filter(|&at| at + 2 < parts.len()) else {
        return Ok((module.to_string(), module.to_string(), None));
    };
    let prefix = match parts[..at].join(".").as_str() {
        "model" => "model",
        "language_model.model" | "model.language_model" => "language_model.model",
        _ => {
            return Err(format!(
                "`{module}` is not under the language model's layers (`model.layers`), where \
                 mlx-lm puts its LoRA layers"
            ))
        }
    };
    let key = parts[at + 2..].join(".");
    let layer: usize = parts[at + 1].parse().expect("checked");
    Ok((format!("{prefix}.layers.{layer}.{key}"), key, Some(layer)))
}

/// The name under which `base` holds the weight of the module at `path`: there, or under
/// `language_model`, where mlx-lm's multimodal ports keep the language model (its layers, and
/// its `lm_head`) where a text model's name may not say so.
fn base_weight(base: &Checkpoint, path: &str) -> Option<String> {
    [
        path.to_string(),
        path.replacen("model.layers.", "language_model.model.layers.", 1),
        format!("language_model.{path}"),
    ]
    .into_iter()
    .find(|p| base.has(&format!("{p}.weight")))
}

/// Where mlx-lm keeps the stack of experts `(parent, proj)`: a SwitchGLU named `experts` (its
/// GPT-OSS and Llama 4 ports, dots1, …) or `switch_mlp` (the others). An MLX base's stacks say
/// which; else the stack the adapter's module was read from, where it was read from one; else
/// the base's family (GPT-OSS and Llama 4, whose Hugging Face checkpoints store their experts
/// fused); without a base, Llama 4's `feed_forward`.
fn holder(
    adapter: &Adapter,
    base: Option<&Checkpoint>,
    (parent, proj): (&str, &str),
    module: &str,
) -> &'static str {
    const HOLDERS: [&str; 2] = ["experts", "switch_mlp"];
    let stored = |b: &Checkpoint| {
        HOLDERS
            .into_iter()
            .find(|h| base_weight(b, &format!("{parent}.{h}.{proj}")).is_some())
    };
    let read_from = || {
        let a = &adapter.modules[module].a;
        a.stacked.map(|_| match a.tensor.contains(".switch_mlp.") {
            true => "switch_mlp",
            false => "experts",
        })
    };
    let family = |b: &Checkpoint| {
        crate::arch::for_config(&b.config, &b.dir)
            .ok()
            .map(|arch| match arch.stored_experts {
                Some(_) => "experts",
                None => "switch_mlp",
            })
    };
    base.and_then(stored)
        .or_else(read_from)
        .or_else(|| base.and_then(family))
        .unwrap_or(match parent.ends_with("feed_forward") {
            true => "experts",
            false => "switch_mlp",
        })
}

/// A placed module (`(path, key, layer)` from [`place`]) as `base` names it, each of `modules`
/// (a module, or where `stack`, a stack's experts) checked to have its weight there, of its
/// shape.
fn in_base(
    base: &Checkpoint,
    (path, key, layer): (String, String, Option<usize>),
    modules: &[(&super::LoraTensors, &str)],
    stack: bool,
) -> std::result::Result<(String, String), String> {
    let stack = stack.then(|| stack_parts(&path)).flatten();
    let holder = match path.contains(".switch_mlp.") {
        true => "switch_mlp",
        false => "experts",
    };
    for &(m, module) in modules {
        let weight = match stack {
            Some((parent, proj)) => {
                let (_, _, e) = stack_of(module).expect("an expert of the stack");
                expert_module(parent, proj, e)
            }
            None => path.clone(),
        };
        let found = base_weight(base, &weight).unwrap_or(weight);
        let weight = format!("{found}.weight");
        let shape = base.shape(&weight).ok();
        if shape != Some(&[m.out_features, m.in_features][..]) {
            return Err(format!(
                "`{module}` is [{}, {}], but the base {} has {}",
                m.out_features,
                m.in_features,
                base.dir.display(),
                shape.map_or(format!("no `{weight}`"), |s| format!("`{weight}` {s:?}"))
            ));
        }
    }
    Ok(
        match base_weight(base, &path).or_else(|| {
            // A stack is found by its first expert's weight.
            let (parent, proj) = stack?;
            let (_, _, e) = stack_of(modules[0].1)?;
            let found = base_weight(base, &expert_module(parent, proj, e))?;
            let parent = found.split_once(".experts.")?.0;
            Some(format!("{parent}.{holder}.{proj}"))
        }) {
            // (A module outside the layers is keyed by its whole path.)
            Some(found) if layer.is_none() => (found.clone(), found),
            Some(found) => (found, key),
            None => (path, key),
        },
    )
}

/// Writes `adapter` into `dir` (which must exist) as an MLX adapter; `name` names its base in
/// the config (`model`), and `base`, where given, is checked to have every module's weight.
pub fn write_mlx(
    adapter: &Adapter,
    base: Option<&Checkpoint>,
    dir: &Path,
    name: &str,
) -> Result<WrittenMlx> {
    let cfg = &adapter.config;
    let refuse = |why: String| unsupported(&adapter.dir, why);
    let rank = adapter.modules.values().map(|m| m.r).max().unwrap_or(0);
    // The config's scale, unless it is zero (lora_alpha 0): then the first module's that is not.
    let scale = std::iter::once(cfg.scale(cfg.r, cfg.lora_alpha))
        .chain(adapter.modules.values().map(|m| cfg.scale(m.r, m.alpha)))
        .find(|s| *s != 0.0 && s.is_finite())
        .unwrap_or(1.0);
    // A module's own scale over the adapter's one, folded into its lora_b.
    let ratio = |module: &str, m: &super::LoraTensors| {
        let ratio = cfg.scale(m.r, m.alpha) / scale;
        match ratio.is_finite() {
            true => Ok(ratio),
            false => Err(refuse(format!(
                "`{module}`'s scale {} is not finite",
                cfg.scale(m.r, m.alpha)
            ))),
        }
    };
    let mut tensors = Vec::with_capacity(2 * adapter.modules.len());
    let (mut keys, mut first_layer) = (Vec::new(), None::<usize>);
    // Experts' modules go into their layer's stacks, by the stack's place in mlx-lm's model
    // (as a `switch_mlp`; which holder it is in is settled below): (layer, expert → module).
    type Stack<'a> = (Option<usize>, BTreeMap<usize, &'a str>);
    let mut stacks: BTreeMap<String, Stack<'_>> = BTreeMap::new();
    let built: std::collections::HashSet<&str> = match base {
        Some(b) if b.is_mlx() => b.built_weights().into_iter().collect(),
        _ => Default::default(),
    };
    for (module, m) in &adapter.modules {
        if let Some((parent, proj, e)) = stack_of(module) {
            let stack = format!("{parent}.switch_mlp.{proj}");
            let (path, _, layer) = place(&stack).map_err(&refuse)?;
            let members = &mut stacks.entry(path).or_insert((layer, BTreeMap::new())).1;
            if let Some(other) = members.insert(e, module) {
                return Err(refuse(format!(
                    "`{module}` and `{other}` are both expert {e} of `{stack}`"
                )));
            }
            continue;
        }
        let (path, key, layer) = place(module).map_err(&refuse)?;
        let (path, key) = match base {
            Some(base) => {
                let (path, key) =
                    in_base(base, (path, key, layer), &[(m, module)], false).map_err(&refuse)?;
                // Latent attention's `kv_b_proj`, which an MLX base builds from the MultiLinear
                // halves mlx-lm splits it into, is no Linear of mlx-lm's.
                let weight = format!("{path}.weight");
                if weight.ends_with(".kv_b_proj.weight") && built.contains(weight.as_str()) {
                    return Err(refuse(format!(
                        "`{module}`: mlx-lm holds `{weight}` otherwise (latent attention's \
                         `kv_b_proj` split per head into `embed_q` and `unembed_out`), and its \
                         LoRA layers do not adapt it"
                    )));
                }
                (path, key)
            }
            None => (path, key),
        };
        keys.push(key);
        if let Some(l) = layer {
            first_layer = Some(first_layer.map_or(l, |f| f.min(l)));
        }
        let ratio = ratio(module, m)?;
        let f = adapter.factors(module)?;
        // lora_a = Aᵀ and lora_b = (ratio · B)ᵀ, zero past the module's rank.
        let mut a = vec![0f32; m.in_features * rank];
        let mut b = vec![0f32; rank * m.out_features];
        for k in 0..m.r {
            for i in 0..m.in_features {
                a[i * rank + k] = f.a[k * m.in_features + i];
            }
            for o in 0..m.out_features {
                b[k * m.out_features + o] = (f.b[o * m.r + k] as f64 * ratio) as f32;
            }
        }
        let ty = if ratio == 1.0 { m.ty } else { FloatType::F32 };
        tensors.push((
            format!("{path}.lora_a"),
            OutTensor::from_f32(a, vec![m.in_features, rank], ty),
        ));
        tensors.push((
            format!("{path}.lora_b"),
            OutTensor::from_f32(b, vec![rank, m.out_features], ty),
        ));
    }
    for (switch_path, (layer, members)) in stacks {
        let modules: Vec<(&super::LoraTensors, &str)> = members
            .values()
            .map(|name| (&adapter.modules[*name], *name))
            .collect();
        let (first, first_name) = modules[0];
        let (n, m) = (first.in_features, first.out_features);
        if let Some((_, other)) = modules
            .iter()
            .find(|(x, _)| (x.in_features, x.out_features) != (n, m))
        {
            return Err(refuse(format!(
                "`{other}` and `{first_name}` are experts of one stack of other shapes"
            )));
        }
        let (parent, proj) = switch_path
            .split_once(".switch_mlp.")
            .expect("a stack's path");
        let holder = holder(adapter, base, (parent, proj), first_name);
        let (path, key, _) = place(&format!("{parent}.{holder}.{proj}")).map_err(&refuse)?;
        // As many experts as the base has (or as the adapter names): one without an update
        // adds zeros.
        let (path, key, experts) = match base {
            Some(base) => {
                let experts = (0..)
                    .take_while(|&e| base_weight(base, &expert_module(parent, proj, e)).is_some())
                    .count();
                if experts == 0 {
                    return Err(refuse(format!(
                        "`{first_name}` is an expert's, but the base {} has no experts at `{}`",
                        base.dir.display(),
                        expert_module(parent, proj, 0)
                    )));
                }
                let (path, key) =
                    in_base(base, (path, key, layer), &modules, true).map_err(&refuse)?;
                (path, key, experts)
            }
            None => (path, key, members.keys().last().map_or(0, |&e| e + 1)),
        };
        if let Some((&e, name)) = members.range(experts..).next() {
            return Err(refuse(format!(
                "`{name}` is expert {e}, but the base has {experts} in that layer"
            )));
        }
        keys.push(key);
        if let Some(l) = layer {
            first_layer = Some(first_layer.map_or(l, |f| f.min(l)));
        }
        // Expert e's lora_a[e] = A `[rank, in]` and lora_b[e] = ratio · B `[out, rank]`, as
        // they lie (LoRASwitchLinear's factors are PEFT's way round), zero past its rank.
        let mut a = vec![0f32; experts * rank * n];
        let mut b = vec![0f32; experts * m * rank];
        let mut ty = first.ty;
        for (&e, name) in &members {
            let x = &adapter.modules[*name];
            let ratio = ratio(name, x)?;
            if ratio != 1.0 || x.ty != first.ty {
                ty = FloatType::F32;
            }
            let f = adapter.factors(name)?;
            a[e * rank * n..][..x.r * n].copy_from_slice(&f.a);
            for o in 0..m {
                for k in 0..x.r {
                    b[(e * m + o) * rank + k] = (f.b[o * x.r + k] as f64 * ratio) as f32;
                }
            }
        }
        tensors.push((
            format!("{path}.lora_a"),
            OutTensor::from_f32(a, vec![experts, rank, n], ty),
        ));
        tensors.push((
            format!("{path}.lora_b"),
            OutTensor::from_f32(b, vec![experts, m, rank], ty),
        ));
    }
    let metadata = st::metadata_with_format("mlx");
    st::write_file(&dir.join(MLX_WEIGHTS_FILE), &tensors, metadata)?;
    keys.sort();
    keys.dedup();
    let num_layers = match (base, first_layer) {
        (Some(b), Some(first)) => b.config.num_hidden_layers.saturating_sub(first) as i64,
        _ => -1,
    };
    let config = serde_json::json!({
        "fine_tune_type": "lora",
        "model": name,
        "num_layers": num_layers,
        "lora_parameters": {
            "rank": rank,
            "scale": scale,
            "dropout": cfg.raw.get("lora_dropout").and_then(|v| v.as_f64()).unwrap_or(0.0),
            "keys": keys,
        },
    });
    let text = serde_json::to_string_pretty(&config).expect("JSON values always serialize");
    let path = dir.join(CONFIG_FILE);
    std::fs::write(&path, text + "\n").map_err(|e| Error::io(&path, "cannot write", e))?;
    Ok(WrittenMlx {
        path: String::new(),
        modules: adapter.modules.len(),
        rank,
        scale,
        num_layers,
        keys,
    })
}

#[cfg(test)]
#[path = "mlx_write_tests.rs"]
mod tests;
