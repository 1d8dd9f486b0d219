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
use crate::io::quantized::mlx::{expert_module, stack_of};
use crate::io::safetensors::{self as st, FloatType, OutTensor};
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
    let opened = Adapter::open(&dir)?;
    let base = match base {
        Some(b) => Some(Checkpoint::open(&hub::resolve(b, Kind::Model)?.0)?),
        None => None,
    };
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

/// A placed module (`(path, key, layer)` from [`place`]) as `base` names it, each of `modules`
/// (a module, or a stack's experts) checked to have its weight there, of its shape.
fn in_base(
    base: &Checkpoint,
    (path, key, layer): (String, String, Option<usize>),
    modules: &[(&super::LoraTensors, &str)],
) -> std::result::Result<(String, String), String> {
    let stack = path.split_once(".switch_mlp.");
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
            Some(found.split_once(".experts.")?.0.to_string() + ".switch_mlp." + proj)
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
    // Experts' modules go into their layer's stacks (mlx-lm's `switch_mlp`), by the stack's
    // place in mlx-lm's model: (key, layer, expert → module).
    type Stack<'a> = (String, Option<usize>, BTreeMap<usize, &'a str>);
    let mut stacks: BTreeMap<String, Stack<'_>> = BTreeMap::new();
    for (module, m) in &adapter.modules {
        if let Some((parent, proj, e)) = stack_of(module) {
            if parent.ends_with("feed_forward") {
                return Err(refuse(format!(
                    "`{module}` is a Llama 4 expert's: mlx-lm keeps those in a SwitchGLU named \
                     `experts`, whose LoRA is not written"
                )));
            }
            let stack = format!("{parent}.switch_mlp.{proj}");
            let (path, key, layer) = place(&stack).map_err(&refuse)?;
            let members = &mut stacks
                .entry(path)
                .or_insert((key, layer, BTreeMap::new()))
                .2;
            if let Some(other) = members.insert(e, module) {
                return Err(refuse(format!(
                    "`{module}` and `{other}` are both expert {e} of `{stack}`"
                )));
            }
            continue;
        }
        let (path, key, layer) = place(module).map_err(&refuse)?;
        let (path, key) = match base {
            Some(base) => in_base(base, (path, key, layer), &[(m, module)]).map_err(&refuse)?,
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
    for (path, (key, layer, members)) in stacks {
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
        // As many experts as the base has (or as the adapter names): one without an update
        // adds zeros.
        let (path, key, experts) = match base {
            Some(base) => {
                let (parent, proj) = path.split_once(".switch_mlp.").expect("a stack's path");
                let experts = (0..)
                    .take_while(|&e| base_weight(base, &expert_module(parent, proj, e)).is_some())
                    .count();
                if experts == 0 {
                    return Err(refuse(format!(
                        "`{first_name}` is an expert's, but the base {} has no stack \
                         `{path}` (mlx-lm's GPT-OSS and Llama 4 keep their experts in a \
                         SwitchGLU named `experts`, whose LoRA is not written)",
                        base.dir.display()
                    )));
                }
                let (path, key) = in_base(base, (path, key, layer), &modules).map_err(&refuse)?;
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
    let metadata = std::collections::HashMap::from([
        ("format".to_string(), "mlx".to_string()),
        (st::PRODUCER_KEY.to_string(), st::PRODUCER.to_string()),
    ]);
    st::write_file(&dir.join(MLX_WEIGHTS_FILE), &tensors, Some(metadata))?;
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
mod tests {
    use super::*;
    use crate::io::adapter::mlx::is_mlx;
    use crate::io::adapter::{write_adapter, AdapterConfig, EncodedFactors, LoraModule};
    use std::collections::BTreeMap;

    #[test]
    fn modules_are_placed_and_keyed_as_mlx_lm_names_them() {
        let placed = |m: &str| place(m).unwrap();
        assert_eq!(
            placed("model.layers.3.self_attn.q_proj"),
            (
                "model.layers.3.self_attn.q_proj".to_string(),
                "self_attn.q_proj".to_string(),
                Some(3)
            )
        );
        // transformers 5's multimodal name, and mlx-lm's.
        for name in [
            "model.language_model.layers.12.mlp.down_proj",
            "language_model.model.layers.12.mlp.down_proj",
        ] {
            let (path, key, layer) = placed(name);
            assert_eq!(path, "language_model.model.layers.12.mlp.down_proj");
            assert_eq!((key.as_str(), layer), ("mlp.down_proj", Some(12)));
        }
        assert_eq!(placed("lm_head").1, "lm_head");
        let err = place("model.vision_tower.encoder.layers.0.self_attn.q_proj").unwrap_err();
        assert!(
            err.contains("not under the language model's layers"),
            "{err}"
        );
    }

    /// s·B·A of a module, `[out, in]` in f64.
    fn update(cfg: &AdapterConfig, f: &super::super::LoraFactors) -> Vec<f64> {
        let s = cfg.scale(f.r, f.alpha);
        let mut d = vec![0f64; f.out_features * f.in_features];
        for o in 0..f.out_features {
            for i in 0..f.in_features {
                d[o * f.in_features + i] = s
                    * (0..f.r)
                        .map(|k| f.b[o * f.r + k] as f64 * f.a[k * f.in_features + i] as f64)
                        .sum::<f64>();
            }
        }
        d
    }

    #[test]
    fn experts_modules_and_stacks_name_each_other() {
        use crate::io::quantized::mlx::{expert_module, stack_of};
        for (parent, proj, e, module) in [
            (
                "model.layers.3.mlp",
                "gate_proj",
                0,
                "model.layers.3.mlp.experts.0.gate_proj",
            ),
            (
                "model.layers.3.mlp",
                "down_proj",
                17,
                "model.layers.3.mlp.experts.17.down_proj",
            ),
            (
                "model.layers.1.block_sparse_moe",
                "up_proj",
                5,
                "model.layers.1.block_sparse_moe.experts.5.w3",
            ),
        ] {
            assert_eq!(expert_module(parent, proj, e), module);
            assert_eq!(stack_of(module), Some((parent, proj, e)));
        }
        for not_an_expert in [
            "model.layers.3.mlp.gate_proj",
            "model.layers.3.mlp.shared_experts.gate_proj",
            "model.layers.3.mlp.experts.01.gate_proj",
            "model.layers.3.mlp.experts.x.gate_proj",
            "model.layers.3.mlp.experts.0.w1",
            "model.layers.3.block_sparse_moe.experts.0.gate_proj",
        ] {
            assert_eq!(stack_of(not_an_expert), None, "{not_an_expert}");
        }
    }

    #[test]
    fn a_peft_adapter_written_for_mlx_reads_back_with_every_modules_update() {
        // Two modules: rank 2 (alpha 8, of the config: scale 4) and rank 3 with its own alpha
        // 1.5 (scale 0.5), which the one rank 3 and scale 4 of the MLX adapter must carry.
        let dir = tempfile::tempdir().unwrap();
        let seed = crate::linalg::fresh_seed();
        let draw = |id: u64, n: usize| -> Vec<f32> {
            (0..n)
                .map(|i| crate::linalg::philox::gaussian4(seed, id, i as u32, 0)[0])
                .collect()
        };
        let module = |r: usize, alpha: f64, n: usize, m: usize| {
            let f = LoraModule {
                a: draw(2 * r as u64, r * n),
                b: draw(2 * r as u64 + 1, m * r),
                r,
                in_features: n,
                out_features: m,
                alpha,
                ty: FloatType::F32,
            };
            f.encode()
        };
        let modules: BTreeMap<String, EncodedFactors> = [
            (
                "model.layers.0.self_attn.q_proj".to_string(),
                module(2, 8.0, 5, 6),
            ),
            (
                "model.layers.1.mlp.down_proj".to_string(),
                module(3, 1.5, 7, 4),
            ),
        ]
        .into();
        let config = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 8.0,
            "rank_pattern": {"down_proj": 3}, "alpha_pattern": {"down_proj": 1.5},
            "base_model_name_or_path": "base"});
        let peft = dir.path().join("peft");
        std::fs::create_dir(&peft).unwrap();
        write_adapter(&peft, config.as_object().unwrap(), &modules).unwrap();
        let opened = Adapter::open(&peft).unwrap();
        let out = dir.path().join("mlx");
        std::fs::create_dir(&out).unwrap();
        let written = write_mlx(&opened, None, &out, "base").unwrap();
        assert_eq!(written.num_layers, -1);
        assert_eq!((written.rank, written.scale), (3, 4.0));
        assert_eq!(written.keys, ["mlp.down_proj", "self_attn.q_proj"]);
        assert!(is_mlx(&out));
        let back = Adapter::open(&out).unwrap();
        assert_eq!((back.config.r, back.config.lora_alpha), (3, 12.0));
        for name in opened.modules.keys() {
            let (want, got) = (opened.factors(name).unwrap(), back.factors(name).unwrap());
            assert_eq!(
                (got.in_features, got.out_features, got.r),
                (want.in_features, want.out_features, 3)
            );
            let (want, got) = (update(&opened.config, &want), update(&back.config, &got));
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                    "{name}: {g} vs {w} (seed {seed})"
                );
            }
        }
    }

    /// Experts' modules are written as mlx-lm's LoRASwitchLinear stacks (`switch_mlp`, lora_a
    /// `[E, rank, in]`, lora_b `[E, out, rank]`), an expert without an update as zeros, and read
    /// back one module per expert with the update each had.
    #[test]
    fn experts_are_written_as_stacks_and_read_back_one_module_per_expert() {
        let dir = tempfile::tempdir().unwrap();
        let seed = crate::linalg::fresh_seed();
        let draw = |id: u64, n: usize| -> Vec<f32> {
            (0..n)
                .map(|i| crate::linalg::philox::gaussian4(seed, id, i as u32, 0)[0])
                .collect()
        };
        let module = |id: u64, r: usize, alpha: f64, n: usize, m: usize| {
            LoraModule {
                a: draw(2 * id, r * n),
                b: draw(2 * id + 1, m * r),
                r,
                in_features: n,
                out_features: m,
                alpha,
                ty: FloatType::F32,
            }
            .encode()
        };
        let modules: BTreeMap<String, EncodedFactors> = [
            ("model.layers.0.self_attn.q_proj", module(1, 2, 8.0, 5, 5)),
            (
                "model.layers.0.mlp.experts.0.gate_proj",
                module(2, 2, 8.0, 5, 6),
            ),
            (
                "model.layers.0.mlp.experts.2.gate_proj",
                module(3, 3, 1.5, 5, 6),
            ),
            (
                "model.layers.1.block_sparse_moe.experts.1.w2",
                module(4, 2, 8.0, 6, 5),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let config = serde_json::json!({"peft_type": "LORA", "r": 2, "lora_alpha": 8.0,
            "rank_pattern": {"mlp.experts.2.gate_proj": 3},
            "alpha_pattern": {"mlp.experts.2.gate_proj": 1.5},
            "base_model_name_or_path": "base"});
        let peft = dir.path().join("peft");
        std::fs::create_dir(&peft).unwrap();
        write_adapter(&peft, config.as_object().unwrap(), &modules).unwrap();
        let opened = Adapter::open(&peft).unwrap();
        let out = dir.path().join("mlx");
        std::fs::create_dir(&out).unwrap();
        let written = write_mlx(&opened, None, &out, "base").unwrap();
        assert_eq!((written.rank, written.scale), (3, 4.0));
        assert_eq!(
            written.keys,
            [
                "block_sparse_moe.switch_mlp.down_proj",
                "mlp.switch_mlp.gate_proj",
                "self_attn.q_proj"
            ]
        );
        let file = crate::io::safetensors::TensorFile::open(&out.join(MLX_WEIGHTS_FILE)).unwrap();
        let shape = |k: &str| file.entry(k).unwrap().shape.clone();
        assert_eq!(
            shape("model.layers.0.mlp.switch_mlp.gate_proj.lora_a"),
            [3, 3, 5]
        );
        assert_eq!(
            shape("model.layers.0.mlp.switch_mlp.gate_proj.lora_b"),
            [3, 6, 3]
        );
        assert_eq!(
            shape("model.layers.1.block_sparse_moe.switch_mlp.down_proj.lora_b"),
            [2, 5, 3]
        );
        let back = Adapter::open(&out).unwrap();
        let filled = [
            "model.layers.0.mlp.experts.1.gate_proj",
            "model.layers.1.block_sparse_moe.experts.0.w2",
        ];
        let mut names: Vec<&str> = opened.modules.keys().map(String::as_str).collect();
        names.extend(filled);
        names.sort();
        assert_eq!(back.modules.keys().collect::<Vec<_>>(), names);
        for name in names {
            let got = update(&back.config, &back.factors(name).unwrap());
            if filled.contains(&name) {
                assert!(got.iter().all(|&v| v == 0.0), "{name}");
                continue;
            }
            let want = update(&opened.config, &opened.factors(name).unwrap());
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                    "{name}: {g} vs {w} (seed {seed})"
                );
            }
        }
    }
}
