//! Batched randomized truncated SVD on the device: the CPU backend's algorithm
//! (src/backend/cpu/rsvd.rs) step for step — the same Philox Ω, q power iterations, the core
//! Bᵀ = WᵀQ — with CholeskyQR2 for every orthonormalization and a Jacobi eigensolver on BBᵀ for
//! the core's SVD. All matrices of a batch share one shape and dtype and go through each step in
//! one launch; W is uploaded in its own dtype and read as such by the kernels.
//!
//! [`submit`] queues a batch (weights on the copy queue, kernels on the compute queue) and
//! returns at once; [`Pending::finish`] waits for it and reads the bases back. Submitting the
//! next batch before finishing this one overlaps its upload with this one's kernels.

use std::sync::Arc;

use faer::Mat;

use super::device::{Buffer, Gpu, Mark};
use super::ops::{Ops, Panel, PanelProduct};
use crate::backend::{Basis, Resident, Side, SvdParams};
use crate::error::{Error, Result};
use crate::io::safetensors::FloatType;
use crate::linalg::philox;
use crate::timing::{Phase, Timings};

pub use crate::backend::RawWeight as RawMatrix;

/// Device bytes one matrix of the batch needs while it is decomposed.
pub fn bytes_per_matrix(m: usize, n: usize, ty: FloatType, l: usize) -> usize {
    m * n * ty.size() + 4 * l * (2 * m + 2 * n) + 8 * 2 * l * l + 4 * (l * l + l) + 4 * (m + n) * l
}

/// Top-k triplets of every matrix in `mats` (one shape, one dtype), signs canonicalized.
pub fn truncated_svd_batch(
    ops: &Ops,
    mats: &[RawMatrix<'_>],
    params: &SvdParams,
    t: &Timings,
) -> Result<Vec<Basis>> {
    if mats.is_empty() {
        return Ok(Vec::new());
    }
    submit(ops, mats, params, t)?.finish(ops, t)
}

/// A basis's U and V where they were computed: element offsets into the batch's buffers
/// (row-major `m × k` and `n × k` f32, as [`Basis::u`] and [`Basis::v`]).
pub struct DeviceBasis {
    u: Arc<Buffer>,
    u_at: usize,
    v: Arc<Buffer>,
    v_at: usize,
}

impl DeviceBasis {
    /// The device address of U or V, when `basis` was computed on `gpu`.
    pub fn address(basis: &Basis, side: Side, gpu: &Gpu) -> Option<u64> {
        let me = basis.resident.as_ref()?.0.downcast_ref::<DeviceBasis>()?;
        let (buf, at) = match side {
            Side::U => (&me.u, me.u_at),
            Side::V => (&me.v, me.v_at),
        };
        buf.on(gpu).then(|| buf.ptr() + 4 * at as u64)
    }
}

/// A batch queued on the device: its results, and what is needed to read them back.
pub struct Pending {
    /// After the batch's last kernel: its results are read back without waiting for the
    /// kernels of the batch submitted after it.
    done: Mark,
    u: Buffer,
    v: Buffer,
    s: Buffer,
    names: Vec<String>,
    m: usize,
    n: usize,
    k: usize,
    l: usize,
}

/// Queues the SVDs of `mats` (one shape, one dtype) without waiting for them.
pub fn submit(
    ops: &Ops,
    mats: &[RawMatrix<'_>],
    params: &SvdParams,
    t: &Timings,
) -> Result<Pending> {
    let Some(first) = mats.first() else {
        return Err(Error::internal("an empty batch"));
    };
    let (m, n, ty) = (first.rows, first.cols, first.ty);
    if let Some(odd) = mats.iter().find(|x| (x.rows, x.cols, x.ty) != (m, n, ty)) {
        return Err(Error::Internal(format!(
            "batch mixes {}x{} {:?} with {} ({}x{} {:?})",
            m, n, ty, odd.name, odd.rows, odd.cols, odd.ty
        )));
    }
    let k = params.rank.min(m).min(n);
    let l = (params.rank + params.oversample).min(m).min(n);
    if l > super::ops::MAX_SKETCH {
        return Err(Error::arg(
            "--rank",
            format!(
                "{}: a sketch of {l} columns (--rank {} + --oversample {}) is wider than the \
                 CUDA kernels take ({}); lower them, or use --device cpu",
                first.name,
                params.rank,
                params.oversample,
                super::ops::MAX_SKETCH
            ),
        ));
    }
    if k == 0 {
        return Err(Error::Internal(format!(
            "{}: rank 0 requested for a {m}x{n} matrix",
            first.name
        )));
    }
    if let Some(x) = mats.iter().find(|x| x.bytes.len() != m * n * ty.size()) {
        return Err(Error::Internal(format!(
            "{}: {} bytes for a {m}x{n} {:?} matrix",
            x.name,
            x.bytes.len(),
            ty
        )));
    }
    let batch = mats.len();
    let gpu = &ops.gpu;
    let what = format!("{batch} matrices of {m}x{n}");

    // The weights go straight from the mapped file to the device (copy queue); the NaN/Inf
    // scan is the pass that reads them from disk, while the device works on the batch before.
    let (w, ids) = t.time(Phase::Load, || -> Result<(Buffer, Buffer)> {
        for x in mats {
            x.check_finite()?;
        }
        let parts: Vec<&[u8]> = mats.iter().map(|x| x.bytes).collect();
        let w = gpu.stage_parts(&parts, &format!("the weights ({what})"))?;
        let ids: Vec<u64> = mats.iter().map(|x| philox::matrix_id(x.name)).collect();
        let ids = gpu.upload(&ids, "the Ω keys")?;
        gpu.fence()?;
        Ok((w, ids))
    })?;

    let y = gpu.zeros::<f32>(batch * m * l, "the sketch")?;
    let z = gpu.zeros::<f32>(batch * n * l, "the co-sketch")?;
    let seed = params.seed;
    t.time(Phase::Sketch, || {
        if l == n {
            // A full-width sketch: Ω = I, as the CPU reference takes it (Y = W).
            let eye: Vec<f32> = (0..batch * n * n)
                .map(|e| if (e / n) % n == e % n { 1.0 } else { 0.0 })
                .collect();
            let eye = gpu.upload(&eye, "Ω = I")?;
            return ops.w_product(false, &y, &w, ty, &eye, (m, n, l), batch);
        }
        ops.sketch(&y, &w, ty, &ids, seed, m, n, l, batch)
    })?;
    for _ in 0..params.power_iters {
        t.time(Phase::Orth, || {
            ops.orthonormalize_queued(&y, m, l, batch, seed)
        })?;
        t.time(Phase::Sketch, || {
            ops.w_product(true, &z, &w, ty, &y, (m, n, l), batch)
        })?;
        t.time(Phase::Orth, || {
            ops.orthonormalize_queued(&z, n, l, batch, seed)
        })?;
        t.time(Phase::Sketch, || {
            ops.w_product(false, &y, &w, ty, &z, (m, n, l), batch)
        })?;
    }
    t.time(Phase::Orth, || {
        ops.orthonormalize_queued(&y, m, l, batch, seed)
    })?;
    // The core Bᵀ = WᵀQ (n×l) into z; BBᵀ = (Bᵀ)ᵀBᵀ is its Gram matrix.
    t.time(Phase::Sketch, || {
        ops.w_product(true, &z, &w, ty, &y, (m, n, l), batch)
    })?;
    drop(w);
    let (s, vb) = t.time(Phase::Eig, || -> Result<(Buffer, Buffer)> {
        let g = gpu.zeros::<f64>(batch * l * l, "the core's Gram matrices")?;
        ops.gram(&g, z.ptr(), n, l, batch)?;
        ops.eig(&g, l, batch)
    })?;
    let (u, v) = t.time(Phase::Eig, || -> Result<(Buffer, Buffer)> {
        let u = gpu.zeros::<f32>(batch * m * k, "U")?;
        let v = gpu.zeros::<f32>(batch * n * k, "V")?;
        // U = Q·Vb[:, :k]; V = Bᵀ·Vb[:, :k]·Σ⁻¹.
        let leading_columns_of_vb = |c: u64, a: u64, rows: usize| PanelProduct {
            kind: Panel::NN,
            c,
            a,
            b: vb.ptr(),
            m: rows,
            n: k,
            k: l,
            lda: l,
            ldb: l,
            stride_a: rows * l,
            stride_b: l * l,
            batch,
        };
        ops.panel(&leading_columns_of_vb(u.ptr(), y.ptr(), m))?;
        ops.panel(&leading_columns_of_vb(v.ptr(), z.ptr(), n))?;
        ops.scale_columns(&v, &s, n, k, k, n * k, l, batch)?;
        ops.canonical_signs(&u, &v, m, n, k, batch)?;
        Ok((u, v))
    })?;

    Ok(Pending {
        done: gpu.mark()?,
        u,
        v,
        s,
        names: mats.iter().map(|x| x.name.to_string()).collect(),
        m,
        n,
        k,
        l,
    })
}

impl Pending {
    /// Waits for the batch and returns its bases, in the order submitted.
    pub fn finish(self, ops: &Ops, t: &Timings) -> Result<Vec<Basis>> {
        let Pending {
            done,
            u,
            v,
            s,
            names,
            m,
            n,
            k,
            l,
        } = self;
        let (gpu, batch) = (&ops.gpu, names.len());
        let (u, v) = (Arc::new(u), Arc::new(v));
        let (us, vs, ss) = t.time(Phase::Eig, || -> Result<_> {
            Ok((
                gpu.download_after::<f32>(&done, u.ptr(), batch * m * k)?,
                gpu.download_after::<f32>(&done, v.ptr(), batch * n * k)?,
                gpu.download_after::<f32>(&done, s.ptr(), batch * l)?,
            ))
        })?;
        let mut out = Vec::with_capacity(batch);
        for b in 0..batch {
            let (ub, vb, sb) = (
                &us[b * m * k..(b + 1) * m * k],
                &vs[b * n * k..(b + 1) * n * k],
                &ss[b * l..(b + 1) * l],
            );
            let basis = Basis {
                u: Mat::from_fn(m, k, |i, j| ub[i * k + j]),
                s: sb[..k].to_vec(),
                v: Mat::from_fn(n, k, |i, j| vb[i * k + j]),
                next: (l > k).then(|| sb[k]),
                // U and V stay on the device while any basis of the batch is alive.
                resident: Some(Resident(Arc::new(DeviceBasis {
                    u: u.clone(),
                    u_at: b * m * k,
                    v: v.clone(),
                    v_at: b * n * k,
                }))),
            };
            if basis
                .s
                .iter()
                .chain(basis.next.iter())
                .any(|x| !x.is_finite())
            {
                return Err(Error::Numerical {
                    context: names[b].clone(),
                    reason: "non-finite singular values on the device".into(),
                });
            }
            out.push(basis);
        }
        Ok(out)
    }
}
