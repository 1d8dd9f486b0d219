//! The pinned staging buffers the weights go through on their way to the device (mapped file →
//! pinned buffer → device on the copy stream), and the pageable fallback when pinned memory
//! cannot be allocated.

use std::ffi::c_void;

use rayon::prelude::*;

use cudarc::driver::{result, sys};

use super::{event, CudaDriver};
use crate::backend::cuda::gpus::driver_error;
use crate::error::Result;

/// Bytes per pinned staging buffer.
pub const STAGE_BYTES: usize = 32 << 20;

/// Two pinned host buffers, each with the event recorded after the copy out of it.
pub(super) struct Staging {
    buffers: [*mut u8; 2],
    emptied: [sys::CUevent; 2],
    next: usize,
}

/// The staging buffers: made at the first staged copy, taken out of the slot while a copy uses
/// them (no lock is held while the host fills them, which runs on rayon's threads).
pub(super) enum StagingSlot {
    NotYet,
    Idle(Staging),
    InUse,
    /// Pinned memory could not be allocated (the reason): uploads copy from pageable memory.
    Pageable(String),
}

impl Staging {
    /// Frees the buffers and their events (the device idle: called from the driver's Drop).
    ///
    /// # Safety
    /// No copy may still read the buffers, and the driver's context must be current.
    pub(super) unsafe fn release(self) {
        for (b, e) in self.buffers.iter().zip(self.emptied) {
            let _ = result::free_host(*b as *mut c_void);
            let _ = result::event::destroy(e);
        }
    }
}

impl CudaDriver {
    /// Pinned staging buffers, or the reason there are none (then uploads copy from pageable
    /// memory); allocated at the first staged copy, or by [`Device::memory_notes`].
    pub(super) fn staging_ready(&self) -> std::result::Result<(), String> {
        let mut slot = self.staging.lock().unwrap_or_else(|p| p.into_inner());
        if let StagingSlot::NotYet = *slot {
            *slot = match self.new_staging() {
                Ok(st) => StagingSlot::Idle(st),
                Err(e) => {
                    eprintln!("loraxfer: {e}; weights are copied from pageable memory instead");
                    StagingSlot::Pageable(e.to_string())
                }
            };
        }
        match &*slot {
            StagingSlot::Pageable(reason) => Err(reason.clone()),
            _ => Ok(()),
        }
    }

    fn new_staging(&self) -> Result<Staging> {
        let _g = self.current()?;
        let mut buffers = [std::ptr::null_mut(); 2];
        for b in &mut buffers {
            // SAFETY: plain pinned allocation, freed in Drop.
            *b = unsafe { result::malloc_host(STAGE_BYTES, 0) }.map_err(|e| {
                driver_error(
                    &format!("cuMemHostAlloc of {} MiB pinned staging", STAGE_BYTES >> 20),
                    e,
                )
            })? as *mut u8;
        }
        Ok(Staging {
            buffers,
            emptied: [event()?, event()?],
            next: 0,
        })
    }

    /// Copies `src` through `st`'s two pinned buffers on the copy stream.
    fn stage_with(&self, st: &mut Staging, dst: u64, src: &[u8]) -> Result<()> {
        for (i, chunk) in src.chunks(STAGE_BYTES).enumerate() {
            let slot = st.next;
            st.next ^= 1;
            self.bind()?;
            // SAFETY: a live event (a never-recorded one is complete).
            unsafe { result::event::synchronize(st.emptied[slot]) }
                .map_err(|e| driver_error("cuEventSynchronize (staging)", e))?;
            // SAFETY: STAGE_BYTES of pinned memory that no copy reads any more (the event).
            let buffer = unsafe { std::slice::from_raw_parts_mut(st.buffers[slot], chunk.len()) };
            // Reading the mapped file is the slow half (page faults): spread it over the cores.
            buffer
                .par_chunks_mut(1 << 20)
                .zip(chunk.par_chunks(1 << 20))
                .for_each(|(d, s)| d.copy_from_slice(s));
            let _g = self.current()?;
            let at = dst + (i * STAGE_BYTES) as u64;
            // SAFETY: pinned source kept untouched until `emptied[slot]` completes.
            unsafe {
                result::memcpy_htod_async(at, &*buffer, self.copy)
                    .map_err(|e| driver_error("cuMemcpyHtoDAsync (staged)", e))?;
                result::event::record(st.emptied[slot], self.copy)
                    .map_err(|e| driver_error("cuEventRecord", e))?;
            }
        }
        Ok(())
    }

    /// Host → device on the copy stream straight from pageable memory (no staging buffer).
    fn copy_pageable(&self, dst: u64, src: &[u8]) -> Result<()> {
        let _g = self.current()?;
        // SAFETY: dst is an upload buffer of at least src.len() bytes; from pageable memory the
        // driver takes the bytes out of `src` before returning.
        unsafe { result::memcpy_htod_async(dst, src, self.copy) }
            .map_err(|e| driver_error("cuMemcpyHtoDAsync (pageable)", e))
    }

    /// [`Device::stage`]: through the pinned buffers when they are free, else from pageable
    /// memory.
    pub(super) fn stage_upload(&self, dst: u64, src: &[u8]) -> Result<()> {
        let mut st = {
            let mut slot = self.staging.lock().unwrap_or_else(|p| p.into_inner());
            match std::mem::replace(&mut *slot, StagingSlot::InUse) {
                StagingSlot::Idle(st) => st,
                StagingSlot::NotYet => {
                    *slot = StagingSlot::NotYet;
                    drop(slot);
                    // Allocates them, or records why not and copies from pageable memory.
                    if self.staging_ready().is_err() {
                        return self.copy_pageable(dst, src);
                    }
                    return self.stage_upload(dst, src);
                }
                StagingSlot::Pageable(reason) => {
                    *slot = StagingSlot::Pageable(reason);
                    drop(slot);
                    return self.copy_pageable(dst, src);
                }
                StagingSlot::InUse => {
                    // Another upload holds the pinned buffers (another thread, or this one
                    // re-entered while rayon filled them): copy from pageable memory, which the
                    // driver takes out of `src` before returning.
                    drop(slot);
                    return self.copy_pageable(dst, src);
                }
            }
        };
        let done = self.stage_with(&mut st, dst, src);
        *self.staging.lock().unwrap_or_else(|p| p.into_inner()) = StagingSlot::Idle(st);
        done
    }

    /// The staging buffers, if they were made and are idle, taken out of their slot (for Drop).
    pub(super) fn take_staging(&mut self) -> Option<Staging> {
        match std::mem::replace(
            self.staging.get_mut().unwrap_or_else(|p| p.into_inner()),
            StagingSlot::NotYet,
        ) {
            StagingSlot::Idle(st) => Some(st),
            _ => None,
        }
    }
}
