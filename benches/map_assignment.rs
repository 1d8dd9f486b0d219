//! The map mode's neuron assignment at Qwen2.5-7B → Llama-3.1-8B MLP widths (18944 source
//! neurons, 14336 target neurons, a planted correspondence under noise), side by side with the
//! randomized SVD of one Llama-3.1-8B MLP weight (4096 × 14336, k = 256) that a subspace mode
//! computes per module: their ratio is what the assignment costs against the decompositions.
//! Run: `cargo bench --bench map_assignment`.

use criterion::{criterion_group, criterion_main, Criterion};
use faer::Mat;
use loraxfer::backend::cpu::{rsvd, CpuBackend};
use loraxfer::backend::{SvdParams, Weight};
use loraxfer::linalg::philox::gaussian4;
use loraxfer::map::matching::{assign_features, joint_features};
use loraxfer::map::neurons::COARSE;
use loraxfer::map::sketch::{fold, NEURON_SKETCH};
use loraxfer::timing::Timings;

const SOURCE: usize = 18944;
const TARGET: usize = 14336;
/// Sketch columns per view of the map's fine features (the coarse ones are folded from them,
/// as the map folds them).
const FINE: usize = NEURON_SKETCH;

fn gaussian(rows: usize, cols: usize, stream: u64) -> Mat<f32> {
    Mat::from_fn(rows, cols, |i, j| {
        gaussian4(11, stream, i as u32, (j / 4) as u32)[j % 4]
    })
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("map");
    group.sample_size(10);
    // Target neuron t is source neuron (t·7919) mod SOURCE, seen through noise as large as the
    // signal (similarities of true pairs about 0.7, of others about 0).
    let source: [Mat<f32>; 3] = [
        gaussian(SOURCE, FINE, 1),
        gaussian(SOURCE, FINE, 2),
        gaussian(SOURCE, FINE, 3),
    ];
    let truth: Vec<usize> = (0..TARGET).map(|t| t * 7919 % SOURCE).collect();
    let target: [Mat<f32>; 3] = std::array::from_fn(|v| {
        let noise = gaussian(TARGET, FINE, 10 + v as u64);
        Mat::from_fn(TARGET, FINE, |i, j| {
            source[v][(truth[i], j)] + noise[(i, j)]
        })
    });
    let folded = |views: &[Mat<f32>; 3]| views.each_ref().map(|v| fold(v, COARSE));
    let coarse = (
        joint_features(&folded(&target), COARSE),
        joint_features(&folded(&source), COARSE),
    );
    let fine = (joint_features(&target, FINE), joint_features(&source, FINE));
    let found = assign_features((&coarse.0, &coarse.1), (&fine.0, &fine.1), &CpuBackend).unwrap();
    let hits = found
        .source_of
        .iter()
        .zip(&truth)
        .filter(|(a, b)| **a == Some(**b))
        .count();
    eprintln!("assignment {SOURCE} -> {TARGET}: {hits} of {TARGET} planted pairs recovered");
    group.bench_function("assign_18944x14336", |b| {
        b.iter(|| assign_features((&coarse.0, &coarse.1), (&fine.0, &fine.1), &CpuBackend).unwrap())
    });
    // The yardstick: one randomized SVD of a Llama-3.1-8B MLP weight.
    let (m, n) = (4096, 14336);
    let data: Vec<f32> = (0..m * n)
        .map(|i| gaussian4(12, 1, (i / n) as u32, (i % n / 4) as u32)[i % 4] * 0.02)
        .collect();
    let w = Weight {
        name: "w",
        data: &data,
        rows: m,
        cols: n,
    };
    let params = SvdParams {
        rank: 256,
        oversample: 16,
        power_iters: 2,
        seed: 0,
    };
    group.bench_function("rsvd_4096x14336_k256", |b| {
        b.iter(|| rsvd::truncated_svd(&w, &params, &Timings::default()).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
