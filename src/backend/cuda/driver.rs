//! The CUDA driver as a [`Device`], through cudarc's dynamically loaded driver API: the binary
//! needs no CUDA library to build or to start, and looks for libcuda only when asked for a GPU.
//! The kernels come from the fatbins build.rs embedded (sm_90 SASS + compute_90 PTX); all are
//! loaded at start so a missing kernel is reported before any work. Calls are serialized on the
//! context's default stream (the pipeline may call from several threads).

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::Mutex;

use cudarc::driver::{result, sys};

use super::device::{Arg, Device, LaunchShape};
use super::kernels::NAMES;
use crate::error::{Error, Result};

fn driver_error(what: &str, e: result::DriverError) -> Error {
    Error::Backend(format!("CUDA driver: {what}: {e:?}"))
}

/// True when libcuda can be loaded (never panics, unlike the first driver call without it).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library names.
    unsafe { sys::is_culib_present() }
}

/// Facts about one GPU, for `loraxfer info`.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    pub ordinal: i32,
    pub name: String,
    pub total_bytes: usize,
    pub compute_capability: (i32, i32),
}

/// The GPUs the driver sees (an error when there is no driver or it fails to initialize).
pub fn list_gpus() -> Result<Vec<GpuInfo>> {
    if !driver_present() {
        return Err(Error::Backend(
            "no CUDA driver (libcuda.so) on this machine".into(),
        ));
    }
    result::init().map_err(|e| driver_error("cuInit", e))?;
    let count = result::device::get_count().map_err(|e| driver_error("cuDeviceGetCount", e))?;
    (0..count)
        .map(|ordinal| {
            let dev = result::device::get(ordinal).map_err(|e| driver_error("cuDeviceGet", e))?;
            let name =
                result::device::get_name(dev).map_err(|e| driver_error("cuDeviceGetName", e))?;
            // SAFETY: dev comes from cuDeviceGet.
            let total_bytes = unsafe { result::device::total_mem(dev) }
                .map_err(|e| driver_error("cuDeviceTotalMem", e))?;
            let attr = |a| unsafe { result::device::get_attribute(dev, a) }.unwrap_or(0);
            let compute_capability = (
                attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
            );
            Ok(GpuInfo {
                ordinal,
                name,
                total_bytes,
                compute_capability,
            })
        })
        .collect()
}

/// One GPU with this project's kernels loaded.
pub struct CudaDriver {
    ctx: sys::CUcontext,
    info: GpuInfo,
    functions: HashMap<&'static str, sys::CUfunction>,
    lock: Mutex<()>,
}

// SAFETY: the raw handles are only used under `lock`, with the context made current first.
unsafe impl Send for CudaDriver {}
unsafe impl Sync for CudaDriver {}

impl CudaDriver {
    /// Opens GPU `ordinal` and loads every kernel.
    pub fn open(ordinal: i32) -> Result<Self> {
        if crate::kernels::FATBINS.is_empty() {
            return Err(Error::Backend("this binary was built without CUDA kernels (no nvcc at build time; see scripts/setup-cuda.sh)".into()));
        }
        let info = list_gpus()?
            .into_iter()
            .find(|g| g.ordinal == ordinal)
            .ok_or_else(|| Error::Backend(format!("no CUDA GPU with ordinal {ordinal}")))?;
        if info.compute_capability.0 < 9 {
            return Err(Error::Backend(format!(
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
        for name in NAMES {
            let c = CString::new(*name).expect("no NUL in kernel names");
            let found = modules
                .iter()
                .find_map(|m| unsafe { result::module::get_function(*m, c.clone()) }.ok());
            let f = found.ok_or_else(|| {
                Error::Backend(format!(
                    "kernel {name} is missing from the embedded fatbins"
                ))
            })?;
            functions.insert(*name, f);
        }
        Ok(Self {
            ctx,
            info,
            functions,
            lock: Mutex::new(()),
        })
    }

    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    fn current(&self) -> Result<std::sync::MutexGuard<'_, ()>> {
        let guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: ctx is the retained primary context.
        unsafe { result::ctx::set_current(self.ctx) }
            .map_err(|e| driver_error("cuCtxSetCurrent", e))?;
        Ok(guard)
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
        // SAFETY: plain allocation and memset of the new block.
        let ptr = unsafe { result::malloc_sync(bytes) }.map_err(|e| {
            let free = result::mem_get_info().map(|(f, _)| f).unwrap_or(0);
            Error::Backend(format!(
                "out of device memory? {e:?} ({:.1} MiB free)",
                free as f64 / (1 << 20) as f64
            ))
        })?;
        unsafe { result::memset_d8_sync(ptr, 0, bytes) }
            .map_err(|e| driver_error("cuMemsetD8", e))?;
        Ok(ptr)
    }

    fn free(&self, ptr: u64) {
        if let Ok(_g) = self.current() {
            // SAFETY: ptr came from alloc and is freed once (Buffer's Drop).
            let _ = unsafe { result::free_sync(ptr) };
        }
    }

    fn write(&self, dst: u64, src: &[u8]) -> Result<()> {
        let _g = self.current()?;
        unsafe { result::memcpy_htod_sync(dst, src) }.map_err(|e| driver_error("cuMemcpyHtoD", e))
    }

    fn read(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        let _g = self.current()?;
        // Synchronous copies on the legacy default stream wait for the kernels before them, and
        // report their errors.
        unsafe { result::memcpy_dtoh_sync(dst, src) }
            .map_err(|e| driver_error("cuMemcpyDtoH (or a kernel before it)", e))
    }

    fn launch(&self, kernel: &str, shape: LaunchShape, args: &[Arg]) -> Result<()> {
        let f = *self
            .functions
            .get(kernel)
            .ok_or_else(|| Error::Backend(format!("no kernel named {kernel}")))?;
        let _g = self.current()?;
        let mut slots: Vec<u64> = args.iter().map(|a| a.slot()).collect();
        let mut params: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        let [gx, gy, gz] = shape.grid;
        let [bx, by, bz] = shape.block;
        // SAFETY: the launchers in ops.rs pass arguments in the order and sizes of kernels/api.h.
        unsafe {
            result::launch_kernel(
                f,
                (gx, gy, gz),
                (bx, by, bz),
                shape.shared_bytes,
                std::ptr::null_mut(),
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

    fn free_memory(&self) -> Option<usize> {
        let _g = self.current().ok()?;
        result::mem_get_info().ok().map(|(free, _)| free)
    }
}
