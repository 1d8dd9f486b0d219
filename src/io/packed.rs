//! Integer-packed checkpoints: a projection stored as small integers packed into int32 words beside
//! a scale (and a zero point) per group of inputs, as the quantized releases most served models
//! come in. Three layouts are read, each under `quantization_config.quant_method`:
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
//!   (code `i` at bit `i·bits`, crossing words where it must), stored plus `2^(bits−1)`;
//!   `weight_shape` `[out, in]`; `weight_scale` `[out, groups]` (`[out, 1]` per channel, one value
//!   for the tensor); an asymmetric scheme's `weight_zero_point` `[⌈out·bits/32⌉, groups]` packed
//!   the same way down the outputs (or unpacked int8 `[out, groups]`, as older versions wrote);
//!   `weight_g_idx` where present. 1 to 8 bits.
//!
//! The weight is presented under `<module>.weight`, `[out, in]`, as the f32 values
//! `(code − zero) · scale`: exact in f32 (a code difference of at most 8 bits times a 16-bit
//! scale), where the libraries' own dequantization computes in the scale's 16-bit type and
//! rounds. It is built from the rows asked for when they are read, as an FP8 weight is
//! ([`super::fp8`]).

use std::collections::HashMap;
use std::ops::Range;

use rayon::prelude::*;
use safetensors::Dtype;

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
enum Layout {
    /// `zero_offset`: the stored zero point is one less than the zero point (`gptq` format).
    Gptq {
        zero_offset: bool,
    },
    Awq,
    CompressedTensors,
}

/// A stored tensor: its shard and name.
#[derive(Debug, Clone)]
struct Part {
    shard: usize,
    name: String,
}

#[derive(Debug, Clone)]
struct Packed {
    layout: Layout,
    bits: usize,
    codes: Part,
    scales: Part,
    zeros: Option<Part>,
    /// compressed-tensors' older unpacked int8 zero points `[out, groups]`.
    zeros_unpacked: bool,
    g_idx: Option<Part>,
    /// `[out, in]`.
    shape: [usize; 2],
    groups: usize,
    /// Inputs a group, where there is no `g_idx`.
    group: usize,
    /// The scale has one row for the whole tensor (compressed-tensors' tensor strategy).
    one_scale_row: bool,
}

/// The 32-bit words of an int32 tensor.
fn word(bytes: &[u8], k: usize) -> u32 {
    u32::from_le_bytes(bytes[4 * k..4 * k + 4].try_into().expect("four bytes"))
}

/// `bits` bits of the little-endian stream of words `at(0), at(1), …` starting at bit `bit`.
fn stream(at: impl Fn(usize) -> u32, bit: usize, bits: usize) -> u32 {
    let (w, off) = (bit / 32, bit % 32);
    let mut v = (at(w) as u64) >> off;
    if off + bits > 32 {
        v |= (at(w + 1) as u64) << (32 - off);
    }
    (v & ((1u64 << bits) - 1)) as u32
}

/// An integer tensor's values (the `g_idx`, the `weight_shape`).
fn ints(file: &TensorFile, name: &str) -> Result<Vec<i64>> {
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
struct Scheme<'c> {
    method: &'c str,
    config: &'c serde_json::Value,
}

impl Scheme<'_> {
    fn usize_of(&self, keys: &[&str]) -> Option<i64> {
        keys.iter().find_map(|k| self.config[*k].as_i64())
    }

    fn str_of(&self, keys: &[&str]) -> Option<&str> {
        keys.iter().find_map(|k| self.config[*k].as_str())
    }

    /// The bit widths the compressed-tensors config groups name.
    fn group_bits(&self) -> Vec<usize> {
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
                Some((
                    weight.to_string(),
                    compressed(weight, &scheme, shards, index)?,
                ))
            } else {
                None
            };
            if let Some((weight, packed)) = found {
                if index.contains_key(&weight) {
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
        [Some(&w.scales), w.zeros.as_ref(), w.g_idx.as_ref()]
            .into_iter()
            .flatten()
            .map(|p| p.shard)
            .collect()
    }

    /// The weights presented, by name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.weights.keys().map(String::as_str)
    }

    /// The stored tensors the weights are built from (a copy that writes the weights' values
    /// leaves them out): codes, scales, zero points, `g_idx`, and compressed-tensors'
    /// `weight_shape`.
    pub fn parts(&self) -> impl Iterator<Item = String> + '_ {
        self.weights.iter().flat_map(|(name, w)| {
            let mut parts: Vec<String> = [Some(&w.codes), Some(&w.scales), w.zeros.as_ref()]
                .into_iter()
                .chain([w.g_idx.as_ref()])
                .flatten()
                .map(|p| p.name.clone())
                .collect();
            if w.layout == Layout::CompressedTensors {
                parts.push(format!("{name}_shape"));
            }
            parts
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
        let scale_file = &shards[w.scales.shard];
        let ty = FloatType::from_dtype(scale_file.entry(&w.scales.name).expect("indexed").dtype)
            .expect("checked when found");
        let scales = decode_f32(bytes(&w.scales), ty);
        let zeros = w.zeros.as_ref().map(bytes);
        let group_of: Vec<usize> = match &w.g_idx {
            Some(p) => {
                let g = ints(&shards[p.shard], &p.name)?;
                if let Some((i, bad)) = g
                    .iter()
                    .enumerate()
                    .find(|(_, &g)| g < 0 || g as usize >= w.groups)
                {
                    return Err(Error::bad_tensor(
                        shards[p.shard].path(),
                        &p.name,
                        format!(
                            "input {i} is in group {bad}, but the scales have {} groups",
                            w.groups
                        ),
                    ));
                }
                g.into_iter().map(|g| g as usize).collect()
            }
            None => (0..cols).map(|i| i / w.group).collect(),
        };
        let mut values = vec![0f32; rows.len() * cols];
        values
            .par_chunks_mut(cols.max(1))
            .zip(rows.clone())
            .for_each(|(row, o)| {
                for (i, v) in row.iter_mut().enumerate() {
                    let g = group_of[i];
                    let (code, zero) = w.code_and_zero(codes, zeros, o, i, g);
                    *v = (code - zero) as f32 * scales[w.scale_at(o, g)];
                }
            });
        if let Some(at) = values.iter().position(|v| !v.is_finite()) {
            let (o, i) = (rows.start + at / cols, at % cols);
            return Err(Error::bad_tensor(
                file.path(),
                name,
                format!(
                    "the non-finite value {} at row {o}, column {i} (its scale in `{}` is {})",
                    values[at],
                    w.scales.name,
                    scales[w.scale_at(o, group_of[i])]
                ),
            ));
        }
        Ok(Some((RawBytes::Decoded(values), FloatType::F32, cols)))
    }
}

impl Packed {
    /// Where output `o`'s scale of group `g` lies: GPTQ and AWQ store the scales `[groups, out]`,
    /// compressed-tensors `[out, groups]` (or one for the tensor).
    fn scale_at(&self, o: usize, g: usize) -> usize {
        match self.layout {
            Layout::Gptq { .. } | Layout::Awq => g * self.shape[0] + o,
            Layout::CompressedTensors if self.one_scale_row => g,
            Layout::CompressedTensors => o * self.groups + g,
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

/// A part of `module` beside its codes (`<module><suffix>`), refused where missing.
fn part(
    module: &str,
    suffix: &str,
    what: &str,
    codes: &Part,
    shards: &[TensorFile],
    index: &HashMap<String, usize>,
) -> Result<Part> {
    let name = format!("{module}{suffix}");
    match index.get(&name) {
        Some(&shard) => Ok(Part { shard, name }),
        None => Err(Error::bad_tensor(
            shards[codes.shard].path(),
            &codes.name,
            format!("packed codes without their {what} (`{name}`)"),
        )),
    }
}

/// The shape and dtype of a part.
fn shape_of<'s>(shards: &'s [TensorFile], p: &Part) -> (&'s [usize], Dtype) {
    let entry = shards[p.shard].entry(&p.name).expect("indexed");
    (&entry.shape, entry.dtype)
}

fn bad(shards: &[TensorFile], p: &Part, reason: String) -> Error {
    Error::bad_tensor(shards[p.shard].path(), &p.name, reason)
}

/// The scales of a packed weight: a float tensor `[groups, out]` (`transposed`, GPTQ and AWQ) or
/// `[out, groups]`; its group count.
fn scale_groups(shards: &[TensorFile], p: &Part, out: usize, transposed: bool) -> Result<usize> {
    let (shape, dtype) = shape_of(shards, p);
    if FloatType::from_dtype(dtype).is_none() {
        return Err(bad(
            shards,
            p,
            format!("a scale stored as {dtype:?}, not a float"),
        ));
    }
    let groups = match (shape, transposed) {
        (&[g, o], true) if o == out && g > 0 => g,
        (&[o, g], false) if o == out && g > 0 => g,
        (&[o], false) if o == out => 1,
        _ => {
            let expected = if transposed {
                "[groups, out]"
            } else {
                "[out, groups]"
            };
            return Err(bad(
                shards,
                p,
                format!("shape {shape:?}: expected {expected} with out = {out}"),
            ));
        }
    };
    Ok(groups)
}

/// The inputs a group: the config's `group_size` (−1: all of them), else what the scales' group
/// count implies; checked against that count.
fn group_size(
    scheme: &Scheme<'_>,
    inn: usize,
    groups: usize,
    scales: (&[TensorFile], &Part),
) -> Result<usize> {
    let group = match scheme.usize_of(&["group_size", "q_group_size"]) {
        Some(g) if g > 0 => g as usize,
        Some(_) => inn.max(1),
        None => inn.div_ceil(groups).max(1),
    };
    if inn.div_ceil(group) != groups {
        return Err(bad(
            scales.0,
            scales.1,
            format!(
                "{groups} groups of scales for {inn} inputs in groups of {group} \
                 (quantization_config.group_size)"
            ),
        ));
    }
    Ok(group)
}

/// A GPTQ or AWQ weight (`<module>.qweight`).
fn gptq_or_awq(
    module: &str,
    scheme: &Scheme<'_>,
    shards: &[TensorFile],
    index: &HashMap<String, usize>,
) -> Result<Packed> {
    let codes = Part {
        shard: index[&format!("{module}.qweight")],
        name: format!("{module}.qweight"),
    };
    let (shape, dtype) = shape_of(shards, &codes);
    let awq = match scheme.method {
        "gptq" => false,
        "awq" => true,
        other => {
            return Err(bad(
                shards,
                &codes,
                format!(
                    "a packed weight, but quantization_config.quant_method is {:?} (`gptq` and \
                     `awq` weights are read as `qweight`)",
                    other
                ),
            ))
        }
    };
    if !matches!(dtype, Dtype::I32 | Dtype::U32) {
        return Err(bad(
            shards,
            &codes,
            format!("stored as {dtype:?}, not int32 words"),
        ));
    }
    let bits = scheme.usize_of(&["bits", "w_bit"]).unwrap_or(4) as usize;
    let layout = if awq {
        let version = scheme.str_of(&["version"]).unwrap_or("gemm");
        if !version.eq_ignore_ascii_case("gemm") || bits != 4 {
            return Err(bad(
                shards,
                &codes,
                format!(
                    "AWQ `version` {version:?} with {bits} bits: the GEMM layout with 4 bits is \
                     read"
                ),
            ));
        }
        Layout::Awq
    } else {
        let format = scheme
            .str_of(&["checkpoint_format", "format"])
            .unwrap_or("gptq");
        let zero_offset = match format {
            "gptq" => true,
            "gptq_v2" => false,
            other => {
                return Err(bad(
                    shards,
                    &codes,
                    format!(
                    "GPTQ checkpoint_format {other:?}: the `gptq` and `gptq_v2` formats are read"
                ),
                ))
            }
        };
        if !matches!(bits, 2 | 4 | 8) {
            return Err(bad(
                shards,
                &codes,
                format!("{bits}-bit GPTQ: 2, 4 and 8 bits are read"),
            ));
        }
        Layout::Gptq { zero_offset }
    };
    let per = 32 / bits;
    let [rows, cols] = match shape {
        &[r, c] => [r, c],
        _ => {
            return Err(bad(
                shards,
                &codes,
                format!("shape {shape:?}: expected 2-D words"),
            ))
        }
    };
    let (out, inn) = if awq {
        (cols * per, rows)
    } else {
        (cols, rows * per)
    };
    let scales = part(module, ".scales", "scales", &codes, shards, index)?;
    let groups = scale_groups(shards, &scales, out, true)?;
    let zeros = part(module, ".qzeros", "zero points", &codes, shards, index)?;
    let (zshape, zdtype) = shape_of(shards, &zeros);
    if zshape != [groups, out / per] || !matches!(zdtype, Dtype::I32 | Dtype::U32) {
        return Err(bad(
            shards,
            &zeros,
            format!(
                "{zdtype:?} {zshape:?}: expected int32 [{groups}, {}] beside scales of {groups} groups",
                out / per
            ),
        ));
    }
    let g_idx = index.get(&format!("{module}.g_idx")).map(|&shard| Part {
        shard,
        name: format!("{module}.g_idx"),
    });
    let group = match &g_idx {
        Some(p) => {
            let (gshape, _) = shape_of(shards, p);
            if gshape != [inn] {
                return Err(bad(
                    shards,
                    p,
                    format!("shape {gshape:?}: expected [{inn}], a group per input"),
                ));
            }
            inn.max(1)
        }
        None => group_size(scheme, inn, groups, (shards, &scales))?,
    };
    Ok(Packed {
        layout,
        bits,
        codes,
        scales,
        zeros: Some(zeros),
        zeros_unpacked: false,
        g_idx,
        shape: [out, inn],
        groups,
        group,
        one_scale_row: false,
    })
}

/// A compressed-tensors `pack-quantized` weight (`<weight>_packed`).
fn compressed(
    weight: &str,
    scheme: &Scheme<'_>,
    shards: &[TensorFile],
    index: &HashMap<String, usize>,
) -> Result<Packed> {
    let codes = Part {
        shard: index[&format!("{weight}_packed")],
        name: format!("{weight}_packed"),
    };
    let (shape, dtype) = shape_of(shards, &codes);
    if scheme.method != "compressed-tensors" || !matches!(dtype, Dtype::I32 | Dtype::U32) {
        return Err(bad(
            shards,
            &codes,
            format!(
                "{dtype:?} codes under quantization_config.quant_method {:?}: compressed-tensors' \
                 pack-quantized int32 words are read (its NVFP4 and other formats are not)",
                scheme.method
            ),
        ));
    }
    let stored_shape = part(weight, "_shape", "shape", &codes, shards, index)?;
    let dims = ints(&shards[stored_shape.shard], &stored_shape.name)?;
    let [rows, words] = match shape {
        &[r, w] => [r, w],
        _ => {
            return Err(bad(
                shards,
                &codes,
                format!("shape {shape:?}: expected 2-D words"),
            ))
        }
    };
    let (out, inn) = match dims.as_slice() {
        &[o, i] if o >= 0 && i > 0 && o as usize == rows => (o as usize, i as usize),
        _ => {
            return Err(bad(
                shards,
                &stored_shape,
                format!("{dims:?}: expected [out, in] with out = the codes' {rows} rows"),
            ))
        }
    };
    // The width the words imply (for in ≥ 32 only one does); the config's where several fit.
    let fits: Vec<usize> = (1..=8)
        .filter(|b| (inn * b).div_ceil(32) == words)
        .collect();
    let named = scheme.group_bits();
    let bits = match fits.as_slice() {
        [b] => *b,
        _ => match fits.iter().find(|b| named.contains(b)) {
            Some(b) => *b,
            None => {
                return Err(bad(
                    shards,
                    &codes,
                    format!(
                        "{words} words a row do not hold {inn} codes of 1 to 8 bits{}",
                        if fits.is_empty() {
                            ""
                        } else {
                            " the config names"
                        }
                    ),
                ))
            }
        },
    };
    let scales = part(weight, "_scale", "scales", &codes, shards, index)?;
    let (sshape, _) = shape_of(shards, &scales);
    let one_scale_row = sshape.iter().product::<usize>() == 1 && out != 1;
    let groups = if one_scale_row {
        let (_, sdtype) = shape_of(shards, &scales);
        if FloatType::from_dtype(sdtype).is_none() {
            return Err(bad(
                shards,
                &scales,
                format!("a scale stored as {sdtype:?}, not a float"),
            ));
        }
        1
    } else {
        scale_groups(shards, &scales, out, false)?
    };
    let zeros = index
        .get(&format!("{weight}_zero_point"))
        .map(|&shard| Part {
            shard,
            name: format!("{weight}_zero_point"),
        });
    let mut zeros_unpacked = false;
    if let Some(z) = &zeros {
        let (zshape, zdtype) = shape_of(shards, z);
        let packed = [(out * bits).div_ceil(32), groups];
        zeros_unpacked = zdtype == Dtype::I8 && zshape == [out, groups];
        let fits =
            zeros_unpacked || (matches!(zdtype, Dtype::I32 | Dtype::U32) && zshape == packed);
        if one_scale_row || !fits {
            return Err(bad(
                shards,
                z,
                format!(
                    "{zdtype:?} {zshape:?}: expected int32 {packed:?} (packed down the outputs) or \
                     int8 [{out}, {groups}], a zero point per scale"
                ),
            ));
        }
    }
    let g_idx = index.get(&format!("{weight}_g_idx")).map(|&shard| Part {
        shard,
        name: format!("{weight}_g_idx"),
    });
    let group = match &g_idx {
        Some(p) if shape_of(shards, p).0 != [inn] => {
            return Err(bad(
                shards,
                p,
                format!("shape {:?}: expected [{inn}]", shape_of(shards, p).0),
            ))
        }
        Some(_) => inn,
        None if inn % groups != 0 => {
            return Err(bad(
                shards,
                &scales,
                format!("{groups} groups of scales do not divide the {inn} inputs"),
            ))
        }
        None => inn / groups,
    };
    Ok(Packed {
        layout: Layout::CompressedTensors,
        bits,
        codes,
        scales,
        zeros,
        zeros_unpacked,
        g_idx,
        shape: [out, inn],
        groups,
        group,
        one_scale_row,
    })
}

#[cfg(test)]
#[path = "packed_tests.rs"]
mod tests;
