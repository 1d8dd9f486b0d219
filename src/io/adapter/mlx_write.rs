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
use crate::io::safetensors::{self as st, FloatType, OutTensor};

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
    if let Some(expert) = adapter.modules.keys().find(|m| m.contains(".experts.")) {
        return Err(refuse(format!(
            "`{expert}` is an expert's: mlx-lm adapts stacked experts (LoRASwitchLinear), which \
             is not written"
        )));
    }
    let rank = adapter.modules.values().map(|m| m.r).max().unwrap_or(0);
    // The config's scale, unless it is zero (lora_alpha 0): then the first module's that is not.
    let scale = std::iter::once(cfg.scale(cfg.r, cfg.lora_alpha))
        .chain(adapter.modules.values().map(|m| cfg.scale(m.r, m.alpha)))
        .find(|s| *s != 0.0 && s.is_finite())
        .unwrap_or(1.0);
    let mut tensors = Vec::with_capacity(2 * adapter.modules.len());
    let (mut keys, mut first_layer) = (Vec::new(), None::<usize>);
    for (module, m) in &adapter.modules {
        let (mut path, mut key, layer) = place(module).map_err(&refuse)?;
        if let Some(base) = base {
            // mlx-lm's multimodal ports keep the language model under `language_model` (its
            // layers, and its `lm_head`) where a text model's name may not say so.
            let candidates = [
                path.clone(),
                path.replacen("model.layers.", "language_model.model.layers.", 1),
                format!("language_model.{path}"),
            ];
            if let Some(found) = candidates
                .into_iter()
                .find(|p| base.has(&format!("{p}.weight")))
            {
                // (A module outside the layers is keyed by its whole path.)
                if layer.is_none() {
                    key = found.clone();
                }
                path = found;
            }
            let weight = format!("{path}.weight");
            let shape = base.shape(&weight).ok();
            if shape != Some(&[m.out_features, m.in_features][..]) {
                return Err(refuse(format!(
                    "`{module}` is [{}, {}], but the base {} has {}",
                    m.out_features,
                    m.in_features,
                    base.dir.display(),
                    shape.map_or(format!("no `{weight}`"), |s| format!("`{weight}` {s:?}"))
                )));
            }
        }
        keys.push(key);
        if let Some(l) = layer {
            first_layer = Some(first_layer.map_or(l, |f| f.min(l)));
        }
        let ratio = cfg.scale(m.r, m.alpha) / scale;
        if !ratio.is_finite() {
            return Err(refuse(format!(
                "`{module}`'s scale {} is not finite",
                cfg.scale(m.r, m.alpha)
            )));
        }
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
}
