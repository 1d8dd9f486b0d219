//! Depth by similarity: when the two models have different depths, which source layer each
//! target layer takes its adapter from is chosen by a monotone dynamic program over weight-only
//! layer similarities, instead of spreading the layers evenly (round(j·(L_s−1)/(L_t−1))).
//!
//! A layer's signature is what it reads and writes, in sketched target coordinates (through the
//! shared-token residual map for the source): four K × K Gram matrices — of its attention
//! inputs (q, k and v rows; of a gated query its query rows), its MLP inputs (gate and up rows,
//! norm gains folded in), and of the columns o and down write — each with its isotropic part
//! removed and scaled to unit size (a
//! layer with linear attention instead, Qwen3.5's, has its reads and out_proj's writes in their
//! place: layers compare on the parts both have).
//! Grams do not depend on the coordinates inside heads or on the order of neurons, so no
//! matching is needed to compare any two layers. Rows and columns are sampled evenly (at most
//! [`SAMPLED`] per weight): a Gram of a few hundred of them is already a stable estimate.
//!
//! The program maximizes the summed similarity over maps that never go back in depth and pin
//! the first and last layers to each other, less a small cost for leaving the evenly spread map
//! ([`LINEAR_PRIOR`] per full depth of deviation): between models whose layers do not resemble
//! each other (similarities that differ by noise), the map stays near the linear one instead of
//! following the noise; a layer that clearly matches another pays it easily.

use std::collections::BTreeMap;

use faer::Mat;

use super::heads::query_row;
use super::layer::{Side, Sketch};
use super::ResidualMap;
use crate::arch::{Block, Part};
use crate::backend::Backend;
use crate::error::Result;
use crate::plan::ModelSide;
use crate::progress::Progress;

/// Sketch width of the signatures.
const SIGNATURE_SKETCH: usize = 64;
/// Rows (reads) or columns (writes) sampled per weight.
pub const SAMPLED: usize = 512;
/// The cost, in similarity, of a target layer taking a source layer the whole source depth away
/// from where the linear map puts it (linear in the distance).
pub const LINEAR_PRIOR: f32 = 0.05;

/// The cost of pairing a layer of linear attention with one of softmax attention, where both
/// models mix them: more than the range of the scores (similarities in [−1, 1], less the linear
/// prior's 0.05 at most).
const KIND_COST: f32 = 4.0;

/// The chosen depth map and the similarities it was chosen on.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DepthMap {
    /// Target layer → source layer.
    pub map: BTreeMap<usize, usize>,
    /// `similarity[j][i]`: target layer j against source layer i.
    pub similarity: Vec<Vec<f32>>,
    /// Mean similarity along the chosen map, and along the evenly spread one.
    pub chosen_score: f64,
    pub linear_score: f64,
}

/// A layer's normalized Gram matrices: softmax attention's reads, MLP reads, o's and down's
/// writes, linear attention's reads and out_proj's writes (None: parts the layer does not have).
struct Signature([Option<Mat<f32>>; 6]);

/// The MLP's parts of a [`Signature`].
const MLP_PARTS: [usize; 2] = [1, 3];

/// `n` evenly spaced indices of `0..len`.
fn spaced(len: usize, n: usize) -> Vec<usize> {
    let n = n.min(len);
    (0..n).map(|i| i * len / n.max(1)).collect()
}

/// Rows read at a time where only some columns are kept.
const BAND_ROWS: usize = 64;

fn signature(
    side: &Side<'_, '_>,
    (read_x, write_x): (&Mat<f32>, &Mat<f32>),
    fold: bool,
    backend: &dyn Backend,
) -> Result<Signature> {
    let model = side.model;
    let d = model.ckpt.config.hidden_size;
    let res = &model.arch.residual;
    let (g_attn, g_mlp) = (
        side.gain(res.attn_norm.as_deref(), d, fold)?,
        side.gain(res.mlp_norm.as_deref(), d, fold)?,
    );
    let name_rows = |part: Part| -> Result<(String, std::ops::Range<usize>)> {
        let spec = model.arch.module_with(part);
        let (name, _) = model.weight(side.layer, None, spec)?;
        let rows = spec
            .rows_of(part, &model.ckpt.config)
            .expect("the module holds the part");
        Ok((name, rows))
    };
    // Sampled reading rows of the parts, gained and sketched: their Gram.
    let reads = |parts: &[Part], g: &[f32]| -> Result<Mat<f32>> {
        let mut gram = Mat::<f32>::zeros(read_x.ncols(), read_x.ncols());
        for &part in parts {
            let (name, rows) = name_rows(part)?;
            // A gated query's gate rows form no circuit with k (`heads::query_rows`): its query
            // rows alone, as a query without a gate has.
            let c = &model.ckpt.config;
            let (gated, hd) = (part == Part::Q && c.gated_query, c.head_dim);
            let count = if gated { rows.len() / 2 } else { rows.len() };
            let picked: Vec<usize> = spaced(count, SAMPLED)
                .into_iter()
                .map(|i| if gated { query_row(i, hd) } else { i })
                .collect();
            let mut w = Mat::<f32>::zeros(picked.len(), d);
            for (r, &i) in picked.iter().enumerate() {
                let row = model
                    .ckpt
                    .read_rows_f32(&name, rows.start + i..rows.start + i + 1)?;
                for j in 0..d {
                    w[(r, j)] = row[j] * g[j];
                }
            }
            let y = backend.product(w.as_ref(), read_x.as_ref())?;
            gram += y.transpose() * &y;
        }
        Ok(gram)
    };
    // Sampled written columns: their Gram.
    let writes = |part: Part| -> Result<Mat<f32>> {
        let (name, rows) = name_rows(part)?;
        let cols = model.ckpt.shape(&name)?[1];
        let picked = spaced(cols, SAMPLED);
        let read = |r: std::ops::Range<usize>| model.ckpt.read_rows_f32(&name, r);
        let c = sampled_columns(&read, rows, cols, &picked, BAND_ROWS)?;
        let y = backend.product(c.as_ref(), write_x.as_ref())?;
        Ok(y.transpose() * &y)
    };
    let attention = model.holds_block(side.layer, Block::Attention);
    let attention_reads = match attention {
        true => Some(normalized(reads(&[Part::Q, Part::K, Part::V], &g_attn)?)),
        false => None,
    };
    // Linear attention in its split form (Qwen3.5's); Qwen3-Next's fused one is compared on
    // its MLP alone.
    let linear = model.arch.splits_linear_attention()
        && model.holds_block(side.layer, Block::LinearAttention);
    let linear_parts = [Part::LinQkv, Part::LinZ, Part::LinB, Part::LinA];
    let linear_reads = match linear {
        true => Some(normalized(reads(&linear_parts, &g_attn)?)),
        false => None,
    };
    Ok(Signature([
        attention_reads,
        Some(normalized(reads(&[Part::Gate, Part::Up], &g_mlp)?)),
        attention
            .then(|| writes(Part::O))
            .transpose()?
            .map(normalized),
        Some(normalized(writes(Part::Down)?)),
        linear_reads,
        linear
            .then(|| writes(Part::LinOut))
            .transpose()?
            .map(normalized),
    ]))
}

/// Columns `picked` of the rows `rows` of a weight `cols` wide, transposed (`picked × rows`),
/// read `band` rows at a time: the whole weight in f32 would be most of a gigabyte at 70B
/// widths, for 512 of its columns.
fn sampled_columns(
    read: &dyn Fn(std::ops::Range<usize>) -> Result<Vec<f32>>,
    rows: std::ops::Range<usize>,
    cols: usize,
    picked: &[usize],
    band: usize,
) -> Result<Mat<f32>> {
    let mut c = Mat::<f32>::zeros(picked.len(), rows.len());
    for start in (0..rows.len()).step_by(band.max(1)) {
        let end = (start + band.max(1)).min(rows.len());
        let values = read(rows.start + start..rows.start + end)?;
        for i in start..end {
            for (r, &col) in picked.iter().enumerate() {
                c[(r, i)] = values[(i - start) * cols + col];
            }
        }
    }
    Ok(c)
}

/// `G − (tr G / K) I`, scaled to unit Frobenius norm.
fn normalized(mut g: Mat<f32>) -> Mat<f32> {
    let k = g.nrows();
    let mean = (0..k).map(|i| g[(i, i)]).sum::<f32>() / k.max(1) as f32;
    for i in 0..k {
        g[(i, i)] -= mean;
    }
    let n = g.norm_l2();
    if n > 0.0 {
        g * faer::Scale(1.0 / n)
    } else {
        g
    }
}

/// The mean of the inner products of the parts both layers have (`mlp_only`: of the MLP's two).
fn similarity(a: &Signature, b: &Signature, mlp_only: bool) -> f32 {
    let dot = |x: &Mat<f32>, y: &Mat<f32>| -> f32 {
        let mut s = 0.0;
        for j in 0..x.ncols() {
            for i in 0..x.nrows() {
                s += x[(i, j)] * y[(i, j)];
            }
        }
        s
    };
    // Over the parts both layers have: the MLP's alone between layers of two attention kinds.
    let both: Vec<f32> = (a.0.iter().zip(&b.0).enumerate())
        .filter(|(part, _)| !mlp_only || MLP_PARTS.contains(part))
        .filter_map(|(_, (x, y))| Some(dot(x.as_ref()?, y.as_ref()?)))
        .collect();
    both.iter().sum::<f32>() / both.len().max(1) as f32
}

/// The depth map of target layers onto source layers by the similarity of their weights,
/// compared through `residual` (the shared-token map).
pub fn by_similarity(
    source: &ModelSide<'_>,
    target: &ModelSide<'_>,
    residual: &ResidualMap,
    seed: u64,
    fold: bool,
    backend: &dyn Backend,
    progress: &Progress,
) -> Result<DepthMap> {
    let sketch = Sketch::new(target.ckpt.config.hidden_size, seed, backend);
    let dense = sketch.heads.dense();
    let k = SIGNATURE_SKETCH.min(dense.ncols());
    // Folded: the sign sketch of k buckets (its first k columns would see a part of the
    // coordinates only).
    let r = super::sketch::fold(&dense, k);
    let qr = &residual.qt * &r;
    let source_x = (
        &qr * faer::Scale(residual.width as f32),
        &qr * faer::Scale(residual.scale as f32),
    );
    // One step per layer signature, source then target: on large models each reads a layer's
    // weights, so this is the long part, and a cancelled job stops between layers.
    let bar = progress.start(
        "depth",
        "layers",
        (source.layers() + target.layers()) as u64,
    );
    let signatures = |side: &ModelSide<'_>, x: (&Mat<f32>, &Mat<f32>)| -> Result<Vec<Signature>> {
        (0..side.layers())
            .map(|layer| {
                bar.check()?;
                let s = signature(&Side { model: side, layer }, x, fold, backend)?;
                bar.step();
                Ok(s)
            })
            .collect()
    };
    let ss = signatures(source, (&source_x.0, &source_x.1))?;
    let st = signatures(target, (&r, &r))?;
    bar.finish();
    // Where one model mixes linear attention in and the other does not, some pairs would be
    // scored on their attention and others not: every pair on its MLP alone.
    let mlp_only = source.hybrid() != target.hybrid();
    let sim: Vec<Vec<f32>> = st
        .iter()
        .map(|t| ss.iter().map(|s| similarity(s, t, mlp_only)).collect())
        .collect();
    let linear = crate::plan::layers::default_layer_map(ss.len(), st.len());
    let span = (ss.len().max(2) - 1) as f32;
    let scored: Vec<Vec<f32>> = sim
        .iter()
        .enumerate()
        .map(|(j, row)| {
            row.iter()
                .enumerate()
                .map(|(i, &x)| x - LINEAR_PRIOR * (i as f32 - linear[&j] as f32).abs() / span)
                .collect()
        })
        .collect();
    let linear_at = |side: &ModelSide<'_>, l: usize| side.holds_block(l, Block::LinearAttention);
    let chosen = match source.hybrid() && target.hybrid() {
        true => by_kind(scored, &|i| linear_at(source, i), &|j| linear_at(target, j)),
        false => monotone(&scored),
    };
    let score = |f: &dyn Fn(usize) -> usize| -> f64 {
        (0..st.len()).map(|j| sim[j][f(j)] as f64).sum::<f64>() / st.len().max(1) as f64
    };
    Ok(DepthMap {
        chosen_score: score(&|j| chosen[j]),
        linear_score: score(&|j| linear[&j]),
        map: chosen.into_iter().enumerate().collect(),
        similarity: sim,
    })
}

/// The program's map where both models mix linear and softmax attention (`kind`: whether a
/// layer has linear attention): a layer of the other kind costs more than any similarity gains,
/// and where the monotone program cannot avoid one, the kinds are paired as the default map
/// pairs them (`layers::pair_kinds`).
fn by_kind(
    scored: Vec<Vec<f32>>,
    source_kind: &dyn Fn(usize) -> bool,
    target_kind: &dyn Fn(usize) -> bool,
) -> Vec<usize> {
    let source_layers = scored.first().map_or(0, Vec::len);
    let scored: Vec<Vec<f32>> = (scored.into_iter().enumerate())
        .map(|(j, row)| {
            (row.into_iter().enumerate())
                .map(|(i, x)| match source_kind(i) == target_kind(j) {
                    true => x,
                    false => x - KIND_COST,
                })
                .collect()
        })
        .collect();
    let mut map: BTreeMap<usize, usize> = monotone(&scored).into_iter().enumerate().collect();
    crate::plan::layers::pair_kinds(&mut map, source_layers, source_kind, target_kind);
    map.into_values().collect()
}

/// The non-decreasing map j → f(j) with f(0) = 0 and f(last) = last that maximizes
/// Σ sim[j][f(j)] (one target layer: its most similar source layer).
pub fn monotone(sim: &[Vec<f32>]) -> Vec<usize> {
    let (lt, ls) = (sim.len(), sim.first().map_or(0, |r| r.len()));
    if lt == 0 || ls == 0 {
        return vec![0; lt];
    }
    if lt == 1 {
        let best = (0..ls)
            .max_by(|&a, &b| sim[0][a].total_cmp(&sim[0][b]))
            .unwrap_or(0);
        return vec![best];
    }
    // best[j][i]: the best sum of rows 0..=j with f(j) = i; from[j][i]: the f(j−1) behind it.
    let mut best = vec![vec![f64::NEG_INFINITY; ls]; lt];
    let mut from = vec![vec![0usize; ls]; lt];
    best[0][0] = sim[0][0] as f64;
    for j in 1..lt {
        let (mut run, mut arg) = (f64::NEG_INFINITY, 0);
        for i in 0..ls {
            if best[j - 1][i] > run {
                run = best[j - 1][i];
                arg = i;
            }
            best[j][i] = run + sim[j][i] as f64;
            from[j][i] = arg;
        }
    }
    let mut f = vec![0; lt];
    f[lt - 1] = ls - 1;
    for j in (1..lt).rev() {
        f[j - 1] = from[j][f[j]];
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampled_columns_are_the_same_whatever_the_band() {
        let seed = crate::linalg::fresh_seed();
        let (m, n) = (23, 17);
        let w: Vec<f32> = (0..m * n)
            .map(|e| crate::linalg::philox::gaussian4(seed, 3, e as u32, 0)[0])
            .collect();
        let read = |r: std::ops::Range<usize>| Ok(w[r.start * n..r.end * n].to_vec());
        let picked = spaced(n, 5);
        let rows = 4..21;
        let whole = Mat::from_fn(picked.len(), rows.len(), |r, i| {
            w[(rows.start + i) * n + picked[r]]
        });
        for band in [1, 3, 7, 17, 64] {
            let got = sampled_columns(&read, rows.clone(), n, &picked, band).unwrap();
            assert!(got == whole, "band {band}");
        }
    }

    /// A decoy of the other kind scores above each true layer of the target's kind, and the
    /// nearest layer of the right kind to the decoy is not the true one: only the kind cost
    /// keeps the program on the true layers (pairing kinds afterwards would not find them).
    #[test]
    fn the_kind_cost_keeps_the_program_on_layers_of_one_kind() {
        let linear = |l: usize| (l + 1) % 4 != 0;
        let truth = [0usize, 1, 4, 7, 8, 9, 10, 11];
        let decoy = [None, Some(3), None, None, None, None, None, None];
        let sim: Vec<Vec<f32>> = (0..8)
            .map(|j| {
                (0..12)
                    .map(|i| match (truth[j] == i, decoy[j] == Some(i)) {
                        (true, _) => 0.9,
                        (_, true) => 0.95,
                        _ => 0.0,
                    })
                    .collect()
            })
            .collect();
        assert_eq!(by_kind(sim.clone(), &linear, &linear), truth.to_vec());
        // Without the cost the program takes the decoys, and pairing kinds after it lands
        // elsewhere.
        let mut map: BTreeMap<usize, usize> = monotone(&sim).into_iter().enumerate().collect();
        crate::plan::layers::pair_kinds(&mut map, 12, linear, linear);
        assert_ne!(map.into_values().collect::<Vec<_>>(), truth.to_vec());
    }

    /// Qwen3.5's pattern (softmax attention in every fourth layer), 8 target layers on 12
    /// source layers whose similarities favour layers of the other kind: every pair has one kind.
    #[test]
    fn layers_of_one_attention_kind_pair_whatever_the_similarity() {
        let linear = |l: usize| (l + 1) % 4 != 0;
        let seed = crate::linalg::fresh_seed();
        let sim: Vec<Vec<f32>> = (0..8)
            .map(|j| {
                (0..12)
                    .map(|i| {
                        let noise = crate::linalg::philox::gaussian4(seed, 5, j, i)[0] * 0.1;
                        let kinds = if linear(i as usize) == linear(j as usize) {
                            0.0
                        } else {
                            0.8
                        };
                        noise + kinds
                    })
                    .collect()
            })
            .collect();
        let map = by_kind(sim, &linear, &linear);
        assert_eq!(map.len(), 8);
        assert!(
            map.iter().enumerate().all(|(j, &i)| linear(i) == linear(j)),
            "{map:?}"
        );
        assert!(map.windows(2).all(|w| w[0] <= w[1]), "{map:?}");
    }

    #[test]
    fn the_program_follows_the_similarity_and_never_goes_back() {
        // 4 target layers, 6 source layers; the truth is 0, 2, 3, 5.
        let truth = [0, 2, 3, 5];
        let sim: Vec<Vec<f32>> = (0..4)
            .map(|j| {
                (0..6)
                    .map(|i| if i == truth[j] { 0.9 } else { 0.1 })
                    .collect()
            })
            .collect();
        assert_eq!(monotone(&sim), truth);
        // A lure behind the previous choice is not taken.
        let mut lure = sim.clone();
        lure[2][1] = 0.95;
        lure[2][3] = 0.2;
        let f = monotone(&lure);
        assert!(f.windows(2).all(|w| w[0] <= w[1]), "{f:?}");
        assert_eq!((f[0], f[3]), (0, 5));
    }
}
