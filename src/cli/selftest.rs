//! `loraxfer selftest`: every kernel against the CPU reference (src/backend/cuda/selftest/).
//! Every check and every benchmark row is printed (and flushed) as soon as it is known, so a
//! kernel that hangs or kills the process still leaves the results before it.

use std::io::Write;

use loraxfer::backend::cuda::bench::{self, Row};
use loraxfer::backend::cuda::selftest::{self, Event, Options};
use loraxfer::backend::cuda::{self, CudaBackend};
use loraxfer::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SelftestDevice {
    /// The GPU when there is one, else say so and stop.
    Auto,
    /// The GPU (an error without one).
    Cuda,
    /// The kernels compiled for the CPU (slow; proves the kernels' logic without a GPU).
    Emulator,
}

#[derive(Debug, clap::Args)]
pub struct SelftestArgs {
    #[arg(long, value_enum, default_value_t = SelftestDevice::Auto)]
    device: SelftestDevice,
    /// Seed of the random inputs (default: a fresh one, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Fewer and smaller cases (and, on the emulator, no production-size check).
    #[arg(long)]
    quick: bool,
    /// Threads per block of the block-per-matrix kernels on the emulator (default 32; 256 runs
    /// their reductions and barriers with a GPU's block size).
    #[arg(long, value_name = "N")]
    block_size: Option<u32>,
    /// Also time every kernel on Qwen2.5-1.5B-shaped batches (GPU only).
    #[arg(long)]
    bench: bool,
    /// Leave out the production-size SVD (8960 × 1536, l = 272; on by default on a GPU): for
    /// runs that repeat the small checks under a slow tool (compute-sanitizer) or beside
    /// `--bench`.
    #[arg(long)]
    no_production: bool,
}

/// Prints a line and flushes it at once.
macro_rules! say {
    ($($t:tt)*) => {{
        println!($($t)*);
        let _ = std::io::stdout().flush();
    }};
}

pub fn run(args: SelftestArgs) -> Result<()> {
    if args.block_size.is_some() && args.device != SelftestDevice::Emulator {
        return Err(Error::arg(
            "--block-size",
            "only the emulator's block size can be chosen",
        ));
    }
    if args.bench && args.device == SelftestDevice::Emulator {
        return Err(Error::arg(
            "--bench",
            "it times the GPU; the emulator's times mean nothing",
        ));
    }
    let backend = match args.device {
        SelftestDevice::Emulator => {
            cuda::emulator_backend_with_block(args.block_size.unwrap_or(32))?
        }
        SelftestDevice::Cuda => cuda::cuda_backend()?,
        SelftestDevice::Auto => match cuda::unavailable_reason() {
            None => cuda::cuda_backend()?,
            Some(reason) => {
                println!("selftest: no GPU to test ({reason}); `--device emulator` checks the kernels on the CPU");
                return Ok(());
            }
        },
    };
    let seed = args
        .seed
        .unwrap_or_else(|| loraxfer::timing::epoch_nanos() as u64);
    let on_emulator = args.device == SelftestDevice::Emulator;
    let options = Options {
        quick: args.quick,
        production: !(on_emulator && args.quick || args.no_production),
    };
    say!(
        "selftest on {} (seed {seed}, block {}{})",
        backend.ops().gpu.describe(),
        backend.ops().small_block,
        if args.quick { ", quick" } else { "" }
    );
    let start = std::time::Instant::now();
    say!(
        "{:<22} {:<48} {:>11} {:>9}  result",
        "kernel",
        "case",
        "error",
        "tolerance"
    );
    let checks = selftest::run_reporting(&backend, seed, options, &mut |event| match event {
        Event::Check(c) => say!(
            "{:<22} {:<48} {:>11.3e} {:>9.1e}  {}",
            c.kernel,
            c.case,
            c.error,
            c.tolerance,
            if c.passed() { "ok" } else { "MISMATCH" }
        ),
        Event::Skipped(what) => say!("skipped: {what}"),
    });
    let failed = checks.iter().filter(|c| !c.passed()).count();
    say!(
        "selftest: {} checks, {failed} mismatched ({:.1} s)",
        checks.len(),
        start.elapsed().as_secs_f64()
    );
    if args.bench {
        benchmark(&backend, seed);
    }
    if failed > 0 {
        return Err(Error::Device(format!(
            "selftest: {failed} of {} checks mismatched the CPU reference (seed {seed})",
            checks.len()
        )));
    }
    Ok(())
}

fn print_timing(t: &bench::Timing) {
    say!(
        "{:<30} {:<32} {:>10.3} {:>10.1} {:>10.2}",
        t.kernel,
        t.case,
        t.ms,
        t.gbps(),
        t.tflops()
    );
}

/// Kernel timings on Qwen2.5-1.5B shapes, each row printed as it is measured; a part that fails
/// is reported and the rest still runs.
fn benchmark(backend: &CudaBackend, seed: u64) {
    say!(
        "\n{:<30} {:<32} {:>10} {:>10} {:>10}",
        "kernel",
        "case",
        "ms",
        "GB/s",
        "TFLOP/s"
    );
    // Qwen2.5-1.5B: 28 layers of q/o, k/v, gate/up, down; k = 256, p = 16.
    let shapes = [
        (1536, 1536, 28),
        (256, 1536, 28),
        (8960, 1536, 28),
        (1536, 8960, 28),
    ];
    bench::run(backend, &shapes, 272, 5, &mut |row| match row {
        Row::Timed(t) => print_timing(t),
        Row::Skipped(case, e) => say!("skipped: {case}: {e}"),
    });
    match bench::copies(backend, 1 << 30) {
        Ok(rows) => rows.iter().for_each(print_timing),
        Err(e) => say!("skipped: host→device copies: {e}"),
    }
    // The whole SVD of the 28 gate_proj, with and without copy/compute overlap.
    let params = loraxfer::backend::SvdParams {
        rank: 256,
        oversample: 16,
        power_iters: 2,
        seed,
    };
    match bench::pipeline(backend, (8960, 1536, 28), &params) {
        Ok(rows) => rows.iter().for_each(print_timing),
        Err(e) => say!("skipped: svd pipeline: {e}"),
    }
}
