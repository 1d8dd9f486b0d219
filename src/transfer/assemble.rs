//! Turns unit outcomes into the output adapter: one PEFT module per target module, re-fused
//! where the target fuses projections the source keeps apart (blockdiag B, stacked A, so the
//! module's rank is the sum of its parts' ranks), and the adapter_config.json that describes it.

use std::collections::BTreeMap;

use faer::Mat;

use crate::error::{Error, Result};
use crate::io::adapter::{exact_pattern, Adapter, LoraFactors, LoraModule};
use crate::io::safetensors::{decode_f32, encode_f32, FloatType};
use crate::plan::{ModelSide, TargetModule};
use crate::transfer::execute::Outcome;

/// A unit that contributes to an output module.
struct Part<'a> {
    /// Its first row in the module.
    row0: usize,
    outcome: &'a Outcome,
    /// Its rank, and its source module's.
    r: usize,
    source_r: usize,
    /// Its source module's alpha, scale and stored type.
    alpha: f64,
    scale: f64,
    ty: FloatType,
}

/// Builds one output module from its units' outcomes.
pub fn assemble_module(
    module: &TargetModule,
    outcomes: &[Outcome],
    adapter: &Adapter,
) -> Result<LoraFactors> {
    let (m, n) = module.shape;
    let cfg = &adapter.config;
    // Each contributing unit with its rank, and its source module's alpha, scale and type.
    let parts: Vec<Part> = module
        .units
        .iter()
        .zip(outcomes)
        .filter_map(|(u, o)| {
            let f = o.factors.as_ref()?;
            let src = adapter.modules.get(u.source_module.as_ref()?)?;
            Some(Part {
                row0: u.target_rows.start,
                outcome: o,
                r: f.a.nrows(),
                source_r: src.r,
                alpha: src.alpha,
                scale: cfg.scale(src.r, src.alpha),
                ty: src.ty,
            })
        })
        .collect();
    let default_ty = adapter
        .modules
        .values()
        .next()
        .map(|f| f.ty)
        .unwrap_or(FloatType::F32);
    let (rank, alpha, scale_t, ty) = match parts.as_slice() {
        [] => (cfg.r, cfg.lora_alpha, 1.0, default_ty),
        // A part of a fused source that dropped zero columns has fewer ranks than its module:
        // the alpha that keeps its scale.
        [p] if p.r != p.source_r => (p.r, cfg.alpha_for_scale(p.r, p.scale), p.scale, p.ty),
        [p] => (p.r, p.alpha, p.scale, p.ty),
        [first, ..] => {
            let r: usize = parts.iter().map(|p| p.r).sum();
            // Parts stored in different types are written in the one that holds them all.
            let ty = if parts.iter().all(|p| p.ty == first.ty) {
                first.ty
            } else {
                FloatType::F32
            };
            (r, cfg.alpha_for_scale(r, first.scale), first.scale, ty)
        }
    };
    let mut b = vec![0f32; m * rank];
    let mut a = vec![0f32; rank * n];
    let mut col = 0;
    for p in &parts {
        let f = p.outcome.factors.as_ref().expect("filtered above");
        // Parts fused under one scale keep their own update: fold s_part / s_module into B.
        let ratio = (p.scale / scale_t) as f32;
        copy_block(&f.b, &mut b, rank, p.row0, col, ratio);
        copy_block(&f.a, &mut a, n, col, 0, 1.0);
        col += p.r;
    }
    fit_in_type(&module.name, &mut b, &mut a, ty)?;
    Ok(LoraFactors {
        a,
        b,
        r: rank,
        in_features: n,
        out_features: m,
        alpha,
        ty,
    })
}

/// Makes the factors representable in the output type. A mapped update can be larger than the
/// source's (a map that scales up), and an f16 factor past 65504 would be written as Inf; or one
/// factor can be tiny while the other is large, and f16 would flush it to zero. B·c and A/c give
/// the same update, so when a factor's largest value is past the type's largest or below its
/// smallest normal, both are rescaled to the same largest magnitude; only when that overflows
/// is it an error. Factors within range are left untouched (the output stays byte-identical).
pub(crate) fn fit_in_type(module: &str, b: &mut [f32], a: &mut [f32], ty: FloatType) -> Result<()> {
    let largest = |x: &[f32]| x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (max_b, max_a) = (largest(b), largest(a));
    if b.iter().chain(a.iter()).any(|v| !v.is_finite()) {
        return Err(Error::Numerical {
            context: module.to_string(),
            reason: "the transferred factors hold NaN or Inf".into(),
        });
    }
    let (limit, small) = (ty.max_finite(), ty.min_normal());
    // Below the normals only values the type cannot hold are at risk: a factor read from a file
    // of this type holds none, and a copy stays byte-identical.
    let exact = |x: &[f32]| decode_f32(&encode_f32(x, ty), ty) == x;
    let fits =
        |m: f32, x: &[f32]| m == 0.0 || (small..=limit).contains(&m) || (m < small && exact(x));
    if fits(max_b, b) && fits(max_a, a) {
        return Ok(());
    }
    if max_b == 0.0 || max_a == 0.0 {
        // A zero update: whatever the other factor holds, zeros write it exactly.
        b.fill(0.0);
        a.fill(0.0);
        return Ok(());
    }
    let balanced = (max_b as f64 * max_a as f64).sqrt();
    if balanced > limit as f64 {
        return Err(Error::Numerical {
            context: module.to_string(),
            reason: format!(
                "the transferred update does not fit in {ty:?}: its factors need values of \
                 {balanced:.3e} at the least (the largest {ty:?} is {limit:e})"
            ),
        });
    }
    let c = (max_a as f64 / max_b as f64).sqrt();
    b.iter_mut().for_each(|v| *v = (*v as f64 * c) as f32);
    a.iter_mut().for_each(|v| *v = (*v as f64 / c) as f32);
    Ok(())
}

/// Writes `src` into the row-major `dst` (row length `stride`) at (row0, col0), times `scale`.
fn copy_block(
    src: &Mat<f32>,
    dst: &mut [f32],
    stride: usize,
    row0: usize,
    col0: usize,
    scale: f32,
) {
    for i in 0..src.nrows() {
        for j in 0..src.ncols() {
            dst[(row0 + i) * stride + col0 + j] = src[(i, j)] * scale;
        }
    }
}

/// The target base as the output config names it.
pub struct BaseName {
    /// A hub name (`org/name`) or the directory as given.
    pub name: String,
    /// The hub revision, for a hub name.
    pub revision: Option<String>,
}

/// The output adapter_config.json: the source's, with the target base (and its revision: the
/// source's would load the target at a commit of another repository), the target's module types
/// written, and per-module rank/alpha patterns wherever a module differs from the global r/alpha.
pub fn output_config<T>(
    adapter: &Adapter,
    modules: &BTreeMap<String, LoraModule<T>>,
    base: &BaseName,
    target: &ModelSide<'_>,
) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::Value;
    let cfg = &adapter.config;
    let mut raw = cfg.raw.clone();
    raw.insert("peft_type".into(), Value::String("LORA".into()));
    raw.insert(
        "base_model_name_or_path".into(),
        Value::String(base.name.clone()),
    );
    raw.insert(
        "revision".into(),
        base.revision.clone().map_or(Value::Null, Value::String),
    );
    // PEFT's AutoPeftModel builds the class named here: it must be the target's, not the source's.
    if raw.get("auto_mapping").is_some_and(|v| !v.is_null()) {
        let mapping = target.ckpt.config.architectures.first().map(|class| {
            let module = &target.arch.name;
            serde_json::json!({
                "base_model_class": class,
                "parent_library": format!("transformers.models.{module}.modeling_{module}"),
            })
        });
        raw.insert("auto_mapping".into(), mapping.unwrap_or(Value::Null));
    }
    // The modules written, by full name, always: the source's own list, regex or `null` (PEFT's
    // default list for the architecture) may name layers or modules the target does not have, or
    // miss some it now has, and PEFT silently drops weights no target module matches; bare type
    // names would also give LoRA layers to modules left out (a vision tower's attention, types
    // filtered by --modules), which a source config with `init_lora_weights: false` would fill
    // with random updates.
    let names: Vec<Value> = modules.keys().cloned().map(Value::String).collect();
    raw.insert("target_modules".into(), Value::Array(names));
    // Every target layer gets its module, so layer restrictions no longer apply; and a LoRA on
    // fused experts is written one module per expert, named in `target_modules`.
    for key in [
        "layers_to_transform",
        "layers_pattern",
        "exclude_modules",
        "target_parameters",
    ] {
        if raw.contains_key(key) {
            raw.insert(key.into(), Value::Null);
        }
    }
    let written = modules
        .iter()
        .map(|(name, f)| (exact_pattern(name), f.r, f.alpha));
    set_patterns(&mut raw, cfg, written);
    raw
}

/// Writes `rank_pattern` and `alpha_pattern` into `raw`: an entry for each (pattern key, rank,
/// alpha) of `written` that differs from the config's `r` / `lora_alpha`.
pub(crate) fn set_patterns(
    raw: &mut serde_json::Map<String, serde_json::Value>,
    cfg: &crate::io::adapter::AdapterConfig,
    written: impl IntoIterator<Item = (String, usize, f64)>,
) {
    use serde_json::Value;
    let mut rank_pattern = serde_json::Map::new();
    let mut alpha_pattern = serde_json::Map::new();
    for (key, r, alpha) in written {
        if r != cfg.r {
            rank_pattern.insert(key.clone(), Value::from(r));
        }
        if alpha != cfg.lora_alpha {
            alpha_pattern.insert(key, Value::from(alpha));
        }
    }
    raw.insert("rank_pattern".into(), Value::Object(rank_pattern));
    raw.insert("alpha_pattern".into(), Value::Object(alpha_pattern));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factors_past_the_type_are_balanced_keeping_the_update() {
        // B·A = 120000 · 0.25 = 30000 fits in f16, B alone does not.
        let (mut b, mut a) = (vec![120_000.0, -3.0], vec![0.25, 0.5]);
        fit_in_type("m", &mut b, &mut a, FloatType::F16).unwrap();
        let limit = FloatType::F16.max_finite();
        assert!(b.iter().chain(&a).all(|v| v.abs() <= limit), "{b:?} {a:?}");
        for (i, want) in [(0, 120_000.0 * 0.25), (1, -3.0 * 0.5)] {
            let got = b[i] * a[i];
            assert!((got - want).abs() <= 1e-5 * want.abs(), "{got} vs {want}");
        }
        // A factor below f16's normals beside a large one: balanced, not flushed to zero.
        let (mut b3, mut a3) = (vec![1e-7f32, -2e-8], vec![900.0f32, 30.0]);
        fit_in_type("m", &mut b3, &mut a3, FloatType::F16).unwrap();
        assert!(b3
            .iter()
            .chain(&a3)
            .all(|v| v.abs() >= FloatType::F16.min_normal()));
        assert!(
            (b3[0] * a3[0] - 9e-5).abs() <= 1e-5 * 9e-5,
            "{}",
            b3[0] * a3[0]
        );
        // Tiny values the type holds exactly (an f16 adapter's own subnormals) are not touched.
        let held = decode_f32(&encode_f32(&[3e-6, -1e-7], FloatType::F16), FloatType::F16);
        let (mut b4, mut a4) = (held.clone(), vec![0.5f32, 2.0]);
        fit_in_type("m", &mut b4, &mut a4, FloatType::F16).unwrap();
        assert_eq!((b4, a4), (held, vec![0.5, 2.0]));
        // Factors that fit are not touched, bit for bit.
        let (mut b2, mut a2) = (vec![60_000.0f32, 1.0], vec![0.3f32, 7.0]);
        fit_in_type("m", &mut b2, &mut a2, FloatType::F16).unwrap();
        assert_eq!((b2, a2), (vec![60_000.0, 1.0], vec![0.3, 7.0]));
        // An update too large for the type, and a zero one.
        let err = fit_in_type("m", &mut [1e6], &mut [1e4], FloatType::F16).unwrap_err();
        assert!(err.to_string().contains("does not fit in F16"), "{err}");
        let (mut zb, mut za) = (vec![0.0f32; 2], vec![1e6f32, 2.0]);
        fit_in_type("m", &mut zb, &mut za, FloatType::F16).unwrap();
        assert!(zb.iter().chain(&za).all(|v| *v == 0.0));
        let nan = fit_in_type("m", &mut [f32::NAN], &mut [1.0], FloatType::F32).unwrap_err();
        assert!(nan.to_string().contains("NaN"), "{nan}");
    }
}
