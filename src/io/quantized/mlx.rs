//! MLX checkpoints, as `mlx_lm.convert -q` writes them (the mlx-community releases): a
//! quantized module keeps its name, `<module>.weight` holding U32 words `[out, in·bits/32]`, beside
//! `<module>.scales` `[out, in/group_size]` and, in the affine mode, `<module>.biases` of the
//! same shape. `config.json`'s `quantization` gives `group_size`, `bits` and `mode`, and may
//! override them for one module (`"<module>": {…}`) or leave a module unquantized
//! (`"<module>": false`), as mlx-lm's mixed recipes do. The modes:
//!
//! - `affine` (the default): each row's codes a little-endian bit stream through its words, code
//!   `i` at bit `i·bits` (whole codes a word for 2, 4 and 8 bits; across words for 3, 5 and 6), a
//!   value `code · scale + bias` with the group's float scale and bias.
//! - `mxfp4`: E2M1 codes, two a byte, the first in the low nibble, times the group's E8M0 scale
//!   `2^(s − 127)` (U8, groups of 32).
//! - `nvfp4`: the same codes times the group's F8_E4M3 scale (U8, groups of 16).
//! - `mxfp8`: F8_E4M3 codes, one a byte, times the group's E8M0 scale (groups of 32).
//!
//! The weight is presented as its f32 values, built from the rows read. MLX computes affine
//! values in the scales' type and the others in the type asked for (bf16 unless told); here they
//! are computed in f32: the product is exact for 16-bit scales and for the microscaled modes (at
//! most 8 bits of code times an 11-bit significand, or a power of two; an f32 scale, as an f32
//! model keeps, rounds it once) and the bias is added once, rounding once. Stacked experts (3-D
//! weights, mlx-lm's `switch_mlp`) are not read.

use std::collections::HashMap;
use std::ops::Range;

use rayon::prelude::*;
use safetensors::Dtype;

use super::packed::{bad, e2m1, read_f32_range, stream, word, Part};
use crate::error::{Error, Result};
use crate::io::safetensors::{FloatType, TensorFile};
use crate::io::RawBytes;

/// How a group's codes become values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Affine,
    Mxfp4,
    Nvfp4,
    Mxfp8,
}

impl Mode {
    fn parse(name: &str) -> Option<Mode> {
        match name {
            "affine" => Some(Mode::Affine),
            "mxfp4" => Some(Mode::Mxfp4),
            "nvfp4" => Some(Mode::Nvfp4),
            "mxfp8" => Some(Mode::Mxfp8),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Affine => "affine",
            Mode::Mxfp4 => "mxfp4",
            Mode::Nvfp4 => "nvfp4",
            Mode::Mxfp8 => "mxfp8",
        }
    }

    /// MLX's group size and bits where the config leaves them out.
    fn defaults(self) -> (usize, usize) {
        match self {
            Mode::Affine => (64, 4),
            Mode::Mxfp4 => (32, 4),
            Mode::Nvfp4 => (16, 4),
            Mode::Mxfp8 => (32, 8),
        }
    }
}

/// One module's quantization, as the config gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Params {
    mode: Mode,
    group: usize,
    bits: usize,
}

/// Every MLX-quantized weight of a checkpoint, by name.
#[derive(Debug, Default)]
pub struct MlxWeights {
    weights: HashMap<String, Mlx>,
}

#[derive(Debug, Clone)]
struct Mlx {
    params: Params,
    shard: usize,
    scales: Part,
    biases: Option<Part>,
    /// `[out, in]`.
    shape: [usize; 2],
}

/// A module's parameters: its own entry in `quantization` where there is one (`false` or
/// `null`: not quantized; `true`: the checkpoint's), else the checkpoint's. As in MLX, a group
/// size or width left out (or 0) is its mode's default, and a module's own entry without a mode
/// is affine whatever the checkpoint's.
fn params_for(
    quant: &serde_json::Value,
    module: &str,
) -> std::result::Result<Option<Params>, String> {
    use serde_json::Value;
    let entry = match quant.get(module) {
        Some(Value::Bool(false) | Value::Null) => return Ok(None),
        Some(entry @ Value::Object(_)) => entry,
        None | Some(Value::Bool(true)) => quant,
        Some(other) => {
            return Err(format!(
                "quantization.\"{module}\" is {other}, not an object, true or false"
            ))
        }
    };
    let mode_name = match &entry["mode"] {
        Value::Null => "affine",
        Value::String(mode) => mode.as_str(),
        other => return Err(format!("quantization mode {other} is not a string")),
    };
    let mode = Mode::parse(mode_name).ok_or_else(|| {
        format!("quantization mode {mode_name:?} is not read (affine, mxfp4, nvfp4, mxfp8 are)")
    })?;
    let (group, bits) = mode.defaults();
    let field = |key: &str, default: usize| match &entry[key] {
        Value::Null => Ok(default),
        v => match v.as_u64() {
            Some(0) => Ok(default),
            Some(x) if x <= 1 << 16 => Ok(x as usize),
            _ => Err(format!(
                "quantization {key} {v} is not a width or group size"
            )),
        },
    };
    let params = Params {
        mode,
        group: field("group_size", group)?,
        bits: field("bits", bits)?,
    };
    let fits = match mode {
        Mode::Affine => matches!(params.bits, 2..=6 | 8),
        Mode::Mxfp4 => params.bits == 4 && params.group == 32,
        Mode::Nvfp4 => params.bits == 4 && params.group == 16,
        Mode::Mxfp8 => params.bits == 8 && params.group == 32,
    };
    if !fits {
        return Err(format!(
            "{mode_name} with {} bits in groups of {}: MLX quantizes affine to 2, 3, 4, 5, 6 or 8 \
             bits, mxfp4 and mxfp8 in groups of 32, nvfp4 in groups of 16",
            params.bits, params.group
        ));
    }
    Ok(Some(params))
}

fn shape_of<'s>(shards: &'s [TensorFile], p: &Part) -> (&'s [usize], Dtype) {
    let entry = shards[p.shard].entry(&p.name).expect("indexed");
    (&entry.shape, entry.dtype)
}

impl MlxWeights {
    /// The checkpoint's MLX-quantized weights: every U32 `<module>.weight` beside a
    /// `<module>.scales`, checked against its parts and the config's `quantization` (no tensor
    /// data is read).
    pub fn find(
        config: &serde_json::Value,
        shards: &[TensorFile],
        index: &HashMap<String, usize>,
    ) -> Result<Self> {
        let quant = &config["quantization"];
        let mut weights = HashMap::new();
        let mut names: Vec<&String> = index.keys().collect();
        names.sort();
        for name in names {
            let Some(module) = name.strip_suffix(".weight") else {
                continue;
            };
            let codes = Part {
                shard: index[name],
                name: name.clone(),
            };
            let (shape, dtype) = shape_of(shards, &codes);
            let Some(&scale_shard) = index.get(&format!("{module}.scales")) else {
                continue;
            };
            if dtype != Dtype::U32 || shape.len() != 2 {
                // (3-D: stacked experts, which are not read.)
                continue;
            }
            if !quant.is_object() {
                return Err(bad(
                    shards,
                    &codes,
                    "MLX-quantized codes beside their scales, but config.json has no \
                     `quantization` (their width and group size)"
                        .to_string(),
                ));
            }
            let params = match params_for(quant, module) {
                Ok(Some(p)) => p,
                Ok(None) => {
                    return Err(bad(
                        shards,
                        &codes,
                        format!(
                            "quantized codes, but config.json's quantization.\"{module}\" is false"
                        ),
                    ))
                }
                Err(why) => return Err(bad(shards, &codes, format!("config.json: {why}"))),
            };
            let scales = Part {
                shard: scale_shard,
                name: format!("{module}.scales"),
            };
            let biases = index.get(&format!("{module}.biases")).map(|&shard| Part {
                shard,
                name: format!("{module}.biases"),
            });
            let found = check(params, &codes, scales, biases, shards)?;
            weights.insert(name.clone(), found);
        }
        Ok(MlxWeights { weights })
    }

    pub fn has(&self, name: &str) -> bool {
        self.weights.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.weights.keys().map(String::as_str)
    }

    /// `[out, in]` of a weight.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.weights.get(name).map(|w| &w.shape[..])
    }

    /// The shards of its scales and biases.
    pub fn part_shards(&self, name: &str) -> Vec<usize> {
        self.weights.get(name).map_or(Vec::new(), |w| {
            std::iter::once(&w.scales)
                .chain(&w.biases)
                .map(|p| p.shard)
                .collect()
        })
    }

    /// The scales and biases (a copy of the values leaves them out).
    pub fn parts(&self) -> impl Iterator<Item = String> + '_ {
        self.weights.values().flat_map(|w| {
            std::iter::once(&w.scales)
                .chain(&w.biases)
                .map(|p| p.name.clone())
        })
    }

    /// Rows `rows` of a weight as f32 (row length too), NaN and Inf refused, naming the weight
    /// and where the value lies; None where `name` is no MLX-quantized weight.
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
        let file = &shards[w.shard];
        crate::io::check_rows(file.path(), name, &rows, out, cols)?;
        let Params { mode, group, bits } = w.params;
        let groups = cols / group;
        let row_bytes = cols * bits / 8;
        let codes = file.bytes(name).expect("indexed");
        let scales = w.scales_of(shards, &rows);
        let biases = match &w.biases {
            Some(b) => read_f32_range(shards, b, rows.start * groups..rows.end * groups),
            None => Vec::new(),
        };
        let mut values = vec![0f32; rows.len() * cols];
        values
            .par_chunks_mut(cols.max(1))
            .enumerate()
            .for_each(|(r, row)| {
                let o = rows.start + r;
                let bytes = &codes[o * row_bytes..(o + 1) * row_bytes];
                let scales = &scales[r * groups..(r + 1) * groups];
                for (i, v) in row.iter_mut().enumerate() {
                    let g = i / group;
                    *v = match mode {
                        Mode::Affine => {
                            let code = stream(|k| word(bytes, k), i * bits, bits);
                            code as f32 * scales[g] + biases[r * groups + g]
                        }
                        Mode::Mxfp4 | Mode::Nvfp4 => {
                            e2m1(bytes[i / 2] >> (4 * (i % 2))) * scales[g]
                        }
                        Mode::Mxfp8 => super::fp8::e4m3(bytes[i]) * scales[g],
                    };
                }
            });
        if let Some(at) = values.iter().position(|v| !v.is_finite()) {
            let (r, i) = (at / cols, at % cols);
            return Err(Error::bad_tensor(
                file.path(),
                name,
                format!(
                    "the non-finite value {} at row {}, column {i} (its scale in `{}` is {}{})",
                    values[at],
                    rows.start + r,
                    w.scales.name,
                    scales[r * groups + i / group],
                    match biases.get(r * groups + i / group) {
                        Some(b) => format!(", its bias {b}"),
                        None => String::new(),
                    }
                ),
            ));
        }
        Ok(Some((RawBytes::Decoded(values), FloatType::F32, cols)))
    }
}

impl Mlx {
    /// The scales of rows `rows` as f32: floats in the affine mode, E8M0 or F8_E4M3 bytes in the
    /// others.
    fn scales_of(&self, shards: &[TensorFile], rows: &Range<usize>) -> Vec<f32> {
        let groups = self.shape[1] / self.params.group;
        let range = rows.start * groups..rows.end * groups;
        let bytes = || {
            &shards[self.scales.shard]
                .bytes(&self.scales.name)
                .expect("indexed")[range.clone()]
        };
        match self.params.mode {
            Mode::Affine => read_f32_range(shards, &self.scales, range.clone()),
            Mode::Nvfp4 => bytes().iter().map(|&s| super::fp8::e4m3(s)).collect(),
            Mode::Mxfp4 | Mode::Mxfp8 => bytes()
                .iter()
                .map(|&s| crate::io::expert_views::e8m0(s))
                .collect(),
        }
    }
}

/// A weight's parts checked against its parameters: the codes' words make whole groups, the
/// scales (and, affine, the biases) have one value a group of a row, of the mode's type.
fn check(
    params: Params,
    codes: &Part,
    scales: Part,
    biases: Option<Part>,
    shards: &[TensorFile],
) -> Result<Mlx> {
    let Params { mode, group, bits } = params;
    let (shape, _) = shape_of(shards, codes);
    let (out, words) = (shape[0], shape[1]);
    if words > 1 << 24 || out > 1 << 24 {
        return Err(bad(
            shards,
            codes,
            format!("U32 {shape:?}: wider or taller than 2^24"),
        ));
    }
    let inn = words * 32 / bits;
    if words * 32 % bits != 0 || inn % group != 0 {
        return Err(bad(
            shards,
            codes,
            format!(
                "U32 {shape:?}: {words} words a row are not whole groups of {group} {bits}-bit \
                 codes"
            ),
        ));
    }
    let groups = inn / group;
    let check_part = |p: &Part, what: &str| -> Result<()> {
        let (shape, dtype) = shape_of(shards, p);
        let type_fits = match mode {
            Mode::Affine => FloatType::from_dtype(dtype).is_some(),
            _ => dtype == Dtype::U8,
        };
        if shape != [out, groups] || !type_fits {
            let ty = if mode == Mode::Affine { "floats" } else { "U8" };
            return Err(bad(
                shards,
                p,
                format!(
                    "{what} {dtype:?} {shape:?} beside `{}` {:?}: expected {ty} [{out}, {groups}] \
                     ({bits}-bit codes in groups of {group})",
                    codes.name,
                    [out, words]
                ),
            ));
        }
        Ok(())
    };
    check_part(&scales, "scales")?;
    match (mode, &biases) {
        (Mode::Affine, Some(b)) => check_part(b, "biases")?,
        (Mode::Affine, None) => {
            let biases = scales.name.replace(".scales", ".biases");
            return Err(bad(
                shards,
                codes,
                format!("affine codes without their biases (`{biases}`)"),
            ));
        }
        (_, Some(b)) => {
            return Err(bad(
                shards,
                b,
                format!(
                    "biases beside {} codes, which have none: the config's mode and the tensors \
                     disagree",
                    mode.name()
                ),
            ));
        }
        (_, None) => {}
    }
    Ok(Mlx {
        params,
        shard: codes.shard,
        scales,
        biases,
        shape: [out, inn],
    })
}

#[cfg(test)]
#[path = "mlx_tests.rs"]
mod tests;
