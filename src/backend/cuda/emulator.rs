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

/// Host memory standing in for device memory; allocations are u64-aligned boxes, optionally
/// within a capacity (to test that work streams through a device smaller than the model).
#[derive(Default)]
pub struct Emulator {
    blocks: Mutex<HashMap<u64, Box<[u64]>>>,
    capacity: Option<usize>,
    /// Staged copies waiting for a fence: the copy queue, run as late as a GPU may run it.
    staged: Mutex<Vec<(u64, Vec<u8>)>>,
}

/// What memory for uploads holds until the copy lands: all-ones bytes, a NaN in f32, f16 and
/// bf16, so a launch that misses its fence gives NaNs the checks catch.
pub const POISON: u8 = 0xff;

impl Emulator {
    pub fn new() -> Self {
        Self::default()
    }

    /// An emulated device with `bytes` of memory: allocations past it fail as on a full GPU.
    pub fn with_capacity(bytes: usize) -> Self {
        Self {
            capacity: Some(bytes),
            ..Self::default()
        }
    }

    fn used(blocks: &HashMap<u64, Box<[u64]>>) -> usize {
        blocks.values().map(|b| 8 * b.len()).sum()
    }

    fn insert(&self, block: Box<[u64]>) -> Result<u64> {
        let mut blocks = self.blocks.lock().unwrap();
        if let Some(cap) = self.capacity {
            let used = Self::used(&blocks);
            if used + 8 * block.len() > cap {
                return Err(Error::Device(format!(
                    "out of memory ({} of {cap} bytes in use)",
                    used
                )));
            }
        }
        let ptr = block.as_ptr() as u64;
        blocks.insert(ptr, block);
        Ok(ptr)
    }
}

impl Device for Emulator {
    fn describe(&self) -> String {
        "CPU emulator of the CUDA kernels".into()
    }

    fn alloc(&self, bytes: usize) -> Result<u64> {
        self.insert(vec![0u64; bytes.div_ceil(8).max(1)].into_boxed_slice())
    }

    fn alloc_for_upload(&self, bytes: usize) -> Result<u64> {
        let poison = u64::from_ne_bytes([POISON; 8]);
        self.insert(vec![poison; bytes.div_ceil(8).max(1)].into_boxed_slice())
    }

    fn free(&self, ptr: u64) {
        if let Some(block) = self.blocks.lock().unwrap().remove(&ptr) {
            // A GPU would still run copies into it before the free; here they are dropped.
            let end = ptr + 8 * block.len() as u64;
            self.staged
                .lock()
                .unwrap()
                .retain(|(dst, _)| !(ptr..end).contains(dst));
        }
    }

    fn stage(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.staged.lock().unwrap().push((dst, src.to_vec()));
        Ok(())
    }

    fn fence(&self) -> Result<()> {
        for (dst, bytes) in self.staged.lock().unwrap().drain(..) {
            self.write(dst, &bytes)?;
        }
        Ok(())
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

    fn record(&self) -> Result<u64> {
        Ok(0) // launches return when done: every mark is already reached
    }

    fn read_after(&self, _mark: u64, src: u64, dst: &mut [u8]) -> Result<()> {
        self.read(src, dst)
    }

    fn forget(&self, _mark: u64) {}

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
            1 => Err(Error::Internal(format!(
                "emulator: no kernel named {kernel}"
            ))),
            _ => Err(Error::Internal(format!(
                "emulator: bad block size {:?} for {kernel}",
                shape.block
            ))),
        }
    }

    fn synchronize(&self) -> Result<()> {
        self.fence() // launches return when done; staged copies land now
    }

    fn free_memory(&self) -> Option<usize> {
        let cap = self.capacity?;
        Some(cap.saturating_sub(Self::used(&self.blocks.lock().unwrap())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The emulator's copy queue runs at the fence, not before: host code that forgets the
    /// fence reads poison in the tests.
    #[test]
    fn staged_copies_land_at_the_fence() {
        let emu = Emulator::new();
        let dst = emu.alloc_for_upload(16).unwrap();
        let data: Vec<u8> = (1..=16).collect();
        emu.stage(dst, &data[..8]).unwrap();
        emu.stage(dst + 8, &data[8..]).unwrap();
        let mut seen = vec![0u8; 16];
        emu.read(dst, &mut seen).unwrap();
        assert_eq!(
            seen,
            vec![POISON; 16],
            "a staged copy landed before the fence"
        );
        emu.fence().unwrap();
        emu.read(dst, &mut seen).unwrap();
        assert_eq!(seen, data);
        emu.free(dst);
        // A copy staged into memory freed before its fence is dropped, not written.
        let dst = emu.alloc_for_upload(8).unwrap();
        emu.stage(dst, &data[..8]).unwrap();
        emu.free(dst);
        assert!(emu.staged.lock().unwrap().is_empty());
    }
}
