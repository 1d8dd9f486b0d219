//! The transfer modes' contract, shared by every backend, the plan and the pipeline: which
//! modes exist, which shapes and bases each needs, the shape checks, and the measures of an
//! update (its norm, for `energy_kept`). The math of each mode is in docs/METHOD.md ("Transfer
//! modes"); the reference implementation is `backend::cpu::factors`, and the whole-update modes
//! are written once here against the [`Backend`](crate::backend::Backend) products so every
//! backend runs their heavy products itself.

pub mod rotate;

use crate::backend::{Basis, Factors};
use crate::error::{Error, Result};
use crate::linalg::mm;

/// How a module's adapter is carried over; `auto` is resolved before a transfer runs.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One mode for the pair: rotate for equal shapes, map across shapes, align when a
    /// vocabulary is missing, the two share too few tokens, a model has experts, or map cannot
    /// take an update of the adapter.
    // Chosen by `transfer::auto`. A plan built with `auto` itself, as `inspect` does, resolves
    // it unit by unit: `project` where shapes match, else `align`.
    Auto,
    /// B_t = B_s, A_t = A_s (same shape only).
    Copy,
    /// B_t = U_t U_tᵀ B_s, A_t = A_s V_t V_tᵀ (LoRA-X, same shape).
    Project,
    /// B_t = U_t U_sᵀ B_s, A_t = A_s V_s V_tᵀ (Cross-LoRA, any shape).
    Align,
    /// Like align, rotated by the polar factors of U_sᵀU_t and V_sᵀV_t (same shape).
    Procrustes,
    /// ΔW_t = R_U ΔW_s R_Vᵀ, R the direct rotation taking span(U_s) onto span(U_t): keeps the
    /// whole update (same shape).
    Rotate,
    /// Through a map between the two models built from their weights: residual stream from
    /// the shared tokens' embeddings, norm gains folded, heads and neurons matched (any shapes
    /// and tokenizers).
    Map,
    /// Nearest-index resampling of B's rows and A's columns (naive baseline, any shape).
    Resample,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Copy => "copy",
            Mode::Project => "project",
            Mode::Align => "align",
            Mode::Procrustes => "procrustes",
            Mode::Rotate => "rotate",
            Mode::Map => "map",
            Mode::Resample => "resample",
        }
    }

    /// True when the mode needs both matrices to have the same shape.
    pub fn needs_same_shape(self) -> bool {
        matches!(
            self,
            Mode::Copy | Mode::Project | Mode::Procrustes | Mode::Rotate
        )
    }

    /// Which bases the factors need: (source, target).
    pub fn needs_bases(self) -> (bool, bool) {
        match self {
            Mode::Project => (false, true),
            Mode::Align | Mode::Procrustes | Mode::Rotate => (true, true),
            Mode::Auto | Mode::Copy | Mode::Map | Mode::Resample => (false, false),
        }
    }
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

/// Nearest-index resampling of `len` source positions onto `new_len` target positions.
pub fn nearest_index(j: usize, len: usize, new_len: usize) -> usize {
    if new_len <= 1 || len <= 1 {
        return 0;
    }
    ((j as f64) * (len - 1) as f64 / (new_len - 1) as f64).round() as usize
}

/// A shape the caller should have checked: a failure is a wiring mistake, not bad input.
pub fn check(cond: bool, what: &str) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::Internal(format!("transfer: shape mismatch: {what}")))
    }
}

/// The basis a mode needs, or an internal error if the pipeline did not compute it.
pub fn need<'b>(b: Option<&'b Basis>, mode: Mode, which: &str) -> Result<&'b Basis> {
    b.ok_or_else(|| {
        Error::Internal(format!(
            "transfer: {} mode needs the {which} basis",
            mode.name()
        ))
    })
}

/// The source and target bases of a same-shape mode that needs both, after checking that they
/// match the adapter and each other.
pub fn same_shape_bases<'b>(
    mode: Mode,
    src: &Factors,
    bs: Option<&'b Basis>,
    bt: Option<&'b Basis>,
    target_shape: (usize, usize),
) -> Result<(&'b Basis, &'b Basis)> {
    let (m_s, n_s) = (src.b.nrows(), src.a.ncols());
    let (s, t) = (need(bs, mode, "source")?, need(bt, mode, "target")?);
    check(
        (m_s, n_s) == target_shape,
        &format!("{} needs equal shapes", mode.name()),
    )?;
    check(
        s.u.nrows() == m_s && s.v.nrows() == n_s && t.u.nrows() == m_s && t.v.nrows() == n_s,
        "bases vs adapter",
    )?;
    check(
        s.u.ncols() == t.u.ncols() && s.v.ncols() == t.v.ncols(),
        "bases of equal rank",
    )?;
    Ok((s, t))
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
