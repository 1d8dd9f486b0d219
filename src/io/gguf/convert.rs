//! A GGUF model written out as the engine reads it: a safetensors checkpoint under the Hugging
//! Face names (dequantized, Q/K rows and Gemma norms restored, the tensors beside the projections
//! as [`super::state`] reads them), the `config.json` its metadata gives, and a `tokenizer.json`
//! holding its vocabulary (tokens, merges, special tokens) — enough for this engine and for
//! transformers to load the weights, not a replacement for the model's own tokenizer files.
//! Experts of a family that stores them fused go back into its fused tensors
//! ([`super::fuse_experts`]).

use std::path::Path;

use serde_json::{json, Map, Value as Json};

use crate::error::{Error, Result};
use crate::io::checkpoint::Checkpoint;
use crate::io::gguf::header::Value;
use crate::io::gguf::GgufModel;
use crate::io::safetensors::{encode_f32, FloatType, OutTensor};
use crate::io::shards::{write_json, write_sharded};
use crate::progress::Progress;

/// Values of a band the writer reads, dequantizes and encodes at a time (64 MiB in f32), so that
/// no tensor is ever whole in memory (Llama 4's embedding alone is 4 GB in f32).
const BAND_VALUES: usize = 16 << 20;

/// Writes `model` into the (fresh, staged) directory `dir`, weights stored as `ty` in files of at
/// most `shard_limit` bytes of data ([`crate::io::shards`]), reporting each tensor written to
/// `progress` (stage `convert`); returns the number of tensors written.
pub fn write_checkpoint(
    ckpt: &Checkpoint,
    dir: &Path,
    ty: FloatType,
    shard_limit: u64,
    progress: &Progress,
) -> Result<usize> {
    let model = ckpt
        .gguf()
        .ok_or_else(|| Error::config(&ckpt.dir, "not a GGUF model"))?;
    if let Some(why) = model.rope_problem() {
        // The weights would be right and the model wrong: refuse before writing anything.
        return Err(Error::config(
            model.path(),
            format!(
                "cannot give the model's rotary scaling in a config.json ({why}); transfers onto \
                 this file read its weights as they are"
            ),
        ));
    }
    let mut names: Vec<&str> = ckpt.names().collect();
    names.sort();
    let (names, fused) = super::fuse_experts::fuse(ckpt, names, ty)?;
    let mut tensors: Vec<(String, OutTensor<'_>)> = names
        .iter()
        .map(|&name| {
            let shape = ckpt.shape(name)?.to_vec();
            let (rows, cols) = (shape[0], shape[1..].iter().product::<usize>());
            let band = (BAND_VALUES / cols.max(1)).max(1);
            let out = OutTensor::streamed(ty, shape, move |sink| {
                for start in (0..rows).step_by(band) {
                    let values = ckpt.read_rows_f32(name, start..rows.min(start + band))?;
                    sink(&encode_f32(&values, ty))?;
                }
                Ok(())
            });
            Ok((name.to_string(), out))
        })
        .collect::<Result<_>>()?;
    tensors.extend(fused);
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let tracker = progress.start("convert", "tensors", tensors.len() as u64);
    write_sharded(dir, &tensors, (shard_limit, "pt"), &|_, _| {
        tracker.step();
        tracker.check()
    })?;
    tracker.finish();
    let mut config = model.config_json().clone();
    config["torch_dtype"] = ty.torch_name().into();
    write_json(&dir.join("config.json"), &config)?;
    if model.has_vocab() {
        write_json(&dir.join("tokenizer.json"), &tokenizer_json(model)?)?;
    }
    Ok(tensors.len())
}

/// A `tokenizer.json` of the GGUF's vocabulary: a BPE model with its tokens and merges, control
/// tokens as special added tokens, byte-level pre-tokenization for `gpt2` vocabularies.
fn tokenizer_json(model: &GgufModel) -> Result<Json> {
    let meta = model.metadata();
    let strings = |key: &str| -> Vec<&str> {
        meta.get(key)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default()
    };
    let tokens = strings("tokenizer.ggml.tokens");
    let types: Vec<u64> = meta
        .get("tokenizer.ggml.token_type")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
        .unwrap_or_default();
    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (id, &token) in tokens.iter().enumerate() {
        vocab.entry(token.to_string()).or_insert(id.into());
        let ty = types.get(id).copied().unwrap_or(1);
        if matches!(ty, 2 | 3 | 5) {
            added.push(json!({"id": id, "content": token, "special": true}));
        }
    }
    let byte_level = meta.get("tokenizer.ggml.model").and_then(Value::as_str) == Some("gpt2");
    let mut out = json!({
        "version": "1.0",
        "added_tokens": added,
        "model": {
            "type": "BPE",
            "vocab": vocab,
            "merges": strings("tokenizer.ggml.merges"),
        },
    });
    if byte_level {
        out["pre_tokenizer"] = json!({"type": "ByteLevel", "add_prefix_space": false});
        out["decoder"] = json!({"type": "ByteLevel"});
    }
    Ok(out)
}
