//! The CPU backend decomposes a weight without an f32 copy of it: its products read the stored
//! bf16 bytes a band of rows at a time (docs/METHOD.md, "Memory"). Measured with a counting
//! allocator: the heap a decomposition adds at its peak stays far below the weight's f32 size
//! (128 MiB here), and equals what a weight twice as tall adds (a band, the sketches, the bases).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use loraxfer::backend::cpu::CpuBackend;
use loraxfer::backend::{Backend, RawWeight, SvdParams};
use loraxfer::io::safetensors::{encode_f32, FloatType};
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

/// Heap bytes `f` adds at its peak above what was live when it started.
fn peak_added(f: impl FnOnce()) -> usize {
    let start = LIVE.load(Ordering::Relaxed);
    PEAK.store(start, Ordering::Relaxed);
    f();
    PEAK.load(Ordering::Relaxed) - start
}

#[test]
fn a_decomposition_never_holds_its_weight_in_f32() {
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
