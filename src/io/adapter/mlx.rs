//! MLX LoRA adapters, as `mlx_lm.lora` saves them and `mlx_lm.load(…, adapter_path=…)` reads
//! them: `adapters.safetensors` holding `<module>.lora_a` `[in, r]` and `<module>.lora_b`
//! `[r, out]`, and an `adapter_config.json` with `fine_tune_type`, `num_layers` (the last layers
//! adapted; −1: all) and `lora_parameters` {`rank`, `scale`, `dropout`, `keys`: the module paths
//! under a layer, or full paths}. mlx-lm's `LoRALinear` adds `scale · (x·lora_a)·lora_b`, which
//! is PEFT's `s·B·A` with `A = lora_aᵀ`, `B = lora_bᵀ` and `s = scale`: `lora_alpha = scale · r`.
//!
//! Read, an MLX adapter is the PEFT adapter of those factors (its factors transposed as they
//! are read); written ([`write_mlx`]), a PEFT adapter becomes one MLX can load onto the same
//! base: one rank for every module (a smaller one padded with zero ranks, which add nothing)
//! and one scale (a module whose scale differs has the ratio folded into its `lora_b`).
//! Module names are kept: MLX's models name their modules as Hugging Face's do for the
//! families mlx-lm ports (Llama, Qwen, Mistral, Gemma, Phi-3 …). DoRA, LoRA on embeddings and
//! on stacked experts (mlx-lm's `LoRASwitchLinear`) are refused.

use std::collections::BTreeMap;
use std::path::Path;

use super::{Adapter, AdapterConfig, FactorRef, LoraModule, LoraTensors, CONFIG_FILE};
use crate::error::{Error, Result};
use crate::io::safetensors::{self as st, FloatType, OutTensor, TensorFile};

/// The weights file of an MLX adapter.
pub const MLX_WEIGHTS_FILE: &str = "adapters.safetensors";

/// True for a directory holding an MLX adapter (and no PEFT one).
pub fn is_mlx(dir: &Path) -> bool {
    dir.join(MLX_WEIGHTS_FILE).is_file() && !dir.join(super::WEIGHTS_FILE).is_file()
}

fn unsupported(path: &Path, reason: String) -> Error {
    Error::UnsupportedAdapter {
        path: path.to_path_buf(),
        reason,
    }
}

/// Opens an MLX adapter directory as the PEFT adapter of the same update.
pub(super) fn open(dir: &Path) -> Result<Adapter> {
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| Error::io(&config_path, "cannot read", e))?;
    let config = peft_config(&text, &config_path)?;
    let file = TensorFile::open(&dir.join(MLX_WEIGHTS_FILE))?;
    let modules = index_modules(&file, config.r, config.lora_alpha)?;
    if modules.is_empty() {
        return Err(unsupported(
            file.path(),
            "no lora_a / lora_b tensors".to_string(),
        ));
    }
    Ok(Adapter {
        dir: dir.to_path_buf(),
        config,
        modules,
        file,
        transposed: true,
    })
}

/// The PEFT config of an MLX adapter's: its rank, `lora_alpha = scale · rank`, its dropout and
/// base (`model`), every module the file holds adapted.
fn peft_config(text: &str, path: &Path) -> Result<AdapterConfig> {
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Error::config(path, format!("invalid JSON: {e}")))?;
    match value["fine_tune_type"].as_str().unwrap_or("lora") {
        "lora" => {}
        "dora" => {
            return Err(unsupported(
                path,
                "an MLX DoRA adapter (fine_tune_type dora): the magnitude vector has no subspace \
                 transfer"
                    .into(),
            ))
        }
        other => {
            return Err(unsupported(
                path,
                format!("fine_tune_type {other:?}: only MLX LoRA adapters are read"),
            ))
        }
    }
    let params = &value["lora_parameters"];
    let (Some(rank), Some(scale)) = (
        params["rank"].as_u64().filter(|&r| r > 0),
        params["scale"].as_f64().filter(|s| s.is_finite()),
    ) else {
        return Err(Error::config(
            path,
            format!(
                "lora_parameters {params}: an MLX adapter's config needs a positive rank and a \
                 finite scale"
            ),
        ));
    };
    let peft = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": scale * rank as f64,
        "lora_dropout": params["dropout"].as_f64().unwrap_or(0.0),
        "bias": "none",
        "target_modules": null,
        "base_model_name_or_path": value["model"].as_str(),
    });
    AdapterConfig::parse(&peft.to_string(), path)
}

/// Pairs every module's `lora_a` and `lora_b`, checking their shapes against each other and the
/// config's rank and their values for NaN and Inf; each module has the config's `alpha`.
fn index_modules(
    file: &TensorFile,
    rank: usize,
    alpha: f64,
) -> Result<BTreeMap<String, LoraTensors>> {
    let path = file.path();
    let mut pairs: BTreeMap<String, [Option<String>; 2]> = BTreeMap::new();
    for key in file.names() {
        let Some((module, which)) = key
            .strip_suffix(".lora_a")
            .map(|m| (m, 0))
            .or_else(|| key.strip_suffix(".lora_b").map(|m| (m, 1)))
        else {
            let why = match key.rsplit('.').next() {
                Some("m") => "a DoRA magnitude vector",
                _ => "not a lora_a / lora_b tensor (a full fine-tune's weight?)",
            };
            return Err(unsupported(path, format!("`{key}` is {why}")));
        };
        if module
            .rsplit('.')
            .next()
            .is_some_and(|m| m.contains("embed"))
        {
            return Err(unsupported(
                path,
                format!("`{key}`: LoRA on embeddings is not transferred"),
            ));
        }
        pairs.entry(module.to_string()).or_default()[which] = Some(key.to_string());
    }
    let mut out = BTreeMap::new();
    for (module, [a, b]) in pairs {
        let missing = |which: &str| Error::MissingTensor {
            path: path.to_path_buf(),
            tensor: format!("{module}.{which}"),
            hint: " (every lora_a needs its lora_b)".into(),
        };
        let (a, b) = (
            a.ok_or_else(|| missing("lora_a"))?,
            b.ok_or_else(|| missing("lora_b"))?,
        );
        let (ea, eb) = (
            file.entry(&a).expect("listed"),
            file.entry(&b).expect("listed"),
        );
        let (&[n, r], &[rb, m]) = (ea.shape.as_slice(), eb.shape.as_slice()) else {
            let why = if ea.shape.len() == 3 {
                "stacked experts' LoRA (mlx-lm's LoRASwitchLinear) is not read".to_string()
            } else {
                format!(
                    "lora_a {:?} and lora_b {:?} must both be 2-D",
                    ea.shape, eb.shape
                )
            };
            return Err(Error::bad_tensor(path, &a, why));
        };
        if r != rb || r != rank {
            return Err(Error::bad_tensor(
                path,
                &b,
                format!(
                    "lora_a is [{n}, {r}] and lora_b [{rb}, {m}]: the ranks must agree with \
                     lora_parameters.rank {rank}"
                ),
            ));
        }
        let ty = |key: &str, dtype| {
            FloatType::from_dtype(dtype).ok_or_else(|| {
                Error::bad_tensor(
                    path,
                    key,
                    format!("dtype {dtype:?} is not bf16, f16 or f32"),
                )
            })
        };
        let (ty_a, ty_b) = (ty(&a, ea.dtype)?, ty(&b, eb.dtype)?);
        file.rows_raw(&a, 0..n)?;
        file.rows_raw(&b, 0..r)?;
        let whole = |tensor: String| FactorRef {
            tensor,
            expert: None,
        };
        out.insert(
            module,
            LoraModule {
                a: whole(a),
                b: whole(b),
                r,
                in_features: n,
                out_features: m,
                alpha,
                ty: if ty_a == ty_b { ty_a } else { FloatType::F32 },
            },
        );
    }
    Ok(out)
}

/// A `[rows, cols]` row-major matrix transposed.
pub(super) fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    for (i, row) in values.chunks_exact(cols.max(1)).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            out[j * rows + i] = v;
        }
    }
    out
}

/// `export-mlx`: the adapter at `adapter` (a PEFT or MLX directory, or a cached hub name)
/// written at `out` as an MLX adapter for the same base, atomically; an existing `out` is
/// replaced only with `force`, and only when it is an earlier output.
pub fn export(adapter: &Path, out: &Path, force: bool) -> Result<WrittenMlx> {
    use crate::io::hub::{self, Kind};
    let (dir, hub_name) = hub::resolve(adapter, Kind::Adapter)?;
    let opened = Adapter::open(&dir)?;
    let base = opened
        .config
        .raw
        .get("base_model_name_or_path")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .or(hub_name.map(|h| h.name))
        .unwrap_or_default();
    let staged = crate::io::output::StagedDir::create(out, force, &[&dir])?;
    let written = write_mlx(&opened, staged.path(), &base)?;
    let path = staged.commit()?.to_string_lossy().into_owned();
    Ok(WrittenMlx { path, ..written })
}

/// What [`write_mlx`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WrittenMlx {
    /// The directory written (empty until committed).
    pub path: String,
    pub modules: usize,
    pub rank: usize,
    pub scale: f64,
    /// The module paths `lora_parameters.keys` names.
    pub keys: Vec<String>,
}

/// The path MLX's `linear_to_lora_layers` matches a module by: under a layer
/// (`model.layers.3.self_attn.q_proj` → `self_attn.q_proj`), else the module's own path.
fn key_of(module: &str) -> String {
    let parts: Vec<&str> = module.split('.').collect();
    match parts
        .windows(2)
        .position(|w| w[0] == "layers" && w[1].parse::<usize>().is_ok())
    {
        Some(at) if at + 2 < parts.len() => parts[at + 2..].join("."),
        _ => module.to_string(),
    }
}

/// Writes `adapter` into `dir` (which must exist) as an MLX adapter for the same base:
/// `adapters.safetensors` and `adapter_config.json` (`num_layers` −1, every module the file holds
/// named in `keys`). `base` names the base in the config (`model`).
pub fn write_mlx(adapter: &Adapter, dir: &Path, base: &str) -> Result<WrittenMlx> {
    let cfg = &adapter.config;
    if let Some(expert) = adapter.modules.keys().find(|m| m.contains(".experts.")) {
        return Err(unsupported(
            &adapter.dir,
            format!(
                "`{expert}` is an expert's: mlx-lm adapts stacked experts (LoRASwitchLinear), \
                 which is not written"
            ),
        ));
    }
    let rank = adapter.modules.values().map(|m| m.r).max().unwrap_or(0);
    let scale = cfg.scale(cfg.r, cfg.lora_alpha);
    let mut tensors = Vec::with_capacity(2 * adapter.modules.len());
    for (module, m) in &adapter.modules {
        let f = adapter.factors(module)?;
        // lora_a = Aᵀ [in, rank] and lora_b = (ratio · B)ᵀ [rank, out], zero past the module's
        // rank; the ratio of the module's scale to the config's goes into lora_b.
        let ratio = cfg.scale(m.r, m.alpha) / scale;
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
            format!("{module}.lora_a"),
            OutTensor::from_f32(a, vec![m.in_features, rank], ty),
        ));
        tensors.push((
            format!("{module}.lora_b"),
            OutTensor::from_f32(b, vec![rank, m.out_features], ty),
        ));
    }
    let metadata = std::collections::HashMap::from([
        ("format".to_string(), "mlx".to_string()),
        (st::PRODUCER_KEY.to_string(), st::PRODUCER.to_string()),
    ]);
    st::write_file(&dir.join(MLX_WEIGHTS_FILE), &tensors, Some(metadata))?;
    let mut keys: Vec<String> = adapter.modules.keys().map(|m| key_of(m)).collect();
    keys.sort();
    keys.dedup();
    let config = serde_json::json!({
        "fine_tune_type": "lora",
        "model": base,
        "num_layers": -1,
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
        keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::adapter::{write_adapter, EncodedFactors};

    #[test]
    fn modules_are_keyed_by_their_path_under_a_layer() {
        assert_eq!(
            key_of("model.layers.3.self_attn.q_proj"),
            "self_attn.q_proj"
        );
        assert_eq!(
            key_of("language_model.model.layers.12.mlp.down_proj"),
            "mlp.down_proj"
        );
        assert_eq!(key_of("lm_head"), "lm_head");
        assert_eq!(key_of("model.layers.x.mlp"), "model.layers.x.mlp");
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
        let written = write_mlx(&opened, &out, "base").unwrap();
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
