//! Randomized truncated SVD on the CPU (Halko, Martinsson & Tropp 2011: Alg. 4.4, subspace
//! iteration, then Alg. 5.1, direct SVD of the core). The reference every other backend is
//! checked against: LU-normalized bases inside the power iterations, Householder QR for the final
//! basis, faer's SVD for the small core.
//! Everything runs sequentially inside one matrix (`Par::Seq`) so results do not depend on the
//! number of threads; parallelism is across matrices.
//!
//! The products with W read it a band of rows at a time ([`Bands`]): a weight stored in 16 bits
//! is decoded band by band into one reused buffer, never whole, so a decomposition holds one band
//! of W in f32 ([`BAND_ELEMENTS`] values, or [`MIN_BAND_ROWS`] rows of a very wide weight)
//! whatever the matrix (a 70B model's MLP weight would be 940 MB).

use std::ops::Range;

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

use crate::backend::{Basis, RawWeight, SvdParams, Weight};
use crate::error::{Error, Result};
use crate::io::gguf::QuantizedRows;
use crate::io::safetensors::{decode_into, FloatType};
use crate::linalg::{clear_upper_registers, mm, philox};
use crate::timing::{Phase, Timings};

/// The f32 values of W a band holds (4 MiB), unless a band of [`MIN_BAND_ROWS`] rows is wider.
/// Measured on Llama-3.1-8B shapes (2 threads, k = 256): bands of 2^20 values ran the products
/// as fast as the whole f32 copy did (the band is decoded into cache and read from there, where
/// the whole copy streamed from memory), with a third of the memory; bands of 2^24 were 5–10 %
/// slower. A weight that fits one band is decoded once for all its products.
pub const BAND_ELEMENTS: usize = 1 << 20;

/// The fewest rows of a band: Wᵀ·X adds each band's product into the whole `n × l` result, so
/// bands must be tall enough that this costs little next to the product (l/h of it).
pub const MIN_BAND_ROWS: usize = 256;

/// A weight's rows as the products read them, a band at a time. The bands depend only on the
/// shape, so a weight gives the same result however it is stored.
#[derive(Debug, Clone, Copy)]
pub enum Rows<'a> {
    /// Already f32, row-major: a band is a view.
    F32(MatRef<'a, f32>),
    /// As stored (little-endian bf16/f16/f32, row-major `rows × cols`): a band is decoded into
    /// a buffer every band reuses.
    Stored {
        bytes: &'a [u8],
        ty: FloatType,
        rows: usize,
        cols: usize,
    },
    /// A GGUF tensor decoded as read: a band is decoded into the same buffer.
    Decoded(QuantizedRows<'a>),
}

impl Rows<'_> {
    pub fn shape(&self) -> (usize, usize) {
        match *self {
            Rows::F32(w) => (w.nrows(), w.ncols()),
            Rows::Stored { rows, cols, .. } => (rows, cols),
            Rows::Decoded(q) => q.shape(),
        }
    }

    /// The row ranges of the bands, in order: as few as hold at most `budget` values each, but
    /// at least `min_rows` rows ([`BAND_ELEMENTS`], [`MIN_BAND_ROWS`] outside tests), of equal
    /// height (no thin last band).
    pub fn bands(&self, budget: usize, min_rows: usize) -> impl Iterator<Item = Range<usize>> {
        let (m, n) = self.shape();
        let height = (budget / n.max(1)).max(min_rows).max(1);
        let count = m.div_ceil(height).max(1);
        let step = m.div_ceil(count).max(1);
        (0..m).step_by(step).map(move |r| r..(r + step).min(m))
    }
}

/// A weight of at most this many band budgets is decoded whole, once, and its bands are views
/// of that copy (16 MiB at most): a two-band weight (an MoE expert's 768 × 2048) was otherwise
/// decoded again, both bands, for each of the decomposition's products — 8.5 % of a
/// Qwen3-30B-A3B layer's transfer. The bands, and so the results, are the same.
const WHOLE_BANDS: usize = 4;

/// The products with a weight, read band by band through one buffer, which keeps the last
/// decoded band (so a one-band weight is decoded once), or the whole weight where it is small
/// ([`WHOLE_BANDS`]).
pub struct Bands<'a> {
    rows: Rows<'a>,
    /// Values and fewest rows of a band.
    budget: (usize, usize),
    buf: Vec<f32>,
    held: Option<Range<usize>>,
}

impl<'a> Bands<'a> {
    pub fn new(rows: Rows<'a>) -> Self {
        Self::with_budget(rows, (BAND_ELEMENTS, MIN_BAND_ROWS))
    }

    /// Bands of `budget` (values, fewest rows): tests use small ones to get several bands
    /// cheaply.
    fn with_budget(rows: Rows<'a>, budget: (usize, usize)) -> Self {
        Bands {
            rows,
            budget,
            buf: Vec::new(),
            held: None,
        }
    }

    /// The rows `r` as f32: a view of the weight, or of the buffer after decoding into it.
    fn band(&mut self, r: Range<usize>) -> MatRef<'_, f32> {
        if let Rows::F32(w) = self.rows {
            return w.subrows(r.start, r.len());
        }
        let (rows, cols) = self.rows.shape();
        // The rows decoded: the band, or the whole weight where it is small.
        let whole = rows * cols <= WHOLE_BANDS * self.budget.0;
        let decoded = if whole { 0..rows } else { r.clone() };
        let len = decoded.len() * cols;
        if self.held.as_ref() != Some(&decoded) {
            self.buf.resize(len, 0.0);
            let buf = &mut self.buf[..len];
            match self.rows {
                Rows::Stored { bytes, ty, .. } => {
                    let at = decoded.start * cols * ty.size();
                    decode_into(&bytes[at..at + len * ty.size()], ty, buf);
                }
                Rows::Decoded(q) => q.decode(decoded.clone(), buf),
                Rows::F32(_) => unreachable!("a view, returned above"),
            }
            self.held = Some(decoded.clone());
        }
        let at = (r.start - decoded.start) * cols;
        MatRef::from_row_major_slice(&self.buf[at..at + r.len() * cols], r.len(), cols)
    }

    /// W·X, band by band into the rows of the product.
    pub fn mul(&mut self, x: MatRef<'_, f32>) -> Mat<f32> {
        let mut out = Mat::zeros(self.rows.shape().0, x.ncols());
        for r in self.rows.bands(self.budget.0, self.budget.1) {
            let (start, len) = (r.start, r.len());
            let dst = out.as_mut().subrows_mut(start, len);
            matmul(dst, Accum::Replace, self.band(r), x, 1.0f32, Par::Seq);
            clear_upper_registers();
        }
        out
    }

    /// Wᵀ·X, the bands' contributions summed in band order.
    pub fn mul_t(&mut self, x: MatRef<'_, f32>) -> Mat<f32> {
        let mut out = Mat::zeros(self.rows.shape().1, x.ncols());
        for (i, r) in self.rows.bands(self.budget.0, self.budget.1).enumerate() {
            let part = x.subrows(r.start, r.len());
            let accum = if i == 0 { Accum::Replace } else { Accum::Add };
            matmul(
                out.as_mut(),
                accum,
                self.band(r).transpose(),
                part,
                1.0f32,
                Par::Seq,
            );
            clear_upper_registers();
        }
        out
    }
}

/// Makes faer's decompositions (QR, SVD) run on the calling thread. Parallelism is across
/// matrices; inside one, a fixed sequential order keeps results independent of the thread count.
pub fn sequential_faer() {
    faer::set_global_parallelism(Par::Seq);
}

/// An orthonormal basis of the column space of `y` (thin Householder QR; robust to rank deficiency).
pub fn orthonormalize(y: MatRef<'_, f32>) -> Mat<f32> {
    let q = y.qr().compute_thin_Q();
    clear_upper_registers();
    q
}

/// A basis of the column space of `y` from its partially pivoted LU factorization (`y = PᵀLU`,
/// basis `PᵀL`): five times cheaper than Householder QR here, and as good for the intermediate
/// steps of subspace iteration, which only need the span and a bounded basis (|L| ≤ 1), as in
/// fbpca and scikit-learn. None when a pivot is (numerically) zero — a rank-deficient sketch —
/// so the caller falls back to QR.
pub fn lu_basis(y: MatRef<'_, f32>) -> Option<Mat<f32>> {
    let lu = y.partial_piv_lu();
    clear_upper_registers();
    let (l, u) = (lu.L(), lu.U());
    let diag_max = (0..u.ncols().min(u.nrows()))
        .map(|j| u[(j, j)].abs())
        .fold(0f32, f32::max);
    // NaN pivots count as deficient too: `is_nan() || <=`.
    let deficient = (0..u.ncols().min(u.nrows())).any(|j| {
        let p = u[(j, j)].abs();
        p.is_nan() || p <= diag_max * 1e-5
    });
    if deficient {
        return None;
    }
    let (fwd, _) = lu.P().arrays();
    let mut out = Mat::<f32>::zeros(y.nrows(), l.ncols());
    for j in 0..l.ncols() {
        for i in 0..l.nrows() {
            out[(fwd[i], j)] = l[(i, j)];
        }
    }
    let finite = (0..out.ncols()).all(|j| out.col(j).iter().all(|x| x.is_finite()));
    finite.then_some(out)
}

/// An intermediate basis for the power iterations: LU when it is safe, QR otherwise.
fn power_basis(y: MatRef<'_, f32>) -> Mat<f32> {
    lu_basis(y).unwrap_or_else(|| orthonormalize(y))
}

/// The sketch size l = min(k + p, m, n).
pub fn sketch_width(rows: usize, cols: usize, params: &SvdParams) -> usize {
    params
        .rank
        .saturating_add(params.oversample)
        .min(rows)
        .min(cols)
}

/// Top-`params.rank` singular triplets of `w`, signs canonicalized.
pub fn truncated_svd(w: &Weight<'_>, params: &SvdParams, t: &Timings) -> Result<Basis> {
    truncated_svd_of(w.name, Bands::new(Rows::F32(w.as_mat())), params, t)
}

/// [`truncated_svd`] of a weight as stored, read a band at a time (never converted whole).
pub fn truncated_svd_raw(w: &RawWeight<'_>, params: &SvdParams, t: &Timings) -> Result<Basis> {
    let rows = Rows::Stored {
        bytes: w.bytes,
        ty: w.ty,
        rows: w.rows,
        cols: w.cols,
    };
    truncated_svd_of(w.name, Bands::new(rows), params, t)
}

/// [`truncated_svd_raw`] for a weight decoded as read (a GGUF's quantized tensor): a band at a
/// time, through the same buffer, never whole.
pub fn truncated_svd_decoded(
    name: &str,
    rows: &QuantizedRows<'_>,
    params: &SvdParams,
    t: &Timings,
) -> Result<Basis> {
    truncated_svd_of(name, Bands::new(Rows::Decoded(*rows)), params, t)
}

/// Top-`params.rank` singular triplets of the weight `name` (which keys its Ω).
fn truncated_svd_of(
    name: &str,
    mut w: Bands<'_>,
    params: &SvdParams,
    t: &Timings,
) -> Result<Basis> {
    sequential_faer();
    let (m, n) = w.rows.shape();
    let k = params.rank.min(m).min(n);
    if k == 0 {
        return Err(Error::Internal(format!(
            "{name}: rank 0 requested for a {m}x{n} matrix"
        )));
    }
    let l = sketch_width(m, n, params);
    let id = philox::matrix_id(name);

    let mut q = t.time(Phase::Sketch, || {
        if l == n {
            // A full-width sketch: Ω = I, so Y = W and the basis spans W's columns to rounding.
            // A square Gaussian Ω would find them only to ε·cond(Ω), now and then far worse.
            return w.mul(Mat::<f32>::identity(n, n).as_ref());
        }
        // One Philox call gives four columns of a row: fill Ω four columns at a time.
        clear_upper_registers();
        let mut omega = Mat::<f32>::zeros(n, l);
        for g in 0..l.div_ceil(4) {
            for i in 0..n {
                let v = philox::gaussian4(params.seed, id, i as u32, g as u32);
                for (t, &x) in v.iter().enumerate().take(l - 4 * g) {
                    omega[(i, 4 * g + t)] = x;
                }
            }
        }
        w.mul(omega.as_ref())
    });
    // Subspace iteration: LU-normalized bases in between, one Householder QR at the end (the
    // core Bᵀ = WᵀQ needs an orthonormal Q).
    for _ in 0..params.power_iters {
        let basis = t.time(Phase::Orth, || power_basis(q.as_ref()));
        let z = t.time(Phase::Sketch, || w.mul_t(basis.as_ref()));
        let z = t.time(Phase::Orth, || power_basis(z.as_ref()));
        q = t.time(Phase::Sketch, || w.mul(z.as_ref()));
    }
    q = t.time(Phase::Orth, || orthonormalize(q.as_ref()));
    // Bᵀ = Wᵀ Q (n × l); W ≈ Q B = (Q V_b) Σ U_bᵀ where Bᵀ = U_b Σ V_bᵀ.
    let bt = t.time(Phase::Sketch, || w.mul_t(q.as_ref()));
    let svd = t
        .time(Phase::Eig, || {
            let svd = bt.thin_svd();
            clear_upper_registers();
            svd
        })
        .map_err(|e| Error::Numerical {
            context: name.to_string(),
            reason: format!("SVD of the {n}x{l} core did not converge: {e:?}"),
        })?;
    let (u, s, v) = t.time(Phase::Eig, || {
        let u = mm(q.as_ref(), svd.V().subcols(0, k));
        let v = svd.U().subcols(0, k).to_owned();
        let s: Vec<f32> = (0..k).map(|i| svd.S().column_vector()[i]).collect();
        (u, s, v)
    });
    let next = (l > k).then(|| svd.S().column_vector()[k]);
    let mut basis = Basis {
        u,
        s,
        v,
        next,
        resident: None,
    };
    canonicalize_signs(&mut basis);
    Ok(basis)
}

/// Flips each pair (u_i, v_i) so that the largest-magnitude entry of u_i is positive
/// (the first such entry on ties), making results independent of the SVD implementation.
pub fn canonicalize_signs(basis: &mut Basis) {
    for i in 0..basis.u.ncols() {
        let col = basis.u.col(i);
        let mut best = 0;
        for r in 1..col.nrows() {
            if col[r].abs() > col[best].abs() {
                best = r;
            }
        }
        if col[best] < 0.0 {
            basis.u.col_mut(i).iter_mut().for_each(|x| *x = -*x);
            basis.v.col_mut(i).iter_mut().for_each(|x| *x = -*x);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::max_abs_diff;

    fn gaussian(m: usize, n: usize, id: u64) -> Mat<f32> {
        gaussian_seeded(m, n, 1, id)
    }

    fn gaussian_seeded(m: usize, n: usize, seed: u64, id: u64) -> Mat<f32> {
        Mat::from_fn(m, n, |i, j| {
            philox::gaussian4(seed, id, i as u32, (j / 4) as u32)[j % 4]
        })
    }

    /// A weight read band by band from its stored bytes gives the products of the whole
    /// decoded matrix (to f32 rounding: Wᵀ·X sums the bands in turn), for every stored type and
    /// for bytes that are not aligned; and the same bits whether it came as f32 or as bytes.
    #[test]
    fn band_products_match_whole_products() {
        use crate::io::safetensors::{decode_f32, encode_f32};
        let (m, n, l, budget) = (300, 70, 5, (7000, 16));
        let seed = crate::linalg::fresh_seed();
        let w = gaussian_seeded(m, n, seed, 7);
        let (x, xt) = (
            gaussian_seeded(n, l, seed, 8),
            gaussian_seeded(m, l, seed, 9),
        );
        let values: Vec<f32> = (0..m * n).map(|e| w[(e / n, e % n)]).collect();
        let rel = |a: &Mat<f32>, b: &Mat<f32>| max_abs_diff(a, b) / b.norm_max();
        for ty in [FloatType::F32, FloatType::Bf16, FloatType::F16] {
            let bytes = encode_f32(&values, ty);
            let mut shifted = vec![0u8; bytes.len() + 1];
            shifted[1..].copy_from_slice(&bytes);
            let exact = decode_f32(&bytes, ty);
            let whole = MatRef::from_row_major_slice(&exact, m, n);
            let (want, want_t) = (mm(whole, x.as_ref()), mm(whole.transpose(), xt.as_ref()));
            for stored in [&bytes[..], &shifted[1..]] {
                let rows = Rows::Stored {
                    bytes: stored,
                    ty,
                    rows: m,
                    cols: n,
                };
                // 21000 values in bands of at most 7000: three of 100 rows.
                let bands: Vec<_> = rows.bands(budget.0, budget.1).collect();
                assert_eq!(bands, vec![0..100, 100..200, 200..300]);
                let mut banded = Bands::with_budget(rows, budget);
                assert!(rel(&banded.mul(x.as_ref()), &want) < 1e-6, "{ty:?}");
                let got_t = banded.mul_t(xt.as_ref());
                assert!(rel(&got_t, &want_t) < 1e-5, "{ty:?}");
                // The same bands over the f32 view: the same bits.
                let mut view = Bands::with_budget(Rows::F32(whole), budget);
                assert!(got_t == view.mul_t(xt.as_ref()), "{ty:?}");
                // Three bands fit [`WHOLE_BANDS`] budgets, so that weight was decoded whole; with
                // a budget of 3000 (eight bands of 38 rows, over four budgets) each band is decoded
                // in turn, into the same products, bit for bit.
                let small = (3000, 16);
                assert!(m * n > WHOLE_BANDS * small.0);
                assert_eq!(rows.bands(small.0, small.1).count(), 8);
                let mut by_band = Bands::with_budget(rows, small);
                let mut view = Bands::with_budget(Rows::F32(whole), small);
                assert!(rel(&by_band.mul(x.as_ref()), &want) < 1e-6, "{ty:?}");
                assert!(by_band.mul(x.as_ref()) == view.mul(x.as_ref()), "{ty:?}");
                assert!(
                    by_band.mul_t(xt.as_ref()) == view.mul_t(xt.as_ref()),
                    "{ty:?}"
                );
            }
        }
        // Uneven: 299 rows in three bands of 100, 100 and 99; one band when all fit; bands of
        // at least the fewest rows, over the budget if need be.
        let odd = Rows::F32(w.as_ref().subrows(0, 299));
        let heights = |budget, min_rows| -> Vec<usize> {
            odd.bands(budget, min_rows).map(|r| r.len()).collect()
        };
        assert_eq!(heights(7000, 16), vec![100, 100, 99]);
        assert_eq!(heights(BAND_ELEMENTS, MIN_BAND_ROWS), vec![299]);
        assert_eq!(heights(700, 150), vec![150, 149]);
        // A 70B model's down_proj (8192 × 28672): 32 bands of 256 rows.
        let down = Rows::Stored {
            bytes: &[],
            ty: FloatType::Bf16,
            rows: 8192,
            cols: 28672,
        };
        assert!(down
            .bands(BAND_ELEMENTS, MIN_BAND_ROWS)
            .eq((0..32).map(|i| 256 * i..256 * (i + 1))));

        // A decomposition depends on the values alone, not on how they are stored.
        let bytes = encode_f32(&values, FloatType::Bf16);
        let rounded = decode_f32(&bytes, FloatType::Bf16);
        let p = SvdParams {
            rank: 6,
            oversample: 4,
            power_iters: 1,
            seed,
        };
        let t = Timings::default();
        let of = |rows| truncated_svd_of("w", Bands::with_budget(rows, budget), &p, &t).unwrap();
        let from_f32 = of(Rows::F32(MatRef::from_row_major_slice(&rounded, m, n)));
        let from_bytes = of(Rows::Stored {
            bytes: &bytes,
            ty: FloatType::Bf16,
            rows: m,
            cols: n,
        });
        assert!(from_f32.u == from_bytes.u && from_f32.v == from_bytes.v);
        assert_eq!(from_f32.s, from_bytes.s);
        // Decoded as read (the path of a GGUF's quantized tensors; BF16 here, whose values are
        // the same): the same bits.
        let decoded = of(Rows::Decoded(QuantizedRows::new(
            &bytes,
            crate::io::gguf::quant::GgmlType::Bf16,
            (m, n),
            0..m,
            (None, None),
            crate::io::gguf::Values::AsIs,
        )));
        assert!(from_f32.u == decoded.u && from_f32.v == decoded.v);
        assert_eq!(from_f32.s, decoded.s);
        // And the bands are a summation order, not a different answer: the singular values
        // match the one-band decomposition's to f32 rounding.
        let one_band = truncated_svd_of(
            "w",
            Bands::new(Rows::F32(MatRef::from_row_major_slice(&rounded, m, n))),
            &p,
            &t,
        )
        .unwrap();
        for (a, b) in one_band.s.iter().zip(&from_bytes.s) {
            assert!((a - b).abs() <= 1e-5 * one_band.s[0], "{a} vs {b}");
        }
    }

    #[test]
    fn lu_basis_spans_the_same_space_as_qr() {
        for &(m, l) in &[(50, 7), (200, 33), (9, 9)] {
            let y = gaussian(m, l, 3);
            let q = orthonormalize(y.as_ref());
            let b = lu_basis(y.as_ref()).expect("full-rank sketch");
            // Projecting the LU basis onto span(Q) leaves it unchanged.
            let back = mm(q.as_ref(), mm(q.transpose(), b.as_ref()).as_ref());
            let err = max_abs_diff(&back, &b);
            assert!(err < 1e-4, "{m}x{l}: LU basis leaves span(Y) by {err}");
            assert!(
                (0..l).all(|j| b.col(j).iter().all(|x| x.abs() <= 1.0 + 1e-6)),
                "|L| ≤ 1"
            );
        }
    }

    #[test]
    fn rank_deficient_sketches_fall_back_to_qr() {
        let mut y = gaussian(30, 6, 4);
        y.col_mut(3).fill(0.0);
        assert!(lu_basis(y.as_ref()).is_none());
        let b = power_basis(y.as_ref());
        // An orthonormal basis of span(Y) (five non-zero columns).
        let gram = mm(b.transpose(), b.as_ref());
        let eye = Mat::<f32>::identity(gram.nrows(), gram.ncols());
        assert!(max_abs_diff(&gram, &eye) < 1e-5, "QᵀQ ≠ I");
        let back = mm(b.as_ref(), mm(b.transpose(), y.as_ref()).as_ref());
        assert!(max_abs_diff(&back, &y) < 1e-4, "Y leaves span(Q)");
        // A zero weight still decomposes (to zero singular values), never NaN.
        let zero = vec![0f32; 12 * 8];
        let w = Weight {
            name: "zero",
            data: &zero,
            rows: 12,
            cols: 8,
        };
        let p = SvdParams {
            rank: 3,
            oversample: 2,
            power_iters: 2,
            seed: 0,
        };
        let basis = truncated_svd(&w, &p, &Timings::default()).unwrap();
        assert!(basis.s.iter().all(|&s| s == 0.0));
        assert!(basis.u.col(0).iter().all(|x| x.is_finite()));
    }
}
