//! Writing tensors as a Hugging Face checkpoint: one `model.safetensors`, or
//! `model-0000i-of-0000N.safetensors` shards plus `model.safetensors.index.json` once the tensors
//! pass the shard limit, as `save_pretrained` does. Each tensor's bytes are produced while the
//! file is written (streamed where the tensor is), so memory holds a tensor or a piece of one;
//! synthetic models (`synth`) and converted GGUFs (`convert --gguf`) are written so.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;

use crate::error::{Error, Result};
use crate::io::safetensors::{self as st, FloatType, OutTensor, Sink};

/// Largest shard, in tensor bytes. Hugging Face's `max_shard_size` default is 5 GB; 2 GB keeps
/// every shard under the 2 GiB limits of some older loaders and file systems.
pub const SHARD_LIMIT: u64 = 2_000_000_000;

/// The file of an unsharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One tensor to be written: name, shape and storage type (the bytes come later).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: FloatType,
}

impl PlannedTensor {
    /// Bytes of the tensor's data.
    pub fn bytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.ty.size() as u64
    }
}

/// Shard index of each tensor, filling shards in order and opening a new one when the next tensor
/// would push the current one past `limit`. Tensors are never split, so a tensor larger than
/// `limit` gets a shard of its own.
pub fn assign_shards(sizes: &[u64], limit: u64) -> Vec<usize> {
    let mut shard = 0;
    let mut used = 0u64;
    sizes
        .iter()
        .map(|&size| {
            if used > 0 && used + size > limit {
                shard += 1;
                used = 0;
            }
            used += size;
            shard
        })
        .collect()
}

/// File names of `n` shards: `model.safetensors` when `n == 1`, else HF's numbered names.
pub fn shard_names(n: usize) -> Vec<String> {
    if n == 1 {
        return vec![SINGLE_FILE.to_string()];
    }
    (1..=n)
        .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
        .collect()
}

/// Writes `tensors` into `out_dir` (which must exist), shard by shard, calling `produce` with
/// each tensor and a sink for its little-endian bytes just before it is written, and
/// `progress(done, total)` in bytes after each one. An error `produce` returns stops the write
/// (the caller stages the output directory and throws it away on error).
pub fn write_tensors(
    out_dir: &Path,
    tensors: &[PlannedTensor],
    limit: u64,
    format: &str,
    produce: impl Fn(&PlannedTensor, Sink<'_>) -> Result<()>,
    progress: impl Fn(u64, u64),
) -> Result<()> {
    let produce = &produce;
    let out: Vec<(String, OutTensor<'_>)> = tensors
        .iter()
        .map(|t| {
            let tensor = OutTensor::streamed(t.ty, t.shape.clone(), move |sink| produce(t, sink));
            (t.name.clone(), tensor)
        })
        .collect();
    let total = out.iter().map(|(_, t)| t.data_len() as u64).sum();
    progress(0, total);
    write_sharded(out_dir, &out, (limit, format), &|done, total| {
        progress(done, total);
        Ok(())
    })
}

/// Writes `tensors` (in their order) into `out_dir` (which must exist) as one file or shards of
/// at most `limit` bytes of data (a larger tensor alone in its shard), with the index; calls
/// `after_each(done, total)` in bytes after each tensor: its error (a cancel) stops the write.
pub fn write_sharded(
    out_dir: &Path,
    tensors: &[(String, OutTensor<'_>)],
    (limit, format): (u64, &str),
    after_each: &dyn Fn(u64, u64) -> Result<()>,
) -> Result<()> {
    let sizes: Vec<u64> = tensors.iter().map(|(_, t)| t.data_len() as u64).collect();
    let total: u64 = sizes.iter().sum();
    let shard_of = assign_shards(&sizes, limit);
    let n_shards = shard_of.last().map_or(1, |s| s + 1);
    let names = shard_names(n_shards);
    let done = Cell::new(0u64);
    let mut first = 0;
    for (shard, file_name) in names.iter().enumerate() {
        let count = shard_of[first..]
            .iter()
            .take_while(|&&s| s == shard)
            .count();
        let members = &tensors[first..first + count];
        st::write_file_reporting(
            &out_dir.join(file_name),
            members,
            st::metadata_with_format(format),
            &|bytes| {
                done.set(done.get() + bytes as u64);
                after_each(done.get(), total)
            },
        )?;
        first += count;
    }
    if n_shards > 1 {
        let weight_map: BTreeMap<&str, &str> = tensors
            .iter()
            .zip(&shard_of)
            .map(|((name, _), &s)| (name.as_str(), names[s].as_str()))
            .collect();
        let index = json!({
            "metadata": { "total_size": total },
            "weight_map": weight_map,
        });
        write_json(&out_dir.join(INDEX_FILE), &index)?;
    }
    Ok(())
}

/// Writes a JSON value as pretty-printed text with a trailing newline, as `save_pretrained` does.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values always serialize");
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, "cannot write", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_fill_in_order_and_never_split() {
        // limit 10: [4, 4] | [3, 6] | [12] | [1]
        let shards = assign_shards(&[4, 4, 3, 6, 12, 1], 10);
        assert_eq!(shards, vec![0, 0, 1, 1, 2, 3]);
        // Everything fits: one shard.
        assert_eq!(assign_shards(&[1, 2, 3], 6), vec![0, 0, 0]);
        // A tensor above the limit first: alone in shard 0.
        assert_eq!(assign_shards(&[20, 1, 1], 10), vec![0, 1, 1]);
        assert!(assign_shards(&[], 10).is_empty());
    }

    #[test]
    fn shard_file_names_follow_hf() {
        assert_eq!(shard_names(1), vec!["model.safetensors"]);
        assert_eq!(
            shard_names(2),
            vec![
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );
    }

    #[test]
    fn sharded_write_opens_as_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let tensors: Vec<PlannedTensor> = (0..5)
            .map(|i| PlannedTensor {
                name: format!("t{i}"),
                shape: vec![4, 8],
                ty: FloatType::F32,
            })
            .collect();
        // 128 bytes each, limit 300: shards of 2, 2, 1.
        let calls = Cell::new(0);
        write_tensors(
            dir.path(),
            &tensors,
            300,
            "pt",
            |t, sink| {
                sink(&st::encode_f32(
                    &[t.name[1..].parse::<f32>().unwrap(); 32],
                    t.ty,
                ))
            },
            |done, total| {
                calls.set(calls.get() + 1);
                assert!(done <= total && total == 640);
            },
        )
        .unwrap();
        assert_eq!(calls.get(), 6);
        assert!(dir
            .path()
            .join("model-00003-of-00003.safetensors")
            .is_file());
        let config = r#"{"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 8,
            "intermediate_size": 8, "num_attention_heads": 1}"#;
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        let ckpt = crate::io::checkpoint::Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ckpt.names().count(), 5);
        assert_eq!(ckpt.read_rows_f32("t3", 1..2).unwrap(), vec![3.0; 8]);
        let index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(INDEX_FILE)).unwrap())
                .unwrap();
        assert_eq!(index["metadata"]["total_size"], 640);
        assert_eq!(
            index["weight_map"]["t4"],
            "model-00003-of-00003.safetensors"
        );
    }

    #[test]
    fn an_error_stops_the_write_at_its_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let tensors: Vec<PlannedTensor> = (0..4)
            .map(|i| PlannedTensor {
                name: format!("t{i}"),
                shape: vec![8],
                ty: FloatType::F32,
            })
            .collect();
        let produced = Cell::new(0);
        let e = write_tensors(
            dir.path(),
            &tensors,
            40,
            "pt",
            |t, sink| {
                produced.set(produced.get() + 1);
                match t.name.as_str() {
                    "t2" => Err(Error::bad_tensor(dir.path(), &t.name, "unreadable")),
                    _ => sink(&[0u8; 32]),
                }
            },
            |_, _| {},
        )
        .unwrap_err();
        assert!(e.to_string().contains("unreadable"), "{e}");
        // t3 is never asked for, and the shard holding t2 is not left behind.
        assert_eq!(produced.get(), 3);
        assert!(!dir.path().join("model-00003-of-00004.safetensors").exists());
    }
}
