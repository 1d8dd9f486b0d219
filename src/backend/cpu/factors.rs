//! The transfer modes (docs/METHOD.md, "Transfer modes") in factored form: no `m × n` matrix is
//! ever formed and the rank of the adapter stays r. Every product here is `(big × k)·(k × r)` or smaller.

use faer::{Mat, MatRef};

use crate::backend::{Basis, Factors};
use crate::error::{Error, Result};
use crate::linalg::mm;
use crate::modes::{check, nearest_index, same_shape_bases, subspace_bases, Mode};

/// `‖Xᵀ Y‖_F² / k` (k = columns): the mean squared cosine of the principal angles.
pub fn similarity(x: MatRef<'_, f32>, y: MatRef<'_, f32>) -> f32 {
    let k = x.ncols().min(y.ncols());
    if k == 0 || x.nrows() != y.nrows() {
        return f32::NAN;
    }
    let c = mm(x.transpose(), y);
    let sum: f64 = (0..c.ncols())
        .flat_map(|j| {
            c.col(j)
                .iter()
                .map(|&v| (v as f64) * (v as f64))
                .collect::<Vec<_>>()
        })
        .sum();
    // Rounding can push a full-rank overlap a few ulps past 1; the quantity itself lies in [0, 1].
    (sum / k as f64).clamp(0.0, 1.0) as f32
}

/// The orthogonal polar factor X Yᵀ of `m` (from m = X Σ Yᵀ): the rotation nearest to `m`.
pub fn polar(m: MatRef<'_, f32>) -> Result<Mat<f32>> {
    super::rsvd::sequential_faer();
    let svd = m.thin_svd().map_err(|e| Error::Numerical {
        context: "procrustes".into(),
        reason: format!("SVD of U_sᵀU_t did not converge: {e:?}"),
    })?;
    Ok(mm(svd.U(), svd.V().transpose()))
}

/// The target factors of `mode` for a target of shape `(out, in)`.
pub fn transfer(
    mode: Mode,
    src: &Factors,
    bs: Option<&Basis>,
    bt: Option<&Basis>,
    target_shape: (usize, usize),
) -> Result<Factors> {
    let (m_t, n_t) = target_shape;
    let (m_s, n_s) = (src.b.nrows(), src.a.ncols());
    match mode {
        Mode::Auto => Err(Error::internal(
            "transfer: mode auto must be resolved before the transfer",
        )),
        Mode::Copy => {
            check((m_s, n_s) == (m_t, n_t), "copy needs equal shapes")?;
            Ok(src.clone())
        }
        Mode::Project | Mode::Align => {
            let (x, y) = subspace_bases(mode, src, bs, bt, target_shape)?;
            // B_t = U_x (U_yᵀ B_s),  A_t = (A_s V_y) V_xᵀ
            let b = mm(x.u.as_ref(), mm(y.u.transpose(), src.b.as_ref()).as_ref());
            let a = mm(mm(src.a.as_ref(), y.v.as_ref()).as_ref(), x.v.transpose());
            Ok(Factors { b, a })
        }
        Mode::Procrustes => {
            let (s, t) = same_shape_bases(mode, src, bs, bt, target_shape)?;
            let o_u = polar(mm(s.u.transpose(), t.u.as_ref()).as_ref())?;
            let o_v = polar(mm(s.v.transpose(), t.v.as_ref()).as_ref())?;
            // B_t = U_t O_uᵀ (U_sᵀ B_s),  A_t = (A_s V_s) O_v V_tᵀ
            let core_b = mm(
                o_u.transpose(),
                mm(s.u.transpose(), src.b.as_ref()).as_ref(),
            );
            let b = mm(t.u.as_ref(), core_b.as_ref());
            let core_a = mm(mm(src.a.as_ref(), s.v.as_ref()).as_ref(), o_v.as_ref());
            let a = mm(core_a.as_ref(), t.v.transpose());
            Ok(Factors { b, a })
        }
        Mode::Rotate => {
            crate::modes::rotate::transfer(&super::CpuBackend, src, bs, bt, target_shape)
        }
        Mode::Map => Err(Error::internal(
            "transfer: map mode runs through the model map, not a backend product",
        )),
        Mode::Resample => {
            let r = src.a.nrows();
            let b = Mat::from_fn(m_t, r, |i, j| src.b[(nearest_index(i, m_s, m_t), j)]);
            let a = Mat::from_fn(r, n_t, |i, j| src.a[(i, nearest_index(j, n_s, n_t))]);
            Ok(Factors { b, a })
        }
    }
}
