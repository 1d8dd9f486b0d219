//! CPU backend, per phase, on real projection shapes (random weights with a decaying spectrum,
//! rounded through bf16 as real checkpoints are). Run: `cargo bench --bench cpu_phases`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use faer::Mat;
use loraxfer::backend::cpu::{factors, rsvd};
use loraxfer::backend::{Factors, SvdParams, Weight};
use loraxfer::io::safetensors::{decode_f32, encode_f32, FloatType};
use loraxfer::linalg::mm;
use loraxfer::linalg::philox::gaussian4;
use loraxfer::modes::Mode;
use loraxfer::timing::Timings;

fn weight(m: usize, n: usize) -> Vec<f32> {
    // Low-rank part plus noise: enough structure for the power iterations to matter.
    let r = 32;
    let x = Mat::from_fn(m, r, |i, j| {
        gaussian4(1, 1, i as u32, (j / 4) as u32)[j % 4] / (1.0 + j as f32)
    });
    let y = Mat::from_fn(r, n, |i, j| {
        gaussian4(1, 2, j as u32, (i / 4) as u32)[i % 4]
    });
    let w = &x * &y;
    let mut out = Vec::with_capacity(m * n);
    for i in 0..m {
        for j in 0..n {
            out.push(w[(i, j)] * 0.01 + 0.002 * gaussian4(1, 3, i as u32, (j / 4) as u32)[j % 4]);
        }
    }
    decode_f32(&encode_f32(&out, FloatType::Bf16), FloatType::Bf16)
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu");
    group.sample_size(10);
    for &(m, n, k) in &[(896, 4864, 64), (1536, 8960, 256), (3072, 8192, 256)] {
        let data = weight(m, n);
        let w = Weight {
            name: "w",
            data: &data,
            rows: m,
            cols: n,
        };
        let params = SvdParams {
            rank: k,
            oversample: 16,
            power_iters: 2,
            seed: 0,
        };
        let l = k + 16;
        let id = format!("{m}x{n}_k{k}");
        group.bench_function(BenchmarkId::new("rsvd", &id), |b| {
            b.iter(|| rsvd::truncated_svd(&w, &params, &Timings::default()).unwrap())
        });
        let omega = Mat::from_fn(n, l, |i, j| {
            gaussian4(0, 9, i as u32, (j / 4) as u32)[j % 4]
        });
        group.bench_function(BenchmarkId::new("sketch", &id), |b| {
            b.iter(|| mm(w.as_mat(), omega.as_ref()))
        });
        let y = mm(w.as_mat(), omega.as_ref());
        group.bench_function(BenchmarkId::new("orth", &id), |b| {
            b.iter(|| rsvd::orthonormalize(y.as_ref()))
        });
        let q = rsvd::orthonormalize(y.as_ref());
        let bt = mm(w.as_mat().transpose(), q.as_ref());
        group.bench_function(BenchmarkId::new("eig", &id), |b| {
            b.iter(|| bt.thin_svd().unwrap())
        });
        let basis = rsvd::truncated_svd(&w, &params, &Timings::default()).unwrap();
        group.bench_function(BenchmarkId::new("similarity", &id), |b| {
            b.iter(|| factors::similarity(basis.u.as_ref(), basis.u.as_ref()))
        });
        let lora = Factors {
            b: Mat::from_fn(m, 16, |i, j| {
                gaussian4(2, 1, i as u32, (j / 4) as u32)[j % 4]
            }),
            a: Mat::from_fn(16, n, |i, j| {
                gaussian4(2, 2, j as u32, (i / 4) as u32)[i % 4]
            }),
        };
        group.bench_function(BenchmarkId::new("project", &id), |b| {
            b.iter(|| factors::transfer(Mode::Project, &lora, None, Some(&basis), (m, n)).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
