//! Typed launchers, one per kernel family: the only place that knows each kernel's parameter
//! list (kept in the order of kernels/api.h) and launch shape. Everything is batched: `batch`
//! matrices of one shape laid out back to back in each buffer.

use super::device::{Arg, Buffer, Gpu, LaunchShape};
use crate::error::{Error, Result};
use crate::io::safetensors::FloatType;

/// Tile sizes of kernels/gemm.cuh.
const TILE: u32 = 64;
const GEMM_THREADS: u32 = 256;
/// The largest sketch width the orthonormalization and eigen kernels take (`LX_MAX_SKETCH` of
/// kernels/api.h, which sizes their shared memory).
pub use super::kernels::MAX_SKETCH;

/// Which operand of a panel product is transposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Panel {
    /// C = A·B
    NN,
    /// C = Aᵀ·B (A stored K×M)
    TN,
    /// C = A·Bᵀ (B stored N×K)
    NT,
}

/// One batched product of f32 panels, C = op(A)·op(B), for [`Ops::panel`]. Operands are device
/// addresses (so sub-panels can be used); dimensions, leading dimensions and strides count
/// elements.
#[derive(Debug, Clone, Copy)]
pub struct PanelProduct {
    pub kind: Panel,
    /// The output, M×N row-major and packed: leading dimension N, batch stride M·N.
    pub c: u64,
    pub a: u64,
    pub b: u64,
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// The inner dimension.
    pub k: usize,
    /// Leading dimension of A as stored (K for NN/NT, M for TN).
    pub lda: usize,
    /// Leading dimension of B as stored (N for NN/TN, K for NT).
    pub ldb: usize,
    /// From one matrix of the batch to the next in A (0: every matrix uses the same A).
    pub stride_a: usize,
    /// The same for B.
    pub stride_b: usize,
    pub batch: usize,
}

/// The kernels of one device.
#[derive(Clone)]
pub struct Ops {
    pub gpu: Gpu,
    /// Block size of the block-per-matrix kernels (a power of two ≤ 256): 256 on a GPU, fewer
    /// under the emulator, where each device thread is an OS thread.
    pub small_block: u32,
    /// Products with an f16/bf16 weight on tensor cores (the `_tc_` kernels, 2xTF32); f32
    /// weights always use the CUDA-core kernels.
    pub tensor_cores: bool,
}

/// Whether the `_tc_` kernels are used: yes unless `LORAXFER_NO_TENSOR_CORES` is set (to
/// compare, or to rule them out when a GPU's selftest flags them).
pub fn tensor_cores_enabled() -> bool {
    std::env::var_os("LORAXFER_NO_TENSOR_CORES").is_none()
}

fn dtype_suffix(ty: FloatType) -> &'static str {
    match ty {
        FloatType::F32 => "f32",
        FloatType::F16 => "f16",
        FloatType::Bf16 => "bf16",
    }
}

pub(crate) fn dim(x: usize, what: &str) -> Result<i32> {
    i32::try_from(x)
        .map_err(|_| Error::Device(format!("{what} = {x} exceeds the kernels' 32-bit sizes")))
}

/// The blocks of `per` threads that cover `count` elements, as a grid's x size (at most
/// 2³¹ − 1 on every GPU): an error, not a wrapped grid that would leave elements unwritten.
pub(crate) fn blocks(count: usize, per: usize, what: &str) -> Result<u32> {
    u32::try_from(count.div_ceil(per))
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| {
            Error::Device(format!(
                "{what}: {count} elements are too many for one launch"
            ))
        })
}

/// [`blocks`] as a grid's y size, which GPUs cap at 65535.
pub(crate) fn blocks_y(count: usize, per: usize, what: &str) -> Result<u32> {
    let b = blocks(count, per, what)?;
    if b > 65535 {
        return Err(Error::Device(format!(
            "{what}: {count} elements need {b} blocks along y, more than the 65535 a grid allows"
        )));
    }
    Ok(b)
}

fn gemm_shape(rows: usize, cols: usize, batch: usize) -> LaunchShape {
    LaunchShape::new(
        [
            (cols as u32).div_ceil(TILE),
            (rows as u32).div_ceil(TILE),
            batch as u32,
        ],
        [GEMM_THREADS, 1, 1],
    )
}

impl Ops {
    /// "tc_" when products with a `ty` weight run on tensor cores.
    fn variant(&self, ty: FloatType) -> &'static str {
        if self.tensor_cores && ty != FloatType::F32 {
            "tc_"
        } else {
            ""
        }
    }

    /// The kernel of product `op` ("sketch", "w_mul", "wt_mul") for a `ty` weight.
    pub fn product_kernel(&self, op: &str, ty: FloatType) -> String {
        format!("{op}_{}{}", self.variant(ty), dtype_suffix(ty))
    }

    /// Y (m×l) = W (m×n, dtype `ty`) · Ω, Ω keyed by `ids` (one u64 per matrix).
    #[allow(clippy::too_many_arguments)]
    pub fn sketch(
        &self,
        y: &Buffer,
        w: &Buffer,
        ty: FloatType,
        ids: &Buffer,
        seed: u64,
        m: usize,
        n: usize,
        l: usize,
        batch: usize,
    ) -> Result<()> {
        let name = self.product_kernel("sketch", ty);
        self.gpu.launch(
            &name,
            gemm_shape(m, l, batch),
            &[
                y.arg(),
                w.arg(),
                ids.arg(),
                Arg::U64(seed),
                Arg::I32(dim(m, "rows")?),
                Arg::I32(dim(n, "cols")?),
                Arg::I32(dim(l, "sketch width")?),
            ],
        )
    }

    /// C (m×l) = W (m×n) · P (n×l), or with `transposed` C (n×l) = Wᵀ (n×m) · P (m×l).
    #[allow(clippy::too_many_arguments)]
    pub fn w_product(
        &self,
        transposed: bool,
        c: &Buffer,
        w: &Buffer,
        ty: FloatType,
        p: &Buffer,
        (m, n, l): (usize, usize, usize),
        batch: usize,
    ) -> Result<()> {
        let (op, rows) = if transposed {
            ("wt_mul", n)
        } else {
            ("w_mul", m)
        };
        let name = self.product_kernel(op, ty);
        self.gpu.launch(
            &name,
            gemm_shape(rows, l, batch),
            &[
                c.arg(),
                w.arg(),
                p.arg(),
                Arg::I32(dim(m, "rows")?),
                Arg::I32(dim(n, "cols")?),
                Arg::I32(dim(l, "sketch width")?),
            ],
        )
    }

    /// C = op(A)·op(B) for a batch of f32 panels ([`PanelProduct`]).
    pub fn panel(&self, p: &PanelProduct) -> Result<()> {
        let name = match p.kind {
            Panel::NN => "panel_nn",
            Panel::TN => "panel_tn",
            Panel::NT => "panel_nt",
        };
        self.gpu.launch(
            name,
            gemm_shape(p.m, p.n, p.batch),
            &[
                Arg::Ptr(p.c),
                Arg::Ptr(p.a),
                Arg::Ptr(p.b),
                Arg::I32(dim(p.m, "M")?),
                Arg::I32(dim(p.n, "N")?),
                Arg::I32(dim(p.k, "K")?),
                Arg::I32(dim(p.lda, "lda")?),
                Arg::I32(dim(p.ldb, "ldb")?),
                Arg::I64(p.stride_a as i64),
                Arg::I64(p.stride_b as i64),
            ],
        )
    }

    /// G (l×l f64 per matrix) = Yᵀ Y for `rows × l` panels.
    pub fn gram(&self, g: &Buffer, y: u64, rows: usize, l: usize, batch: usize) -> Result<()> {
        let tiles = (l as u32).div_ceil(16);
        self.gpu.launch(
            "gram_f64",
            LaunchShape::new([tiles, tiles, batch as u32], [16, 16, 1]),
            &[
                g.arg(),
                Arg::Ptr(y),
                Arg::I32(dim(rows, "rows")?),
                Arg::I32(dim(l, "sketch width")?),
            ],
        )
    }

    /// Orthonormalizes the columns of each `rows × l` panel in place: CholeskyQR2 in f64, with a
    /// Gram–Schmidt fallback for rank-deficient panels. Returns how many took the fallback, so it
    /// waits for the device: the pipeline queues [`Ops::orthonormalize_queued`] instead.
    pub fn orthonormalize(
        &self,
        y: &Buffer,
        rows: usize,
        l: usize,
        batch: usize,
        seed: u64,
    ) -> Result<usize> {
        let flags = self.orthonormalize_queued(y, rows, l, batch, seed)?;
        let flagged: Vec<i32> = self.gpu.download(flags.ptr(), batch)?;
        Ok(flagged.iter().filter(|&&f| f != 0).count())
    }

    /// [`Ops::orthonormalize`] queued on the compute stream without waiting for it (a host read
    /// here would stall the next piece's upload behind this one's kernels); returns the per-panel
    /// fallback flags, set once the kernels have run.
    pub fn orthonormalize_queued(
        &self,
        y: &Buffer,
        rows: usize,
        l: usize,
        batch: usize,
        seed: u64,
    ) -> Result<Buffer> {
        if l > MAX_SKETCH || l > rows {
            return Err(Error::Internal(format!(
                "orthonormalize: {rows}x{l} panel (want l ≤ rows and l ≤ {MAX_SKETCH})"
            )));
        }
        let g = self.gpu.zeros::<f64>(batch * l * l, "the Gram matrices")?;
        let flags = self.gpu.zeros::<i32>(batch, "the fallback flags")?;
        let (r, li) = (dim(rows, "rows")?, dim(l, "sketch width")?);
        for shift in [1e-14, 0.0] {
            self.gram(&g, y.ptr(), rows, l, batch)?;
            self.gpu.launch(
                "cholesky_f64",
                LaunchShape::new([batch as u32, 1, 1], [self.small_block, 1, 1]),
                &[g.arg(), flags.arg(), Arg::I32(li), Arg::F64(shift)],
            )?;
            self.gpu.launch(
                "trsm_rows",
                LaunchShape::new([(rows as u32).div_ceil(128), batch as u32, 1], [128, 1, 1]),
                &[
                    y.arg(),
                    y.arg(),
                    g.arg(),
                    flags.arg(),
                    Arg::I32(r),
                    Arg::I32(li),
                ],
            )?;
        }
        self.gpu.launch(
            "cgs2_fallback",
            LaunchShape::new([batch as u32, 1, 1], [self.small_block, 1, 1]),
            &[
                y.arg(),
                flags.arg(),
                Arg::I32(r),
                Arg::I32(li),
                Arg::U64(seed),
            ],
        )?;
        Ok(flags)
    }

    /// Eigen-decomposition of symmetric l×l f64 matrices (overwritten): returns sqrt of the
    /// eigenvalues, non-increasing (l f32 per matrix), and the eigenvectors (l×l f32, columns).
    pub fn eig(&self, g: &Buffer, l: usize, batch: usize) -> Result<(Buffer, Buffer)> {
        if l > MAX_SKETCH {
            return Err(Error::Internal(format!("eig: l = {l} > {MAX_SKETCH}")));
        }
        let v = self
            .gpu
            .zeros::<f64>(batch * l * l, "the eigenvector accumulators")?;
        let s = self.gpu.zeros::<f32>(batch * l, "the singular values")?;
        let vb = self.gpu.zeros::<f32>(batch * l * l, "the eigenvectors")?;
        self.gpu.launch(
            "jacobi_eig_f64",
            LaunchShape::new([batch as u32, 1, 1], [self.small_block, 1, 1]),
            &[
                g.arg(),
                v.arg(),
                s.arg(),
                vb.arg(),
                Arg::I32(dim(l, "sketch width")?),
                Arg::I32(30),
            ],
        )?;
        Ok((s, vb))
    }

    /// X[:, j] /= S[j] for `rows × k` panels with leading dimension `ldx` (0 where S[j] = 0).
    #[allow(clippy::too_many_arguments)]
    pub fn scale_columns(
        &self,
        x: &Buffer,
        s: &Buffer,
        rows: usize,
        k: usize,
        ldx: usize,
        stride_x: usize,
        lds: usize,
        batch: usize,
    ) -> Result<()> {
        let grid = blocks(rows * k, 256, "scale_columns")?;
        self.gpu.launch(
            "scale_columns",
            LaunchShape::new([grid, batch as u32, 1], [256, 1, 1]),
            &[
                x.arg(),
                s.arg(),
                Arg::I32(dim(rows, "rows")?),
                Arg::I32(dim(k, "rank")?),
                Arg::I32(dim(ldx, "ldx")?),
                Arg::I64(stride_x as i64),
                Arg::I32(dim(lds, "lds")?),
            ],
        )
    }

    /// Sign convention of the CPU backend on U (m×k) and V (n×k).
    pub fn canonical_signs(
        &self,
        u: &Buffer,
        v: &Buffer,
        m: usize,
        n: usize,
        k: usize,
        batch: usize,
    ) -> Result<()> {
        self.gpu.launch(
            "canonical_signs",
            LaunchShape::new([k as u32, batch as u32, 1], [self.small_block, 1, 1]),
            &[
                u.arg(),
                v.arg(),
                Arg::I32(dim(m, "rows")?),
                Arg::I32(dim(n, "cols")?),
                Arg::I32(dim(k, "rank")?),
            ],
        )
    }

    /// out[b] = scale · Σ P[b]² over `count` values per matrix.
    pub fn sum_squares(
        &self,
        out: &Buffer,
        p: &Buffer,
        count: usize,
        scale: f64,
        batch: usize,
    ) -> Result<()> {
        self.gpu.launch(
            "sum_squares",
            LaunchShape::new([batch as u32, 1, 1], [self.small_block, 1, 1]),
            &[out.arg(), p.arg(), Arg::I64(count as i64), Arg::F64(scale)],
        )
    }

    /// f32 → f16 or bf16 (`ty`); f32 is a plain copy on the host side, not a kernel.
    pub fn cast(&self, out: &Buffer, input: &Buffer, count: usize, ty: FloatType) -> Result<()> {
        let name = match ty {
            FloatType::F16 => "cast_f32_f16",
            FloatType::Bf16 => "cast_f32_bf16",
            FloatType::F32 => return Err(Error::internal("cast: f32 needs no kernel")),
        };
        self.gpu.launch(
            name,
            LaunchShape::new([blocks(count, 256, name)?, 1, 1], [256, 1, 1]),
            &[out.arg(), input.arg(), Arg::I64(count as i64)],
        )
    }

    /// Ω for checking the device Philox: rows × cols, column-major.
    pub fn philox(&self, out: &Buffer, rows: usize, cols: usize, seed: u64, id: u64) -> Result<()> {
        self.gpu.launch(
            "philox_gaussian_f32",
            LaunchShape::new(
                [
                    blocks(rows, 128, "philox_gaussian_f32")?,
                    blocks_y(cols, 4, "philox_gaussian_f32")?,
                    1,
                ],
                [128, 1, 1],
            ),
            &[
                out.arg(),
                Arg::I32(dim(rows, "rows")?),
                Arg::I32(dim(cols, "cols")?),
                Arg::U64(seed),
                Arg::U64(id),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_cover_the_elements_or_are_refused() {
        assert_eq!(blocks(0, 256, "x").unwrap(), 0);
        assert_eq!(blocks(1000, 256, "x").unwrap(), 4);
        assert_eq!(blocks(1024, 256, "x").unwrap(), 4);
        // 28 × 28672 × 8192 values (a 70B model's MLP weights of one batch) wraps a u32 count.
        let huge = 28 * 28672 * 8192;
        assert_eq!(blocks(huge, 256, "x").unwrap() as usize, huge.div_ceil(256));
        let err = blocks(1 << 40, 256, "cast_f32_bf16")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cast_f32_bf16") && err.contains("too many"),
            "{err}"
        );
        assert!(dim(1 << 31, "rows").is_err());
        assert_eq!(blocks_y(4 * 65535, 4, "y").unwrap(), 65535);
        let err = blocks_y(4 * 65535 + 1, 4, "philox_gaussian_f32")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("philox_gaussian_f32") && err.contains("65535"),
            "{err}"
        );
    }
}
