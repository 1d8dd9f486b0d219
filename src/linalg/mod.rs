//! Backend-independent numerical building blocks.

pub mod philox;
pub mod stored;

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

/// Clears the upper halves of this thread's vector registers (`vzeroupper`) where the CPU has
/// AVX. faer's AVX-512 matrix-product kernels return with them dirty, and until something clears
/// them every SSE-encoded instruction the thread runs next (this crate's loops, built for the
/// baseline x86-64; libm's `logf` and `sincosf` behind Ω) waits on a merge with them: Ω's
/// Box–Muller after one product ran at 700 ns per four normals instead of 43, and made up most
/// of a Qwen3-30B-A3B layer's transfer (docs/PERFORMANCE.md). Called after every product and
/// decomposition faer runs on this thread, and before Ω is drawn.
#[inline]
pub fn clear_upper_registers() {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX, checked just above, which is all `vzeroupper` needs.
        unsafe { zero_upper() }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn zero_upper() {
    std::arch::x86_64::_mm256_zeroupper();
}

/// [`clear_upper_registers`] on every thread of the pool, after a product faer split across
/// them.
pub fn clear_upper_registers_everywhere() {
    rayon::broadcast(|_| clear_upper_registers());
}

/// `a · b` on all cores: for the few large products outside the per-matrix work (the map mode's
/// fits and similarity matrices), which run one at a time.
pub fn mm_parallel(a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> Mat<f32> {
    let mut out = Mat::zeros(a.nrows(), b.ncols());
    matmul(out.as_mut(), Accum::Replace, a, b, 1.0f32, Par::rayon(0));
    clear_upper_registers_everywhere();
    out
}

/// That `a · b` fits into `out` (for the backends' products into a caller's buffer).
pub fn check_product_into(
    a: MatRef<'_, f32>,
    b: MatRef<'_, f32>,
    out: &faer::MatMut<'_, f32>,
) -> crate::error::Result<()> {
    if a.ncols() != b.nrows() || out.nrows() != a.nrows() || out.ncols() != b.ncols() {
        return Err(crate::error::Error::internal(format!(
            "product of a {}×{} and a {}×{} matrix into a {}×{} one",
            a.nrows(),
            a.ncols(),
            b.nrows(),
            b.ncols(),
            out.nrows(),
            out.ncols()
        )));
    }
    Ok(())
}

/// `out = a · b` on every core, checking the shapes (the output is the caller's buffer).
pub fn mm_into(
    a: MatRef<'_, f32>,
    b: MatRef<'_, f32>,
    out: faer::MatMut<'_, f32>,
) -> crate::error::Result<()> {
    check_product_into(a, b, &out)?;
    matmul(out, Accum::Replace, a, b, 1.0f32, Par::rayon(0));
    clear_upper_registers_everywhere();
    Ok(())
}

/// A matrix from row-major data (as safetensors store it), copied in cache-friendly blocks.
pub fn from_row_major(data: &[f32], rows: usize, cols: usize) -> Mat<f32> {
    MatRef::from_row_major_slice(data, rows, cols).to_owned()
}

/// `a · b`, sequential (parallelism is across matrices, so results do not depend on threads).
pub fn mm(a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> Mat<f32> {
    let mut out = Mat::zeros(a.nrows(), b.ncols());
    matmul(out.as_mut(), Accum::Replace, a, b, 1.0f32, Par::Seq);
    clear_upper_registers();
    out
}

/// FNV-1a's usual offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a over `words` (bytes, or wider values a word at a time) from `offset`: the stable hash
/// of tensor names (Ω's ids), basis-cache file names and the cache's checksums.
pub fn fnv1a(offset: u64, words: impl IntoIterator<Item = u64>) -> u64 {
    words
        .into_iter()
        .fold(offset, |h, w| (h ^ w).wrapping_mul(0x0000_0100_0000_01b3))
}

/// A seed for a check's random inputs: `LORAXFER_TEST_SEED` when set (to rerun a failure), else
/// fresh from the clock, so that every run checks new inputs. Printed, so a failing check's
/// output names the seed that reproduces it. For tests.
#[doc(hidden)]
pub fn fresh_seed() -> u64 {
    let seed = std::env::var("LORAXFER_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| crate::timing::epoch_nanos() as u64);
    eprintln!("seed {seed} (rerun with LORAXFER_TEST_SEED={seed})");
    seed
}

/// The larger of two errors, NaN if either is: `f64::max` returns the other operand when one is
/// NaN, so a fold over it (`.fold(0.0, worst)`) would forget a NaN as soon as a finite value
/// follows, and an element a kernel never wrote would pass.
pub fn worst(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// Largest |a − b| entry, NaN when any difference is not finite: faer's `norm_max` (a SIMD max)
/// and `f32::max` may skip a NaN, and a comparison with a tolerance must fail on one. For checks
/// and tests.
pub fn max_abs_diff(a: &Mat<f32>, b: &Mat<f32>) -> f32 {
    assert_eq!(
        (a.nrows(), a.ncols()),
        (b.nrows(), b.ncols()),
        "shapes differ"
    );
    let mut worst = 0f32;
    for j in 0..a.ncols() {
        for i in 0..a.nrows() {
            let d = (a[(i, j)] - b[(i, j)]).abs();
            if !d.is_finite() {
                return f32::NAN;
            }
            worst = worst.max(d);
        }
    }
    worst
}
