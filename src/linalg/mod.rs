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

/// That `a · b` fits into `out` (for the backends' products into a caller's buffer).
pub fn check_product_into(
    a: MatRef<'_, f32>,
    b: MatRef<'_, f32>,
    out: &faer::MatMut<'_, f32>,
) -> crate::error::Result<()> {
    if a.ncols() != b.nrows() || out.nrows() != a.nrows() || out.ncols() != b.ncols() {
        return Err(crate::error::Error::internal(format!(
            "product of a {}×{} and a {}×{} matrix into a {}×{} one",
            a.nrows(),
            a.ncols(),
            b.nrows(),
            b.ncols(),
            out.nrows(),
            out.ncols()
        )));
    }
    Ok(())
}

/// `out = a · b` on every core, checking the shapes (the output is the caller's buffer).
pub fn mm_into(
    a: MatRef<'_, f32>,
    b: MatRef<'_, f32>,
    out: faer::MatMut<'_, f32>,
) -> crate::error::Result<()> {
    check_product_into(a, b, &out)?;
    matmul(out, Accum::Replace, a, b, 1.0f32, Par::rayon(0));
    Ok(())
}

/// A matrix from row-major data (as safetensors store it), copied in cache-friendly blocks.
pub fn from_row_major(data: &[f32], rows: usize, cols: usize) -> Mat<f32> {
    MatRef::from_row_major_slice(data, rows, cols).to_owned()
}

/// A matrix kept in the row-major layout it was read in: products take it as a strided view,
/// so a weight is never copied into column-major order.
#[derive(Debug, Clone)]
pub struct RowMajor {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl RowMajor {
    pub fn view(&self) -> MatRef<'_, f32> {
        MatRef::from_row_major_slice(&self.data, self.rows, self.cols)
    }

    /// Row `i` as a slice.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    /// A copy of `m` in row-major order.
    pub fn from_mat(m: &Mat<f32>) -> Self {
        RowMajor {
            data: (0..m.nrows())
                .flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)]))
                .collect(),
            rows: m.nrows(),
            cols: m.ncols(),
        }
    }
}

/// `a · b`, sequential (parallelism is across matrices, so results do not depend on threads).
pub fn mm(a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> Mat<f32> {
    let mut out = Mat::zeros(a.nrows(), b.ncols());
    matmul(out.as_mut(), Accum::Replace, a, b, 1.0f32, Par::Seq);
    out
}
