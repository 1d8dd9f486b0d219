//! Attention heads: matched by the cosines of their QK circuits (W_qᵀW_k) and OV circuits
//! (W_oW_v), from head_dim × head_dim Gram products (`⟨A₁ᵀB₁, A₂ᵀB₂⟩ = Σ (A₁A₂ᵀ) ∘ (B₁B₂ᵀ)`),
//! which do not depend on the coordinates inside a head and work between heads of different
//! sizes; KV groups first (by the best within-group matching), then query heads inside them.
//! Query and key norms (per head: Qwen3, Gemma 3; across heads: OLMo 2/3) scale the rows they
//! normalize before the circuits are formed, since their gains sit between the projection and
//! the dot product.
//!
//! Inside matched heads, [`HeadFit`] maps coordinates by a ridge least-squares fit of the mapped
//! weights, `W_t ≈ N W_s P` for readers and `W_t ≈ W W_s U` for o: the identity when the heads
//! correspond exactly, and the only choice when their sizes differ.

use faer::Mat;
use rayon::prelude::*;

use super::layer::{reading, Attention, Gains, Sketch, SourceView};
use super::matching::{assign_grouped, Assignment};
use super::reader_scale::unit_sizes;
use super::sketch::SignSketch;
use crate::backend::Backend;
use crate::error::Result;
use crate::io::checkpoint::ModelConfig;

/// Ridge of the inner fits, relative to the mean eigenvalue of the source Gram matrix: small
/// enough to leave an exact correspondence exact to f32 rounding, large enough that directions
/// holding only rounding noise are not inverted.
const RIDGE: f64 = 1e-6;

/// One side's heads in sketched target coordinates: per query head its rows of q (hd × K) and
/// o's columns (hd × K), per KV head its rows of k and v.
pub(crate) struct Heads {
    q: Vec<Mat<f32>>,
    k: Vec<Mat<f32>>,
    v: Vec<Mat<f32>>,
    o: Vec<Mat<f32>>,
    per_group: usize,
}

/// Both sides' heads.
pub(crate) struct HeadViews {
    source: Heads,
    target: Heads,
    /// Per head, the squared sizes of its sketched rows of q, k and v (before the head norms),
    /// source then target (`reader_scale`).
    pub sizes: [(Vec<f64>, Vec<f64>); 3],
}

/// One side's q, k, v rows and o's columns in sketched target coordinates
/// (`(heads·hd) × K` each).
struct Sketched {
    q: Mat<f32>,
    k: Mat<f32>,
    v: Mat<f32>,
    o: Mat<f32>,
}

impl Sketched {
    /// The source's: through the map's view of the sketch (products).
    fn source(
        w: &Attention<'_>,
        attn: &[f32],
        (read_x, write_x): (&Mat<f32>, &Mat<f32>),
        backend: &dyn Backend,
        c: &ModelConfig,
    ) -> Result<Self> {
        Ok(Sketched {
            q: query_rows(reading(&w.q, attn, read_x.as_ref(), backend)?, c),
            k: reading(&w.k, attn, read_x.as_ref(), backend)?,
            v: reading(&w.v, attn, read_x.as_ref(), backend)?,
            o: backend.stored_product(&w.o, write_x.as_ref(), true)?,
        })
    }

    /// The target's: its own weights through the sign sketch (one pass over each).
    fn target(w: &Attention<'_>, attn: &[f32], sketch: &SignSketch, c: &ModelConfig) -> Self {
        Sketched {
            q: query_rows(sketch.rows(&w.q, attn), c),
            k: sketch.rows(&w.k, attn),
            v: sketch.rows(&w.v, attn),
            o: sketch.columns(&w.o),
        }
    }
}

/// The query rows of q's (sketched) rows: all of them, or of a gated query (Qwen3.5) the first
/// `head_dim` of each head's `2·head_dim`. The gate rows scale the head's output coordinate by
/// coordinate and form no circuit with k: the heads are matched on their query rows, and the
/// gate rows move with them (`apply`).
fn query_rows(q: Mat<f32>, c: &ModelConfig) -> Mat<f32> {
    if !c.gated_query {
        return q;
    }
    Mat::from_fn(q.nrows() / 2, q.ncols(), |i, j| {
        q[(query_row(i, c.head_dim), j)]
    })
}

/// Where query row `i` (of heads of `hd` query rows) lies among a gated query's rows (each
/// head's `hd` query rows, then its `hd` gate rows).
pub(super) fn query_row(i: usize, hd: usize) -> usize {
    (i / hd) * 2 * hd + i % hd
}

impl Heads {
    /// Split per head, the query and key gains (one per row) applied.
    fn new(x: Sketched, (q_gain, k_gain): (&[f32], &[f32]), c: &ModelConfig) -> Self {
        let hd = c.head_dim;
        let split = |m: &Mat<f32>, n: usize, g: Option<&[f32]>| -> Vec<Mat<f32>> {
            (0..n)
                .map(|h| {
                    let blk = m.subrows(h * hd, hd);
                    Mat::from_fn(hd, blk.ncols(), |i, j| {
                        blk[(i, j)] * g.map_or(1.0, |g| g[h * hd + i])
                    })
                })
                .collect()
        };
        Heads {
            q: split(&x.q, c.num_attention_heads, Some(q_gain)),
            k: split(&x.k, c.num_key_value_heads, Some(k_gain)),
            v: split(&x.v, c.num_key_value_heads, None),
            o: split(&x.o, c.num_attention_heads, None),
            per_group: c.num_attention_heads / c.num_key_value_heads.max(1),
        }
    }
}

impl HeadViews {
    pub(crate) fn new(
        (ws, wt): (&Attention<'_>, &Attention<'_>),
        gains: &Gains,
        view: &SourceView,
        sketch: &Sketch,
        (cs, ct): (&ModelConfig, &ModelConfig),
    ) -> Result<Self> {
        let source = Sketched::source(
            ws,
            &gains.attn.0,
            (&view.read, &view.write_attn),
            sketch.backend,
            cs,
        )?;
        let target = Sketched::target(wt, &gains.attn.1, &sketch.heads, ct);
        let sizes =
            |x: &Sketched, hd: usize| [&x.q, &x.k, &x.v].map(|m| unit_sizes(m.as_ref(), hd));
        let [qs, ks, vs] = sizes(&source, cs.head_dim);
        let [qt, kt, vt] = sizes(&target, ct.head_dim);
        Ok(HeadViews {
            sizes: [(qs, qt), (ks, kt), (vs, vt)],
            source: Heads::new(source, (&gains.q.0, &gains.k.0), cs),
            target: Heads::new(target, (&gains.q.1, &gains.k.1), ct),
        })
    }
}

/// `Σ (A₁A₂ᵀ) ∘ (B₁B₂ᵀ)` = ⟨A₁ᵀB₁, A₂ᵀB₂⟩_F.
pub(super) fn circuit_dot(a1: &Mat<f32>, b1: &Mat<f32>, a2: &Mat<f32>, b2: &Mat<f32>) -> f64 {
    frobenius(&(a1 * a2.transpose()), &(b1 * b2.transpose()))
}

/// `Σ x ∘ y`.
fn frobenius(x: &Mat<f32>, y: &Mat<f32>) -> f64 {
    let mut s = 0.0f64;
    for j in 0..x.ncols() {
        for i in 0..x.nrows() {
            s += x[(i, j)] as f64 * y[(i, j)] as f64;
        }
    }
    s
}

/// `x[a] y[b]ᵀ` for every pair, indexed `[b][a]`: the KV heads' halves of the circuit dots,
/// which every query head of a group pair shares.
fn cross_grams(x: &[Mat<f32>], y: &[Mat<f32>]) -> Vec<Vec<Mat<f32>>> {
    y.iter()
        .map(|yb| x.iter().map(|xa| xa * yb.transpose()).collect())
        .collect()
}

/// (query heads, KV heads): target → source.
pub(crate) fn match_heads(views: &HeadViews) -> Result<(Assignment, Assignment)> {
    let (hs, ht) = (&views.source, &views.target);
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
    let ((qk_s, ov_s), (qk_t, ov_t)) = (norms(hs), norms(ht));
    let (nq_s, nq_t) = (hs.q.len(), ht.q.len());
    let (k_grams, v_grams) = (cross_grams(&hs.k, &ht.k), cross_grams(&hs.v, &ht.v));
    let sims: Vec<f32> = (0..nq_t * nq_s)
        .into_par_iter()
        .map(|index| {
            let (b, a) = (index / nq_s, index % nq_s);
            let (ga, gb) = (a / hs.per_group, b / ht.per_group);
            let qk = frobenius(&(&hs.q[a] * ht.q[b].transpose()), &k_grams[gb][ga]);
            let ov = frobenius(&(&hs.o[a] * ht.o[b].transpose()), &v_grams[gb][ga]);
            ((qk / (qk_s[a] * qk_t[b]) + ov / (ov_s[a] * ov_t[b])) / 2.0) as f32
        })
        .collect();
    let head_sim = Mat::from_fn(nq_t, nq_s, |b, a| sims[b * nq_s + a]);
    // KV groups by the best matching of their query heads, then query heads inside them.
    assign_grouped(&head_sim, (hs.per_group, ht.per_group), None)
}

/// Least-squares maps inside matched heads. Readers: per target head b (source a),
/// `N_b = argmin ‖Y_b − N X_a‖² + λ‖N‖²` with X, Y the gained rows in sketched target
/// coordinates (hd_t × hd_s), so `B_t[b] = diag(g_t)⁻¹ N_b diag(g_s) B_s[a]` for q and k (g: the
/// head norms' gains, ones without) and `N_b B_s[a]` for v. Writers: o's columns,
/// `Rᵀ o_t[b] ≈ Rᵀ W o_s[a] U_b`, so `A_t[:, b] = A_s[:, a] U_b` (hd_s × hd_t).
#[derive(Debug, Clone)]
pub struct HeadFit {
    /// Per target query head: N of its q rows, U of o's columns (None: unmatched).
    pub q: Vec<Option<Mat<f32>>>,
    pub o: Vec<Option<Mat<f32>>>,
    /// Per target KV head: N of its k rows and of its v rows.
    pub k: Vec<Option<Mat<f32>>>,
    pub v: Vec<Option<Mat<f32>>>,
}

impl HeadFit {
    pub(crate) fn fit(views: &HeadViews, q_heads: &Assignment, kv_heads: &Assignment) -> Self {
        let (hs, ht) = (&views.source, &views.target);
        let per = |a: &Assignment, xs: &[Mat<f32>], ys: &[Mat<f32>], transpose: bool| {
            a.source_of
                .iter()
                .enumerate()
                .map(|(b, src)| {
                    src.map(|a| {
                        let n = ridge(&ys[b], &xs[a]);
                        if transpose {
                            n.transpose().to_owned()
                        } else {
                            n
                        }
                    })
                })
                .collect()
        };
        HeadFit {
            q: per(q_heads, &hs.q, &ht.q, false),
            o: per(q_heads, &hs.o, &ht.o, true),
            k: per(kv_heads, &hs.k, &ht.k, false),
            v: per(kv_heads, &hs.v, &ht.v, false),
        }
    }
}

/// `Y Xᵀ (X Xᵀ + λI)⁻¹`, with λ = [`RIDGE`] × the mean eigenvalue of `X Xᵀ`.
pub(crate) fn ridge(y: &Mat<f32>, x: &Mat<f32>) -> Mat<f32> {
    let to64 = |m: &Mat<f32>| Mat::<f64>::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] as f64);
    let (x, y) = (to64(x), to64(y));
    let mut gram = &x * x.transpose();
    let n = gram.nrows();
    let lambda = RIDGE * (0..n).map(|i| gram[(i, i)]).sum::<f64>() / n.max(1) as f64;
    for i in 0..n {
        gram[(i, i)] += lambda.max(f64::MIN_POSITIVE);
    }
    let cross = &y * x.transpose(); // hd_t × hd_s
    use faer::linalg::solvers::Solve;
    // gram is symmetric positive definite: N = cross · gram⁻¹ = (gram⁻¹ crossᵀ)ᵀ.
    let solved = match gram.llt(faer::Side::Lower) {
        Ok(llt) => llt.solve(cross.transpose()),
        Err(_) => Mat::zeros(n, cross.nrows()),
    };
    Mat::from_fn(cross.nrows(), n, |i, j| solved[(j, i)] as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::max_abs_diff;
    use crate::linalg::philox::gaussian4;

    #[test]
    fn ridge_recovers_an_exact_inner_map_between_sizes() {
        let (hd_s, hd_t, k) = (4, 6, 40);
        let g = |r: usize, c: usize, s: u64| {
            Mat::from_fn(r, c, |i, j| {
                gaussian4(3, s, i as u32, (j / 4) as u32)[j % 4]
            })
        };
        let x = g(hd_s, k, 1);
        let n = g(hd_t, hd_s, 2);
        let y = &n * &x;
        let got = ridge(&y, &x);
        assert!(max_abs_diff(&got, &n) < 1e-3 * n.norm_max(), "{got:?}");
    }
}
