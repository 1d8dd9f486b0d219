//! Which target unit (attention head, MLP neuron) corresponds to which source unit: a maximum-
//! weight assignment on their similarities (Jonker–Volgenant, the `lapjv` crate), partial when
//! the counts differ — unmatched target units get nothing from the adapter.

use faer::Mat;

use crate::error::{Error, Result};

/// For each target unit, its source unit (None: unmatched), and the similarity of each match.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub source_of: Vec<Option<usize>>,
    pub similarity: Vec<f32>,
}

impl Assignment {
    /// Target unit i takes source unit i (the ablation without matching).
    pub fn by_index(targets: usize, sources: usize) -> Self {
        Assignment {
            source_of: (0..targets).map(|i| (i < sources).then_some(i)).collect(),
            similarity: vec![f32::NAN; targets],
        }
    }

    /// The mean similarity of the matched units (None when nothing is matched or measured).
    pub fn mean_similarity(&self) -> Option<f64> {
        let v: Vec<f64> = self
            .source_of
            .iter()
            .zip(&self.similarity)
            .filter(|(s, x)| s.is_some() && x.is_finite())
            .map(|(_, &x)| x as f64)
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }

    /// The fraction of target units matched to `truth` (for tests and reports on models whose
    /// correspondence is known).
    pub fn agreement(&self, truth: &[Option<usize>]) -> f64 {
        let hits = self
            .source_of
            .iter()
            .zip(truth)
            .filter(|(a, b)| a.is_some() && a == b)
            .count();
        let total = truth.iter().filter(|t| t.is_some()).count().max(1);
        hits as f64 / total as f64
    }
}

/// The assignment maximizing the summed similarity `sim[(target, source)]`. A pair whose
/// similarity is not above 0 is no better than leaving the target unmatched.
pub fn assign(sim: &Mat<f32>) -> Result<Assignment> {
    let (t, s) = (sim.nrows(), sim.ncols());
    let n = t.max(s);
    if n == 0 {
        return Ok(Assignment {
            source_of: vec![],
            similarity: vec![],
        });
    }
    // Square costs: 1 − sim for real pairs, 1 (= similarity 0) for a dummy partner.
    let costs = ndarray::Array2::from_shape_fn((n, n), |(i, j)| {
        if i < t && j < s {
            1.0 - sim[(i, j)].clamp(-1.0, 1.0) as f64
        } else {
            1.0
        }
    });
    let (row_to_col, _) = lapjv::lapjv(&costs).map_err(|e| Error::Numerical {
        context: "map: assignment".into(),
        reason: format!("{e:?}"),
    })?;
    let mut source_of = vec![None; t];
    let mut similarity = vec![0.0; t];
    for (i, slot) in source_of.iter_mut().enumerate() {
        let j = row_to_col[i];
        if j < s && sim[(i, j)] > 0.0 {
            *slot = Some(j);
            similarity[i] = sim[(i, j)];
        }
    }
    Ok(Assignment {
        source_of,
        similarity,
    })
}

/// Cosine similarities of the rows of `a` (targets) and `b` (sources).
pub fn cosine(a: &Mat<f32>, b: &Mat<f32>) -> Mat<f32> {
    let unit = |x: &Mat<f32>| {
        let norms: Vec<f32> = (0..x.nrows())
            .map(|i| x.row(i).norm_l2().max(f32::MIN_POSITIVE))
            .collect();
        Mat::from_fn(x.nrows(), x.ncols(), |i, j| x[(i, j)] / norms[i])
    };
    unit(a) * unit(b).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_permutation_is_recovered_and_extra_targets_stay_unmatched() {
        // Target i is source perm[i]; target 5 has no partner.
        let perm = [3usize, 0, 4, 1, 2];
        let sim = Mat::from_fn(6, 5, |i, j| {
            if i < 5 && perm[i] == j {
                0.9
            } else {
                -0.1 + 0.01 * (i + j) as f32
            }
        });
        let a = assign(&sim).unwrap();
        let want: Vec<Option<usize>> = perm.iter().map(|&p| Some(p)).chain([None]).collect();
        assert_eq!(a.source_of, want);
        assert_eq!(a.agreement(&want), 1.0);
        assert!((a.mean_similarity().unwrap() - 0.9).abs() < 1e-6);
    }

    #[test]
    fn by_index_pairs_equal_positions() {
        let a = Assignment::by_index(3, 2);
        assert_eq!(a.source_of, vec![Some(0), Some(1), None]);
    }
}
