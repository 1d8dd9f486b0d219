//! The CPU emulator as a [`Device`]: memory is host memory, launches run the kernels compiled
//! for the host by build.rs (kernels/emulate/launch.cpp): the blocks of a launch one after
//! another, the threads of a block as fibers on the calling thread (launches from different
//! threads run side by side). Slow next to a GPU; it exists so that every kernel and the host code
//! around it are checked against the CPU reference on machines without a GPU.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CString};
use std::sync::Mutex;

use super::device::{Arg, Device, LaunchShape};
use super::kernels::{check_launch, ArgKind};
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
    fn lx_emu_fault_message() -> *const c_char;
    #[cfg(test)]
    fn lx_emu_wmma_rule_probe(offset: u32, ldm: u32) -> i32;
    #[cfg(test)]
    fn lx_emu_wmma_lane_probe(mode: i32) -> i32;
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

/// Whether this CPU can run the emulator as built: where the build machine had FMA, the kernels
/// were compiled with FMA instructions (build.rs), and a binary moved to a CPU without them would
/// die of an illegal instruction in the first launch instead of saying so.
pub fn check_cpu() -> Result<()> {
    #[cfg(all(loraxfer_emulator_fma, target_arch = "x86_64"))]
    if !std::arch::is_x86_feature_detected!("fma") {
        return Err(Error::Unavailable(
            "this build's kernel emulator uses FMA instructions, which this CPU lacks (rebuild \
             here to get one without them)"
                .into(),
        ));
    }
    Ok(())
}

/// One allocation: u64-aligned host memory, and the bytes asked for (the bounds of every access).
struct Allocation {
    data: Box<[u64]>,
    bytes: usize,
}

/// Host memory standing in for device memory, optionally within a capacity (to test that work
/// streams through a device smaller than the model). Every copy and every pointer argument of a
/// launch must lie inside a live allocation: a stray address is an error here, where on a GPU it
/// would be a fault or silent corruption.
#[derive(Default)]
pub struct Emulator {
    /// Live allocations by start address.
    blocks: Mutex<BTreeMap<u64, Allocation>>,
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

    fn used(blocks: &BTreeMap<u64, Allocation>) -> usize {
        blocks.values().map(|b| 8 * b.data.len()).sum()
    }

    fn insert(&self, fill: u64, bytes: usize) -> Result<u64> {
        let data = vec![fill; bytes.div_ceil(8).max(1)].into_boxed_slice();
        let mut blocks = self.blocks.lock().unwrap();
        if let Some(cap) = self.capacity {
            let used = Self::used(&blocks);
            if used + 8 * data.len() > cap {
                return Err(Error::Device(format!(
                    "out of memory ({} of {cap} bytes in use)",
                    used
                )));
            }
        }
        let ptr = data.as_ptr() as u64;
        blocks.insert(ptr, Allocation { data, bytes });
        Ok(ptr)
    }

    /// Checks that `len` bytes at `ptr` lie inside one live allocation (`what` names the access).
    /// A zero-length access must still point into (or at the end of) an allocation.
    fn check_range(&self, ptr: u64, len: usize, what: &str) -> Result<()> {
        let blocks = self.blocks.lock().unwrap();
        let Some((&start, block)) = blocks.range(..=ptr).next_back() else {
            return Err(Error::Internal(format!(
                "emulator: {what}: address {ptr:#x} is in no live allocation"
            )));
        };
        let end = start + block.bytes as u64;
        if ptr > end || (len > 0 && ptr == end) {
            return Err(Error::Internal(format!(
                "emulator: {what}: address {ptr:#x} is in no live allocation (the nearest below, \
                 {start:#x}, holds {} bytes)",
                block.bytes
            )));
        }
        if ptr + len as u64 > end {
            return Err(Error::Internal(format!(
                "emulator: {what}: {len} bytes at offset {} overrun an allocation of {} bytes",
                ptr - start,
                block.bytes
            )));
        }
        Ok(())
    }
}

impl Device for Emulator {
    fn describe(&self) -> String {
        "CPU emulator of the CUDA kernels".into()
    }

    fn alloc(&self, bytes: usize) -> Result<u64> {
        self.insert(0, bytes)
    }

    fn alloc_for_upload(&self, bytes: usize) -> Result<u64> {
        let poison = u64::from_ne_bytes([POISON; 8]);
        self.insert(poison, bytes)
    }

    fn free(&self, ptr: u64) {
        if let Some(block) = self.blocks.lock().unwrap().remove(&ptr) {
            // A GPU would still run copies into it before the free; here they are dropped.
            let end = ptr + 8 * block.data.len() as u64;
            self.staged
                .lock()
                .unwrap()
                .retain(|(dst, _)| !(ptr..end).contains(dst));
        }
    }

    fn stage(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.check_range(dst, src.len(), "staged copy to the device")?;
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
        self.check_range(dst, src.len(), "copy to the device")?;
        // SAFETY: checked just above: dst..dst+len lies inside a live allocation of this emulator.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    fn read(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.check_range(src, dst.len(), "copy from the device")?;
        // SAFETY: checked just above: src..src+len lies inside a live allocation.
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
        let sig = check_launch(kernel, args)?;
        for (i, (arg, param)) in args.iter().zip(sig.params).enumerate() {
            if param.kind == ArgKind::Ptr {
                let what = format!(
                    "launch of {kernel}, argument {i} ({} {})",
                    param.c_type, param.name
                );
                self.check_range(arg.slot(), 0, &what)?;
            }
        }
        let mut slots: Vec<u64> = args.iter().map(|a| a.slot()).collect();
        let mut params: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        let name = CString::new(kernel).expect("kernel names have no NUL");
        // SAFETY: check_launch matched the arguments' count and kinds against the kernel's
        // parameters in kernels/api.h, each slot holds its argument in the low bytes of 8, and
        // every pointer argument was checked above to point into a live emulator allocation.
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
            2 => Err(Error::Internal(format!(
                "emulator: launch of {kernel} exceeds a limit of compute capability 9.0 \
                 (grid {:?}, block {:?}, {} bytes of dynamic shared memory)",
                shape.grid, shape.block, shape.shared_bytes
            ))),
            _ => {
                // SAFETY: a static NUL-terminated string (or null), set by this thread's launch.
                let p = unsafe { lx_emu_fault_message() };
                let what = if p.is_null() {
                    "unknown fault".into()
                } else {
                    unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy()
                };
                Err(Error::Internal(format!(
                    "emulator: {kernel} (grid {:?}, block {:?}) broke a hardware rule: {what}",
                    shape.grid, shape.block
                )))
            }
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

    fn internal(r: Result<()>) -> String {
        match r {
            Err(Error::Internal(msg)) => msg,
            other => panic!("want an internal error, got {other:?}"),
        }
    }

    /// A launch that does not match kernels/api.h never reaches the kernel.
    #[test]
    fn a_mismatched_launch_is_refused() {
        let emu = Emulator::new();
        let (out, p) = (emu.alloc(4).unwrap(), emu.alloc(16).unwrap());
        let shape = LaunchShape::new([1, 1, 1], [32, 1, 1]);
        let good = [Arg::Ptr(out), Arg::Ptr(p), Arg::I64(4), Arg::F64(1.0)];
        emu.launch("sum_squares", shape, &good).unwrap();
        let err = internal(emu.launch("sum_squares", shape, &good[..3]));
        assert!(
            err.contains("sum_squares") && err.contains("takes 4"),
            "{err}"
        );
        let wrong_kind = [Arg::Ptr(out), Arg::Ptr(p), Arg::I32(4), Arg::F64(1.0)];
        let err = internal(emu.launch("sum_squares", shape, &wrong_kind));
        assert!(err.contains("argument 2") && err.contains("count"), "{err}");
        let err = internal(emu.launch("no_such_kernel", shape, &good));
        assert!(err.contains("no_such_kernel"), "{err}");
    }

    /// What a GPU refuses, the emulator refuses: launches beyond compute capability 9.0's
    /// limits, and WMMA fragment pointers that are not 256-bit aligned or whose row stride is
    /// not a multiple of 4 floats (the tensor-core kernels keep both; this checks the check).
    #[test]
    fn hardware_rules_are_enforced() {
        let emu = Emulator::new();
        let (out, p) = (emu.alloc(4).unwrap(), emu.alloc(16).unwrap());
        let args = [Arg::Ptr(out), Arg::Ptr(p), Arg::I64(4), Arg::F64(1.0)];
        for (grid, block) in [
            ([1, 65536, 1], [32, 1, 1]),
            ([1, 1, 65536], [32, 1, 1]),
            ([1, 1, 1], [2048, 1, 1]),
            ([1, 1, 1], [1, 1, 128]),
            ([0, 1, 1], [32, 1, 1]),
        ] {
            let err = internal(emu.launch("sum_squares", LaunchShape::new(grid, block), &args));
            assert!(err.contains("exceeds a limit"), "{grid:?} {block:?}: {err}");
        }
        let mut shared = LaunchShape::new([1, 1, 1], [32, 1, 1]);
        shared.shared_bytes = 48 * 1024 + 4;
        assert!(internal(emu.launch("sum_squares", shared, &args)).contains("dynamic shared"));
        emu.launch(
            "sum_squares",
            LaunchShape::new([1, 1, 1], [1024, 1, 1]),
            &args,
        )
        .unwrap();
        // SAFETY: the probe touches only its own buffer, which offset + 16 rows of ldm fit.
        let probe = |offset, ldm| unsafe { lx_emu_wmma_rule_probe(offset, ldm) } != 0;
        assert!(!probe(0, 20) && !probe(8, 68) && !probe(16, 64));
        assert!(probe(1, 20) && probe(4, 20), "misaligned pointers");
        assert!(probe(0, 18) && probe(0, 66), "strides not a multiple of 4");
    }

    /// mma_sync is computed once per warp and copied to the other lanes: every lane still gets
    /// the right tile, and lanes that disagree (different operands, or a call one lane skips)
    /// are a fault, as they are undefined on the hardware.
    #[test]
    fn mma_sync_is_one_product_per_warp() {
        // SAFETY: the probe runs one emulated block on this thread and touches only its own state.
        let probe = |mode| unsafe { lx_emu_wmma_lane_probe(mode) };
        assert_eq!(probe(0), 0, "every lane's tile matches the product");
        assert_eq!(probe(1), 1, "a lane with other operands is flagged");
        assert_eq!(probe(2), 1, "a lane that skips a call is flagged");
        assert_eq!(probe(0), 0, "the warps' records do not outlive a launch");
    }

    /// Copies and pointer arguments outside the live allocations are errors, not corruption.
    #[test]
    fn accesses_outside_the_allocations_are_refused() {
        let emu = Emulator::new();
        let buf = emu.alloc(12).unwrap();
        emu.write(buf, &[1u8; 12]).unwrap();
        emu.write(buf + 4, &[2u8; 8]).unwrap();
        let err = internal(emu.write(buf + 4, &[0u8; 9]));
        assert!(err.contains("overrun") && err.contains("12 bytes"), "{err}");
        let mut back = [0u8; 13];
        let err = internal(emu.read(buf, &mut back));
        assert!(
            err.contains("copy from the device") && err.contains("overrun"),
            "{err}"
        );
        let err = internal(emu.stage(buf + 8, &[0u8; 8]));
        assert!(err.contains("staged copy"), "{err}");
        let err = internal(emu.write(8, &[0u8; 1]));
        assert!(err.contains("no live allocation"), "{err}");

        let p = emu.alloc(16).unwrap();
        let shape = LaunchShape::new([1, 1, 1], [32, 1, 1]);
        let args = |out: u64| [Arg::Ptr(out), Arg::Ptr(p), Arg::I64(4), Arg::F64(1.0)];
        let err = internal(emu.launch("sum_squares", shape, &args(buf + 13)));
        assert!(
            err.contains("argument 0") && err.contains("out") && err.contains("no live allocation"),
            "{err}"
        );
        emu.free(buf);
        let err = internal(emu.launch("sum_squares", shape, &args(buf)));
        assert!(
            err.contains("no live allocation"),
            "a freed buffer was accepted: {err}"
        );
        let err = internal(emu.read(buf, &mut back[..4]));
        assert!(err.contains("no live allocation"), "{err}");
    }
}
