//! The `map` mode: carry an adapter across models of any shapes and tokenizers through a map
//! between the two models' coordinates built from the weights alone (docs/METHOD.md, "The map
//! mode"). Three parts, each of which can be switched off to measure what it buys:
//!
//! 1. the residual stream, from the embedding rows of the tokens both vocabularies spell alike
//!    ([`residual`], [`vocab`]);
//! 2. the norm gains the blocks apply to the residual before reading it, folded into the map of
//!    each reading module's A;
//! 3. attention heads (within the GQA structure) and MLP neurons matched by the similarity of
//!    their mapped weights ([`layer`], [`matching`]), so B's rows and A's columns on the inner
//!    side move with the units they belong to.
//!
//! The whole map is built once per transfer, before the units run ([`ModelMap::build`]); each
//! unit then only gathers rows and multiplies its small factors ([`apply`]).

pub mod apply;
pub mod layer;
pub mod matching;
pub mod residual;
pub mod vocab;

use std::collections::BTreeMap;

use faer::Mat;

use crate::error::{Error, Result};
use crate::io::checkpoint::Checkpoint;
use crate::plan::ModelSide;
pub use layer::LayerMap;
pub use residual::ResidualMap;

/// How the residual stream is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ResidualFit {
    /// Scaled (semi-)orthogonal Procrustes on the shared tokens' embeddings.
    Tokens,
    /// The identity on the shared coordinates (ablation).
    Identity,
}

/// How inner units (heads, neurons) are paired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InnerMatch {
    /// Assignment on the similarity of the mapped weights.
    Match,
    /// Target unit i takes source unit i (ablation).
    Index,
}

/// The map mode's switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MapOptions {
    pub residual: ResidualFit,
    /// Fold the norm gains into the reading modules' maps.
    pub fold_norms: bool,
    pub inner: InnerMatch,
    /// Seed of the random sketch the matchings compare weights through.
    pub seed: u64,
}

impl Default for MapOptions {
    fn default() -> Self {
        MapOptions {
            residual: ResidualFit::Tokens,
            fold_norms: true,
            inner: InnerMatch::Match,
            seed: 0,
        }
    }
}

/// The map between two models: the residual map and, per target layer, its matchings.
#[derive(Debug, Clone)]
pub struct ModelMap {
    pub residual: ResidualMap,
    pub layers: BTreeMap<usize, LayerMap>,
    pub options: MapOptions,
}

impl ModelMap {
    /// Builds the map for the target layers of `layer_map` (target layer → source layer).
    pub fn build(
        source: &ModelSide<'_>,
        target: &ModelSide<'_>,
        layer_map: &BTreeMap<usize, usize>,
        options: MapOptions,
    ) -> Result<Self> {
        let residual = match options.residual {
            ResidualFit::Identity => ResidualMap::identity(
                source.ckpt.config.hidden_size,
                target.ckpt.config.hidden_size,
            ),
            ResidualFit::Tokens => {
                // Built before any unit runs: the fit's decompositions may use every core (the
                // small products of the matchings and the units stay sequential).
                struct Sequential;
                impl Drop for Sequential {
                    fn drop(&mut self) {
                        crate::backend::cpu::rsvd::sequential_faer();
                    }
                }
                let _restore = Sequential;
                faer::set_global_parallelism(faer::Par::rayon(0));
                fit_residual(source, target)?
            }
        };
        let sketch = layer::Sketch::new(&residual, options.seed);
        let mut layers = BTreeMap::new();
        for (&j, &i) in layer_map {
            layers.insert(j, LayerMap::build(source, target, i, j, &sketch, options)?);
        }
        Ok(ModelMap {
            residual,
            layers,
            options,
        })
    }
}

/// What the report says of the model map.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MapReport {
    pub options: MapOptions,
    /// Tokens spelled alike in both vocabularies that anchored the residual map.
    pub shared_tokens: usize,
    /// Relative residual of the residual map on those anchors.
    pub residual_fit: Option<f64>,
    pub layers: Vec<LayerReport>,
}

/// One target layer's matchings: for each target unit, its source unit (null: unmatched).
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerReport {
    pub target_layer: usize,
    pub source_layer: usize,
    pub head_similarity: Option<f64>,
    pub neuron_similarity: Option<f64>,
    pub q_heads: Vec<Option<usize>>,
    pub kv_heads: Vec<Option<usize>>,
    pub neurons: Vec<Option<usize>>,
}

impl ModelMap {
    pub fn report(&self) -> MapReport {
        MapReport {
            options: self.options,
            shared_tokens: self.residual.shared_tokens,
            residual_fit: self.residual.relative_residual,
            layers: self
                .layers
                .iter()
                .map(|(&j, l)| LayerReport {
                    target_layer: j,
                    source_layer: l.source_layer,
                    head_similarity: l.q_heads.mean_similarity(),
                    neuron_similarity: l.neurons.mean_similarity(),
                    q_heads: l.q_heads.source_of.clone(),
                    kv_heads: l.kv_heads.source_of.clone(),
                    neurons: l.neurons.source_of.clone(),
                })
                .collect(),
        }
    }
}

/// At most this many shared tokens anchor the residual map.
pub const MAX_ANCHORS: usize = 16384;

/// The residual map from the shared tokens' embedding rows (scaled as each family scales them).
fn fit_residual(source: &ModelSide<'_>, target: &ModelSide<'_>) -> Result<ResidualMap> {
    let vs = vocab::Vocab::open(&source.ckpt.dir)?;
    let vt = vocab::Vocab::open(&target.ckpt.dir)?;
    let (es_name, et_name) = (
        source.arch.embed_name(&source.prefix),
        target.arch.embed_name(&target.prefix),
    );
    let rows =
        |side: &ModelSide<'_>, name: &str| -> Result<usize> { Ok(side.ckpt.shape(name)?[0]) };
    let all_pairs =
        vocab::shared_tokens(&vs, &vt, (rows(source, &es_name)?, rows(target, &et_name)?));
    // Evenly spaced over the source ids: a few thousand anchors fix a map between widths of a
    // few thousand as well as a hundred thousand do, at a fraction of the cost.
    let step = all_pairs.len().div_ceil(MAX_ANCHORS).max(1);
    let pairs: Vec<(usize, usize)> = all_pairs.iter().step_by(step).copied().collect();
    if pairs.is_empty() {
        return Err(Error::config(
            &vt.path,
            format!(
                "no token is spelled alike in {} and this vocabulary: the residual map has no anchors",
                vs.path.display()
            ),
        ));
    }
    let gather = |side: &ModelSide<'_>, name: &str, pick: &dyn Fn(&(usize, usize)) -> usize| {
        let d = side.ckpt.config.hidden_size;
        let scale = if side.arch.residual.embed_scale_sqrt_hidden {
            (d as f32).sqrt()
        } else {
            1.0
        };
        let mut out = Mat::<f32>::zeros(pairs.len(), d);
        for (r, p) in pairs.iter().enumerate() {
            let id = pick(p);
            let row = side.ckpt.read_rows_f32(name, id..id + 1)?;
            for (c, x) in row.iter().enumerate() {
                out[(r, c)] = x * scale;
            }
        }
        Ok::<_, Error>(out)
    };
    let e_s = gather(source, &es_name, &|p| p.0)?;
    let e_t = gather(target, &et_name, &|p| p.1)?;
    ResidualMap::fit(&e_s, &e_t)
}

/// A whole tensor as a matrix (a 1-D tensor as one row).
pub(crate) fn read_matrix(ckpt: &Checkpoint, name: &str) -> Result<Mat<f32>> {
    let shape = ckpt.shape(name)?.to_vec();
    let (rows, cols) = match shape.as_slice() {
        [n] => (1, *n),
        [r, c] => (*r, *c),
        _ => {
            return Err(Error::bad_tensor(
                &ckpt.dir,
                name,
                format!("shape {shape:?}: expected a vector or a matrix"),
            ))
        }
    };
    // A vector's "rows" are its elements.
    let data = ckpt.read_rows_f32(name, 0..shape[0])?;
    Ok(Mat::from_fn(rows, cols, |i, j| data[i * cols + j]))
}
