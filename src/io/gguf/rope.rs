//! The rotary embedding's scaling, given back as the `rope_scaling` of the family's Hugging Face
//! config. llama.cpp's converter keeps it in three places: linear and YaRN scaling in the
//! metadata (`<arch>.rope.scaling.*`); Llama 3's frequency-dependent scaling (`rope_type:
//! llama3`, Llama 3.1–3.3, Llama 4, EXAONE 4) only as the per-frequency factors it computes from
//! the four parameters, in the tensor `rope_freqs.weight`; Phi-3's LongRoPE as its two factor
//! lists, in `rope_factors_long.weight` and `rope_factors_short.weight`. Without this,
//! `convert --gguf` wrote a config whose model turns queries and keys at other frequencies than
//! the checkpoint's — a model that loads and gives other logits.
//!
//! Llama 3's parameters are recovered from the factors: for a frequency of wavelength λ the
//! converter stores 1 when λ < L/h, `factor` when λ > L/l, and between them
//! 1 / ((1 − s)/factor + s) with s = (L/λ − l)/(h − l) — linear in 1/λ. The factor is the
//! largest; the line through the in-between points gives L/(h − l) and l/(h − l), which fix
//! everything the formula uses (scaling L, l and h together changes nothing, so l = 1, as in every
//! release). With fewer than two points between the bands, the releases' L = 8192 and the
//! other context lengths are tried. Any answer is checked by recomputing every factor from it.

use std::collections::HashMap;

use serde_json::{json, Value as Json};

use super::header::Value;
use super::names::Family;

/// The tensor of Llama 3's per-frequency factors.
pub const LLAMA3_FACTORS: &str = "rope_freqs.weight";
/// Phi-3's LongRoPE factors, for contexts past and within the original one.
pub const LONG_FACTORS: &str = "rope_factors_long.weight";
pub const SHORT_FACTORS: &str = "rope_factors_short.weight";

/// The families whose `rope_freqs` holds Llama 3's factors (llama.cpp's Llama, Llama 4 and
/// EXAONE 4 converters write it from `rope_type: llama3`).
const LLAMA3_FAMILIES: &[&str] = &["llama", "llama4", "exaone4"];

/// A small tensor of the file by GGUF name as f32 values (`None`: the file has no such tensor).
pub type ReadTensor<'a> = &'a dyn Fn(&str) -> Option<Result<Vec<f32>, String>>;

/// The `rope_scaling` object of the model, if it has one (and the fields that go beside it at
/// the top level of the config), or why it cannot be given. `config` is the config built so far
/// (for `rope_theta` and the head's width).
pub fn scaling(
    f: &Family,
    metadata: &HashMap<String, Value>,
    tensor: ReadTensor<'_>,
    config: &Json,
) -> Result<Option<Scaling>, String> {
    let key = |k: &str| format!("{}.rope.scaling.{k}", f.gguf);
    let float = |k: &str| metadata.get(&key(k)).and_then(Value::as_f64).map(tidy);
    let need = |k: &str| float(k).ok_or_else(|| format!("metadata `{}` is missing", key(k)));
    let kind = metadata.get(&key("type")).and_then(Value::as_str);
    match kind {
        Some("linear") => Ok(Some(Scaling::new(json!({
            "rope_type": "linear",
            "factor": need("factor")?,
        })))),
        Some("yarn") => {
            let mut s = json!({
                "rope_type": "yarn",
                "factor": need("factor")?,
                "original_max_position_embeddings": need("original_context_length")? as u64,
            });
            for (field, k) in [
                ("beta_fast", "yarn_beta_fast"),
                ("beta_slow", "yarn_beta_slow"),
                ("attention_factor", "yarn_attn_factor"),
            ] {
                if let Some(v) = float(k) {
                    s[field] = v.into();
                }
            }
            if let (Some(mul), "deepseek2") = (float("yarn_log_multiplier"), f.gguf) {
                // DeepSeek's converter stores 0.1·mscale_all_dim (and its configs give mscale
                // the same value: the attention factor is then 1, the softmax scale mscale²).
                let mscale = tidy(mul / 0.1);
                s["mscale"] = mscale.into();
                s["mscale_all_dim"] = mscale.into();
            }
            if f.model_type == "gpt_oss" {
                // Every GPT-OSS config turns YaRN's band edges off (`truncate: false`), which
                // GGUF has no key for; transformers' default truncates.
                s["truncate"] = false.into();
            }
            Ok(Some(Scaling::new(s)))
        }
        Some("none") | None => match tensor(LONG_FACTORS) {
            Some(long) => {
                let dims = rotary_dims(f, metadata, config)?;
                longrope(f, metadata, long?, tensor(SHORT_FACTORS), dims).map(Some)
            }
            None => match tensor(LLAMA3_FACTORS) {
                Some(_) if !LLAMA3_FAMILIES.contains(&f.gguf) => Err(format!(
                    "`{LLAMA3_FACTORS}` of a `{}` model: its rotary scaling has no Hugging Face \
                     form this reader knows",
                    f.gguf
                )),
                Some(factors) => {
                    llama3(&factors?, theta(config), rotary_dims(f, metadata, config)?)
                        .map(|s| s.map(Scaling::new))
                        .map_err(|why| format!("`{LLAMA3_FACTORS}`: {why}"))
                }
                None => Ok(None),
            },
        },
        Some("longrope") => match tensor(LONG_FACTORS) {
            Some(long) => {
                let dims = rotary_dims(f, metadata, config)?;
                longrope(f, metadata, long?, tensor(SHORT_FACTORS), dims).map(Some)
            }
            None => Err(format!("LongRoPE scaling without `{LONG_FACTORS}`")),
        },
        Some(other) => Err(format!(
            "metadata `{}` = `{other}` is not a scaling this reader knows (linear, yarn, \
             longrope, or Llama 3's `{LLAMA3_FACTORS}`)",
            key("type")
        )),
    }
}

/// A `rope_scaling` object and the top-level fields that go with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Scaling {
    pub rope_scaling: Json,
    pub top_level: Vec<(&'static str, Json)>,
}

impl Scaling {
    fn new(rope_scaling: Json) -> Scaling {
        Scaling {
            rope_scaling,
            top_level: Vec::new(),
        }
    }
}

fn theta(config: &Json) -> f64 {
    config["rope_theta"].as_f64().unwrap_or(10000.0)
}

/// The dimensions of a head the rotation turns.
fn rotary_dims(
    f: &Family,
    metadata: &HashMap<String, Value>,
    config: &Json,
) -> Result<usize, String> {
    let meta = metadata
        .get(&format!("{}.rope.dimension_count", f.gguf))
        .and_then(Value::as_u64);
    let head = config["head_dim"].as_u64().or_else(|| {
        let heads = config["num_attention_heads"].as_u64().filter(|&h| h > 0)?;
        Some(config["hidden_size"].as_u64()? / heads)
    });
    meta.or(head)
        .map(|d| d as usize)
        .filter(|&d| d >= 2)
        .ok_or_else(|| "no rotary width in the metadata".to_string())
}

/// Phi-3's LongRoPE: the two factor lists and the context they were trained to.
fn longrope(
    f: &Family,
    metadata: &HashMap<String, Value>,
    long: Vec<f32>,
    short: Option<Result<Vec<f32>, String>>,
    dims: usize,
) -> Result<Scaling, String> {
    let short = short.ok_or_else(|| format!("`{LONG_FACTORS}` without `{SHORT_FACTORS}`"))??;
    if short.len() != long.len() || long.len() != dims / 2 {
        return Err(format!(
            "`{LONG_FACTORS}` holds {} factors and `{SHORT_FACTORS}` {}, for a rotation of \
             {dims} dimensions ({} frequencies)",
            long.len(),
            short.len(),
            dims / 2
        ));
    }
    let key = format!("{}.rope.scaling.original_context_length", f.gguf);
    let original = metadata
        .get(&key)
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("LongRoPE factors without metadata `{key}`"))?;
    let list = |v: &[f32]| v.iter().map(|&x| tidy(x as f64)).collect::<Vec<_>>();
    Ok(Scaling {
        rope_scaling: json!({
            "rope_type": "longrope",
            "long_factor": list(&long),
            "short_factor": list(&short),
            "original_max_position_embeddings": original,
        }),
        // Phi-3's configs keep it at the top level, where its attention factor is read from.
        top_level: vec![("original_max_position_embeddings", original.into())],
    })
}

/// Llama 3's parameters from the factors the converter stored (see the module's comment), or
/// `None` when every factor is 1 (no scaling).
fn llama3(factors: &[f32], theta: f64, dims: usize) -> Result<Option<Json>, String> {
    if factors.len() != dims / 2 {
        return Err(format!(
            "{} factors for a rotation of {dims} dimensions ({} frequencies)",
            factors.len(),
            dims / 2
        ));
    }
    if let Some(bad) = factors.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
        return Err(format!("a factor of {bad} (all are positive)"));
    }
    let factors: Vec<f64> = factors.iter().map(|&v| v as f64).collect();
    let factor = factors.iter().copied().fold(1.0, f64::max);
    if factors.iter().all(|&v| close(v, 1.0)) {
        return Ok(None);
    }
    let wavelengths: Vec<f64> = (0..factors.len())
        .map(|i| 2.0 * std::f64::consts::PI * theta.powf(2.0 * i as f64 / dims as f64))
        .collect();
    // (1/λ, s) of each frequency between the bands.
    let between: Vec<(f64, f64)> = factors
        .iter()
        .zip(&wavelengths)
        .filter(|(&v, _)| !close(v, 1.0) && !close(v, factor))
        .map(|(&v, &l)| (1.0 / l, (1.0 / v - 1.0 / factor) / (1.0 - 1.0 / factor)))
        .collect();
    let mut candidates = Vec::new();
    if between.len() >= 2 {
        // Least squares of s = a·(1/λ) − b, with a = L/(h − l) and b = l/(h − l).
        let n = between.len() as f64;
        let (mx, ms) = between
            .iter()
            .fold((0.0, 0.0), |(x, s), p| (x + p.0 / n, s + p.1 / n));
        let (sxx, sxs) = between.iter().fold((0.0, 0.0), |(xx, xs), p| {
            (xx + (p.0 - mx).powi(2), xs + (p.0 - mx) * (p.1 - ms))
        });
        let a = sxs / sxx;
        let b = a * mx - ms;
        if b > 0.0 {
            let (high, context) = (1.0 + 1.0 / b, a / b);
            candidates.push((1.0, high, context));
        }
    }
    let contexts = [
        8192.0, 4096.0, 16384.0, 2048.0, 32768.0, 1024.0, 65536.0, 131072.0,
    ];
    for context in contexts {
        match between.as_slice() {
            [(x, s)] if *s > 0.0 => candidates.push((1.0, 1.0 + (context * x - 1.0) / s, context)),
            [] => candidates.extend([(1.0, 4.0, context), (1.0, 1.0, context)]),
            _ => {}
        }
    }
    // The context is a whole number of tokens; each candidate's round high factor first (a
    // release's), then as it was solved.
    let round = |(low, high, context): (f64, f64, f64)| {
        let context = context.round();
        [
            (low, (high * 1024.0).round() / 1024.0, context),
            (low, high, context),
        ]
    };
    let (low, high, context) = candidates
        .into_iter()
        .flat_map(round)
        .find(|&(low, high, context)| {
            if !(context >= 1.0 && high.is_finite()) {
                return false;
            }
            let again = llama3_factors(factor, low, high, context, &wavelengths);
            again.iter().zip(&factors).all(|(a, b)| close(*a, *b))
        })
        .ok_or_else(|| {
            format!(
                "factors {factors:?} are not Llama 3's for any low/high frequency factors and \
                 original context (rope_theta {theta}, {dims} rotary dimensions)"
            )
        })?;
    Ok(Some(json!({
        "rope_type": "llama3",
        "factor": tidy(factor),
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": context as u64,
    })))
}

/// A value read from an f32 as its shortest decimal (GGUF stores floats in f32: 0.0707 is
/// 0.07069999724626541 in f64, which the config would otherwise say).
fn tidy(v: f64) -> f64 {
    (v as f32).to_string().parse().unwrap_or(v)
}

/// The factors llama.cpp's converter computes from Llama 3's parameters.
fn llama3_factors(factor: f64, low: f64, high: f64, context: f64, wavelengths: &[f64]) -> Vec<f64> {
    let (low_band, high_band) = (context / low, context / high);
    wavelengths
        .iter()
        .map(|&l| {
            if l < high_band {
                1.0
            } else if l > low_band {
                factor
            } else {
                let s = (context / l - low) / (high - low);
                1.0 / ((1.0 - s) / factor + s)
            }
        })
        .collect()
}

/// Equal to the precision of the stored f32 factors, which the converter computes in f32.
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * a.abs().max(b.abs()).max(1.0)
}

#[cfg(test)]
#[path = "rope_tests.rs"]
mod tests;
