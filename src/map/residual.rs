//! The residual-stream map between two models, from the embedding rows of the tokens both
//! vocabularies spell the same way. Fitted as a scaled orthogonal (or, between widths,
//! semi-orthogonal) Procrustes map on centered, normalized rows: orthogonal because a model's
//! residual coordinates are defined up to rotation, and no inversion, so the rounding noise in
//! the directions a narrower model never uses is not amplified into the map.

use faer::Mat;

use crate::error::{Error, Result};
use crate::linalg::mm_parallel;

/// Anchors that measure the map's scale and its fit.
const SCALE_ANCHORS: usize = 1024;

/// `h_t ≈ M h_s` between the residual streams, `M = μ·Q` with Q (semi-)orthogonal, and the map
/// of the normalized inputs the blocks read, `P = √(d_s/d_t)·Qᵀ` (RMSNorm's width factor
/// included: readers take `A_t = A_s diag(g_s) P diag(g_t)⁻¹`, writers `B_t = M B_s`). Only Qᵀ is
/// stored: with one map per layer, M and P as well would triple the memory.
#[derive(Debug, Clone)]
pub struct ResidualMap {
    /// `d_s × d_t`: Qᵀ.
    pub qt: Mat<f32>,
    /// The residual streams' scale ratio μ: `|h_t| ≈ μ |h_s|`.
    pub scale: f64,
    /// The reading map's factor: √(d_s/d_t) after a fit, 1 for the identity ablation.
    pub width: f64,
    /// Anchors the fit used (0 for the identity ablation).
    pub shared_tokens: usize,
    /// ‖E_t − E_s Mᵀ‖_F / ‖E_t‖_F on the centered anchors (None for the identity ablation).
    pub relative_residual: Option<f64>,
    /// Whether Qᵀ is orthonormal on its smaller side (no direction was left out of the polar
    /// factor): the layer refits take the factored path ([`super::polar`]) only then.
    pub orthonormal: bool,
    /// Of the fit's polar factor: directions too weak for its Gram, completed from the
    /// cross-covariance itself, and directions left out (nothing in the anchors holds them).
    pub weak_directions: [usize; 2],
}

impl ResidualMap {
    /// The identity on the first min(d_s, d_t) coordinates (the ablation without a residual map).
    pub fn identity(d_s: usize, d_t: usize) -> Self {
        let qt = Mat::from_fn(d_s, d_t, |i, j| if i == j { 1.0 } else { 0.0 });
        let mut map = Self::from_orientation(qt, 1.0);
        map.width = 1.0;
        map
    }

    /// The map of orientation `qt` (Qᵀ, `d_s × d_t`) and scale μ; no fit measured yet.
    pub fn from_orientation(qt: Mat<f32>, scale: f64) -> Self {
        let width = (qt.nrows() as f64 / qt.ncols() as f64).sqrt();
        ResidualMap {
            qt,
            scale,
            width,
            shared_tokens: 0,
            relative_residual: None,
            orthonormal: true,
            weak_directions: [0, 0],
        }
    }

    /// `M x` for the columns of `x` (`d_s × r` → `d_t × r`).
    pub fn write(&self, x: faer::MatRef<'_, f32>) -> Mat<f32> {
        self.qt.transpose() * x * faer::Scale(self.scale as f32)
    }

    /// `x P` for the rows of `x` (`r × d_s` → `r × d_t`).
    pub fn read(&self, x: faer::MatRef<'_, f32>) -> Mat<f32> {
        x * &self.qt * faer::Scale(self.width as f32)
    }

    /// Fits the map on paired anchor rows `e_s` (`n × d_s`) and `e_t` (`n × d_t`), and
    /// optionally a second anchor set ([`AnchorFit`] does it a set at a time).
    #[cfg(test)]
    pub fn fit(e_s: Mat<f32>, e_t: Mat<f32>, second: Option<(Mat<f32>, Mat<f32>)>) -> Result<Self> {
        let mut fit = AnchorFit::new(e_s, e_t)?;
        if let Some((l_s, l_t)) = second {
            fit.add(l_s, l_t);
        }
        fit.finish()
    }
}

/// The evidence for a [`ResidualMap`], gathered one anchor set at a time: a set's rows are
/// centered and normalized in place and folded into the cross-covariance, then dropped. At
/// Llama-3.1-70B widths a set is two 21,376 × 8192 matrices (1.4 GB in f32); holding both sets
/// and their centered and normalized copies at once took 7 GB.
pub struct AnchorFit {
    /// `Σ x_s x_tᵀ` over the normalized rows of every set so far (`d_s × d_t`).
    cross: Mat<f32>,
    /// Evenly spaced centered (not normalized) rows of the first set: the scale and the fit
    /// are two numbers, and [`SCALE_ANCHORS`] rows measure them well.
    picked: (Mat<f32>, Mat<f32>),
    /// Anchors of the first set.
    n: usize,
}

impl AnchorFit {
    /// The first set, which also measures the map's scale and fit: the embedding rows of the
    /// shared tokens.
    pub fn new(mut e_s: Mat<f32>, mut e_t: Mat<f32>) -> Result<Self> {
        let (n, d_s, d_t) = (e_s.nrows(), e_s.ncols(), e_t.ncols());
        if n < d_s.min(d_t) {
            return Err(Error::Numerical {
                context: "map: residual map".into(),
                reason: format!(
                    "{n} shared tokens cannot fix a map between widths {d_s} and {d_t}"
                ),
            });
        }
        center(&mut e_s);
        center(&mut e_t);
        let step = n.div_ceil(SCALE_ANCHORS).max(1);
        let picked: Vec<usize> = (0..n).step_by(step).collect();
        let pick = |x: &Mat<f32>| Mat::from_fn(picked.len(), x.ncols(), |i, j| x[(picked[i], j)]);
        let picked = (pick(&e_s), pick(&e_t));
        // Orientation from row-normalized anchors (every token counts alike), scale from the
        // raw ones.
        normalize_rows(&mut e_s);
        normalize_rows(&mut e_t);
        Ok(AnchorFit {
            cross: cross_of(&e_s, &e_t),
            picked,
            n,
        })
    }

    /// Another set that adds to the orientation's evidence (the untied output embeddings'
    /// rows).
    pub fn add(&mut self, mut l_s: Mat<f32>, mut l_t: Mat<f32>) {
        center(&mut l_s);
        center(&mut l_t);
        normalize_rows(&mut l_s);
        normalize_rows(&mut l_t);
        self.cross += cross_of(&l_s, &l_t);
    }

    /// The map: the polar factor of the cross-covariance, scaled to the first set.
    pub fn finish(self) -> Result<ResidualMap> {
        let polar = polar_parts(&self.cross)?;
        let directions = self.cross.nrows().min(self.cross.ncols());
        drop(self.cross);
        if polar.dropped == directions {
            // Constant (or zero) rows on one side: centered, nothing is left to align, and the
            // map would send every update to zero.
            return Err(Error::Numerical {
                context: "map: residual map".into(),
                reason: "the anchor rows of one model carry no direction (after centering they \
                         are zero): no map can be fitted"
                    .into(),
            });
        }
        let q_t = polar.factor; // d_s × d_t: Qᵀ
        let (xs, xt) = self.picked;
        let rotated = mm_parallel(xs.as_ref(), q_t.as_ref()); // picked × d_t
        let num = zip_sum(&rotated, &xt);
        let den = zip_sum(&rotated, &rotated);
        let mu = if den > 0.0 { num / den } else { 1.0 };
        let (mut err, mut total) = (0.0, 0.0);
        for j in 0..xt.ncols() {
            for i in 0..xt.nrows() {
                let d = xt[(i, j)] as f64 - mu * rotated[(i, j)] as f64;
                err += d * d;
                total += (xt[(i, j)] as f64).powi(2);
            }
        }
        let mut map = ResidualMap::from_orientation(q_t, mu);
        map.orthonormal = polar.dropped == 0;
        map.weak_directions = [polar.completed, polar.dropped];
        map.shared_tokens = self.n;
        map.relative_residual = Some((err / total.max(f64::MIN_POSITIVE)).sqrt());
        Ok(map)
    }
}

/// `Σ x_s x_tᵀ` over paired rows (`d_s × d_t`).
fn cross_of(xs: &Mat<f32>, xt: &Mat<f32>) -> Mat<f32> {
    mm_parallel(xs.transpose(), xt.as_ref())
}

/// Gram eigenvalues below this fraction of the largest are left out of the polar factor: below
/// it an f32 Gram matrix holds rounding, and inverting it would put noise into the map.
pub(crate) const POLAR_CUTOFF: f64 = 1e-6;

/// A polar factor, how many directions its Gram could not resolve and were completed, and how
/// many were left out (with next to nothing in `c`).
pub(crate) struct Polar {
    pub factor: Mat<f32>,
    pub completed: usize,
    pub dropped: usize,
}

/// The orthogonal (or semi-orthogonal) factor `X Yᵀ` of a cross-covariance `c = X Σ Yᵀ`, as
/// `(c cᵀ)^{-1/2} c` from the eigendecomposition of the smaller Gram matrix:
/// several times cheaper than the SVD of a wide `c`. The products are f32 (all cores), the small
/// eigendecomposition f64. Directions the Gram cannot resolve, eigenvalues below
/// [`POLAR_CUTOFF`] times the largest, are completed from `c` itself where there are few
/// ([`complete`]), else left out rather than divided by zero.
pub(crate) fn polar_parts(c: &Mat<f32>) -> Result<Polar> {
    let wide = c.nrows() <= c.ncols();
    // Each intermediate is dropped as soon as the next exists: at 8192 wide each is 256 MB in
    // f32 and 512 MB in f64.
    let gram = {
        let gram = if wide {
            mm_parallel(c.as_ref(), c.transpose())
        } else {
            mm_parallel(c.transpose(), c.as_ref())
        };
        Mat::<f64>::from_fn(gram.nrows(), gram.ncols(), |i, j| gram[(i, j)] as f64)
    };
    let evd = gram
        .self_adjoint_eigen(faer::Side::Lower)
        .map_err(|e| Error::Numerical {
            context: "map: residual map".into(),
            reason: format!("eigendecomposition of the anchors' Gram matrix failed: {e:?}"),
        })?;
    drop(gram);
    let (u, lambda) = (evd.U(), evd.S().column_vector());
    let top = (0..lambda.nrows()).map(|i| lambda[i]).fold(0.0, f64::max);
    let bar = top * POLAR_CUTOFF;
    let weak: Vec<Vec<f64>> = (0..lambda.nrows())
        .filter(|&j| lambda[j] <= bar)
        .map(|j| u.col(j).iter().copied().collect())
        .collect();
    let scaled = Mat::<f32>::from_fn(u.nrows(), u.ncols(), |i, j| {
        let l = lambda[j];
        if l > bar {
            (u[(i, j)] / l.sqrt()) as f32
        } else {
            0.0
        }
    });
    let u32 = Mat::<f32>::from_fn(u.nrows(), u.ncols(), |i, j| u[(i, j)] as f32);
    drop(evd);
    let root = mm_parallel(scaled.as_ref(), u32.transpose());
    drop((scaled, u32));
    let mut factor = if wide {
        mm_parallel(root.as_ref(), c.as_ref())
    } else {
        mm_parallel(c.as_ref(), root.as_ref())
    };
    let dropped = complete(&mut factor, c, &weak, top.sqrt(), wide);
    Ok(Polar {
        factor,
        completed: weak.len() - dropped,
        dropped,
    })
}

/// Singular values below this fraction of the largest count as none: the direction is not
/// completed (a dimension no anchor or weight uses, exactly zero in `c`).
const COMPLETE_FLOOR: f64 = 1e-6;

/// At most this many weak directions are completed. A cross-covariance has a few (the weakest
/// singular values of a square one); a layer refit's full polar factor, whose prior enters with
/// a weight of 0.05/d, has thousands at large widths, where completing them would cost more than
/// the factor itself: they are left out as before (the refit is then not orthonormal, and the
/// next layer takes the full path too).
const MAX_COMPLETED: usize = 256;

/// Completes the polar factor on the directions its Gram could not resolve (`weak`: unit
/// eigenvectors of the smaller Gram with eigenvalues under the cutoff, orthonormal). The Gram
/// squares the singular values, so an f32 Gram loses those below 1e-3 of the largest; but `c`
/// itself still holds them: the polar factor of `c` on the weak subspace W is `W·polar(Wᵀc)`,
/// with `Wᵀc` only `|W|` rows, formed in f64 (after removing what the factor already covers)
/// and decomposed directly. A map between models of one width meets a few such directions (a
/// square cross-covariance's weakest singular values are about 1/(2d) of its largest), and
/// without them the map would not be orthonormal, and would send updates along them to zero.
/// Returns how many stay out: those with (next to) nothing in `c`.
fn complete(
    factor: &mut Mat<f32>,
    c: &Mat<f32>,
    weak: &[Vec<f64>],
    scale: f64,
    wide: bool,
) -> usize {
    if weak.is_empty() || weak.len() > MAX_COMPLETED {
        return weak.len();
    }
    // The Gram's side (W's columns' length) and the other side's: wide, the factor's columns
    // are d_a long and its rows d_b; tall, the other way round.
    let inner = weak[0].len();
    let outer = if wide { c.ncols() } else { c.nrows() };
    // M = cᵀW (wide) or cW (tall), one column per weak direction, in f64.
    let mut m = Mat::<f64>::zeros(outer, weak.len());
    for (k, u) in weak.iter().enumerate() {
        if wide {
            for j in 0..outer {
                m[(j, k)] = c.col(j).iter().zip(u).map(|(&x, &y)| x as f64 * y).sum();
            }
        } else {
            for (j, &uj) in u.iter().enumerate() {
                for (i, &x) in c.col(j).iter().enumerate() {
                    m[(i, k)] += x as f64 * uj;
                }
            }
        }
    }
    // Twice against the factor's span (its rows, wide; its columns, tall): rounding leaks the
    // strong directions into W, and those are in the factor already.
    for _ in 0..2 {
        for k in 0..weak.len() {
            let v = m.col(k).to_owned();
            let mut p = vec![0f64; inner];
            if wide {
                for j in 0..outer {
                    for (pi, &f) in p.iter_mut().zip(factor.col(j).iter()) {
                        *pi += f as f64 * v[j];
                    }
                }
                for j in 0..outer {
                    let back: f64 = factor
                        .col(j)
                        .iter()
                        .zip(&p)
                        .map(|(&f, &y)| f as f64 * y)
                        .sum();
                    m[(j, k)] -= back;
                }
            } else {
                for (j, pj) in p.iter_mut().enumerate() {
                    *pj = factor
                        .col(j)
                        .iter()
                        .zip(v.iter())
                        .map(|(&f, &y)| f as f64 * y)
                        .sum();
                }
                for (j, &pj) in p.iter().enumerate() {
                    for (i, &f) in factor.col(j).iter().enumerate() {
                        m[(i, k)] -= f as f64 * pj;
                    }
                }
            }
        }
    }
    let Ok(svd) = m.thin_svd() else {
        return weak.len();
    };
    let (p, sigma, r) = (svd.U(), svd.S().column_vector(), svd.V());
    let mut dropped = 0;
    for k in 0..weak.len() {
        // NaN counts as nothing too.
        if sigma[k].is_nan() || sigma[k] <= COMPLETE_FLOOR * scale {
            dropped += 1;
            continue;
        }
        // a = W r_k, on the Gram's side.
        let a: Vec<f64> = (0..inner)
            .map(|i| weak.iter().enumerate().map(|(l, u)| u[i] * r[(l, k)]).sum())
            .collect();
        // wide: factor += a p_kᵀ; tall: factor += p_k aᵀ.
        for j in 0..factor.ncols() {
            let col = factor.col_mut(j);
            if wide {
                let s = p[(j, k)];
                col.iter_mut()
                    .zip(&a)
                    .for_each(|(f, &ai)| *f = (*f as f64 + ai * s) as f32);
            } else {
                let s = a[j];
                col.iter_mut()
                    .enumerate()
                    .for_each(|(i, f)| *f = (*f as f64 + p[(i, k)] * s) as f32);
            }
        }
    }
    dropped
}

/// Subtracts each column's mean (taken in f64).
fn center(x: &mut Mat<f32>) {
    let n = x.nrows().max(1) as f64;
    for j in 0..x.ncols() {
        let mean = x.col(j).iter().map(|&v| v as f64).sum::<f64>() / n;
        x.col_mut(j)
            .iter_mut()
            .for_each(|v| *v = (*v as f64 - mean) as f32);
    }
}

/// Scales each row to unit length (a zero row stays zero).
fn normalize_rows(x: &mut Mat<f32>) {
    let norms = super::matching::row_norms(x);
    for j in 0..x.ncols() {
        for (v, &norm) in x.col_mut(j).iter_mut().zip(&norms) {
            *v = if norm > 0.0 { *v / norm } else { 0.0 };
        }
    }
}

fn zip_sum(a: &Mat<f32>, b: &Mat<f32>) -> f64 {
    let mut s = 0.0;
    for j in 0..a.ncols() {
        for i in 0..a.nrows() {
            s += a[(i, j)] as f64 * b[(i, j)] as f64;
        }
    }
    s
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::max_abs_diff;
    use crate::linalg::philox::gaussian_matrix;

    fn gaussian(rows: usize, cols: usize, stream: u64) -> Mat<f32> {
        gaussian_matrix(7, stream, rows, cols)
    }

    /// A square cross-covariance whose weakest singular values an f32 Gram cannot resolve (1e-4
    /// of the largest: 1e-8 in the Gram), and one direction with nothing at all: the factor is
    /// the exact polar factor on every direction that holds something, both ways round, to what
    /// c's f32 entries hold of the weak directions (their rounding, ε·‖c‖, against 1e-4).
    #[test]
    fn directions_the_gram_cannot_resolve_are_completed() {
        let seed = crate::linalg::fresh_seed();
        let d = 24;
        let orth = |stream| gaussian_matrix(seed, stream, d, d).qr().compute_thin_Q();
        let (x, y) = (orth(1), orth(2));
        let sigma: Vec<f32> = (0..d)
            .map(|i| match i {
                0 => 0.0,
                1..=3 => 1e-4,
                _ => 1.0 + i as f32 / d as f32,
            })
            .collect();
        let c = &x * Mat::from_fn(d, d, |i, j| if i == j { sigma[i] } else { 0.0 }) * y.transpose();
        for tall in [false, true] {
            // The tall path: one more row than columns, holding nothing.
            let c = if tall {
                Mat::from_fn(d + 1, d, |i, j| if i < d { c[(i, j)] } else { 0.0 })
            } else {
                c.clone()
            };
            let polar = polar_parts(&c).unwrap();
            assert_eq!(
                polar.dropped, 1,
                "tall {tall}: only the empty direction stays out"
            );
            // X Yᵀ without the empty direction.
            let expected = Mat::from_fn(c.nrows(), d, |i, j| {
                if i >= d {
                    return 0.0;
                }
                (1..d).map(|k| x[(i, k)] * y[(j, k)]).sum::<f32>()
            });
            let err = max_abs_diff(&polar.factor, &expected);
            assert!(err < 1e-3, "tall {tall}: off by {err}");
        }
    }

    #[test]
    fn a_rotated_and_wider_embedding_is_recovered() {
        let (n, d_s, d_t) = (300, 12, 20);
        let e_s = gaussian(n, d_s, 1);
        let q = gaussian(d_t, d_s, 2).qr().compute_thin_Q(); // d_t × d_s, QᵀQ = I
        let e_t = &e_s * q.transpose() * faer::Scale(3.0f32);
        let map = ResidualMap::fit(e_s, e_t, None).unwrap();
        let want = &q * faer::Scale(3.0f32);
        let m = map.write(Mat::<f32>::identity(d_s, d_s).as_ref());
        let err = max_abs_diff(&m, &want);
        assert!(err < 1e-4, "M off by {err}");
        assert!(map.relative_residual.unwrap() < 1e-5);
        // P undoes the normalized-input map √(d_t/d_s)·Q.
        let n_map = &q * faer::Scale((d_t as f32 / d_s as f32).sqrt());
        let eye = map.read(Mat::<f32>::identity(d_s, d_s).as_ref()) * &n_map;
        assert!(max_abs_diff(&eye, &Mat::<f32>::identity(d_s, d_s)) < 1e-4);
    }
}
