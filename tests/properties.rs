//! Property tests (proptest): safetensors round trips, randomized-SVD invariants, and invariances
//! of the transfer modes, on random shapes and values.

mod common;

use common::*;
use faer::Mat;
use loraxfer::backend::cpu::CpuBackend;
use loraxfer::backend::{Backend, Basis, Factors};
use loraxfer::io::safetensors::{
    decode_f32, encode_f32, pt_metadata, write_file, FloatType, OutTensor, TensorFile,
};
use loraxfer::modes::{self, Mode};
use proptest::prelude::*;

fn dtype() -> impl Strategy<Value = FloatType> {
    prop_oneof![
        Just(FloatType::F32),
        Just(FloatType::F16),
        Just(FloatType::Bf16)
    ]
}

fn svd_of(w: &Mat<f32>, k: usize, p: usize, q: usize, seed: u64) -> Basis {
    rsvd_of(w, "w", k, p, q, seed)
}

fn update(f: &Factors) -> Mat<f32> {
    mm(f.b.as_ref(), f.a.as_ref())
}

fn flip(b: &Basis, signs: &[bool]) -> Basis {
    let s = |j: usize| if signs[j % signs.len()] { -1.0 } else { 1.0 };
    Basis {
        u: Mat::from_fn(b.u.nrows(), b.u.ncols(), |i, j| b.u[(i, j)] * s(j)),
        s: b.s.clone(),
        v: Mat::from_fn(b.v.nrows(), b.v.ncols(), |i, j| b.v[(i, j)] * s(j)),
        next: b.next,
        resident: None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn safetensors_round_trip(ty in dtype(), dims in prop::collection::vec(1usize..9, 1..4), seed in 0u64..1000) {
        let n: usize = dims.iter().product();
        let values: Vec<f32> = (0..n).map(|i| gaussian(1, 1, seed, i as u64)[(0, 0)] * 3.0).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let tensors = vec![
            ("x".to_string(), OutTensor::from_f32(values.clone(), dims.clone(), ty)),
            ("empty".to_string(), OutTensor::from_f32(Vec::new(), vec![0, 3], ty)),
        ];
        write_file(&path, &tensors, pt_metadata()).unwrap();
        let file = TensorFile::open(&path).unwrap();
        prop_assert_eq!(&file.entry("x").unwrap().shape, &dims);
        let back = file.read_f32("x").unwrap();
        // Exactly the values rounded to the storage type.
        prop_assert_eq!(back, decode_f32(&encode_f32(&values, ty), ty));
        prop_assert_eq!(file.read_f32("empty").unwrap().len(), 0);
    }

    #[test]
    fn randomized_svd_invariants(m in 6usize..60, n in 6usize..60, k in 1usize..8, q in 0usize..3, seed in 0u64..100) {
        let k = k.min(m).min(n);
        let total = m.min(n);
        let sigma: Vec<f32> = (0..total).map(|i| if i < k { 5.0 + (k - i) as f32 } else { 0.05 / (1 + i) as f32 }).collect();
        let w = planted(m, n, &sigma, seed);
        let b = svd_of(&w, k, 5, q, seed);
        let eye = Mat::<f32>::identity(k, k);
        prop_assert!(max_abs_diff(&mm(b.u.transpose(), b.u.as_ref()), &eye) < 1e-4);
        prop_assert!(max_abs_diff(&mm(b.v.transpose(), b.v.as_ref()), &eye) < 1e-4);
        for i in 0..k {
            prop_assert!(b.s[i] >= 0.0);
            if i > 0 { prop_assert!(b.s[i] <= b.s[i - 1] * (1.0 + 1e-5)); }
        }
        let approx = mm(Mat::from_fn(m, k, |i, j| b.u[(i, j)] * b.s[j]).as_ref(), b.v.transpose());
        let tail: f32 = sigma[k..].iter().map(|s| s * s).sum::<f32>().sqrt();
        // Without power iterations the sketch mixes the tail into the range: Halko, Martinsson
        // & Tropp (2011), Thm 10.7, with t = 6 and u = 5 (fails with probability below 3e-4
        // for the oversampling p = 5), plus one tail for the rank-k truncation of the sketched
        // range. With one or more iterations the tail's share shrinks by (σ_k+1/σ_k)^2q, far
        // below 1e-3 here, and the residual is within twice the tail.
        let (kf, p) = (k as f32, 5.0f32);
        let bound = if q == 0 {
            (2.0 + 6.0 * (3.0 * kf / (p + 1.0)).sqrt()) * tail
                + 5.0 * 6.0 * std::f32::consts::E * (kf + p).sqrt() / (p + 1.0)
                    * sigma.get(k).copied().unwrap_or(0.0)
        } else {
            2.0 * tail
        };
        prop_assert!(fro(&(&w - &approx)) <= bound + 1e-3 * sigma[0], "residual above the tail");
    }

    #[test]
    fn project_with_full_rank_is_the_identity(n in 3usize..40, r in 1usize..6, seed in 0u64..100) {
        let w = gaussian(n, n, seed, 7);
        let basis = svd_of(&w, n, 4, 1, seed);
        let src = Factors { b: gaussian(n, r, seed, 8), a: gaussian(r, n, seed, 9) };
        let out = CpuBackend.transfer(Mode::Project, &src, None, Some(&basis), (n, n)).unwrap();
        prop_assert!(max_abs_diff(&update(&out), &update(&src)) < 1e-3 * fro(&update(&src)).max(1.0));
    }

    #[test]
    fn procrustes_is_invariant_to_sign_flips_and_align_to_paired_flips(
        m in 8usize..30, n in 8usize..30, k in 1usize..6, seed in 0u64..100,
        flips_s in prop::collection::vec(any::<bool>(), 1..6), flips_t in prop::collection::vec(any::<bool>(), 1..6),
    ) {
        let k = k.min(m).min(n);
        let (ws, wt) = (gaussian(m, n, seed, 1), gaussian(m, n, seed, 2));
        let (bs, bt) = (svd_of(&ws, k, 4, 1, seed), svd_of(&wt, k, 4, 1, seed));
        let src = Factors { b: gaussian(m, 2, seed, 3), a: gaussian(2, n, seed, 4) };
        let base = update(&CpuBackend.transfer(Mode::Procrustes, &src, Some(&bs), Some(&bt), (m, n)).unwrap());
        let flipped = update(&CpuBackend.transfer(Mode::Procrustes, &src, Some(&flip(&bs, &flips_s)), Some(&flip(&bt, &flips_t)), (m, n)).unwrap());
        prop_assert!(max_abs_diff(&base, &flipped) < 1e-4 * fro(&base).max(1.0));
        let al = update(&CpuBackend.transfer(Mode::Align, &src, Some(&bs), Some(&bt), (m, n)).unwrap());
        let al_flipped = update(&CpuBackend.transfer(Mode::Align, &src, Some(&flip(&bs, &flips_s)), Some(&flip(&bt, &flips_s)), (m, n)).unwrap());
        prop_assert!(max_abs_diff(&al, &al_flipped) < 1e-4 * fro(&al).max(1.0));
    }

    #[test]
    fn a_zero_adapter_transfers_to_a_zero_adapter(m in 4usize..30, n in 4usize..30, seed in 0u64..100) {
        let k = 3.min(m).min(n);
        let (bs, bt) = (svd_of(&gaussian(m, n, seed, 1), k, 3, 1, seed), svd_of(&gaussian(m, n, seed, 2), k, 3, 1, seed));
        let zero = Factors { b: Mat::zeros(m, 2), a: gaussian(2, n, seed, 5) };
        for mode in [Mode::Copy, Mode::Project, Mode::Align, Mode::Procrustes, Mode::Resample] {
            let out = CpuBackend.transfer(mode, &zero, Some(&bs), Some(&bt), (m, n)).unwrap();
            prop_assert_eq!(modes::update_norm(&out), 0.0);
        }
    }
}
