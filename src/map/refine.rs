//! The residual map refined layer by layer from the weights. The shared tokens anchor the
//! residual stream at the bottom only; deeper layers write and read directions the embeddings
//! never fix. So each layer refits the map on its own MLP: the gate and up rows its matched
//! neurons read (gains folded in) and the down columns they write are pairs of vectors that
//! must correspond under the map, `w_t ∝ w_s Qᵀ` and `c_t ∝ Q c_s`. Orthogonal Procrustes on
//! those pairs (unit length, every vector counts alike), with the starting map (the layer
//! below's) as a prior that fixes the directions the layer's weights do not constrain; the
//! matching is then redone under the new map, and the two alternate until the matching settles.

use faer::Mat;

use super::layer::Weights;
use super::matching::Assignment;
use super::residual::{cross_of, normalized_rows, orientation};
use super::ResidualMap;
use crate::error::Result;

/// The best-matched neurons whose weights refit the map (three vectors each): a few times the
/// width suffices, and the cost grows with it.
pub const REFIT_NEURONS: usize = 1024;
/// The prior's weight against the layer's evidence (both normalized to a unit nuclear norm).
pub const PRIOR_WEIGHT: f64 = 0.25;

/// A refitted map and how well the layer's matched vectors agree under it.
pub struct Refit {
    pub map: ResidualMap,
    /// Mean cosine of the matched vector pairs under the map the refit started from.
    pub start_agreement: f64,
    /// The same under the refitted map.
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
            for j in 0..d {
                x[(3 * r, j)] = w.gate[(u, j)] * g[j];
                x[(3 * r + 1, j)] = w.up[(u, j)] * g[j];
                x[(3 * r + 2, j)] = w.down[(j, u)];
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
    let mut evidence = cross_of(&normalized_rows(&xs), &normalized_rows(&xt));
    evidence *= faer::Scale(1.0 / (3 * n).max(1) as f64);
    let weight = PRIOR_WEIGHT / d_s.min(d_t).max(1) as f64;
    let with_prior = Mat::<f64>::from_fn(d_s, d_t, |i, j| {
        evidence[(i, j)] + weight * prior.qt[(i, j)] as f64
    });
    let qt = orientation(&with_prior)?;
    // Σ_pairs ⟨x_s Qᵀ, x_t⟩ / count = ⟨Qᵀ, evidence⟩_F.
    let agreement = |q: &Mat<f32>| -> f64 {
        let mut s = 0.0;
        for j in 0..d_t {
            for i in 0..d_s {
                s += q[(i, j)] as f64 * evidence[(i, j)];
            }
        }
        s
    };
    let (start_agreement, refined) = (agreement(&current.qt), agreement(&qt));
    let mut map = ResidualMap::from_orientation(qt, scale);
    map.width = current.width;
    map.shared_tokens = current.shared_tokens;
    map.relative_residual = current.relative_residual;
    Ok(Refit {
        map,
        start_agreement,
        agreement: refined,
    })
}
