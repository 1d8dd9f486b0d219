//! `loraxfer selftest`: every kernel against the CPU reference (src/backend/cuda/selftest.rs).

use loraxfer::backend::cuda::{self, selftest};
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
    /// Fewer and smaller cases.
    #[arg(long)]
    quick: bool,
    /// Also time every kernel on Qwen2.5-1.5B-shaped batches (GPU only).
    #[arg(long)]
    bench: bool,
}

pub fn run(args: SelftestArgs) -> Result<()> {
    let backend = match args.device {
        SelftestDevice::Emulator => cuda::emulator_backend()?,
        SelftestDevice::Cuda => cuda::cuda_backend()?,
        SelftestDevice::Auto => match cuda::unavailable_reason() {
            None => cuda::cuda_backend()?,
            Some(reason) => {
                println!("selftest: no GPU to test ({reason}); `--device emulator` checks the kernels on the CPU");
                return Ok(());
            }
        },
    };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    println!(
        "selftest on {} (seed {seed}{})",
        backend.ops().gpu.describe(),
        if args.quick { ", quick" } else { "" }
    );
    let start = std::time::Instant::now();
    let checks = selftest::run(&backend, seed, args.quick)?;
    println!(
        "{:<22} {:<48} {:>11} {:>9}  result",
        "kernel", "case", "error", "tolerance"
    );
    for c in &checks {
        println!(
            "{:<22} {:<48} {:>11.3e} {:>9.1e}  {}",
            c.kernel,
            c.case,
            c.error,
            c.tolerance,
            if c.passed() { "ok" } else { "MISMATCH" }
        );
    }
    let failed = checks.iter().filter(|c| !c.passed()).count();
    println!(
        "selftest: {} checks, {failed} mismatched ({:.1} s)",
        checks.len(),
        start.elapsed().as_secs_f64()
    );
    if args.bench {
        if args.device == SelftestDevice::Emulator {
            return Err(Error::arg(
                "--bench",
                "it times the GPU; the emulator's times mean nothing",
            ));
        }
        // Qwen2.5-1.5B: 28 layers of q/o, k/v, gate/up, down; k = 256, p = 16.
        let shapes = [
            (1536, 1536, 28),
            (256, 1536, 28),
            (8960, 1536, 28),
            (1536, 8960, 28),
        ];
        let mut timings = loraxfer::backend::cuda::bench::run(&backend, &shapes, 272, 5)?;
        timings.extend(loraxfer::backend::cuda::bench::copies(&backend, 1 << 30)?);
        // The whole SVD of the 28 gate_proj, with and without copy/compute overlap.
        let params = loraxfer::backend::SvdParams {
            rank: 256,
            oversample: 16,
            power_iters: 2,
            seed,
        };
        timings.extend(loraxfer::backend::cuda::bench::pipeline(
            &backend,
            (8960, 1536, 28),
            &params,
        )?);
        println!(
            "\n{:<30} {:<32} {:>10} {:>10} {:>10}",
            "kernel", "case", "ms", "GB/s", "TFLOP/s"
        );
        for t in &timings {
            println!(
                "{:<30} {:<32} {:>10.3} {:>10.1} {:>10.2}",
                t.kernel,
                t.case,
                t.ms,
                t.gbps(),
                t.tflops()
            );
        }
    }
    if failed > 0 {
        return Err(Error::Device(format!(
            "selftest: {failed} of {} checks mismatched the CPU reference (seed {seed})",
            checks.len()
        )));
    }
    Ok(())
}
