//! `--fused-experts`: the output written as PEFT's LoRA on transformers 5's fused expert
//! parameters (`target_parameters`) instead of one module per expert.
//!
//! Why: transformers 5 holds a layer's experts as two parameters, `mlp.experts.gate_up_proj`
//! `[E, 2·width, hidden]` (the gate's rows, then the up projection's) and `mlp.experts.down_proj`
//! `[E, hidden, width]`, for every MoE family (Mixtral's `block_sparse_moe` included). PEFT 0.21
//! converts a per-expert adapter onto them only for the families it maps onto Qwen2-MoE's pattern,
//! so Qwen2-MoE's experts are dropped on load; and where it converts, it moves every `gate_proj`,
//! `up_proj` and `down_proj` in `target_modules` onto the experts, dropping a dense layer's or a
//! shared expert's update. Written in the fused form, nothing is converted:
//! - each layer's experts become two wrappers around `<layer>.mlp.experts`: `down_proj` on the
//!   module itself and `gate_up_proj` on its `base_layer`. PEFT wraps a module's parameters in
//!   the order the module declares them, each wrapper around the last, and transformers 5's
//!   experts declare `gate_up_proj` first; a layer with one of them adapted has its wrapper on
//!   the module. A wrapper's A `[R·E, in]` holds expert e's A in rows `e·R .. (e+1)·R`, its B
//!   `[out, R·E]` column k of expert e's B at `k·E + e` (`ParamWrapper.get_delta_weight`). R is
//!   one rank for all experts of the wrapper: an expert's gate and up projection keep their own
//!   A (stacked, B block-diagonal, so its gate_up rank is the sum of theirs), and ranks below R
//!   are padded with zeros, as is an expert the adapter leaves alone (read back, those zero
//!   columns are dropped: `execute::source_factors`);
//! - dense MLPs and shared experts are adapted through their weights (`target_parameters` names
//!   `<module>.weight`: the same tensors and update as a LoRA on the module, which PEFT leaves
//!   where it is); attention stays in `target_modules`.
//!
//! GPT-OSS and Llama 4 store their experts this way on disk (GPT-OSS's gate_up outputs
//! alternating gate and up; Llama 4's under `feed_forward.experts`, which PEFT takes the other
//! way round: A `[R·E, out]`, B `[in, R·E]`): their output is always in this form, laid out as
//! PEFT lays out its own LoRA on them.
//!
//! Ranks and alphas go under the names PEFT matches them against: `<experts>.gate_up_proj`,
//! `<experts>.down_proj` and `<module>.weight`. The scale of an expert part whose own scale
//! differs from its wrapper's is folded into its B, so every update is the one transferred.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::arch::{Block, Part};
use crate::error::{Error, Result};
use crate::io::adapter::{exact_pattern, AdapterConfig, EncodedFactors, ExpertsLayout};
use crate::io::safetensors::{decode_f32, encode_f32, FloatType};
use crate::plan::ModelSide;

/// One expert part of a layer: its expert and the part of the fused parameter it fills.
struct ExpertPart {
    expert: usize,
    part: Part,
    name: String,
}

/// Refuses a target without experts, before any work.
pub fn check_target(target: &ModelSide<'_>) -> Result<()> {
    if target.experts() == 0 {
        return Err(Error::arg(
            "--fused-experts",
            format!(
                "{} has no experts, so there is nothing to fuse: leave --fused-experts out",
                target.ckpt.dir.display()
            ),
        ));
    }
    Ok(())
}

/// The output in the fused form: the modules as they will be written (fused wrappers under their
/// PEFT module names) and the config that describes them.
pub fn fuse_experts(
    config: &mut Map<String, Value>,
    modules: BTreeMap<String, EncodedFactors>,
    adapter_config: &AdapterConfig,
    target: &ModelSide<'_>,
) -> Result<BTreeMap<String, EncodedFactors>> {
    check_target(target)?;
    let experts = target.experts();
    let layout = target.arch.experts_layout();
    let mut by_layer: BTreeMap<usize, Vec<ExpertPart>> = BTreeMap::new();
    let (mut target_modules, mut weights) = (Vec::new(), Vec::new());
    for name in modules.keys() {
        match target.arch.parse_module(&target.names, name) {
            Some((layer, Some(expert), spec)) => {
                let [part] = spec.parts.as_slice() else {
                    return Err(Error::arg(
                        "--fused-experts",
                        format!(
                            "the fused form takes one projection per expert module, but a {} \
                             expert's `{}` holds {}: leave --fused-experts out",
                            target.arch.name,
                            spec.key,
                            spec.parts.len()
                        ),
                    ));
                };
                by_layer.entry(layer).or_default().push(ExpertPart {
                    expert,
                    part: *part,
                    name: name.clone(),
                });
            }
            Some((_, None, spec)) if matches!(spec.block(), Block::Mlp | Block::SharedExpert) => {
                weights.push(name.clone())
            }
            _ => target_modules.push(name.clone()),
        }
    }
    let mut modules = modules;
    // (name PEFT matches patterns against, rank, alpha) of everything written.
    let mut written: Vec<(String, usize, f64)> = target_modules
        .iter()
        .map(|m| (exact_pattern(m), m))
        .chain(weights.iter().map(|m| (format!("{m}.weight"), m)))
        .map(|(key, m)| (key, modules[m].r, modules[m].alpha))
        .collect();
    let (mut gate_up_names, mut down_names) = (Vec::new(), Vec::new());
    for (layer, parts) in by_layer {
        let wrapper = format!(
            "{}.{layer}.{}",
            target.names,
            target.arch.fused_experts_module()
        );
        // Each expert's factors in the parameter's slots (gate, up; or down), None where absent.
        let mut take = |slots: &[Part]| -> Result<Vec<Vec<Option<EncodedFactors>>>> {
            let mut per_expert = vec![vec![None; slots.len()]; experts];
            for p in &parts {
                let Some(slot) = slots.iter().position(|s| *s == p.part) else {
                    continue;
                };
                let f = modules.remove(&p.name).expect("listed from the modules");
                let at = per_expert.get_mut(p.expert).ok_or_else(|| {
                    Error::internal(format!("{}: expert {} of {experts}", p.name, p.expert))
                })?;
                at[slot] = Some(f);
            }
            Ok(per_expert)
        };
        let gate_up = take(&[Part::Gate, Part::Up])?;
        let down = take(&[Part::Down])?;
        let any = |per_expert: &[Vec<Option<EncodedFactors>>]| {
            per_expert.iter().flatten().any(Option::is_some)
        };
        // gate_up_proj's wrapper sits on down_proj's base_layer where both are adapted, else on
        // the module itself.
        let gate_up_module = match any(&down) {
            true => format!("{wrapper}.base_layer"),
            false => wrapper.clone(),
        };
        for (param, per_expert, module, names) in [
            ("gate_up_proj", gate_up, gate_up_module, &mut gate_up_names),
            ("down_proj", down, wrapper.clone(), &mut down_names),
        ] {
            if !any(&per_expert) {
                continue;
            }
            let key = format!("{wrapper}.{param}");
            let (fused, rank) = stack(&key, &per_expert, adapter_config, layout)?;
            names.push(Value::String(key.clone()));
            written.push((key, rank, fused.alpha));
            modules.insert(module, fused);
        }
    }
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    config.insert("target_modules".into(), strings(target_modules));
    let mut parameters = gate_up_names;
    parameters.extend(down_names);
    parameters.extend(
        weights
            .into_iter()
            .map(|m| Value::String(format!("{m}.weight"))),
    );
    // Nothing adapted through parameters (attention alone): none named, as without the flag.
    let parameters = match parameters.is_empty() {
        true => Value::Null,
        false => Value::Array(parameters),
    };
    config.insert("target_parameters".into(), parameters);
    super::assemble::set_patterns(config, adapter_config, written);
    Ok(modules)
}

/// A part's A and B in f32, and the part.
type Decoded<'a> = (Vec<f32>, Vec<f32>, &'a EncodedFactors);

/// One wrapper's factors, and its rank per expert R (the largest expert's summed rank), from
/// each expert's factors in the parameter's slots, whose rows follow each other or alternate
/// (`layout`), turned round where PEFT takes the parameter so; the scale is that of the first
/// part with an update. A part with no update (B all zero: an expert or a projection the adapter
/// leaves alone) takes no rank, and its type does not count.
fn stack(
    name: &str,
    per_expert: &[Vec<Option<EncodedFactors>>],
    config: &AdapterConfig,
    layout: ExpertsLayout,
) -> Result<(EncodedFactors, usize)> {
    let experts = per_expert.len();
    let present = || per_expert.iter().flat_map(|slots| slots.iter().flatten());
    let first = present().next().expect("a part");
    let n = first.in_features;
    // A slot no expert fills (the gate, with only up projections selected) is as wide as the
    // others: gate and up projections share their width.
    let widths: Vec<usize> = (0..per_expert[0].len())
        .map(|slot| {
            per_expert
                .iter()
                .find_map(|slots| slots[slot].as_ref())
                .map_or(first.out_features, |f| f.out_features)
        })
        .collect();
    for (e, slots) in per_expert.iter().enumerate() {
        for (f, &width) in slots.iter().zip(&widths) {
            if let Some(f) = f
                .as_ref()
                .filter(|f| (f.out_features, f.in_features) != (width, n))
            {
                return Err(Error::internal(format!(
                    "{name}: expert {e}'s factors are for a {}×{} weight, where the fused \
                     parameter holds {width}×{n}",
                    f.out_features, f.in_features
                )));
            }
        }
    }
    // Each part's factors (A, B) in f32, None where it adds nothing.
    let decoded: Vec<Vec<Option<Decoded>>> = per_expert
        .iter()
        .map(|slots| {
            slots
                .iter()
                .map(|f| {
                    let f = f.as_ref()?;
                    let fb = decode_f32(&f.b, f.ty);
                    let some = fb.iter().any(|&x| x != 0.0);
                    some.then(|| (decode_f32(&f.a, f.ty), fb, f))
                })
                .collect()
        })
        .collect();
    let updates = || decoded.iter().flatten().flatten().map(|(_, _, f)| *f);
    // At least one rank, for a wrapper with no update at all.
    let rank = decoded
        .iter()
        .map(|slots| slots.iter().flatten().map(|(_, _, f)| f.r).sum::<usize>())
        .max()
        .unwrap_or(0)
        .max(1);
    let m: usize = widths.iter().sum();
    let lead = updates().next().unwrap_or(first);
    let s = config.scale(lead.r, lead.alpha);
    let ty = if updates().all(|f| f.ty == lead.ty) {
        lead.ty
    } else {
        FloatType::F32
    };
    let cols = rank * experts;
    let (mut a, mut b) = (vec![0f32; cols * n], vec![0f32; m * cols]);
    for (e, slots) in decoded.iter().enumerate() {
        let mut k0 = 0;
        for (slot, part) in slots.iter().enumerate() {
            if let Some((fa, fb, f)) = part {
                let ratio = (config.scale(f.r, f.alpha) / s) as f32;
                // Gate and up projections share their width.
                let (start, step) = layout.gate_up.placement(slot, slots.len(), widths[slot]);
                for k in 0..f.r {
                    let row = e * rank + k0 + k;
                    a[row * n..(row + 1) * n].copy_from_slice(&fa[k * n..(k + 1) * n]);
                    for i in 0..f.out_features {
                        let at = start + i * step;
                        b[at * cols + (k0 + k) * experts + e] = fb[i * f.r + k] * ratio;
                    }
                }
                k0 += f.r;
            }
        }
    }
    // A part's scale folded into its B can take a value past an f16's range: rebalanced as any
    // output module is.
    super::assemble::fit_in_type(name, &mut b, &mut a, ty)?;
    // Reversed, PEFT's A `[R·E, m]` holds each expert's B transposed in its rows, and its B
    // `[n, R·E]` each expert's A transposed in its columns.
    let (a, b, n, m) = match layout.reversed {
        false => (a, b, n, m),
        true => {
            let peft_a = (0..cols * m)
                .map(|i| {
                    let (row, out) = (i / m, i % m);
                    let (e, k) = (row / rank, row % rank);
                    b[out * cols + k * experts + e]
                })
                .collect();
            let peft_b = (0..n * cols)
                .map(|i| {
                    let (input, col) = (i / cols, i % cols);
                    let (k, e) = (col / experts, col % experts);
                    a[(e * rank + k) * n + input]
                })
                .collect();
            (peft_a, peft_b, m, n)
        }
    };
    let fused = EncodedFactors {
        a: encode_f32(&a, ty),
        b: encode_f32(&b, ty),
        r: cols,
        in_features: n,
        out_features: m,
        alpha: config.alpha_for_scale(rank, s),
        ty,
    };
    Ok((fused, rank))
}
