//! The CPU paths never hold a weight in f32 whole (docs/METHOD.md, "Memory"), measured with a
//! counting allocator:
//! - a decomposition reads the stored bf16 bytes a band of rows at a time: the heap it adds at
//!   its peak stays far below the weight's f32 size (128 MiB here), and equals what a weight
//!   twice as tall adds (a band, the sketches, the bases);
//! - the map mode's products with a stored weight do the same, a band per task;
//! - the map's bottom residual fit holds one anchor set at a time, centered and normalized in
//!   place.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use loraxfer::backend::cpu::CpuBackend;
use loraxfer::backend::{Backend, RawWeight, SvdParams};
use loraxfer::io::safetensors::{encode_f32, FloatType};
use loraxfer::linalg::stored::Stored;
use loraxfer::map::AnchorFit;
use loraxfer::timing::Timings;

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The count is process-wide: the tests of this file take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Heap bytes `f` adds at its peak above what was live when it started.
fn peak_added(f: impl FnOnce()) -> usize {
    let start = LIVE.load(Ordering::Relaxed);
    PEAK.store(start, Ordering::Relaxed);
    f();
    PEAK.load(Ordering::Relaxed) - start
}

#[test]
fn a_decomposition_never_holds_its_weight_in_f32() {
    let _turn = one_at_a_time();
    let n = 8192;
    let params = SvdParams {
        rank: 8,
        oversample: 4,
        power_iters: 1,
        seed: 0,
    };
    // The GEMM kernels reserve a per-thread workspace on their first call (600 MiB of address
    // space, touched only as used): a small decomposition first, so it is not counted below.
    let small = encode_f32(&[0.5f32; 64 * 64], FloatType::Bf16);
    let warm = RawWeight {
        name: "warm-up",
        bytes: &small,
        ty: FloatType::Bf16,
        rows: 64,
        cols: 64,
        unchecked: None,
    };
    CpuBackend
        .truncated_svd_raw(&warm, &params, &Timings::default())
        .unwrap();
    let mut added = Vec::new();
    for m in [2048, 4096] {
        // Cheap, full-rank enough values; what is measured is memory, not accuracy.
        let values: Vec<f32> = (0..m * n)
            .map(|e: usize| ((e.wrapping_mul(2654435761) % 2001) as f32 - 1000.0) * 1e-3)
            .collect();
        let bytes = encode_f32(&values, FloatType::Bf16);
        drop(values);
        let weight = RawWeight {
            name: "w",
            bytes: &bytes,
            ty: FloatType::Bf16,
            rows: m,
            cols: n,
            unchecked: None,
        };
        let mut basis = None;
        let peak = peak_added(|| {
            basis = Some(
                CpuBackend
                    .truncated_svd_raw(&weight, &params, &Timings::default())
                    .unwrap(),
            )
        });
        let basis = basis.unwrap();
        assert!(basis.s[0] > 0.0 && basis.s.iter().all(|s| s.is_finite()));
        let f32_bytes = m * n * 4;
        assert!(
            peak < f32_bytes / 4,
            "{m} x {n}: the decomposition added {peak} bytes at its peak; the weight in f32 is {f32_bytes}"
        );
        added.push(peak);
    }
    // Twice the rows: the m × l sketch grows (by 2048 × 12 × 4 bytes per copy), the band does not.
    assert!(
        added[1] < added[0] + (1 << 20),
        "peak grew with the weight: {added:?}"
    );
}

/// Cheap, varied values (what is measured is memory, not accuracy).
fn cheap_matrix(rows: usize, cols: usize, stream: usize) -> faer::Mat<f32> {
    faer::Mat::from_fn(rows, cols, |i, j| {
        let e = (i * cols + j)
            .wrapping_mul(2654435761)
            .wrapping_add(stream * 40503);
        ((e % 2001) as f32 - 1000.0) * 1e-3
    })
}

/// A pool of two threads, as on the machines this is measured on: each task decodes one band.
/// One pool for the warm-up and the measurements: each new thread reserves its own GEMM
/// workspace on its first product, which is not what is measured.
fn two_threads() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap()
}

#[test]
fn the_map_products_never_hold_a_weight_in_f32() {
    let _turn = one_at_a_time();
    let (m, n, l) = (4096, 8192, 16);
    let values: Vec<f32> = (0..m * n)
        .map(|e: usize| ((e.wrapping_mul(2654435761) % 2001) as f32 - 1000.0) * 1e-3)
        .collect();
    let w = Stored::new(encode_f32(&values, FloatType::Bf16), FloatType::Bf16, m, n);
    drop(values);
    let (x, y) = (cheap_matrix(n, l, 1), cheap_matrix(m, l, 2));
    // The GEMM workspace, reserved on each thread's first products, is not what is measured.
    let pool = two_threads();
    pool.install(|| (w.mul(x.as_ref()), w.mul_t(y.as_ref())));
    let f32_bytes = m * n * 4;
    for transpose in [false, true] {
        let mut out = None;
        let peak = peak_added(|| {
            out = Some(pool.install(|| {
                if transpose {
                    w.mul_t(y.as_ref())
                } else {
                    w.mul(x.as_ref())
                }
            }))
        });
        let out = out.unwrap();
        assert!(out.norm_l2() > 0.0);
        // A band here is 256 rows (8 MiB in f32), one per thread.
        assert!(
            peak < f32_bytes / 4,
            "transpose {transpose}: the product added {peak} bytes; the weight in f32 is {f32_bytes}"
        );
    }
}

#[test]
fn the_residual_fit_holds_one_anchor_set_at_a_time() {
    let _turn = one_at_a_time();
    let (anchors, d) = (4096, 512);
    let set = |stream| {
        (
            cheap_matrix(anchors, d, stream),
            cheap_matrix(anchors, d, stream + 1),
        )
    };
    let fit = || {
        let (e_s, e_t) = set(1);
        let mut fit = AnchorFit::new(e_s, e_t).unwrap();
        let (l_s, l_t) = set(3);
        fit.add(l_s, l_t);
        fit.finish().unwrap()
    };
    fit(); // the GEMM workspace, as above
    let mut map = None;
    let peak = peak_added(|| map = Some(fit()));
    assert!(map.unwrap().relative_residual.unwrap().is_finite());
    // Both sets and their centered and normalized copies would be 8 matrices; one set is 2.
    let set_bytes = 2 * anchors * d * 4;
    assert!(
        peak < 2 * set_bytes,
        "the fit added {peak} bytes at its peak; one anchor set is {set_bytes}"
    );
}
