//! Synthetic base models: the tensors of a preset, named and shaped exactly as Hugging Face saves
//! them, with values that look like trained weights to the transfer engine.
//!
//! Projection weights are `W = X·diag(d)·Y + s·G` with `X` (m×R), `Y` (R×n) and `G` (m×n)
//! i.i.d. Gaussian, R = min(64, m, n). The planted part gives R singular values that decay as
//! (j+1)^-0.6 from ten times the edge of the noise bulk; the noise gives the Marchenko–Pastur
//! bulk below them. Only the leading directions stand clear of the bulk: from j ≈ 47 on the
//! planted values fall below its edge, so a top-k subspace with k above ~45 is not determined by
//! a gap, and randomized SVDs with different seeds (or the exact SVD) disagree on its tail
//! directions. Known-answer tests therefore plant their own gapped spectra (tests/common). The scales are chosen so the entries have RMS 0.02, the usual magnitude (and HF's
//! `initializer_range`). Cost is one rank-64 product per matrix, with no SVD and no
//! orthogonalization, so a 3B model takes minutes; rows are produced in fixed blocks on rayon's
//! threads, each block a pure function of its position, so the output does not depend on the
//! thread count.

use std::path::{Path, PathBuf};

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::presets::{Preset, Shape};
use super::{fill_normal, stream_id};
use crate::error::{Error, Result};
use crate::io::safetensors::{encode_f32, FloatType};
use crate::io::shards::{write_json, write_tensors, PlannedTensor, SHARD_LIMIT};

/// RMS of a synthetic projection or embedding entry.
const TARGET_RMS: f64 = 0.02;
/// Planted directions per projection (capped by the matrix sizes).
const PLANTED: usize = 64;
/// Top planted singular value, in units of the noise bulk edge s·(√m + √n).
const TOP_OVER_EDGE: f64 = 10.0;
/// Decay exponent of the planted singular values.
const DECAY: f64 = 0.6;
/// Standard deviation of the noise around 1 of norm weights, and of biases.
const NORM_NOISE: f32 = 0.05;
const BIAS_STD: f32 = 0.02;
/// Elements generated per parallel block (a block is a whole number of rows).
const BLOCK_ELEMS: usize = 1 << 18;

/// What to synthesize (`loraxfer synth model`).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub preset: Preset,
    /// Overrides the preset's `num_hidden_layers` (a shallower model with the real layer shapes).
    pub layers: Option<usize>,
    /// Storage type of every tensor.
    pub dtype: FloatType,
    pub seed: u64,
    /// Instead of a preset: copy this checkpoint's config and shapes and perturb its weights.
    pub derive_from: Option<PathBuf>,
    /// With `derive_from`: noise RMS relative to each tensor's RMS (0.05 = 5 %).
    pub drift: f32,
}

impl ModelSpec {
    /// The preset at its real depth, in bf16 (as the real checkpoints ship), seed 0.
    pub fn new(preset: Preset) -> Self {
        ModelSpec {
            preset,
            layers: None,
            dtype: FloatType::Bf16,
            seed: 0,
            derive_from: None,
            drift: 0.0,
        }
    }
}

/// Writes `config.json` and the weights of `spec` into `out_dir`, which must exist (the caller
/// stages it and renames it into place). `progress(done, total)` is called in tensor bytes.
pub fn write_model(spec: &ModelSpec, out_dir: &Path, progress: impl Fn(u64, u64)) -> Result<()> {
    if let Some(source) = &spec.derive_from {
        if !(spec.drift.is_finite() && spec.drift >= 0.0) {
            return Err(Error::arg(
                "--drift",
                format!("{} is not a non-negative number", spec.drift),
            ));
        }
        return super::derive::write_derived(source, spec.drift, spec.seed, out_dir, progress);
    }
    let shape = spec.preset.shape();
    let layers = spec.layers.unwrap_or(shape.layers);
    if layers == 0 {
        return Err(Error::arg("--layers", "a model needs at least one layer"));
    }
    write_json(
        &out_dir.join("config.json"),
        &shape.config_json(layers, spec.dtype),
    )?;
    write_json(
        &out_dir.join("tokenizer.json"),
        &tokenizer_json(shape.vocab),
    )?;
    let tensors = model_tensors(&shape, layers, spec.dtype);
    let preset = spec.preset.name();
    write_tensors(
        out_dir,
        &tensors,
        SHARD_LIMIT,
        "pt",
        |t, sink| sink(&generate(spec.seed, preset, t)),
        progress,
    )
}

/// A word-level `tokenizer.json` of `vocab` tokens (`t0`, `t1`, …), so that synthetic models
/// have a vocabulary for the map mode to pair (two presets share the tokens of their smaller
/// vocabulary, with the same ids).
pub fn tokenizer_json(vocab: usize) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = (0..vocab)
        .map(|i| (format!("t{i}"), serde_json::Value::from(i)))
        .collect();
    serde_json::json!({
        "version": "1.0",
        "added_tokens": [],
        "model": {"type": "WordLevel", "vocab": map, "unk_token": "t0"},
    })
}

/// The tensors of a model of this shape with `layers` layers, in Hugging Face's names and
/// `[out, in]` shapes, embeddings first, then layer by layer, then the final norm (and `lm_head`
/// when the embeddings are not tied).
pub fn model_tensors(shape: &Shape, layers: usize, ty: FloatType) -> Vec<PlannedTensor> {
    let (h, f) = (shape.hidden, shape.intermediate);
    let q = shape.heads * shape.head_dim;
    let kv = shape.kv_heads * shape.head_dim;
    let mut out = Vec::new();
    let mut add = |name: String, shape: Vec<usize>| out.push(PlannedTensor { name, shape, ty });
    add("model.embed_tokens.weight".into(), vec![shape.vocab, h]);
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        add(format!("{p}.input_layernorm.weight"), vec![h]);
        for (m, rows) in [("q", q), ("k", kv), ("v", kv)] {
            add(format!("{p}.self_attn.{m}_proj.weight"), vec![rows, h]);
            if shape.qkv_bias {
                add(format!("{p}.self_attn.{m}_proj.bias"), vec![rows]);
            }
        }
        add(format!("{p}.self_attn.o_proj.weight"), vec![h, q]);
        add(format!("{p}.post_attention_layernorm.weight"), vec![h]);
        add(format!("{p}.mlp.gate_proj.weight"), vec![f, h]);
        add(format!("{p}.mlp.up_proj.weight"), vec![f, h]);
        add(format!("{p}.mlp.down_proj.weight"), vec![h, f]);
    }
    add("model.norm.weight".into(), vec![h]);
    if !shape.tied {
        add("lm_head.weight".into(), vec![shape.vocab, h]);
    }
    out
}

/// The bytes of one synthetic tensor; which generator is used follows from the name.
fn generate(seed: u64, preset: &str, t: &PlannedTensor) -> Vec<u8> {
    let noise_id = stream_id(&[preset, &t.name, "noise"]);
    let (rows, cols) = match t.shape[..] {
        [m, n] => (m, n),
        [n] => (1, n),
        _ => unreachable!("synthetic tensors are 1-D or 2-D"),
    };
    if t.name.ends_with("_proj.weight") {
        projection(seed, preset, t, rows, cols)
    } else if t.name.ends_with("norm.weight") {
        generate_rows(rows, cols, t.ty, |row0, buf| {
            fill_normal(seed, noise_id, (row0 * cols) as u64, buf);
            buf.iter_mut().for_each(|x| *x = 1.0 + NORM_NOISE * *x);
        })
    } else {
        // Embeddings, lm_head and biases: plain Gaussian entries.
        let std = if t.name.ends_with(".bias") {
            BIAS_STD
        } else {
            TARGET_RMS as f32
        };
        generate_rows(rows, cols, t.ty, |row0, buf| {
            fill_normal(seed, noise_id, (row0 * cols) as u64, buf);
            buf.iter_mut().for_each(|x| *x *= std);
        })
    }
}

/// The noise standard deviation s and the planted scales d_j of an m×n projection.
///
/// With Gaussian X and Y, column j of X has norm ≈ √m and row j of Y ≈ √n, so the planted
/// singular values are ≈ d_j·√(mn) = TOP_OVER_EDGE·s·(√m+√n)·(j+1)^-DECAY, and the mean square
/// entry is s²·(1 + Σ_j (d_j²·mn) / (s²·mn)); s is solved so that it equals TARGET_RMS².
pub(crate) fn spectrum(m: usize, n: usize, r: usize) -> (f32, Vec<f32>) {
    let (mf, nf) = (m as f64, n as f64);
    let edge = mf.sqrt() + nf.sqrt();
    let decay: Vec<f64> = (0..r).map(|j| ((j + 1) as f64).powf(-DECAY)).collect();
    let planted_energy: f64 =
        decay.iter().map(|d| d * d).sum::<f64>() * (TOP_OVER_EDGE * edge).powi(2) / (mf * nf);
    let s = TARGET_RMS / (1.0 + planted_energy).sqrt();
    let d = decay
        .iter()
        .map(|dj| (TOP_OVER_EDGE * s * edge * dj / (mf * nf).sqrt()) as f32)
        .collect();
    (s as f32, d)
}

/// An m×n projection: noise plus the planted low-rank part, block of rows by block of rows.
fn projection(seed: u64, preset: &str, t: &PlannedTensor, m: usize, n: usize) -> Vec<u8> {
    let r = PLANTED.min(m).min(n);
    let (s, d) = spectrum(m, n, r);
    // Yᵀ·diag(d): n×R column-major, column j = d_j · (row j of Y).
    let mut ys = vec![0f32; n * r];
    fill_normal(seed, stream_id(&[preset, &t.name, "y"]), 0, &mut ys);
    for (col, dj) in ys.chunks_exact_mut(n).zip(&d) {
        col.iter_mut().for_each(|x| *x *= dj);
    }
    // Xᵀ: R×m column-major, column i = row i of X.
    let mut xt = vec![0f32; r * m];
    fill_normal(seed, stream_id(&[preset, &t.name, "x"]), 0, &mut xt);
    let ys = MatRef::from_column_major_slice(&ys, n, r);
    let xt = MatRef::from_column_major_slice(&xt, r, m);
    let noise_id = stream_id(&[preset, &t.name, "noise"]);
    generate_rows(m, n, t.ty, |row0, buf| {
        fill_normal(seed, noise_id, (row0 * n) as u64, buf);
        buf.iter_mut().for_each(|x| *x *= s);
        let rows = buf.len() / n;
        // Rows row0.. of W, row-major, are the columns of Wᵀ (n×rows, column-major):
        // Wᵀ += (Yᵀ·diag(d)) · Xᵀ[:, row0..].
        let dst = MatMut::from_column_major_slice_mut(buf, n, rows);
        matmul(
            dst,
            Accum::Add,
            ys,
            xt.subcols(row0, rows),
            1.0f32,
            Par::Seq,
        );
    })
}

/// A rows×cols tensor as bytes of `ty`, produced in parallel blocks of whole rows:
/// `fill(first_row, block)` writes the f32 values of the rows starting at `first_row`.
/// The block size depends only on `cols`, never on the thread count.
pub(crate) fn generate_rows(
    rows: usize,
    cols: usize,
    ty: FloatType,
    fill: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<u8> {
    let size = ty.size();
    let mut out = vec![0u8; rows * cols * size];
    if out.is_empty() {
        return out;
    }
    let block_rows = (BLOCK_ELEMS / cols).max(1);
    out.par_chunks_mut(block_rows * cols * size)
        .enumerate()
        .for_each(|(b, bytes)| {
            let mut values = vec![0f32; bytes.len() / size];
            fill(b * block_rows, &mut values);
            bytes.copy_from_slice(&encode_f32(&values, ty));
        });
    out
}
