//! The `map` mode: carry an adapter across models of any shapes and tokenizers through a map
//! between the two models' coordinates built from the weights alone (docs/METHOD.md, "The map
//! mode"). Three parts, each of which can be switched off to measure what it buys:
//!
//! 1. the residual stream, from the embedding rows of the tokens both vocabularies spell alike
//!    ([`residual`], [`vocab`]), then refined layer by layer from the weights ([`refine`]);
//! 2. the norm gains the blocks apply to the residual before reading it, folded into the map of
//!    each reading module's A;
//! 3. attention heads (within the GQA structure; linear attention's within their key heads,
//!    [`linear_heads`]) and MLP neurons matched by the similarity of their mapped weights
//!    ([`layer`], [`neurons`], [`matching`]), so B's rows and A's columns on the inner side move
//!    with the units they belong to; inside matched heads, optionally (and always between heads
//!    of different sizes) a least-squares map ([`heads`]);
//! 4. when depths differ, the depth map chosen by the similarity of the layers ([`depth`]).
//!
//! The map is built a target layer at a time ([`LayerByLayer`]); the layer's units then only
//! gather rows and multiply their small factors ([`apply`]), and the layer's map is dropped.

pub mod apply;
pub mod depth;
pub mod gains;
pub mod heads;
pub mod layer;
pub mod linear_heads;
pub mod matching;
pub mod neurons;
mod polar;
pub mod reader_scale;
pub mod refine;
pub mod residual;
pub mod sketch;
pub mod vocab;

use std::collections::BTreeMap;
use std::sync::Arc;

use faer::Mat;

use crate::error::{Error, Result};
use crate::io::checkpoint::Checkpoint;
use crate::plan::ModelSide;
pub use layer::LayerMap;
pub use residual::{AnchorFit, ResidualMap};

/// How the residual stream is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ResidualFit {
    /// The shared tokens' map, refined layer by layer on each layer's matched MLP weights.
    Layers,
    /// Scaled (semi-)orthogonal Procrustes on the shared tokens' embeddings, for every layer
    /// (ablation of the per-layer refinement).
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
    /// Matching, then a least-squares map inside each matched softmax head (linear attention's
    /// move whole).
    Fit,
    /// Target unit i takes source unit i (ablation).
    Index,
}

/// How target layers are paired with source layers when the depths differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DepthFit {
    /// A monotone dynamic program over the layers' weight similarities.
    Similarity,
    /// round(j·(L_s−1)/(L_t−1)) (ablation).
    Linear,
}

/// The default [`MapOptions::gain_floor`]. On SmolLM2 → Gemma3 the plain inverse multiplied the
/// attention updates' norm by a median 3 (up to 21) through the few head-norm and output-norm
/// gains near zero, and cost 6.6 points of ARC accuracy (docs/EXPERIMENTS.md).
pub const GAIN_FLOOR: f32 = 0.1;

/// The map mode's switches.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct MapOptions {
    pub residual: ResidualFit,
    /// Fold the norm gains into the reading modules' maps.
    pub fold_norms: bool,
    /// Where folding divides by a target gain, gains below this fraction of their vector's RMS
    /// count as switching their channel off (see `gains::inverse_gains`); 0 divides by every
    /// nonzero gain.
    pub gain_floor: f32,
    pub inner: InnerMatch,
    pub depth: DepthFit,
    /// Seed of the random sketch the matchings compare weights through.
    pub seed: u64,
}

impl Default for MapOptions {
    fn default() -> Self {
        MapOptions {
            residual: ResidualFit::Layers,
            fold_norms: true,
            gain_floor: GAIN_FLOOR,
            inner: InnerMatch::Match,
            depth: DepthFit::Similarity,
            seed: 0,
        }
    }
}

/// The residual map the options ask for at the bottom of the models: the shared-token fit, or
/// the identity ablation.
pub fn bottom_residual(
    source: &ModelSide<'_>,
    target: &ModelSide<'_>,
    options: &MapOptions,
    progress: &crate::progress::Progress,
) -> Result<ResidualMap> {
    if options.residual == ResidualFit::Identity {
        return Ok(ResidualMap::identity(
            source.ckpt.config.hidden_size,
            target.ckpt.config.hidden_size,
        ));
    }
    with_all_cores(|| fit_residual(source, target, progress))
}

/// Runs `f` with faer on every core, then puts faer back to sequential: no unit runs while a
/// layer's map (or the bottom residual map) is built, so its decompositions may take the whole
/// machine (the small products of the units stay sequential, one unit per thread).
fn with_all_cores<T>(f: impl FnOnce() -> T) -> T {
    struct Sequential;
    impl Drop for Sequential {
        fn drop(&mut self) {
            crate::backend::cpu::rsvd::sequential_faer();
        }
    }
    let _restore = Sequential;
    faer::set_global_parallelism(faer::Par::rayon(0));
    f()
}

/// Builds the model map one target layer at a time, for the units of that layer to run on and
/// then drop: a refined layer's residual map is `d_s × d_t` floats (256 MB at 8192 wide), so
/// holding every layer's until the units ran would take 21 GB on an 80-layer pair. Each layer
/// starts from the map of the one built before it (with [`ResidualFit::Layers`]), so layers are
/// built in ascending order; what the report says of each is kept.
pub struct LayerByLayer<'m, 'a> {
    source: &'m ModelSide<'a>,
    target: &'m ModelSide<'a>,
    sketch: layer::Sketch<'m>,
    start: Arc<ResidualMap>,
    options: MapOptions,
    report: MapReport,
}

impl<'m, 'a> LayerByLayer<'m, 'a> {
    /// Starts from the bottom residual map; `depth` and `times` are those of the steps before
    /// (the depth map by similarity, when it was built), for the report.
    pub fn new(
        (source, target): (&'m ModelSide<'a>, &'m ModelSide<'a>),
        residual: Arc<ResidualMap>,
        options: MapOptions,
        (depth, times): (Option<depth::DepthMap>, BTreeMap<String, f64>),
        backend: &'m dyn crate::backend::Backend,
    ) -> Self {
        let report = MapReport {
            options,
            shared_tokens: residual.shared_tokens,
            residual_fit: residual.relative_residual,
            residual_weak_directions: residual.weak_directions,
            depth,
            time_ms: times,
            layers: Vec::new(),
        };
        LayerByLayer {
            source,
            target,
            sketch: layer::Sketch::new(target.ckpt.config.hidden_size, options.seed, backend),
            start: residual,
            options,
            report,
        }
    }

    /// Target layer `j`'s map, from source layer `i`; the next layer starts from it.
    pub fn build(&mut self, j: usize, i: usize) -> Result<LayerMap> {
        let (source, target, sketch) = (self.source, self.target, &self.sketch);
        let (start, options) = (&self.start, self.options);
        let layer =
            with_all_cores(|| LayerMap::build(source, target, i, j, start, sketch, options))?;
        if self.options.residual == ResidualFit::Layers {
            self.start = layer.residual.clone();
        }
        for (step, ms) in &layer.times {
            *self.report.time_ms.entry(step.to_string()).or_insert(0.0) += ms;
        }
        self.report.layers.push(layer.report());
        Ok(layer)
    }

    /// What the report says of the map: the bottom fit and every layer built.
    pub fn finish(self) -> MapReport {
        self.report
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
    /// Directions of the residual map's polar factor too weak for its Gram matrix (singular
    /// values under 1e-3 of the largest), completed from the anchors' cross-covariance, and
    /// left out (nothing in the anchors holds them: the map sends them to zero).
    pub residual_weak_directions: [usize; 2],
    /// The depth map by similarity, with the scores it was chosen on (None: depths equal,
    /// `--map-depth linear` or a `--layer-map` file).
    pub depth: Option<depth::DepthMap>,
    /// Milliseconds per step: the bottom residual fit, the depth program, and summed over the
    /// layers loading their weights, matching neurons, refitting and matching heads.
    pub time_ms: BTreeMap<String, f64>,
    pub layers: Vec<LayerReport>,
}

/// One target layer's matchings: for each target unit, its source unit (null: unmatched).
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerReport {
    pub target_layer: usize,
    pub source_layer: usize,
    pub head_similarity: Option<f64>,
    pub neuron_similarity: Option<f64>,
    /// Mean cosine of the layer's matched MLP weight vectors under the map it started from
    /// and under its own refined map (`--map-residual layers`).
    pub weight_fit_start: Option<f64>,
    pub weight_fit: Option<f64>,
    /// The scale of the layer's writes, μ (target residual over source residual).
    pub residual_scale: f64,
    /// Heads mapped inside by the least-squares fit (else moved as wholes).
    pub head_fit: bool,
    /// κ of the output-norm writer maps (attention, MLP), for families with output norms.
    pub writer_kappa: Option<(f64, f64)>,
    /// κ of the reading parts `[q, k, v, gate, up]` where a side reads the residual without a
    /// pre-norm (OLMo 2/3; `reader_scale`), None elsewhere.
    pub reader_kappa: Option<[Option<f64>; 5]>,
    /// The ratio of the two models' attention-score factors q's rows carry (`c_s/c_t`), where it
    /// is not 1 (Granite's `attention_multiplier`; `reader_scale`).
    pub score_ratio: Option<f64>,
    /// The ratio of the two models' residual multipliers o's and down's columns carry
    /// (`ρ_s/ρ_t`, Granite), where it is not 1 and neither side has output norms.
    pub residual_ratio: Option<f64>,
    pub q_heads: Vec<Option<usize>>,
    pub kv_heads: Vec<Option<usize>>,
    /// Linear attention's heads, where both layers have it (Qwen3.5): target → source key
    /// head and value head, and the value heads' mean similarity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub linear_heads: Option<LinearHeadsReport>,
    pub neurons: Vec<Option<usize>>,
}

/// What the report says of a layer's linear attention heads.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LinearHeadsReport {
    pub similarity: Option<f64>,
    pub key_heads: Vec<Option<usize>>,
    pub value_heads: Vec<Option<usize>>,
}

impl LayerMap {
    /// What the report says of this layer.
    fn report(&self) -> LayerReport {
        LayerReport {
            target_layer: self.target_layer,
            source_layer: self.source_layer,
            head_similarity: self.q_heads.mean_similarity(),
            neuron_similarity: self.neurons.mean_similarity(),
            weight_fit_start: self.weight_fit.map(|f| f.0),
            weight_fit: self.weight_fit.map(|f| f.1),
            residual_scale: self.residual.scale,
            head_fit: self.head_fit.is_some(),
            writer_kappa: self
                .writers
                .0
                .gains
                .as_ref()
                .map(|_| (self.writers.0.kappa, self.writers.1.kappa)),
            reader_kappa: self.reader_scale.report(),
            score_ratio: self.reader_scale.score_ratio(),
            residual_ratio: Some(self.writers.0.kappa)
                .filter(|k| self.writers.0.gains.is_none() && *k != 1.0),
            q_heads: self.q_heads.source_of.clone(),
            kv_heads: self.kv_heads.source_of.clone(),
            linear_heads: self.linear.as_ref().map(|l| LinearHeadsReport {
                similarity: l.value_heads.mean_similarity(),
                key_heads: l.key_heads.source_of.clone(),
                value_heads: l.value_heads.source_of.clone(),
            }),
            neurons: self.neurons.source_of.clone(),
        }
    }
}

/// Shared tokens anchoring the residual map, per dimension of the wider stream (at least
/// [`MIN_ANCHORS`]): a few times the width fixes the map as well as a hundred thousand do.
pub const ANCHORS_PER_WIDTH: usize = 3;
pub const MIN_ANCHORS: usize = 4096;

/// The anchors of the residual map: (source id, target id) of tokens both vocabularies spell
/// alike and both embeddings hold, evenly spaced over the source ids. `auto` asks whether there
/// are enough before it picks map.
pub struct Anchors {
    pub pairs: Vec<(usize, usize)>,
    /// Why they cannot fix a map (fewer than the smaller width), naming both vocabularies.
    pub shortfall: Option<Error>,
}

impl Anchors {
    /// The pairs, or the shortfall as the error.
    pub fn require(self) -> Result<Vec<(usize, usize)>> {
        match self.shortfall {
            Some(e) => Err(e),
            None => Ok(self.pairs),
        }
    }
}

/// The [`Anchors`] of a pair of models (an error only for unreadable vocabularies or
/// embeddings).
pub fn anchors(source: &ModelSide<'_>, target: &ModelSide<'_>) -> Result<Anchors> {
    let vs = source.ckpt.vocab()?;
    let vt = target.ckpt.vocab()?;
    let rows = |side: &ModelSide<'_>| -> Result<usize> {
        let name = side.arch.embed_name(&side.prefix);
        rows_of_width(side.ckpt, &name, side.ckpt.config.hidden_size)
    };
    let all_pairs = vocab::shared_tokens(vs, vt, (rows(source)?, rows(target)?));
    let (d_s, d_t) = (
        source.ckpt.config.hidden_size,
        target.ckpt.config.hidden_size,
    );
    let anchors = (ANCHORS_PER_WIDTH * d_s.max(d_t)).max(MIN_ANCHORS);
    let step = all_pairs.len().div_ceil(anchors).max(1);
    let pairs: Vec<(usize, usize)> = all_pairs.iter().step_by(step).copied().collect();
    let needed = d_s.min(d_t);
    let shortfall = (pairs.len() < needed).then(|| {
        Error::config(
            &vt.path,
            format!(
                "{} tokens are spelled alike in {} and this vocabulary, fewer than the {needed} \
                 the residual map between widths {d_s} and {d_t} needs (--mode align needs none)",
                pairs.len(),
                vs.path.display(),
            ),
        )
    });
    Ok(Anchors { pairs, shortfall })
}

/// The residual map from the shared tokens' embedding rows (scaled as each family scales them).
///
/// Progress: stage `residual`, one step per anchor set folded in and one for the polar factor
/// (at Llama-3.1-70B widths two minutes on two cores, most of it the polar factor); a cancelled
/// job stops between steps.
fn fit_residual(
    source: &ModelSide<'_>,
    target: &ModelSide<'_>,
    progress: &crate::progress::Progress,
) -> Result<ResidualMap> {
    let (es_name, et_name) = (
        source.arch.embed_name(&source.prefix),
        target.arch.embed_name(&target.prefix),
    );
    let rows = |side: &ModelSide<'_>, name: &str| -> Result<usize> {
        rows_of_width(side.ckpt, name, side.ckpt.config.hidden_size)
    };
    let pairs = anchors(source, target)?.require()?;
    let gather = |side: &ModelSide<'_>,
                  name: &str,
                  pairs: &[(usize, usize)],
                  pick: &dyn Fn(&(usize, usize)) -> usize,
                  gain: Option<&[f32]>| {
        let d = side.ckpt.config.hidden_size;
        // Embedding rows are scaled as the model scales them (√d in Gemma, Granite's
        // embedding_multiplier); output rows by the final gains.
        let scale = match gain {
            Some(_) => 1.0,
            None if side.arch.residual.embed_scale_sqrt_hidden => {
                (d as f32).sqrt() * side.ckpt.config.scales.embedding as f32
            }
            None => side.ckpt.config.scales.embedding as f32,
        };
        let mut out = Mat::<f32>::zeros(pairs.len(), d);
        for (r, p) in pairs.iter().enumerate() {
            let id = pick(p);
            let row = side.ckpt.read_rows_f32(name, id..id + 1)?;
            for (c, x) in row.iter().enumerate() {
                out[(r, c)] = x * scale * gain.map_or(1.0, |g| g[c]);
            }
        }
        Ok::<_, Error>(out)
    };
    // Untied output embeddings are a second anchor set: their rows read the final norm's output,
    // so its gains are folded in like a block's.
    let lm = |side: &ModelSide<'_>| -> Option<(String, String)> {
        let nested = side.arch.top_level_name(&side.prefix, "lm_head.weight");
        // Beside the language model's `model` (mlx-lm's `language_model.lm_head`), or on top.
        let beside =
            (side.prefix.rsplitn(3, '.').nth(2)).map(|outer| format!("{outer}.lm_head.weight"));
        let name = [Some(nested), beside, Some("lm_head.weight".to_string())]
            .into_iter()
            .flatten()
            .find(|n| side.ckpt.has(n))?;
        let norm = side
            .arch
            .top_level_name(&side.prefix, &side.arch.residual.final_norm);
        Some((name, norm))
    };
    let second = lm(source).zip(lm(target));
    let bar = progress.start("residual", "steps", 2 + second.is_some() as u64);
    // One anchor set at a time: each is folded into the fit and dropped before the next is read.
    bar.check()?;
    let mut fit = AnchorFit::new(
        gather(source, &es_name, &pairs, &|p| p.0, None)?,
        gather(target, &et_name, &pairs, &|p| p.1, None)?,
    )?;
    bar.step();
    if let Some(((ls, ns), (lt, nt))) = second {
        bar.check()?;
        // An output head may have fewer rows than the embedding (padding rows differ): only
        // the pairs both heads hold.
        let (rows_s, rows_t) = (rows(source, &ls)?, rows(target, &lt)?);
        let held: Vec<(usize, usize)> = pairs
            .iter()
            .filter(|p| p.0 < rows_s && p.1 < rows_t)
            .copied()
            .collect();
        let gain = |side: &ModelSide<'_>, norm: &str| -> Result<Option<Vec<f32>>> {
            if !side.ckpt.has(norm) {
                return Ok(None);
            }
            let d = side.ckpt.config.hidden_size;
            let offset = side.gain_offset();
            Ok(Some(read_gain(side.ckpt, norm, d, offset)?))
        };
        let (gs, gt) = (gain(source, &ns)?, gain(target, &nt)?);
        fit.add(
            gather(source, &ls, &held, &|p| p.0, gs.as_deref())?,
            gather(target, &lt, &held, &|p| p.1, gt.as_deref())?,
        );
        bar.step();
    }
    bar.check()?;
    let map = fit.finish().map_err(|e| match e {
        Error::Numerical { reason, .. } => Error::Numerical {
            context: format!(
                "map: residual map between {es_name} of {} and {et_name} of {}",
                source.ckpt.dir.display(),
                target.ckpt.dir.display()
            ),
            reason,
        },
        other => other,
    })?;
    bar.step();
    bar.finish();
    Ok(map)
}

/// The rows of a `rows × width` matrix (an embedding, an output head), refusing another shape
/// with an error naming the tensor and its file.
pub(crate) fn rows_of_width(ckpt: &Checkpoint, name: &str, width: usize) -> Result<usize> {
    match ckpt.shape(name)? {
        [rows, cols] if *cols == width && *rows > 0 => Ok(*rows),
        shape => Err(Error::bad_tensor(
            ckpt.file_of(name).unwrap_or(&ckpt.dir),
            name,
            format!("shape {shape:?}: expected [rows, {width}] (the config's hidden_size)"),
        )),
    }
}

/// A norm's effective gains (`offset` added: 1 for the families that store `g − 1`), refusing a
/// norm whose width is not `width`.
pub(crate) fn read_gain(
    ckpt: &Checkpoint,
    name: &str,
    width: usize,
    offset: f32,
) -> Result<Vec<f32>> {
    let g = read_matrix(ckpt, name)?;
    if g.nrows() != 1 || g.ncols() != width {
        return Err(Error::bad_tensor(
            ckpt.file_of(name).unwrap_or(&ckpt.dir),
            name,
            format!("shape {:?}: expected [{width}]", ckpt.shape(name)?),
        ));
    }
    Ok((0..width).map(|j| g[(0, j)] + offset).collect())
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
    Ok(crate::linalg::from_row_major(&data, rows, cols))
}
