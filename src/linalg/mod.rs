//! Backend-independent numerical building blocks.

pub mod philox;

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

/// `a · b`, sequential (parallelism is across matrices, so results do not depend on threads).
pub fn mm(a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> Mat<f32> {
    let mut out = Mat::zeros(a.nrows(), b.ncols());
    matmul(out.as_mut(), Accum::Replace, a, b, 1.0f32, Par::Seq);
    out
}
