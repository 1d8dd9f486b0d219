//! Randomized truncated SVD on the CPU (Halko, Martinsson & Tropp 2011: Alg. 4.4, subspace
//! iteration, then Alg. 5.1, direct SVD of the core). The reference every other backend is
//! checked against: LU-normalized bases inside the power iterations, Householder QR for the final
//! basis, faer's SVD for the small core.
//! Everything runs sequentially inside one matrix (`Par::Seq`) so results do not depend on the
//! number of threads; parallelism is across matrices.

use faer::{Mat, MatRef, Par};

use crate::backend::{Basis, SvdParams, Weight};
use crate::error::{Error, Result};
use crate::linalg::{mm, philox};
use crate::timing::{Phase, Timings};

/// Makes faer's decompositions (QR, SVD) run on the calling thread. Parallelism is across
/// matrices; inside one, a fixed sequential order keeps results independent of the thread count.
pub fn sequential_faer() {
    faer::set_global_parallelism(Par::Seq);
}

/// An orthonormal basis of the column space of `y` (thin Householder QR; robust to rank deficiency).
pub fn orthonormalize(y: MatRef<'_, f32>) -> Mat<f32> {
    y.qr().compute_thin_Q()
}

/// A basis of the column space of `y` from its partially pivoted LU factorization (`y = PᵀLU`,
/// basis `PᵀL`): five times cheaper than Householder QR here, and as good for the intermediate
/// steps of subspace iteration, which only need the span and a bounded basis (|L| ≤ 1), as in
/// fbpca and scikit-learn. None when a pivot is (numerically) zero — a rank-deficient sketch —
/// so the caller falls back to QR.
pub fn lu_basis(y: MatRef<'_, f32>) -> Option<Mat<f32>> {
    let lu = y.partial_piv_lu();
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
    (params.rank + params.oversample).min(rows).min(cols)
}

/// Top-`params.rank` singular triplets of `w`, signs canonicalized.
pub fn truncated_svd(w: &Weight<'_>, params: &SvdParams, t: &Timings) -> Result<Basis> {
    sequential_faer();
    let (m, n) = (w.rows, w.cols);
    let k = params.rank.min(m).min(n);
    if k == 0 {
        return Err(Error::Internal(format!(
            "{}: rank 0 requested for a {m}x{n} matrix",
            w.name
        )));
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
    // Subspace iteration: LU-normalized bases in between, one Householder QR at the end (the
    // core Bᵀ = WᵀQ needs an orthonormal Q).
    for _ in 0..params.power_iters {
        let basis = t.time(Phase::Orth, || power_basis(q.as_ref()));
        let z = t.time(Phase::Sketch, || mm(wm.transpose(), basis.as_ref()));
        let z = t.time(Phase::Orth, || power_basis(z.as_ref()));
        q = t.time(Phase::Sketch, || mm(wm, z.as_ref()));
    }
    q = t.time(Phase::Orth, || orthonormalize(q.as_ref()));
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

    fn gaussian(m: usize, n: usize, id: u64) -> Mat<f32> {
        Mat::from_fn(m, n, |i, j| {
            philox::gaussian4(1, id, i as u32, (j / 4) as u32)[j % 4]
        })
    }

    #[test]
    fn lu_basis_spans_the_same_space_as_qr() {
        for &(m, l) in &[(50, 7), (200, 33), (9, 9)] {
            let y = gaussian(m, l, 3);
            let q = orthonormalize(y.as_ref());
            let b = lu_basis(y.as_ref()).expect("full-rank sketch");
            // Projecting the LU basis onto span(Q) leaves it unchanged.
            let back = mm(q.as_ref(), mm(q.transpose(), b.as_ref()).as_ref());
            let err = (0..l)
                .flat_map(|j| (0..m).map(move |i| (i, j)))
                .map(|(i, j)| (back[(i, j)] - b[(i, j)]).abs())
                .fold(0f32, f32::max);
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
        assert!(b.col(0).iter().all(|x| x.is_finite()));
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
