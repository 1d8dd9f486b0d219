//! Backend-independent numerical building blocks.

pub mod philox;

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

/// `a · b` on all cores: for the few large products outside the per-matrix work (the map mode's
/// fits and similarity matrices), which run one at a time.
pub fn mm_parallel(a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> Mat<f32> {
    let mut out = Mat::zeros(a.nrows(), b.ncols());
    matmul(out.as_mut(), Accum::Replace, a, b, 1.0f32, Par::rayon(0));
    out
}

/// `a · b`, sequential (parallelism is across matrices, so results do not depend on threads).
pub fn mm(a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> Mat<f32> {
    let mut out = Mat::zeros(a.nrows(), b.ncols());
    matmul(out.as_mut(), Accum::Replace, a, b, 1.0f32, Par::Seq);
    out
}
