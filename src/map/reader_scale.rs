//! The size of a reading module's update where a side reads the residual without a norm before
//! the block (OLMo 2/3).
//!
//! A pre-norm fixes the scale of what q, k, v, gate and up read, so the fold
//! `A_t = A_s diag(g_s) P diag(g_t)⁻¹` carries the update at the right size. Without one, a
//! block reads the residual at whatever scale the model keeps it, and the reading weights are
//! sized for that scale; OLMo 2 normalizes q and k after their projections and every block's
//! output before it joins the residual, so it may size q, k, v and up freely. The update then
//! keeps its size relative to the weight it perturbs, as the output norms' writers do:
//! `κ_p = ‖W_t diag(g_t) R‖ / ‖W_s diag(g_s) P R‖` over the layer's sketch R and the matched
//! units' rows only (a target with more heads or neurons than its source has rows no source row
//! corresponds to), per reading part p, applied to that part's rows of B. Where a head fit N
//! moves a head's rows (heads of different sizes, `--map-inner fit`), N, fitted on the same
//! sketched rows, carries that ratio already.
//!
//! The attention scores' factor (`Scales::attention`: Granite's `attention_multiplier`, Gemma's
//! `query_pre_attn_scalar^-½`, `head_dim^-½` elsewhere) is not in the weights either: where it
//! differs, q's rows carry the ratio `c_s/c_t` (scores `c q·k` are equal when `q_t = (c_s/c_t) q_s`),
//! unless a head fit (fitted on the weights, which carry it) or a query/key norm (after which
//! q's size is its gain's) stands between.

use super::matching::Assignment;
use crate::arch::Part;

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
    /// residual on at least one side: the matched ratios (`matched_ratio`) of q, k, v (None
    /// where a head fit carries them) and of gate, up.
    pub(crate) fn new(
        raw: (bool, bool),
        heads: Option<[Option<f64>; 3]>,
        neurons: Option<[Option<f64>; 2]>,
    ) -> Self {
        let mut kappa = [None; 5];
        if let Some(h) = heads.filter(|_| raw.0) {
            kappa[..3].copy_from_slice(&h);
        }
        if let Some(n) = neurons.filter(|_| raw.1) {
            kappa[3..].copy_from_slice(&n);
        }
        ReaderScale { kappa, score: 1.0 }
    }

    fn slot(part: Part) -> Option<usize> {
        match part {
            Part::Q => Some(0),
            Part::K => Some(1),
            Part::V => Some(2),
            Part::Gate => Some(3),
            Part::Up => Some(4),
            // Writers; latent attention's projections, which the map mode does not take
            // (`experts::refuse_map`); linear attention's, read under a pre-norm in every family
            // that has it (Qwen3.5).
            _ => None,
        }
    }

    /// The factor of `part`'s rows of B (1 where none applies).
    pub fn of(&self, part: Part) -> f32 {
        let kappa = Self::slot(part).and_then(|i| self.kappa[i]).unwrap_or(1.0);
        let score = if part == Part::Q { self.score } else { 1.0 };
        (kappa * score) as f32
    }

    /// The factor of a gated query's gate rows (Qwen3.5): q's κ, which they read the residual
    /// under too, without the scores' factor, which is the query rows' alone.
    pub fn of_query_gate(&self) -> f32 {
        self.kappa[0].unwrap_or(1.0) as f32
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

/// The squared sizes of the rows of `m` in blocks of `unit` rows (one per head or neuron).
pub(crate) fn unit_sizes(m: faer::MatRef<'_, f32>, unit: usize) -> Vec<f64> {
    (0..m.nrows() / unit.max(1))
        .map(|u| {
            let mut s = 0.0f64;
            for j in 0..m.ncols() {
                for i in u * unit..(u + 1) * unit {
                    s += (m[(i, j)] as f64).powi(2);
                }
            }
            s
        })
        .collect()
}

/// `sqrt(Σ target[u] / Σ source[src(u)])` over the matched units u of `assignment` (squared
/// sizes per unit, `unit_sizes`); None where nothing is matched or the matched source rows are
/// zero.
pub(crate) fn matched_ratio(
    source: &[f64],
    target: &[f64],
    assignment: &Assignment,
) -> Option<f64> {
    let (mut s, mut t) = (0.0, 0.0);
    for (u, src) in assignment.source_of.iter().enumerate() {
        if let Some(&a) = src.as_ref() {
            s += source[a];
            t += target[u];
        }
    }
    (s > 0.0 && t.is_finite()).then(|| (t / s).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_apply_only_to_the_blocks_that_read_raw() {
        let heads = Some([Some(2.0), Some(0.5), Some(1.0)]);
        let neurons = Some([Some(2.0), None]);
        let both = ReaderScale::new((true, true), heads, neurons);
        let got: Vec<f32> = Part::ALL.map(|p| both.of(p)).to_vec();
        // No ratio for up (its matched source rows were zero): left as it is.
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

    /// Only matched units count: a target's extra rows (unmatched) and a source's unmatched
    /// ones change nothing.
    #[test]
    fn ratios_count_the_matched_units_only() {
        let rows = faer::Mat::from_fn(6, 2, |i, j| (i + 1) as f32 * if j == 0 { 1.0 } else { 2.0 });
        // Two rows per unit: units hold 5·(1+4), 5·(9+16), 5·(25+36).
        assert_eq!(unit_sizes(rows.as_ref(), 2), vec![25.0, 125.0, 305.0]);
        let source = [1.0, 4.0, 9.0];
        let target = [16.0, 4.0, 100.0, 7.0];
        let assignment = Assignment {
            source_of: vec![Some(1), Some(0), None, None],
            similarity: vec![1.0, 1.0, f32::NAN, f32::NAN],
        };
        // (16 + 4) / (4 + 1) = 4.
        assert_eq!(matched_ratio(&source, &target, &assignment), Some(2.0));
        let none = Assignment {
            source_of: vec![None; 4],
            similarity: vec![f32::NAN; 4],
        };
        assert_eq!(matched_ratio(&source, &target, &none), None);
    }
}
