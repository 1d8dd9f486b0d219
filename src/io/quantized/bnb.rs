//! bitsandbytes checkpoints, as transformers saves a model loaded in 4 or 8 bits (the
//! `-bnb-4bit` releases many LoRAs are trained on):
//!
//! - 4-bit (`load_in_4bit`, NF4 or FP4): `<module>.weight` holds the codes, two a byte, the first
//!   in the high nibble, in the row-major order of the weight's `[out, in]`; each block of
//!   `blocksize` codes (counted over the whole tensor) is scaled by its `weight.absmax`, and a
//!   code means `weight.quant_map[code]`. With double quantization the absmax values are
//!   themselves 8-bit codes: `nested_quant_map[a] · nested_absmax[block / nested_blocksize] +
//!   nested_offset`. The shape, block sizes and offset are in the JSON bytes of
//!   `weight.quant_state.bitsandbytes__nf4` (or `__fp4`). A value is `quant_map[code] · absmax`
//!   in f32, as bitsandbytes computes it before it casts to the compute dtype.
//! - 8-bit (`load_in_8bit`, LLM.int8()): `<module>.weight` int8 `[out, in]` and `<module>.SCB`,
//!   each row's absmax: a value is `w · SCB[row] · (1/127)`, in bitsandbytes' order.
//!
//! The weight keeps its name and is presented as its f32 values, built from the rows read.

use std::collections::HashMap;
use std::ops::Range;

use rayon::prelude::*;
use safetensors::Dtype;

use super::packed::{bad, read_f32_range, Part};
use crate::error::{Error, Result};
use crate::io::safetensors::{FloatType, TensorFile};
use crate::io::RawBytes;

/// bitsandbytes' reciprocal of 127, as its int8 dequantization multiplies by it.
const INV_127: f32 = 7.874_016e-3;

/// Every bitsandbytes weight of a checkpoint, by name.
#[derive(Debug, Default)]
pub struct BnbWeights {
    weights: HashMap<String, Bnb>,
}

#[derive(Debug, Clone)]
enum Bnb {
    FourBit(FourBit),
    /// The int8 weight's shard, its `SCB` and `[out, in]`.
    Int8 {
        shard: usize,
        scb: Part,
        shape: [usize; 2],
    },
}

#[derive(Debug, Clone)]
struct FourBit {
    shard: usize,
    absmax: Part,
    quant_map: Part,
    nested: Option<Nested>,
    /// The JSON quant state (a part a copy of the values leaves out).
    state: Part,
    blocksize: usize,
    shape: [usize; 2],
}

#[derive(Debug, Clone)]
struct Nested {
    absmax: Part,
    quant_map: Part,
    blocksize: usize,
    offset: f32,
}

/// `name`'s part, if stored.
fn get(index: &HashMap<String, usize>, name: String) -> Option<Part> {
    Some(Part {
        shard: *index.get(&name)?,
        name,
    })
}

/// A float part of `count` values (`count` None: any), refused otherwise.
fn float_part(shards: &[TensorFile], p: &Part, count: Option<usize>) -> Result<usize> {
    let entry = shards[p.shard].entry(&p.name).expect("indexed");
    let n: usize = entry.shape.iter().product();
    if FloatType::from_dtype(entry.dtype).is_none() || count.is_some_and(|c| c != n) {
        return Err(bad(
            shards,
            p,
            format!(
                "{:?} {:?}: expected {} floats",
                entry.dtype,
                entry.shape,
                count.map_or("some".to_string(), |c| c.to_string())
            ),
        ));
    }
    Ok(n)
}

fn count_of(shards: &[TensorFile], p: &Part) -> (usize, Dtype) {
    let entry = shards[p.shard].entry(&p.name).expect("indexed");
    (entry.shape.iter().product(), entry.dtype)
}

impl BnbWeights {
    /// The checkpoint's bitsandbytes weights, their quant states read and their parts checked
    /// against them (only the small JSON states are read).
    pub fn find(shards: &[TensorFile], index: &HashMap<String, usize>) -> Result<Self> {
        let mut weights = HashMap::new();
        let mut names: Vec<&String> = index.keys().collect();
        names.sort();
        for name in names {
            let Some(module) = name.strip_suffix(".weight") else {
                continue;
            };
            let states: Vec<(&str, Part)> = ["nf4", "fp4"]
                .into_iter()
                .filter_map(|t| {
                    Some((
                        t,
                        get(index, format!("{name}.quant_state.bitsandbytes__{t}"))?,
                    ))
                })
                .collect();
            let found = match (states.as_slice(), get(index, format!("{module}.SCB"))) {
                ([(quant_type, state)], _) => {
                    Bnb::FourBit(four_bit(name, quant_type, state.clone(), shards, index)?)
                }
                ([_, (_, second)], _) => {
                    return Err(bad(
                        shards,
                        second,
                        format!("a second quant state for `{name}`, beside its NF4 one"),
                    ))
                }
                (_, Some(scb)) => int8(name, scb, shards, index)?,
                (_, None) => continue,
            };
            weights.insert(name.clone(), found);
        }
        Ok(BnbWeights { weights })
    }

    pub fn has(&self, name: &str) -> bool {
        self.weights.contains_key(name)
    }

    /// The weights, by name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.weights.keys().map(String::as_str)
    }

    /// `[out, in]` of a weight.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.weights.get(name).map(|w| match w {
            Bnb::FourBit(f) => &f.shape[..],
            Bnb::Int8 { shape, .. } => &shape[..],
        })
    }

    /// The shards of the parts a weight's values are built from.
    pub fn part_shards(&self, name: &str) -> Vec<usize> {
        match self.weights.get(name) {
            Some(Bnb::FourBit(f)) => [Some(&f.absmax), Some(&f.quant_map), Some(&f.state)]
                .into_iter()
                .chain(
                    f.nested
                        .iter()
                        .flat_map(|n| [Some(&n.absmax), Some(&n.quant_map)]),
                )
                .flatten()
                .map(|p| p.shard)
                .collect(),
            Some(Bnb::Int8 { scb, .. }) => vec![scb.shard],
            None => Vec::new(),
        }
    }

    /// The stored tensors beside the weights (a copy of the values leaves them out): absmax,
    /// code maps, quant states, `SCB` and the int8 `weight_format`.
    pub fn parts<'s>(
        &'s self,
        index: &'s HashMap<String, usize>,
    ) -> impl Iterator<Item = String> + 's {
        self.weights.iter().flat_map(move |(name, w)| match w {
            Bnb::FourBit(f) => [&f.absmax, &f.quant_map, &f.state]
                .into_iter()
                .chain(f.nested.iter().flat_map(|n| [&n.absmax, &n.quant_map]))
                .map(|p| p.name.clone())
                .collect::<Vec<_>>(),
            Bnb::Int8 { scb, .. } => {
                let format = format!("{}_format", name);
                [
                    Some(scb.name.clone()),
                    index.contains_key(&format).then_some(format),
                ]
                .into_iter()
                .flatten()
                .collect()
            }
        })
    }

    /// Rows `rows` of a weight as f32 (row length too), NaN and Inf refused, naming the weight
    /// and where the value lies; None where `name` is no bitsandbytes weight.
    pub fn read_rows(
        &self,
        name: &str,
        rows: Range<usize>,
        shards: &[TensorFile],
    ) -> Result<Option<(RawBytes<'static>, FloatType, usize)>> {
        let Some(w) = self.weights.get(name) else {
            return Ok(None);
        };
        let (shard, [out, cols]) = match w {
            Bnb::FourBit(f) => (f.shard, f.shape),
            Bnb::Int8 { shard, shape, .. } => (*shard, *shape),
        };
        let file = &shards[shard];
        crate::io::check_rows(file.path(), name, &rows, out, cols)?;
        let codes = file.bytes(name).expect("indexed");
        let mut values = vec![0f32; rows.len() * cols];
        match w {
            Bnb::FourBit(f) => {
                // Only the blocks the rows lie in.
                let first = rows.start * cols / f.blocksize;
                let absmax = f.absmax_of(shards, first..(rows.end * cols).div_ceil(f.blocksize));
                let map = read_f32(shards, &f.quant_map);
                values
                    .par_chunks_mut(cols.max(1))
                    .zip(rows.clone())
                    .for_each(|(row, o)| {
                        for (i, v) in row.iter_mut().enumerate() {
                            let k = o * cols + i;
                            let byte = codes[k / 2];
                            let code = if k % 2 == 0 { byte >> 4 } else { byte & 0xf };
                            *v = map[code as usize] * absmax[k / f.blocksize - first];
                        }
                    });
            }
            Bnb::Int8 { scb, .. } => {
                let scb = read_f32_range(shards, scb, rows.clone());
                values
                    .par_chunks_mut(cols.max(1))
                    .zip(rows.clone())
                    .zip(scb)
                    .for_each(|((row, o), scb)| {
                        for (v, &c) in row.iter_mut().zip(&codes[o * cols..(o + 1) * cols]) {
                            *v = c as i8 as f32 * scb * INV_127;
                        }
                    });
            }
        }
        if let Some(at) = values.iter().position(|v| !v.is_finite()) {
            let (o, i) = (rows.start + at / cols, at % cols);
            return Err(Error::bad_tensor(
                file.path(),
                name,
                format!(
                    "the non-finite value {} at row {o}, column {i} (a code times its \
                     block's absmax or its row's SCB)",
                    values[at]
                ),
            ));
        }
        Ok(Some((RawBytes::Decoded(values), FloatType::F32, cols)))
    }
}

impl FourBit {
    /// The absmax of blocks `blocks`, unpacked from their 8-bit codes when doubly quantized.
    fn absmax_of(&self, shards: &[TensorFile], blocks: Range<usize>) -> Vec<f32> {
        let Some(n) = &self.nested else {
            return read_f32_range(shards, &self.absmax, blocks);
        };
        let codes = shards[self.absmax.shard]
            .bytes(&self.absmax.name)
            .expect("indexed");
        let map = read_f32(shards, &n.quant_map);
        let first = blocks.start / n.blocksize;
        let scales = read_f32_range(shards, &n.absmax, first..blocks.end.div_ceil(n.blocksize));
        blocks
            .map(|b| map[codes[b] as usize] * scales[b / n.blocksize - first] + n.offset)
            .collect()
    }
}

/// A small float tensor's values (a code map).
fn read_f32(shards: &[TensorFile], p: &Part) -> Vec<f32> {
    let n = shards[p.shard]
        .entry(&p.name)
        .expect("indexed")
        .shape
        .iter()
        .product();
    read_f32_range(shards, p, 0..n)
}

/// A 4-bit weight, its parts checked against its quant state.
fn four_bit(
    name: &str,
    quant_type: &str,
    state: Part,
    shards: &[TensorFile],
    index: &HashMap<String, usize>,
) -> Result<FourBit> {
    let bytes = shards[state.shard].bytes(&state.name).expect("indexed");
    let json: serde_json::Value = std::str::from_utf8(bytes)
        .ok()
        .and_then(|t| serde_json::from_str(t).ok())
        .ok_or_else(|| bad(shards, &state, "not the JSON of a quant state".to_string()))?;
    let field = |key: &str| json[key].as_u64().map(|v| v as usize);
    // The name says which code map the state is for; the state must agree.
    if json["quant_type"].as_str() != Some(quant_type) {
        return Err(bad(
            shards,
            &state,
            format!("{json}: the quant state of a `{quant_type}` weight names another quant_type"),
        ));
    }
    let shape = match json["shape"].as_array().map(|a| a.as_slice()) {
        Some([o, i]) => [o.as_u64(), i.as_u64()],
        _ => [None, None],
    };
    let (Some(blocksize), [Some(out), Some(inn)]) = (field("blocksize"), shape) else {
        return Err(bad(
            shards,
            &state,
            format!("{json}: expected a blocksize and a 2-D shape"),
        ));
    };
    let (out, inn) = (out as usize, inn as usize);
    if blocksize == 0 || out > 1 << 24 || inn > 1 << 24 {
        return Err(bad(
            shards,
            &state,
            format!("{json}: blocksize or shape out of range"),
        ));
    }
    let n = out * inn;
    let codes = Part {
        shard: index[name],
        name: name.to_string(),
    };
    let (stored, dtype) = count_of(shards, &codes);
    if stored != n.div_ceil(2) || dtype != Dtype::U8 {
        return Err(bad(
            shards,
            &codes,
            format!(
                "{dtype:?}, {stored} bytes: expected U8, two 4-bit codes a byte of [{out}, {inn}]"
            ),
        ));
    }
    let need = |suffix: &str| {
        get(index, format!("{name}.{suffix}")).ok_or_else(|| {
            bad(
                shards,
                &codes,
                format!("a 4-bit weight without its `{name}.{suffix}`"),
            )
        })
    };
    let absmax = need("absmax")?;
    let quant_map = need("quant_map")?;
    float_part(shards, &quant_map, Some(16))?;
    let blocks = n.div_ceil(blocksize);
    let nested = match get(index, format!("{name}.nested_absmax")) {
        None => {
            float_part(shards, &absmax, Some(blocks))?;
            if let Some(stray) = get(index, format!("{name}.nested_quant_map")) {
                return Err(bad(
                    shards,
                    &stray,
                    format!("a nested code map without `{name}.nested_absmax`"),
                ));
            }
            None
        }
        Some(nested_absmax) => {
            let (count, dtype) = count_of(shards, &absmax);
            if count != blocks || dtype != Dtype::U8 {
                return Err(bad(
                    shards,
                    &absmax,
                    format!("{dtype:?}, {count} values: expected {blocks} 8-bit codes"),
                ));
            }
            let nested_map = need("nested_quant_map")?;
            float_part(shards, &nested_map, Some(256))?;
            let (nb, offset) = (field("nested_blocksize"), json["nested_offset"].as_f64());
            let (Some(nb), Some(offset)) = (nb.filter(|&b| b > 0), offset) else {
                return Err(bad(
                    shards,
                    &state,
                    format!("{json}: expected nested_blocksize and nested_offset"),
                ));
            };
            float_part(shards, &nested_absmax, Some(blocks.div_ceil(nb)))?;
            Some(Nested {
                absmax: nested_absmax,
                quant_map: nested_map,
                blocksize: nb,
                offset: offset as f32,
            })
        }
    };
    Ok(FourBit {
        shard: codes.shard,
        absmax,
        quant_map,
        nested,
        state,
        blocksize,
        shape: [out, inn],
    })
}

/// An LLM.int8() weight beside its `SCB`.
fn int8(
    name: &str,
    scb: Part,
    shards: &[TensorFile],
    index: &HashMap<String, usize>,
) -> Result<Bnb> {
    let weight = Part {
        shard: index[name],
        name: name.to_string(),
    };
    let entry = shards[weight.shard].entry(name).expect("indexed");
    let shape = match (entry.dtype, entry.shape.as_slice()) {
        (Dtype::I8, &[o, i]) => [o, i],
        (dtype, shape) => {
            return Err(bad(
                shards,
                &weight,
                format!(
                    "{dtype:?} {shape:?} beside `{}`: expected an int8 matrix",
                    scb.name
                ),
            ))
        }
    };
    float_part(shards, &scb, Some(shape[0]))?;
    // Older bitsandbytes could save the weight in a GPU's tiled layout (formats 2 and 3), which
    // is not its rows: only the row-major format 0 is read.
    if let Some(format) = get(index, format!("{name}_format")) {
        let value = super::packed::ints(&shards[format.shard], &format.name)?;
        if value != [0] {
            return Err(bad(
                shards,
                &format,
                format!("{value:?}: only weight_format 0 (row-major) is read"),
            ));
        }
    }
    Ok(Bnb::Int8 {
        shard: weight.shard,
        scb,
        shape,
    })
}

#[cfg(test)]
#[path = "bnb_tests.rs"]
mod tests;
