//! Where each packed layout keeps its parts and what their shapes must be: GPTQ's and AWQ's
//! `qweight` beside `qzeros`, `scales` and `g_idx`, compressed-tensors' `weight_packed` beside
//! `weight_shape`, `weight_scale` and `weight_zero_point` (the layouts themselves:
//! [`super::packed`]). Besides headers, only small tensors are read: the two-value
//! `weight_shape`, `g_idx` (each input's group, checked once) and NVFP4's tensor-wide scale.

use std::collections::HashMap;

use safetensors::Dtype;

use super::packed::{bad, ints, read_f32_range, Layout, Packed, Part, Scheme};
use crate::error::{Error, Result};
use crate::io::safetensors::{FloatType, TensorFile};

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
pub(super) fn gptq_or_awq(
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
    // The zero points pack whole words of outputs.
    if out % per != 0 {
        return Err(bad(
            shards,
            &codes,
            format!("{out} outputs: the zero points pack {per} outputs a word"),
        ));
    }
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
        // (Before `g_idx` moves in.)
        group_of: g_idx
            .as_ref()
            .map(|p| groups_of(shards, p, groups))
            .transpose()?,
        g_idx,
        shape: [out, inn],
        groups,
        group,
        one_scale_row: false,
        global: None,
        activation: None,
        after: 1.0,
        shape_part: None,
    })
}

/// A compressed-tensors `pack-quantized` weight (`<weight>_packed`).
pub(super) fn compressed(
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
                 pack-quantized int32 words and NVFP4 bytes are read",
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
        // (In bounded as a config's widths are, so that no size computed from it overflows.)
        &[o, i] if o >= 0 && i > 0 && i <= 1 << 24 && o as usize == rows => {
            (o as usize, i as usize)
        }
        _ => {
            return Err(bad(
                shards,
                &stored_shape,
                format!("{dims:?}: expected [out, in] with out = the codes' {rows} rows"),
            ))
        }
    };
    // The width the words imply (for in ≥ 32 only one does); the config's where several fit.
    // 1, 2, 4 and 8 bits only: compressed-tensors' versions lay other widths out differently
    // (whole codes a word in older ones, a stream crossing words in newer ones), and a width the
    // config names must be the one the words hold (7-bit codes a whole word each fill as many
    // words as 8-bit ones).
    let named = scheme.group_bits();
    let fits: Vec<usize> = [1, 2, 4, 8]
        .into_iter()
        .filter(|b| (inn * b).div_ceil(32) == words)
        .filter(|b| named.is_empty() || named.contains(b))
        .collect();
    let bits = match fits.as_slice() {
        [b] => *b,
        _ => {
            return Err(bad(
                shards,
                &codes,
                format!(
                    "{words} words a row do not hold {inn} codes of 1, 2, 4 or 8 bits{}",
                    if named.is_empty() {
                        String::new()
                    } else {
                        format!(" (the config names {named:?} bits)")
                    }
                ),
            ))
        }
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
        // The config's group size where it names one (the last group may be partial), else
        // groups of equal size.
        None => match scheme.group_size() {
            Some(g) if inn.div_ceil(g) == groups => g,
            None if inn % groups == 0 => inn / groups,
            _ => {
                return Err(bad(
                    shards,
                    &scales,
                    format!(
                        "{groups} groups of scales for {inn} inputs, in groups of {:?} \
                         (config_groups' group_size)",
                        scheme.group_size()
                    ),
                ))
            }
        },
    };
    Ok(Packed {
        layout: Layout::CompressedTensors,
        bits,
        codes,
        scales,
        zeros,
        zeros_unpacked,
        // (Before `g_idx` moves in.)
        group_of: g_idx
            .as_ref()
            .map(|p| groups_of(shards, p, groups))
            .transpose()?,
        g_idx,
        shape: [out, inn],
        groups,
        group,
        one_scale_row,
        global: None,
        activation: None,
        after: 1.0,
        shape_part: Some(stored_shape),
    })
}

/// Inputs an NVFP4 scale covers.
const NVFP4_GROUP: usize = 16;

/// An NVFP4 weight `weight`, its codes in `codes` (compressed-tensors' `<weight>_packed`, or
/// ModelOpt's `<weight>` itself): U8 `[out, in/2]`, an F8_E4M3 `<weight>_scale` `[out, in/group]`,
/// and the tensor's f32 scale (`<weight>_global_scale`, divided by; `<weight>_scale_2`,
/// multiplied by).
pub(super) fn nvfp4(
    weight: &str,
    codes: &str,
    shards: &[TensorFile],
    index: &HashMap<String, usize>,
) -> Result<Packed> {
    let module = weight.strip_suffix(".weight").unwrap_or(weight);
    let codes = Part {
        shard: index[codes],
        name: codes.to_string(),
    };
    let (shape, _) = shape_of(shards, &codes);
    let [out, inn] = match shape {
        &[o, half] if half > 0 => [o, 2 * half],
        _ => {
            return Err(bad(
                shards,
                &codes,
                format!("shape {shape:?}: expected 2-D NVFP4 codes"),
            ))
        }
    };
    let scales = part(weight, "_scale", "scales", &codes, shards, index)?;
    let (sshape, sdtype) = shape_of(shards, &scales);
    let groups = match sshape {
        &[o, g] if o == out && g == inn.div_ceil(NVFP4_GROUP) && sdtype == Dtype::F8_E4M3 => g,
        _ => {
            return Err(bad(
                shards,
                &scales,
                format!(
                    "{sdtype:?} {sshape:?}: expected F8_E4M3 [{out}, {}], a scale per \
                     {NVFP4_GROUP} of the NVFP4 codes' {inn} inputs",
                    inn.div_ceil(NVFP4_GROUP)
                ),
            ))
        }
    };
    let (global, divides) = match index.get(&format!("{weight}_global_scale")) {
        Some(_) => (
            part(
                weight,
                "_global_scale",
                "global scale",
                &codes,
                shards,
                index,
            )?,
            true,
        ),
        None => (
            part(weight, "_scale_2", "second scale", &codes, shards, index)?,
            false,
        ),
    };
    let (gshape, gdtype) = shape_of(shards, &global);
    if gshape.iter().product::<usize>() != 1 || FloatType::from_dtype(gdtype).is_none() {
        return Err(bad(
            shards,
            &global,
            format!("{gdtype:?} {gshape:?}: expected one float for the tensor"),
        ));
    }
    let activation = [".input_global_scale", ".input_scale"]
        .iter()
        .map(|s| format!("{module}{s}"))
        .find_map(|name| {
            Some(Part {
                shard: *index.get(&name)?,
                name,
            })
        });
    Ok(Packed {
        layout: Layout::Nvfp4 { divides },
        bits: 4,
        codes,
        scales,
        zeros: None,
        zeros_unpacked: false,
        g_idx: None,
        shape: [out, inn],
        groups,
        group: NVFP4_GROUP,
        one_scale_row: false,
        after: read_f32_range(shards, &global, 0..1)[0],
        global: Some(global),
        activation,
        group_of: None,
        shape_part: None,
    })
}

/// Each input's group from a `g_idx`, checked against the scales' group count.
fn groups_of(shards: &[TensorFile], p: &Part, groups: usize) -> Result<std::sync::Arc<[u32]>> {
    let g = ints(&shards[p.shard], &p.name)?;
    if let Some((i, bad_group)) = g
        .iter()
        .enumerate()
        .find(|(_, &g)| g < 0 || g as usize >= groups)
    {
        return Err(bad(
            shards,
            p,
            format!("input {i} is in group {bad_group}, but the scales have {groups} groups"),
        ));
    }
    Ok(g.into_iter().map(|g| g as u32).collect())
}
