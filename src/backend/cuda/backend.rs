//! [`CudaBackend`]: the [`Backend`] trait on a device — the randomized SVD, similarity and the
//! subspace products (project, align) run as this project's kernels. copy and resample are index
//! copies and procrustes needs the polar factor of a k×k matrix: those stay on the CPU reference,
//! where they cost microseconds.

use std::ops::Range;

use faer::{Mat, MatRef};

use super::device::{Buffer, Gpu};
use super::ops::{Ops, Panel, PanelProduct};
use super::rsvd::{bytes_per_matrix, submit, truncated_svd_batch, DeviceBasis, Pending, RawMatrix};
use crate::backend::cpu::{factors, CpuBackend};
use crate::backend::{Backend, Basis, Factors, RawBatch, Side, SvdParams, Weight};
use crate::error::{Error, Result};
use crate::io::safetensors::FloatType;
use crate::modes::{self, Mode};
use crate::timing::Timings;

/// Row-major copy of a faer matrix (the kernels' layout).
pub fn row_major(m: MatRef<'_, f32>) -> Vec<f32> {
    let mut out = Vec::with_capacity(m.nrows() * m.ncols());
    for i in 0..m.nrows() {
        out.extend((0..m.ncols()).map(|j| m[(i, j)]));
    }
    out
}

pub use crate::linalg::from_row_major;

/// The backend on one device.
pub struct CudaBackend {
    ops: Ops,
    name: &'static str,
    /// The most weight bytes one submitted batch takes ([`CudaBackend::pieces`]).
    piece_bytes: usize,
}

/// Device bytes that the U and V of `n` bases of matrices shaped like `w` keep.
pub fn resident_bytes(n: usize, w: &RawMatrix<'_>, params: &SvdParams) -> usize {
    let k = params.rank.min(w.rows).min(w.cols);
    n * 4 * (w.rows + w.cols) * k
}

/// Weight bytes per submitted batch on a GPU: large enough that one launch keeps every SM busy
/// (all 28 q_proj of a 1.5B model), small enough that the first batch's upload, which nothing
/// overlaps, is short.
pub const PIECE_BYTES: usize = 256 << 20;

impl CudaBackend {
    /// `name` goes into reports: "cuda", or "emulator" for the CPU emulator; `piece_bytes` bounds
    /// the weight bytes of one submitted batch.
    pub fn new(gpu: Gpu, small_block: u32, name: &'static str, piece_bytes: usize) -> Self {
        Self {
            ops: Ops {
                gpu,
                small_block,
                tensor_cores: super::ops::tensor_cores_enabled(),
            },
            name,
            piece_bytes,
        }
    }

    /// Splits `n` matrices shaped like `w` into consecutive pieces, each within
    /// `piece_bytes` of weights and within half the device memory this may use (two pieces are
    /// on the device at once: one computing, the next uploading), after `reserved` bytes (the U
    /// and V that the bases of the whole call will keep on the device, [`resident_bytes`]).
    pub fn pieces(
        &self,
        n: usize,
        w: &RawMatrix<'_>,
        params: &SvdParams,
        reserved: usize,
    ) -> Vec<Range<usize>> {
        let l = (params.rank + params.oversample).min(w.rows).min(w.cols);
        let need = bytes_per_matrix(w.rows, w.cols, w.ty, l).max(1);
        let weight = (w.rows * w.cols * w.ty.size()).max(1);
        // Use 60 % of what is free, leaving room for the driver and the rest of the process;
        // without a figure (emulator), assume a modest 1 GiB.
        let free = self.ops.gpu.0.free_memory().unwrap_or(1 << 30);
        let budget = (free / 10 * 6).saturating_sub(reserved);
        let per_piece = (budget / 2 / need)
            .min(self.piece_bytes / weight)
            .clamp(1, 64);
        (0..n)
            .step_by(per_piece)
            .map(|s| s..(s + per_piece).min(n))
            .collect()
    }

    /// One batch through the pipeline: [`Backend::truncated_svd_raw_batches`] of one.
    pub fn svd_pipelined(
        &self,
        ws: &[RawMatrix<'_>],
        params: &SvdParams,
        timings: &Timings,
    ) -> Result<Vec<Basis>> {
        let batch = RawBatch {
            weights: ws.to_vec(),
            params: *params,
        };
        let mut out = self.truncated_svd_raw_batches(std::slice::from_ref(&batch), timings)?;
        Ok(out.pop().unwrap_or_default())
    }

    /// The same device with another piece size (tests and benchmarks of the pipeline).
    pub fn with_piece_bytes(&self, piece_bytes: usize) -> Self {
        Self {
            ops: self.ops.clone(),
            name: self.name,
            piece_bytes,
        }
    }

    pub fn ops(&self) -> &Ops {
        &self.ops
    }

    /// Similarity of many pairs of k-column bases of one shape in one launch.
    pub fn similarity_batch(
        &self,
        pairs: &[(MatRef<'_, f32>, MatRef<'_, f32>)],
    ) -> Result<Vec<f32>> {
        let Some((x0, _)) = pairs.first() else {
            return Ok(Vec::new());
        };
        let (m, k) = (x0.nrows(), x0.ncols());
        if pairs
            .iter()
            .any(|(x, y)| x.nrows() != m || y.nrows() != m || x.ncols() != k || y.ncols() != k)
            || k == 0
        {
            return Ok(pairs
                .iter()
                .map(|(x, y)| factors::similarity(*x, *y))
                .collect());
        }
        let gpu = &self.ops.gpu;
        let mut xs = Vec::with_capacity(pairs.len() * m * k);
        let mut ys = Vec::with_capacity(pairs.len() * m * k);
        for (x, y) in pairs {
            xs.extend(row_major(*x));
            ys.extend(row_major(*y));
        }
        let (x, y) = (gpu.upload(&xs, "bases")?, gpu.upload(&ys, "bases")?);
        self.similarities_at(x.ptr(), y.ptr(), (m, k), pairs.len())
    }

    /// `‖XᵀY‖_F² / k` for `batch` pairs of `m × k` row-major bases stored back to back at the
    /// device addresses `x` and `y`.
    fn similarities_at(
        &self,
        x: u64,
        y: u64,
        (m, k): (usize, usize),
        batch: usize,
    ) -> Result<Vec<f32>> {
        let gpu = &self.ops.gpu;
        let p = gpu.zeros::<f32>(batch * k * k, "UᵀU products")?;
        let out = gpu.zeros::<f32>(batch, "similarities")?;
        self.ops.panel(&PanelProduct {
            kind: Panel::TN,
            c: p.ptr(),
            a: x,
            b: y,
            m: k,
            n: k,
            k: m,
            lda: k,
            ldb: k,
            stride_a: m * k,
            stride_b: m * k,
            batch,
        })?;
        self.ops
            .sum_squares(&out, &p, k * k, 1.0 / k as f64, batch)?;
        Ok(gpu
            .download::<f32>(out.ptr(), batch)?
            .into_iter()
            .map(|s| s.clamp(0.0, 1.0))
            .collect())
    }

    /// One side of a basis on this device: the copy left there by the SVD, or else an upload
    /// (returned, to be held while the address is used).
    fn on_device(&self, basis: &Basis, side: Side, what: &str) -> Result<(u64, Option<Buffer>)> {
        if let Some(address) = DeviceBasis::address(basis, side, &self.ops.gpu) {
            return Ok((address, None));
        }
        let buf = self.ops.gpu.upload(&row_major(basis.side(side)), what)?;
        Ok((buf.ptr(), Some(buf)))
    }

    /// The similarity of one side of two bases, from their device copies when they have them.
    pub fn pair_similarity(&self, x: &Basis, y: &Basis, side: Side) -> Result<f32> {
        let (xm, ym) = (x.side(side), y.side(side));
        let (m, k) = (xm.nrows(), xm.ncols());
        if (ym.nrows(), ym.ncols()) != (m, k) || k == 0 {
            return Ok(factors::similarity(xm, ym));
        }
        let (xa, _held_x) = self.on_device(x, side, "basis")?;
        let (ya, _held_y) = self.on_device(y, side, "basis")?;
        Ok(self.similarities_at(xa, ya, (m, k), 1)?[0])
    }

    /// B_t = U_x (U_yᵀ B_s), A_t = (A_s V_y) V_xᵀ on the device.
    fn subspace_products(&self, src: &Factors, x: &Basis, y: &Basis) -> Result<Factors> {
        let gpu = &self.ops.gpu;
        let (m_s, r) = (src.b.nrows(), src.b.ncols());
        let n_s = src.a.ncols();
        let (m_t, n_t, k) = (x.u.nrows(), x.v.nrows(), x.u.ncols());
        let up = |m: MatRef<'_, f32>, what: &str| gpu.upload(&row_major(m), what);
        let (bs, as_) = (up(src.b.as_ref(), "B")?, up(src.a.as_ref(), "A")?);
        let (ux, _held_ux) = self.on_device(x, Side::U, "U_x")?;
        let (uy, _held_uy) = self.on_device(y, Side::U, "U_y")?;
        let (vx, _held_vx) = self.on_device(x, Side::V, "V_x")?;
        let (vy, _held_vy) = self.on_device(y, Side::V, "V_y")?;
        let c1 = gpu.zeros::<f32>(k * r, "U_yᵀB")?;
        let bt = gpu.zeros::<f32>(m_t * r, "B_t")?;
        let c2 = gpu.zeros::<f32>(r * k, "A V_y")?;
        let at = gpu.zeros::<f32>(r * n_t, "A_t")?;
        let ops = &self.ops;
        // One matrix each: the batch strides do not matter.
        let single = |kind, c, a, b, (m, n, inner), (lda, ldb)| PanelProduct {
            kind,
            c,
            a,
            b,
            m,
            n,
            k: inner,
            lda,
            ldb,
            stride_a: 0,
            stride_b: 0,
            batch: 1,
        };
        ops.panel(&single(
            Panel::TN,
            c1.ptr(),
            uy,
            bs.ptr(),
            (k, r, m_s),
            (k, r),
        ))?;
        ops.panel(&single(
            Panel::NN,
            bt.ptr(),
            ux,
            c1.ptr(),
            (m_t, r, k),
            (k, r),
        ))?;
        ops.panel(&single(
            Panel::NN,
            c2.ptr(),
            as_.ptr(),
            vy,
            (r, k, n_s),
            (n_s, k),
        ))?;
        ops.panel(&single(
            Panel::NT,
            at.ptr(),
            c2.ptr(),
            vx,
            (r, n_t, k),
            (k, k),
        ))?;
        Ok(Factors {
            b: from_row_major(&gpu.download::<f32>(bt.ptr(), m_t * r)?, m_t, r),
            a: from_row_major(&gpu.download::<f32>(at.ptr(), r * n_t)?, r, n_t),
        })
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        self.name
    }

    fn product_into(
        &self,
        a: MatRef<'_, f32>,
        b: MatRef<'_, f32>,
        mut out: faer::MatMut<'_, f32>,
    ) -> Result<()> {
        crate::linalg::check_product_into(a, b, &out)?;
        out.copy_from(&self.product(a, b)?);
        Ok(())
    }

    fn product(&self, a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> Result<Mat<f32>> {
        let (m, k, n) = (a.nrows(), a.ncols(), b.ncols());
        if b.nrows() != k {
            return Err(Error::internal(format!(
                "product of a {m}×{k} and a {}×{n} matrix",
                b.nrows()
            )));
        }
        if m == 0 || n == 0 || k == 0 {
            return Ok(Mat::zeros(m, n));
        }
        let gpu = &self.ops.gpu;
        let (da, db) = (
            gpu.upload(&row_major(a), "product A")?,
            gpu.upload(&row_major(b), "product B")?,
        );
        let c = gpu.zeros::<f32>(m * n, "product C")?;
        self.ops.panel(&PanelProduct {
            kind: Panel::NN,
            c: c.ptr(),
            a: da.ptr(),
            b: db.ptr(),
            m,
            n,
            k,
            lda: k,
            ldb: n,
            stride_a: 0,
            stride_b: 0,
            batch: 1,
        })?;
        Ok(from_row_major(&gpu.download::<f32>(c.ptr(), m * n)?, m, n))
    }

    fn basis_t_mul(&self, basis: &Basis, side: Side, m: MatRef<'_, f32>) -> Result<Mat<f32>> {
        self.product(basis.side(side).transpose(), m)
    }

    /// W goes to the device as stored (half the bytes of f32 for a 16-bit weight) and the
    /// decomposition's W·Z / Wᵀ·Q kernels multiply it: on tensor cores for f16 and bf16 weights.
    fn stored_product(
        &self,
        w: &crate::linalg::stored::Stored<'_>,
        x: MatRef<'_, f32>,
        transpose: bool,
    ) -> Result<Mat<f32>> {
        let (m, n, l) = (w.nrows(), w.ncols(), x.ncols());
        let (inner, rows) = if transpose { (m, n) } else { (n, m) };
        if x.nrows() != inner {
            return Err(Error::internal(format!(
                "product of a {m}×{n} weight{} and a {}×{l} matrix",
                if transpose { " (transposed)" } else { "" },
                x.nrows()
            )));
        }
        if m == 0 || n == 0 || l == 0 {
            return Ok(Mat::zeros(rows, l));
        }
        let gpu = &self.ops.gpu;
        let (bytes, ty) = w.raw();
        let dw = gpu.upload_bytes(&bytes, "a weight of the map")?;
        let dx = gpu.upload(&row_major(x), "a panel of the map")?;
        let c = gpu.zeros::<f32>(rows * l, "a product of the map")?;
        self.ops
            .w_product(transpose, &c, &dw, ty, &dx, (m, n, l), 1)?;
        Ok(from_row_major(
            &gpu.download::<f32>(c.ptr(), rows * l)?,
            rows,
            l,
        ))
    }

    fn basis_mul_add(
        &self,
        m: MatRef<'_, f32>,
        x: &Basis,
        g: MatRef<'_, f32>,
        y: &Basis,
        h: MatRef<'_, f32>,
        side: Side,
    ) -> Result<Mat<f32>> {
        let xg = self.product(x.side(side), g)?;
        let yh = self.product(y.side(side), h)?;
        Ok(Mat::from_fn(m.nrows(), m.ncols(), |i, j| {
            m[(i, j)] + xg[(i, j)] + yh[(i, j)]
        }))
    }

    fn truncated_svd(
        &self,
        w: &Weight<'_>,
        params: &SvdParams,
        timings: &Timings,
    ) -> Result<Basis> {
        let raw = RawMatrix {
            name: w.name,
            bytes: bytemuck::cast_slice(w.data),
            ty: FloatType::F32,
            rows: w.rows,
            cols: w.cols,
            unchecked: None,
        };
        Ok(truncated_svd_batch(&self.ops, &[raw], params, timings)?.remove(0))
    }

    fn truncated_svd_raw(
        &self,
        w: &RawMatrix<'_>,
        params: &SvdParams,
        timings: &Timings,
    ) -> Result<Basis> {
        Ok(truncated_svd_batch(&self.ops, std::slice::from_ref(w), params, timings)?.remove(0))
    }

    fn batches(&self) -> bool {
        true
    }

    /// Every piece of every batch submitted in turn, each piece's upload overlapping the
    /// previous piece's kernels (across batches too), at most two pieces on the device at once.
    fn truncated_svd_raw_batches(
        &self,
        batches: &[RawBatch<'_>],
        timings: &Timings,
    ) -> Result<Vec<Vec<Basis>>> {
        let reserved: usize = batches
            .iter()
            .filter_map(|b| {
                Some(resident_bytes(
                    b.weights.len(),
                    b.weights.first()?,
                    &b.params,
                ))
            })
            .sum();
        let mut work = Vec::new();
        for (i, b) in batches.iter().enumerate() {
            if let Some(first) = b.weights.first() {
                let pieces = self.pieces(b.weights.len(), first, &b.params, reserved);
                work.extend(pieces.into_iter().map(|r| (i, r)));
            }
        }
        let mut out: Vec<Vec<Basis>> = batches
            .iter()
            .map(|b| Vec::with_capacity(b.weights.len()))
            .collect();
        let mut in_flight: Option<(usize, Pending)> = None;
        for (i, range) in work {
            let b = &batches[i];
            let next = submit(&self.ops, &b.weights[range], &b.params, timings)?;
            if let Some((j, done)) = in_flight.replace((i, next)) {
                out[j].extend(done.finish(&self.ops, timings)?);
            }
        }
        if let Some((j, done)) = in_flight {
            out[j].extend(done.finish(&self.ops, timings)?);
        }
        Ok(out)
    }

    fn basis_similarity(&self, x: &Basis, y: &Basis, side: Side) -> f32 {
        // As in `similarity`: a device error falls back to the reference.
        self.pair_similarity(x, y, side)
            .unwrap_or_else(|_| factors::similarity(x.side(side), y.side(side)))
    }

    fn similarity(&self, x: MatRef<'_, f32>, y: MatRef<'_, f32>) -> f32 {
        // A device error here falls back to the reference: a similarity is a report figure,
        // not worth failing a transfer over.
        self.similarity_batch(&[(x, y)])
            .ok()
            .and_then(|v| v.first().copied())
            .unwrap_or_else(|| factors::similarity(x, y))
    }

    fn transfer(
        &self,
        mode: Mode,
        source: &Factors,
        source_basis: Option<&Basis>,
        target_basis: Option<&Basis>,
        target_shape: (usize, usize),
    ) -> Result<Factors> {
        match mode {
            Mode::Project | Mode::Align => {
                let (x, y) =
                    modes::subspace_bases(mode, source, source_basis, target_basis, target_shape)?;
                self.subspace_products(source, x, y)
            }
            // The heavy products go through this backend's basis products.
            Mode::Rotate => {
                modes::rotate::transfer(self, source, source_basis, target_basis, target_shape)
            }
            _ => CpuBackend.transfer(mode, source, source_basis, target_basis, target_shape),
        }
    }
}
