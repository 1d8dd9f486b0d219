//! A unit's factors through the map. Modules that read the normalized residual (q, k, v, gate,
//! up) see `g ⊙ h/rms(h)`, so their A maps as `A_t = A_s diag(g_s) P diag(g_t)⁻¹`, and their B's
//! rows (heads, neurons) move with the matching — inside heads through the head fit's N where
//! there is one, with the head norms' gains around it, and rescaled by κ where a side reads the
//! residual without a norm (`reader_scale`); modules that write into the residual (o,
//! down) map their B through the block's writer map (`M`, or with output norms
//! `κ diag(g_t)⁻¹ Q diag(g_s)`), and their A's columns move with the matching (o's inside heads
//! through U). Linear attention's projections (Qwen3.5) move head by head the same way, their
//! heads whole (`linear_heads`). All maps are the unit's own layer's. Unmatched target units get
//! zero rows (or columns): they take nothing from the adapter.

use faer::Mat;

use super::gains::mapped_gains;
use super::layer::Gains;
use super::matching::Assignment;
use super::LayerMap;
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
    /// The target's inner units this module's rows or columns follow, and how many of them
    /// are matched: the unmatched ones take no update.
    pub matched_units: MatchedUnits,
}

/// How many of a module's target heads or neurons are matched to a source unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatchedUnits {
    /// Neurons (the MLP's modules), or attention heads.
    pub neurons: bool,
    pub matched: usize,
    pub all: usize,
}

impl MatchedUnits {
    fn of(part: Part, (matched, all): (usize, usize)) -> Self {
        MatchedUnits {
            neurons: part.mlp(),
            matched,
            all,
        }
    }
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

impl LayerMap {
    /// A linear attention module's factors (Qwen3.5's split projections): its reading parts'
    /// A as any attention reader's, B's rows head by head; `out_proj`'s B through the
    /// attention's writer map, A's columns head by head.
    fn apply_linear(
        &self,
        part: Part,
        src: &Factors,
        source: &ModelSide<'_>,
        unit: &Unit,
    ) -> Result<Mapped> {
        let (Some(linear), Some(config)) = (&self.linear, &source.ckpt.config.linear) else {
            return Err(Error::internal(format!(
                "map: {} of target layer {} without both layers' linear attention heads",
                unit.label, self.target_layer
            )));
        };
        let factors = match part {
            Part::LinOut => Factors {
                b: self.writers.0.write(&self.residual, src.b.as_ref()),
                a: linear.move_columns(src.a.as_ref(), config)?,
            },
            _ => Factors {
                b: linear.move_rows(part, src.b.as_ref(), config)?,
                a: read_side(self, src, &self.gains.attn),
            },
        };
        Ok(Mapped {
            factors,
            matched_similarity: linear.value_heads.mean_similarity(),
            matched_units: MatchedUnits::of(part, linear.value_heads.coverage()),
        })
    }
}

/// How one matched unit's rows move: `(target unit, source unit, the source unit's rows)`.
type UnitBlock<'f> = dyn Fn(usize, usize, faer::MatRef<'_, f32>) -> Mat<f32> + 'f;

/// Rows of `b` moved unit by unit: target unit u (of `size_t` rows) takes `block(u, src, rows)`
/// of the rows of its source unit src (of `size_s` rows); unmatched units get zeros.
pub(super) fn move_rows(
    b: faer::MatRef<'_, f32>,
    assignment: &Assignment,
    (size_s, size_t): (usize, usize),
    block: &UnitBlock<'_>,
) -> Mat<f32> {
    let mut out = Mat::<f32>::zeros(assignment.source_of.len() * size_t, b.ncols());
    for (u, src) in assignment.source_of.iter().enumerate() {
        if let Some(&src) = src.as_ref() {
            let moved = block(u, src, b.subrows(src * size_s, size_s));
            out.subrows_mut(u * size_t, size_t).copy_from(&moved);
        }
    }
    out
}

/// The rows themselves, as many as fit (a plain gather).
fn same_rows(size_t: usize) -> impl Fn(faer::MatRef<'_, f32>) -> Mat<f32> {
    move |rows| {
        Mat::from_fn(size_t, rows.ncols(), |i, j| {
            if i < rows.nrows() {
                rows[(i, j)]
            } else {
                0.0
            }
        })
    }
}

impl LayerMap {
    /// The target factors of `unit` (a unit of this target layer) from the source factors
    /// `src` (B rows of the unit, A).
    pub fn apply(
        &self,
        unit: &Unit,
        src: &Factors,
        source: &ModelSide<'_>,
        target: &ModelSide<'_>,
    ) -> Result<Mapped> {
        if unit.target_layer != self.target_layer {
            return Err(Error::internal(format!(
                "map: a unit of target layer {} given the map of layer {}",
                unit.target_layer, self.target_layer
            )));
        }
        let layer = self;
        let parts = parts_of(unit, source, target);
        if parts[0].0.linear() {
            return self.apply_linear(parts[0].0, src, source, unit);
        }
        let reads = parts[0].0 != Part::O && parts[0].0 != Part::Down;
        if reads {
            let gains = if matches!(parts[0].0, Part::Gate | Part::Up) {
                &layer.gains.mlp
            } else {
                &layer.gains.attn
            };
            let a = read_side(layer, src, gains);
            let mut blocks = Vec::new();
            let mut sims = Vec::new();
            let mut units = (0, 0);
            let gated = [source, target].map(|side| side.ckpt.config.gated_query);
            let has_q = parts.iter().any(|(part, _, _)| *part == Part::Q);
            if has_q && gated == [true, false] {
                return Err(Error::internal(format!(
                    "map: {} of target layer {} would drop the source's query gate \
                     (`experts::unmapped_update` refuses it)",
                    unit.label, self.target_layer
                )));
            }
            for (part, rs, _) in &parts {
                let (assignment, sizes) = inner(layer, *part, unit)?;
                let rows = src.b.subrows(rs.start, rs.len());
                let moved = match *part == Part::Q && gated != [false, false] {
                    true => {
                        let block = gated_query_block(layer, sizes, gated);
                        let rows_of = |hd: usize, g: bool| if g { 2 * hd } else { hd };
                        let units = (rows_of(sizes.0, gated[0]), rows_of(sizes.1, gated[1]));
                        move_rows(rows, assignment, units, &block)
                    }
                    false => {
                        let block = reader_block(layer, *part, sizes);
                        move_rows(rows, assignment, sizes, &block)
                            * faer::Scale(layer.reader_scale.of(*part))
                    }
                };
                blocks.push(moved);
                sims.extend(assignment.mean_similarity());
                let (matched, all) = assignment.coverage();
                units = (units.0 + matched, units.1 + all);
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
                matched_units: MatchedUnits::of(parts[0].0, units),
            })
        } else {
            let part = parts[0].0;
            let (assignment, sizes) = inner(layer, part, unit)?;
            let writer = if part == Part::O {
                &layer.writers.0
            } else {
                &layer.writers.1
            };
            let b = writer.write(&layer.residual, src.b.as_ref());
            // o's columns inside matched heads: A_t[:, b] = A_s[:, a] U_b.
            let fit = layer.head_fit.as_ref().filter(|_| part == Part::O);
            let block = |u: usize, _: usize, rows: faer::MatRef<'_, f32>| match fit {
                Some(f) => f.o[u].as_ref().expect("matched head").transpose() * rows,
                None => same_rows(sizes.1)(rows),
            };
            let a = move_rows(src.a.transpose(), assignment, sizes, &block)
                .transpose()
                .to_owned();
            Ok(Mapped {
                factors: Factors { b, a },
                matched_similarity: assignment.mean_similarity(),
                matched_units: MatchedUnits::of(part, assignment.coverage()),
            })
        }
    }
}

/// How a reading part's rows move inside a matched unit: through the head fit's N (with the
/// head norms' gains around it for q and k, each unit's own), by the head norms' gain ratio
/// alone, or as they are.
fn reader_block<'l>(
    layer: &'l LayerMap,
    part: Part,
    (size_s, size_t): (usize, usize),
) -> impl Fn(usize, usize, faer::MatRef<'_, f32>) -> Mat<f32> + 'l {
    let gains = match part {
        Part::Q => Some(&layer.gains.q),
        Part::K => Some(&layer.gains.k),
        _ => None,
    };
    let fit = layer.head_fit.as_ref().and_then(|f| match part {
        Part::Q => Some(&f.q),
        Part::K => Some(&f.k),
        Part::V => Some(&f.v),
        _ => None,
    });
    move |u, src, rows| {
        let gains =
            gains.map(|(g_s, g_t)| (Gains::unit(g_s, src, size_s), Gains::unit(g_t, u, size_t)));
        let scaled = match gains {
            Some((g_s, _)) => {
                Mat::from_fn(rows.nrows(), rows.ncols(), |i, j| rows[(i, j)] * g_s[i])
            }
            None => rows.to_owned(),
        };
        let n = fit.map(|n| n[u].as_ref().expect("matched head"));
        let moved = match n {
            Some(n) => n * &scaled,
            None => same_rows(size_t)(scaled.as_ref()),
        };
        match gains {
            Some((g_s, g_t)) => {
                // What the source's gains become in each target coordinate: through N, or as
                // they are between heads of one size.
                let mapped = match n {
                    Some(n) => mapped_gains(n.transpose(), g_s),
                    None => g_s.iter().map(|g| g.abs()).collect(),
                };
                let inv = layer.gains.inverse(g_t, &mapped);
                Mat::from_fn(moved.nrows(), moved.ncols(), |i, j| moved[(i, j)] * inv[i])
            }
            None => moved,
        }
    }
}

/// How a gated query head's rows move (Qwen3.5: `head_dim` query rows, then as many gate
/// rows): the query rows as any q rows; the gate rows, which scale the head's output (in its
/// value coordinates) coordinate by coordinate, as they are, or under a head fit through
/// [`gate_weights`] of the N of the head's value rows. A target gate with no gate in the source
/// takes no update; the other way round is refused before the map is built
/// (`experts::refuse_map`).
fn gated_query_block<'l>(
    layer: &'l LayerMap,
    (hs, ht): (usize, usize),
    [gated_s, gated_t]: [bool; 2],
) -> impl Fn(usize, usize, faer::MatRef<'_, f32>) -> Mat<f32> + 'l {
    let query = reader_block(layer, Part::Q, (hs, ht));
    let scale = faer::Scale(layer.reader_scale.of(Part::Q));
    let gate_scale = faer::Scale(layer.reader_scale.of_query_gate());
    let per_group = layer.q_heads.source_of.len() / layer.kv_heads.source_of.len().max(1);
    move |u, src, rows| {
        let mut out = Mat::<f32>::zeros(if gated_t { 2 * ht } else { ht }, rows.ncols());
        out.subrows_mut(0, ht)
            .copy_from(&(query(u, src, rows.subrows(0, hs)) * scale));
        if gated_s && gated_t {
            let gate = rows.subrows(hs, hs);
            let n_v = layer.head_fit.as_ref().map(|f| &f.v[u / per_group.max(1)]);
            let moved = match n_v {
                Some(n) => gate_weights(n.as_ref().expect("matched head's group")) * gate,
                None => same_rows(ht)(gate),
            };
            out.subrows_mut(ht, ht).copy_from(&(moved * gate_scale));
        }
        out
    }
}

/// How a gate's source coordinates blend into each target coordinate under a value map N
/// (`hd_t × hd_s`): `W[c, i] = N[c, i]² / Σ_i' N[c, i']²`. A gate scales a value coordinate
/// whatever its sign or size (o's column takes the rest), so a coordinate flipped or rescaled by
/// N keeps its gate: exact for a signed, scaled permutation, a convex blend otherwise.
fn gate_weights(n: &Mat<f32>) -> Mat<f32> {
    Mat::from_fn(n.nrows(), n.ncols(), |c, i| {
        let row: f32 = (0..n.ncols()).map(|k| n[(c, k)].powi(2)).sum();
        if row > 0.0 {
            n[(c, i)].powi(2) / row
        } else {
            0.0
        }
    })
}

/// `A_s diag(g_s) P diag(g_t)⁻¹` (the inverse guarded: `gains::inverse_gains`).
fn read_side(layer: &LayerMap, src: &Factors, (g_s, g_t): &(Vec<f32>, Vec<f32>)) -> Mat<f32> {
    let scaled = Mat::from_fn(src.a.nrows(), src.a.ncols(), |i, j| src.a[(i, j)] * g_s[j]);
    let mapped = layer.residual.read(scaled.as_ref());
    let inv = layer
        .gains
        .inverse(g_t, &mapped_gains(layer.residual.qt.as_ref(), g_s));
    Mat::from_fn(mapped.nrows(), mapped.ncols(), |i, j| {
        mapped[(i, j)] * inv[j]
    })
}

/// The matching a part's inner side follows, and the unit sizes (source, target) in rows.
fn inner<'l>(
    layer: &'l LayerMap,
    part: Part,
    unit: &Unit,
) -> Result<(&'l Assignment, (usize, usize))> {
    let (hs, ht) = layer.head_dim;
    let heads = |a: &'l Assignment| -> Result<(&'l Assignment, (usize, usize))> {
        if hs != ht && layer.head_fit.is_none() {
            return Err(Error::arg(
                "--map-inner",
                format!(
                    "map: {} has head_dim {hs} in the source and {ht} in the target; heads of different sizes are mapped by the inner fit, which `--map-inner index` leaves out (use match or fit)",
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
        // Latent attention's projections (`experts::refuse_map` stops them first; linear
        // attention's go through `apply_linear`).
        _ => Err(Error::internal(format!(
            "map: latent attention ({}) reached the map (`experts::refuse_map` refuses it)",
            unit.label
        ))),
    }
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}
