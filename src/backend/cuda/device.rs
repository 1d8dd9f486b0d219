//! What the CUDA backend needs from a device, as a trait with two implementations: the CUDA
//! driver (cudarc, [`super::driver`]) and the CPU emulator ([`super::emulator`]), which runs the
//! very same kernels on the host so the host code and the kernels are tested on machines with no
//! GPU. Memory is addressed by raw device pointers (host addresses under the emulator).
//!
//! Work runs on two queues (CUDA streams on a GPU). The compute queue takes every launch,
//! allocation, free, small write and read, in order. The copy queue takes the weights:
//! [`Device::stage`] copies a matrix from the mapped file through pinned staging buffers while
//! the compute queue is busy with the previous batch, and [`Device::fence`] makes the launches
//! after it wait for every staged copy before it. The emulator runs staged copies only at the
//! fence, so a missing fence reads poisoned memory in the tests instead of racing on a GPU.

use std::sync::Arc;

use super::kernels::ArgKind;
use crate::error::{Error, Result};

/// One kernel argument, passed by value like a `cuLaunchKernel` parameter.
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    U64(u64),
    F64(f64),
}

impl Arg {
    /// How this argument is passed, to check it against the kernel's parameter.
    pub fn kind(self) -> ArgKind {
        match self {
            Arg::Ptr(_) => ArgKind::Ptr,
            Arg::I32(_) => ArgKind::I32,
            Arg::I64(_) => ArgKind::I64,
            Arg::U64(_) => ArgKind::U64,
            Arg::F64(_) => ArgKind::F64,
        }
    }

    /// The argument's bytes in an 8-byte slot (little-endian: a 4-byte parameter reads the low half).
    pub fn slot(self) -> u64 {
        match self {
            Arg::Ptr(p) | Arg::U64(p) => p,
            Arg::I32(v) => v as u32 as u64,
            Arg::I64(v) => v as u64,
            Arg::F64(v) => v.to_bits(),
        }
    }
}

/// A launch shape: grid and block sizes, dynamic shared memory.
#[derive(Debug, Clone, Copy)]
pub struct LaunchShape {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: u32,
}

impl LaunchShape {
    pub fn new(grid: [u32; 3], block: [u32; 3]) -> Self {
        Self {
            grid,
            block,
            shared_bytes: 0,
        }
    }
}

/// A device that runs this project's kernels.
pub trait Device: Send + Sync {
    /// Name for reports and errors (e.g. "NVIDIA H200 (139 GiB)", "CPU emulator").
    fn describe(&self) -> String;
    /// `bytes` of zeroed device memory, usable by the compute queue.
    fn alloc(&self, bytes: usize) -> Result<u64>;
    /// `bytes` of device memory for the copy queue to fill ([`Device::stage`]); its contents are
    /// undefined until then (poisoned under the emulator).
    fn alloc_for_upload(&self, bytes: usize) -> Result<u64>;
    /// Releases memory from either alloc, after the compute work queued before.
    fn free(&self, ptr: u64);
    /// Host → device on the compute queue; `src` may be reused when it returns. For small data.
    fn write(&self, dst: u64, src: &[u8]) -> Result<()>;
    /// Host → device on the copy queue, through pinned staging; `src` may be reused when it
    /// returns, but the device memory is filled only for launches after the next
    /// [`Device::fence`].
    fn stage(&self, dst: u64, src: &[u8]) -> Result<()>;
    /// Launches after this wait for every [`Device::stage`] before it.
    fn fence(&self) -> Result<()>;
    /// Every copy into the upload buffer `ptr` is queued: a later fence orders them all.
    fn filled(&self, _ptr: u64) {}
    /// Device → host (waits for the compute work before it).
    fn read(&self, src: u64, dst: &mut [u8]) -> Result<()>;
    /// Marks the compute work queued so far, for [`Device::read_after`].
    fn record(&self) -> Result<u64>;
    /// Device → host once the work before `mark` is done, without waiting for compute work
    /// queued after it (the next batch's kernels).
    fn read_after(&self, mark: u64, src: u64, dst: &mut [u8]) -> Result<()>;
    /// Releases a mark.
    fn forget(&self, mark: u64);
    /// Launches `kernel` (a kernel of kernels/api.h) on the compute queue; refuses, as an
    /// internal error, a launch that does not match the kernel's signature
    /// ([`super::kernels::check_launch`]).
    fn launch(&self, kernel: &str, shape: LaunchShape, args: &[Arg]) -> Result<()>;
    /// Waits for all work on both queues (for timing).
    fn synchronize(&self) -> Result<()>;
    /// Free device memory in bytes, when the device can tell.
    fn free_memory(&self) -> Option<usize>;
    /// How this device allocates memory and uploads weights, for `loraxfer info` (and whether it
    /// fell back from stream-ordered pools or pinned staging).
    fn memory_notes(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Device memory that is released when dropped.
pub struct Buffer {
    ptr: u64,
    device: Arc<dyn Device>,
}

impl Buffer {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn arg(&self) -> Arg {
        Arg::Ptr(self.ptr)
    }
    /// True when this memory belongs to `gpu`'s device.
    pub fn on(&self, gpu: &Gpu) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.device), Arc::as_ptr(&gpu.0))
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        self.device.free(self.ptr);
    }
}

/// A point in the compute queue ([`Gpu::mark`]), released when dropped.
pub struct Mark {
    id: u64,
    device: Arc<dyn Device>,
}

impl Drop for Mark {
    fn drop(&mut self) {
        self.device.forget(self.id);
    }
}

/// A shared handle on a device with typed helpers.
#[derive(Clone)]
pub struct Gpu(pub Arc<dyn Device>);

impl Gpu {
    pub fn describe(&self) -> String {
        self.0.describe()
    }

    /// Zeroed memory for `count` values of `T`; `what` names it in an out-of-memory error.
    pub fn zeros<T: bytemuck::Pod>(&self, count: usize, what: &str) -> Result<Buffer> {
        let bytes = (count * std::mem::size_of::<T>()).max(1);
        self.allocated(self.0.alloc(bytes), bytes, what)
    }

    /// A buffer filled, on the copy queue, with `parts` back to back; launches see it after the
    /// next [`Gpu::fence`].
    pub fn stage_parts(&self, parts: &[&[u8]], what: &str) -> Result<Buffer> {
        let bytes: usize = parts.iter().map(|p| p.len()).sum();
        let buf = self.allocated(self.0.alloc_for_upload(bytes.max(1)), bytes, what)?;
        let mut offset = 0;
        for part in parts {
            self.0.stage(buf.ptr + offset as u64, part)?;
            offset += part.len();
        }
        self.0.filled(buf.ptr);
        Ok(buf)
    }

    /// Later launches wait for the staged copies.
    pub fn fence(&self) -> Result<()> {
        self.0.fence()
    }

    fn allocated(&self, ptr: Result<u64>, bytes: usize, what: &str) -> Result<Buffer> {
        let ptr = ptr.map_err(|e| match e {
            Error::Device(msg) => Error::Device(format!(
                "{}: cannot allocate {:.1} MiB for {what}: {msg}",
                self.describe(),
                bytes as f64 / (1 << 20) as f64
            )),
            other => other,
        })?;
        Ok(Buffer {
            ptr,
            device: self.0.clone(),
        })
    }

    /// A buffer holding `values`.
    pub fn upload<T: bytemuck::Pod>(&self, values: &[T], what: &str) -> Result<Buffer> {
        let buf = self.zeros::<T>(values.len(), what)?;
        self.0.write(buf.ptr, bytemuck::cast_slice(values))?;
        Ok(buf)
    }

    /// Raw bytes into a new buffer.
    pub fn upload_bytes(&self, bytes: &[u8], what: &str) -> Result<Buffer> {
        self.upload::<u8>(bytes, what)
    }

    /// `count` values of `T` from `ptr`.
    pub fn download<T: bytemuck::Pod + Default + Clone>(
        &self,
        ptr: u64,
        count: usize,
    ) -> Result<Vec<T>> {
        let mut out = vec![T::default(); count];
        self.0.read(ptr, bytemuck::cast_slice_mut(&mut out))?;
        Ok(out)
    }

    /// A mark after the compute work queued so far.
    pub fn mark(&self) -> Result<Mark> {
        Ok(Mark {
            id: self.0.record()?,
            device: self.0.clone(),
        })
    }

    /// [`Gpu::download`] once the work before `mark` is done, not waiting for work after it.
    pub fn download_after<T: bytemuck::Pod + Default + Clone>(
        &self,
        mark: &Mark,
        ptr: u64,
        count: usize,
    ) -> Result<Vec<T>> {
        let mut out = vec![T::default(); count];
        self.0
            .read_after(mark.id, ptr, bytemuck::cast_slice_mut(&mut out))?;
        Ok(out)
    }

    pub fn launch(&self, kernel: &str, shape: LaunchShape, args: &[Arg]) -> Result<()> {
        self.0.launch(kernel, shape, args)
    }

    pub fn synchronize(&self) -> Result<()> {
        self.0.synchronize()
    }
}
