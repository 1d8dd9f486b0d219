//! Batched randomized truncated SVD on the device: the CPU backend's algorithm
//! (src/backend/cpu/rsvd.rs) step for step — the same Philox Ω, q power iterations, the core
//! Bᵀ = WᵀQ — with CholeskyQR2 for every orthonormalization and a Jacobi eigensolver on BBᵀ for
//! the core's SVD. All matrices of a batch share one shape and dtype and go through each step in
//! one launch; W is uploaded in its own dtype and read as such by the kernels.

use faer::Mat;

use super::device::Buffer;
use super::ops::{Ops, Panel};
use crate::backend::{Basis, SvdParams};
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
    let Some(first) = mats.first() else {
        return Ok(Vec::new());
    };
    let (m, n, ty) = (first.rows, first.cols, first.ty);
    if let Some(odd) = mats.iter().find(|x| (x.rows, x.cols, x.ty) != (m, n, ty)) {
        return Err(Error::Backend(format!(
            "batch mixes {}x{} {:?} with {} ({}x{} {:?})",
            m, n, ty, odd.name, odd.rows, odd.cols, odd.ty
        )));
    }
    let k = params.rank.min(m).min(n);
    let l = (params.rank + params.oversample).min(m).min(n);
    if k == 0 {
        return Err(Error::Numerical {
            context: first.name.to_string(),
            reason: format!("rank 0 requested for a {m}x{n} matrix"),
        });
    }
    let batch = mats.len();
    let gpu = &ops.gpu;
    let what = format!("{batch} matrices of {m}x{n}");

    let (w, ids) = t.time(Phase::Load, || -> Result<(Buffer, Buffer)> {
        let mut bytes = Vec::with_capacity(batch * m * n * ty.size());
        for x in mats {
            if x.bytes.len() != m * n * ty.size() {
                return Err(Error::Backend(format!(
                    "{}: {} bytes for a {m}x{n} {:?} matrix",
                    x.name,
                    x.bytes.len(),
                    ty
                )));
            }
            bytes.extend_from_slice(x.bytes);
        }
        let ids: Vec<u64> = mats.iter().map(|x| philox::matrix_id(x.name)).collect();
        Ok((
            gpu.upload_bytes(&bytes, &format!("the weights ({what})"))?,
            gpu.upload(&ids, "the Ω keys")?,
        ))
    })?;

    let y = gpu.zeros::<f32>(batch * m * l, "the sketch")?;
    let z = gpu.zeros::<f32>(batch * n * l, "the co-sketch")?;
    let seed = params.seed;
    t.time(Phase::Sketch, || {
        ops.sketch(&y, &w, ty, &ids, seed, m, n, l, batch)
    })?;
    for _ in 0..params.power_iters {
        t.time(Phase::Orth, || ops.orthonormalize(&y, m, l, batch, seed))?;
        t.time(Phase::Sketch, || {
            ops.w_product(true, &z, &w, ty, &y, (m, n, l), batch)
        })?;
        t.time(Phase::Orth, || ops.orthonormalize(&z, n, l, batch, seed))?;
        t.time(Phase::Sketch, || {
            ops.w_product(false, &y, &w, ty, &z, (m, n, l), batch)
        })?;
    }
    t.time(Phase::Orth, || ops.orthonormalize(&y, m, l, batch, seed))?;
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
        ops.panel(
            Panel::NN,
            u.ptr(),
            y.ptr(),
            vb.ptr(),
            (m, k, l),
            (l, l),
            (m * l, l * l),
            batch,
        )?;
        ops.panel(
            Panel::NN,
            v.ptr(),
            z.ptr(),
            vb.ptr(),
            (n, k, l),
            (l, l),
            (n * l, l * l),
            batch,
        )?;
        ops.scale_columns(&v, &s, n, k, k, n * k, l, batch)?;
        ops.canonical_signs(&u, &v, m, n, k, batch)?;
        Ok((u, v))
    })?;

    let (us, vs, ss) = t.time(Phase::Eig, || -> Result<_> {
        Ok((
            gpu.download::<f32>(u.ptr(), batch * m * k)?,
            gpu.download::<f32>(v.ptr(), batch * n * k)?,
            gpu.download::<f32>(s.ptr(), batch * l)?,
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
        };
        if basis
            .s
            .iter()
            .chain(basis.next.iter())
            .any(|x| !x.is_finite())
        {
            return Err(Error::Numerical {
                context: mats[b].name.to_string(),
                reason: "non-finite singular values on the device".into(),
            });
        }
        out.push(basis);
    }
    Ok(out)
}
