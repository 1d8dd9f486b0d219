//! MLX LoRA adapters, as `mlx_lm.lora` saves them and `mlx_lm.load(…, adapter_path=…)` reads
//! them: `adapters.safetensors` holding `<module>.lora_a` `[in, r]` and `<module>.lora_b`
//! `[r, out]`, and an `adapter_config.json` with `fine_tune_type`, `num_layers` (the last layers
//! adapted; −1: all) and `lora_parameters` {`rank`, `scale`, `dropout`, `keys`: the module paths
//! under a layer, or full paths}. mlx-lm's `LoRALinear` adds `scale · (x·lora_a)·lora_b`, which
//! is PEFT's `s·B·A` with `A = lora_aᵀ`, `B = lora_bᵀ` and `s = scale`: `lora_alpha = scale · r`.
//!
//! Read, an MLX adapter is the PEFT adapter of those factors (its factors transposed as they
//! are read). mlx-lm's `LoRASwitchLinear` on a layer's stacked experts is read as one module per
//! expert ([`stacked_experts`]). DoRA, full fine-tunes and LoRA on embeddings are refused.
//! Writing one: [`super::mlx_write`].

use std::collections::BTreeMap;
use std::path::Path;

use super::{Adapter, AdapterConfig, FactorRef, LoraModule, LoraTensors, CONFIG_FILE};
use crate::error::{Error, Result};
use crate::io::safetensors::TensorFile;

/// The weights file of an MLX adapter.
pub const MLX_WEIGHTS_FILE: &str = "adapters.safetensors";

/// True for a directory holding an MLX adapter (and no PEFT one).
pub fn is_mlx(dir: &Path) -> bool {
    dir.join(MLX_WEIGHTS_FILE).is_file() && !dir.join(super::WEIGHTS_FILE).is_file()
}

pub(super) fn unsupported(path: &Path, reason: String) -> Error {
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
        // (mlx-lm's LoRAEmbedding, whose `lora_a` is [vocab, r]: the other way round from a
        // Linear's.)
        let last = module.rsplit('.').next().unwrap_or(module);
        if matches!(
            last,
            "embed_tokens" | "wte" | "tok_embeddings" | "word_embeddings"
        ) {
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
        if ea.shape.len() == 3 || eb.shape.len() == 3 {
            let stack = (module.as_str(), a.as_str(), b.as_str());
            stacked_experts(file, stack, rank, alpha, &mut out)?;
            continue;
        }
        let (&[n, r], &[rb, m]) = (ea.shape.as_slice(), eb.shape.as_slice()) else {
            let why = format!(
                "lora_a {:?} and lora_b {:?} must both be 2-D (or both 3-D, stacked experts)",
                ea.shape, eb.shape
            );
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
        let ty = super::checked_factors(file, &a, &b)?;
        let m = LoraModule {
            a: FactorRef::whole(a),
            b: FactorRef::whole(b),
            r,
            in_features: n,
            out_features: m,
            alpha,
            ty,
        };
        insert_new(file, &mut out, module, m)?;
    }
    Ok(out)
}

/// A module that no other key of the file has given (an expert both stacked and alone would be
/// adapted twice).
fn insert_new(
    file: &TensorFile,
    out: &mut BTreeMap<String, LoraTensors>,
    module: String,
    m: LoraTensors,
) -> Result<()> {
    if out.contains_key(&module) {
        return Err(unsupported(
            file.path(),
            format!("`{module}` is adapted both alone and in a stack of experts"),
        ));
    }
    out.insert(module, m);
    Ok(())
}

/// mlx-lm's `LoRASwitchLinear` on a layer's stacked experts (`<parent>.switch_mlp.<proj>`, or
/// GPT-OSS's and Llama 4's `<parent>.experts.<proj>`):
/// `lora_a` `[E, r, in]` and `lora_b` `[E, out, r]`, expert e adding `scale · lora_b[e] ·
/// lora_a[e]`: PEFT's B and A as they lie. Read as one module per expert under the Hugging
/// Face names the tables use (`<parent>.experts.<e>.<proj>`, Mixtral's `w1`, `w3`, `w2`), as
/// MLX bases present their stacked weights.
fn stacked_experts(
    file: &TensorFile,
    (module, a, b): (&str, &str, &str),
    rank: usize,
    alpha: f64,
    out: &mut BTreeMap<String, LoraTensors>,
) -> Result<()> {
    let path = file.path();
    let (ea, eb) = (
        file.entry(a).expect("listed"),
        file.entry(b).expect("listed"),
    );
    let (&[experts, r, n], &[eb_experts, m, rb]) = (ea.shape.as_slice(), eb.shape.as_slice())
    else {
        return Err(Error::bad_tensor(
            path,
            a,
            format!(
                "lora_a {:?} and lora_b {:?}: a stack of experts' LoRA must be [experts, r, in] \
                 and [experts, out, r]",
                ea.shape, eb.shape
            ),
        ));
    };
    if experts != eb_experts || experts == 0 || r != rb || r != rank {
        return Err(Error::bad_tensor(
            path,
            b,
            format!(
                "lora_a is [{experts}, {r}, {n}] and lora_b [{eb_experts}, {m}, {rb}]: the \
                 expert counts must agree and the ranks with lora_parameters.rank {rank}"
            ),
        ));
    }
    let Some((parent, proj)) = crate::io::quantized::mlx::stack_parts(module) else {
        return Err(unsupported(
            path,
            format!(
                "`{a}` is a stack of experts' LoRA, but not on mlx-lm's `switch_mlp` or \
                 `experts` gate, up or down projections, which are read"
            ),
        ));
    };
    let ty = super::checked_factors(file, a, b)?;
    for e in 0..experts {
        let name = crate::io::quantized::mlx::expert_module(parent, proj, e);
        let m = LoraModule {
            a: FactorRef::stacked(a.to_string(), e),
            b: FactorRef::stacked(b.to_string(), e),
            r,
            in_features: n,
            out_features: m,
            alpha,
            ty,
        };
        insert_new(file, out, name, m)?;
    }
    Ok(())
}
