//! MLX's quantization parameters, as `config.json`'s `quantization` gives them (for the
//! checkpoint, and per module), and the shapes a quantized weight's parts must have under them
//! (the formats themselves: [`super::mlx`]).

use safetensors::Dtype;

use super::packed::{bad, Part};
use crate::error::Result;
use crate::io::safetensors::{FloatType, TensorFile};

/// How a group's codes become values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
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

    pub fn name(self) -> &'static str {
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
pub(super) struct Params {
    pub mode: Mode,
    pub group: usize,
    pub bits: usize,
}

/// A module's parameters: its own entry in `quantization` where there is one (`false` or
/// `null`: not quantized; `true`: the checkpoint's), else the checkpoint's. As in MLX, a group
/// size or width left out (or 0) is its mode's default, and a module's own entry without a mode
/// is affine whatever the checkpoint's.
pub(super) fn params_for(
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

/// A quantized weight's parts: its scales and, affine, biases.
#[derive(Debug, Clone)]
pub(super) struct Quantized {
    pub params: Params,
    pub scales: Part,
    pub biases: Option<Part>,
}

pub(super) fn shape_of<'s>(shards: &'s [TensorFile], p: &Part) -> (&'s [usize], Dtype) {
    let entry = shards[p.shard].entry(&p.name).expect("indexed");
    (&entry.shape, entry.dtype)
}

/// A weight's parts checked against its parameters: the codes' words (the last dimension of
/// `[out, words]`, or `[experts, out, words]`) make whole groups, and the scales (and, affine,
/// the biases) have one value a group of a row, of the mode's type, in the codes' leading
/// dimensions. Returns the parts and the inputs a row.
pub(super) fn check(
    params: Params,
    codes: &Part,
    scales: Part,
    biases: Option<Part>,
    shards: &[TensorFile],
) -> Result<(Quantized, usize)> {
    let Params { mode, group, bits } = params;
    let (shape, _) = shape_of(shards, codes);
    let (lead, words) = (&shape[..shape.len() - 1], shape[shape.len() - 1]);
    if words > 1 << 24 || lead.iter().any(|&d| d > 1 << 24) {
        return Err(bad(
            shards,
            codes,
            format!("U32 {shape:?}: a dimension past 2^24"),
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
    let want: Vec<usize> = lead.iter().copied().chain([inn / group]).collect();
    let check_part = |p: &Part, what: &str| -> Result<()> {
        let (got, dtype) = shape_of(shards, p);
        let type_fits = match mode {
            Mode::Affine => FloatType::from_dtype(dtype).is_some(),
            _ => dtype == Dtype::U8,
        };
        if got != want.as_slice() || !type_fits {
            let ty = if mode == Mode::Affine { "floats" } else { "U8" };
            return Err(bad(
                shards,
                p,
                format!(
                    "{what} {dtype:?} {got:?} beside `{}` {shape:?}: expected {ty} {want:?} \
                     ({bits}-bit codes in groups of {group})",
                    codes.name,
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
    let parts = Quantized {
        params,
        scales,
        biases,
    };
    Ok((parts, inn))
}
