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
//! validated: fitted on half of the pairs, it must agree better than the starting map with the
//! other half, closing at least [`MIN_GAIN`] of the gap to a perfect fit; only then is the map
//! refitted on all of them and kept.

use faer::Mat;

use super::layer::Weights;
use super::matching::Assignment;
use super::residual::{cross_of, normalized_rows, orientation};
use super::ResidualMap;
use crate::error::Result;

/// The best-matched neurons whose weights refit the map (three vectors each): a few times the
/// width suffices, and the cost grows with it.
pub const REFIT_NEURONS: usize = 768;
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

/// Refits `current` on the neurons matched by `neurons`, with `prior`'s orientation as prior.
pub(crate) fn refit(
    (ws, wt): (&Weights, &Weights),
    (g_s, g_t): &(Vec<f32>, Vec<f32>),
    neurons: &Assignment,
    current: &ResidualMap,
    prior: &ResidualMap,
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
    let (d_s, d_t) = (current.qt.nrows(), current.qt.ncols());
    let n = pairs.len();
    // Rows: gate, up (gained reads), down's column (write), per pair.
    let stack = |w: &Weights, g: &[f32], d: usize, pick: &dyn Fn(&(f32, usize, usize)) -> usize| {
        let mut x = Mat::<f32>::zeros(3 * n, d);
        for (r, p) in pairs.iter().enumerate() {
            let u = pick(p);
            let (gate, up) = (w.gate.row(u), w.up.row(u));
            for j in 0..d {
                x[(3 * r, j)] = gate[j] * g[j];
                x[(3 * r + 1, j)] = up[j] * g[j];
                x[(3 * r + 2, j)] = w.down.data[j * w.down.cols + u];
            }
        }
        x
    };
    let xs = stack(ws, g_s, d_s, &|p| p.2);
    let xt = stack(wt, g_t, d_t, &|p| p.1);
    // The writes' scale: the ratio of the matched down columns' sizes.
    let size = |x: &Mat<f32>| -> f64 {
        (0..n)
            .map(|r| (x.row(3 * r + 2).norm_l2() as f64).powi(2))
            .sum()
    };
    let (size_s, size_t) = (size(&xs), size(&xt));
    let scale = if size_s > 0.0 && size_t > 0.0 {
        (size_t / size_s).sqrt()
    } else {
        current.scale
    };
    // Evidence of the two halves (alternate pairs, so both have good and weak matches).
    let (xs, xt) = (normalized_rows(&xs), normalized_rows(&xt));
    let half = |parity: usize| {
        let rows: Vec<usize> = (0..3 * n).filter(|r| (r / 3) % 2 == parity).collect();
        let pick = |x: &Mat<f32>| Mat::from_fn(rows.len(), x.ncols(), |i, j| x[(rows[i], j)]);
        let c = cross_of(&pick(&xs), &pick(&xt)) * faer::Scale(1.0 / rows.len().max(1) as f32);
        (c, rows.len())
    };
    let ((fit_half, n_fit), (held_out, n_held)) = (half(0), half(1));
    let weight = (PRIOR_WEIGHT / d_s.min(d_t).max(1) as f64) as f32;
    let with_prior = |evidence: &Mat<f32>| evidence + &prior.qt * faer::Scale(weight);
    // Σ_pairs ⟨x_s Qᵀ, x_t⟩ / count = ⟨Qᵀ, evidence⟩_F.
    let agreement = |q: &Mat<f32>, evidence: &Mat<f32>| -> f64 {
        let mut s = 0.0;
        for j in 0..d_t {
            for i in 0..d_s {
                s += q[(i, j)] as f64 * evidence[(i, j)] as f64;
            }
        }
        s
    };
    let trial = orientation(&with_prior(&fit_half))?;
    let start_agreement = agreement(&current.qt, &held_out);
    let refined = agreement(&trial, &held_out);
    let map = if n_held > 0 && refined - start_agreement > MIN_GAIN * (1.0 - start_agreement) {
        let total = n_fit + n_held;
        let (wf, wh) = (n_fit as f32 / total as f32, n_held as f32 / total as f32);
        let all = &fit_half * faer::Scale(wf) + &held_out * faer::Scale(wh);
        let mut map = ResidualMap::from_orientation(orientation(&with_prior(&all))?, scale);
        map.width = current.width;
        map.shared_tokens = current.shared_tokens;
        map.relative_residual = current.relative_residual;
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
    use crate::linalg::philox::gaussian4;
    use crate::linalg::RowMajor;

    fn gaussian(rows: usize, cols: usize, stream: u64) -> Mat<f32> {
        Mat::from_fn(rows, cols, |i, j| {
            gaussian4(5, stream, i as u32, (j / 4) as u32)[j % 4]
        })
    }

    fn row_major(m: &Mat<f32>) -> RowMajor {
        RowMajor {
            data: (0..m.nrows())
                .flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)]))
                .collect(),
            rows: m.nrows(),
            cols: m.ncols(),
        }
    }

    /// MLP weights (gate, up: inter × d; down: d × inter); attention left empty.
    fn weights(gate: &Mat<f32>, up: &Mat<f32>, down: &Mat<f32>) -> Weights {
        let empty = row_major(&Mat::zeros(0, 0));
        Weights {
            q: empty.clone(),
            k: empty.clone(),
            v: empty.clone(),
            o: empty,
            gate: row_major(gate),
            up: row_major(up),
            down: row_major(down),
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
        let kept = refit((&source, &rotated), &ones, &neurons, &start, &start).unwrap();
        let map = kept.map.expect("the rotation holds out");
        // With the identity as prior the fit is pulled a little towards it, but not far.
        let err = (&map.qt - q.transpose()).norm_l2() / q.norm_l2();
        assert!(err < 0.1, "orientation off by {err}");
        assert!(kept.agreement > 0.9 && kept.start_agreement < 0.3);
        let refused = refit((&source, &unrelated), &ones, &neurons, &start, &start).unwrap();
        assert!(
            refused.map.is_none(),
            "{} vs {}",
            refused.agreement,
            refused.start_agreement
        );
    }
}
