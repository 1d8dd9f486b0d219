//! The pipeline's own checks: a batch submitted in pieces (uploads overlapping the kernels of the
//! piece before) against one batch, and similarity/projection on the bases the SVD left on the
//! device against uploaded copies. Both compare the device with itself, so they hold to 1e-6.

use super::super::backend::{from_row_major, resident_bytes, row_major};
use super::super::rsvd::{truncated_svd_batch, RawMatrix};
use super::{basis_err, gaussian_rm, planted, rel_err, worst, Runner};
use crate::backend::{Backend, Basis, Factors, Side, SvdParams};
use crate::error::Result;
use crate::io::safetensors::{encode_f32, FloatType};
use crate::modes::Mode;
use crate::timing::Timings;

impl Runner<'_> {
    /// Many matrices submitted in pieces (uploads on the copy queue overlapping the kernels of
    /// the piece before) give what one batch gives: the pipeline's ordering and offsets.
    pub(super) fn pipeline(&mut self, count: usize, m: usize, n: usize, rank: usize) -> Result<()> {
        let ty = FloatType::Bf16;
        let sigma: Vec<f32> = (0..m.min(n)).map(|i| 10.0 / (1.0 + i as f32)).collect();
        let bytes: Vec<Vec<u8>> = (0..count)
            .map(|b| encode_f32(&planted(m, n, &sigma, self.seed + b as u64), ty))
            .collect();
        let names: Vec<String> = (0..count).map(|b| format!("pipeline.{b}.weight")).collect();
        let mats: Vec<RawMatrix<'_>> = (0..count)
            .map(|b| RawMatrix {
                name: &names[b],
                bytes: &bytes[b],
                ty,
                rows: m,
                cols: n,
                unchecked: None,
            })
            .collect();
        let params = SvdParams {
            rank,
            oversample: 4,
            power_iters: 2,
            seed: self.seed,
        };
        let t = Timings::default();
        // One matrix per piece.
        let piecewise = self.backend.with_piece_bytes(m * n * ty.size());
        let pieces = piecewise
            .pieces(
                count,
                &mats[0],
                &params,
                resident_bytes(count, &mats[0], &params),
            )
            .len();
        let got = piecewise.svd_pipelined(&mats, &params, &t)?;
        let want = truncated_svd_batch(self.backend.ops(), &mats, &params, &t)?;
        let mut err = if got.len() == want.len() && pieces == count {
            0.0
        } else {
            f64::NAN
        };
        for (g, w) in got.iter().zip(&want) {
            let s_want: Vec<f64> = w.s.iter().map(|&x| x as f64).collect();
            err = worst(err, rel_err(&g.s, &s_want));
            err = worst(err, basis_err(&g.u, &w.u));
            err = worst(err, basis_err(&g.v, &w.v));
        }
        self.push(
            "truncated_svd pipeline",
            format!("{count}x {m}x{n} {ty:?} k={rank}: {pieces} pieces vs one batch"),
            err,
            1e-6,
        );

        // Similarity and projection read the bases where the SVD left them on the device; the
        // same bases uploaded from the host must give the same figures.
        let host_copy = |b: &Basis| Basis {
            resident: None,
            ..b.clone()
        };
        // From the one batch, so the bases sit at different offsets of shared buffers.
        let (x, y) = (&want[1], &want[2]);
        let (hx, hy) = (host_copy(x), host_copy(y));
        let r = 3;
        let src = Factors {
            b: from_row_major(&gaussian_rm(m, r, self.seed, 66), m, r),
            a: from_row_major(&gaussian_rm(r, n, self.seed, 67), r, n),
        };
        let mut err = if x.resident.is_some() && y.resident.is_some() {
            0.0
        } else {
            f64::NAN
        };
        for side in [Side::U, Side::V] {
            let a = self.backend.pair_similarity(x, y, side)? as f64;
            let b = self.backend.pair_similarity(&hx, &hy, side)? as f64;
            err = worst(err, (a - b).abs());
        }
        let on_device = self
            .backend
            .transfer(Mode::Align, &src, Some(x), Some(y), (m, n))?;
        let from_host = self
            .backend
            .transfer(Mode::Align, &src, Some(&hx), Some(&hy), (m, n))?;
        let want: Vec<f64> = row_major(from_host.b.as_ref())
            .into_iter()
            .chain(row_major(from_host.a.as_ref()))
            .map(|v| v as f64)
            .collect();
        let gotv: Vec<f32> = row_major(on_device.b.as_ref())
            .into_iter()
            .chain(row_major(on_device.a.as_ref()))
            .collect();
        err = worst(err, rel_err(&gotv, &want));
        self.push(
            "resident bases",
            format!("similarity and align {m}x{n} k={rank}: device copies vs uploads"),
            err,
            1e-6,
        );
        Ok(())
    }
}

impl Runner<'_> {
    /// The backend's dense product (the map mode's weights times a sketch, rotate's basis
    /// products) on a transposed, strided operand against an f64 reference.
    pub(super) fn dense_product(&mut self, m: usize, n: usize, k: usize) -> Result<()> {
        let a_t = gaussian_rm(k, m, self.seed, 60); // A stored transposed: the product reads Aᵀᵀ
        let b = gaussian_rm(k, n, self.seed, 61);
        let a_view = from_row_major(&a_t, k, m);
        let b_view = from_row_major(&b, k, n);
        let got = self.backend.product(a_view.transpose(), b_view.as_ref())?;
        let want = super::reference_product(&a_t, &b, (m, n, k), true, false);
        self.push(
            "product",
            format!("{m}x{n}, K={k}, A transposed"),
            rel_err(&row_major(got.as_ref()), &want),
            1e-5,
        );
        Ok(())
    }
}
