//! The CUDA backend: this project's kernels (kernels/*.cu) driven from Rust.
//!
//! - [`device`]: what a device must do (allocate, copy, launch) — implemented by the CUDA driver
//!   ([`driver`], cudarc with dynamic loading) and by the CPU emulator ([`emulator`], the same
//!   kernel sources compiled for the host), so every kernel and all host code here are tested
//!   against the CPU reference even on machines without a GPU.
//! - [`ops`]: one typed launcher per kernel; [`rsvd`]: the batched randomized SVD;
//!   [`backend`]: the [`crate::backend::Backend`] implementation; [`selftest`]: kernel checks.

pub mod backend;
pub mod bench;
pub mod device;
pub mod driver;
#[cfg(loraxfer_kernel_emulator)]
pub mod emulator;
mod gpus;
pub mod kernels;
pub mod ops;
pub mod rsvd;
pub mod selftest;

use std::sync::Arc;

pub use backend::CudaBackend;
use device::Gpu;

use crate::error::Result;

/// Whether this build carries the CPU emulator of the kernels (a C++20 compiler at build time).
pub const fn emulator_available() -> bool {
    cfg!(loraxfer_kernel_emulator)
}

/// Whether this build carries compiled CUDA kernels (nvcc at build time).
pub const fn kernels_compiled() -> bool {
    cfg!(loraxfer_cuda_kernels)
}

/// The backend on the CPU emulator (slow; for tests and `selftest --device emulator`).
pub fn emulator_backend() -> Result<CudaBackend> {
    // Small blocks: each emulated thread is a fiber.
    emulator_backend_with_block(32)
}

/// The block size of the block-per-matrix kernels on a GPU ([`ops::Ops::small_block`]).
pub const GPU_BLOCK: u32 = 256;

/// The backend on the CPU emulator with `small_block` threads in the block-per-matrix kernels
/// ([`GPU_BLOCK`] runs their reductions and barriers as a GPU does; a power of two ≤ 256).
pub fn emulator_backend_with_block(small_block: u32) -> Result<CudaBackend> {
    if !small_block.is_power_of_two() || small_block > GPU_BLOCK {
        return Err(crate::error::Error::arg(
            "--block-size",
            "a power of two no larger than 256",
        ));
    }
    #[cfg(loraxfer_kernel_emulator)]
    {
        // Small pieces: the test models' few matrices of a shape still go through the pipeline
        // in several pieces.
        emulator::check_cpu()?;
        Ok(CudaBackend::new(
            Gpu(Arc::new(emulator::Emulator::new())),
            small_block,
            "emulator",
            64 << 10,
        ))
    }
    #[cfg(not(loraxfer_kernel_emulator))]
    {
        Err(crate::error::Error::Unavailable(
            "this build has no kernel emulator (no C++20 compiler at build time, or \
             LORAXFER_NO_EMULATOR set)"
                .into(),
        ))
    }
}

/// The backend on an emulated device of `bytes` memory (tests of bounded device memory).
pub fn emulator_backend_with_memory(bytes: usize) -> Result<CudaBackend> {
    #[cfg(loraxfer_kernel_emulator)]
    {
        emulator::check_cpu()?;
        Ok(CudaBackend::new(
            Gpu(Arc::new(emulator::Emulator::with_capacity(bytes))),
            32,
            "emulator",
            backend::PIECE_BYTES,
        ))
    }
    #[cfg(not(loraxfer_kernel_emulator))]
    {
        let _ = bytes;
        emulator_backend()
    }
}

/// The backend on GPU 0.
pub fn cuda_backend() -> Result<CudaBackend> {
    let driver = driver::CudaDriver::open(0)?;
    Ok(CudaBackend::new(
        Gpu(Arc::new(driver)),
        GPU_BLOCK,
        "cuda",
        backend::PIECE_BYTES,
    ))
}

/// Why `--device auto` would not use CUDA here, or None when it would.
pub fn unavailable_reason() -> Option<String> {
    if !kernels_compiled() {
        return Some("this build has no CUDA kernels".into());
    }
    if !driver::driver_present() {
        return Some("no CUDA driver".into());
    }
    match driver::list_gpus() {
        Ok(gpus) if gpus.is_empty() => Some("no GPU".into()),
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    #[cfg(loraxfer_kernel_emulator)]
    #[test]
    fn emulator_and_host_list_the_same_kernels() {
        let mut emu = super::emulator::kernel_names();
        let mut host: Vec<String> = super::kernels::names().map(String::from).collect();
        emu.sort();
        host.sort();
        assert_eq!(
            emu, host,
            "the emulator's table and the signatures build.rs parsed from kernels/api.h disagree"
        );
    }
}
