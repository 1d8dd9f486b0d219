//! Derived models: a copy of an existing checkpoint with every tensor perturbed by relative
//! Gaussian noise, `W' = W + drift·rms(W)·G`. This stands in for a fine-tuned or
//! continued-pretraining relative of a base model: same shapes, nearby weights, singular subspaces
//! that rotate a little (more for the directions near the noise level), which is the situation
//! adapter transfer between "versions" of a model is meant for.

use std::path::Path;

use rayon::prelude::*;

use super::{fill_normal, stream_id};
use crate::error::{Error, Result};
use crate::io::checkpoint::Checkpoint;
use crate::io::safetensors::encode_f32;
use crate::io::shards::{write_json, write_tensors, PlannedTensor, SHARD_LIMIT};

/// Elements read per block (whole rows); bounds the f32 copy held besides the output bytes.
const BLOCK_ELEMS: usize = 1 << 18;

/// Small files of a model directory that are copied as they are, so that a derived copy of a real
/// model keeps its tokenizer and generation defaults.
pub(crate) const COPIED_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
];

/// Writes the drifted copy of the checkpoint at `source` into `out_dir` (which must exist): the
/// source's `config.json` unchanged (less a quantized checkpoint's `quantization_config`, or
/// MLX's `quantization`), each tensor in the dtype it is read in, sharded like any synthetic
/// model.
pub(super) fn write_derived(
    source: &Path,
    drift: f32,
    seed: u64,
    out_dir: &Path,
    progress: impl Fn(u64, u64),
) -> Result<()> {
    let ckpt = Checkpoint::open(source)?;
    // A quantized checkpoint's weights (FP8, packed, bitsandbytes, MLX) are read (and written)
    // as their values, an MLX stack's experts one weight each: their scales, codes, zero points
    // and quant states, and the config's word that they are quantized, stay behind.
    let parts = ckpt.quantization_parts();
    let mut names: Vec<&str> = ckpt.names().filter(|n| !parts.contains(*n)).collect();
    names.extend(ckpt.built_weights());
    names.sort_by_cached_key(|n| natural_key(n));
    let tensors = names
        .iter()
        .map(|&name| {
            let ty = ckpt.float_type(name).ok_or_else(|| {
                Error::bad_tensor(
                    source,
                    name,
                    "not a float tensor (bf16, f16, f32): cannot be drifted",
                )
            })?;
            Ok(PlannedTensor {
                name: name.to_string(),
                shape: ckpt.shape(name)?.to_vec(),
                ty,
            })
        })
        .collect::<Result<Vec<_>>>()?;

    let mut config = ckpt.config.raw.clone();
    if !parts.is_empty() {
        if let Some(c) = config.as_object_mut() {
            c.remove("quantization_config");
            // (MLX's own key for the same.)
            c.remove("quantization");
        }
    }
    write_json(&out_dir.join("config.json"), &config)?;
    for file in COPIED_FILES {
        let from = source.join(file);
        if from.is_file() {
            std::fs::copy(&from, out_dir.join(file))
                .map_err(|e| Error::io(&from, "cannot copy", e))?;
        }
    }
    write_tensors(
        out_dir,
        &tensors,
        SHARD_LIMIT,
        // mlx-lm's tensors keep its conventions (Qwen3.5's norms shifted by 1, say), which the
        // mark tells the readers, this one's included.
        if ckpt.is_mlx() { "mlx" } else { "pt" },
        |t, sink| sink(&drifted(&ckpt, t, drift, seed)?),
        progress,
    )
}

/// The bytes of `W + drift·rms(W)·G` for one tensor, read block by block from the map twice
/// (once for the RMS, once for the values) so only the output is held whole.
fn drifted(ckpt: &Checkpoint, t: &PlannedTensor, drift: f32, seed: u64) -> Result<Vec<u8>> {
    let numel: usize = t.shape.iter().product();
    if numel == 0 {
        return Ok(Vec::new());
    }
    // The row split `read_rows_f32` uses: first dimension, the rest flattened (1 row if 0-D).
    let rows = t.shape.first().copied().unwrap_or(1);
    let cols = numel / rows;
    let block_rows = (BLOCK_ELEMS / cols).max(1);
    let blocks = rows.div_ceil(block_rows);
    let range = |b: usize| b * block_rows..((b + 1) * block_rows).min(rows);

    let sum_sq = (0..blocks)
        .into_par_iter()
        .map(|b| {
            let v = ckpt.read_rows_f32(&t.name, range(b))?;
            Ok(v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
        })
        .collect::<Result<Vec<f64>>>()?
        .into_iter()
        .sum::<f64>();
    let scale = drift * (sum_sq / numel as f64).sqrt() as f32;

    let id = stream_id(&["derive", &t.name]);
    let size = t.ty.size();
    let mut out = vec![0u8; numel * size];
    out.par_chunks_mut(block_rows * cols * size)
        .enumerate()
        .try_for_each(|(b, bytes)| {
            let rows = range(b);
            let mut values = ckpt.read_rows_f32(&t.name, rows.clone())?;
            let mut noise = vec![0f32; values.len()];
            fill_normal(seed, id, (rows.start * cols) as u64, &mut noise);
            for (v, g) in values.iter_mut().zip(&noise) {
                *v += scale * g;
            }
            bytes.copy_from_slice(&encode_f32(&values, t.ty));
            Ok::<(), Error>(())
        })?;
    Ok(out)
}

/// A sort key that orders `model.layers.10` after `model.layers.9`, so the derived tensors go
/// into shards in layer order, as Hugging Face writes them.
fn natural_key(name: &str) -> Vec<(u64, String)> {
    name.split('.')
        .map(|part| match part.parse::<u64>() {
            Ok(n) => (n, String::new()),
            Err(_) => (u64::MAX, part.to_string()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::natural_key;

    #[test]
    fn layers_sort_numerically() {
        let mut names = vec![
            "model.layers.10.mlp.up_proj.weight",
            "model.layers.9.mlp.up_proj.weight",
            "model.embed_tokens.weight",
        ];
        names.sort_by_key(|n| natural_key(n));
        assert_eq!(
            names,
            vec![
                "model.embed_tokens.weight",
                "model.layers.9.mlp.up_proj.weight",
                "model.layers.10.mlp.up_proj.weight",
            ]
        );
    }
}
