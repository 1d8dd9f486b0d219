//! Kernel timings on model-shaped batches (`loraxfer selftest --bench`, scripts/gpu-check.sh):
//! per kernel the time per launch, the bytes it must move and the FLOPs it does, so achieved
//! bandwidth and FLOP rate can be set against the device's ceilings. Host→device copy speed is
//! measured too: for a whole transfer it is the floor (docs/PERFORMANCE.md, "The two numbers").

use std::time::Instant;

use super::backend::{resident_bytes, CudaBackend};
use super::device::{Arg, Buffer, LaunchShape};
use super::ops::{blocks, blocks_y, dim, Ops};
use super::rsvd::{truncated_svd_batch, RawMatrix};
use crate::backend::SvdParams;
use crate::error::Result;
use crate::io::safetensors::FloatType;
use crate::timing::Timings;

/// One timed kernel.
#[derive(Debug, Clone)]
pub struct Timing {
    pub kernel: String,
    pub case: String,
    pub ms: f64,
    pub bytes: f64,
    pub flops: f64,
}

impl Timing {
    pub fn gbps(&self) -> f64 {
        self.bytes / self.ms / 1e6
    }
    pub fn tflops(&self) -> f64 {
        self.flops / self.ms / 1e9
    }
}

fn time(backend: &CudaBackend, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up (module load, first-touch)
    backend.ops().gpu.synchronize()?;
    let start = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    backend.ops().gpu.synchronize()?;
    Ok(start.elapsed().as_secs_f64() * 1e3 / reps as f64)
}

/// One line of the benchmark, reported as soon as it is known.
pub enum Row<'a> {
    Timed(&'a Timing),
    /// A shape that failed (the case, and why); the others still run.
    Skipped(&'a str, &'a crate::Error),
}

/// `batch` bf16 `m × n` weights on the device that take the code paths real weights take:
/// Philox-Gaussian entries (full rank, so orthonormalization stays on CholeskyQR2) with column
/// `j` scaled by 1/(1 + j/64), a decaying spectrum (so the core's eigenproblem is not a near
/// identity). Generated and cast on the device: no host copy of a 770 MB batch.
pub fn gaussian_weights(
    ops: &Ops,
    (m, n, batch): (usize, usize, usize),
    seed: u64,
) -> Result<Buffer> {
    let gpu = &ops.gpu;
    let w32 = gpu.zeros::<f32>(batch * m * n, "f32 weights")?;
    for b in 0..batch {
        // Ω's layout is column-major rows × cols: with rows = n it is W row-major m × n.
        gpu.launch(
            "philox_gaussian_f32",
            LaunchShape::new(
                [
                    blocks(n, 128, "philox_gaussian_f32")?,
                    blocks_y(m, 4, "philox_gaussian_f32")?,
                    1,
                ],
                [128, 1, 1],
            ),
            &[
                Arg::Ptr(w32.ptr() + (b * m * n * 4) as u64),
                Arg::I32(dim(n, "cols")?),
                Arg::I32(dim(m, "rows")?),
                Arg::U64(seed),
                Arg::U64(b as u64),
            ],
        )?;
    }
    let divisors: Vec<f32> = (0..n).map(|j| 1.0 + j as f32 / 64.0).collect();
    let divisors = gpu.upload(&divisors, "column scales")?;
    ops.scale_columns(&w32, &divisors, m, n, n, m * n, 0, batch)?;
    let w = gpu.zeros::<u16>(batch * m * n, "weights")?;
    ops.cast(&w, &w32, batch * m * n, FloatType::Bf16)?;
    Ok(w)
}

/// Times every kernel family on `batch` bf16 matrices of `m × n` with sketch width `l` (capped
/// at min(m, n) per shape, as a transfer caps it), handing each row to `report` as soon as it is
/// measured. A shape that fails is reported as skipped, and the others still run.
pub fn run(
    backend: &CudaBackend,
    shapes: &[(usize, usize, usize)],
    l: usize,
    reps: usize,
    report: &mut dyn FnMut(Row<'_>),
) -> Vec<Timing> {
    let mut out = Vec::new();
    for &(m, n, batch) in shapes {
        let l = l.min(m).min(n);
        let case = format!("{batch}x {m}x{n} bf16, l={l}");
        let mut push = |t: Timing| {
            report(Row::Timed(&t));
            out.push(t);
        };
        if let Err(e) = time_shape(backend, (m, n, batch), l, reps, &case, &mut push) {
            report(Row::Skipped(&case, &e));
        }
    }
    out
}

fn time_shape(
    backend: &CudaBackend,
    (m, n, batch): (usize, usize, usize),
    l: usize,
    reps: usize,
    case: &str,
    push: &mut dyn FnMut(Timing),
) -> Result<()> {
    let ops = backend.ops();
    let gpu = &ops.gpu;
    let ty = FloatType::Bf16;
    let w = gaussian_weights(ops, (m, n, batch), 7)?;
    let ids = gpu.upload(&(0..batch as u64).collect::<Vec<_>>(), "ids")?;
    let y = gpu.zeros::<f32>(batch * m * l, "Y")?;
    let z = gpu.zeros::<f32>(batch * n * l, "Z")?;
    let wbytes = (batch * m * n * 2) as f64;
    let prod_flops = 2.0 * (batch * m * n * l) as f64;
    let mut push = |kernel: &str, ms: f64, bytes: f64, flops: f64| {
        push(Timing {
            kernel: kernel.into(),
            case: case.to_string(),
            ms,
            bytes,
            flops,
        })
    };

    // The three products with W, on CUDA cores and on tensor cores, side by side.
    for tensor_cores in [false, true] {
        let ops = Ops {
            tensor_cores,
            ..ops.clone()
        };
        let ms = time(backend, reps, || {
            ops.sketch(&y, &w, ty, &ids, 0, m, n, l, batch)
        })?;
        push(
            &ops.product_kernel("sketch", ty),
            ms,
            wbytes + (batch * m * l * 4) as f64,
            prod_flops,
        );
        for (transposed, op) in [(true, "wt_mul"), (false, "w_mul")] {
            let (c, p) = if transposed { (&z, &y) } else { (&y, &z) };
            let ms = time(backend, reps, || {
                ops.w_product(transposed, c, &w, ty, p, (m, n, l), batch)
            })?;
            push(
                &ops.product_kernel(op, ty),
                ms,
                wbytes + (batch * (m + n) * l * 4) as f64,
                prod_flops,
            );
        }
    }
    // Orthonormalize a well-conditioned panel: the sketch of a random-ish W.
    ops.sketch(&y, &w, ty, &ids, 0, m, n, l, batch)?;
    let g = gpu.zeros::<f64>(batch * l * l, "G")?;
    let ms = time(backend, reps, || ops.gram(&g, y.ptr(), m, l, batch))?;
    push(
        "gram_f64",
        ms,
        (batch * m * l * 4) as f64,
        2.0 * (batch * m * l * l) as f64,
    );
    // Re-orthonormalizing an orthonormal panel costs what the first pass does.
    let ms = time(backend, reps, || {
        ops.orthonormalize(&y, m, l, batch, 0).map(|_| ())
    })?;
    push(
        "orthonormalize (CholeskyQR2)",
        ms,
        4.0 * (batch * m * l * 4) as f64,
        4.0 * (batch * m * l * l) as f64,
    );
    ops.gram(&g, y.ptr(), m, l, batch)?;
    let g0: Vec<f64> = gpu.download(g.ptr(), batch * l * l)?;
    let ms = time(backend, reps.min(3), || {
        let gg = gpu.upload(&g0, "G copy")?;
        ops.eig(&gg, l, batch).map(|_| ())
    })?;
    // (includes re-uploading the Gram matrices, which the solver overwrites)
    push("jacobi_eig_f64", ms, (batch * l * l * 8 * 2) as f64, 0.0);
    Ok(())
}

/// Host → device over the bus, `bytes` at a time: from pageable memory, and through the pinned
/// staging buffers on the copy stream (what the pipeline uses). The floor of a whole transfer.
pub fn copies(backend: &CudaBackend, bytes: usize) -> Result<Vec<Timing>> {
    let gpu = &backend.ops().gpu;
    let mut out = Vec::new();
    let size = format!("{:.0} MiB", bytes as f64 / (1 << 20) as f64);
    let host = vec![1u8; bytes];
    let buf = gpu.zeros::<u8>(host.len(), "copy test")?;
    let ms = time(backend, 3, || gpu.0.write(buf.ptr(), &host))?;
    out.push(Timing {
        kernel: "host→device copy".into(),
        case: format!("{size} pageable"),
        ms,
        bytes: host.len() as f64,
        flops: 0.0,
    });
    // The same through the pinned staging buffers on the copy stream (what the pipeline uses).
    drop(buf);
    let staged_ms = time(backend, 3, || {
        let b = gpu.stage_parts(&[&host], "copy test")?;
        gpu.fence()?;
        gpu.synchronize()?;
        drop(b);
        Ok(())
    })?;
    out.push(Timing {
        kernel: "host→device copy".into(),
        case: format!("{size} staged (pinned ×2)"),
        ms: staged_ms,
        bytes: host.len() as f64,
        flops: 0.0,
    });
    Ok(out)
}

/// The whole batched SVD of `count` bf16 `m × n` matrices held in host memory (as a mapped file
/// would be), twice: as the pipeline runs it (each piece's upload overlapping the previous
/// piece's kernels) and one piece at a time (upload, compute, read back, next). The ratio of
/// the two is what the copy/compute overlap buys; bytes are the weights read once.
pub fn pipeline(
    backend: &CudaBackend,
    (m, n, count): (usize, usize, usize),
    params: &SvdParams,
) -> Result<Vec<Timing>> {
    // Realistic weights (see gaussian_weights), read back into host memory as a mapped file holds them.
    let w = gaussian_weights(backend.ops(), (m, n, count), params.seed)?;
    let all: Vec<u8> = backend.ops().gpu.download(w.ptr(), count * m * n * 2)?;
    drop(w);
    let host: Vec<&[u8]> = all.chunks(m * n * 2).collect();
    let names: Vec<String> = (0..count).map(|b| format!("bench.{b}.weight")).collect();
    let mats: Vec<RawMatrix<'_>> = host
        .into_iter()
        .zip(&names)
        .map(|(bytes, name)| RawMatrix {
            name,
            bytes,
            ty: FloatType::Bf16,
            rows: m,
            cols: n,
            unchecked: None,
        })
        .collect();
    let t = Timings::default();
    let overlapped = time(backend, 2, || {
        backend.svd_pipelined(&mats, params, &t).map(|_| ())
    })?;
    let serial = time(backend, 2, || {
        let reserved = resident_bytes(count, &mats[0], params);
        for piece in backend.pieces(count, &mats[0], params, reserved) {
            truncated_svd_batch(backend.ops(), &mats[piece], params, &t)?;
        }
        Ok(())
    })?;
    let case = format!("{count}x {m}x{n} bf16, k={}", params.rank);
    let bytes = (count * m * n * 2) as f64;
    Ok(vec![
        Timing {
            kernel: "svd pipeline (overlapped)".into(),
            case: case.clone(),
            ms: overlapped,
            bytes,
            flops: 0.0,
        },
        Timing {
            kernel: "svd pipeline (serial)".into(),
            case,
            ms: serial,
            bytes,
            flops: 0.0,
        },
    ])
}

#[cfg(all(test, loraxfer_kernel_emulator))]
mod tests {
    use super::*;

    /// The benchmark's host code runs end to end (on the emulator, tiny shapes): what
    /// scripts/gpu-check.sh calls on a GPU fails there only for reasons of the GPU.
    #[test]
    fn the_benchmarks_run_on_the_emulator() {
        let backend = super::super::emulator_backend().unwrap();
        // l = 30 is more than either shape's smaller side: capped per shape, nothing skipped.
        let mut skipped = 0;
        let mut timings = run(&backend, &[(40, 24, 2), (12, 40, 1)], 30, 1, &mut |row| {
            if let Row::Skipped(case, e) = row {
                eprintln!("{case}: {e}");
                skipped += 1;
            }
        });
        assert_eq!(skipped, 0);
        assert!(timings.iter().any(|t| t.case.contains("12x40 bf16, l=12")));
        timings.extend(copies(&backend, 1 << 16).unwrap());
        let params = SvdParams {
            rank: 4,
            oversample: 4,
            power_iters: 1,
            seed: 3,
        };
        timings.extend(
            pipeline(&backend.with_piece_bytes(40 * 24 * 2), (40, 24, 3), &params).unwrap(),
        );
        let names: Vec<&str> = timings.iter().map(|t| t.kernel.as_str()).collect();
        for want in [
            "sketch_bf16",
            "sketch_tc_bf16",
            "wt_mul_tc_bf16",
            "jacobi_eig_f64",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        assert_eq!(
            names
                .iter()
                .filter(|n| n.starts_with("svd pipeline"))
                .count(),
            2
        );
        assert!(timings.iter().all(|t| t.ms.is_finite() && t.ms >= 0.0));
    }
}
