//! One layer of the map: the norm gains on both sides, the layer's own residual map (refined from
//! its weights, [`super::refine`]), and which target head and neuron takes which source one.
//! Units are compared in the target's coordinates, through a random sketch R of the target
//! residual ([`super::sketch`]: a sparse sign sketch, 128 buckets for heads, 64 for neurons): a reading
//! weight row w (source, normalized-input coordinates) becomes `w diag(g_s) P R`, a writing
//! column c becomes `Rᵀ W c` (W: the block's writer map), and the target's own rows
//! `w diag(g_t) R` and columns `Rᵀ c`. A sketch of K columns keeps inner products to about
//! 1/√K, which is plenty to tell a matching unit (similarity near 1 on a model in other
//! coordinates) from the others, at a fraction of the cost.
//!
//! Neurons: see [`super::neurons`]. Heads: see [`super::heads`], and linear attention's
//! [`super::linear_heads`]. Reading updates where a side reads the residual without a norm:
//! [`super::reader_scale`].

use std::sync::Arc;

use faer::Mat;

use super::gains::{inverse_gains, mapped_gains};
use super::heads::{self, HeadFit};
use super::linear_heads::{match_linear, LinearHeads, LinearWeights};
use super::matching::Assignment;
use super::neurons::{match_neurons, NeuronFeatures};
use super::reader_scale::{matched_ratio, reads_raw, ReaderScale};
use super::refine;
use super::sketch::SignSketch;
pub use super::sketch::{Sketch, NEURON_SKETCH, SKETCH};
use super::{read_gain, InnerMatch, MapOptions, ResidualFit, ResidualMap};
use crate::arch::{Block, ModuleSpec, Part};
use crate::backend::Backend;
use crate::error::Result;
use crate::linalg::stored::Stored;
use crate::plan::ModelSide;

/// At most this many re-fits of a layer's residual map, each followed by a new matching (the
/// loop stops as soon as a matching no longer changes, or a refit does not hold out).
const MAX_REFITS: usize = 2;

/// How a block's output (o's or down's columns, B of those modules) moves into the target
/// residual. Without output norms it is the residual map M. With them (Gemma 2/3) the output
/// is normalized and scaled by a gain before it joins the residual, so what must correspond is
/// `g ⊙ y` in the two streams: `W = κ diag(g_t)⁻¹ Q diag(g_s)`, with κ the ratio of the two
/// weights' sizes through it (the norm removes any scale of its input; κ keeps the update's
/// size relative to the weight it perturbs). When only one side has output norms the other's
/// gains are ones and κ still comes from the sizes. A writer belongs to the residual map it
/// was built with (its gains' inverse is guarded through it); `writer_maps` rebuilds both
/// writers whenever the refit replaces that map.
#[derive(Debug, Clone)]
pub struct WriterMap {
    /// Output-norm gains, when the family has output norms: the source's, and the guarded
    /// inverse of the target's through this writer's residual map (`gains::inverse_gains`).
    pub gains: Option<(Vec<f32>, Vec<f32>)>,
    pub kappa: f64,
}

impl WriterMap {
    /// The residual map itself (no output norms on either side), times the ratio of the two
    /// models' residual multipliers (Granite scales every block's output before it joins the
    /// residual; `ρ_s W_s ↦ ρ_t W_t` gives `B_t = (ρ_s/ρ_t) M B_s`).
    fn plain(s: &Side<'_, '_>, t: &Side<'_, '_>) -> WriterMap {
        let rho = |side: &Side<'_, '_>| side.model.ckpt.config.scales.residual;
        WriterMap {
            gains: None,
            kappa: rho(s) / rho(t),
        }
    }

    /// `W x` for the columns of `x` (`d_s × r` → `d_t × r`).
    pub fn write(&self, residual: &ResidualMap, x: faer::MatRef<'_, f32>) -> Mat<f32> {
        let Some((g_s, inv)) = &self.gains else {
            return residual.write(x) * faer::Scale(self.kappa as f32);
        };
        let scaled = Mat::from_fn(x.nrows(), x.ncols(), |i, j| x[(i, j)] * g_s[i]);
        let y = residual.qt.transpose() * scaled;
        let k = self.kappa as f32;
        Mat::from_fn(y.nrows(), y.ncols(), |i, j| k * y[(i, j)] * inv[i])
    }

    /// `Wᵀ R` (`d_s × K`): sketched target coordinates of a written source column c are
    /// `cᵀ (Wᵀ R)`.
    fn sketch_t(&self, residual: &ResidualMap, r: &SignSketch) -> Mat<f32> {
        let Some((g_s, inv)) = &self.gains else {
            return r.right_of(&residual.qt, None)
                * faer::Scale((residual.scale * self.kappa) as f32);
        };
        let y = r.right_of(&residual.qt, Some(inv));
        let k = self.kappa as f32;
        Mat::from_fn(y.nrows(), y.ncols(), |i, j| k * g_s[i] * y[(i, j)])
    }
}

/// The source's view of the sketches through one layer's maps.
pub(crate) struct SourceView {
    /// `d_s × K`: P·R, for source reading rows (heads).
    pub read: Mat<f32>,
    /// `d_s × K`: Wᵀ·R for the columns o writes.
    pub write_attn: Mat<f32>,
    /// The same through the neurons' sketch R_n: P·R_n for gate and up, Wᵀ·R_n for down.
    pub read_mlp: Mat<f32>,
    pub write_mlp: Mat<f32>,
}

impl SourceView {
    pub(crate) fn new(
        sketch: &Sketch,
        residual: &ResidualMap,
        writers: &(WriterMap, WriterMap),
    ) -> Self {
        let width = faer::Scale(residual.width as f32);
        SourceView {
            read: sketch.heads.right_of(&residual.qt, None) * width,
            write_attn: writers.0.sketch_t(residual, &sketch.heads),
            read_mlp: sketch.neurons.right_of(&residual.qt, None) * width,
            write_mlp: writers.1.sketch_t(residual, &sketch.neurons),
        }
    }
}

/// A layer's projection weights, as stored (only a fused tensor's part rows): borrowed from the
/// memory-mapped checkpoint, never copied to f32 whole (a GGUF's quantized tensors come
/// dequantized). A layer with linear attention instead (Qwen3.5) has no softmax attention.
pub(crate) struct Weights<'a> {
    pub attention: Option<Attention<'a>>,
    /// Linear attention's, in its split form (Qwen3.5's; Qwen3-Next's fused projections are not
    /// mapped: `experts::unmapped_update`).
    pub linear: Option<LinearWeights<'a>>,
    pub gate: Stored<'a>,
    pub up: Stored<'a>,
    pub down: Stored<'a>,
}

/// A layer's softmax attention weights; `q` whole, with the gate rows of a gated query
/// (`ModelConfig::gated_query`: each head's query rows, then as many rows gating its output).
pub(crate) struct Attention<'a> {
    pub q: Stored<'a>,
    pub k: Stored<'a>,
    pub v: Stored<'a>,
    pub o: Stored<'a>,
}

/// The gains a layer applies (effective: offset added), source then target; ones where a side
/// has no such norm or folding is off. Folds divide by the target's through [`Gains::inverse`].
#[derive(Debug, Clone)]
pub struct Gains {
    /// Before attention and before the MLP (`d` each).
    pub attn: (Vec<f32>, Vec<f32>),
    pub mlp: (Vec<f32>, Vec<f32>),
    /// Query and key norms, a gain per row of q and of k (`heads·head_dim`, `kv_heads·head_dim`):
    /// a per-head norm's gains repeated for every head, so that unit `u`'s rows are always
    /// `u·head_dim..` (`Gains::unit`).
    pub q: (Vec<f32>, Vec<f32>),
    pub k: (Vec<f32>, Vec<f32>),
    /// The target gains' floor (`MapOptions::gain_floor`).
    pub floor: f32,
}

/// One target layer's map.
#[derive(Debug, Clone)]
pub struct LayerMap {
    pub target_layer: usize,
    pub source_layer: usize,
    /// This layer's residual map (shared with the other layers when it is not refined).
    pub residual: Arc<ResidualMap>,
    pub gains: Gains,
    /// How o's and down's outputs move into the target residual.
    pub writers: (WriterMap, WriterMap),
    /// Target query head → source query head.
    pub q_heads: Assignment,
    /// Target KV head → source KV head.
    pub kv_heads: Assignment,
    /// Target MLP neuron → source neuron.
    pub neurons: Assignment,
    /// head_dim of (source, target).
    pub head_dim: (usize, usize),
    /// Least-squares maps inside matched heads (with `--map-inner fit`, or where head_dim
    /// differs); None: heads move as wholes.
    pub head_fit: Option<HeadFit>,
    /// Linear attention's heads, where both layers have it.
    pub linear: Option<LinearHeads>,
    /// How much a reading part's update is rescaled where a side reads the residual without a
    /// norm before the block (`reader_scale`).
    pub reader_scale: ReaderScale,
    /// Mean cosine of held-out matched MLP weight vectors under the starting map and under
    /// this layer's refined one (None when not refined).
    pub weight_fit: Option<(f64, f64)>,
    /// Milliseconds spent per step (load, neurons, refit, heads), for the report.
    pub times: Vec<(&'static str, f64)>,
}

/// Runs `f` and adds its milliseconds to `times[step]`.
fn timed<T>(times: &mut Vec<(&'static str, f64)>, step: &'static str, f: impl FnOnce() -> T) -> T {
    let start = std::time::Instant::now();
    let out = f();
    let ms = start.elapsed().as_secs_f64() * 1e3;
    match times.iter_mut().find(|(s, _)| *s == step) {
        Some(entry) => entry.1 += ms,
        None => times.push((step, ms)),
    }
    out
}

/// A side's view of one layer.
pub(crate) struct Side<'p, 'a> {
    pub model: &'p ModelSide<'a>,
    pub layer: usize,
}

impl<'a> Side<'_, 'a> {
    /// Part `part`'s weight; with `as_read`, a GGUF's quantized weight is decoded as it is read
    /// (a backend whose products read bands), else decoded whole once.
    fn weight(&self, part: Part, as_read: bool) -> Result<Stored<'a>> {
        let spec: &ModuleSpec = self.model.arch.module_with(part);
        let (name, _) = self.model.weight(self.layer, None, spec)?;
        // Only the part's rows of a fused tensor are read.
        let rows = spec
            .rows_of(part, &self.model.ckpt.config)
            .expect("the module holds the part");
        let count = rows.len();
        if as_read {
            if let Some(decoder) = self.model.ckpt.row_decoder(&name, rows.clone())? {
                return Ok(Stored::decoded(decoder));
            }
        }
        let (bytes, ty, cols) = self.model.ckpt.rows_raw(&name, rows)?;
        Ok(Stored::new(bytes, ty, count, cols))
    }

    fn weights(&self, as_read: bool) -> Result<Weights<'a>> {
        let weight = |part| self.weight(part, as_read);
        let attention = match self.model.holds_block(self.layer, Block::Attention) {
            true => Some(Attention {
                q: weight(Part::Q)?,
                k: weight(Part::K)?,
                v: weight(Part::V)?,
                o: weight(Part::O)?,
            }),
            false => None,
        };
        let split = self.model.arch.splits_linear_attention();
        let linear = match self.model.holds_block(self.layer, Block::LinearAttention) {
            true if split => Some(LinearWeights {
                qkv: weight(Part::LinQkv)?,
                z: weight(Part::LinZ)?,
                b: weight(Part::LinB)?,
                a: weight(Part::LinA)?,
                out: weight(Part::LinOut)?,
            }),
            _ => None,
        };
        Ok(Weights {
            attention,
            linear,
            gate: weight(Part::Gate)?,
            up: weight(Part::Up)?,
            down: weight(Part::Down)?,
        })
    }

    /// The effective gain of the norm `norm` (below the layer), or ones of width `n`.
    pub(crate) fn gain(&self, norm: Option<&str>, n: usize, fold: bool) -> Result<Vec<f32>> {
        let Some(norm) = norm.filter(|_| fold) else {
            return Ok(vec![1.0; n]);
        };
        let name = format!("{}.{}.{norm}", self.model.prefix, self.layer);
        let offset = self.model.gain_offset();
        read_gain(self.model.ckpt, &name, n, offset)
    }
}

/// `w diag(g) X`: rows of a reading weight in sketched target coordinates (the gains scale the
/// small X, not the weight).
pub(crate) fn reading(
    w: &Stored<'_>,
    g: &[f32],
    x: faer::MatRef<'_, f32>,
    backend: &dyn Backend,
) -> Result<Mat<f32>> {
    let scaled = Mat::from_fn(x.nrows(), x.ncols(), |i, j| x[(i, j)] * g[i]);
    backend.stored_product(w, scaled.as_ref(), false)
}

impl Gains {
    /// The guarded inverse of a target gain vector of this layer, `mapped` the source's gains
    /// in the target's coordinates (`inverse_gains`).
    pub fn inverse(&self, g_t: &[f32], mapped: &[f32]) -> Vec<f32> {
        inverse_gains(g_t, mapped, self.floor)
    }

    fn read(s: &Side<'_, '_>, t: &Side<'_, '_>, fold: bool, floor: f32) -> Result<Self> {
        let residual = |side: &Side<'_, '_>, norm: Option<&str>| {
            side.gain(norm, side.model.ckpt.config.hidden_size, fold)
        };
        let pair = |pick: &dyn Fn(&crate::arch::Residual) -> Option<String>| {
            let one =
                |side: &Side<'_, '_>| residual(side, pick(&side.model.arch.residual).as_deref());
            Ok::<_, crate::error::Error>((one(s)?, one(t)?))
        };
        let heads = |pick: &dyn Fn(&crate::arch::HeadNorms) -> &str, key: bool| {
            let one = |side: &Side<'_, '_>| {
                let c = &side.model.ckpt.config;
                let n = if key {
                    c.num_key_value_heads
                } else {
                    c.num_attention_heads
                };
                // A layer with linear attention instead has no query or key norms (none of
                // its q or k rows are read).
                let softmax = side.model.holds_block(side.layer, Block::Attention);
                let norms = side.model.arch.residual.head_norms.as_ref();
                let norms = norms.filter(|_| softmax);
                match norms {
                    Some(h) if h.across_heads => side.gain(Some(pick(h)), n * c.head_dim, fold),
                    _ => Ok(side.gain(norms.map(pick), c.head_dim, fold)?.repeat(n)),
                }
            };
            Ok::<_, crate::error::Error>((one(s)?, one(t)?))
        };
        Ok(Gains {
            attn: pair(&|r| r.attn_norm.clone())?,
            mlp: pair(&|r| r.mlp_norm.clone())?,
            q: heads(&|h| &h.q, false)?,
            k: heads(&|h| &h.k, true)?,
            floor,
        })
    }

    /// Unit `u`'s gains of `size` rows in one of the per-row vectors (`q` or `k`).
    pub fn unit(gains: &[f32], u: usize, size: usize) -> &[f32] {
        &gains[u * size..(u + 1) * size]
    }
}

/// The ratio `c_s/c_t` of the attention scores' factors that q's rows carry, unless a head fit
/// (`fitted`) or a query/key norm stands between (`reader_scale`).
fn score_ratio(source: &ModelSide<'_>, target: &ModelSide<'_>, fitted: bool) -> Option<f64> {
    let head_norms = [source, target]
        .iter()
        .any(|side| side.arch.residual.head_norms.is_some());
    let c = |side: &ModelSide<'_>| side.ckpt.config.scales.attention;
    (!fitted && !head_norms).then(|| c(source) / c(target))
}

/// The writer maps of a layer's two blocks under `residual`.
fn writer_maps(
    s: &Side<'_, '_>,
    t: &Side<'_, '_>,
    (ws, wt): (&Weights<'_>, &Weights<'_>),
    residual: &ResidualMap,
    sketch: &Sketch,
    (fold, floor): (bool, f32),
) -> Result<(WriterMap, WriterMap)> {
    let one =
        |pick: &dyn Fn(&crate::arch::OutputNorms) -> String, w_s: &Stored<'_>, w_t: &Stored<'_>| {
            let norms = |side: &Side<'_, '_>| side.model.arch.residual.output_norms.clone();
            let (ns, nt) = (norms(s), norms(t));
            if ns.is_none() && nt.is_none() {
                return Ok::<_, crate::error::Error>(WriterMap::plain(s, t));
            }
            // A side without output norms writes its output as it is: gains of one, and the
            // norm on the other side still makes the scale a matter of the weights' sizes.
            let (d_s, d_t) = (residual.qt.nrows(), residual.qt.ncols());
            let g_s = s.gain(ns.as_ref().map(pick).as_deref(), d_s, fold)?;
            let g_t = t.gain(nt.as_ref().map(pick).as_deref(), d_t, fold)?;
            let inv = inverse_gains(&g_t, &mapped_gains(residual.qt.as_ref(), &g_s), floor);
            let unit = WriterMap {
                gains: Some((g_s, inv)),
                kappa: 1.0,
            };
            // κ from the sketched sizes: ‖Rᵀ W_t‖ / ‖Rᵀ W W_s‖.
            let mapped = sketch.backend.stored_product(
                w_s,
                unit.sketch_t(residual, &sketch.heads).as_ref(),
                true,
            )?;
            let own = sketch.heads.columns(w_t);
            let (a, b) = (own.norm_l2() as f64, mapped.norm_l2() as f64);
            Ok(WriterMap {
                kappa: if b > 0.0 { a / b } else { 1.0 },
                ..unit
            })
        };
    // The attention's writer is o's, or linear attention's out_proj's where both layers have
    // it; where the two layers' attentions differ in kind, no update passes through it.
    let attention = match (&ws.attention, &wt.attention, &ws.linear, &wt.linear) {
        (Some(a_s), Some(a_t), _, _) => one(&|n| n.attn.clone(), &a_s.o, &a_t.o)?,
        (_, _, Some(l_s), Some(l_t)) => one(&|n| n.attn.clone(), &l_s.out, &l_t.out)?,
        _ => WriterMap::plain(s, t),
    };
    Ok((attention, one(&|n| n.mlp.clone(), &ws.down, &wt.down)?))
}

impl LayerMap {
    /// Builds target layer `target_layer`'s map from source layer `source_layer`, starting from
    /// the residual map `start` (the layer below's, or the shared-token one).
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        source: &ModelSide<'_>,
        target: &ModelSide<'_>,
        source_layer: usize,
        target_layer: usize,
        start: &Arc<ResidualMap>,
        sketch: &Sketch,
        options: MapOptions,
    ) -> Result<Self> {
        let s = Side {
            model: source,
            layer: source_layer,
        };
        let t = Side {
            model: target,
            layer: target_layer,
        };
        let mut times = Vec::new();
        let gains = Gains::read(&s, &t, options.fold_norms, options.gain_floor)?;
        let fold = (options.fold_norms, options.gain_floor);
        let (cs, ct) = (&source.ckpt.config, &target.ckpt.config);
        let head_dim = (cs.head_dim, ct.head_dim);
        let mut residual = start.clone();
        let output_norms = [source, target]
            .iter()
            .any(|side| side.arch.residual.output_norms.is_some());
        // The index ablation reads weights only for the output norms' κ.
        let weights = if options.inner == InnerMatch::Index && !output_norms {
            None
        } else {
            Some(timed(&mut times, "load", || -> Result<_> {
                // The weights are borrowed as stored; their NaN/Inf scans (a pass over the bytes) run
                // on two threads, one per side.
                let as_read = sketch.backend.decodes_bands();
                let (ws, wt) = rayon::join(|| s.weights(as_read), || t.weights(as_read));
                Ok((ws?, wt?))
            })?)
        };
        let mut writers = match &weights {
            Some((ws, wt)) => writer_maps(&s, &t, (ws, wt), &residual, sketch, fold)?,
            None => (WriterMap::plain(&s, &t), WriterMap::plain(&s, &t)),
        };
        let Some((ws, wt)) = weights.filter(|_| options.inner != InnerMatch::Index) else {
            let both = [&s, &t].map(|side| side.model.holds_block(side.layer, Block::Attention));
            let softmax = |n_t, n_s| match both {
                [true, true] => Assignment::by_index(n_t, n_s),
                _ => Assignment::none(),
            };
            return Ok(LayerMap {
                target_layer,
                source_layer,
                residual,
                gains,
                writers,
                q_heads: softmax(ct.num_attention_heads, cs.num_attention_heads),
                kv_heads: softmax(ct.num_key_value_heads, cs.num_key_value_heads),
                neurons: Assignment::by_index(ct.intermediate_size, cs.intermediate_size),
                head_dim,
                head_fit: None,
                linear: LinearHeads::by_index((&s, &t)),
                reader_scale: ReaderScale::NONE.with_score(score_ratio(source, target, false)),
                weight_fit: None,
                times,
            });
        };
        let mut view = SourceView::new(sketch, &residual, &writers);
        let (target_neurons, neurons) = timed(&mut times, "neurons", || {
            let target = NeuronFeatures::target(&wt, &gains.mlp.1, &sketch.neurons);
            let neurons = match_neurons(&ws, &target, &gains.mlp.0, &view, sketch.backend)?;
            Ok::<_, crate::error::Error>((target, neurons))
        })?;
        let (mut neurons, mut neuron_sizes) = neurons;
        let mut weight_fit = None;
        if options.residual == ResidualFit::Layers {
            for _ in 0..MAX_REFITS {
                let refit = timed(&mut times, "refit", || {
                    refine::refit(
                        (&ws, &wt),
                        &gains.mlp,
                        &neurons,
                        (&residual, start),
                        ct.scales.residual / cs.scales.residual,
                        sketch.backend,
                    )
                })?;
                weight_fit = Some((
                    weight_fit.map_or(refit.start_agreement, |(s, _)| s),
                    refit.agreement,
                ));
                // A refit that does not carry to held-out neurons fits noise: keep the map.
                let Some(map) = refit.map else { break };
                residual = Arc::new(map);
                writers = writer_maps(&s, &t, (&ws, &wt), &residual, sketch, fold)?;
                view = SourceView::new(sketch, &residual, &writers);
                let again = timed(&mut times, "neurons", || {
                    match_neurons(&ws, &target_neurons, &gains.mlp.0, &view, sketch.backend)
                })?;
                let (again, sizes) = again;
                let settled = again.source_of == neurons.source_of;
                (neurons, neuron_sizes) = (again, sizes);
                if settled {
                    break;
                }
            }
        }
        // Heads are matched where both layers have softmax attention; against a layer with
        // linear attention (a hybrid model's), the layer's map carries the MLP alone.
        let (q_heads, kv_heads, head_fit, head_sizes) = match (&ws.attention, &wt.attention) {
            (Some(a_s), Some(a_t)) => timed(&mut times, "heads", || -> Result<_> {
                let views = heads::HeadViews::new((a_s, a_t), &gains, &view, sketch, (cs, ct))?;
                let (q_heads, kv_heads) = heads::match_heads(&views)?;
                let head_fit = (options.inner == InnerMatch::Fit || head_dim.0 != head_dim.1)
                    .then(|| HeadFit::fit(&views, &q_heads, &kv_heads));
                Ok((q_heads, kv_heads, head_fit, Some(views.sizes)))
            })?,
            _ => (Assignment::none(), Assignment::none(), None, None),
        };
        let linear = match (&ws.linear, &wt.linear, &cs.linear, &ct.linear) {
            (Some(l_s), Some(l_t), Some(c_s), Some(c_t)) => {
                Some(timed(&mut times, "heads", || {
                    let g = (&gains.attn.0[..], &gains.attn.1[..]);
                    match_linear((l_s, l_t), g, &view, sketch, (c_s, c_t))
                })?)
            }
            _ => None,
        };
        let raw = [source, target].map(|side| reads_raw(&side.arch.residual));
        let heads = head_sizes.map(|[q, k, v]| {
            [(q, &q_heads), (k, &kv_heads), (v, &kv_heads)]
                .map(|((s, t), a)| matched_ratio(&s, &t, a))
        });
        let mlp =
            [0, 1].map(|p| matched_ratio(&neuron_sizes[p], &target_neurons.sizes[p], &neurons));
        let reader_scale = ReaderScale::new(
            (raw[0].0 || raw[1].0, raw[0].1 || raw[1].1),
            heads.filter(|_| head_fit.is_none()),
            Some(mlp),
        )
        .with_score(score_ratio(source, target, head_fit.is_some()));
        Ok(LayerMap {
            target_layer,
            source_layer,
            residual,
            gains,
            writers,
            q_heads,
            kv_heads,
            neurons,
            head_dim,
            head_fit,
            linear,
            reader_scale,
            weight_fit,
            times,
        })
    }
}
