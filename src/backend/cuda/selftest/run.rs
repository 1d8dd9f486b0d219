//! What the selftest runs and how it reports: the list of checks (quick, full, production-size),
//! each reported as it finishes, and the one-kernel check `loraxfer info` runs first.

use super::{Check, Runner};
use crate::backend::cuda::backend::CudaBackend;
use crate::error::Result;
use crate::io::safetensors::FloatType;
use crate::linalg::philox::fill_gaussian;

/// What the selftest runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Fewer and smaller cases.
    pub quick: bool,
    /// The production-size check (a planted-spectrum SVD at l = 272 on 8960 × 1536): minutes on
    /// the emulator, so the callers leave it out there unless asked.
    pub production: bool,
}

/// What the selftest reports as it goes.
pub enum Event<'a> {
    Check(&'a Check),
    /// A check left out, and why.
    Skipped(&'a str),
}

/// One tiny kernel (Philox Ω, 16 × 4 values) against the CPU Philox: the first proof that the
/// device, its driver and the embedded kernels work, for `loraxfer info`. Returns the largest
/// absolute difference (an error when it is not within rounding).
pub fn first_light(backend: &CudaBackend) -> Result<f64> {
    let (rows, cols, id) = (16, 4, 1);
    let ops = backend.ops();
    let out = ops.gpu.upload(&vec![f32::NAN; rows * cols], "Ω")?;
    ops.philox(&out, rows, cols, 0x5eed, id)?;
    let got: Vec<f32> = ops.gpu.download(out.ptr(), rows * cols)?;
    let mut want = vec![0f32; rows * cols];
    fill_gaussian(0x5eed, id, rows, cols, &mut want);
    let err = got
        .iter()
        .zip(&want)
        .fold(0f64, |e, (a, b)| super::worst(e, (a - b).abs() as f64));
    if err.is_nan() || err > 1e-5 {
        return Err(crate::Error::Device(format!(
            "philox_gaussian_f32 differs from the CPU Philox by {err:.3e}"
        )));
    }
    Ok(err)
}

/// Runs every check; `quick` uses fewer and smaller cases (the emulator in `cargo test`).
pub fn run(backend: &CudaBackend, seed: u64, quick: bool) -> Result<Vec<Check>> {
    let options = Options {
        quick,
        production: false,
    };
    Ok(run_reporting(backend, seed, options, &mut |_| {}))
}

/// Runs every check of `options`, handing each to `report` as it finishes.
pub fn run_reporting(
    backend: &CudaBackend,
    seed: u64,
    options: Options,
    report: &mut dyn FnMut(Event<'_>),
) -> Vec<Check> {
    let quick = options.quick;
    let mut r = Runner {
        backend,
        seed,
        checks: Vec::new(),
        report,
    };
    r.step("philox_gaussian_f32", |r| r.philox());
    for ty in [FloatType::F32, FloatType::F16, FloatType::Bf16] {
        let mut shapes = vec![(67, 45, 13)];
        if !quick {
            shapes.extend([(45, 130, 21), (257, 193, 72)]);
        }
        for (m, n, l) in shapes {
            r.step(&format!("products {ty:?} {m}x{n}"), |r| {
                r.products(ty, (m, n, l), false)
            });
        }
    }
    // Long sums (K = 8192 inner values: about a 7B/8B model's width; 128256 for an output head)
    // of one sign, for the products that read a weight: W·Z and the sketch sum over n, Wᵀ·Q over m.
    for (m, n) in [(64, 8192), (8192, 64)] {
        r.step(&format!("products Bf16 {m}x{n} positive"), |r| {
            r.products(FloatType::Bf16, (m, n, 16), true)
        });
    }
    r.step("panel products", |r| r.panels(37, 19, 70));
    r.step("cholesky_qr2", |r| r.orthonormalize(90, 13));
    if !quick {
        r.step("cholesky_qr2", |r| r.orthonormalize(1031, 72));
    }
    r.step("jacobi_eig_f64", |r| r.eig(40, 17));
    if !quick {
        r.step("jacobi_eig_f64", |r| r.eig(300, 144));
    }
    let mut svds = vec![
        (FloatType::Bf16, 75, 41, 6, 4),
        (FloatType::F16, 20, 63, 30, 4),
        // Tall and full width (l = n): Ω = I on both sides.
        (FloatType::Bf16, 50, 12, 8, 8),
    ];
    if !quick {
        svds.extend([
            (FloatType::F32, 301, 129, 24, 8),
            (FloatType::Bf16, 96, 515, 40, 16),
        ]);
    }
    for (ty, m, n, k, p) in svds {
        r.step("truncated_svd", |r| r.rsvd(ty, m, n, k, p, 5e-4));
    }
    if options.production {
        // Qwen2.5-1.5B's gate_proj shape at the transfer's default k = 256, p = 16 (l = 272).
        // Evenly spaced σ 0.03 apart resolve the vectors less sharply than the small cases.
        r.step("truncated_svd", |r| {
            r.rsvd(FloatType::Bf16, 8960, 1536, 256, 16, 2e-3)
        });
    } else {
        (r.report)(Event::Skipped(
            "truncated_svd 8960x1536 k=256 p=16 (l=272) Bf16: the production-size check (left \
             out on the emulator with --quick and in the test suite)",
        ));
    }
    r.step("svd pipeline", |r| r.pipeline(5, 70, 50, 6));
    r.step("dense product", |r| r.dense_product(83, 29, 131));
    r.step("similarity and transfer", |r| {
        r.similarity_and_transfer(53, 31, 7, 4)
    });
    r.step("casts", |r| r.casts(100));
    r.checks
}
