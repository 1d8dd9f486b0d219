//! A weight as the checkpoint stores it (bf16, f16 or f32 bytes, row-major), read where it lies:
//! the map mode holds a layer's fourteen projection weights (seven per model) while it builds
//! that layer's map, and as f32 copies they are 6.8 GB at Llama-3.1-70B widths. Borrowed from a
//! memory-mapped safetensors file they cost no anonymous memory at all; the products decode them
//! a band of rows at a time ([`crate::backend::cpu::rsvd::Bands`]), and a GGUF's quantized ones
//! are dequantized the same way, a band or a row at a time as they are read.

use std::ops::Range;

use faer::{Mat, MatRef};
use rayon::prelude::*;

use crate::backend::cpu::rsvd::{Bands, Rows, BAND_ELEMENTS, MIN_BAND_ROWS};
use crate::io::gguf::QuantizedRows;
use crate::io::safetensors::{decode_into, encode_f32, FloatType};
use crate::io::RawBytes;

/// Bands summed into one partial result of `Wᵀ·X` by one task: the partials (`cols × l` each)
/// are few enough to hold at once, and the grouping depends on the shape alone, so the sum does
/// not depend on the thread count.
const BANDS_PER_PARTIAL: usize = 8;

/// A row-major `rows × cols` matrix as stored: little-endian values of type `ty`, or a GGUF's
/// quantized tensor, decoded a band (or a row) at a time as it is read.
#[derive(Debug, Clone)]
pub struct Stored<'a> {
    data: Data<'a>,
    rows: usize,
    cols: usize,
}

#[derive(Debug, Clone)]
enum Data<'a> {
    Bytes(RawBytes<'a>, FloatType),
    Decoded(QuantizedRows<'a>),
}

impl<'a> Stored<'a> {
    /// `bytes` must hold exactly `rows × cols` values of `ty`.
    pub fn new(bytes: impl Into<RawBytes<'a>>, ty: FloatType, rows: usize, cols: usize) -> Self {
        let bytes = bytes.into();
        assert_eq!(bytes.len(), rows * cols * ty.size(), "stored matrix size");
        Stored {
            data: Data::Bytes(bytes, ty),
            rows,
            cols,
        }
    }

    /// A quantized tensor's rows, decoded as they are read.
    pub fn decoded(rows: QuantizedRows<'a>) -> Self {
        let (r, c) = rows.shape();
        Stored {
            data: Data::Decoded(rows),
            rows: r,
            cols: c,
        }
    }

    /// `m` stored as `ty` (rounded to nearest even), for tests and small matrices.
    pub fn from_mat(m: MatRef<'_, f32>, ty: FloatType) -> Stored<'static> {
        let values: Vec<f32> = (0..m.nrows())
            .flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)]))
            .collect();
        Stored::new(
            RawBytes::Owned(encode_f32(&values, ty)),
            ty,
            m.nrows(),
            m.ncols(),
        )
    }

    pub fn nrows(&self) -> usize {
        self.rows
    }

    pub fn ncols(&self) -> usize {
        self.cols
    }

    /// The bytes and their type, as stored (what a device uploads); a quantized tensor's
    /// decoded whole, as f32.
    pub fn raw(&self) -> (RawBytes<'_>, FloatType) {
        match &self.data {
            Data::Bytes(bytes, ty) => (RawBytes::Borrowed(bytes), *ty),
            Data::Decoded(q) => (RawBytes::Decoded(q.decode_all()), FloatType::F32),
        }
    }

    /// Columns `c` of row `i`, decoded into `out` (`c.len()` values).
    pub fn row_part_into(&self, i: usize, c: Range<usize>, out: &mut [f32]) {
        match &self.data {
            Data::Bytes(bytes, ty) => {
                let size = ty.size();
                let at = (i * self.cols + c.start) * size;
                decode_into(&bytes[at..at + c.len() * size], *ty, out);
            }
            Data::Decoded(q) => q.decode_part(i, c, out),
        }
    }

    /// Row `i`, decoded into `out` (`cols` values).
    pub fn row_into(&self, i: usize, out: &mut [f32]) {
        self.row_part_into(i, 0..self.cols, out);
    }

    /// Rows `r` as the banded products read them.
    fn rows_of(&self, r: Range<usize>) -> Rows<'_> {
        match &self.data {
            Data::Bytes(bytes, ty) => {
                let width = self.cols * ty.size();
                Rows::Stored {
                    bytes: &bytes[r.start * width..r.end * width],
                    ty: *ty,
                    rows: r.len(),
                    cols: self.cols,
                }
            }
            Data::Decoded(q) => Rows::Decoded(q.subrows(r)),
        }
    }

    /// The whole matrix in f32: the dense reference of the tests.
    #[cfg(test)]
    pub fn to_mat(&self) -> Mat<f32> {
        let mut row = vec![0f32; self.cols];
        let mut out = Mat::zeros(self.rows, self.cols);
        for i in 0..self.rows {
            self.row_into(i, &mut row);
            for (j, &v) in row.iter().enumerate() {
                out[(i, j)] = v;
            }
        }
        out
    }

    /// The row ranges of the bands, as the CPU decomposition cuts them (they depend on the
    /// shape alone).
    fn bands(&self) -> Vec<Range<usize>> {
        self.rows_of(0..self.rows)
            .bands(BAND_ELEMENTS, MIN_BAND_ROWS)
            .collect()
    }

    /// `W·X` on every core: each band of rows decoded and multiplied by one task.
    pub fn mul(&self, x: MatRef<'_, f32>) -> Mat<f32> {
        assert_eq!(x.nrows(), self.cols, "W·X shapes");
        let bands = self.bands();
        let parts: Vec<Mat<f32>> = bands
            .par_iter()
            .map(|r| Bands::new(self.rows_of(r.clone())).mul(x))
            .collect();
        let mut out = Mat::zeros(self.rows, x.ncols());
        for (r, part) in bands.iter().zip(&parts) {
            out.as_mut().subrows_mut(r.start, r.len()).copy_from(part);
        }
        out
    }

    /// `Wᵀ·X` on every core: groups of [`BANDS_PER_PARTIAL`] bands summed by one task each,
    /// the partials then summed in order.
    pub fn mul_t(&self, x: MatRef<'_, f32>) -> Mat<f32> {
        assert_eq!(x.nrows(), self.rows, "Wᵀ·X shapes");
        let groups: Vec<Range<usize>> = self
            .bands()
            .chunks(BANDS_PER_PARTIAL)
            .map(|g| g[0].start..g[g.len() - 1].end)
            .collect();
        let parts: Vec<Mat<f32>> = groups
            .par_iter()
            .map(|r| Bands::new(self.rows_of(r.clone())).mul_t(x.subrows(r.start, r.len())))
            .collect();
        let mut parts = parts.into_iter();
        let mut out = parts
            .next()
            .unwrap_or_else(|| Mat::zeros(self.cols, x.ncols()));
        for part in parts {
            out += part;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::max_abs_diff;
    use crate::linalg::philox::gaussian_matrix;

    /// The parallel banded products equal the dense ones on the decoded matrix (4 bands at
    /// 1100 × 3000; 11 bands in two partials at 2600 × 4096), for every stored type, and a
    /// matrix's rows and row parts read back as stored.
    #[test]
    fn stored_products_match_dense_products() {
        let seed = crate::linalg::fresh_seed();
        for (rows, cols, ty) in [
            (1100, 3000, FloatType::Bf16),
            (1100, 3000, FloatType::F16),
            (37, 51, FloatType::F32),
            (2600, 4096, FloatType::Bf16),
        ] {
            let m = gaussian_matrix(seed, 1, rows, cols);
            let w = Stored::from_mat(m.as_ref(), ty);
            let dense = w.to_mat();
            let err = max_abs_diff(&dense, &m);
            let rounding = if ty == FloatType::F32 { 0.0 } else { 0.01 };
            assert!(err <= rounding * m.norm_max(), "{ty:?} decode {err}");
            let (x, y) = (
                gaussian_matrix(seed, 2, cols, 17),
                gaussian_matrix(seed, 3, rows, 9),
            );
            let close = |got: &Mat<f32>, want: &Mat<f32>| {
                let e = max_abs_diff(got, want) / want.norm_max();
                assert!(e < 1e-5, "{rows}×{cols} {ty:?}: {e}");
            };
            close(&w.mul(x.as_ref()), &(&dense * &x));
            close(&w.mul_t(y.as_ref()), &(dense.transpose() * &y));
            let mut row = vec![0f32; cols];
            w.row_into(rows - 1, &mut row);
            assert!((0..cols).all(|j| row[j] == dense[(rows - 1, j)]));
            let mut part = vec![0f32; 5];
            w.row_part_into(2, 7..12, &mut part);
            assert!((0..5).all(|j| part[j] == dense[(2, 7 + j)]));
        }
    }

    /// A quantized tensor decoded as read gives what its decoded values stored as bytes give:
    /// the same rows, row parts and products, bit for bit (BF16 through the GGUF decoder here,
    /// whose values are the same).
    #[test]
    fn decoded_rows_read_as_their_bytes() {
        let seed = crate::linalg::fresh_seed();
        let (rows, cols) = (1100, 3000);
        let bytes = Stored::from_mat(
            gaussian_matrix(seed, 1, rows, cols).as_ref(),
            FloatType::Bf16,
        );
        let (raw, _) = bytes.raw();
        let decoded = Stored::decoded(QuantizedRows::new(
            &raw,
            crate::io::gguf::quant::GgmlType::Bf16,
            (rows, cols),
            0..rows,
            (None, None),
            crate::io::gguf::Values::AsIs,
        ));
        let (x, y) = (
            gaussian_matrix(seed, 2, cols, 17),
            gaussian_matrix(seed, 3, rows, 9),
        );
        assert!(bytes.mul(x.as_ref()) == decoded.mul(x.as_ref()));
        assert!(bytes.mul_t(y.as_ref()) == decoded.mul_t(y.as_ref()));
        let (mut a, mut b) = (vec![0f32; 300], vec![0f32; 300]);
        bytes.row_part_into(1000, 2500..2800, &mut a);
        decoded.row_part_into(1000, 2500..2800, &mut b);
        assert_eq!(a, b);
        // What a device uploads: the values, as f32.
        let (whole, ty) = decoded.raw();
        assert_eq!(ty, FloatType::F32);
        use crate::io::safetensors::decode_f32;
        assert_eq!(decode_f32(&whole, ty), decode_f32(&raw, FloatType::Bf16));
    }

    /// Results depend on the shape alone: the same bits on one thread and on four.
    #[test]
    fn stored_products_do_not_depend_on_the_thread_count() {
        // 11 bands, two partials.
        let w = Stored::from_mat(gaussian_matrix(5, 1, 2600, 4096).as_ref(), FloatType::Bf16);
        let y = gaussian_matrix(5, 2, 2600, 8);
        let on = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| w.mul_t(y.as_ref()))
        };
        let (one, four) = (on(1), on(4));
        assert!((0..4096).all(|i| (0..8).all(|j| one[(i, j)].to_bits() == four[(i, j)].to_bits())));
    }
}
