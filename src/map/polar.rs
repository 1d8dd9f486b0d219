//! The orientation of a layer's refit, `polar(w·Q0 + Y_a Y_bᵀ / h)`, computed in the few
//! dimensions the layer's evidence touches. `Q0` (`d_a × d_b`, d_a ≤ d_b) is the prior map, with
//! orthonormal rows; the evidence is `h` paired vectors, the columns of `Y_a` (`d_a × h`) and
//! `Y_b` (`d_b × h`), with h a few hundred against widths of thousands.
//!
//! Why it is exact: let `W_a ⊇ span(Y_a, Q0 Y_b)` (basis `B_a`, at most 2h columns) and
//! `W_b = Q0ᵀ W_a ⊕ W_⊥`, with `W_⊥ ⊇` the part of `Y_b` outside the range of `Q0ᵀ` (basis `B_⊥`).
//! Then `c = w·Q0 + Y_a Y_bᵀ / h` maps `W_b` into `W_a` and is `w·Q0` on `W_b`'s complement, which
//! it maps into `W_a`'s complement: the two parts have orthogonal row and column spaces, so the
//! polar factor is the sum of theirs,
//!
//!   `polar(c) = B_a polar(C) B_bᵀ + Q0 (I − B_b B_bᵀ) = Q0 + B_a (polar(C) B_bᵀ − B_aᵀ Q0)`,
//!
//! with `C = B_aᵀ c B_b` only `2h × 3h` and `B_b = [Q0ᵀ B_a, B_⊥]`. So the eigendecomposition is
//! of a 2h-wide Gram instead of a d_a-wide one, and no `d_a × d_b` product is formed until a
//! refit is kept. (The complement's singular values are all w, and its factor is `Q0` itself,
//! however small w is: no division by a rounded value, so it is always kept.)

use faer::Mat;

use crate::backend::Backend;
use crate::error::{Error, Result};

/// Parts of `Y_b` outside the range of `Q0ᵀ` shorter than this (the vectors have unit length)
/// are left out of `W_⊥`: below it they are the f32 rounding of the projection, and their
/// directions would not be orthogonal to the range.
const PERP_FLOOR: f64 = 1e-2;

/// `polar(w·Q0 + Y_a Y_bᵀ / h)` in factored form.
pub(crate) struct NearPolar {
    /// `d_a × r_a`, orthonormal.
    b_a: Mat<f32>,
    /// `d_b × r_⊥`, orthonormal and orthogonal to the range of `Q0ᵀ`.
    b_perp: Mat<f32>,
    /// `polar(C)`: `r_a × (r_a + r_⊥)`.
    core: Mat<f32>,
    /// Whether no direction was left out (the factor has orthonormal rows).
    complete: bool,
}

impl NearPolar {
    /// The factored polar factor of `w·q0 + y_a y_bᵀ · inv_h`.
    pub fn fit(
        q0: faer::MatRef<'_, f32>,
        (y_a, y_b): (&Mat<f32>, &Mat<f32>),
        w: f32,
        inv_h: f32,
        backend: &dyn Backend,
    ) -> Result<Self> {
        let q0_yb = backend.product(q0, y_b.as_ref())?; // d_a × h
        let both = Mat::from_fn(y_a.nrows(), 2 * y_a.ncols(), |i, j| {
            if j < y_a.ncols() {
                y_a[(i, j)]
            } else {
                q0_yb[(i, j - y_a.ncols())]
            }
        });
        let b_a = both.qr().compute_thin_Q();
        let back = backend.product(q0.transpose(), q0_yb.as_ref())?;
        let perp = y_b - back;
        let b_perp = orthonormal_span(&perp)?;
        let r_a = b_a.ncols();
        // C = [w·I + Bₐᵀ Yₐ (Bₐᵀ Q0 Y_b)ᵀ / h,  Bₐᵀ Yₐ (B_⊥ᵀ Y_b)ᵀ / h]
        let a_coords = b_a.transpose() * y_a; // r_a × h
        let left = a_coords.as_ref() * (b_a.transpose() * &q0_yb).transpose();
        let right = a_coords.as_ref() * (b_perp.transpose() * y_b).transpose();
        let core_in = Mat::from_fn(r_a, r_a + b_perp.ncols(), |i, j| {
            if j < r_a {
                left[(i, j)] * inv_h + if i == j { w } else { 0.0 }
            } else {
                right[(i, j - r_a)] * inv_h
            }
        });
        let (core, dropped) = core_polar(&core_in)?;
        // The complement's singular values are all w and its factor is Q0 itself: nothing there
        // is divided by a rounded value, so it is kept however small w is against the evidence
        // (at 8192 wide w is 6e-6; leaving it out would leave a map of rank r_a).
        debug_assert!(w > 0.0, "the prior's weight");
        Ok(NearPolar {
            b_a,
            b_perp,
            core,
            complete: dropped == 0,
        })
    }

    /// Whether the polar factor has orthonormal rows (no direction fell under the cutoff), so
    /// that a refit starting from it may take this path again.
    pub fn orthonormal(&self) -> bool {
        self.complete
    }

    /// `(1/h) Σ_r y_a[:, r]ᵀ Q y_b[:, r]`, Q the polar factor, for other pairs (`q0_yb` = Q0·y_b):
    /// the mean agreement of held-out pairs, without forming Q.
    pub fn agreement(&self, (y_a, y_b): (&Mat<f32>, &Mat<f32>), q0_yb: &Mat<f32>) -> f64 {
        let r_a = self.b_a.ncols();
        let (core_a, core_perp) = (
            self.core.subcols(0, r_a),
            self.core.subcols(r_a, self.b_perp.ncols()),
        );
        let u = self.b_a.transpose() * y_a; // r_a × h
        let v1 = self.b_a.transpose() * q0_yb; // Bₐᵀ Q0 y_b
        let v2 = self.b_perp.transpose() * y_b;
        // Q = Q0 + Bₐ((P₁ − I) Bₐᵀ Q0 + P₂ B_⊥ᵀ).
        let moved = core_a * &v1 + core_perp * &v2 - &v1; // r_a × h
        let h = y_a.ncols().max(1) as f64;
        (column_dots(y_a, q0_yb) + column_dots(&u, &moved)) / h
    }

    /// The polar factor as a `d_a × d_b` matrix.
    pub fn materialize(
        &self,
        q0: faer::MatRef<'_, f32>,
        backend: &dyn Backend,
    ) -> Result<Mat<f32>> {
        let r_a = self.b_a.ncols();
        let g = backend.product(self.b_a.transpose(), q0)?; // r_a × d_b
        let inner = self.core.subcols(0, r_a) * &g
            + self.core.subcols(r_a, self.b_perp.ncols()) * self.b_perp.transpose()
            - &g;
        Ok(q0.to_owned() + backend.product(self.b_a.as_ref(), inner.as_ref())?)
    }
}

/// Gram eigenvalues below this fraction of the largest count as none in [`core_polar`]: an f64
/// Gram of a few thousand columns holds rounding of about 1e-13 of its largest.
const CORE_CUTOFF: f64 = 1e-12;

/// The polar factor of the core `C` (`r_a × (r_a + r_⊥)`, wide), and how many directions it
/// leaves out (next to nothing in `C`), wholly in f64. Its singular values run from the
/// evidence's down to the prior's weight w (about 1e-5 at 4096 wide, against evidence of 1e-2):
/// an f32 Gram squares that ratio below its own rounding, and a full refit's core has up to h
/// such directions (768), too many to complete one by one; left out, each kept refit sent that
/// many directions of the residual to zero, and the next layer's refit, starting from a map
/// that was not orthonormal, fell back to the full path. The core is small, so its Gram and the
/// products are f64.
fn core_polar(c: &Mat<f32>) -> Result<(Mat<f32>, usize)> {
    let c = Mat::<f64>::from_fn(c.nrows(), c.ncols(), |i, j| c[(i, j)] as f64);
    let gram = &c * c.transpose();
    let evd = gram
        .self_adjoint_eigen(faer::Side::Lower)
        .map_err(|e| Error::Numerical {
            context: "map: layer refit".into(),
            reason: format!("eigendecomposition of the refit's core Gram failed: {e:?}"),
        })?;
    let (u, lambda) = (evd.U(), evd.S().column_vector());
    let top = (0..lambda.nrows()).map(|i| lambda[i]).fold(0.0, f64::max);
    let bar = top * CORE_CUTOFF;
    let scaled = Mat::<f64>::from_fn(u.nrows(), u.ncols(), |i, j| {
        if lambda[j] > bar {
            u[(i, j)] / lambda[j].sqrt()
        } else {
            0.0
        }
    });
    let factor = scaled * (u.transpose() * &c);
    let dropped = (0..lambda.nrows()).filter(|&j| lambda[j] <= bar).count();
    Ok((
        Mat::from_fn(factor.nrows(), factor.ncols(), |i, j| factor[(i, j)] as f32),
        dropped,
    ))
}

/// `Σ_r ⟨x[:, r], y[:, r]⟩`.
pub(crate) fn column_dots(x: &Mat<f32>, y: &Mat<f32>) -> f64 {
    let mut s = 0.0;
    for r in 0..x.ncols() {
        s += x
            .col(r)
            .iter()
            .zip(y.col(r).iter())
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum::<f64>();
    }
    s
}

/// An orthonormal basis of the span of `x`'s columns, leaving out directions along which the
/// columns reach less than [`PERP_FLOOR`]: `x V Λ^{-1/2}` from the f64 eigendecomposition of
/// `xᵀx` (the columns' Gram, h × h).
fn orthonormal_span(x: &Mat<f32>) -> Result<Mat<f32>> {
    let x64 = Mat::<f64>::from_fn(x.nrows(), x.ncols(), |i, j| x[(i, j)] as f64);
    let gram = x64.transpose() * &x64;
    let evd = gram
        .self_adjoint_eigen(faer::Side::Lower)
        .map_err(|e| Error::Numerical {
            context: "map: layer refit".into(),
            reason: format!("eigendecomposition of the evidence's Gram matrix failed: {e:?}"),
        })?;
    let (v, lambda) = (evd.U(), evd.S().column_vector());
    let kept: Vec<usize> = (0..lambda.nrows())
        .filter(|&j| lambda[j] > PERP_FLOOR * PERP_FLOOR)
        .collect();
    let scaled = Mat::<f64>::from_fn(v.nrows(), kept.len(), |i, c| {
        v[(i, kept[c])] / lambda[kept[c]].sqrt()
    });
    let basis = x64 * scaled;
    Ok(Mat::from_fn(basis.nrows(), basis.ncols(), |i, j| {
        basis[(i, j)] as f32
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::linalg::max_abs_diff;
    use crate::linalg::philox::gaussian_matrix;

    #[test]
    fn the_factored_polar_factor_is_the_full_one() {
        let seed = crate::linalg::fresh_seed();
        let gaussian = |rows, cols, stream| gaussian_matrix(seed, stream, rows, cols);
        // w = 0.5 keeps the prior's singular values within a factor of ~20 of the evidence's;
        // w = 1e-4 puts them far under what an f32 Gram resolves (it loses the square of the
        // ratio), as the prior's weight 0.05/d does at real widths: the complement is kept, and
        // the core is resolved in f64, so the factor is whole either way. With h = 300 the core
        // has about 300 such directions, as a full refit (h = 768) has hundreds.
        for (d_a, d_b, h, w, stream) in [
            (40, 64, 12, 0.5f32, 0u64),
            (40, 64, 12, 1e-4, 10),
            (640, 700, 300, 1e-4, 20),
        ] {
            // Q0: orthonormal rows; the evidence partly inside Q0's range, partly outside.
            let q0 = gaussian(d_b, d_a, stream + 1)
                .qr()
                .compute_thin_Q()
                .transpose()
                .to_owned();
            let y_a = gaussian(d_a, h, stream + 2);
            let y_b = q0.transpose() * gaussian(d_a, h, stream + 3)
                + gaussian(d_b, h, stream + 4) * faer::Scale(0.5f32);
            let inv_h = 1.0 / h as f32;
            // The exact polar factor U Vᵀ, from the SVD of c formed in f64.
            let f64_of =
                |m: &Mat<f32>| Mat::<f64>::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] as f64);
            let c = f64_of(&q0) * faer::Scale(w as f64)
                + f64_of(&y_a) * f64_of(&y_b).transpose() * faer::Scale(inv_h as f64);
            let svd = c.thin_svd().unwrap();
            let exact = svd.U() * svd.V().transpose();
            let near = NearPolar::fit(q0.as_ref(), (&y_a, &y_b), w, inv_h, &CpuBackend).unwrap();
            let q = near.materialize(q0.as_ref(), &CpuBackend).unwrap();
            let exact =
                Mat::<f32>::from_fn(exact.nrows(), exact.ncols(), |i, j| exact[(i, j)] as f32);
            let err = max_abs_diff(&q, &exact);
            assert!(err < 2e-4, "w {w}: factored polar off by {err}");
            assert!(near.orthonormal(), "w {w}");
            // Held-out agreement without forming Q equals the one through it.
            let (x_a, x_b) = (gaussian(d_a, 7, stream + 5), gaussian(d_b, 7, stream + 6));
            let direct = column_dots(&x_a, &(&q * &x_b)) / 7.0;
            let factored = near.agreement((&x_a, &x_b), &(&q0 * &x_b));
            assert!((direct - factored).abs() < 1e-4, "{direct} vs {factored}");
        }
    }
}
