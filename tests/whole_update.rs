//! The whole-update modes against their defining properties and a dense reference: `rotate` is
//! the direct rotation between the two bases' subspaces (orthogonal, the identity when the
//! subspaces agree, free of the bases' signs and order).

mod common;

use common::*;
use faer::Mat;
use loraxfer::backend::cpu::CpuBackend;
use loraxfer::backend::{Backend, Basis, Factors};
use loraxfer::modes::{self, Mode};

fn basis(u: Mat<f32>, v: Mat<f32>) -> Basis {
    let k = u.ncols();
    Basis {
        u,
        s: (0..k).map(|i| (k - i) as f32).collect(),
        v,
        next: None,
        resident: None,
    }
}

/// Orthonormal `n × k` bases near `x`: x + `drift` · noise, re-orthonormalized.
fn drifted(x: &Mat<f32>, drift: f32, seed: u64) -> Mat<f32> {
    let noise = gaussian(x.nrows(), x.ncols(), seed, 9);
    let y = Mat::from_fn(x.nrows(), x.ncols(), |i, j| {
        x[(i, j)] + drift * noise[(i, j)]
    });
    y.qr().compute_thin_Q()
}

fn lora(m: usize, n: usize, r: usize, seed: u64) -> Factors {
    Factors {
        b: gaussian(m, r, seed, 3),
        a: gaussian(r, n, seed, 4),
    }
}

fn rotate(src: &Factors, s: &Basis, t: &Basis) -> Factors {
    let shape = (src.b.nrows(), src.a.ncols());
    CpuBackend
        .transfer(Mode::Rotate, src, Some(s), Some(t), shape)
        .unwrap()
}

/// The direct rotation as a dense `m × m` matrix, straight from its definition with the unit
/// vectors e_i (a division by sin θ_i that the factored form avoids).
fn dense_direct_rotation(us: &Mat<f32>, ut: &Mat<f32>) -> Mat<f64> {
    let m = us.nrows();
    let to64 = |x: &Mat<f32>| Mat::<f64>::from_fn(x.nrows(), x.ncols(), |i, j| x[(i, j)] as f64);
    let (us, ut) = (to64(us), to64(ut));
    let o = us.transpose() * &ut;
    let svd = o.thin_svd().unwrap();
    let a = &us * svd.U();
    let b = &ut * svd.V();
    let mut r = Mat::<f64>::identity(m, m);
    for i in 0..o.nrows() {
        let c = svd.S().column_vector()[i].min(1.0);
        let s = (1.0 - c * c).max(0.0).sqrt();
        let ai = a.col(i).to_owned();
        let e = if s > 1e-9 {
            Mat::<f64>::from_fn(m, 1, |p, _| (b[(p, i)] - c * ai[p]) / s)
        } else {
            Mat::<f64>::zeros(m, 1)
        };
        for p in 0..m {
            for q in 0..m {
                r[(p, q)] += (c - 1.0) * (ai[p] * ai[q] + e[(p, 0)] * e[(q, 0)])
                    + s * (e[(p, 0)] * ai[q] - ai[p] * e[(q, 0)]);
            }
        }
    }
    r
}

#[test]
fn rotate_matches_the_dense_direct_rotation() {
    let (m, n, k, r) = (37, 29, 6, 4);
    let (us, vs) = (orthonormal(m, k, 1, 1), orthonormal(n, k, 1, 2));
    // Far apart (independent) and close (drifted) subspaces.
    for (ut, vt) in [
        (orthonormal(m, k, 2, 1), orthonormal(n, k, 2, 2)),
        (drifted(&us, 0.05, 3), drifted(&vs, 0.05, 4)),
    ] {
        let src = lora(m, n, r, 5);
        let out = rotate(
            &src,
            &basis(us.clone(), vs.clone()),
            &basis(ut.clone(), vt.clone()),
        );
        let ru = dense_direct_rotation(&us, &ut);
        let rv = dense_direct_rotation(&vs, &vt);
        let b64 = Mat::<f64>::from_fn(m, r, |i, j| src.b[(i, j)] as f64);
        let a64 = Mat::<f64>::from_fn(r, n, |i, j| src.a[(i, j)] as f64);
        let want_b = &ru * &b64;
        let want_a = &a64 * rv.transpose();
        let err_b = (0..m)
            .flat_map(|i| (0..r).map(move |j| (i, j)))
            .map(|(i, j)| (out.b[(i, j)] as f64 - want_b[(i, j)]).abs())
            .fold(0.0, worst);
        let err_a = (0..r)
            .flat_map(|i| (0..n).map(move |j| (i, j)))
            .map(|(i, j)| (out.a[(i, j)] as f64 - want_a[(i, j)]).abs())
            .fold(0.0, worst);
        assert!(
            err_b < 2e-5 && err_a < 2e-5,
            "B off by {err_b}, A by {err_a}"
        );
        // The dense reference is orthogonal and maps span(U_s) into span(U_t).
        let rus = &ru * Mat::<f64>::from_fn(m, k, |i, j| us[(i, j)] as f64);
        let ut64 = Mat::<f64>::from_fn(m, k, |i, j| ut[(i, j)] as f64);
        let residual = &rus - &ut64 * (ut64.transpose() * &rus);
        assert!(
            residual.norm_l2() < 1e-6,
            "R U_s leaves span(U_t): {}",
            residual.norm_l2()
        );
    }
}

#[test]
fn rotate_is_copy_when_the_subspaces_agree() {
    let (m, n, k, r) = (40, 33, 7, 3);
    let (us, vs) = (orthonormal(m, k, 11, 1), orthonormal(n, k, 11, 2));
    // The same subspaces in other bases: rotated inside, columns reordered and flipped.
    let (ou, ov) = (orthonormal(k, k, 12, 1), orthonormal(k, k, 12, 2));
    let ut = mm(us.as_ref(), ou.as_ref());
    let vt = mm(vs.as_ref(), ov.as_ref());
    let src = lora(m, n, r, 13);
    let out = rotate(&src, &basis(us, vs), &basis(ut, vt));
    assert!(max_abs_diff(&out.b, &src.b) < 1e-5, "B changed");
    assert!(max_abs_diff(&out.a, &src.a) < 1e-5, "A changed");
}

#[test]
fn rotate_keeps_the_norm_and_ignores_signs_and_order() {
    let (m, n, k, r) = (64, 48, 8, 5);
    let (us, vs) = (orthonormal(m, k, 21, 1), orthonormal(n, k, 21, 2));
    let (ut, vt) = (drifted(&us, 0.2, 22), drifted(&vs, 0.2, 23));
    let src = lora(m, n, r, 24);
    let out = rotate(
        &src,
        &basis(us.clone(), vs.clone()),
        &basis(ut.clone(), vt.clone()),
    );
    let before = modes::update_norm(&src);
    let after = modes::update_norm(&out);
    assert!(
        ((after - before) / before).abs() < 1e-5,
        "norm {before} became {after}"
    );
    // It moved the update: not the copy.
    assert!(max_abs_diff(&out.b, &src.b) > 1e-2);
    // Flipping and reversing the columns of either basis changes nothing.
    let shuffle = |x: &Mat<f32>| {
        let k = x.ncols();
        Mat::from_fn(x.nrows(), k, |i, j| {
            let sign = if j % 2 == 0 { -1.0 } else { 1.0 };
            sign * x[(i, k - 1 - j)]
        })
    };
    let again = rotate(
        &src,
        &basis(shuffle(&us), shuffle(&vs)),
        &basis(shuffle(&ut), vt.clone()),
    );
    assert!(max_abs_diff(&again.b, &out.b) < 1e-5);
    assert!(max_abs_diff(&again.a, &out.a) < 1e-5);
}

#[test]
fn rotate_refuses_shapes_that_differ() {
    let (us, vs) = (orthonormal(20, 4, 1, 1), orthonormal(16, 4, 1, 2));
    let src = lora(20, 16, 2, 3);
    let b = basis(us, vs);
    let err = CpuBackend
        .transfer(Mode::Rotate, &src, Some(&b), Some(&b), (24, 16))
        .unwrap_err();
    assert!(
        err.to_string().contains("rotate needs equal shapes"),
        "{err}"
    );
}
