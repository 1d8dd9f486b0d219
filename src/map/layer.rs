//! One layer of the map: the norm gains on both sides, and which target head and neuron takes
//! which source one. Units are compared in the target's coordinates, through one random sketch
//! of the target residual (K columns): a reading weight row w (source, normalized-input
//! coordinates) becomes `w diag(g_s) P R`, a writing column c becomes `Rᵀ M c`, and the target's
//! own rows `w diag(g_t) R` and columns `Rᵀ c`. The sketch keeps inner products to about 1/√K,
//! which is plenty to tell a matching unit (similarity near 1 on a model in other coordinates)
//! from the others, at a fraction of the cost.
//!
//! Neurons: the mean of the cosines of their gate rows, up rows and down columns. Heads: the
//! cosines of their QK circuits (W_qᵀW_k) and OV circuits (W_oW_v), from hd × hd Gram products
//! (`⟨A₁ᵀB₁, A₂ᵀB₂⟩ = Σ (A₁A₂ᵀ) ∘ (B₁B₂ᵀ)`), which do not depend on the coordinates inside a
//! head; KV groups first (by the best within-group matching), then query heads inside them.

use faer::Mat;

use super::matching::{assign, assign_features, unit_rows, Assignment};
use super::{read_matrix, InnerMatch, MapOptions, ResidualMap};
use crate::arch::{ModuleSpec, Part};
use crate::error::Result;
use crate::linalg::mm_parallel;
use crate::linalg::philox::gaussian4;
use crate::plan::ModelSide;

/// Sketch width of the comparisons.
const SKETCH: usize = 256;

/// The random sketch R of the target residual, and the source's view of it.
pub struct Sketch {
    /// `d_t × K`
    r: Mat<f32>,
    /// `d_s × K`: P·R, for source reading rows.
    pr: Mat<f32>,
    /// `d_s × K`: Mᵀ·R, for source writing columns.
    mtr: Mat<f32>,
}

impl Sketch {
    pub fn new(residual: &ResidualMap, seed: u64) -> Self {
        let d_t = residual.m.nrows();
        let k = SKETCH.min(d_t);
        let r = Mat::from_fn(d_t, k, |i, j| {
            gaussian4(seed, 0x6d61_7073, i as u32, (j / 4) as u32)[j % 4] / (k as f32).sqrt()
        });
        Sketch {
            pr: &residual.p * &r,
            mtr: residual.m.transpose() * &r,
            r,
        }
    }
}

/// One target layer's map.
#[derive(Debug, Clone)]
pub struct LayerMap {
    pub source_layer: usize,
    /// Effective gains (offset applied) of the norms before attention and MLP, or ones.
    pub attn_gain: (Vec<f32>, Vec<f32>),
    pub mlp_gain: (Vec<f32>, Vec<f32>),
    /// Target query head → source query head.
    pub q_heads: Assignment,
    /// Target KV head → source KV head.
    pub kv_heads: Assignment,
    /// Target MLP neuron → source neuron.
    pub neurons: Assignment,
    /// head_dim of (source, target).
    pub head_dim: (usize, usize),
}

/// A side's view of one layer.
struct Side<'p, 'a> {
    model: &'p ModelSide<'a>,
    layer: usize,
}

impl Side<'_, '_> {
    fn weight(&self, part: Part) -> Result<Mat<f32>> {
        let spec: &ModuleSpec = self.model.arch.module_with(part);
        let name = format!(
            "{}.weight",
            self.model
                .arch
                .module_path(&self.model.prefix, self.layer, spec)
        );
        // Only the part's rows of a fused tensor are read.
        let rows = spec
            .rows_of(part, &self.model.ckpt.config)
            .expect("the module holds the part");
        let cols = self.model.ckpt.shape(&name)?[1];
        let data = self.model.ckpt.read_rows_f32(&name, rows.clone())?;
        Ok(Mat::from_fn(rows.len(), cols, |i, j| data[i * cols + j]))
    }

    fn gain(&self, norm: &str, fold: bool) -> Result<Vec<f32>> {
        let d = self.model.ckpt.config.hidden_size;
        if !fold {
            return Ok(vec![1.0; d]);
        }
        let name = format!("{}.{}.{norm}", self.model.prefix, self.layer);
        let g = read_matrix(self.model.ckpt, &name)?;
        let offset = self.model.arch.residual.gain_offset;
        Ok((0..g.ncols()).map(|j| g[(0, j)] + offset).collect())
    }
}

/// `w diag(g) X`: rows of a reading weight in sketched target coordinates.
fn reading(w: &Mat<f32>, g: &[f32], x: &Mat<f32>) -> Mat<f32> {
    let scaled = Mat::from_fn(w.nrows(), w.ncols(), |i, j| w[(i, j)] * g[j]);
    mm_parallel(scaled.as_ref(), x.as_ref())
}

impl LayerMap {
    pub fn build(
        source: &ModelSide<'_>,
        target: &ModelSide<'_>,
        source_layer: usize,
        target_layer: usize,
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
        let (rs, rt) = (&source.arch.residual, &target.arch.residual);
        let attn_gain = (
            s.gain(&rs.attn_norm, options.fold_norms)?,
            t.gain(&rt.attn_norm, options.fold_norms)?,
        );
        let mlp_gain = (
            s.gain(&rs.mlp_norm, options.fold_norms)?,
            t.gain(&rt.mlp_norm, options.fold_norms)?,
        );
        let (cs, ct) = (&source.ckpt.config, &target.ckpt.config);
        let head_dim = (cs.head_dim, ct.head_dim);
        let (q_heads, kv_heads, neurons) = match options.inner {
            InnerMatch::Index => (
                Assignment::by_index(ct.num_attention_heads, cs.num_attention_heads),
                Assignment::by_index(ct.num_key_value_heads, cs.num_key_value_heads),
                Assignment::by_index(ct.intermediate_size, cs.intermediate_size),
            ),
            InnerMatch::Match => {
                let neurons = match_neurons(&s, &t, &mlp_gain, sketch)?;
                let (q, kv) = match_heads(&s, &t, &attn_gain, sketch)?;
                (q, kv, neurons)
            }
        };
        Ok(LayerMap {
            source_layer,
            attn_gain,
            mlp_gain,
            q_heads,
            kv_heads,
            neurons,
            head_dim,
        })
    }
}

/// Columns of the sketch used to find candidates on the sparse path.
const COARSE: usize = 64;

fn match_neurons(
    s: &Side<'_, '_>,
    t: &Side<'_, '_>,
    gain: &(Vec<f32>, Vec<f32>),
    sketch: &Sketch,
) -> Result<Assignment> {
    // Per side, the three views of each neuron in sketched target coordinates: gate and up rows
    // (reads), down's column (its write: Rᵀ·M·c for the source, Rᵀ·c for the target).
    let views = |side: &Side<'_, '_>, g: &[f32], read: &Mat<f32>, write: &Mat<f32>| {
        Ok::<_, crate::error::Error>([
            reading(&side.weight(Part::Gate)?, g, read),
            reading(&side.weight(Part::Up)?, g, read),
            mm_parallel(side.weight(Part::Down)?.transpose(), write.as_ref()),
        ])
    };
    let vs = views(s, &gain.0, &sketch.pr, &sketch.mtr)?;
    let vt = views(t, &gain.1, &sketch.r, &sketch.r)?;
    // Features whose dot product is the mean of the three cosines.
    let features = |v: &[Mat<f32>; 3], width: usize| {
        let width = width.min(v[0].ncols());
        let parts: Vec<Mat<f32>> = v
            .iter()
            .map(|x| unit_rows(&x.subcols(0, width).to_owned()))
            .collect();
        let scale = 1.0 / 3f32.sqrt();
        Mat::from_fn(v[0].nrows(), 3 * width, |i, j| {
            parts[j / width][(i, j % width)] * scale
        })
    };
    let k = vs[0].ncols();
    assign_features(
        (&features(&vt, COARSE), &features(&vs, COARSE)),
        (&features(&vt, k), &features(&vs, k)),
    )
}

/// Per head: the sketched rows of q (hd × K), and for its KV head k and v, and o's columns.
struct Heads {
    q: Vec<Mat<f32>>,
    k: Vec<Mat<f32>>,
    v: Vec<Mat<f32>>,
    o: Vec<Mat<f32>>,
    per_group: usize,
}

fn heads(
    side: &Side<'_, '_>,
    gain: &[f32],
    read_x: &Mat<f32>,
    write_x: &Mat<f32>,
) -> Result<Heads> {
    let c = &side.model.ckpt.config;
    let hd = c.head_dim;
    let split = |m: &Mat<f32>, n: usize| -> Vec<Mat<f32>> {
        (0..n).map(|h| m.subrows(h * hd, hd).to_owned()).collect()
    };
    let q = reading(&side.weight(Part::Q)?, gain, read_x);
    let k = reading(&side.weight(Part::K)?, gain, read_x);
    let v = reading(&side.weight(Part::V)?, gain, read_x);
    let o = mm_parallel(side.weight(Part::O)?.transpose(), write_x.as_ref()); // (heads·hd) × K
    Ok(Heads {
        q: split(&q, c.num_attention_heads),
        k: split(&k, c.num_key_value_heads),
        v: split(&v, c.num_key_value_heads),
        o: split(&o, c.num_attention_heads),
        per_group: c.num_attention_heads / c.num_key_value_heads.max(1),
    })
}

/// `Σ (A₁A₂ᵀ) ∘ (B₁B₂ᵀ)` = ⟨A₁ᵀB₁, A₂ᵀB₂⟩_F.
fn circuit_dot(a1: &Mat<f32>, b1: &Mat<f32>, a2: &Mat<f32>, b2: &Mat<f32>) -> f64 {
    let x = a1 * a2.transpose();
    let y = b1 * b2.transpose();
    let mut s = 0.0f64;
    for j in 0..x.ncols() {
        for i in 0..x.nrows() {
            s += x[(i, j)] as f64 * y[(i, j)] as f64;
        }
    }
    s
}

fn match_heads(
    s: &Side<'_, '_>,
    t: &Side<'_, '_>,
    gain: &(Vec<f32>, Vec<f32>),
    sketch: &Sketch,
) -> Result<(Assignment, Assignment)> {
    let hs = heads(s, &gain.0, &sketch.pr, &sketch.mtr)?;
    let ht = heads(t, &gain.1, &sketch.r, &sketch.r)?;
    // Circuit norms, for cosines. The OV circuit O·V = (Oᵀ)ᵀ·V.
    let norms = |h: &Heads| -> (Vec<f64>, Vec<f64>) {
        (0..h.q.len())
            .map(|i| {
                let g = i / h.per_group;
                let qk = circuit_dot(&h.q[i], &h.k[g], &h.q[i], &h.k[g]).sqrt();
                let ov = circuit_dot(&h.o[i], &h.v[g], &h.o[i], &h.v[g]).sqrt();
                (qk.max(f64::MIN_POSITIVE), ov.max(f64::MIN_POSITIVE))
            })
            .unzip()
    };
    let ((qk_s, ov_s), (qk_t, ov_t)) = (norms(&hs), norms(&ht));
    let (nq_s, nq_t) = (hs.q.len(), ht.q.len());
    let head_sim = Mat::from_fn(nq_t, nq_s, |b, a| {
        let (ga, gb) = (a / hs.per_group, b / ht.per_group);
        let qk = circuit_dot(&hs.q[a], &hs.k[ga], &ht.q[b], &ht.k[gb]) / (qk_s[a] * qk_t[b]);
        let ov = circuit_dot(&hs.o[a], &hs.v[ga], &ht.o[b], &ht.v[gb]) / (ov_s[a] * ov_t[b]);
        ((qk + ov) / 2.0) as f32
    });
    // Groups: the value of the best matching of their query heads.
    let (g_s, g_t) = (hs.k.len(), ht.k.len());
    let within = |gb: usize, ga: usize| -> Result<Assignment> {
        let sub = Mat::from_fn(ht.per_group, hs.per_group, |b, a| {
            head_sim[(gb * ht.per_group + b, ga * hs.per_group + a)]
        });
        assign(&sub)
    };
    let mut group_sim = Mat::<f32>::zeros(g_t, g_s);
    for gb in 0..g_t {
        for ga in 0..g_s {
            let a = within(gb, ga)?;
            group_sim[(gb, ga)] = a.similarity.iter().sum::<f32>() / ht.per_group.max(1) as f32;
        }
    }
    let kv = assign(&group_sim)?;
    let mut source_of = vec![None; nq_t];
    let mut similarity = vec![0.0; nq_t];
    for (gb, ga) in kv.source_of.iter().enumerate() {
        let Some(ga) = *ga else { continue };
        let a = within(gb, ga)?;
        for (b, src) in a.source_of.iter().enumerate() {
            if let Some(src) = src {
                source_of[gb * ht.per_group + b] = Some(ga * hs.per_group + src);
                similarity[gb * ht.per_group + b] = a.similarity[b];
            }
        }
    }
    Ok((
        Assignment {
            source_of,
            similarity,
        },
        kv,
    ))
}
