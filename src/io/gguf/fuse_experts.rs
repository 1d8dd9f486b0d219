//! `convert --gguf` for a family whose checkpoints store experts fused (Llama 4, GPT-OSS): the
//! experts a GGUF stacks one projection at a time, and this engine reads one expert at a time,
//! written back as the family's own fused tensors (`gate_up_proj` with the gate's and the up
//! projection's outputs as the table places them, `down_proj`, each `[E, in, out]` where the
//! table says `transposed`), which is how transformers loads them and how this engine reads such
//! a checkpoint.

use std::collections::BTreeSet;

use crate::arch::{Block, Part};
use crate::error::{Error, Result};
use crate::io::checkpoint::Checkpoint;
use crate::io::safetensors::{encode_f32, FloatType, OutTensor};

/// Tensor names written as they are, and the fused tensors written instead of others.
type Fused<'a> = (Vec<&'a str>, Vec<(String, OutTensor<'a>)>);

/// The checkpoint's tensor names with the experts' taken out, and the fused tensors that hold
/// them instead (none for a family that stores experts one module each).
pub fn fuse<'a>(ckpt: &'a Checkpoint, names: Vec<&'a str>, ty: FloatType) -> Result<Fused<'a>> {
    let arch = crate::arch::for_config(&ckpt.config, &ckpt.config_path())?;
    let (Some(spec), Some(experts)) = (&arch.stored_experts, &ckpt.config.experts) else {
        return Ok((names, Vec::new()));
    };
    let prefix = arch.detect_prefix(ckpt)?;
    let (names, biases) = fuse_biases(ckpt, names, prefix, spec, ty, arch.gate_up_rows())?;
    let (mut rest, mut layers) = (Vec::new(), BTreeSet::new());
    for name in names {
        let module = name.strip_suffix(".weight");
        match module.and_then(|m| arch.parse_module(prefix, m)) {
            Some((layer, Some(_), _)) => {
                layers.insert(layer);
            }
            _ => rest.push(name),
        }
    }
    let (hidden, width, count) = (ckpt.config.hidden_size, experts.width, experts.count);
    let (transposed, rows) = (spec.transposed, arch.gate_up_rows());
    let projections = [
        (
            spec.gate_up.as_str(),
            vec![Part::Gate, Part::Up],
            2 * width,
            hidden,
        ),
        (spec.down.as_str(), vec![Part::Down], hidden, width),
    ];
    let mut fused = Vec::new();
    for layer in layers {
        for (param, parts, out, inn) in &projections {
            let (out, inn) = (*out, *inn);
            // Every expert's weight of each part, as the reader presents them.
            let mut keys = Vec::new();
            for e in 0..count {
                for &part in parts {
                    let module = arch
                        .module_in(Block::Experts, part)
                        .expect("a table with stored experts has expert modules");
                    let key = format!("{prefix}.{layer}.{}.weight", module.key_at(Some(e)));
                    if !ckpt.has(&key) {
                        return Err(Error::MissingTensor {
                            path: ckpt.dir.clone(),
                            tensor: key,
                            hint: format!(
                                " (layer {layer} has experts, and `{prefix}.{layer}.{param}` \
                                 needs all {count} of them)"
                            ),
                        });
                    }
                    // Each expert's weight is a band of the slab: its shape must be the part's.
                    let want = [out / parts.len(), inn];
                    let shape = ckpt.shape(&key)?;
                    if shape != want {
                        return Err(Error::bad_tensor(
                            &ckpt.dir,
                            &key,
                            format!(
                                "shape {shape:?}, where `{prefix}.{layer}.{param}` needs {want:?} \
                                 per expert (hidden_size and the experts' width of the config)"
                            ),
                        ));
                    }
                    keys.push(key);
                }
            }
            let shape = match transposed {
                true => vec![count, inn, out],
                false => vec![count, out, inn],
            };
            let slots = parts.len();
            // Each expert's slab is contiguous in either layout: built, encoded and written one
            // expert at a time, so that no more than one expert's slab is in memory (a layer's
            // fused `gate_up_proj` is 21 GB in bf16 in Llama 4 Maverick).
            let tensor = OutTensor::streamed(ty, shape, move |sink| {
                let part_rows = out / slots;
                let mut slab = vec![0f32; out * inn];
                for expert_keys in keys.chunks(slots) {
                    for (slot, key) in expert_keys.iter().enumerate() {
                        let w = ckpt.read_rows_f32(key, 0..part_rows)?;
                        let (start, step) = rows.placement(slot, slots, part_rows);
                        for j in 0..part_rows {
                            let o = start + j * step;
                            for (i, &x) in w[j * inn..(j + 1) * inn].iter().enumerate() {
                                let at = match transposed {
                                    true => i * out + o,
                                    false => o * inn + i,
                                };
                                slab[at] = x;
                            }
                        }
                    }
                    sink(&encode_f32(&slab, ty))?;
                }
                Ok(())
            });
            fused.push((format!("{prefix}.{layer}.{param}"), tensor));
        }
    }
    fused.extend(biases);
    Ok((rest, fused))
}

/// GPT-OSS's experts' gate and up biases (`[E, width]` each, as the GGUF splits them, read as
/// `<experts>.gate_proj_bias` and `up_proj_bias`) joined into its `gate_up_proj_bias`
/// `[E, 2·width]`, placed as the weights' outputs are; the names left, and the joined tensors.
fn fuse_biases<'a>(
    ckpt: &'a Checkpoint,
    names: Vec<&'a str>,
    prefix: &str,
    spec: &crate::arch::StoredExperts,
    ty: FloatType,
    rows: crate::io::adapter::GateUpRows,
) -> Result<Fused<'a>> {
    let Some(experts) = spec.gate_up.strip_suffix(".gate_up_proj") else {
        return Ok((names, Vec::new()));
    };
    let (mut consumed, mut fused) = (BTreeSet::new(), Vec::new());
    for &name in &names {
        let Some(layer) = name
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('.'))
            .and_then(|r| r.strip_suffix(&format!(".{experts}.gate_proj_bias")))
        else {
            continue;
        };
        let gate = name;
        let up = format!("{prefix}.{layer}.{experts}.up_proj_bias");
        let (Some(&up), Ok(shape)) = (names.iter().find(|n| **n == up), ckpt.shape(gate)) else {
            return Err(Error::MissingTensor {
                path: ckpt.dir.clone(),
                tensor: up,
                hint: format!(" (`{gate}` needs it to form `{}_bias`)", spec.gate_up),
            });
        };
        consumed.extend([gate, up]);
        let (count, width) = match *shape {
            [count, width] => (count, width),
            _ => {
                return Err(Error::bad_tensor(
                    &ckpt.dir,
                    gate,
                    format!("an expert bias must be [experts, width], not {shape:?}"),
                ))
            }
        };
        let tensor = OutTensor::streamed(ty, vec![count, 2 * width], move |sink| {
            let mut values = vec![0f32; count * 2 * width];
            for (slot, part) in [gate, up].into_iter().enumerate() {
                let b = ckpt.read_rows_f32(part, 0..count)?;
                let (start, step) = rows.placement(slot, 2, width);
                for e in 0..count {
                    for j in 0..width {
                        values[e * 2 * width + start + j * step] = b[e * width + j];
                    }
                }
            }
            sink(&encode_f32(&values, ty))
        });
        fused.push((format!("{prefix}.{layer}.{}_bias", spec.gate_up), tensor));
    }
    let rest = names
        .into_iter()
        .filter(|n| !consumed.contains(n))
        .collect();
    Ok((rest, fused))
}
