//! The CPU emulator as a [`Device`]: memory is host memory, launches run the kernels compiled
//! for the host by build.rs (kernels/emulate/launch.cpp). Slow by design (one OS thread per
//! device thread); it exists so that every kernel and the host code around it are checked
//! against the CPU reference on machines without a GPU.

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CString};
use std::sync::Mutex;

use super::device::{Arg, Device, LaunchShape};
use crate::error::{Error, Result};

extern "C" {
    fn lx_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        shared: u32,
        params: *mut *mut c_void,
    ) -> i32;
    fn lx_emu_kernel_name(i: u32) -> *const c_char;
}

/// The names in the emulator's launch table (built from kernels/api.h).
pub fn kernel_names() -> Vec<String> {
    let mut names = Vec::new();
    loop {
        // SAFETY: returns a static NUL-terminated string or null past the end of the table.
        let p = unsafe { lx_emu_kernel_name(names.len() as u32) };
        if p.is_null() {
            return names;
        }
        names.push(
            unsafe { std::ffi::CStr::from_ptr(p) }
                .to_string_lossy()
                .into_owned(),
        );
    }
}

/// Host memory standing in for device memory; allocations are u64-aligned boxes.
#[derive(Default)]
pub struct Emulator {
    blocks: Mutex<HashMap<u64, Box<[u64]>>>,
}

impl Emulator {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Device for Emulator {
    fn describe(&self) -> String {
        "CPU emulator of the CUDA kernels".into()
    }

    fn alloc(&self, bytes: usize) -> Result<u64> {
        let block = vec![0u64; bytes.div_ceil(8).max(1)].into_boxed_slice();
        let ptr = block.as_ptr() as u64;
        self.blocks.lock().unwrap().insert(ptr, block);
        Ok(ptr)
    }

    fn free(&self, ptr: u64) {
        self.blocks.lock().unwrap().remove(&ptr);
    }

    fn write(&self, dst: u64, src: &[u8]) -> Result<()> {
        // SAFETY: dst lies inside a live allocation of this emulator (Buffer keeps it alive).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    fn read(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        // SAFETY: as in write.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn launch(&self, kernel: &str, shape: LaunchShape, args: &[Arg]) -> Result<()> {
        let mut slots: Vec<u64> = args.iter().map(|a| a.slot()).collect();
        let mut params: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        let name = CString::new(kernel).expect("kernel names have no NUL");
        // SAFETY: params point at live slots typed as the kernel's parameters (checked by the
        // launchers in ops.rs, which mirror kernels/api.h); pointers address emulator memory.
        let rc = unsafe {
            lx_emu_launch(
                name.as_ptr(),
                shape.grid.as_ptr(),
                shape.block.as_ptr(),
                shape.shared_bytes,
                params.as_mut_ptr(),
            )
        };
        match rc {
            0 => Ok(()),
            1 => Err(Error::Backend(format!(
                "emulator: no kernel named {kernel}"
            ))),
            _ => Err(Error::Backend(format!(
                "emulator: bad block size {:?} for {kernel}",
                shape.block
            ))),
        }
    }

    fn synchronize(&self) -> Result<()> {
        Ok(()) // launches return when done
    }

    fn free_memory(&self) -> Option<usize> {
        None
    }
}
