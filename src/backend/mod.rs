//! The compute backends. Every backend implements [`Backend`]; the CPU backend is the reference
//! every other backend is tested against.

pub mod cpu;
pub mod cuda;

use std::any::Any;
use std::sync::Arc;

use faer::{Mat, MatRef};

use crate::error::Result;
use crate::io::safetensors::FloatType;
use crate::linalg::stored::Stored;
use crate::modes::Mode;
use crate::timing::Timings;

/// Parameters of one randomized truncated SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SvdParams {
    /// Rank k of the result (already capped by the matrix sizes).
    pub rank: usize,
    /// Oversampling p: the sketch has `min(k + p, m, n)` columns.
    pub oversample: usize,
    /// Power (subspace) iterations q.
    pub power_iters: usize,
    /// Seed of Ω.
    pub seed: u64,
}

/// A row-major `rows × cols` weight in f32, with the name that keys its Ω.
#[derive(Debug, Clone, Copy)]
pub struct Weight<'a> {
    pub name: &'a str,
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
}

impl Weight<'_> {
    pub fn as_mat(&self) -> MatRef<'_, f32> {
        MatRef::from_row_major_slice(self.data, self.rows, self.cols)
    }
}

/// A weight as stored: row-major `rows × cols` little-endian values of `ty`, straight from the
/// mapped file (backends that read f16/bf16 themselves take this and skip the conversion).
#[derive(Debug, Clone, Copy)]
pub struct RawWeight<'a> {
    /// Keys Ω, as [`Weight::name`].
    pub name: &'a str,
    pub bytes: &'a [u8],
    pub ty: FloatType,
    pub rows: usize,
    pub cols: usize,
    /// Set when the bytes have not been checked for NaN/Inf yet: whoever reads them calls
    /// [`RawWeight::check_finite`] first (so the scan is the read, not an extra pass).
    pub unchecked: Option<Origin<'a>>,
}

/// Weights of one shape and dtype decomposed with the same parameters.
#[derive(Debug, Clone)]
pub struct RawBatch<'a> {
    pub weights: Vec<RawWeight<'a>>,
    pub params: SvdParams,
}

/// Where a weight's bytes come from, for the error that names a non-finite value.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub path: &'a std::path::Path,
    pub tensor: &'a str,
    pub first_row: usize,
}

impl RawWeight<'_> {
    /// Refuses NaN/Inf in unchecked bytes, naming file, tensor, row and column.
    pub fn check_finite(&self) -> Result<()> {
        match self.unchecked {
            Some(o) => crate::io::safetensors::check_finite(
                o.path,
                o.tensor,
                self.bytes,
                self.ty,
                o.first_row,
                self.cols,
            ),
            None => Ok(()),
        }
    }
}

/// Top-k singular triplets, signs canonicalized (largest-magnitude entry of each u_i positive).
#[derive(Debug, Clone)]
pub struct Basis {
    /// `m × k`, orthonormal columns.
    pub u: Mat<f32>,
    /// k singular values, non-increasing.
    pub s: Vec<f32>,
    /// `n × k`, orthonormal columns.
    pub v: Mat<f32>,
    /// The estimate of σ_{k+1} from the same sketch, when it had room for one (l > k): with
    /// `s[k-1]` it tells how well the top-k subspace is determined.
    pub next: Option<f32>,
    /// A copy the backend that computed it keeps in its own memory (the CUDA backend: U and V
    /// on the device, so similarity and projection do not upload them again); None elsewhere.
    pub resident: Option<Resident>,
}

/// A backend's own copy of a basis, opaque to everyone else; dropping the last handle releases
/// it.
#[derive(Clone)]
pub struct Resident(pub Arc<dyn Any + Send + Sync>);

impl std::fmt::Debug for Resident {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resident(..)")
    }
}

/// Which side of a basis: the output space (U) or the input space (V).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    U,
    V,
}

impl Basis {
    /// U or V.
    pub fn side(&self, side: Side) -> MatRef<'_, f32> {
        match side {
            Side::U => self.u.as_ref(),
            Side::V => self.v.as_ref(),
        }
    }

    /// σ_{k+1} / σ_k: near 0 for a clear gap, near 1 when the k-th direction is barely resolved.
    pub fn gap_ratio(&self) -> Option<f64> {
        let last = *self.s.last()?;
        self.next.filter(|_| last > 0.0).map(|n| (n / last) as f64)
    }
}

/// LoRA factors of one module: ΔW = s·B·A.
#[derive(Debug, Clone)]
pub struct Factors {
    /// `out × r`
    pub b: Mat<f32>,
    /// `r × in`
    pub a: Mat<f32>,
}

/// The per-module math. Implementations must agree with [`cpu::CpuBackend`] within the
/// tolerances of their precision.
pub trait Backend: Sync {
    /// Short name for reports (`cpu`, `cuda`).
    fn name(&self) -> &'static str;

    /// Randomized truncated SVD of `w`, signs canonicalized.
    fn truncated_svd(&self, w: &Weight<'_>, params: &SvdParams, timings: &Timings)
        -> Result<Basis>;

    /// Randomized truncated SVD of a weight given as stored (bf16/f16/f32 bytes), read without
    /// an f32 copy of the whole weight: the CPU backend decodes it a band of rows at a time, the
    /// CUDA backend converts it as its kernels read it. No default, so no backend falls back to
    /// holding a whole weight in f32 (940 MB for one 70B MLP weight).
    fn truncated_svd_raw(
        &self,
        w: &RawWeight<'_>,
        params: &SvdParams,
        timings: &Timings,
    ) -> Result<Basis>;

    /// Whether this backend reads a weight decoded as read ([`Backend::truncated_svd_decoded`],
    /// [`Stored::decoded`]) a band at a time. Else a GGUF's quantized weight is decoded whole
    /// once, where it is read, and handed over as f32.
    fn decodes_bands(&self) -> bool {
        false
    }

    /// The SVD of a weight whose rows are decoded as they are read (a GGUF's quantized tensor),
    /// its Ω keyed by `name`, for a backend that [`Backend::decodes_bands`]. The CPU reads it a
    /// band at a time; by default it is decoded whole and handed to
    /// [`Backend::truncated_svd_raw`].
    fn truncated_svd_decoded(
        &self,
        name: &str,
        rows: &crate::io::gguf::QuantizedRows<'_>,
        params: &SvdParams,
        timings: &Timings,
    ) -> Result<Basis> {
        let (m, n) = rows.shape();
        let values = timings.time(crate::timing::Phase::Load, || rows.decode_all());
        let weight = RawWeight {
            name,
            bytes: bytemuck::cast_slice(&values),
            ty: FloatType::F32,
            rows: m,
            cols: n,
            unchecked: None,
        };
        self.truncated_svd_raw(&weight, params, timings)
    }

    /// True when [`Backend::truncated_svd_raw_batches`] decomposes many matrices in one go (the
    /// pipeline then schedules its decompositions in batches of one shape).
    fn batches(&self) -> bool {
        false
    }

    /// The SVDs of several batches (each: weights of one shape and dtype, one set of
    /// parameters), results in the same order; by default one weight at a time. Batching
    /// backends bound their memory themselves and may overlap one batch's upload with the
    /// previous one's compute.
    fn truncated_svd_raw_batches(
        &self,
        batches: &[RawBatch<'_>],
        timings: &Timings,
    ) -> Result<Vec<Vec<Basis>>> {
        batches
            .iter()
            .map(|b| {
                b.weights
                    .iter()
                    .map(|w| self.truncated_svd_raw(w, &b.params, timings))
                    .collect()
            })
            .collect()
    }

    /// `‖Xᵀ Y‖_F² / k` for two `m × k` orthonormal bases: 1 for the same subspace.
    fn similarity(&self, x: MatRef<'_, f32>, y: MatRef<'_, f32>) -> f32;

    /// [`Backend::similarity`] of one side of two bases (backends may use their resident
    /// copies).
    fn basis_similarity(&self, x: &Basis, y: &Basis, side: Side) -> f32 {
        self.similarity(x.side(side), y.side(side))
    }

    /// `a · b` for dense f32 matrices: the heavy products of the map mode (weights times a
    /// sketch, cross-covariances). The CPU uses every core (no unit runs while a layer's map is
    /// built); a device backend runs it on the device.
    fn product(&self, a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> Result<Mat<f32>> {
        Ok(crate::linalg::mm_parallel(a, b))
    }

    /// `W·X`, or `Wᵀ·X` with `transpose`, for a weight as the checkpoint stores it: the map
    /// mode's products with the layers' weights. The CPU decodes W a band of rows at a time on
    /// every core, never whole; the CUDA backend uploads the bytes as stored.
    fn stored_product(
        &self,
        w: &Stored<'_>,
        x: MatRef<'_, f32>,
        transpose: bool,
    ) -> Result<Mat<f32>> {
        Ok(if transpose { w.mul_t(x) } else { w.mul(x) })
    }

    /// [`Backend::product`] into `out` (`a.nrows() × b.ncols()`), for loops that form many
    /// products of one shape: on the CPU a fresh output of tens of MB costs as much to fault in
    /// as the product costs to compute.
    fn product_into(
        &self,
        a: MatRef<'_, f32>,
        b: MatRef<'_, f32>,
        out: faer::MatMut<'_, f32>,
    ) -> Result<()> {
        crate::linalg::mm_into(a, b, out)
    }

    /// `Xᵀ·M` for one side of a basis (`k × r` from `m × k` and `m × r`): the heavy product
    /// of the whole-update modes. Backends may use their resident copy of the basis.
    fn basis_t_mul(&self, basis: &Basis, side: Side, m: MatRef<'_, f32>) -> Result<Mat<f32>> {
        Ok(crate::linalg::mm(basis.side(side).transpose(), m))
    }

    /// `M + X·G + Y·H` for one side of two bases (`m × r`).
    fn basis_mul_add(
        &self,
        m: MatRef<'_, f32>,
        x: &Basis,
        g: MatRef<'_, f32>,
        y: &Basis,
        h: MatRef<'_, f32>,
        side: Side,
    ) -> Result<Mat<f32>> {
        let mut out = m.to_owned();
        let add = |out: &mut Mat<f32>, b: MatRef<'_, f32>, c: MatRef<'_, f32>| {
            faer::linalg::matmul::matmul(
                out.as_mut(),
                faer::Accum::Add,
                b,
                c,
                1.0f32,
                faer::Par::Seq,
            )
        };
        add(&mut out, x.side(side), g);
        add(&mut out, y.side(side), h);
        crate::linalg::clear_upper_registers();
        Ok(out)
    }

    /// The target factors of `mode` (not `auto`) for a target of `target_shape` (out, in).
    fn transfer(
        &self,
        mode: Mode,
        source: &Factors,
        source_basis: Option<&Basis>,
        target_basis: Option<&Basis>,
        target_shape: (usize, usize),
    ) -> Result<Factors>;
}

/// `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// CUDA when a driver, a GPU and compiled kernels are all present, else the CPU.
    Auto,
    Cpu,
    Cuda,
    /// The CUDA backend on the CPU emulator of its kernels (very slow; for tests).
    #[value(hide = true)]
    Emulator,
}

/// Picks the backend for `--device`, with a sentence saying which one and why.
pub fn select(device: Device) -> Result<(Box<dyn Backend>, String)> {
    match device {
        Device::Cpu => Ok((Box::new(cpu::CpuBackend), "cpu (requested)".into())),
        Device::Cuda => {
            if !cuda::kernels_compiled() {
                return Err(crate::error::Error::Unavailable(
                    "--device cuda: this build has no CUDA backend (built without CUDA kernels); use --device cpu or auto".into(),
                ));
            }
            let backend = cuda::cuda_backend()
                .map_err(|e| crate::error::Error::Unavailable(format!("--device cuda: {e}")))?;
            let why = format!("cuda (requested): {}", backend.ops().gpu.describe());
            Ok((Box::new(backend), why))
        }
        Device::Emulator => {
            let backend = cuda::emulator_backend()?;
            Ok((Box::new(backend), "emulator (requested)".into()))
        }
        Device::Auto => match cuda::unavailable_reason() {
            Some(reason) => Ok((Box::new(cpu::CpuBackend), format!("cpu (auto: {reason})"))),
            None => match cuda::cuda_backend() {
                Ok(backend) => {
                    let why = format!("cuda (auto): {}", backend.ops().gpu.describe());
                    Ok((Box::new(backend), why))
                }
                Err(e) => Ok((
                    Box::new(cpu::CpuBackend),
                    format!("cpu (auto: the GPU could not be used: {e})"),
                )),
            },
        },
    }
}
