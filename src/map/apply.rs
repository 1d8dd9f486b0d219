//! A unit's factors through the map. Modules that read the normalized residual (q, k, v, gate,
//! up) see `g ⊙ h/rms(h)`, so their A maps as `A_t = A_s diag(g_s) P diag(g_t)⁻¹`, and their B's
//! rows (heads, neurons) move with the matching; modules that write into the residual (o, down)
//! map their B as `B_t = M B_s`, and their A's columns move with the matching. Unmatched target
//! units get zero rows (or columns): they take nothing from the adapter.

use faer::Mat;

use super::matching::Assignment;
use super::{LayerMap, ModelMap};
use crate::arch::Part;
use crate::backend::Factors;
use crate::error::{Error, Result};
use crate::plan::{ModelSide, Unit};

/// What the map did to one unit.
#[derive(Debug, Clone)]
pub struct Mapped {
    pub factors: Factors,
    /// Mean similarity of the matched inner units this module's rows or columns follow.
    pub matched_similarity: Option<f64>,
}

/// The canonical parts a unit's rows hold, with their row ranges in the unit (source, target).
fn parts_of(
    unit: &Unit,
    source: &ModelSide<'_>,
    target: &ModelSide<'_>,
) -> Vec<(Part, std::ops::Range<usize>, std::ops::Range<usize>)> {
    let single = Part::ALL
        .into_iter()
        .find(|p| p.module_name() == unit.label);
    if let Some(p) = single {
        return vec![(p, 0..unit.source_shape.0, 0..unit.target_shape.0)];
    }
    // A whole fused module on both sides (same layout): its parts, by the two configs.
    let spec_s = source.arch.module(&unit.label).expect("planned module");
    let spec_t = target.arch.module(&unit.label).expect("planned module");
    spec_t
        .parts
        .iter()
        .map(|&p| {
            (
                p,
                spec_s.rows_of(p, &source.ckpt.config).expect("fused part"),
                spec_t.rows_of(p, &target.ckpt.config).expect("fused part"),
            )
        })
        .collect()
}

/// Rows of `b` gathered unit by unit: target unit u (of `size_t` rows) takes the rows of its
/// source unit (of `size_s` rows); unmatched units get zeros.
fn gather_rows(
    b: faer::MatRef<'_, f32>,
    assignment: &Assignment,
    (size_s, size_t): (usize, usize),
) -> Mat<f32> {
    let out_rows = assignment.source_of.len() * size_t;
    Mat::from_fn(out_rows, b.ncols(), |i, j| {
        let (u, within) = (i / size_t, i % size_t);
        match assignment.source_of[u] {
            Some(src) if within < size_s => b[(src * size_s + within, j)],
            _ => 0.0,
        }
    })
}

impl ModelMap {
    /// The target factors of `unit` from the source factors `src` (B rows of the unit, A).
    pub fn apply(
        &self,
        unit: &Unit,
        src: &Factors,
        source: &ModelSide<'_>,
        target: &ModelSide<'_>,
    ) -> Result<Mapped> {
        let layer = self.layers.get(&unit.target_layer).ok_or_else(|| {
            Error::internal(format!(
                "map: no layer map for target layer {}",
                unit.target_layer
            ))
        })?;
        let parts = parts_of(unit, source, target);
        let reads = parts[0].0 != Part::O && parts[0].0 != Part::Down;
        if reads {
            let gains = if matches!(parts[0].0, Part::Gate | Part::Up) {
                &layer.mlp_gain
            } else {
                &layer.attn_gain
            };
            let a = self.read_side(src, gains);
            let mut blocks = Vec::new();
            let mut sims = Vec::new();
            for (part, rs, _) in &parts {
                let (assignment, sizes) = inner(layer, *part, unit)?;
                blocks.push(gather_rows(
                    src.b.subrows(rs.start, rs.len()),
                    assignment,
                    sizes,
                ));
                sims.extend(assignment.mean_similarity());
            }
            let rows: usize = blocks.iter().map(|b| b.nrows()).sum();
            let mut b = Mat::<f32>::zeros(rows, src.b.ncols());
            let mut at = 0;
            for blk in blocks {
                b.subrows_mut(at, blk.nrows()).copy_from(&blk);
                at += blk.nrows();
            }
            Ok(Mapped {
                factors: Factors { b, a },
                matched_similarity: mean(&sims),
            })
        } else {
            let (assignment, sizes) = inner(layer, parts[0].0, unit)?;
            let b = &self.residual.m * &src.b;
            let a = gather_rows(src.a.transpose(), assignment, sizes)
                .transpose()
                .to_owned();
            Ok(Mapped {
                factors: Factors { b, a },
                matched_similarity: assignment.mean_similarity(),
            })
        }
    }

    /// `A_s diag(g_s) P diag(g_t)⁻¹`.
    fn read_side(&self, src: &Factors, (g_s, g_t): &(Vec<f32>, Vec<f32>)) -> Mat<f32> {
        let scaled = Mat::from_fn(src.a.nrows(), src.a.ncols(), |i, j| src.a[(i, j)] * g_s[j]);
        let mapped = scaled * &self.residual.p;
        Mat::from_fn(mapped.nrows(), mapped.ncols(), |i, j| {
            let g = g_t[j];
            if g != 0.0 {
                mapped[(i, j)] / g
            } else {
                0.0
            }
        })
    }
}

/// The matching a part's inner side follows, and the unit sizes (source, target) in rows.
fn inner<'l>(
    layer: &'l LayerMap,
    part: Part,
    unit: &Unit,
) -> Result<(&'l Assignment, (usize, usize))> {
    let (hs, ht) = layer.head_dim;
    let heads = |a: &'l Assignment| -> Result<(&'l Assignment, (usize, usize))> {
        if hs != ht {
            return Err(Error::arg(
                "--mode",
                format!(
                    "map: {} has head_dim {hs} in the source and {ht} in the target; mapping inside heads of different sizes is not supported yet (use --mode align or resample for these modules, or --modules to leave attention out)",
                    unit.label
                ),
            ));
        }
        Ok((a, (hs, ht)))
    };
    match part {
        Part::Q | Part::O => heads(&layer.q_heads),
        Part::K | Part::V => heads(&layer.kv_heads),
        Part::Gate | Part::Up | Part::Down => Ok((&layer.neurons, (1, 1))),
    }
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}
