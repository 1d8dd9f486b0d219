//! Every kernel against the CPU reference on fresh random inputs of awkward shapes (odd sizes,
//! tall and wide, k capped by the matrix, f32/f16/bf16 weights, rank-deficient panels), with
//! outputs poisoned with NaN before each launch so an element a kernel fails to write cannot
//! pass. Used by `loraxfer selftest` and by tests/gpu_kernels.rs (on the emulator without a GPU).
//! Each check is reported as soon as it is known, and a step whose launches fail is a failed
//! check naming the step, not the end of the run: on a GPU, one broken kernel must not hide the
//! results of the others.

mod pipeline;
mod run;

pub use run::{first_light, run, run_reporting, Event, Options};

use faer::Mat;

use super::backend::{from_row_major, row_major, CudaBackend};
use super::ops::{Ops, Panel, PanelProduct};
use super::rsvd::RawMatrix;
use crate::backend::cpu::{factors, rsvd as cpu_rsvd};
use crate::backend::{Backend, Basis, Factors, SvdParams, Weight};
use crate::error::Result;
use crate::io::safetensors::{decode_f32, encode_f32, FloatType};
use crate::linalg::philox::{fill_gaussian, gaussian4, matrix_id};
use crate::linalg::worst;
use crate::modes::Mode;
use crate::timing::Timings;

/// One comparison: `error` (a relative or absolute error, or a count) against `tolerance`.
#[derive(Debug, Clone)]
pub struct Check {
    pub kernel: String,
    pub case: String,
    pub error: f64,
    pub tolerance: f64,
}

impl Check {
    /// NaN (an unwritten, poisoned output) never passes.
    pub fn passed(&self) -> bool {
        self.error <= self.tolerance
    }
}

/// A seeded Gaussian matrix, row-major.
fn gaussian_rm(rows: usize, cols: usize, seed: u64, stream: u64) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        for j in 0..cols {
            out.push(gaussian4(seed, stream, i as u32, (j / 4) as u32)[j % 4]);
        }
    }
    out
}

/// Largest |a − b| over the largest |b| (relative to the reference's scale).
fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    if a.len() != b.len() {
        return f64::NAN;
    }
    let scale = b.iter().fold(0f64, |s, x| s.max(x.abs())).max(1e-30);
    a.iter()
        .zip(b)
        .fold(0f64, |e, (x, y)| worst(e, (*x as f64 - y).abs()))
        / scale
}

/// C = op(A)·op(B) in f64 from row-major data.
fn reference_product(
    a: &[f32],
    b: &[f32],
    (m, n, k): (usize, usize, usize),
    ta: bool,
    tb: bool,
) -> Vec<f64> {
    let mut c = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for t in 0..k {
                let x = if ta { a[t * m + i] } else { a[i * k + t] };
                let y = if tb { b[j * k + t] } else { b[t * n + j] };
                s += x as f64 * y as f64;
            }
            c[i * n + j] = s;
        }
    }
    c
}

struct Runner<'a> {
    backend: &'a CudaBackend,
    seed: u64,
    checks: Vec<Check>,
    report: &'a mut dyn FnMut(Event<'_>),
}

impl Runner<'_> {
    fn push(&mut self, kernel: &str, case: String, error: f64, tolerance: f64) {
        let check = Check {
            kernel: kernel.into(),
            case,
            error,
            tolerance,
        };
        (self.report)(Event::Check(&check));
        self.checks.push(check);
    }

    /// Runs one step; an error (a launch or a copy that failed) becomes a failed check named
    /// after the step, and the next step runs.
    fn step(&mut self, what: &str, f: impl FnOnce(&mut Self) -> Result<()>) {
        if let Err(e) = f(self) {
            self.push(what, format!("failed: {e}"), f64::NAN, 0.0);
        }
    }

    fn poisoned(&self, count: usize, what: &str) -> Result<super::device::Buffer> {
        self.backend.ops().gpu.upload(&vec![f32::NAN; count], what)
    }

    fn philox(&mut self) -> Result<()> {
        let (rows, cols) = (37, 11);
        let ops = self.backend.ops();
        let out = self.poisoned(rows * cols, "Ω")?;
        ops.philox(&out, rows, cols, self.seed, 5)?;
        let got: Vec<f32> = ops.gpu.download(out.ptr(), rows * cols)?;
        let mut want = vec![0f32; rows * cols];
        fill_gaussian(self.seed, 5, rows, cols, &mut want);
        let want: Vec<f64> = want.iter().map(|&x| x as f64).collect();
        self.push(
            "philox_gaussian_f32",
            format!("{rows}x{cols}"),
            rel_err(&got, &want),
            1e-5,
        );
        Ok(())
    }

    /// sketch, w_mul and wt_mul for one dtype and shape, batch of two, on CUDA cores and (for
    /// f16/bf16) on tensor cores; with `positive` weights and panels, every partial sum of W·Z
    /// and Wᵀ·Q grows in one direction, so an accumulation that loses a little at each of many
    /// steps (tensor-core additions truncate) shows as a relative error far above f32 rounding.
    fn products(
        &mut self,
        ty: FloatType,
        (m, n, l): (usize, usize, usize),
        positive: bool,
    ) -> Result<()> {
        let mut variants = vec![false];
        if ty != FloatType::F32 {
            variants.push(true);
        }
        for tensor_cores in variants {
            let ops = Ops {
                tensor_cores,
                ..self.backend.ops().clone()
            };
            self.products_on(&ops, ty, (m, n, l), positive)?;
        }
        Ok(())
    }

    fn products_on(
        &mut self,
        ops: &Ops,
        ty: FloatType,
        (m, n, l): (usize, usize, usize),
        positive: bool,
    ) -> Result<()> {
        let batch = 2;
        let mut bytes = Vec::new();
        let mut ws = Vec::new();
        let sign = |v: Vec<f32>| -> Vec<f32> {
            if positive {
                v.into_iter().map(f32::abs).collect()
            } else {
                v
            }
        };
        for b in 0..batch {
            let w = sign(gaussian_rm(m, n, self.seed, 10 + b as u64));
            let enc = encode_f32(&w, ty);
            ws.push(decode_f32(&enc, ty)); // what the kernel reads, exactly
            bytes.extend(enc);
        }
        let w = ops.gpu.upload_bytes(&bytes, "W")?;
        let names: Vec<String> = (0..batch).map(|b| format!("selftest.{b}.weight")).collect();
        let ids: Vec<u64> = names.iter().map(|s| matrix_id(s)).collect();
        let ids_buf = ops.gpu.upload(&ids, "ids")?;
        let case = format!(
            "{m}x{n} l={l} {ty:?} batch {batch}{}",
            if positive { " positive" } else { "" }
        );
        // One-signed sums of 8192 values lose about 5e-6 even in f32 rounded to nearest (the
        // CUDA-core kernels); a truncating accumulation carried through them loses ~5e-5.
        let tolerance = if positive { 2e-5 } else { 1e-5 };

        let y = self.poisoned(batch * m * l, "Y")?;
        ops.sketch(&y, &w, ty, &ids_buf, self.seed, m, n, l, batch)?;
        let got: Vec<f32> = ops.gpu.download(y.ptr(), batch * m * l)?;
        let mut want = Vec::new();
        for (b, wb) in ws.iter().enumerate() {
            let mut omega_cm = vec![0f32; n * l];
            fill_gaussian(self.seed, ids[b], n, l, &mut omega_cm);
            let omega: Vec<f32> = (0..n * l).map(|x| omega_cm[(x % l) * n + x / l]).collect();
            want.extend(reference_product(wb, &omega, (m, l, n), false, false));
        }
        self.push(
            &ops.product_kernel("sketch", ty),
            case.clone(),
            rel_err(&got, &want),
            tolerance,
        );

        // W·Z (m×l from n×l) and Wᵀ·Q (n×l from m×l).
        for (transposed, kernel) in [(false, "w_mul"), (true, "wt_mul")] {
            let (rows_in, rows_out) = if transposed { (m, n) } else { (n, m) };
            let p_in = sign(gaussian_rm(
                batch * rows_in,
                l,
                self.seed,
                20 + transposed as u64,
            ));
            let p = ops.gpu.upload(&p_in, "panel")?;
            let c = self.poisoned(batch * rows_out * l, "product")?;
            ops.w_product(transposed, &c, &w, ty, &p, (m, n, l), batch)?;
            let got: Vec<f32> = ops.gpu.download(c.ptr(), batch * rows_out * l)?;
            let want: Vec<f64> = (0..batch)
                .flat_map(|b| {
                    let panel = &p_in[b * rows_in * l..(b + 1) * rows_in * l];
                    reference_product(&ws[b], panel, (rows_out, l, rows_in), transposed, false)
                })
                .collect();
            let name = ops.product_kernel(kernel, ty);
            self.push(&name, case.clone(), rel_err(&got, &want), tolerance);
        }
        Ok(())
    }

    fn panels(&mut self, m: usize, n: usize, k: usize) -> Result<()> {
        let ops = self.backend.ops();
        for (kind, ta, tb, name) in [
            (Panel::NN, false, false, "panel_nn"),
            (Panel::TN, true, false, "panel_tn"),
            (Panel::NT, false, true, "panel_nt"),
        ] {
            let a = gaussian_rm(m, k, self.seed, 30);
            let b = gaussian_rm(k, n, self.seed, 31);
            let (lda, ldb) = (if ta { m } else { k }, if tb { k } else { n });
            let (abuf, bbuf) = (ops.gpu.upload(&a, "A")?, ops.gpu.upload(&b, "B")?);
            let c = self.poisoned(m * n, "C")?;
            ops.panel(&PanelProduct {
                kind,
                c: c.ptr(),
                a: abuf.ptr(),
                b: bbuf.ptr(),
                m,
                n,
                k,
                lda,
                ldb,
                stride_a: 0,
                stride_b: 0,
                batch: 1,
            })?;
            let got: Vec<f32> = ops.gpu.download(c.ptr(), m * n)?;
            self.push(
                name,
                format!("{m}x{n}, K={k}"),
                rel_err(&got, &reference_product(&a, &b, (m, n, k), ta, tb)),
                1e-5,
            );
        }
        Ok(())
    }

    fn orthonormalize(&mut self, rows: usize, l: usize) -> Result<()> {
        let ops = self.backend.ops();
        let full = gaussian_rm(rows, l, self.seed, 40);
        // The second panel is rank-deficient: a repeated column and a zero column.
        let mut deficient = gaussian_rm(rows, l, self.seed, 41);
        for r in 0..rows {
            deficient[r * l + l - 1] = deficient[r * l];
            deficient[r * l + l / 2] = 0.0;
        }
        let y_in: Vec<f32> = full.iter().chain(deficient.iter()).copied().collect();
        let y = ops.gpu.upload(&y_in, "Y")?;
        let fallbacks = ops.orthonormalize(&y, rows, l, 2, self.seed)?;
        let q: Vec<f32> = ops.gpu.download(y.ptr(), 2 * rows * l)?;
        for (b, (input, case)) in [(&full, "full rank"), (&deficient, "rank-deficient")]
            .into_iter()
            .enumerate()
        {
            let qb = from_row_major(&q[b * rows * l..(b + 1) * rows * l], rows, l);
            let yb = from_row_major(input, rows, l);
            let gram = qb.transpose() * &qb;
            let ortho = (0..l)
                .flat_map(|i| (0..l).map(move |j| (i, j)))
                .fold(0f64, |e, (i, j)| {
                    worst(
                        e,
                        (gram[(i, j)] - if i == j { 1.0 } else { 0.0 }).abs() as f64,
                    )
                });
            self.push(
                "cholesky_qr2",
                format!("{rows}x{l} {case}: |QᵀQ − I|"),
                ortho,
                1e-5,
            );
            // span(Y) ⊆ span(Q): the residual of projecting Y onto Q.
            let resid = &yb - &qb * (qb.transpose() * &yb);
            self.push(
                "cholesky_qr2",
                format!("{rows}x{l} {case}: |Y − QQᵀY|/|Y|"),
                (resid.norm_l2() / yb.norm_l2().max(1e-30)) as f64,
                1e-5,
            );
        }
        self.push(
            "cgs2_fallback",
            format!("{rows}x{l}: panels sent to the fallback (want 1)"),
            (fallbacks as f64 - 1.0).abs(),
            0.0,
        );
        Ok(())
    }

    fn eig(&mut self, rows: usize, l: usize) -> Result<()> {
        let ops = self.backend.ops();
        let x = gaussian_rm(rows, l, self.seed, 50);
        let xm = Mat::<f64>::from_fn(rows, l, |i, j| x[i * l + j] as f64);
        let g = xm.transpose() * &xm;
        let gbuf = ops.gpu.upload(
            &(0..l * l).map(|i| g[(i / l, i % l)]).collect::<Vec<f64>>(),
            "G",
        )?;
        let (s, vb) = ops.eig(&gbuf, l, 1)?;
        let s: Vec<f32> = ops.gpu.download(s.ptr(), l)?;
        let vb: Vec<f32> = ops.gpu.download(vb.ptr(), l * l)?;
        let svd = xm.thin_svd().expect("reference SVD");
        let want: Vec<f64> = (0..l).map(|i| svd.S().column_vector()[i]).collect();
        self.push(
            "jacobi_eig_f64",
            format!("{l}x{l} (XᵀX, X {rows}x{l}): σ"),
            rel_err(&s, &want),
            1e-5,
        );
        // Residual ‖G v − λ v‖ / λ₁ of every returned pair.
        let v = Mat::<f64>::from_fn(l, l, |i, j| vb[i * l + j] as f64);
        let gv = &g * &v;
        let lambda1 = want[0] * want[0];
        let mut residual = 0f64;
        for j in 0..l {
            let lam = (s[j] as f64).powi(2);
            for i in 0..l {
                residual = worst(residual, (gv[(i, j)] - lam * v[(i, j)]).abs() / lambda1);
            }
        }
        self.push(
            "jacobi_eig_f64",
            format!("{l}x{l}: |Gv − λv|/λ₁"),
            residual,
            1e-5,
        );
        Ok(())
    }

    /// The whole randomized SVD against the CPU backend on a planted, gapped spectrum.
    fn rsvd(
        &mut self,
        ty: FloatType,
        m: usize,
        n: usize,
        rank: usize,
        oversample: usize,
        vector_tolerance: f64,
    ) -> Result<()> {
        let r = m.min(n);
        // Evenly spaced singular values from 10 down to 2 past k, then a floor at 0.1: every
        // direction is separated from its neighbours by the same gap, so both backends resolve
        // the same vectors and their differences are rounding, not ambiguity.
        let top = rank + 3;
        let sigma: Vec<f32> = (0..r)
            .map(|i| {
                if i < top {
                    10.0 * (1.0 - 0.8 * i as f32 / top as f32)
                } else {
                    0.1
                }
            })
            .collect();
        let w = planted(m, n, &sigma, self.seed);
        let bytes = encode_f32(&w, ty);
        let decoded = decode_f32(&bytes, ty);
        let name = format!("selftest.{m}x{n}.weight");
        let params = SvdParams {
            rank: rank.min(r),
            oversample,
            power_iters: 2,
            seed: self.seed,
        };
        let t = Timings::default();
        let raw = RawMatrix {
            name: &name,
            bytes: &bytes,
            ty,
            rows: m,
            cols: n,
            unchecked: None,
        };
        let got = self.backend.truncated_svd_raw(&raw, &params, &t)?;
        let want = cpu_rsvd::truncated_svd(
            &Weight {
                name: &name,
                data: &decoded,
                rows: m,
                cols: n,
            },
            &params,
            &t,
        )?;
        let case = format!(
            "{m}x{n} k={} p={oversample} {ty:?}{}",
            params.rank,
            if rank > r { " (k capped)" } else { "" }
        );
        let s_want: Vec<f64> = want.s.iter().map(|&x| x as f64).collect();
        self.push(
            "truncated_svd",
            format!("{case}: σ"),
            rel_err(&got.s, &s_want),
            1e-4,
        );
        // The canonical sign (largest-magnitude entry of u_j positive) is a coin toss where a
        // vector's two largest entries tie to rounding, and the backends may toss differently;
        // u_j and v_j flip together, which changes no product of the pair, so the vectors are
        // compared with the reference's signs.
        let flip = |m: &Mat<f32>, signs: &[f32]| {
            Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] * signs[j])
        };
        let signs: Vec<f32> = (0..got.u.ncols().min(want.u.ncols()))
            .map(|j| {
                let dot: f32 = (0..got.u.nrows().min(want.u.nrows()))
                    .map(|i| got.u[(i, j)] * want.u[(i, j)])
                    .sum();
                if dot < 0.0 {
                    -1.0
                } else {
                    1.0
                }
            })
            .chain(std::iter::repeat(1.0))
            .take(got.u.ncols())
            .collect();
        self.push(
            "truncated_svd",
            format!("{case}: U"),
            basis_err(&flip(&got.u, &signs), &want.u),
            vector_tolerance,
        );
        self.push(
            "truncated_svd",
            format!("{case}: V"),
            basis_err(&flip(&got.v, &signs), &want.v),
            vector_tolerance,
        );
        Ok(())
    }

    fn similarity_and_transfer(&mut self, m: usize, n: usize, k: usize, r: usize) -> Result<()> {
        let ortho = |rows, stream| -> Mat<f32> {
            let g = gaussian_rm(rows, k, self.seed, stream);
            from_row_major(&g, rows, k).qr().compute_thin_Q()
        };
        let basis = |su, sv| Basis {
            u: ortho(m, su),
            s: vec![1.0; k],
            v: ortho(n, sv),
            next: None,
            resident: None,
        };
        let (bs, bt) = (basis(60, 61), basis(62, 63));
        // Half of bs.v's columns and random others: a similarity well inside (0, 1), so that the
        // clamp to [0, 1] both backends apply cannot hide an error (as a value of 1 would).
        let shared = k.div_ceil(2);
        let other = from_row_major(&gaussian_rm(n, k, self.seed, 59), n, k);
        let half = Mat::from_fn(n, k, |i, j| {
            if j < shared {
                bs.v[(i, j)]
            } else {
                other[(i, j)]
            }
        })
        .qr()
        .compute_thin_Q();
        let got = self.backend.similarity_batch(&[
            (bs.u.as_ref(), bt.u.as_ref()),
            (bs.v.as_ref(), half.as_ref()),
        ])?;
        let want = [
            factors::similarity(bs.u.as_ref(), bt.u.as_ref()) as f64,
            factors::similarity(bs.v.as_ref(), half.as_ref()) as f64,
        ];
        self.push(
            "sum_squares",
            format!("similarity {m}x{k} (random, half shared)"),
            rel_err(&got, &want),
            1e-5,
        );

        let src = Factors {
            b: from_row_major(&gaussian_rm(m, r, self.seed, 64), m, r),
            a: from_row_major(&gaussian_rm(r, n, self.seed, 65), r, n),
        };
        for mode in [Mode::Project, Mode::Align] {
            let got = self
                .backend
                .transfer(mode, &src, Some(&bs), Some(&bt), (m, n))?;
            let want = factors::transfer(mode, &src, Some(&bs), Some(&bt), (m, n))?;
            let g: Vec<f32> = row_major(got.b.as_ref())
                .into_iter()
                .chain(row_major(got.a.as_ref()))
                .collect();
            let w: Vec<f64> = row_major(want.b.as_ref())
                .into_iter()
                .chain(row_major(want.a.as_ref()))
                .map(|x| x as f64)
                .collect();
            self.push(
                "panel products",
                format!("{} {m}x{n} k={k} r={r}", mode.name()),
                rel_err(&g, &w),
                1e-5,
            );
        }
        Ok(())
    }

    fn casts(&mut self, count: usize) -> Result<()> {
        let ops = self.backend.ops();
        let mut values = gaussian_rm(1, count, self.seed, 70);
        values.extend([0.0, -0.0, 65504.0, 1e-8, 3.0e38, f32::INFINITY]);
        let input = ops.gpu.upload(&values, "values")?;
        for ty in [FloatType::F16, FloatType::Bf16] {
            let out = ops
                .gpu
                .upload(&vec![0xffffu16; values.len()], "cast output")?;
            ops.cast(&out, &input, values.len(), ty)?;
            let got: Vec<u16> = ops.gpu.download(out.ptr(), values.len())?;
            let want: Vec<u16> = bytemuck::cast_slice::<u8, u16>(&encode_f32(&values, ty)).to_vec();
            let mismatches = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            self.push(
                &format!("cast_f32_{}", suffix(ty)),
                format!("{} values: mismatching bits", values.len()),
                mismatches as f64,
                0.0,
            );
        }
        Ok(())
    }
}

fn suffix(ty: FloatType) -> &'static str {
    match ty {
        FloatType::F32 => "f32",
        FloatType::F16 => "f16",
        FloatType::Bf16 => "bf16",
    }
}

/// Largest entry-wise difference between two bases with canonical signs.
fn basis_err(a: &Mat<f32>, b: &Mat<f32>) -> f64 {
    if (a.nrows(), a.ncols()) != (b.nrows(), b.ncols()) {
        return f64::NAN;
    }
    (0..a.ncols())
        .flat_map(|j| (0..a.nrows()).map(move |i| (i, j)))
        .fold(0f64, |e, (i, j)| {
            worst(e, (a[(i, j)] - b[(i, j)]).abs() as f64)
        })
}

/// Row-major W = U diag(σ) Vᵀ with random orthonormal U, V.
fn planted(m: usize, n: usize, sigma: &[f32], seed: u64) -> Vec<f32> {
    let k = sigma.len();
    let u = from_row_major(&gaussian_rm(m, k, seed, 80), m, k)
        .qr()
        .compute_thin_Q();
    let v = from_row_major(&gaussian_rm(n, k, seed, 81), n, k)
        .qr()
        .compute_thin_Q();
    let us = Mat::from_fn(m, k, |i, j| u[(i, j)] * sigma[j]);
    row_major((us * v.transpose()).as_ref())
}

#[cfg(test)]
mod tests;
