//! Writing a list of lazily produced tensors as a Hugging Face checkpoint: one
//! `model.safetensors`, or `model-0000i-of-0000N.safetensors` shards plus
//! `model.safetensors.index.json` once the tensors pass the shard limit, as `save_pretrained`
//! does. Tensors are produced one at a time while the file is written, so memory holds one tensor.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;

use crate::error::{Error, Result};
use crate::io::safetensors::{self as st, FloatType, OutTensor};

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

/// Writes `tensors` into `out_dir` (which must exist), shard by shard, calling `produce` for the
/// little-endian bytes of each tensor just before it is written, and `progress(done, total)` in
/// bytes after each one. The first error `produce` returns is returned once the current shard is
/// closed (that shard's file then holds zeros where the failed tensor was; the caller stages the
/// output directory and throws it away on error).
pub fn write_tensors(
    out_dir: &Path,
    tensors: &[PlannedTensor],
    limit: u64,
    produce: impl Fn(&PlannedTensor) -> Result<Vec<u8>>,
    progress: impl Fn(u64, u64),
) -> Result<()> {
    let sizes: Vec<u64> = tensors.iter().map(PlannedTensor::bytes).collect();
    let total: u64 = sizes.iter().sum();
    let shard_of = assign_shards(&sizes, limit);
    let n_shards = shard_of.last().map_or(1, |s| s + 1);
    let names = shard_names(n_shards);

    let done = Cell::new(0u64);
    let failure: RefCell<Option<Error>> = RefCell::new(None);
    progress(0, total);
    for (shard, file_name) in names.iter().enumerate() {
        let members = tensors
            .iter()
            .zip(&shard_of)
            .filter(|(_, &s)| s == shard)
            .map(|(t, _)| {
                let bytes = t.bytes();
                let (produce, progress, done, failure) = (&produce, &progress, &done, &failure);
                let out = OutTensor::lazy(t.ty, t.shape.clone(), move || {
                    let data = if failure.borrow().is_some() {
                        None
                    } else {
                        match produce(t) {
                            Ok(data) if data.len() as u64 == bytes => Some(data),
                            Ok(data) => {
                                *failure.borrow_mut() = Some(Error::bad_tensor(
                                    out_dir,
                                    &t.name,
                                    format!("produced {} bytes, expected {bytes}", data.len()),
                                ));
                                None
                            }
                            Err(e) => {
                                *failure.borrow_mut() = Some(e);
                                None
                            }
                        }
                    };
                    done.set(done.get() + bytes);
                    progress(done.get(), total);
                    // The writer cannot be told to stop: keep the file well-formed with zeros.
                    data.unwrap_or_else(|| vec![0u8; bytes as usize])
                });
                (t.name.clone(), out)
            })
            .collect::<Vec<_>>();
        st::write_file(&out_dir.join(file_name), &members, st::pt_metadata())?;
        if let Some(e) = failure.borrow_mut().take() {
            return Err(e);
        }
    }

    if n_shards > 1 {
        let weight_map: BTreeMap<&str, &str> = tensors
            .iter()
            .zip(&shard_of)
            .map(|(t, &s)| (t.name.as_str(), names[s].as_str()))
            .collect();
        let index = json!({
            "metadata": { "total_size": total },
            "weight_map": weight_map,
        });
        let path = out_dir.join(INDEX_FILE);
        let text = serde_json::to_string_pretty(&index).expect("JSON values always serialize");
        std::fs::write(&path, text + "\n").map_err(|e| Error::io(&path, "cannot write", e))?;
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
            |t| {
                Ok(st::encode_f32(
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
}
