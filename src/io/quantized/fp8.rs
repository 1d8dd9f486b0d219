//! FP8 checkpoints: a projection's `weight` stored as F8_E4M3 beside a scale it is multiplied by,
//! as the releases that ship only in FP8 store it (DeepSeek-V3/R1, Kimi K2, and the Qwen3, GLM-4.5
//! and MiniMax "-FP8" checkpoints: `quant_method: fp8` with `weight_block_size` [128, 128] and a
//! `weight_scale_inv` of one value per block; compressed-tensors' FP8 with a `weight_scale` per
//! block or group its config groups give, per output row, or for the whole tensor). The weight
//! is presented under its own name as its f32 values, `w[i, j] · scale[i / bi, j / bj]` in f32
//! (both names are multiplied by: DeepSeek's `weight_dequant` does so with `weight_scale_inv`),
//! built from the rows asked for when they are read, as a fused expert's weight is: a
//! decomposition takes it whole, four bytes a value where the file holds one.

use std::collections::HashMap;
use std::ops::Range;

use rayon::prelude::*;
use safetensors::Dtype;

use crate::error::{Error, Result};
use crate::io::safetensors::{decode_f32, FloatType, TensorFile};
use crate::io::RawBytes;

/// The scale tensors' names beside `<module>.weight`, in the order they are looked for.
const SCALE_SUFFIXES: [&str; 2] = ["_scale_inv", "_scale"];

/// Every FP8 weight of a checkpoint, by name.
#[derive(Debug, Default)]
pub struct Fp8Weights {
    weights: HashMap<String, Fp8>,
}

/// One FP8 weight and its scale.
#[derive(Debug, Clone)]
struct Fp8 {
    shard: usize,
    scale: String,
    scale_shard: usize,
    /// Rows and columns of the weight that share one scale.
    block: [usize; 2],
    /// `[out, in]`.
    shape: [usize; 2],
}

/// `[rows, columns]` of a JSON pair of positive integers.
fn pair(v: &serde_json::Value) -> Option<[usize; 2]> {
    let b = match v.as_array()?.as_slice() {
        [r, c] => [r.as_u64()? as usize, c.as_u64()? as usize],
        _ => return None,
    };
    (b[0] > 0 && b[1] > 0).then_some(b)
}

/// The block of compressed-tensors' float-quantized weights, where its config groups give one:
/// `block_structure` of the `block` strategy (`[128, 128]` in its FP8-block schemes), or one row
/// of `group_size` columns of the `group` strategy. Config groups that disagree give none (the
/// scales' shapes then must be one value or one per row).
fn compressed_block(quant: &serde_json::Value) -> Option<[usize; 2]> {
    let groups = quant["config_groups"].as_object()?;
    let blocks: Vec<Option<[usize; 2]>> = groups
        .values()
        .map(|g| &g["weights"])
        .filter(|w| w["type"].as_str() == Some("float"))
        .map(|w| match w["strategy"].as_str()? {
            "block" => pair(&w["block_structure"]),
            "group" => Some([1, w["group_size"].as_u64().filter(|&g| g > 0)? as usize]),
            _ => None,
        })
        .collect();
    match blocks.as_slice() {
        [Some(first), rest @ ..] if rest.iter().all(|b| *b == Some(*first)) => Some(*first),
        _ => None,
    }
}

impl Fp8Weights {
    /// The checkpoint's FP8 weights, each with its scale tensor and block, checked against the
    /// config's `quantization_config.weight_block_size` where it gives one (else the scale's
    /// shape says: one value, or one per row).
    pub fn find(
        config: &serde_json::Value,
        shards: &[TensorFile],
        index: &HashMap<String, usize>,
    ) -> Result<Self> {
        let quant = &config["quantization_config"];
        let block_size = pair(&quant["weight_block_size"]).or_else(|| compressed_block(quant));
        let mut weights = HashMap::new();
        for (name, &shard) in index {
            let file = &shards[shard];
            let Some(entry) = file.entry(name) else {
                continue;
            };
            let bad = |reason: String| Error::bad_tensor(file.path(), name, reason);
            match entry.dtype {
                Dtype::F8_E4M3 => {}
                Dtype::F8_E5M2
                | Dtype::F8_E4M3FNUZ
                | Dtype::F8_E5M2FNUZ
                | Dtype::F8_E8M0
                | Dtype::F4
                | Dtype::F6_E2M3
                | Dtype::F6_E3M2
                    if name.ends_with(".weight") =>
                {
                    return Err(bad(format!(
                        "stored as {:?}; of the 8-bit float weights only F8_E4M3 (with its \
                         scale) is read",
                        entry.dtype
                    )));
                }
                _ => continue,
            }
            let shape = match entry.shape.as_slice() {
                &[out, inn] if name.ends_with(".weight") => [out, inn],
                _ => continue,
            };
            let found = SCALE_SUFFIXES
                .iter()
                .map(|s| format!("{name}{s}"))
                .find_map(|scale| Some((index.get(&scale).copied()?, scale)));
            let Some((scale_shard, scale)) = found else {
                return Err(bad(format!(
                    "an F8_E4M3 weight without its scale (`{name}_scale_inv` or \
                     `{name}_scale`)"
                )));
            };
            let scale_entry = shards[scale_shard].entry(&scale).expect("indexed");
            if FloatType::from_dtype(scale_entry.dtype).is_none() {
                return Err(Error::bad_tensor(
                    shards[scale_shard].path(),
                    &scale,
                    format!("a scale stored as {:?}, not a float", scale_entry.dtype),
                ));
            }
            let scales = &scale_entry.shape;
            let count: usize = scales.iter().product();
            let [out, inn] = shape;
            let block = match (block_size, scales.as_slice()) {
                (Some([br, bc]), &[r, c]) if r == out.div_ceil(br) && c == inn.div_ceil(bc) => {
                    [br, bc]
                }
                // (At least one column a block: a weight without columns has nothing to scale.)
                (None, _) if count == 1 => [out.max(1), inn.max(1)],
                (None, &[r] | &[r, 1]) if r == out => [1, inn.max(1)],
                _ => {
                    return Err(Error::bad_tensor(
                        shards[scale_shard].path(),
                        &scale,
                        format!(
                            "shape {scales:?} does not scale `{name}` {shape:?}: expected one \
                             value per {} block{}",
                            match block_size {
                                Some([br, bc]) => format!("{br} × {bc}"),
                                None => "row, or one".to_string(),
                            },
                            match block_size {
                                Some(_) => {
                                    " (quantization_config.weight_block_size, or its config \
                                     groups' block_structure or group_size)"
                                }
                                None => " for the whole tensor",
                            }
                        ),
                    ))
                }
            };
            let weight = Fp8 {
                shard,
                scale,
                scale_shard,
                block,
                shape,
            };
            weights.insert(name.clone(), weight);
        }
        Ok(Fp8Weights { weights })
    }

    pub fn has(&self, name: &str) -> bool {
        self.weights.contains_key(name)
    }

    /// The FP8 weights, by name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.weights.keys().map(String::as_str)
    }

    /// The shard holding an FP8 weight's scale.
    pub fn scales_shard(&self, name: &str) -> Option<usize> {
        self.weights.get(name).map(|w| w.scale_shard)
    }

    /// The scale tensors, by name.
    pub fn scales(&self) -> impl Iterator<Item = &str> {
        self.weights.values().map(|w| w.scale.as_str())
    }

    /// Rows `rows` of an FP8 weight as f32 (row length too), NaN and Inf refused, naming the
    /// weight and where the value lies; None where `name` is no FP8 weight.
    pub fn read_rows(
        &self,
        name: &str,
        rows: Range<usize>,
        shards: &[TensorFile],
    ) -> Result<Option<(RawBytes<'static>, FloatType, usize)>> {
        let Some(w) = self.weights.get(name) else {
            return Ok(None);
        };
        let file = &shards[w.shard];
        let [out, cols] = w.shape;
        crate::io::check_rows(file.path(), name, &rows, out, cols)?;
        let codes = file.bytes(name).expect("indexed");
        let scale_file = &shards[w.scale_shard];
        let scale_entry = scale_file.entry(&w.scale).expect("indexed");
        let ty = FloatType::from_dtype(scale_entry.dtype).expect("checked when found");
        let [br, bc] = w.block;
        let scale_cols = cols.div_ceil(bc);
        // Only the scale rows of the rows read (a model's map reads rows one at a time).
        let first = rows.start / br;
        let bytes = scale_file.bytes(&w.scale).expect("indexed");
        let scale_bytes =
            first * scale_cols * ty.size()..rows.end.div_ceil(br) * scale_cols * ty.size();
        let scales = decode_f32(&bytes[scale_bytes], ty);
        let mut values = vec![0f32; rows.len() * cols];
        values
            .par_chunks_mut(cols.max(1))
            .zip(rows.clone())
            .for_each(|(row, i)| {
                let stored = &codes[i * cols..(i + 1) * cols];
                let row_scales = &scales[(i / br - first) * scale_cols..][..scale_cols];
                for (j, (v, &code)) in row.iter_mut().zip(stored).enumerate() {
                    *v = e4m3(code) * row_scales[j / bc];
                }
            });
        if let Some(at) = values.iter().position(|v| !v.is_finite()) {
            let (i, j) = (rows.start + at / cols, at % cols);
            return Err(Error::bad_tensor(
                file.path(),
                name,
                format!(
                    "the non-finite value {} at row {i}, column {j} (FP8 code {:#04x} times \
                     `{}` = {})",
                    values[at],
                    codes[i * cols + j],
                    w.scale,
                    scales[(i / br - first) * scale_cols + j / bc]
                ),
            ));
        }
        Ok(Some((RawBytes::Decoded(values), FloatType::F32, cols)))
    }
}

/// An F8_E4M3 value (OCP FP8, "fn": no infinities, NaN at S.1111.111): sign, four exponent
/// bits of bias 7, three mantissa bits; exponent 0 is subnormal, m · 2^−9.
pub fn e4m3(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let (exponent, mantissa) = ((code >> 3) & 0x0f, code & 0x07);
    let magnitude = match (exponent, mantissa) {
        (0x0f, 0x07) => return f32::NAN,
        (0, m) => m as f32 * (-9f32).exp2(),
        (e, m) => (1.0 + m as f32 / 8.0) * (e as f32 - 7.0).exp2(),
    };
    sign * magnitude
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::io::RawTensor as Raw;

    /// A file of `w.weight` `[4, 6]` as `dtype` (codes 0x38 = 1.0, one `nan_at` 0x7f) and
    /// `w.weight_scale_inv` of `scale_shape` (all 2.0), opened with `config`.
    fn open(
        dtype: Dtype,
        scale_shape: Vec<usize>,
        nan_at: Option<usize>,
        config: serde_json::Value,
    ) -> (tempfile::TempDir, Vec<TensorFile>, Result<Fp8Weights>) {
        let dir = tempfile::tempdir().unwrap();
        let mut codes = vec![0x38u8; 24];
        if let Some(at) = nan_at {
            codes[at] = 0x7f;
        }
        let n: usize = scale_shape.iter().product();
        let scales: Vec<u8> = (0..n).flat_map(|_| 2f32.to_le_bytes()).collect();
        let tensors = [
            ("w.weight", Raw(dtype, vec![4, 6], codes)),
            ("w.weight_scale_inv", Raw(Dtype::F32, scale_shape, scales)),
        ];
        let path = dir.path().join("model.safetensors");
        let views = tensors.iter().map(|(n, t)| (*n, t));
        safetensors::serialize_to_file(views, None, &path).unwrap();
        let file = TensorFile::open(&path).unwrap();
        let index = file.names().map(|n| (n.to_string(), 0)).collect();
        let shards = vec![file];
        let found = Fp8Weights::find(&config, &shards, &index);
        (dir, shards, found)
    }

    #[test]
    fn weights_read_times_their_scale_and_bad_ones_are_named() {
        let blocks = serde_json::json!({"quantization_config": {"weight_block_size": [2, 4]}});
        let (_dir, shards, found) = open(Dtype::F8_E4M3, vec![2, 2], None, blocks.clone());
        let (bytes, ty, cols) = found
            .unwrap()
            .read_rows("w.weight", 1..3, &shards)
            .unwrap()
            .unwrap();
        assert_eq!((ty, cols), (FloatType::F32, 6));
        assert_eq!(decode_f32(&bytes, ty), vec![2.0; 12]);
        // One scale for the whole tensor, without a block size.
        let whole = serde_json::json!({});
        let (_dir, shards, found) = open(Dtype::F8_E4M3, vec![1], None, whole.clone());
        assert!(found.unwrap().read_rows("w.weight", 0..4, &shards).is_ok());
        // compressed-tensors' block and group strategies, their block in the config groups.
        let weights = |w: serde_json::Value| {
            serde_json::json!({"quantization_config": {"quant_method": "compressed-tensors",
                "config_groups": {"group_0": {"weights": w}}}})
        };
        let ct_block = weights(serde_json::json!(
            {"type": "float", "strategy": "block", "block_structure": [2, 4]}));
        let ct_group = weights(serde_json::json!(
            {"type": "float", "strategy": "group", "group_size": 3}));
        for (config, scales) in [(ct_block, vec![2, 2]), (ct_group, vec![4, 2])] {
            let (_dir, shards, found) = open(Dtype::F8_E4M3, scales, None, config);
            let (bytes, ty, _) = found
                .unwrap()
                .read_rows("w.weight", 0..4, &shards)
                .unwrap()
                .unwrap();
            assert_eq!(decode_f32(&bytes, ty), vec![2.0; 24]);
        }
        // A scale of the wrong shape for the block.
        let (_dir, _, found) = open(Dtype::F8_E4M3, vec![2, 1], None, blocks.clone());
        let e = found.unwrap_err().to_string();
        assert!(
            e.contains("w.weight_scale_inv") && e.contains("2 × 4 block"),
            "{e}"
        );
        // A NaN code, named with its row and column.
        let (_dir, shards, found) = open(Dtype::F8_E4M3, vec![2, 2], Some(15), blocks.clone());
        let e = found
            .unwrap()
            .read_rows("w.weight", 0..4, &shards)
            .unwrap_err();
        assert!(e.to_string().contains("row 2, column 3"), "{e}");
        // Another 8-bit format.
        let (_dir, _, found) = open(Dtype::F8_E5M2, vec![2, 2], None, blocks);
        let e = found.unwrap_err().to_string();
        assert!(e.contains("F8_E5M2") && e.contains("w.weight"), "{e}");
    }

    #[test]
    fn e4m3_codes_read_as_the_format_defines_them() {
        assert_eq!(e4m3(0x38), 1.0);
        assert_eq!(e4m3(0xb8), -1.0);
        assert_eq!(e4m3(0x7e), 448.0); // the largest
        assert_eq!(e4m3(0x01), 2f32.powi(-9)); // the smallest subnormal
        assert_eq!(e4m3(0x08), 2f32.powi(-6)); // the smallest normal
        assert_eq!(e4m3(0x3c), 1.5);
        assert!(e4m3(0x80) == 0.0 && e4m3(0x80).is_sign_negative());
        assert!(e4m3(0x7f).is_nan() && e4m3(0xff).is_nan());
        // Every other code is finite and the codes of one sign increase.
        let positive: Vec<f32> = (0..0x7f).map(e4m3).collect();
        assert!(positive.windows(2).all(|w| w[0] < w[1]));
    }
}
