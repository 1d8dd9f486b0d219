//! The size of a reading module's update where a side reads the residual without a norm before
//! the block (OLMo 2/3).
//!
//! A pre-norm fixes the scale of what q, k, v, gate and up read, so the fold
//! `A_t = A_s diag(g_s) P diag(g_t)⁻¹` carries the update at the right size. Without one, a
//! block reads the residual at whatever scale the model keeps it, and the reading weights are
//! sized for that scale; OLMo 2 normalizes q and k after their projections and every block's
//! output before it joins the residual, so it may size q, k, v and up freely. The update then
//! keeps its size relative to the weight it perturbs, as the output norms' writers do:
//! `κ_p = ‖W_t diag(g_t) R‖ / ‖W_s diag(g_s) P R‖` over the layer's sketch R, per reading part p,
//! applied to that part's rows of B. Where a head fit N moves a head's rows (heads of different
//! sizes, `--map-inner fit`), N, fitted on the same sketched rows, carries that ratio already.
//!
//! The attention scores' factor (`Scales::attention`: Granite's `attention_multiplier`, Gemma's
//! `query_pre_attn_scalar^-½`, `head_dim^-½` elsewhere) is not in the weights either: where it
//! differs, q's rows carry the ratio `c_s/c_t` (scores `c q·k` are equal when `q_t = (c_s/c_t) q_s`),
//! unless a head fit (fitted on the weights, which carry it) or a query/key norm (after which
//! q's size is its gain's) stands between.

use crate::arch::Part;

/// Frobenius norms of the sketched reading rows of a layer's parts, source then target.
pub(crate) type Sizes<const N: usize> = ([f64; N], [f64; N]);

/// κ per reading part (q, k, v, gate, up), None where it is not applied; and the ratio of the
/// attention scores' factors that q's rows carry (1 where none applies).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReaderScale {
    kappa: [Option<f64>; 5],
    score: f64,
}

impl ReaderScale {
    /// No reading part rescaled (both sides normalize what their blocks read).
    pub const NONE: ReaderScale = ReaderScale {
        kappa: [None; 5],
        score: 1.0,
    };

    /// With q's rows also carrying `ratio` (`c_s/c_t`; None where a head fit or a head norm
    /// stands between).
    pub(crate) fn with_score(self, ratio: Option<f64>) -> Self {
        ReaderScale {
            score: ratio.filter(|r| r.is_finite() && *r > 0.0).unwrap_or(1.0),
            ..self
        }
    }

    /// The scales of a layer whose attention (`raw.0`) or MLP (`raw.1`) reads an unnormalized
    /// residual on at least one side, from the sketched sizes of q, k, v (None where a head fit
    /// carries the ratio) and of gate, up.
    pub(crate) fn new(
        raw: (bool, bool),
        heads: Option<Sizes<3>>,
        neurons: Option<Sizes<2>>,
    ) -> Self {
        let ratio = |s: f64, t: f64| (s > 0.0 && t.is_finite()).then(|| t / s);
        let mut out = [None; 5];
        if let Some((s, t)) = heads.filter(|_| raw.0) {
            for p in 0..3 {
                out[p] = ratio(s[p], t[p]);
            }
        }
        if let Some((s, t)) = neurons.filter(|_| raw.1) {
            for p in 0..2 {
                out[3 + p] = ratio(s[p], t[p]);
            }
        }
        ReaderScale {
            kappa: out,
            score: 1.0,
        }
    }

    fn slot(part: Part) -> Option<usize> {
        match part {
            Part::Q => Some(0),
            Part::K => Some(1),
            Part::V => Some(2),
            Part::Gate => Some(3),
            Part::Up => Some(4),
            Part::O | Part::Down => None,
        }
    }

    /// The factor of `part`'s rows of B (1 where none applies).
    pub fn of(&self, part: Part) -> f32 {
        let kappa = Self::slot(part).and_then(|i| self.kappa[i]).unwrap_or(1.0);
        let score = if part == Part::Q { self.score } else { 1.0 };
        (kappa * score) as f32
    }

    /// For the report: κ of `[q, k, v, gate, up]`, or None where no part is rescaled.
    pub fn report(&self) -> Option<[Option<f64>; 5]> {
        self.kappa.iter().any(Option::is_some).then_some(self.kappa)
    }

    /// For the report: the ratio q's rows carry, where it is not 1.
    pub fn score_ratio(&self) -> Option<f64> {
        (self.score != 1.0).then_some(self.score)
    }
}

/// Whether a side's blocks read the residual as it is: (attention, MLP).
pub(crate) fn reads_raw(residual: &crate::arch::Residual) -> (bool, bool) {
    (residual.attn_norm.is_none(), residual.mlp_norm.is_none())
}

/// The squared Frobenius norm of a matrix, in f64.
pub(crate) fn size(m: faer::MatRef<'_, f32>) -> f64 {
    let mut s = 0.0f64;
    for j in 0..m.ncols() {
        for i in 0..m.nrows() {
            s += (m[(i, j)] as f64).powi(2);
        }
    }
    s.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_apply_only_to_the_blocks_that_read_raw() {
        let heads = Some(([1.0, 2.0, 4.0], [2.0, 1.0, 4.0]));
        let neurons = Some(([3.0, 0.0], [6.0, 1.0]));
        let both = ReaderScale::new((true, true), heads, neurons);
        let got: Vec<f32> = Part::ALL.map(|p| both.of(p)).to_vec();
        // Up's source rows are zero: no ratio, left as it is.
        assert_eq!(got, vec![2.0, 0.5, 1.0, 1.0, 2.0, 1.0, 1.0]);
        assert_eq!(
            both.report(),
            Some([Some(2.0), Some(0.5), Some(1.0), Some(2.0), None])
        );
        let attn_only = ReaderScale::new((true, false), heads, neurons);
        assert_eq!(
            (attn_only.of(Part::Q), attn_only.of(Part::Gate)),
            (2.0, 1.0)
        );
        // A head fit carries the attention's ratio; a pre-normed pair takes none.
        assert_eq!(
            ReaderScale::new((true, true), None, neurons).of(Part::Q),
            1.0
        );
        assert_eq!(
            ReaderScale::new((false, false), heads, neurons),
            ReaderScale::NONE
        );
        assert_eq!(ReaderScale::NONE.report(), None);
        // The scores' factor rides on q alone, with κ where both apply.
        let granite = ReaderScale::NONE.with_score(Some(4.0));
        assert_eq!((granite.of(Part::Q), granite.of(Part::K)), (4.0, 1.0));
        assert_eq!(granite.score_ratio(), Some(4.0));
        assert_eq!(both.with_score(Some(0.5)).of(Part::Q), 1.0);
        assert_eq!(ReaderScale::NONE.with_score(None).score_ratio(), None);
    }
}
