//! Quantized checkpoints, each weight presented under its Hugging Face name as the f32 values it
//! stands for and built from the rows read: FP8 weights times their scales ([`fp8`]), integers
//! or 4-bit floats packed beside their scales ([`packed`]: GPTQ, AWQ, compressed-tensors,
//! NVFP4), bitsandbytes' 4- and 8-bit weights ([`bnb`]) and MLX's affine and microscaled ones
//! ([`mlx`]). [`QuantizedWeights`] is what a checkpoint asks.

pub mod bnb;
pub mod fp8;
pub mod mlx;
mod mlx_latent;
mod mlx_params;
pub mod packed;
mod packed_layouts;

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use crate::error::Result;
use crate::io::safetensors::{FloatType, TensorFile};
use crate::io::RawBytes;

/// Every quantized weight of a safetensors checkpoint, whatever its format.
#[derive(Debug, Default)]
pub struct QuantizedWeights {
    fp8: fp8::Fp8Weights,
    packed: packed::PackedWeights,
    bnb: bnb::BnbWeights,
    mlx: mlx::MlxWeights,
    /// The stored tensors the weights are built from, found once.
    parts: HashSet<String>,
}

impl QuantizedWeights {
    /// The checkpoint's quantized weights, each found beside its parts and checked against them
    /// and the config's `quantization_config`. Besides headers, only small tensors are read:
    /// `g_idx`, NVFP4's tensor-wide scales, bitsandbytes' JSON states and int8 formats. A
    /// weight two formats claim is refused.
    pub fn find(
        config: &serde_json::Value,
        shards: &[TensorFile],
        index: &HashMap<String, usize>,
    ) -> Result<Self> {
        let fp8 = fp8::Fp8Weights::find(config, shards, index)?;
        let packed = packed::PackedWeights::find(config, shards, index)?;
        let bnb = bnb::BnbWeights::find(shards, index)?;
        let mlx = mlx::MlxWeights::find(config, shards, index)?;
        let claims = |name: &str| {
            [
                fp8.has(name),
                packed.has(name),
                bnb.has(name),
                mlx.has(name),
            ]
        };
        let mut names: Vec<&str> = fp8
            .names()
            .chain(packed.all_names())
            .chain(bnb.names())
            .chain(mlx.names())
            .collect();
        names.sort_unstable();
        if let Some(name) = names
            .into_iter()
            .find(|n| claims(n).iter().filter(|c| **c).count() > 1)
        {
            let file = index
                .get(name)
                .map_or(shards[0].path(), |&i| shards[i].path());
            return Err(crate::error::Error::bad_tensor(
                file,
                name,
                "stored in two quantized formats at once (FP8, packed, bitsandbytes, MLX)",
            ));
        }
        let parts = fp8
            .scales()
            .map(str::to_string)
            .chain(packed.parts())
            .chain(bnb.parts(index))
            .chain(mlx.parts())
            .collect();
        Ok(QuantizedWeights {
            fp8,
            packed,
            bnb,
            mlx,
            parts,
        })
    }

    /// True when `name` is a quantized weight (stored under its own name or not).
    pub fn has(&self, name: &str) -> bool {
        self.fp8.has(name) || self.packed.has(name) || self.bnb.has(name) || self.mlx.has(name)
    }

    /// `[out, in]` of a weight whose stored shape is not it (packed codes, bitsandbytes bytes,
    /// MLX words).
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.packed
            .shape(name)
            .or_else(|| self.bnb.shape(name))
            .or_else(|| self.mlx.shape(name))
    }

    /// The shard of a weight presented under a name no stored tensor has.
    pub fn shard(&self, name: &str) -> Option<usize> {
        self.packed.shard(name).or_else(|| self.mlx.shard(name))
    }

    /// The shards of the parts a weight's values are built from besides its codes.
    pub fn part_shards(&self, name: &str) -> Vec<usize> {
        let mut shards: Vec<usize> = self.fp8.scales_shard(name).into_iter().collect();
        shards.extend(self.packed.part_shards(name));
        shards.extend(self.bnb.part_shards(name));
        shards.extend(self.mlx.part_shards(name));
        shards
    }

    /// The stored tensors the weights are built from (a copy of the values leaves them out).
    pub fn parts(&self) -> &HashSet<String> {
        &self.parts
    }

    /// The weights presented under a name no stored tensor has.
    pub fn built_names(&self) -> Vec<&str> {
        self.packed.names().chain(self.mlx.built_names()).collect()
    }

    /// Rows `rows` of a quantized weight as f32 (row length too); None for any other tensor.
    pub fn read_rows(
        &self,
        name: &str,
        rows: Range<usize>,
        shards: &[TensorFile],
    ) -> Result<Option<(RawBytes<'static>, FloatType, usize)>> {
        if let Some(built) = self.fp8.read_rows(name, rows.clone(), shards)? {
            return Ok(Some(built));
        }
        if let Some(built) = self.packed.read_rows(name, rows.clone(), shards)? {
            return Ok(Some(built));
        }
        if let Some(built) = self.bnb.read_rows(name, rows.clone(), shards)? {
            return Ok(Some(built));
        }
        self.mlx.read_rows(name, rows, shards)
    }
}

/// One safetensors file of `tensors` in a fresh directory, opened, and its index (every tensor
/// in shard 0): what the readers' tests find weights in.
#[cfg(test)]
pub(crate) fn test_file<'t>(
    tensors: impl IntoIterator<Item = (&'t str, &'t crate::io::RawTensor)>,
) -> (tempfile::TempDir, Vec<TensorFile>, HashMap<String, usize>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    safetensors::serialize_to_file(tensors, None, &path).unwrap();
    let file = TensorFile::open(&path).unwrap();
    let index = file.names().map(|n| (n.to_string(), 0)).collect();
    (dir, vec![file], index)
}
