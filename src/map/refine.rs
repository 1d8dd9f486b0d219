//! The residual map refined layer by layer from the weights. The shared tokens anchor the
//! residual stream at the bottom only; deeper layers write and read directions the embeddings
//! never fix. So each layer refits the map on its own MLP: the gate and up rows its matched
//! neurons read (gains folded in) and the down columns they write are pairs of vectors that
//! must correspond under the map, `w_t ∝ w_s Qᵀ` and `c_t ∝ Q c_s`. Orthogonal Procrustes on
//! those pairs (unit length, every vector counts alike), with the starting map (the layer
//! below's) as a prior that fixes the directions the layer's weights do not constrain; the
//! matching is then redone under the new map, and the two alternate until the matching settles.
//!
//! A Procrustes fit of a few thousand vector pairs in a space of a few thousand dimensions
//! finds agreement even between unrelated weights (about √(d/n) by chance). So the fit is
//! validated first: fitted on half of the best [`TRIAL_NEURONS`] pairs, it must agree better
//! than the starting map with the other half, closing at least [`MIN_GAIN`] of the gap to a
//! perfect fit; only then is the map refitted on all [`REFIT_NEURONS`] and kept. The trial is
//! the smaller of the two because it runs on every layer, and between unrelated weights it is
//! all that runs (its cost grows with the cube of its pairs); the full fit runs only where the
//! evidence held out.

use faer::Mat;

use super::layer::Weights;
use super::matching::Assignment;
use super::polar::{column_dots, NearPolar};
use super::residual::polar_parts;
use super::ResidualMap;
use crate::backend::Backend;
use crate::error::Result;

/// The best-matched neurons whose weights refit the map (three vectors each). The fit's cost
/// grows with them (its eigendecomposition is 2 × 3 × this wide, see [`super::polar`]).
pub const REFIT_NEURONS: usize = 256;
/// The best-matched neurons of the validation trial: fitted on one half, held out on the other.
pub const TRIAL_NEURONS: usize = 128;
/// The prior's weight against the layer's evidence (both normalized to a unit nuclear norm).
pub const PRIOR_WEIGHT: f64 = 0.05;
/// The least part of the gap to a perfect fit (held-out mean cosine 1) a refit must close to
/// be kept.
pub const MIN_GAIN: f64 = 0.02;

/// A refitted map (None: it did not hold out) and how well held-out matched vectors agree.
pub struct Refit {
    pub map: Option<ResidualMap>,
    /// Mean cosine of the held-out vector pairs under the map the refit started from.
    pub start_agreement: f64,
    /// The same under the map fitted on the other pairs.
    pub agreement: f64,
}

/// A candidate orientation in the frame where the prior has orthonormal rows: factored when the
/// prior is orthonormal, else a full matrix (`d_a × d_b`) and whether it is orthonormal.
enum Trial {
    Near(NearPolar),
    Full(Mat<f32>, bool),
}

impl Trial {
    fn fit(
        q0: faer::MatRef<'_, f32>,
        (y_a, y_b): (&Mat<f32>, &Mat<f32>),
        (weight, factored): (f32, bool),
        backend: &dyn Backend,
    ) -> Result<Self> {
        let inv_h = 1.0 / y_a.ncols().max(1) as f32;
        if factored {
            return Ok(Trial::Near(NearPolar::fit(
                q0,
                (y_a, y_b),
                weight,
                inv_h,
                backend,
            )?));
        }
        let evidence = backend.product(y_a.as_ref(), y_b.transpose())?;
        let c = evidence * faer::Scale(inv_h) + q0 * faer::Scale(weight);
        let polar = polar_parts(&c)?;
        Ok(Trial::Full(polar.factor, polar.dropped == 0))
    }

    /// Mean agreement of the pairs `(y_a, y_b)` (`q0_yb` = Q0·y_b).
    fn agreement(
        &self,
        (y_a, y_b): (&Mat<f32>, &Mat<f32>),
        q0_yb: &Mat<f32>,
        backend: &dyn Backend,
    ) -> Result<f64> {
        Ok(match self {
            Trial::Near(near) => near.agreement((y_a, y_b), q0_yb),
            Trial::Full(q, _) => {
                let mapped = backend.product(q.as_ref(), y_b.as_ref())?;
                column_dots(y_a, &mapped) / y_a.ncols().max(1) as f64
            }
        })
    }

    /// The orientation as a matrix, and whether it has orthonormal rows.
    fn into_matrix(
        self,
        q0: faer::MatRef<'_, f32>,
        backend: &dyn Backend,
    ) -> Result<(Mat<f32>, bool)> {
        match self {
            Trial::Near(near) => Ok((near.materialize(q0, backend)?, near.orthonormal())),
            Trial::Full(q, orthonormal) => Ok((q, orthonormal)),
        }
    }
}

/// The pairs' vectors of one side as columns (`d × 3·pairs`): per neuron its gate and up rows
/// (gains folded in, the reads) and its down column (the write), each scaled to unit length.
fn columns(w: &Weights<'_>, g: &[f32], units: &[usize]) -> Mat<f32> {
    let d = g.len();
    let mut x = Mat::<f32>::zeros(d, 3 * units.len());
    let (mut gate, mut up) = (vec![0f32; d], vec![0f32; d]);
    for (r, &u) in units.iter().enumerate() {
        w.gate.row_into(u, &mut gate);
        w.up.row_into(u, &mut up);
        for j in 0..d {
            x[(j, 3 * r)] = gate[j] * g[j];
            x[(j, 3 * r + 1)] = up[j] * g[j];
        }
    }
    // down's columns: a pass over its rows, each decoded once.
    let mut row = vec![0f32; w.down.ncols()];
    for j in 0..d {
        w.down.row_into(j, &mut row);
        for (r, &u) in units.iter().enumerate() {
            x[(j, 3 * r + 2)] = row[u];
        }
    }
    for c in 0..x.ncols() {
        let norm = x.col(c).norm_l2();
        if norm > 0.0 {
            x.col_mut(c).iter_mut().for_each(|v| *v /= norm);
        }
    }
    x
}

/// The summed squares of the down columns of `units` (the writes' size).
fn write_size(w: &Weights<'_>, units: &[usize]) -> f64 {
    let mut s = 0.0;
    let mut row = vec![0f32; w.down.ncols()];
    for j in 0..w.down.nrows() {
        w.down.row_into(j, &mut row);
        s += units.iter().map(|&u| (row[u] as f64).powi(2)).sum::<f64>();
    }
    s
}

/// `[x, y]`.
fn side_by_side(x: &Mat<f32>, y: &Mat<f32>) -> Mat<f32> {
    Mat::from_fn(x.nrows(), x.ncols() + y.ncols(), |i, j| {
        if j < x.ncols() {
            x[(i, j)]
        } else {
            y[(i, j - x.ncols())]
        }
    })
}

/// Refits `current` on the neurons matched by `neurons`, with `prior`'s orientation as prior;
/// `residual_ratio` is `ρ_t/ρ_s`, the two models' factors of a block's output before it joins the
/// residual (Granite's `residual_multiplier`; 1 elsewhere), by which the writes' sizes differ
/// from the weights'.
pub(crate) fn refit(
    (ws, wt): (&Weights<'_>, &Weights<'_>),
    (g_s, g_t): &(Vec<f32>, Vec<f32>),
    neurons: &Assignment,
    (current, prior): (&ResidualMap, &ResidualMap),
    residual_ratio: f64,
    backend: &dyn Backend,
) -> Result<Refit> {
    let mut pairs: Vec<(f32, usize, usize)> = neurons
        .source_of
        .iter()
        .zip(&neurons.similarity)
        .enumerate()
        .filter_map(|(b, (a, &sim))| a.map(|a| (if sim.is_finite() { sim } else { 0.0 }, b, a)))
        .collect();
    pairs.sort_by(|x, y| y.0.total_cmp(&x.0));
    pairs.truncate(REFIT_NEURONS);
    if pairs.len() < 2 {
        return Ok(Refit {
            map: None,
            start_agreement: 0.0,
            agreement: 0.0,
        });
    }
    let (d_s, d_t) = (current.qt.nrows(), current.qt.ncols());
    // The writes' scale: the ratio of the matched down columns' sizes, times the ratio of the
    // factors the blocks' outputs are multiplied by.
    let source_units: Vec<usize> = pairs.iter().map(|p| p.2).collect();
    let target_units: Vec<usize> = pairs.iter().map(|p| p.1).collect();
    let (size_s, size_t) = (write_size(ws, &source_units), write_size(wt, &target_units));
    let scale = if size_s > 0.0 && size_t > 0.0 {
        (size_t / size_s).sqrt() * residual_ratio
    } else {
        current.scale
    };
    // The two halves: alternate pairs, so both have good and weak matches.
    let half = |units: &[usize], parity: usize| -> Vec<usize> {
        units.iter().skip(parity).step_by(2).copied().collect()
    };
    let trial_len = TRIAL_NEURONS.min(pairs.len());
    let (trial_s, trial_t) = (&source_units[..trial_len], &target_units[..trial_len]);
    let (fit_s, held_s) = (
        columns(ws, g_s, &half(trial_s, 0)),
        columns(ws, g_s, &half(trial_s, 1)),
    );
    let (fit_t, held_t) = (
        columns(wt, g_t, &half(trial_t, 0)),
        columns(wt, g_t, &half(trial_t, 1)),
    );
    // Work where the prior has orthonormal rows: a = the narrower side.
    let s_is_a = d_s <= d_t;
    let (fit, held) = if s_is_a {
        ((fit_s, fit_t), (held_s, held_t))
    } else {
        ((fit_t, fit_s), (held_t, held_s))
    };
    fn frame(m: &ResidualMap, s_is_a: bool) -> faer::MatRef<'_, f32> {
        if s_is_a {
            m.qt.as_ref()
        } else {
            m.qt.transpose()
        }
    }
    let q0 = frame(prior, s_is_a);
    let options = (
        (PRIOR_WEIGHT / d_s.min(d_t).max(1) as f64) as f32,
        prior.orthonormal,
    );
    let trial = Trial::fit(q0, (&fit.0, &fit.1), options, backend)?;
    let q0_held = backend.product(q0, held.1.as_ref())?;
    let refined = trial.agreement((&held.0, &held.1), &q0_held, backend)?;
    let h = held.0.ncols() as f64;
    let start_agreement = if std::ptr::eq(current, prior) {
        column_dots(&held.0, &q0_held) / h
    } else {
        column_dots(
            &held.0,
            &backend.product(frame(current, s_is_a), held.1.as_ref())?,
        ) / h
    };
    let map = if refined - start_agreement > MIN_GAIN * (1.0 - start_agreement) {
        // All the pairs: the trial's two halves, then the rest.
        let rest = |w: &Weights<'_>, g: &[f32], units: &[usize]| columns(w, g, &units[trial_len..]);
        let (rest_s, rest_t) = (rest(ws, g_s, &source_units), rest(wt, g_t, &target_units));
        let rest = if s_is_a {
            (rest_s, rest_t)
        } else {
            (rest_t, rest_s)
        };
        let all = (
            side_by_side(&side_by_side(&fit.0, &held.0), &rest.0),
            side_by_side(&side_by_side(&fit.1, &held.1), &rest.1),
        );
        let (q, orthonormal) =
            Trial::fit(q0, (&all.0, &all.1), options, backend)?.into_matrix(q0, backend)?;
        let qt = if s_is_a { q } else { q.transpose().to_owned() };
        let mut map = ResidualMap::from_orientation(qt, scale);
        map.width = current.width;
        map.shared_tokens = current.shared_tokens;
        map.relative_residual = current.relative_residual;
        map.orthonormal = orthonormal;
        Some(map)
    } else {
        None
    };
    Ok(Refit {
        map,
        start_agreement,
        agreement: refined,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::io::safetensors::FloatType;
    use crate::linalg::max_abs_diff;
    use crate::linalg::philox::gaussian_matrix;
    use crate::linalg::stored::Stored;

    fn gaussian(rows: usize, cols: usize, stream: u64) -> Mat<f32> {
        gaussian_matrix(5, stream, rows, cols)
    }

    /// MLP weights (gate, up: inter × d; down: d × inter); no attention.
    fn weights(gate: &Mat<f32>, up: &Mat<f32>, down: &Mat<f32>) -> Weights<'static> {
        let stored = |m: &Mat<f32>| Stored::from_mat(m.as_ref(), FloatType::F32);
        Weights {
            attention: None,
            linear: None,
            gate: stored(gate),
            up: stored(up),
            down: stored(down),
        }
    }

    #[test]
    fn a_refit_is_kept_between_related_weights_and_refused_between_unrelated_ones() {
        let (d, inter) = (24, 200);
        let (gate, up, down) = (
            gaussian(inter, d, 1),
            gaussian(inter, d, 2),
            gaussian(d, inter, 3),
        );
        let source = weights(&gate, &up, &down);
        let q = gaussian(d, d, 4).qr().compute_thin_Q(); // target = source rotated by q
        let rotated = weights(
            &(&gate * q.transpose()),
            &(&up * q.transpose()),
            &(&q * &down),
        );
        let unrelated = weights(
            &gaussian(inter, d, 5),
            &gaussian(inter, d, 6),
            &gaussian(d, inter, 7),
        );
        let neurons = Assignment {
            source_of: (0..inter).map(Some).collect(),
            similarity: vec![0.5; inter],
        };
        let ones = (vec![1.0; d], vec![1.0; d]);
        let start = ResidualMap::identity(d, d);
        let run = |target: &Weights<'_>| {
            refit(
                (&source, target),
                &ones,
                &neurons,
                (&start, &start),
                1.0,
                &CpuBackend,
            )
            .unwrap()
        };
        let kept = run(&rotated);
        let map = kept.map.expect("the rotation holds out");
        // With the identity as prior the fit is pulled a little towards it, but not far.
        let err = (&map.qt - q.transpose()).norm_l2() / q.norm_l2();
        assert!(err < 0.1, "orientation off by {err}");
        assert!(kept.agreement > 0.9 && kept.start_agreement < 0.3);
        let refused = run(&unrelated);
        assert!(
            refused.map.is_none(),
            "{} vs {}",
            refused.agreement,
            refused.start_agreement
        );
    }

    #[test]
    fn the_factored_refit_is_the_full_one_between_widths() {
        let inter = 300;
        for (d_s, d_t) in [(24, 40), (40, 24)] {
            let (gate, up, down) = (
                gaussian(inter, d_s, 11),
                gaussian(inter, d_s, 12),
                gaussian(d_s, inter, 13),
            );
            // q: the narrower side's coordinates inside the wider one (orthonormal columns).
            let q = gaussian(d_s.max(d_t), d_s.min(d_t), 14)
                .qr()
                .compute_thin_Q();
            let noise = |rows, cols, stream| gaussian(rows, cols, stream) * faer::Scale(0.3f32);
            // Reads move by the map's transpose, writes by the map.
            let (read, write) = if d_t > d_s {
                (q.transpose(), q.as_ref())
            } else {
                (q.as_ref(), q.transpose())
            };
            let target = weights(
                &(&gate * read + noise(inter, d_t, 15)),
                &(&up * read + noise(inter, d_t, 16)),
                &(write * &down + noise(d_t, inter, 17)),
            );
            let source = weights(&gate, &up, &down);
            let neurons = Assignment {
                source_of: (0..inter).map(Some).collect(),
                similarity: vec![0.5; inter],
            };
            let gains = (vec![1.0; d_s], vec![1.0; d_t]);
            let factored = ResidualMap::identity(d_s, d_t);
            let mut full = factored.clone();
            full.orthonormal = false;
            let run = |start: &ResidualMap| {
                refit(
                    (&source, &target),
                    &gains,
                    &neurons,
                    (start, start),
                    1.0,
                    &CpuBackend,
                )
                .unwrap()
            };
            let (a, b) = (run(&factored), run(&full));
            assert!(
                (a.agreement - b.agreement).abs() < 1e-4,
                "{d_s}→{d_t}: held-out agreement {} vs {}",
                a.agreement,
                b.agreement
            );
            let (a, b) = (a.map.expect("kept"), b.map.expect("kept"));
            let err = max_abs_diff(&a.qt, &b.qt);
            assert!(err < 1e-3, "{d_s}→{d_t}: refitted maps differ by {err}");
            // And the refit found the planted map.
            let want = if d_t > d_s {
                q.transpose().to_owned()
            } else {
                q.clone()
            };
            let off = (&a.qt - &want).norm_l2() / want.norm_l2();
            assert!(off < 0.2, "{d_s}→{d_t}: orientation off by {off}");
        }
    }
}
