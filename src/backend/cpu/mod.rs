//! The CPU backend: faer inside a matrix, rayon across matrices (in the pipeline). It is the
//! reference: every other backend's results are checked against it.

pub mod factors;
pub mod rsvd;

use faer::MatRef;

use super::{Backend, Basis, Factors, RawWeight, SvdParams, Weight};
use crate::error::Result;
use crate::modes::Mode;
use crate::timing::Timings;

/// The reference backend.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend;

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn truncated_svd(
        &self,
        w: &Weight<'_>,
        params: &SvdParams,
        timings: &Timings,
    ) -> Result<Basis> {
        rsvd::truncated_svd(w, params, timings)
    }

    /// Finite values checked, then read band by band from the stored bytes (rsvd's
    /// [`rsvd::Bands`]): memory per thread does not grow with the matrix.
    fn truncated_svd_raw(
        &self,
        w: &RawWeight<'_>,
        params: &SvdParams,
        timings: &Timings,
    ) -> Result<Basis> {
        timings.time(crate::timing::Phase::Load, || w.check_finite())?;
        rsvd::truncated_svd_raw(w, params, timings)
    }

    fn decodes_bands(&self) -> bool {
        true
    }

    fn truncated_svd_decoded(
        &self,
        name: &str,
        rows: &crate::io::gguf::QuantizedRows<'_>,
        params: &SvdParams,
        timings: &Timings,
    ) -> Result<Basis> {
        rsvd::truncated_svd_decoded(name, rows, params, timings)
    }

    fn similarity(&self, x: MatRef<'_, f32>, y: MatRef<'_, f32>) -> f32 {
        factors::similarity(x, y)
    }

    fn transfer(
        &self,
        mode: Mode,
        source: &Factors,
        source_basis: Option<&Basis>,
        target_basis: Option<&Basis>,
        target_shape: (usize, usize),
    ) -> Result<Factors> {
        factors::transfer(mode, source, source_basis, target_basis, target_shape)
    }
}
