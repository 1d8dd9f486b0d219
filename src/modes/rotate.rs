//! `rotate`: ΔW_t = R_U ΔW_s R_Vᵀ, where R_U is the direct rotation taking span(U_s) onto
//! span(U_t) — the rotation that turns each source principal vector into its target partner
//! inside the plane the two span, and is the identity on everything orthogonal to both
//! subspaces (Davis & Kahan's direct rotation). It is orthogonal, so the whole update is kept
//! (‖ΔW_t‖ = ‖ΔW_s‖); it is the identity when the subspaces agree, so it equals `copy` then;
//! and it depends only on the two subspaces, not on the signs or order of singular vectors.
//!
//! With `U_sᵀU_t = X cos Θ Yᵀ` (C = cos Θ), principal vectors `a_i = U_s x_i`, `b_i = U_t y_i` and
//! `d_i = b_i − c_i a_i` (= sin θ_i · e_i, e_i the unit vector completing the plane),
//!
//! `R = I + Σ_i (c_i − 1)(a_i a_iᵀ + e_i e_iᵀ) + sin θ_i (e_i a_iᵀ − a_i e_iᵀ)`.
//!
//! Applied to an `m × r` matrix M, with α = XᵀU_sᵀM and δ = YᵀU_tᵀM − Cα (= DᵀM), this is
//!
//! `R M = M + U_s X (M₁ − C M₂) + U_t Y M₂`,  `M₁ = (C − I)α − δ`,  `M₂ = α − (I + C)⁻¹ δ`,
//!
//! using `(c − 1)/sin²θ = −1/(1 + c)`: no division by sin θ, so nearly equal subspaces (tiny
//! angles, whose e_i would be rounding noise) need no special case. The heavy products
//! (U_sᵀU_t, UᵀM and the final combination) go through the backend; the k × k steps stay here,
//! in f64.

use faer::{Mat, MatRef};

use super::{same_shape_bases, Mode};
use crate::backend::{Backend, Basis, Factors, Side};
use crate::error::{Error, Result};

/// The target factors: `B_t = R_U B_s`, `A_t = A_s R_Vᵀ` (so `A_tᵀ = R_V A_sᵀ`).
pub fn transfer(
    backend: &dyn Backend,
    src: &Factors,
    bs: Option<&Basis>,
    bt: Option<&Basis>,
    target_shape: (usize, usize),
) -> Result<Factors> {
    let (s, t) = same_shape_bases(Mode::Rotate, src, bs, bt, target_shape)?;
    let b = rotate(backend, s, t, Side::U, src.b.as_ref())?;
    let a_t = rotate(backend, s, t, Side::V, src.a.transpose())?;
    Ok(Factors {
        b,
        a: a_t.transpose().to_owned(),
    })
}

/// `R M` for the direct rotation from `s`'s subspace onto `t`'s on one side.
pub fn rotate(
    backend: &dyn Backend,
    s: &Basis,
    t: &Basis,
    side: Side,
    m: MatRef<'_, f32>,
) -> Result<Mat<f32>> {
    let overlap = backend.basis_t_mul(s, side, t.side(side))?;
    let p = backend.basis_t_mul(s, side, m)?;
    let q = backend.basis_t_mul(t, side, m)?;
    let (g_s, g_t) = rotation_coefficients(overlap.as_ref(), p.as_ref(), q.as_ref())?;
    backend.basis_mul_add(m, s, g_s.as_ref(), t, g_t.as_ref(), side)
}

/// The k × r coefficients (G_s, G_t) of `R M = M + U_s G_s + U_t G_t`, from the overlap
/// `U_sᵀU_t` (k × k), `P = U_sᵀM` and `Q = U_tᵀM` (k × r).
pub fn rotation_coefficients(
    overlap: MatRef<'_, f32>,
    p: MatRef<'_, f32>,
    q: MatRef<'_, f32>,
) -> Result<(Mat<f32>, Mat<f32>)> {
    let k = overlap.nrows();
    let r = p.ncols();
    let o = Mat::<f64>::from_fn(k, overlap.ncols(), |i, j| overlap[(i, j)] as f64);
    let svd = o.thin_svd().map_err(|e| Error::Numerical {
        context: "rotate".into(),
        reason: format!("SVD of U_sᵀU_t did not converge: {e:?}"),
    })?;
    crate::linalg::clear_upper_registers();
    let (x, y) = (svd.U(), svd.V());
    // Cosines of the principal angles; rounding can push one a hair past 1.
    let c: Vec<f64> = (0..k)
        .map(|i| svd.S().column_vector()[i].clamp(0.0, 1.0))
        .collect();
    let p64 = Mat::<f64>::from_fn(k, r, |i, j| p[(i, j)] as f64);
    let q64 = Mat::<f64>::from_fn(k, r, |i, j| q[(i, j)] as f64);
    let alpha = x.transpose() * &p64;
    let mut delta = y.transpose() * &q64;
    let mut m1 = Mat::<f64>::zeros(k, r);
    let mut m2 = Mat::<f64>::zeros(k, r);
    for i in 0..k {
        for j in 0..r {
            delta[(i, j)] -= c[i] * alpha[(i, j)];
            m1[(i, j)] = (c[i] - 1.0) * alpha[(i, j)] - delta[(i, j)];
            m2[(i, j)] = alpha[(i, j)] - delta[(i, j)] / (1.0 + c[i]);
        }
    }
    let mut inner_s = m1;
    for i in 0..k {
        for j in 0..r {
            inner_s[(i, j)] -= c[i] * m2[(i, j)];
        }
    }
    let g_s = x * &inner_s;
    let g_t = y * &m2;
    let to_f32 = |g: &Mat<f64>| Mat::<f32>::from_fn(g.nrows(), g.ncols(), |i, j| g[(i, j)] as f32);
    Ok((to_f32(&g_s), to_f32(&g_t)))
}
