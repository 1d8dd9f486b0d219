//! Per-phase timers shared by all worker threads. Phases that run on several threads at once add
//! up their thread time, so their sum can exceed the wall time; `total` is wall time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Nanoseconds since the Unix epoch (0 on a clock set before it): fresh seeds and unique
/// directory names.
pub fn epoch_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// The pipeline's phases, in the order a transfer runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading config, adapter and headers; pairing modules.
    Plan,
    /// Reading weights from the map and converting them to f32.
    Load,
    /// Products with the weight: the sketch W·Ω, the power iterations and the core Qᵀ·W.
    Sketch,
    /// Orthonormalization of the sketches.
    Orth,
    /// The small SVD of the core matrix.
    Eig,
    /// Subspace similarity.
    Similarity,
    /// The factored projections of the adapter.
    Project,
    /// Building the map mode's model map (residual fit, matchings).
    Map,
    /// Writing the adapter and the report.
    Write,
}

impl Phase {
    pub const ALL: [Phase; 9] = [
        Phase::Plan,
        Phase::Load,
        Phase::Sketch,
        Phase::Orth,
        Phase::Eig,
        Phase::Similarity,
        Phase::Project,
        Phase::Map,
        Phase::Write,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Plan => "plan",
            Phase::Load => "load",
            Phase::Sketch => "sketch",
            Phase::Orth => "orth",
            Phase::Eig => "eig",
            Phase::Similarity => "similarity",
            Phase::Project => "project",
            Phase::Map => "map",
            Phase::Write => "write",
        }
    }
}

/// Whether libnvToolsExt can be loaded (looked for once; absent on most machines, and then
/// ranges cost nothing).
fn nvtx_enabled() -> bool {
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // SAFETY: only tries to dlopen the library.
    *PRESENT.get_or_init(|| unsafe { cudarc::nvtx::sys::is_culib_present() })
}

/// Accumulated nanoseconds per phase.
#[derive(Debug, Default)]
pub struct Timings {
    nanos: [AtomicU64; 9],
}

impl Timings {
    /// Runs `f`, charging its time to `phase`, inside an NVTX range of the phase's name (so
    /// `nsys profile` shows the pipeline's phases) when the NVTX library is loadable.
    pub fn time<T>(&self, phase: Phase, f: impl FnOnce() -> T) -> T {
        let _range = nvtx_enabled().then(|| cudarc::nvtx::scoped_range(phase.name()));
        let start = Instant::now();
        let out = f();
        self.add(phase, start.elapsed().as_nanos() as u64);
        out
    }

    pub fn add(&self, phase: Phase, nanos: u64) {
        self.nanos[phase as usize].fetch_add(nanos, Ordering::Relaxed);
    }

    /// Milliseconds spent in `phase`.
    pub fn ms(&self, phase: Phase) -> f64 {
        self.nanos[phase as usize].load(Ordering::Relaxed) as f64 / 1e6
    }
}
