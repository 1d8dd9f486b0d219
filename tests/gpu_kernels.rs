//! The CUDA backend against the CPU reference. Every kernel runs twice here when it can: on the
//! CPU emulator (the kernel sources compiled for the host, so this runs on every machine with a
//! C++20 compiler) and on a real GPU when the machine has one; either skips, saying so, when it
//! cannot run: a build without the emulator (or without CUDA kernels) marks the tests that need it
//! ignored, with the reason, so the test runner reports them as ignored rather than passed, and a
//! test that finds no GPU at run time prints a "skipped: ..." line. The checks themselves are
//! `loraxfer::backend::cuda::selftest`, the same code `loraxfer selftest` runs.

mod common;

use common::cli::{ok, s, Fixtures};
use common::{fresh_seed, max_abs_diff};
use loraxfer::backend::cuda::rsvd::{truncated_svd_batch, RawMatrix};
use loraxfer::backend::cuda::{self, selftest};
use loraxfer::backend::SvdParams;
use loraxfer::io::safetensors::{encode_f32, FloatType, TensorFile};
use loraxfer::timing::Timings;

/// Kernels checked inside a composition rather than by their own name: the three steps of
/// CholeskyQR2, and the last two of the decomposition.
const CHECKED_WITHIN: [(&str, &str); 5] = [
    ("gram_f64", "cholesky_qr2"),
    ("cholesky_f64", "cholesky_qr2"),
    ("trsm_rows", "cholesky_qr2"),
    ("scale_columns", "truncated_svd"),
    ("canonical_signs", "truncated_svd"),
];

fn assert_all_pass(checks: &[selftest::Check], seed: u64, device: &str) {
    // Every kernel in kernels/api.h is checked, by name or within its composition.
    for kernel in cuda::kernels::names() {
        let check = CHECKED_WITHIN
            .iter()
            .find(|(k, _)| *k == kernel)
            .map_or(kernel, |(_, within)| *within);
        assert!(
            checks.iter().any(|c| c.kernel == check),
            "{device}: no check covers the kernel {kernel}"
        );
    }
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| !c.passed())
        .map(|c| {
            format!(
                "{} {}: {:.3e} > {:.1e}",
                c.kernel, c.case, c.error, c.tolerance
            )
        })
        .collect();
    assert!(failed.is_empty(), "{device}, seed {seed}: {failed:#?}");
}

/// The reason a test that needs the kernel emulator cannot run in this build, printed as skipped
/// (the test is also marked ignored by the cfg_attr on it, so this shows only with --ignored).
fn emulator_missing() -> bool {
    if cuda::emulator_available() {
        return false;
    }
    eprintln!("skipped: no C++20 compiler at build time: kernel emulator not built");
    true
}

/// A test that needs the kernel emulator: reported as ignored, with the reason, in a build
/// without it, and saying "skipped" if run there anyway (`--ignored`).
macro_rules! emulator_test {
    ($(#[$meta:meta])* fn $name:ident() $body:block) => {
        $(#[$meta])*
        #[test]
        #[cfg_attr(
            not(loraxfer_kernel_emulator),
            ignore = "no C++20 compiler at build time: kernel emulator not built"
        )]
        fn $name() {
            if emulator_missing() {
                return;
            }
            $body
        }
    };
}

emulator_test! {
    fn every_kernel_matches_the_cpu_reference_on_the_emulator() {
        let backend = cuda::emulator_backend().unwrap();
        let seed = fresh_seed();
        let checks = selftest::run(&backend, seed, false).unwrap();
        assert_all_pass(&checks, seed, "emulator");
    }
}

emulator_test! {
    /// The kernels with a GPU's block size (256 threads in the block-per-matrix kernels: their
    /// reductions and barriers over the whole width), on the emulator, where the default is 32.
    fn the_kernels_pass_with_the_gpu_block_size_on_the_emulator() {
        let backend = cuda::emulator_backend_with_block(cuda::GPU_BLOCK).unwrap();
        assert_eq!(backend.ops().small_block, 256);
        let seed = fresh_seed();
        let checks = selftest::run(&backend, seed, true).unwrap();
        assert!(checks.len() >= 30, "only {} checks ran", checks.len());
        assert_all_pass(&checks, seed, "emulator, block 256");
        // What `loraxfer info` runs first on a GPU.
        assert!(selftest::first_light(&backend).unwrap() <= 1e-5);
    }
}

emulator_test! {
    /// Launches from different OS threads run side by side on the emulator, each with its own
    /// launch state and `__shared__` memory: the same checks with the same seed on two threads at
    /// once pass and give bit-identical errors (a block that saw another thread's shared memory or
    /// block size would differ, or fail).
    fn concurrent_launches_on_the_emulator_do_not_interfere() {
        let seed = fresh_seed();
        let run = move || {
            let backend = cuda::emulator_backend().unwrap();
            selftest::run(&backend, seed, true).unwrap()
        };
        let (a, b) = std::thread::scope(|scope| {
            let a = scope.spawn(run);
            let b = scope.spawn(run);
            (a.join().unwrap(), b.join().unwrap())
        });
        assert_all_pass(&a, seed, "emulator, thread 1");
        assert_all_pass(&b, seed, "emulator, thread 2");
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(
                (x.case.as_str(), x.error.to_bits()),
                (y.case.as_str(), y.error.to_bits()),
                "seed {seed}: {} differs between the threads",
                x.kernel
            );
        }
    }
}

#[test]
#[cfg_attr(
    not(loraxfer_cuda_kernels),
    ignore = "no nvcc at build time: this build has no CUDA kernels"
)]
fn every_kernel_matches_the_cpu_reference_on_the_gpu() {
    if let Some(reason) = cuda::unavailable_reason() {
        // On a machine that has a GPU, LORAXFER_REQUIRE_GPU=1 turns a silent skip into a failure.
        assert!(
            std::env::var_os("LORAXFER_REQUIRE_GPU").is_none(),
            "LORAXFER_REQUIRE_GPU is set, but there is no GPU to test: {reason}"
        );
        eprintln!("skipped: no GPU to test ({reason})");
        return;
    }
    let backend = cuda::cuda_backend().unwrap();
    let seed = fresh_seed();
    let checks = selftest::run(&backend, seed, false).unwrap();
    assert_all_pass(&checks, seed, "cuda");
}

emulator_test! {
    /// A whole transfer through the CUDA backend's host code and kernels (on the emulator) gives the
    /// CPU backend's adapter: raw bf16 weights read by the kernels, batched SVD, similarity and the
    /// subspace products, rotate's basis products and the map's weight products, in the real
    /// pipeline.
    fn a_transfer_on_the_emulator_writes_the_cpu_adapter() {
        let f = Fixtures::new();
        // The last: onto a deeper model, where source layers serve two target layers each and
        // their bases, batched once, are held for the second.
        let deeper = f.root.path().join("deeper");
        common::cli::synth("model", &deeper, &["--like", "tiny-qwen2", "--layers", "6"]);
        let cases = [
            ("project", &f.target, "project"),
            ("align", &f.target, "align"),
            ("rotate", &f.target, "rotate"),
            ("map", &f.target, "map"),
            ("align", &deeper, "align-deeper"),
        ];
        for (mode, target, label) in cases {
            let out = |dev: &str| f.root.path().join(format!("{label}-{dev}"));
            for dev in ["cpu", "emulator"] {
                ok(&[
                    "transfer",
                    "--source-base",
                    s(&f.source),
                    "--target-base",
                    s(target),
                    "--adapter",
                    s(&f.adapter),
                    "--out",
                    s(&out(dev)),
                    "--mode",
                    mode,
                    "--rank",
                    "8",
                    "--device",
                    dev,
                    "--modules",
                    "q_proj,v_proj,down_proj",
                ]);
            }
            let cpu = TensorFile::open(&out("cpu").join("adapter_model.safetensors")).unwrap();
            let emu = TensorFile::open(&out("emulator").join("adapter_model.safetensors")).unwrap();
            let mut names: Vec<&str> = cpu.names().collect();
            names.sort();
            assert!(!names.is_empty());
            for name in names {
                let (a, b) = (cpu.read_f32(name).unwrap(), emu.read_f32(name).unwrap());
                assert_eq!(
                    cpu.entry(name).unwrap().shape,
                    emu.entry(name).unwrap().shape,
                    "{mode} {name}: shapes differ"
                );
                assert!(
                    a.iter().chain(&b).all(|x| x.is_finite()),
                    "{mode} {name}: a written factor is not finite"
                );
                let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
                let diff = a
                    .iter()
                    .zip(&b)
                    .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(
                    diff <= 1e-3 * scale,
                    "{mode} {name}: emulator differs from cpu by {diff} (scale {scale})"
                );
            }
            let report = common::cli::read_json(&out("emulator").join("transfer_report.json"));
            let device = report["device"].as_str().unwrap_or_default();
            assert!(
                device.starts_with("emulator"),
                "report says device {device:?}"
            );
        }
    }
}

emulator_test! {
    /// Weights as large as the device stream through it: on an emulated device of 192 KiB, twelve
    /// 16 KiB matrices (192 KiB, plus their workspace and bases) are decomposed piece by piece with the same result as in one batch
    /// on an unbounded device; a device too small for even one matrix fails with an error that says
    /// what could not be allocated.
    fn weights_larger_than_device_memory_stream_through() {
        let (m, n, count) = (64, 128, 12);
        let seed = fresh_seed();
        let bytes: Vec<Vec<u8>> = (0..count)
            .map(|b| {
                let w: Vec<f32> = (0..m * n)
                    .map(|i| {
                        loraxfer::linalg::philox::gaussian4(seed, b, (i / n) as u32, (i % n) as u32 / 4)
                            [i % 4]
                    })
                    .collect();
                encode_f32(&w, FloatType::Bf16)
            })
            .collect();
        let names: Vec<String> = (0..count).map(|b| format!("m.{b}.weight")).collect();
        let mats: Vec<RawMatrix<'_>> = (0..count as usize)
            .map(|b| RawMatrix {
                name: &names[b],
                bytes: &bytes[b],
                ty: FloatType::Bf16,
                rows: m,
                cols: n,
                unchecked: None,
            })
            .collect();
        let params = SvdParams {
            rank: 8,
            oversample: 4,
            power_iters: 1,
            seed,
        };
        let t = Timings::default();
        let small = cuda::emulator_backend_with_memory(192 << 10).unwrap();
        assert!(small.pieces(mats.len(), &mats[0], &params, 0).len() > 1);
        let streamed = small.svd_pipelined(&mats, &params, &t).unwrap();
        let big = cuda::emulator_backend().unwrap();
        let whole = truncated_svd_batch(big.ops(), &mats, &params, &t).unwrap();
        assert_eq!(streamed.len(), whole.len());
        for (a, b) in streamed.iter().zip(&whole) {
            assert_eq!(a.s, b.s, "seed {seed}");
            assert_eq!(a.u, b.u, "seed {seed}");
            assert_eq!(a.v, b.v, "seed {seed}");
        }

        let tiny = cuda::emulator_backend_with_memory(8 << 10).unwrap();
        let err = tiny
            .svd_pipelined(&mats, &params, &t)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot allocate") && err.contains("weights") && err.contains("out of memory"),
            "{err}"
        );
    }
}

emulator_test! {
    /// The map mode's products with a weight as stored, on the device (its W·Z and Wᵀ·Q kernels,
    /// tensor cores for the 16-bit types): the CPU's banded products to f32 rounding, for every
    /// stored type, both directions, on shapes that leave partial tiles, and a shape mismatch is
    /// an error.
    fn stored_products_on_the_emulator_match_the_cpu() {
        use loraxfer::backend::Backend;
        use loraxfer::linalg::stored::Stored;
        let seed = fresh_seed();
        let backend = cuda::emulator_backend().unwrap();
        let gaussian = |rows: usize, cols: usize, stream: u64| {
            faer::Mat::from_fn(rows, cols, |i, j| {
                loraxfer::linalg::philox::gaussian4(seed, stream, i as u32, j as u32 / 4)[j % 4]
            })
        };
        for (ty, (m, n, l)) in [
            (FloatType::Bf16, (130, 75, 17)),
            (FloatType::F16, (67, 140, 33)),
            (FloatType::F32, (96, 50, 8)),
        ] {
            let w = Stored::from_mat(gaussian(m, n, 1).as_ref(), ty);
            for transpose in [false, true] {
                let x = gaussian(if transpose { m } else { n }, l, 2);
                let want = if transpose { w.mul_t(x.as_ref()) } else { w.mul(x.as_ref()) };
                let got = backend.stored_product(&w, x.as_ref(), transpose).unwrap();
                let err = max_abs_diff(&got, &want) / want.norm_max();
                assert!(err < 1e-5, "{ty:?} {m}x{n} transpose {transpose}: {err} (seed {seed})");
            }
            let wrong = gaussian(n + 1, l, 3);
            let err = backend.stored_product(&w, wrong.as_ref(), false).unwrap_err().to_string();
            assert!(err.contains(&format!("{m}×{n} weight")), "{err}");
        }
    }
}
