//! Randomized truncated SVD on the CPU (Halko, Martinsson & Tropp 2011: Alg. 4.4, subspace
//! iteration, then Alg. 5.1, direct SVD of the core). The reference every other backend is
//! checked against: Householder QR for orthonormalization, faer's SVD for the small core.
//! Everything runs sequentially inside one matrix (`Par::Seq`) so results do not depend on the
//! number of threads; parallelism is across matrices.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

use crate::backend::{Basis, SvdParams, Weight};
use crate::error::{Error, Result};
use crate::linalg::philox;
use crate::timing::{Phase, Timings};

/// Makes faer's decompositions (QR, SVD) run on the calling thread. Parallelism is across
/// matrices; inside one, a fixed sequential order keeps results independent of the thread count.
pub fn sequential_faer() {
    faer::set_global_parallelism(Par::Seq);
}

/// `a · b`, sequential.
pub fn mm(a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> Mat<f32> {
    let mut out = Mat::zeros(a.nrows(), b.ncols());
    matmul(out.as_mut(), Accum::Replace, a, b, 1.0f32, Par::Seq);
    out
}

/// An orthonormal basis of the column space of `y` (thin Householder QR; robust to rank deficiency).
pub fn orthonormalize(y: MatRef<'_, f32>) -> Mat<f32> {
    y.qr().compute_thin_Q()
}

/// The sketch size l = min(k + p, m, n).
pub fn sketch_width(rows: usize, cols: usize, params: &SvdParams) -> usize {
    (params.rank + params.oversample).min(rows).min(cols)
}

/// Top-`params.rank` singular triplets of `w`, signs canonicalized.
pub fn truncated_svd(w: &Weight<'_>, params: &SvdParams, t: &Timings) -> Result<Basis> {
    sequential_faer();
    let (m, n) = (w.rows, w.cols);
    let k = params.rank.min(m).min(n);
    if k == 0 {
        return Err(Error::Numerical {
            context: w.name.to_string(),
            reason: format!("rank 0 requested for a {m}x{n} matrix"),
        });
    }
    let l = sketch_width(m, n, params);
    let wm = w.as_mat();
    let id = philox::matrix_id(w.name);

    let mut q = t.time(Phase::Sketch, || {
        // One Philox call gives four columns of a row: fill Ω four columns at a time.
        let mut omega = Mat::<f32>::zeros(n, l);
        for g in 0..l.div_ceil(4) {
            for i in 0..n {
                let v = philox::gaussian4(params.seed, id, i as u32, g as u32);
                for (t, &x) in v.iter().enumerate().take(l - 4 * g) {
                    omega[(i, 4 * g + t)] = x;
                }
            }
        }
        mm(wm, omega.as_ref())
    });
    q = t.time(Phase::Orth, || orthonormalize(q.as_ref()));
    for _ in 0..params.power_iters {
        let z = t.time(Phase::Sketch, || mm(wm.transpose(), q.as_ref()));
        let z = t.time(Phase::Orth, || orthonormalize(z.as_ref()));
        let y = t.time(Phase::Sketch, || mm(wm, z.as_ref()));
        q = t.time(Phase::Orth, || orthonormalize(y.as_ref()));
    }
    // Bᵀ = Wᵀ Q (n × l); W ≈ Q B = (Q V_b) Σ U_bᵀ where Bᵀ = U_b Σ V_bᵀ.
    let bt = t.time(Phase::Sketch, || mm(wm.transpose(), q.as_ref()));
    let svd = t
        .time(Phase::Eig, || bt.thin_svd())
        .map_err(|e| Error::Numerical {
            context: w.name.to_string(),
            reason: format!("SVD of the {n}x{l} core did not converge: {e:?}"),
        })?;
    let (u, s, v) = t.time(Phase::Eig, || {
        let u = mm(q.as_ref(), svd.V().subcols(0, k));
        let v = svd.U().subcols(0, k).to_owned();
        let s: Vec<f32> = (0..k).map(|i| svd.S().column_vector()[i]).collect();
        (u, s, v)
    });
    let mut basis = Basis { u, s, v };
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
