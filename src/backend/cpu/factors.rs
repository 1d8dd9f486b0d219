//! The transfer modes of DESIGN.md §2.4 in factored form: no `m × n` matrix is ever formed and
//! the rank of the adapter stays r. Every product here is `(big × k)·(k × r)` or smaller.

use faer::{Mat, MatRef};

use super::rsvd::mm;
use crate::backend::{Basis, Factors, Mode};
use crate::error::{Error, Result};

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

/// ‖s·B·A‖_F / s = sqrt(Σ (BᵀB) ∘ (AAᵀ)), from two r × r Gram matrices.
pub fn update_norm(f: &Factors) -> f64 {
    let gb = mm(f.b.transpose(), f.b.as_ref());
    let ga = mm(f.a.as_ref(), f.a.transpose());
    let mut sum = 0f64;
    for j in 0..gb.ncols() {
        for i in 0..gb.nrows() {
            sum += gb[(i, j)] as f64 * ga[(i, j)] as f64;
        }
    }
    sum.max(0.0).sqrt()
}

fn check(cond: bool, what: &str) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::Internal(format!("transfer: shape mismatch: {what}")))
    }
}

/// Nearest-index resampling of `len` source positions onto `new_len` target positions.
pub fn nearest_index(j: usize, len: usize, new_len: usize) -> usize {
    if new_len <= 1 || len <= 1 {
        return 0;
    }
    ((j as f64) * (len - 1) as f64 / (new_len - 1) as f64).round() as usize
}

fn need<'b>(b: Option<&'b Basis>, mode: Mode, which: &str) -> Result<&'b Basis> {
    b.ok_or_else(|| {
        Error::Internal(format!(
            "transfer: {} mode needs the {which} basis",
            mode.name()
        ))
    })
}

/// For `project` and `align`, which are both `B_t = U_x U_yᵀ B_s`, `A_t = A_s V_y V_xᵀ`: the
/// bases (x, y) after checking every shape — (target, target) for project, (target, source)
/// for align. Every backend computes these two modes from this.
pub fn subspace_bases<'b>(
    mode: Mode,
    src: &Factors,
    bs: Option<&'b Basis>,
    bt: Option<&'b Basis>,
    target_shape: (usize, usize),
) -> Result<(&'b Basis, &'b Basis)> {
    let (m_t, n_t) = target_shape;
    let (m_s, n_s) = (src.b.nrows(), src.a.ncols());
    match mode {
        Mode::Project => {
            let t = need(bt, mode, "target")?;
            check(
                t.u.nrows() == m_s && t.v.nrows() == n_s && (m_s, n_s) == (m_t, n_t),
                "project needs equal shapes",
            )?;
            Ok((t, t))
        }
        Mode::Align => {
            let (s, t) = (need(bs, mode, "source")?, need(bt, mode, "target")?);
            check(
                s.u.nrows() == m_s && s.v.nrows() == n_s,
                "source basis vs adapter",
            )?;
            check(
                t.u.nrows() == m_t && t.v.nrows() == n_t,
                "target basis vs target shape",
            )?;
            check(s.u.ncols() == t.u.ncols(), "bases of equal rank")?;
            Ok((t, s))
        }
        _ => Err(Error::Internal(format!(
            "transfer: {} is not a subspace product",
            mode.name()
        ))),
    }
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
            let (s, t) = (need(bs, mode, "source")?, need(bt, mode, "target")?);
            check((m_s, n_s) == (m_t, n_t), "procrustes needs equal shapes")?;
            check(s.u.ncols() == t.u.ncols(), "bases of equal rank")?;
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
        Mode::Resample => {
            let r = src.a.nrows();
            let b = Mat::from_fn(m_t, r, |i, j| src.b[(nearest_index(i, m_s, m_t), j)]);
            let a = Mat::from_fn(r, n_t, |i, j| src.a[(i, nearest_index(j, n_s, n_t))]);
            Ok(Factors { b, a })
        }
    }
}
