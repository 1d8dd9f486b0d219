//! The CUDA driver as a [`Device`], through cudarc's dynamically loaded driver API: the binary
//! needs no CUDA library to build or to start, and looks for libcuda only when asked for a GPU.
//! The kernels come from the fatbins build.rs embedded (sm_90 SASS + compute_90 PTX); all are
//! loaded at start so a missing kernel is reported before any work.
//!
//! Three non-blocking streams: `compute` takes launches, allocations (stream-ordered, so a free
//! never stalls the device), small copies and reads; `copy` takes the weights, which go
//! mapped file → pinned staging buffer → device; `readback` reads finished batches. Two staging
//! buffers alternate: the host fills one (reading the file) while the DMA engine empties the
//! other, and neither waits for the kernels of the batch before. Pinning the mapped file itself (cuMemHostRegister) would fault
//! in and lock the whole checkpoint; staging keeps pinned memory at 2 × [`STAGE_BYTES`].
//!
//! Two fallbacks keep a device without these features usable, and `loraxfer info` names them:
//! without stream-ordered memory pools (`CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED` = 0) memory
//! comes from `cuMemAlloc` and goes back through `cuMemFree` after the device is idle; when pinned
//! host memory cannot be allocated, uploads copy from pageable memory.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::Mutex;

use cudarc::driver::{result, sys};

mod staging;

use super::device::{Arg, Device, LaunchShape};
use super::kernels::{self, check_launch};
use crate::error::{Error, Result};

use super::gpus::driver_error;
pub use super::gpus::{driver_present, list_gpus, GpuInfo};
use staging::StagingSlot;
pub use staging::STAGE_BYTES;

/// One GPU with this project's kernels loaded.
pub struct CudaDriver {
    ctx: sys::CUcontext,
    info: GpuInfo,
    functions: HashMap<&'static str, sys::CUfunction>,
    compute: sys::CUstream,
    copy: sys::CUstream,
    /// Reads of finished work ([`Device::read_after`]), so they do not queue behind the kernels
    /// of the next batch on `compute`.
    readback: sys::CUstream,
    /// The device's default pool, which the stream-ordered allocations draw from; None when the
    /// device has no memory pools (then cuMemAlloc / cuMemFree).
    pool: Option<sys::CUmemoryPool>,
    /// Recorded on `copy` and waited for on `compute` by [`Device::fence`].
    staged: sys::CUevent,
    /// Allocated at the first staged copy (commands that never upload weights pin nothing).
    staging: Mutex<StagingSlot>,
    /// Upload buffers (filled on `copy`) that no fence has ordered before `compute` yet, and
    /// whether all their copies are queued. A fence orders only the filled ones: another
    /// thread's fence can come while a buffer is still being filled. Freeing one still listed
    /// (an error between staging and fence) first orders `compute` after its copies.
    uploads: Mutex<HashMap<u64, bool>>,
    lock: Mutex<()>,
}

// SAFETY: driver calls are made with the context current on the calling thread (`current`);
// the staging buffers are only touched under `staging`'s lock.
unsafe impl Send for CudaDriver {}
unsafe impl Sync for CudaDriver {}

impl CudaDriver {
    /// Opens GPU `ordinal` and loads every kernel.
    pub fn open(ordinal: i32) -> Result<Self> {
        if crate::kernels::FATBINS.is_empty() {
            return Err(Error::Unavailable("this binary was built without CUDA kernels (no nvcc at build time; see scripts/setup-cuda.sh)".into()));
        }
        let info = list_gpus()?
            .into_iter()
            .find(|g| g.ordinal == ordinal)
            .ok_or_else(|| Error::Unavailable(format!("no CUDA GPU with ordinal {ordinal}")))?;
        if info.compute_capability.0 < 9 {
            return Err(Error::Unavailable(format!(
                "{} has compute capability {}.{}; the kernels are built for sm_90 (Hopper) and newer",
                info.name, info.compute_capability.0, info.compute_capability.1
            )));
        }
        let dev = result::device::get(ordinal).map_err(|e| driver_error("cuDeviceGet", e))?;
        // SAFETY: dev is valid; the primary context lives as long as the process.
        let ctx = unsafe { result::primary_ctx::retain(dev) }
            .map_err(|e| driver_error("cuDevicePrimaryCtxRetain", e))?;
        unsafe { result::ctx::set_current(ctx) }.map_err(|e| driver_error("cuCtxSetCurrent", e))?;
        let mut modules = Vec::new();
        for (stem, image) in crate::kernels::FATBINS {
            // cuModuleLoadData wants an aligned image: copy the embedded bytes into u64s.
            let mut aligned = vec![0u64; image.len().div_ceil(8)];
            bytemuck::cast_slice_mut::<u64, u8>(&mut aligned)[..image.len()].copy_from_slice(image);
            // SAFETY: a complete fatbin produced by nvcc at build time.
            let module = unsafe { result::module::load_data(aligned.as_ptr() as *const c_void) }
                .map_err(|e| {
                    driver_error(
                        &format!("loading kernels/{stem}.cu (is the driver older than CUDA 13.0?)"),
                        e,
                    )
                })?;
            modules.push(module);
        }
        let mut functions = HashMap::new();
        for name in kernels::names() {
            let c = CString::new(name).expect("no NUL in kernel names");
            let found = modules
                .iter()
                .find_map(|m| unsafe { result::module::get_function(*m, c.clone()) }.ok());
            let f = found.ok_or_else(|| {
                Error::Internal(format!(
                    "kernel {name} is missing from the embedded fatbins"
                ))
            })?;
            functions.insert(name, f);
        }
        let stream = || {
            result::stream::create(result::stream::StreamKind::NonBlocking)
                .map_err(|e| driver_error("cuStreamCreate", e))
        };
        let (compute, copy, readback) = (stream()?, stream()?, stream()?);
        // SAFETY: dev is valid.
        let pools = unsafe {
            result::device::get_attribute(
                dev,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED,
            )
        }
        .map_err(|e| driver_error("cuDeviceGetAttribute (memory pools)", e))?;
        let pool = if pools == 0 {
            None
        } else {
            // SAFETY: dev is valid.
            let pool = unsafe { result::device::get_default_mem_pool(dev) }
                .map_err(|e| driver_error("cuDeviceGetDefaultMemPool", e))?;
            use sys::CUmemPool_attribute::*;
            // Keep freed memory in the pool instead of returning it at every synchronization:
            // each piece of a batch allocates what the previous one freed (`free_memory` counts it).
            set_pool_attribute(pool, CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, u64::MAX)?;
            // Nor may an upload on `copy` reuse a block that `compute` has not finished freeing:
            // the pool would make the copy wait for the kernels, undoing the overlap.
            set_pool_attribute(
                pool,
                CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES,
                0i32,
            )?;
            Some(pool)
        };
        Ok(Self {
            ctx,
            info,
            functions,
            compute,
            copy,
            readback,
            pool,
            staged: event()?,
            staging: Mutex::new(StagingSlot::NotYet),
            uploads: Mutex::new(HashMap::new()),
            lock: Mutex::new(()),
        })
    }

    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    /// Allocates on `stream` from the pool, or with cuMemAlloc on a device without pools.
    fn device_alloc(&self, bytes: usize, stream: sys::CUstream) -> Result<u64> {
        // SAFETY: plain allocations; the caller initializes the memory before any read.
        match self.pool {
            Some(_) => unsafe { result::malloc_async(stream, bytes) },
            None => unsafe { result::malloc_sync(bytes) },
        }
        .map_err(|e| self.out_of_memory(e))
    }

    fn out_of_memory(&self, e: result::DriverError) -> Error {
        let free = result::mem_get_info().map(|(f, _)| f).unwrap_or(0);
        Error::Device(format!(
            "out of device memory? {e:?} ({:.1} MiB free)",
            free as f64 / (1 << 20) as f64
        ))
    }

    /// Makes the context current on this thread without taking the lock: for calls that block
    /// (event and stream synchronization), which must not hold up other threads' launches.
    fn bind(&self) -> Result<()> {
        // SAFETY: ctx is the retained primary context.
        unsafe { result::ctx::set_current(self.ctx) }
            .map_err(|e| driver_error("cuCtxSetCurrent", e))
    }

    /// Orders `compute` after every copy queued on `copy` so far.
    fn fence_locked(&self) -> Result<()> {
        // SAFETY: live event and streams; the wait takes the event's state at this call.
        unsafe {
            result::event::record(self.staged, self.copy)
                .map_err(|e| driver_error("cuEventRecord", e))?;
            result::stream::wait_event(
                self.compute,
                self.staged,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
            .map_err(|e| driver_error("cuStreamWaitEvent", e))
        }
    }

    fn current(&self) -> Result<std::sync::MutexGuard<'_, ()>> {
        let guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.bind()?;
        Ok(guard)
    }
}

/// Sets a pool attribute; `T` must be the attribute's C type (cuuint64_t or int).
fn set_pool_attribute<T>(
    pool: sys::CUmemoryPool,
    attr: sys::CUmemPool_attribute,
    mut value: T,
) -> Result<()> {
    // SAFETY: a live pool; `value` has the type the attribute takes (the callers above).
    unsafe { result::mem_pool::set_attribute(pool, attr, &mut value as *mut T as *mut c_void) }
        .map_err(|e| driver_error("cuMemPoolSetAttribute", e))
}

fn event() -> Result<sys::CUevent> {
    result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
        .map_err(|e| driver_error("cuEventCreate", e))
}

impl Drop for CudaDriver {
    fn drop(&mut self) {
        let staging = self.take_staging();
        if let Ok(_g) = self.current() {
            // SAFETY: everything below was created by this driver and is released once, after
            // the device has finished with it.
            unsafe {
                let _ = result::ctx::synchronize();
                if let Some(st) = staging {
                    st.release();
                }
                let _ = result::event::destroy(self.staged);
                let _ = result::stream::destroy(self.compute);
                let _ = result::stream::destroy(self.copy);
                let _ = result::stream::destroy(self.readback);
                // Hand back what the pool kept (its release threshold is "never").
                if let Some(pool) = self.pool {
                    let _ = result::mem_pool::trim_to(pool, 0);
                }
            }
        }
    }
}

impl Device for CudaDriver {
    fn describe(&self) -> String {
        format!(
            "{} ({:.0} GiB)",
            self.info.name,
            self.info.total_bytes as f64 / (1u64 << 30) as f64
        )
    }

    fn alloc(&self, bytes: usize) -> Result<u64> {
        let _g = self.current()?;
        let ptr = self.device_alloc(bytes, self.compute)?;
        // SAFETY: a live allocation of `bytes`, zeroed on the compute stream before any use.
        unsafe { result::memset_d8_async(ptr, 0, bytes, self.compute) }
            .map_err(|e| driver_error("cuMemsetD8Async", e))?;
        Ok(ptr)
    }

    fn alloc_for_upload(&self, bytes: usize) -> Result<u64> {
        let _g = self.current()?;
        // Ordered on the copy stream, which fills it; the compute stream uses it only after a fence.
        let ptr = self.device_alloc(bytes, self.copy)?;
        self.uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ptr, false);
        Ok(ptr)
    }

    fn free(&self, ptr: u64) {
        let unfenced = self
            .uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ptr)
            .is_some();
        if let Ok(_g) = self.current() {
            // An upload buffer freed before a fence ordered its copies: order the free after
            // them, or the pool could hand it out while the DMA still writes into it.
            if unfenced && self.fence_locked().is_err() {
                return; // leak it rather than risk the race
            }
            match self.pool {
                // SAFETY: ptr came from an alloc and is freed once (Buffer's Drop), after the
                // compute work queued so far, which is ordered after any copy into it.
                Some(_) => {
                    let _ = unsafe { result::free_async(ptr, self.compute) };
                }
                // cuMemFree is not stream-ordered: wait until nothing can still use the memory.
                None => unsafe {
                    if result::ctx::synchronize().is_ok() {
                        let _ = result::free_sync(ptr);
                    }
                },
            }
        }
    }

    fn write(&self, dst: u64, src: &[u8]) -> Result<()> {
        let _g = self.current()?;
        // SAFETY: from pageable memory the driver copies `src` out before returning.
        unsafe { result::memcpy_htod_async(dst, src, self.compute) }
            .map_err(|e| driver_error("cuMemcpyHtoDAsync", e))
    }

    fn stage(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.stage_upload(dst, src)
    }

    fn filled(&self, ptr: u64) {
        if let Some(f) = self
            .uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&ptr)
        {
            *f = true;
        }
    }

    fn fence(&self) -> Result<()> {
        let _g = self.current()?;
        self.fence_locked()?;
        // Copies are queued under the lock held here, so every buffer marked filled by now had
        // all its copies queued before the event: it is ordered.
        self.uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, filled| !*filled);
        Ok(())
    }

    fn record(&self) -> Result<u64> {
        let _g = self.current()?;
        let ev = event()?;
        // SAFETY: a new event on a live stream.
        unsafe { result::event::record(ev, self.compute) }
            .map_err(|e| driver_error("cuEventRecord", e))?;
        Ok(ev as u64)
    }

    fn read_after(&self, mark: u64, src: u64, dst: &mut [u8]) -> Result<()> {
        let ev = mark as sys::CUevent;
        self.bind()?;
        // SAFETY: `mark` is a live event from `record`; waiting needs no lock.
        unsafe { result::event::synchronize(ev) }
            .map_err(|e| driver_error("cuEventSynchronize (or a kernel before it)", e))?;
        {
            let _g = self.current()?;
            // SAFETY: src holds finished results (the event); dst is pageable host memory.
            unsafe { result::memcpy_dtoh_async(dst, src, self.readback) }
                .map_err(|e| driver_error("cuMemcpyDtoHAsync", e))?;
        }
        self.bind()?;
        // SAFETY: a live stream.
        unsafe { result::stream::synchronize(self.readback) }
            .map_err(|e| driver_error("cuStreamSynchronize (readback)", e))
    }

    fn forget(&self, mark: u64) {
        if let Ok(_g) = self.current() {
            // SAFETY: an event from `record`, destroyed once (Mark's Drop).
            let _ = unsafe { result::event::destroy(mark as sys::CUevent) };
        }
    }

    fn read(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        // Wait for the compute work first without the lock (a copy into pageable memory returns
        // only when done, and would hold it); errors of those kernels surface here.
        self.bind()?;
        // SAFETY: a live stream.
        unsafe { result::stream::synchronize(self.compute) }
            .map_err(|e| driver_error("cuStreamSynchronize (or a kernel before it)", e))?;
        let _g = self.current()?;
        // SAFETY: ordered after the compute work queued before it.
        unsafe { result::memcpy_dtoh_async(dst, src, self.compute) }
            .map_err(|e| driver_error("cuMemcpyDtoHAsync (or a kernel before it)", e))
    }

    fn launch(&self, kernel: &str, shape: LaunchShape, args: &[Arg]) -> Result<()> {
        check_launch(kernel, args)?;
        let f = *self
            .functions
            .get(kernel)
            .ok_or_else(|| Error::Internal(format!("no kernel named {kernel}")))?;
        let _g = self.current()?;
        let mut slots: Vec<u64> = args.iter().map(|a| a.slot()).collect();
        let mut params: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        let [gx, gy, gz] = shape.grid;
        let [bx, by, bz] = shape.block;
        // SAFETY: check_launch above has matched the arguments' count and kinds against the
        // kernel's parameters in kernels/api.h, and each slot holds its argument in the low bytes
        // of 8, as wide as any parameter; the slots outlive the call, which copies them.
        unsafe {
            result::launch_kernel(
                f,
                (gx, gy, gz),
                (bx, by, bz),
                shape.shared_bytes,
                self.compute,
                &mut params,
            )
        }
        .map_err(|e| {
            driver_error(
                &format!(
                    "launching {kernel} grid {:?} block {:?}",
                    shape.grid, shape.block
                ),
                e,
            )
        })
    }

    fn synchronize(&self) -> Result<()> {
        let _g = self.current()?;
        result::ctx::synchronize()
            .map_err(|e| driver_error("cuCtxSynchronize (or a kernel before it)", e))
    }

    fn memory_notes(&self) -> Vec<String> {
        let memory = match self.pool {
            Some(_) => {
                "device memory: stream-ordered pool (cuMemAllocAsync / cuMemFreeAsync)".into()
            }
            None => "device memory: cuMemAlloc / cuMemFree (the device has no memory pools: \
                     CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED = 0; a free waits for the device)"
                .into(),
        };
        let staging = match self.staging_ready() {
            Ok(()) => format!(
                "weight uploads: through 2 x {} MiB pinned staging buffers",
                STAGE_BYTES >> 20
            ),
            Err(reason) => {
                format!("weight uploads: from pageable memory (no pinned memory: {reason})")
            }
        };
        vec![memory, staging]
    }

    fn free_memory(&self) -> Option<usize> {
        let _g = self.current().ok()?;
        let (free, _) = result::mem_get_info().ok()?;
        let Some(pool) = self.pool else {
            return Some(free);
        };
        // Memory the pool holds but nothing uses is free to this process too.
        let pool = |attr| {
            let mut v = 0u64;
            // SAFETY: a live pool; these attributes take a cuuint64_t.
            unsafe {
                result::mem_pool::get_attribute(pool, attr, &mut v as *mut u64 as *mut c_void)
            }
            .ok()
            .map(|_| v as usize)
        };
        let reserved = pool(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?;
        let used = pool(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?;
        Some(free + reserved.saturating_sub(used))
    }
}
