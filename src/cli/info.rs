//! `loraxfer info`: what this build can do on this machine. Probing for a GPU never panics: the
//! driver library is looked for before any driver call.

use loraxfer::backend::cuda::{self, driver};

pub fn print() {
    println!("loraxfer {}", env!("CARGO_PKG_VERSION"));
    let k = loraxfer::kernels::FATBINS;
    println!(
        "backends: cpu (faer + rayon, {} threads){}",
        rayon::current_num_threads(),
        if k.is_empty() { "" } else { ", cuda" }
    );
    if k.is_empty() {
        println!("kernels: built without CUDA kernels (no nvcc at build time)");
    } else {
        let names: Vec<&str> = k.iter().map(|(n, _)| *n).collect();
        println!(
            "kernels: {} ({}), compiled by nvcc {}",
            names.join(", "),
            loraxfer::kernels::TARGETS,
            loraxfer::kernels::NVCC_VERSION
        );
        println!(
            "tensor cores: {} (f16/bf16 weights; LORAXFER_NO_TENSOR_CORES=1 turns them off); weights staged through 2 x {} MiB pinned buffers",
            if cuda::ops::tensor_cores_enabled() { "on" } else { "off" },
            driver::STAGE_BYTES >> 20
        );
    }
    println!(
        "kernel emulator: {}",
        if cuda::emulator_available() {
            "yes (loraxfer selftest --device emulator checks the kernels on the CPU)"
        } else {
            "no (no C++20 compiler at build time)"
        }
    );
    if !driver::driver_present() {
        println!("cuda driver: not found (no libcuda on this machine)");
    } else {
        match driver::list_gpus() {
            Ok(gpus) if gpus.is_empty() => println!("cuda driver: found, no GPU"),
            Ok(gpus) => {
                for g in gpus {
                    println!(
                        "gpu {}: {} ({:.1} GiB, compute capability {}.{})",
                        g.ordinal,
                        g.name,
                        g.total_bytes as f64 / (1u64 << 30) as f64,
                        g.compute_capability.0,
                        g.compute_capability.1
                    );
                }
            }
            Err(e) => println!("cuda driver: found, but {e}"),
        }
    }
    first_light();
    match cuda::unavailable_reason() {
        None => println!("--device auto picks: cuda"),
        Some(reason) => println!("--device auto picks: cpu ({reason})"),
    }
    let archs: Vec<String> = loraxfer::arch::all()
        .iter()
        .flat_map(|a| a.model_types.clone())
        .collect();
    println!("architectures: {}", archs.join(", "));
}

/// Opens GPU 0 and runs one tiny kernel against the CPU, so the first step of a GPU run already
/// proves the driver path (context, module loading, allocation, launch, copies); says why not
/// where it cannot.
fn first_light() {
    if let Some(reason) = cuda::unavailable_reason() {
        println!("first kernel on the gpu: not run ({reason})");
        return;
    }
    let backend = match cuda::cuda_backend() {
        Ok(b) => b,
        Err(e) => {
            println!("first kernel on the gpu: could not open gpu 0: {e}");
            return;
        }
    };
    for note in backend.ops().gpu.0.memory_notes() {
        println!("{note}");
    }
    match cuda::selftest::first_light(&backend) {
        Ok(worst) => println!(
            "first kernel on the gpu: philox_gaussian_f32 (64 values) matches the CPU Philox (largest difference {worst:.1e})"
        ),
        Err(e) => println!("first kernel on the gpu: FAILED: {e}"),
    }
}
