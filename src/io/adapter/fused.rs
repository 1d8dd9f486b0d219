//! PEFT's LoRA on fused expert parameters (`target_parameters`: transformers 5 holds a layer's
//! experts as one `gate_up_proj` `[experts, 2·width, hidden]` and one `down_proj`
//! `[experts, hidden, width]`), read as one module per expert.
//!
//! PEFT wraps the `experts` module once per parameter, each wrapper around the last (so the first
//! parameter wrapped sits on the other's `experts.base_layer`), and gives each a LoRA of rank r
//! per expert, stacked:
//! A `[r·E, in]` holds expert e's A in rows `e·r .. (e+1)·r`, and B `[out, r·E]` holds column k of
//! expert e's B at column `k·E + e` (`peft.tuners.lora.layer.ParamWrapper.get_delta_weight`).
//! `gate_up_proj`'s rows are the gate's, then the up projection's (GPT-OSS: alternating, gate
//! first, `GateUpRows::Interleaved`, as its base's table says); its per-expert B splits into the
//! two, which share A. The modules are named as a checkpoint on disk names the experts
//! (`<experts>.<e>.gate_proj`, `up_proj`, `down_proj`), which is what a transfer writes and PEFT
//! converts back onto the fused parameters when it loads them.
//!
//! Llama 4 stores its experts `[E, in, out]` without saying so to PEFT, which then takes the
//! last dimension for the input: its A is `[r·E, out]` and its B `[in, r·E]`, and the update it
//! adds is `(B·A)ᵀ` in `[out, in]` terms (`ExpertsLayout::reversed`). Expert e's A is then read
//! out of B's columns and its B out of A's rows, each transposed, and the gate and up projection
//! split A's columns.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use crate::error::{Error, Result};
use crate::io::safetensors::{decode_into, FloatType, TensorFile};

use super::{AdapterConfig, ExpertsLayout, FactorRef, LoraTensors};

/// The wrapper suffix of a fused experts module: `.experts` for the parameter wrapped last, or
/// `.experts.base_layer`, … for those wrapped before it.
const EXPERTS: &str = ".experts";
const WRAPPED: &str = ".base_layer";

/// `(experts path, depth)` of a PEFT module name that is a wrapper of fused expert parameters:
/// `model.layers.3.mlp.experts.base_layer` → (`model.layers.3.mlp.experts`, 1).
pub(super) fn wrapper(module: &str) -> Option<(&str, usize)> {
    let mut rest = module;
    let mut depth = 0;
    while let Some(inner) = rest.strip_suffix(WRAPPED) {
        rest = inner;
        depth += 1;
    }
    rest.ends_with(EXPERTS).then_some((rest, depth))
}

/// One wrapper's two tensors and their shapes: A `[r·E, in]`, B `[out, r·E]` (A `[r·E, out]`,
/// B `[in, r·E]` where PEFT took the parameter the other way round).
pub(super) struct Wrapper {
    pub a: String,
    pub b: String,
    pub a_shape: (usize, usize),
    pub b_shape: (usize, usize),
    /// The type both factors are written in (see `index_modules`).
    pub ty: FloatType,
}

/// Expands every experts module's wrappers into per-expert modules; `path` names the file.
pub(super) fn expand(
    wrappers: BTreeMap<String, BTreeMap<usize, Wrapper>>,
    config: &AdapterConfig,
    path: &Path,
    layout: ExpertsLayout,
) -> Result<BTreeMap<String, LoraTensors>> {
    let bad = |tensor: &str, reason: String| Error::bad_tensor(path, tensor, reason);
    let mut out = BTreeMap::new();
    for (experts_path, by_depth) in wrappers {
        let list: Vec<&Wrapper> = by_depth.values().collect();
        let named = named_for(&config.target_parameters, &experts_path);
        if named.is_empty() {
            return Err(bad(
                &list[0].a,
                format!(
                    "`{experts_path}` holds a LoRA on fused experts, but target_parameters ({}) \
                     names neither `{experts_path}.gate_up_proj` nor `{experts_path}.down_proj`",
                    config.target_parameters.join(", ")
                ),
            ));
        }
        // With both parameters adapted the shapes also say which way round the factors lie,
        // where the family's usual way does not fit: PEFT's first releases with
        // `target_parameters` took every 3-D parameter for `[E, in, out]`, as Llama 4 stores it,
        // where PEFT with transformers 5 takes Llama 4's the other way round.
        // A lone parameter's LoRA shows it by the side that is the hidden state: gate_up_proj
        // reads it, down_proj writes it.
        let (params, reversed) = match assign(&list, &named, layout.reversed) {
            None if list.len() == 2 => (assign(&list, &named, !layout.reversed), !layout.reversed),
            Some(params) if list.len() == 1 => {
                let fits = |reversed| {
                    let (inputs, outputs) = list[0].in_out(reversed);
                    let side = if params[0] == "gate_up_proj" {
                        inputs
                    } else {
                        outputs
                    };
                    Some(side) == layout.hidden
                };
                let turned = !fits(layout.reversed) && fits(!layout.reversed);
                (Some(params), layout.reversed != turned)
            }
            found => (found, layout.reversed),
        };
        let layout = ExpertsLayout { reversed, ..layout };
        let params = params.ok_or_else(|| {
            bad(
                &list[0].a,
                format!(
                    "cannot tell which of the parameters target_parameters names for \
                     `{experts_path}` ({}) its {} LoRA(s) adapt from their shapes ({})",
                    named.join(", "),
                    list.len(),
                    list.iter()
                        .map(|w| format!("A {:?}, B {:?}", w.a_shape, w.b_shape))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            )
        })?;
        for (w, param) in list.into_iter().zip(params) {
            let name = format!("{experts_path}.{param}");
            let r = config.rank_for(&name);
            let alpha = config.alpha_for(&name);
            let ((stacked, n), (m, stacked_b)) = (w.a_shape, w.b_shape);
            if stacked != stacked_b || stacked % r != 0 || stacked == 0 {
                return Err(bad(
                    &w.a,
                    format!(
                        "lora_A is [{stacked}, {n}] and lora_B [{m}, {stacked_b}]: not r = {r} \
                         (adapter_config.json) per expert for the same number of experts"
                    ),
                ));
            }
            let experts = stacked / r;
            let (inputs, outputs) = w.in_out(layout.reversed);
            // (part, the update's rows that are its own, taken every `step`-th)
            let parts: Vec<(&str, Range<usize>, usize)> = if param == "gate_up_proj" {
                if outputs % 2 != 0 {
                    return Err(bad(
                        if layout.reversed { &w.a } else { &w.b },
                        format!("gate_up_proj's {outputs} outputs do not halve into gate and up"),
                    ));
                }
                let half = outputs / 2;
                let place = |slot| {
                    let (start, step) = layout.gate_up.placement(slot, 2, half);
                    (start..start + (half - 1) * step + 1, step)
                };
                let ((gate, gate_step), (up, up_step)) = (place(0), place(1));
                vec![("gate_proj", gate, gate_step), ("up_proj", up, up_step)]
            } else {
                vec![("down_proj", 0..outputs, 1)]
            };
            let ty = w.ty;
            for e in 0..experts {
                for (part, rows, step) in &parts {
                    let block = |tensor: &str, rows: Range<usize>, step: usize| FactorRef {
                        tensor: tensor.to_string(),
                        expert: Some(super::ExpertBlock {
                            expert: e,
                            experts,
                            rank: r,
                            rows,
                            step,
                            reversed: layout.reversed,
                        }),
                        stacked: None,
                    };
                    let (a, b) = match layout.reversed {
                        false => (
                            block(&w.a, e * r..(e + 1) * r, 1),
                            block(&w.b, rows.clone(), *step),
                        ),
                        true => (block(&w.b, 0..inputs, 1), block(&w.a, rows.clone(), *step)),
                    };
                    let out_features = b.expert.as_ref().map_or(0, super::ExpertBlock::count);
                    out.insert(
                        format!("{experts_path}.{e}.{part}"),
                        LoraTensors {
                            a,
                            b,
                            r,
                            in_features: inputs,
                            out_features,
                            alpha,
                            ty,
                        },
                    );
                }
            }
        }
    }
    Ok(out)
}

/// The fused parameters `target_parameters` names for the experts module at `experts_path`: an
/// entry names `<experts path>.<parameter>` whole, or a part of it after a dot (PEFT's match).
fn named_for(params: &[String], experts_path: &str) -> Vec<&'static str> {
    let applies = |p: &str| {
        let full = format!("{experts_path}.{p}");
        params
            .iter()
            .any(|entry| super::config::names(entry, &full))
    };
    super::EXPERT_PARAMETERS
        .into_iter()
        .filter(|p| applies(p))
        .collect()
}

impl Wrapper {
    /// (inputs, outputs) of the update each expert's factors make: A's columns and B's rows,
    /// or the other way round where PEFT took the parameter `reversed`.
    fn in_out(&self, reversed: bool) -> (usize, usize) {
        match reversed {
            false => (self.a_shape.1, self.b_shape.0),
            true => (self.b_shape.0, self.a_shape.1),
        }
    }
}

/// The parameter each wrapper adapts, among those `named` for its module. One wrapper and one
/// parameter named: that one. Two: the shapes decide: `gate_up_proj` reads the hidden state that
/// `down_proj` writes and writes twice the width that `down_proj` reads; None when no
/// assignment, or more than one, fits.
fn assign(list: &[&Wrapper], named: &[&'static str], reversed: bool) -> Option<Vec<&'static str>> {
    match (list, named) {
        ([_], [p]) => Some(vec![*p]),
        ([x, y], [_, _]) => {
            let fits = |gu: &Wrapper, down: &Wrapper| {
                let ((gu_in, gu_out), (down_in, down_out)) =
                    (gu.in_out(reversed), down.in_out(reversed));
                gu_in == down_out && gu_out == 2 * down_in
            };
            match (fits(x, y), fits(y, x)) {
                (true, false) => Some(vec!["gate_up_proj", "down_proj"]),
                (false, true) => Some(vec!["down_proj", "gate_up_proj"]),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Expert e's factor out of a fused one (`[r, in]` A, `[out, r]` B): A's rows `e·r .. (e+1)·r`,
/// or B's `rows` (every `step`-th) at the columns `k·E + e`; where `reversed`, A is B's rows at
/// those columns, transposed, and B is A's rows `e·r .. (e+1)·r` at the columns `rows`,
/// transposed. Only the expert's values are decoded: a layer's B is read once per expert.
pub(super) fn pick(file: &TensorFile, f: &FactorRef, is_b: bool) -> Result<Vec<f32>> {
    let block = f.expert.as_ref().expect("a fused factor");
    let own_rows = block.expert * block.rank..(block.expert + 1) * block.rank;
    match (is_b, block.reversed) {
        (false, false) => file.read_rows_f32(&f.tensor, own_rows),
        (true, false) => expert_columns(file, &f.tensor, block),
        (false, true) => {
            let columns = expert_columns(file, &f.tensor, block)?;
            Ok(transpose(&columns, block.count(), block.rank))
        }
        (true, true) => {
            let rows = file.read_rows_f32(&f.tensor, own_rows)?;
            let cols = rows.len() / block.rank;
            let mut out = vec![0f32; block.count() * block.rank];
            for (i, value) in out.iter_mut().enumerate() {
                let (k, col) = (
                    i % block.rank,
                    block.rows.start + i / block.rank * block.step,
                );
                *value = rows[k * cols + col];
            }
            Ok(out)
        }
    }
}

/// `[count, r]`: the block's `rows` (every `step`-th) of a stacked B at the expert's columns
/// `k·E + e`.
fn expert_columns(file: &TensorFile, tensor: &str, block: &super::ExpertBlock) -> Result<Vec<f32>> {
    // Every value was checked for NaN and Inf when the adapter was opened.
    let (bytes, ty, cols) = file.rows_raw_unchecked(tensor, block.rows.clone())?;
    let size = ty.size();
    let mut out = vec![0f32; block.count() * block.rank];
    for (i, value) in out.iter_mut().enumerate() {
        let (row, k) = (i / block.rank * block.step, i % block.rank);
        let at = (row * cols + k * block.experts + block.expert) * size;
        decode_into(&bytes[at..at + size], ty, std::slice::from_mut(value));
    }
    Ok(out)
}

/// `[cols, rows]` from `[rows, cols]`.
pub(super) fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..cols * rows)
        .map(|i| values[(i % rows) * cols + i / rows])
        .collect()
}
