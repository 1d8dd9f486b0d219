//! Known answers computed by exact SVD on small matrices with planted spectra: the randomized SVD
//! finds the top-k subspace, and each transfer mode gives what its formula says. Every run draws
//! fresh matrices and sketches (the seed is printed; `LORAXFER_TEST_SEED` repeats a run), and the
//! tolerances are what f32 arithmetic and the planted gaps allow, with a margin.

mod common;

use common::*;
use faer::Mat;
use loraxfer::backend::cpu::{factors, rsvd, CpuBackend};
use loraxfer::backend::{Backend, Basis, Factors, SvdParams, Weight};
use loraxfer::modes::{self, Mode};
use loraxfer::timing::Timings;

fn svd(w: &Mat<f32>, name: &str, k: usize, p: usize, q: usize, seed: u64) -> Basis {
    rsvd_of(w, name, k, p, q, seed)
}

/// A spectrum with a gap after `k`: 10, 9.5, ... for the top k, then 0.5 and below.
fn gapped(k: usize, total: usize) -> Vec<f32> {
    (0..total)
        .map(|i| {
            if i < k {
                10.0 - 0.25 * i as f32
            } else {
                0.5 * 0.9f32.powi((i - k) as i32)
            }
        })
        .collect()
}

fn assert_orthonormal(x: &Mat<f32>, tol: f32) {
    let g = mm(x.transpose(), x.as_ref());
    let eye = Mat::<f32>::identity(x.ncols(), x.ncols());
    let err = max_abs_diff(&g, &eye);
    assert!(err < tol, "columns not orthonormal: max |XᵀX − I| = {err}");
}

#[test]
fn randomized_svd_recovers_planted_top_subspace() {
    let seed = fresh_seed();
    for &(m, n, k) in &[(120, 80, 8), (64, 200, 12), (97, 97, 5), (300, 41, 16)] {
        let total = m.min(n).min(40);
        let w = planted(m, n, &gapped(k, total), seed ^ (m * n) as u64);
        let (ue, se, ve) = exact_svd(&w);
        let b = svd(&w, "w", k, 8, 2, seed);
        assert_eq!(
            (b.u.nrows(), b.u.ncols(), b.v.nrows(), b.v.ncols()),
            (m, k, n, k)
        );
        // Tolerances are f32 rounding (ε = 1.2e-7) grown by the products' lengths, with room
        // to spare on any CPU's kernels: the gap after k makes the sketch's own error
        // (σ_k+1/σ_k)^(2q+1) ≈ 1e-6 or less.
        assert_orthonormal(&b.u, 2e-5);
        assert_orthonormal(&b.v, 2e-5);
        // Same subspace as the exact top-k singular vectors.
        let phi_u = factors::similarity(b.u.as_ref(), ue.subcols(0, k));
        let phi_v = factors::similarity(b.v.as_ref(), ve.subcols(0, k));
        assert!(
            phi_u > 1.0 - 1e-5 && phi_v > 1.0 - 1e-5,
            "{m}x{n} k={k}: φ_U {phi_u}, φ_V {phi_v}"
        );
        // Singular values match, sorted and non-negative.
        for i in 0..k {
            assert!(
                (b.s[i] - se[i]).abs() < 5e-5 * se[0],
                "σ_{i}: {} vs exact {}",
                b.s[i],
                se[i]
            );
            assert!(b.s[i] >= 0.0 && (i == 0 || b.s[i] <= b.s[i - 1] + 1e-6));
        }
        // With a clear gap each vector matches the exact one, signs included (canonicalized):
        // rounding of order ε·σ_1 moves a vector by about ε·σ_1/gap = 1.2e-7 · 10/0.25 per entry.
        for i in 0..k.min(4) {
            let du = (0..m)
                .map(|r| (b.u[(r, i)] - ue[(r, i)]).abs() as f64)
                .fold(0.0, worst);
            let dv = (0..n)
                .map(|r| (b.v[(r, i)] - ve[(r, i)]).abs() as f64)
                .fold(0.0, worst);
            assert!(du < 2e-4 && dv < 2e-4, "vector {i}: |Δu| {du}, |Δv| {dv}");
        }
        // ‖W − UΣVᵀ‖_F is the tail of the spectrum (Eckart–Young: never below it).
        let us = Mat::from_fn(m, k, |i, j| b.u[(i, j)] * b.s[j]);
        let approx = mm(us.as_ref(), b.v.transpose());
        let tail: f32 = se[k..].iter().map(|s| s * s).sum::<f32>().sqrt();
        let err = fro(&(&w - &approx));
        assert!(
            err <= tail * 1.0001 + 1e-5,
            "residual {err} above the tail {tail}"
        );
    }
}

#[test]
fn signs_are_canonical() {
    let seed = fresh_seed();
    let w = planted(50, 30, &gapped(6, 20), seed);
    let b = svd(&w, "w", 6, 6, 1, seed);
    for i in 0..6 {
        let col: Vec<f32> = (0..50).map(|r| b.u[(r, i)]).collect();
        let big = col
            .iter()
            .copied()
            .fold(0f32, |a, x| if x.abs() > a.abs() { x } else { a });
        assert!(big > 0.0, "u_{i}'s largest entry is negative");
    }
    // Flipping W's sign flips every v_i but leaves u_i canonical.
    let neg = Mat::from_fn(50, 30, |i, j| -w[(i, j)]);
    let bn = svd(&neg, "w", 6, 6, 1, seed);
    // Negating W negates every product exactly: the same bases to the bit, up to the signs.
    assert!(max_abs_diff(&b.u, &bn.u) < 1e-6);
    assert!(max_abs_diff(&b.v, &Mat::from_fn(30, 6, |i, j| -bn.v[(i, j)])) < 1e-6);
}

#[test]
fn rank_above_the_sizes_is_capped_and_exact() {
    let seed = fresh_seed();
    // Wide: l = m, so Q is square and orthogonal to rounding, and QQᵀ = I whatever Ω is.
    // Tall: l = n < m, so Q must span W's 7 columns: with Ω = I (a full-width sketch) QR finds
    // them to rounding (a square Gaussian Ω would leave ε·cond(WΩ), now and then far more).
    for (m, n) in [(7, 12), (12, 7), (40, 9)] {
        let w = gaussian(m, n, seed, 5);
        let b = svd(&w, "w", 100, 10, 0, seed);
        assert_eq!(b.u.ncols(), m.min(n));
        let approx = mm(
            Mat::from_fn(m, m.min(n), |i, j| b.u[(i, j)] * b.s[j]).as_ref(),
            b.v.transpose(),
        );
        let err = max_abs_diff(&w, &approx) as f64;
        let scale = w.norm_max() as f64;
        assert!(
            err <= 64.0 * f32::EPSILON as f64 * scale,
            "{m}x{n}: full-rank SVD reproduces W only to {err:.3e}"
        );
    }
}

#[test]
fn same_seed_same_result_other_seed_same_subspace() {
    let seed = fresh_seed();
    let w = planted(80, 60, &gapped(5, 30), seed);
    let a = svd(&w, "layer.0", 5, 5, 1, seed);
    let b = svd(&w, "layer.0", 5, 5, 1, seed);
    assert_eq!(row_major(&a.u), row_major(&b.u));
    let data = row_major(&w);
    let weight = Weight {
        name: "layer.0",
        data: &data,
        rows: 80,
        cols: 60,
    };
    let c = rsvd::truncated_svd(
        &weight,
        &SvdParams {
            rank: 5,
            oversample: 5,
            power_iters: 1,
            seed: seed.wrapping_add(1),
        },
        &Timings::default(),
    )
    .unwrap();
    assert!(factors::similarity(a.u.as_ref(), c.u.as_ref()) > 1.0 - 1e-5);
}

fn lora(out: usize, inp: usize, r: usize, seed: u64) -> Factors {
    Factors {
        b: gaussian(out, r, seed, 3),
        a: gaussian(r, inp, seed, 4),
    }
}

fn update(f: &Factors) -> Mat<f32> {
    mm(f.b.as_ref(), f.a.as_ref())
}

#[test]
fn project_with_full_rank_on_the_same_square_model_is_the_identity() {
    let seed = fresh_seed();
    let w = gaussian(48, 48, seed, 1);
    let basis = svd(&w, "w", 48, 8, 1, seed);
    let src = lora(48, 48, 4, seed);
    for mode in [Mode::Project, Mode::Align, Mode::Procrustes] {
        let out = CpuBackend
            .transfer(mode, &src, Some(&basis), Some(&basis), (48, 48))
            .unwrap();
        // Entries of order 1, so about 800 ε: rounding through two 48-wide bases and back.
        assert!(max_abs_diff(&out.b, &src.b) < 1e-4, "{mode:?} changed B");
        assert!(max_abs_diff(&out.a, &src.a) < 1e-4, "{mode:?} changed A");
    }
}

#[test]
fn project_matches_the_dense_formula() {
    // ΔW_t = U_t U_tᵀ ΔW_s V_t V_tᵀ with exact U_t, V_t of rank k.
    let seed = fresh_seed();
    let (m, n, k) = (40, 56, 6);
    let wt = planted(m, n, &gapped(k, 30), seed);
    let (ue, _, ve) = exact_svd(&wt);
    let (u, v) = (ue.subcols(0, k).to_owned(), ve.subcols(0, k).to_owned());
    let src = lora(m, n, 3, seed);
    let basis = svd(&wt, "t", k, 8, 2, seed);
    let out = CpuBackend
        .transfer(Mode::Project, &src, None, Some(&basis), (m, n))
        .unwrap();
    assert_eq!((out.b.ncols(), out.a.nrows()), (3, 3), "rank must stay r");
    let dense = mm(
        mm(
            mm(u.as_ref(), u.transpose()).as_ref(),
            update(&src).as_ref(),
        )
        .as_ref(),
        mm(v.as_ref(), v.transpose()).as_ref(),
    );
    let err = max_abs_diff(&update(&out), &dense);
    assert!(
        err < 1e-5 * fro(&dense).max(1.0),
        "project differs from U Uᵀ ΔW V Vᵀ by {err}"
    );
}

#[test]
fn align_maps_a_permuted_copy_back() {
    // W_t = P W_s (rows permuted): the exact bases are U_t = P U_s, V_t = V_s, and align sends
    // an update inside the source's top-k subspaces to P ΔW_s.
    let seed = fresh_seed();
    let (m, n, k) = (30, 20, 20);
    let ws = planted(
        m,
        n,
        &(0..20).map(|i| 20.0 - i as f32).collect::<Vec<_>>(),
        seed,
    );
    let perm: Vec<usize> = (0..m).map(|i| (i * 7 + 3) % m).collect();
    let wt = Mat::from_fn(m, n, |i, j| ws[(perm[i], j)]);
    let bs = svd(&ws, "s", k, 4, 2, seed);
    let bt = svd(&wt, "t", k, 4, 2, seed);
    // An update that lives in the source's top-k subspaces.
    let src = Factors {
        b: mm(bs.u.as_ref(), gaussian(k, 3, seed, 1).as_ref()),
        a: mm(gaussian(3, k, seed, 2).as_ref(), bs.v.transpose()),
    };
    let out = CpuBackend
        .transfer(Mode::Align, &src, Some(&bs), Some(&bt), (m, n))
        .unwrap();
    let ds = update(&src);
    let expected = Mat::from_fn(m, n, |i, j| ds[(perm[i], j)]);
    let err = max_abs_diff(&update(&out), &expected);
    assert!(err < 2e-5 * fro(&expected), "align did not map back: {err}");
}

#[test]
fn align_across_shapes_uses_index_matched_directions() {
    let seed = fresh_seed();
    let (ws, wt) = (
        planted(30, 20, &gapped(4, 15), seed),
        planted(44, 36, &gapped(4, 20), seed.wrapping_add(1)),
    );
    let (bs, bt) = (svd(&ws, "s", 4, 6, 2, seed), svd(&wt, "t", 4, 6, 2, seed));
    let src = lora(30, 20, 2, seed);
    let out = CpuBackend
        .transfer(Mode::Align, &src, Some(&bs), Some(&bt), (44, 36))
        .unwrap();
    let core = mm(
        mm(bs.u.transpose(), update(&src).as_ref()).as_ref(),
        bs.v.as_ref(),
    );
    let expected = mm(mm(bt.u.as_ref(), core.as_ref()).as_ref(), bt.v.transpose());
    assert_eq!((out.b.nrows(), out.a.ncols()), (44, 36));
    let err = max_abs_diff(&update(&out), &expected);
    assert!(err < 1e-5 * fro(&expected), "align across shapes: {err}");
}

#[test]
fn procrustes_rotates_within_the_subspace() {
    // Target bases = source bases rotated inside the same subspace: procrustes undoes the
    // rotation, so the update is the source's projected update, whatever the rotation.
    let seed = fresh_seed();
    let (m, n, k) = (36, 28, 5);
    let ws = planted(m, n, &gapped(k, 20), seed);
    let bs = svd(&ws, "s", k, 6, 2, seed);
    let rot_u = orthonormal(k, k, seed, 3);
    let rot_v = orthonormal(k, k, seed, 4);
    let bt = Basis {
        u: mm(bs.u.as_ref(), rot_u.as_ref()),
        s: bs.s.clone(),
        v: mm(bs.v.as_ref(), rot_v.as_ref()),
        next: bs.next,
        resident: None,
    };
    let src = lora(m, n, 3, seed);
    let out = CpuBackend
        .transfer(Mode::Procrustes, &src, Some(&bs), Some(&bt), (m, n))
        .unwrap();
    let proj = CpuBackend
        .transfer(Mode::Project, &src, Some(&bs), Some(&bs), (m, n))
        .unwrap();
    let scale = fro(&update(&proj));
    let err = max_abs_diff(&update(&out), &update(&proj));
    assert!(err < 2e-5 * scale, "procrustes left the rotation: {err}");
    // Align would instead apply the rotation: its result differs.
    let al = CpuBackend
        .transfer(Mode::Align, &src, Some(&bs), Some(&bt), (m, n))
        .unwrap();
    assert!(max_abs_diff(&update(&al), &update(&proj)) > 1e-2 * scale);
}

#[test]
fn similarity_is_one_for_equal_and_k_over_m_for_random_subspaces() {
    let seed = fresh_seed();
    let x = orthonormal(400, 10, seed, 1);
    assert!((factors::similarity(x.as_ref(), x.as_ref()) - 1.0).abs() < 1e-5);
    let y = orthonormal(400, 10, seed, 2);
    let s = factors::similarity(x.as_ref(), y.as_ref());
    // E[φ] = k/m = 0.025 for independent random subspaces (not k/m² or k²: a known bug).
    assert!(s > 0.005 && s < 0.06, "random similarity {s}");
    let rotated = mm(x.as_ref(), orthonormal(10, 10, seed, 3).as_ref());
    assert!((factors::similarity(x.as_ref(), rotated.as_ref()) - 1.0).abs() < 1e-5);
}

#[test]
fn copy_and_resample() {
    let src = lora(10, 6, 2, fresh_seed());
    let c = CpuBackend
        .transfer(Mode::Copy, &src, None, None, (10, 6))
        .unwrap();
    assert_eq!(row_major(&c.b), row_major(&src.b));
    let r = CpuBackend
        .transfer(Mode::Resample, &src, None, None, (10, 6))
        .unwrap();
    assert_eq!(
        row_major(&r.a),
        row_major(&src.a),
        "resampling onto the same size is the identity"
    );
    let r = CpuBackend
        .transfer(Mode::Resample, &src, None, None, (19, 11))
        .unwrap();
    assert_eq!((r.b.nrows(), r.a.ncols()), (19, 11));
    assert_eq!(r.b[(18, 1)], src.b[(9, 1)]);
    assert_eq!(r.a[(0, 2)], src.a[(0, 1)]); // round(2·5/10) = 1
    assert!(CpuBackend
        .transfer(Mode::Copy, &src, None, None, (11, 6))
        .is_err());
}

#[test]
fn energy_in_factored_form_matches_dense() {
    let f = lora(25, 17, 4, fresh_seed());
    let dense = fro(&update(&f)) as f64;
    assert!((modes::update_norm(&f) - dense).abs() < 1e-5 * dense);
}

#[test]
fn zero_adapter_transfers_to_zero() {
    let seed = fresh_seed();
    let w = planted(20, 16, &gapped(4, 10), seed);
    let b = svd(&w, "w", 4, 4, 1, seed);
    let zero = Factors {
        b: Mat::zeros(20, 3),
        a: gaussian(3, 16, seed, 1),
    };
    for mode in [
        Mode::Project,
        Mode::Align,
        Mode::Procrustes,
        Mode::Copy,
        Mode::Resample,
    ] {
        let out = CpuBackend
            .transfer(mode, &zero, Some(&b), Some(&b), (20, 16))
            .unwrap();
        assert_eq!(modes::update_norm(&out), 0.0, "{mode:?}");
    }
}
