//! MLP neurons: matched by the mean of the cosines of their gate rows, up rows and down
//! columns, compared in sketched target coordinates (the source's through the layer's view of
//! the sketch, `SourceView`).

use faer::Mat;

use super::layer::{reading, SourceView, Weights};
use super::matching::{assign_features, joint_features, Assignment};
use super::reader_scale::unit_sizes;
use super::sketch::{fold, SignSketch};
use crate::backend::Backend;
use crate::error::Result;

/// Buckets of the neurons' coarse features, folded from their [`super::sketch::NEURON_SKETCH`]
/// (see [`super::sketch::fold`]): the candidates are re-scored on all of them, so this only
/// needs to put a unit's partner among its best [`super::matching::CANDIDATES`].
pub const COARSE: usize = 32;

/// Neuron features in sketched target coordinates, coarse ([`COARSE`] buckets) and fine (the
/// [`super::sketch::NEURON_SKETCH`] of the neurons' SignSketch): rows whose dot products are the mean of the
/// cosines of the gate rows, up rows and down columns of two neurons.
pub(crate) struct NeuronFeatures {
    coarse: Mat<f32>,
    fine: Mat<f32>,
    /// Per neuron, the squared sizes of its sketched gate and up rows (`reader_scale`).
    pub sizes: [Vec<f64>; 2],
}

impl NeuronFeatures {
    /// From the views gate rows, up rows, down columns (units × buckets).
    fn from_views(views: [Mat<f32>; 3]) -> Self {
        let coarse = views.each_ref().map(|v| fold(v, COARSE));
        NeuronFeatures {
            coarse: joint_features(&coarse, COARSE),
            fine: joint_features(&views, views[0].ncols()),
            sizes: [
                unit_sizes(views[0].as_ref(), 1),
                unit_sizes(views[1].as_ref(), 1),
            ],
        }
    }

    /// The target's: its own weights through the SignSketch, one pass over each.
    pub(crate) fn target(w: &Weights<'_>, g: &[f32], sketch: &SignSketch) -> Self {
        Self::from_views([
            sketch.rows(&w.gate, g),
            sketch.rows(&w.up, g),
            sketch.columns(&w.down),
        ])
    }

    /// The source's: reads are `w diag(g) X_read`, writes `cᵀ X_write` (down's columns), with X
    /// the map's view of the sketch.
    fn source(
        w: &Weights<'_>,
        g: &[f32],
        (read, write): (&Mat<f32>, &Mat<f32>),
        backend: &dyn Backend,
    ) -> Result<Self> {
        Ok(Self::from_views([
            reading(&w.gate, g, read.as_ref(), backend)?,
            reading(&w.up, g, read.as_ref(), backend)?,
            backend.stored_product(&w.down, write.as_ref(), true)?,
        ]))
    }
}

/// Matches the target's neurons (features computed once per layer) with the source's under
/// the current view; also the source neurons' squared sizes of their sketched gate and up rows.
pub(crate) fn match_neurons(
    ws: &Weights<'_>,
    target: &NeuronFeatures,
    g_s: &[f32],
    view: &SourceView,
    backend: &dyn Backend,
) -> Result<(Assignment, [Vec<f64>; 2])> {
    let source = NeuronFeatures::source(ws, g_s, (&view.read_mlp, &view.write_mlp), backend)?;
    let assignment = assign_features(
        (&target.coarse, &source.coarse),
        (&target.fine, &source.fine),
        backend,
    )?;
    Ok((assignment, source.sizes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::io::safetensors::FloatType;
    use crate::linalg::philox::gaussian_matrix;
    use crate::linalg::stored::Stored;
    use crate::map::layer::{Sketch, WriterMap};
    use crate::map::ResidualMap;

    /// The neurons' whole path at a width above the dense limit (sign sketch, folded coarse
    /// candidates, re-scoring): a target whose MLP is the source's with its residual rotated,
    /// its neurons permuted and noise added (partners' cosines about 0.7).
    #[test]
    fn neurons_are_matched_through_the_sign_sketch_in_rotated_coordinates() {
        let (d, inter) = (96, super::super::matching::DENSE_LIMIT + 300);
        let g = |rows, cols, stream| gaussian_matrix(21, stream, rows, cols);
        let (gate, up, down) = (g(inter, d, 1), g(inter, d, 2), g(d, inter, 3));
        let q = g(d, d, 4).qr().compute_thin_Q(); // h_t = Q h_s
        let perm: Vec<usize> = (0..inter).map(|i| (i * 7919 + 11) % inter).collect();
        let noisy = |m: Mat<f32>, stream| &m + g(m.nrows(), m.ncols(), stream);
        let rows_of = |m: &Mat<f32>| Mat::from_fn(inter, d, |i, j| m[(perm[i], j)]);
        let stored = |m: &Mat<f32>| Stored::from_mat(m.as_ref(), FloatType::Bf16);
        let weights = |gate: &Mat<f32>, up: &Mat<f32>, down: &Mat<f32>| Weights {
            attention: None,
            linear: None,
            gate: stored(gate),
            up: stored(up),
            down: stored(down),
        };
        let source = weights(&gate, &up, &down);
        let down_t = &q * Mat::from_fn(d, inter, |i, j| down[(i, perm[j])]);
        let target = weights(
            &noisy(rows_of(&gate) * q.transpose(), 5),
            &noisy(rows_of(&up) * q.transpose(), 6),
            &noisy(down_t, 7),
        );
        let gains = vec![1.0; d];
        let sketch = Sketch::new(d, 3, &CpuBackend);
        let residual = ResidualMap::from_orientation(q.transpose().to_owned(), 1.0);
        let plain = || WriterMap {
            gains: None,
            kappa: 1.0,
        };
        let view = SourceView::new(&sketch, &residual, &(plain(), plain()));
        let features = NeuronFeatures::target(&target, &gains, &sketch.neurons);
        let (a, _) = match_neurons(&source, &features, &gains, &view, &CpuBackend).unwrap();
        let truth: Vec<Option<usize>> = perm.iter().map(|&p| Some(p)).collect();
        assert!(a.agreement(&truth) > 0.99, "{}", a.agreement(&truth));
        // Unrelated targets find nothing like it.
        let unrelated = weights(&g(inter, d, 8), &g(inter, d, 9), &g(d, inter, 10));
        let features = NeuronFeatures::target(&unrelated, &gains, &sketch.neurons);
        let (b, _) = match_neurons(&source, &features, &gains, &view, &CpuBackend).unwrap();
        assert!(b.agreement(&truth) < 0.01);
        assert!(a.mean_similarity().unwrap() > 0.6 && b.mean_similarity().unwrap() < 0.4);
    }
}
