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
//! model keeps, rounds it once) and the bias is added once, rounding once.
//!
//! A mixture of experts' layer keeps its experts stacked, `<layer>.mlp.switch_mlp.gate_proj.weight`
//! `[experts, out, in]` (quantized: words `[experts, out, in·bits/32]`, scales and biases
//! `[experts, out, groups]`; or a float tensor where the experts are left unquantized): each
//! expert is presented under its Hugging Face name, `<layer>.mlp.experts.<e>.gate_proj.weight`
//! (Mixtral's `block_sparse_moe.experts.<e>.w1`, `w3` and `w2` for mlx-lm's `gate_proj`,
//! `up_proj` and `down_proj`), as its rows of the stack; GPT-OSS's and Llama 4's stacks are
//! `<layer>.mlp.experts.<proj>.weight` (and `feed_forward.experts`). Latent attention's
//! `kv_b_proj`, which mlx-lm's DeepSeek-V3 and GLM-4.7-Flash split per head, is rebuilt from its
//! halves ([`super::mlx_latent`]).

use std::collections::HashMap;
use std::ops::Range;

use rayon::prelude::*;
use safetensors::Dtype;

use super::mlx_latent::{Latent, LatentHalf};
use super::mlx_params::{check, params_for, shape_of, Mode, Params, Quantized};
use super::packed::{bad, e2m1, read_f32_range, stream, word, Part};
use crate::error::{Error, Result};
use crate::io::safetensors::{decode_f32, FloatType, TensorFile};
use crate::io::RawBytes;

/// Every MLX weight of a checkpoint presented as values, by the name it is presented under.
#[derive(Debug, Default)]
pub struct MlxWeights {
    weights: HashMap<String, Mlx>,
    /// Latent attention's `kv_b_proj`, which mlx-lm stores split per head.
    latent: HashMap<String, Latent>,
}

/// One weight: rows `first_row..first_row + out` of the stored codes (all of a 2-D weight's; one
/// expert's of a stack read as `[experts·out, …]`).
#[derive(Debug, Clone)]
pub(super) struct Mlx {
    pub(super) codes: Part,
    /// How its codes become values; None for a float stack of experts (or a latent attention's
    /// half) MLX left unquantized.
    quantized: Option<Quantized>,
    /// `[out, in]`.
    pub(super) shape: [usize; 2],
    first_row: usize,
}

/// The Hugging Face name of expert `e`'s projection `proj` of the stack under `parent`
/// (`model.layers.3.mlp` → `model.layers.3.mlp.experts.<e>.<proj>.weight`; Mixtral's
/// `block_sparse_moe` names them `w1`, `w3`, `w2`).
fn expert_name(parent: &str, proj: &str, e: usize) -> String {
    format!("{}.weight", expert_module(parent, proj, e))
}

/// The Hugging Face module of expert `e`'s projection `proj` of the stack `<parent>.switch_mlp`
/// (the weight's name without `.weight`; also how an MLX adapter's stacked LoRA is read).
pub(crate) fn expert_module(parent: &str, proj: &str, e: usize) -> String {
    let proj = match (parent.ends_with("block_sparse_moe"), proj) {
        (true, "gate_proj") => "w1",
        (true, "up_proj") => "w3",
        (true, "down_proj") => "w2",
        _ => proj,
    };
    format!("{parent}.experts.{e}.{proj}")
}

/// The `(<parent>, <proj>)` of a module that is a stack of experts in mlx-lm's models: its
/// `<parent>.switch_mlp.<proj>`, or `<parent>.experts.<proj>` (the SwitchGLU of its GPT-OSS and
/// Llama 4 ports), for the gate, up and down projections.
pub(crate) fn stack_parts(module: &str) -> Option<(&str, &str)> {
    let (parent, proj) = module
        .split_once(".switch_mlp.")
        .or_else(|| module.rsplit_once(".experts."))?;
    matches!(proj, "gate_proj" | "up_proj" | "down_proj").then_some((parent, proj))
}

/// The stack `(<parent>, <proj>)` of mlx-lm's `<parent>.switch_mlp.<proj>` that holds the Hugging
/// Face expert module `module` (`<parent>.experts.<e>.<proj>`, Mixtral's `w1`, `w3`, `w2`), and
/// the expert's index: the inverse of [`expert_module`].
pub(crate) fn stack_of(module: &str) -> Option<(&str, &'static str, usize)> {
    let (parent, rest) = module.rsplit_once(".experts.")?;
    let (index, proj) = rest.split_once('.')?;
    let canonical = !index.is_empty()
        && index.bytes().all(|b| b.is_ascii_digit())
        && (index == "0" || !index.starts_with('0'));
    let e = index.parse().ok().filter(|_| canonical)?;
    let proj = match (parent.ends_with("block_sparse_moe"), proj) {
        (true, "w1") => "gate_proj",
        (true, "w3") => "up_proj",
        (true, "w2") => "down_proj",
        (false, "gate_proj") => "gate_proj",
        (false, "up_proj") => "up_proj",
        (false, "down_proj") => "down_proj",
        _ => return None,
    };
    Some((parent, proj, e))
}

/// A module's quantization parameters, refused where the config has none or says `false`.
fn params_of(
    quant: &serde_json::Value,
    module: &str,
    codes: &Part,
    shards: &[TensorFile],
) -> Result<Params> {
    if !quant.is_object() {
        return Err(bad(
            shards,
            codes,
            "MLX-quantized codes beside their scales, but config.json has no `quantization` \
             (their width and group size)"
                .to_string(),
        ));
    }
    match params_for(quant, module) {
        Ok(Some(p)) => Ok(p),
        Ok(None) => Err(bad(
            shards,
            codes,
            format!("quantized codes, but config.json's quantization.\"{module}\" is false"),
        )),
        Err(why) => Err(bad(shards, codes, format!("config.json: {why}"))),
    }
}

impl MlxWeights {
    /// The checkpoint's MLX weights: every U32 `<module>.weight` beside a `<module>.scales`,
    /// checked against its parts and the config's `quantization`, and every stack of experts
    /// (`….switch_mlp.<proj>.weight`, or GPT-OSS's and Llama 4's `….experts.<proj>.weight`,
    /// quantized or not), one weight an expert, and latent attention's halves, one `kv_b_proj`
    /// an attention (no tensor data is read).
    pub fn find(
        config: &serde_json::Value,
        shards: &[TensorFile],
        index: &HashMap<String, usize>,
    ) -> Result<Self> {
        let quant = &config["quantization"];
        let mut weights = HashMap::new();
        let mut halves = HashMap::new();
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
            let stack = stack_parts(module);
            let part = |suffix: &str| {
                let name = format!("{module}.{suffix}");
                index.get(&name).map(|&shard| Part { shard, name })
            };
            // Latent attention's key and value halves of `kv_b_proj`, a matrix per head.
            let half = LatentHalf::of(module);
            // A 2-D weight, or a 3-D stack of experts or heads (other tensors are not MLX's
            // weights).
            let fits = match stack.is_some() || half.is_some() {
                true => shape.len() == 3,
                false => shape.len() == 2,
            };
            let (quantized, inn) = match part("scales") {
                Some(scales) if dtype == Dtype::U32 && fits => {
                    let params = params_of(quant, module, &codes, shards)?;
                    let (q, inn) = check(params, &codes, scales, part("biases"), shards)?;
                    (Some(q), inn)
                }
                None if fits && (stack.is_some() || half.is_some()) => {
                    match FloatType::from_dtype(dtype) {
                        Some(_) => (None, shape[2]),
                        None => continue,
                    }
                }
                _ => continue,
            };
            if shape.len() == 3 {
                // (Checked before anything is sized by them, one weight an expert made or a
                // latent half's heads laid end to end: a header can claim any count.)
                let what = if half.is_some() { "heads" } else { "experts" };
                let (count, rows) = (shape[0], shape[1]);
                if count == 0 || count > 1 << 16 || rows == 0 || rows > 1 << 24 || inn == 0 {
                    return Err(bad(
                        shards,
                        &codes,
                        format!("a stack of {what} {shape:?}: no {what}, rows or inputs, or past 2^16 {what} or 2^24 rows"),
                    ));
                }
                if inn > 1 << 24 {
                    return Err(bad(shards, &codes, format!("{shape:?}: wider than 2^24")));
                }
            }
            if let Some(half) = half {
                let (heads, rows) = (shape[0], shape[1]);
                let w = Mlx {
                    codes,
                    quantized,
                    shape: [heads * rows, inn],
                    first_row: 0,
                };
                halves.insert(module.to_string(), (half, w, heads));
                continue;
            }
            let Some((parent, proj)) = stack else {
                let w = Mlx {
                    codes,
                    quantized,
                    shape: [shape[0], inn],
                    first_row: 0,
                };
                weights.insert(name.clone(), w);
                continue;
            };
            let (experts, out) = (shape[0], shape[1]);
            for e in 0..experts {
                let expert = expert_name(parent, proj, e);
                if index.contains_key(&expert) {
                    return Err(bad(
                        shards,
                        &codes,
                        format!("expert {e} is stored both here and alone, as `{expert}`"),
                    ));
                }
                let w = Mlx {
                    codes: codes.clone(),
                    quantized: quantized.clone(),
                    shape: [out, inn],
                    first_row: e * out,
                };
                weights.insert(expert, w);
            }
        }
        let latent = Latent::pair(halves, shards, index)?;
        Ok(MlxWeights { weights, latent })
    }

    pub fn has(&self, name: &str) -> bool {
        self.weights.contains_key(name) || self.latent.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.weights
            .keys()
            .chain(self.latent.keys())
            .map(String::as_str)
    }

    /// The experts, and latent attention's `kv_b_proj`, presented under a name no stored
    /// tensor has.
    pub fn built_names(&self) -> impl Iterator<Item = &str> {
        self.weights
            .iter()
            .filter(|(name, w)| w.codes.name != **name)
            .map(|(name, _)| name.as_str())
            .chain(self.latent.keys().map(String::as_str))
    }

    /// `[out, in]` of a weight.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        (self.weights.get(name).map(|w| &w.shape[..]))
            .or_else(|| self.latent.get(name).map(|l| &l.shape[..]))
    }

    /// The shard holding a weight's codes.
    pub fn shard(&self, name: &str) -> Option<usize> {
        (self.weights.get(name).map(|w| w.codes.shard))
            .or_else(|| self.latent.get(name).map(|l| l.halves()[0].codes.shard))
    }

    /// The shards of its scales and biases (and, for a latent `kv_b_proj`, of its halves).
    pub fn part_shards(&self, name: &str) -> Vec<usize> {
        if let Some(l) = self.latent.get(name) {
            return l.stored().map(|p| p.shard).collect();
        }
        self.weights
            .get(name)
            .map_or(Vec::new(), |w| w.parts().map(|p| p.shard).collect())
    }

    /// The stored tensors the weights are built from (a copy of the values leaves them out):
    /// scales, biases, the stacks of experts and latent attention's halves.
    pub fn parts(&self) -> impl Iterator<Item = String> + '_ {
        let latent = (self.latent.values()).flat_map(|l| l.stored().map(|p| p.name.clone()));
        self.weights
            .iter()
            .flat_map(|(name, w)| {
                let stack = Some(&w.codes).filter(|c| c.name != *name);
                w.parts()
                    .chain(stack)
                    .map(|p| p.name.clone())
                    .collect::<Vec<_>>()
            })
            .chain(latent)
    }

    /// Rows `rows` of a weight as f32 (row length too), NaN and Inf refused, naming the weight
    /// and where the value lies; None where `name` is no MLX weight.
    pub fn read_rows(
        &self,
        name: &str,
        rows: Range<usize>,
        shards: &[TensorFile],
    ) -> Result<Option<(RawBytes<'static>, FloatType, usize)>> {
        let (values, cols) = if let Some(l) = self.latent.get(name) {
            let [out, cols] = l.shape;
            let file = &shards[l.halves()[0].codes.shard];
            crate::io::check_rows(file.path(), name, &rows, out, cols)?;
            (l.read(rows, shards)?, cols)
        } else if let Some(w) = self.weights.get(name) {
            let [out, cols] = w.shape;
            let file = &shards[w.codes.shard];
            crate::io::check_rows(file.path(), name, &rows, out, cols)?;
            (w.values(name, rows, shards)?, cols)
        } else {
            return Ok(None);
        };
        Ok(Some((RawBytes::Decoded(values), FloatType::F32, cols)))
    }
}

impl Mlx {
    /// Rows `rows` of this weight as f32, NaN and Inf refused, naming it `name` and where the
    /// value lies.
    pub(super) fn values(
        &self,
        name: &str,
        rows: Range<usize>,
        shards: &[TensorFile],
    ) -> Result<Vec<f32>> {
        let [_, cols] = self.shape;
        let file = &shards[self.codes.shard];
        let stored = self.first_row + rows.start..self.first_row + rows.end;
        let codes = file.bytes(&self.codes.name).expect("indexed");
        let Some(q) = &self.quantized else {
            let ty = FloatType::from_dtype(shape_of(shards, &self.codes).1).expect("checked");
            let bytes = &codes[stored.start * cols * ty.size()..stored.end * cols * ty.size()];
            let values = decode_f32(bytes, ty);
            if let Some(at) = values.iter().position(|v| !v.is_finite()) {
                let (r, i) = (rows.start + at / cols, at % cols);
                return Err(Error::bad_tensor(
                    file.path(),
                    name,
                    format!("the non-finite value {} at row {r}, column {i}", values[at]),
                ));
            }
            return Ok(values);
        };
        let Params { mode, group, bits } = q.params;
        let groups = cols / group;
        let row_bytes = cols * bits / 8;
        let scales = q.scales_of(shards, &stored, groups);
        let biases = match &q.biases {
            Some(b) => read_f32_range(shards, b, stored.start * groups..stored.end * groups),
            None => Vec::new(),
        };
        let mut values = vec![0f32; rows.len() * cols];
        values
            .par_chunks_mut(cols.max(1))
            .enumerate()
            .for_each(|(r, row)| {
                let o = stored.start + r;
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
            let g = r * groups + i / group;
            return Err(Error::bad_tensor(
                file.path(),
                name,
                format!(
                    "the non-finite value {} at row {}, column {i} (its scale in `{}` is {}{})",
                    values[at],
                    rows.start + r,
                    q.scales.name,
                    scales[g],
                    biases
                        .get(g)
                        .map_or(String::new(), |b| format!(", its bias {b}"))
                ),
            ));
        }
        Ok(values)
    }

    /// The weight of `count` of its rows from row `first` on (a head of a latent half).
    pub(super) fn rows_of(&self, first: usize, count: usize) -> Mlx {
        Mlx {
            shape: [count, self.shape[1]],
            first_row: self.first_row + first,
            ..self.clone()
        }
    }

    pub(super) fn parts(&self) -> impl Iterator<Item = &Part> {
        self.quantized
            .iter()
            .flat_map(|q| std::iter::once(&q.scales).chain(&q.biases))
    }
}

impl Quantized {
    /// The scales of stored rows `rows` (`groups` a row) as f32: floats in the affine mode,
    /// E8M0 or F8_E4M3 bytes in the others.
    fn scales_of(&self, shards: &[TensorFile], rows: &Range<usize>, groups: usize) -> Vec<f32> {
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

#[cfg(test)]
#[path = "mlx_tests.rs"]
mod tests;
