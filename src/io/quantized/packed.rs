//! Packed checkpoints: a projection stored as small integers packed into int32 words beside a
//! scale (and a zero point) per group of inputs, as the quantized releases most served models
//! come in, or as 4-bit floats two a byte (NVFP4). Three integer layouts are read, each under
//! `quantization_config.quant_method`, and NVFP4 from the tensors' types:
//!
//! - `gptq` (AutoGPTQ, GPTQModel, optimum; `checkpoint_format` `gptq` or `gptq_v2`): `qweight`
//!   `[in·bits/32, out]`, input `i`'s code in word `i / (32/bits)` at bit `bits·(i mod 32/bits)`;
//!   `qzeros` `[groups, out·bits/32]` packed the same way along the outputs, stored one less than
//!   the zero point in the `gptq` format (the `gptq_v2` format stores it as it is); `scales`
//!   `[groups, out]`; `g_idx` `[in]`, input `i`'s group (activation order), else `i / group_size`.
//!   2, 4 and 8 bits.
//! - `awq` (AutoAWQ's GEMM layout, `version: gemm`): `qweight` `[in, out/8]` and `qzeros`
//!   `[groups, out/8]`, eight 4-bit codes a word along the outputs in AutoAWQ's order (word `w`'s
//!   nibble `k` holds output `8w + [0, 2, 4, 6, 1, 3, 5, 7][k]`); `scales` `[groups, out]`.
//! - `compressed-tensors` with the `pack-quantized` format (llm-compressor's W4A16, W8A16):
//!   `weight_packed` `[out, ⌈in·bits/32⌉]`, each row's codes a dense little-endian bit stream
//!   (code `i` at bit `i·bits`), stored plus `2^(bits−1)`; 1, 2, 4 or 8 bits, the widths its
//!   versions lay out alike (older ones put whole codes in a word, newer ones cross words);
//!   `weight_shape` `[out, in]`; `weight_scale` `[out, groups]` (`[out, 1]` per channel, one value
//!   for the tensor); an asymmetric scheme's `weight_zero_point` `[⌈out·bits/32⌉, groups]` packed
//!   the same way down the outputs (or unpacked int8 `[out, groups]`, as older versions wrote);
//!   `weight_g_idx` where present.
//!
//! - NVFP4, compressed-tensors' `nvfp4-pack-quantized` (`weight_packed`) and NVIDIA ModelOpt's
//!   (`weight` itself): U8 `[out, in/2]`, two E2M1 codes a byte, the first in the low nibble;
//!   an F8_E4M3 `weight_scale` `[out, in/16]`; one f32 for the tensor, compressed-tensors'
//!   `weight_global_scale` (the group's scale is divided by it, as its dequantization does) or
//!   ModelOpt's `weight_scale_2` (the E2M1 · E4M3 product, exact in f32, is multiplied by it,
//!   as llama.cpp applies it).
//!
//! An integer weight is presented under `<module>.weight`, `[out, in]`, as the f32 values
//! `(code − zero) · scale`: exact in f32 for 16-bit scales (a code difference of at most 8 bits
//! times an 11-bit significand), where the libraries' own dequantization computes in the scale's 16-bit type and
//! rounds. It is built from the rows asked for when they are read, as an FP8 weight is
//! ([`super::fp8`]).

use std::collections::HashMap;
use std::ops::Range;

use rayon::prelude::*;
use safetensors::Dtype;

use super::packed_layouts::{compressed, gptq_or_awq, nvfp4};
use crate::error::{Error, Result};
use crate::io::safetensors::{decode_f32, FloatType, TensorFile};
use crate::io::RawBytes;

/// AutoAWQ's order of a word's eight outputs: nibble `k` holds output `AWQ_ORDER[k]`.
const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// Every packed weight of a checkpoint, by the name it is presented under.
#[derive(Debug, Default)]
pub struct PackedWeights {
    weights: HashMap<String, Packed>,
}

/// How the codes and zero points lie in their words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Layout {
    /// `zero_offset`: the stored zero point is one less than the zero point (`gptq` format).
    Gptq {
        zero_offset: bool,
    },
    Awq,
    CompressedTensors,
    /// NVFP4: two E2M1 codes a byte (the first in the low nibble), an F8_E4M3 scale per group
    /// of 16 inputs, and a tensor-wide f32 scale the values are divided by (`divides`,
    /// compressed-tensors' `weight_global_scale`) or multiplied by (ModelOpt's `weight_scale_2`).
    Nvfp4 {
        divides: bool,
    },
}

/// A stored tensor: its shard and name.
#[derive(Debug, Clone)]
pub(super) struct Part {
    pub shard: usize,
    pub name: String,
}

/// One packed weight: where its parts are and how they are laid out.
#[derive(Debug, Clone)]
pub(super) struct Packed {
    pub layout: Layout,
    pub bits: usize,
    pub codes: Part,
    pub scales: Part,
    pub zeros: Option<Part>,
    /// compressed-tensors' older unpacked int8 zero points `[out, groups]`.
    pub zeros_unpacked: bool,
    pub g_idx: Option<Part>,
    /// `[out, in]`.
    pub shape: [usize; 2],
    pub groups: usize,
    /// Inputs a group, where there is no `g_idx`.
    pub group: usize,
    /// The scale has one row for the whole tensor (compressed-tensors' tensor strategy).
    pub one_scale_row: bool,
    /// NVFP4's tensor-wide scale, and the activations' scale stored beside (which no value
    /// needs; a copy of the weights' values leaves it out).
    pub global: Option<Part>,
    pub activation: Option<Part>,
    /// NVFP4's tensor-wide scale's value (1 for the other layouts), read when found.
    pub after: f32,
    /// compressed-tensors' `weight_shape`, which the shape and width are read from.
    pub shape_part: Option<Part>,
    /// Each input's group where a `g_idx` gives them (read and checked when found, so that a
    /// row read does not decode it again).
    pub group_of: Option<std::sync::Arc<[u32]>>,
}

/// The 32-bit words of an int32 tensor.
pub(super) fn word(bytes: &[u8], k: usize) -> u32 {
    u32::from_le_bytes(bytes[4 * k..4 * k + 4].try_into().expect("four bytes"))
}

/// `bits` bits of the little-endian stream of words `at(0), at(1), …` starting at bit `bit`.
pub(super) fn stream(at: impl Fn(usize) -> u32, bit: usize, bits: usize) -> u32 {
    let (w, off) = (bit / 32, bit % 32);
    let mut v = (at(w) as u64) >> off;
    if off + bits > 32 {
        v |= (at(w + 1) as u64) << (32 - off);
    }
    (v & ((1u64 << bits) - 1)) as u32
}

/// An E2M1 code (the low four bits of `code`): sign, two exponent bits, one mantissa bit.
pub(super) fn e2m1(code: u8) -> f32 {
    const MAGNITUDES: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
    let m = MAGNITUDES[(code & 7) as usize];
    if code & 8 != 0 {
        -m
    } else {
        m
    }
}

/// Values `range` of a float tensor as f32 (its type checked when the weight was found).
pub(super) fn read_f32_range(shards: &[TensorFile], p: &Part, range: Range<usize>) -> Vec<f32> {
    let file = &shards[p.shard];
    let ty = FloatType::from_dtype(file.entry(&p.name).expect("indexed").dtype)
        .expect("checked when found");
    let bytes = file.bytes(&p.name).expect("indexed");
    decode_f32(&bytes[range.start * ty.size()..range.end * ty.size()], ty)
}

/// An error naming a part's file and tensor.
pub(super) fn bad(shards: &[TensorFile], p: &Part, reason: String) -> Error {
    Error::bad_tensor(shards[p.shard].path(), &p.name, reason)
}

/// An integer tensor's values (the `g_idx`, the `weight_shape`).
pub(super) fn ints(file: &TensorFile, name: &str) -> Result<Vec<i64>> {
    let entry = file.entry(name).expect("indexed");
    let bytes = file.bytes(name).expect("indexed");
    let width = match entry.dtype {
        Dtype::I64 | Dtype::U64 => 8,
        Dtype::I32 | Dtype::U32 => 4,
        Dtype::I16 | Dtype::U16 => 2,
        Dtype::I8 | Dtype::U8 => 1,
        other => {
            return Err(Error::bad_tensor(
                file.path(),
                name,
                format!("stored as {other:?}, not an integer type"),
            ))
        }
    };
    let signed = matches!(
        entry.dtype,
        Dtype::I64 | Dtype::I32 | Dtype::I16 | Dtype::I8
    );
    Ok(bytes
        .chunks_exact(width)
        .map(|c| {
            let mut b = [0u8; 8];
            b[..width].copy_from_slice(c);
            let raw = u64::from_le_bytes(b);
            match signed {
                true => ((raw << (64 - 8 * width)) as i64) >> (64 - 8 * width),
                false => raw as i64,
            }
        })
        .collect())
}

/// What the config says of the packed weights.
pub(super) struct Scheme<'c> {
    pub method: &'c str,
    pub config: &'c serde_json::Value,
}

impl Scheme<'_> {
    pub(super) fn usize_of(&self, keys: &[&str]) -> Option<i64> {
        keys.iter().find_map(|k| self.config[*k].as_i64())
    }

    pub(super) fn str_of(&self, keys: &[&str]) -> Option<&str> {
        keys.iter().find_map(|k| self.config[*k].as_str())
    }

    /// The group size the compressed-tensors config groups name, where they agree on one.
    pub(super) fn group_size(&self) -> Option<usize> {
        let groups = self.config["config_groups"].as_object()?;
        let sizes: Vec<u64> = groups
            .values()
            .filter_map(|g| g["weights"]["group_size"].as_u64())
            .filter(|&g| g > 0)
            .collect();
        match sizes.as_slice() {
            [first, rest @ ..] if rest.iter().all(|g| g == first) => Some(*first as usize),
            _ => None,
        }
    }

    /// The bit widths the compressed-tensors config groups name.
    pub(super) fn group_bits(&self) -> Vec<usize> {
        let groups = self.config["config_groups"].as_object();
        groups
            .into_iter()
            .flat_map(|g| g.values())
            .filter_map(|g| g["weights"]["num_bits"].as_u64().map(|b| b as usize))
            .collect()
    }
}

impl PackedWeights {
    /// The checkpoint's packed weights, their parts found beside them and checked against each
    /// other's shapes and the config's `quantization_config` (no tensor data is read).
    pub fn find(
        config: &serde_json::Value,
        shards: &[TensorFile],
        index: &HashMap<String, usize>,
    ) -> Result<Self> {
        let quant = &config["quantization_config"];
        let scheme = Scheme {
            method: quant["quant_method"].as_str().unwrap_or(""),
            config: quant,
        };
        let stored_dtype = |name: &str| shards[index[name]].entry(name).expect("indexed").dtype;
        let mut weights = HashMap::new();
        let mut names: Vec<&String> = index.keys().collect();
        names.sort();
        for name in names {
            let found = if let Some(module) = name.strip_suffix(".qweight") {
                Some((
                    format!("{module}.weight"),
                    gptq_or_awq(module, &scheme, shards, index)?,
                ))
            } else if let Some(weight) = name.strip_suffix("_packed") {
                let packed = match stored_dtype(name) {
                    Dtype::U8 => nvfp4(weight, name, shards, index)?,
                    _ => compressed(weight, &scheme, shards, index)?,
                };
                Some((weight.to_string(), packed))
            } else if name.ends_with(".weight")
                && stored_dtype(name) == Dtype::U8
                && index
                    .get(&format!("{name}_scale"))
                    .is_some_and(|_| stored_dtype(&format!("{name}_scale")) == Dtype::F8_E4M3)
            {
                Some((name.to_string(), nvfp4(name, name, shards, index)?))
            } else {
                None
            };
            if let Some((weight, packed)) = found {
                if let Some(first) = weights.get(&weight).map(|p: &Packed| &p.codes.name) {
                    return Err(Error::bad_tensor(
                        shards[packed.codes.shard].path(),
                        &weight,
                        format!("packed twice, in `{first}` and `{}`", packed.codes.name),
                    ));
                }
                if packed.codes.name != weight && index.contains_key(&weight) {
                    let file = shards[packed.codes.shard].path();
                    return Err(Error::bad_tensor(
                        file,
                        &weight,
                        format!("stored both as it is and packed in `{}`", packed.codes.name),
                    ));
                }
                weights.insert(weight, packed);
            }
        }
        Ok(PackedWeights { weights })
    }

    pub fn has(&self, name: &str) -> bool {
        self.weights.contains_key(name)
    }

    /// Every weight presented, stored under its own name or not.
    pub fn all_names(&self) -> impl Iterator<Item = &str> {
        self.weights.keys().map(String::as_str)
    }

    /// `[out, in]` of a packed weight.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.weights.get(name).map(|w| &w.shape[..])
    }

    /// The shard holding a packed weight's codes.
    pub fn shard(&self, name: &str) -> Option<usize> {
        self.weights.get(name).map(|w| w.codes.shard)
    }

    /// The shards of its other parts (scales, zero points, `g_idx`).
    pub fn part_shards(&self, name: &str) -> Vec<usize> {
        let Some(w) = self.weights.get(name) else {
            return Vec::new();
        };
        [
            Some(&w.scales),
            w.zeros.as_ref(),
            w.g_idx.as_ref(),
            w.global.as_ref(),
            w.shape_part.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|p| p.shard)
        .collect()
    }

    /// The weights presented under a name no stored tensor has (all but ModelOpt's NVFP4
    /// weights, stored under their own name).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.weights
            .iter()
            .filter(|(name, w)| w.codes.name != **name)
            .map(|(name, _)| name.as_str())
    }

    /// The stored tensors the weights are built from (a copy that writes the weights' values
    /// leaves them out): codes stored under another name, scales, zero points, `g_idx`,
    /// NVFP4's tensor-wide and activation scales, and compressed-tensors' `weight_shape`.
    pub fn parts(&self) -> impl Iterator<Item = String> + '_ {
        self.weights.iter().flat_map(|(name, w)| {
            let codes = Some(&w.codes).filter(|c| c.name != *name);
            [codes, Some(&w.scales), w.zeros.as_ref(), w.g_idx.as_ref()]
                .into_iter()
                .chain([
                    w.global.as_ref(),
                    w.activation.as_ref(),
                    w.shape_part.as_ref(),
                ])
                .flatten()
                .map(|p| p.name.clone())
                .collect::<Vec<_>>()
        })
    }

    /// Rows `rows` of a packed weight as f32 (row length too), NaN and Inf refused, naming the
    /// weight and where the value lies; None where `name` is no packed weight.
    pub fn read_rows(
        &self,
        name: &str,
        rows: Range<usize>,
        shards: &[TensorFile],
    ) -> Result<Option<(RawBytes<'static>, FloatType, usize)>> {
        let Some(w) = self.weights.get(name) else {
            return Ok(None);
        };
        let [out, cols] = w.shape;
        let file = &shards[w.codes.shard];
        crate::io::check_rows(file.path(), name, &rows, out, cols)?;
        let bytes = |p: &Part| shards[p.shard].bytes(&p.name).expect("indexed");
        let codes = bytes(&w.codes);
        let scales = w.row_scales(shards, &rows);
        let zeros = w.zeros.as_ref().map(bytes);
        let group_of = |i: usize| match &w.group_of {
            Some(g) => g[i] as usize,
            None => i / w.group,
        };
        let groups = w.groups;
        let mut values = vec![0f32; rows.len() * cols];
        values
            .par_chunks_mut(cols.max(1))
            .zip(rows.clone())
            .zip(scales.par_chunks(groups.max(1)))
            .for_each(|((row, o), scales)| {
                for (i, v) in row.iter_mut().enumerate() {
                    let g = group_of(i);
                    *v = match w.layout {
                        // The tensor's scale is in the group's, or multiplies the product
                        // (`row_scales`).
                        Layout::Nvfp4 { divides } => {
                            let byte = codes[o * cols.div_ceil(2) + i / 2];
                            let v = e2m1(byte >> (4 * (i % 2))) * scales[g];
                            if divides {
                                v
                            } else {
                                v * w.after
                            }
                        }
                        _ => {
                            let (code, zero) = w.code_and_zero(codes, zeros, o, i, g);
                            (code - zero) as f32 * scales[g]
                        }
                    };
                }
            });
        if let Some(at) = values.iter().position(|v| !v.is_finite()) {
            let (r, i) = (at / cols, at % cols);
            return Err(Error::bad_tensor(
                file.path(),
                name,
                format!(
                    "the non-finite value {} at row {}, column {i} (its scale in `{}` is {})",
                    values[at],
                    rows.start + r,
                    w.scales.name,
                    scales[r * groups + group_of(i)]
                ),
            ));
        }
        Ok(Some((RawBytes::Decoded(values), FloatType::F32, cols)))
    }
}

impl Packed {
    /// The scales of rows `rows`, `groups` a row, decoded from their type (F8_E4M3 for NVFP4,
    /// divided by compressed-tensors' tensor-wide scale). Only those rows' are read: GPTQ and
    /// AWQ store the scales `[groups, out]`, compressed-tensors and NVFP4 `[out, groups]` (or
    /// one for the tensor), and a model's map reads rows one at a time.
    fn row_scales(&self, shards: &[TensorFile], rows: &Range<usize>) -> Vec<f32> {
        let [out, _] = self.shape;
        let g = self.groups;
        match self.layout {
            Layout::Gptq { .. } | Layout::Awq => {
                let by_group: Vec<Vec<f32>> = (0..g)
                    .map(|k| {
                        read_f32_range(
                            shards,
                            &self.scales,
                            k * out + rows.start..k * out + rows.end,
                        )
                    })
                    .collect();
                (0..rows.len() * g)
                    .map(|x| by_group[x % g][x / g])
                    .collect()
            }
            Layout::CompressedTensors if self.one_scale_row => {
                read_f32_range(shards, &self.scales, 0..1).repeat(rows.len())
            }
            Layout::CompressedTensors => {
                read_f32_range(shards, &self.scales, rows.start * g..rows.end * g)
            }
            Layout::Nvfp4 { divides } => {
                // ModelOpt's product (E2M1 · E4M3, exact in f32, then the tensor's scale) is
                // llama.cpp's; compressed-tensors divides the group's scale first, as its own
                // dequantization does.
                let codes = shards[self.scales.shard]
                    .bytes(&self.scales.name)
                    .expect("indexed");
                let scales = codes[rows.start * g..rows.end * g]
                    .iter()
                    .map(|&c| super::fp8::e4m3(c));
                match divides {
                    true => scales.map(|s| s / self.after).collect(),
                    false => scales.collect(),
                }
            }
        }
    }

    /// Output `o`'s input `i` (group `g`): its code and zero point, as unsigned stored values
    /// (their difference is the signed level).
    fn code_and_zero(
        &self,
        codes: &[u8],
        zeros: Option<&[u8]>,
        o: usize,
        i: usize,
        g: usize,
    ) -> (i32, i32) {
        let b = self.bits;
        let mask = (1u32 << b) - 1;
        let [out, inn] = self.shape;
        match self.layout {
            Layout::Gptq { zero_offset } => {
                let per = 32 / b;
                let code = (word(codes, (i / per) * out + o) >> (b * (i % per))) & mask;
                let zeros = zeros.expect("GPTQ zero points");
                let words = out / per;
                let zero = (word(zeros, g * words + o / per) >> (b * (o % per))) & mask;
                (code as i32, zero as i32 + zero_offset as i32)
            }
            Layout::Awq => {
                let nibble = |w: u32, o: usize| {
                    let k = AWQ_ORDER.iter().position(|&x| x == o % 8).expect("0..8");
                    (w >> (4 * k)) & 0xf
                };
                let words = out / 8;
                let code = nibble(word(codes, i * words + o / 8), o);
                let zeros = zeros.expect("AWQ zero points");
                let zero = nibble(word(zeros, g * words + o / 8), o);
                (code as i32, zero as i32)
            }
            Layout::Nvfp4 { .. } => unreachable!("NVFP4 codes are floats"),
            Layout::CompressedTensors => {
                let words = (inn * b).div_ceil(32);
                let code = stream(|k| word(codes, o * words + k), i * b, b);
                let offset = 1i32 << (b - 1);
                let zero = match zeros {
                    None => offset,
                    Some(z) if self.zeros_unpacked => z[o * self.groups + g] as i8 as i32 + offset,
                    Some(z) => stream(|k| word(z, k * self.groups + g), o * b, b) as i32,
                };
                (code as i32, zero)
            }
        }
    }
}

#[cfg(test)]
#[path = "packed_tests.rs"]
mod tests;
