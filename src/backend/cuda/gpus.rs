//! The GPUs the CUDA driver sees, for `loraxfer info`, `--device auto` and opening one
//! ([`super::driver::CudaDriver::open`]). Probing never panics: the driver library is looked for
//! before any driver call.

use cudarc::driver::{result, sys};

use crate::error::{Error, Result};

pub(super) fn driver_error(what: &str, e: result::DriverError) -> Error {
    Error::Device(format!("CUDA driver: {what}: {e:?}"))
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
        return Err(Error::Unavailable(
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
