//! Experts a checkpoint stores fused, one tensor per projection for all of a layer's experts
//! (GPT-OSS: `mlp.experts.gate_up_proj` `[E, hidden, 2·width]` with the gate's and the up
//! projection's outputs alternating, `mlp.experts.down_proj` `[E, width, hidden]`, in bf16 or as
//! MXFP4 blocks and scales), presented one expert's `[out, in]` weight at a time under the names
//! the architecture table gives its expert modules (`mlp.experts.5.up_proj.weight`), so that
//! every part of the engine reads them as it reads a checkpoint that stores each expert alone.
//! An expert's weight is built when it is read, as a GGUF's quantized weight is: a float
//! tensor's wanted rows or columns gathered in its own type (no value changes), MXFP4 decoded to
//! f32.

use std::collections::HashMap;
use std::ops::Range;

use rayon::prelude::*;
use safetensors::Dtype;

use crate::arch::{Arch, Block, Part};
use crate::error::{Error, Result};
use crate::io::config::ModelConfig;
use crate::io::safetensors::{decode_f32, first_non_finite, FloatType, TensorFile};
use crate::io::RawBytes;

/// MXFP4 values per block (one shared scale), and the bytes that hold them (two per byte).
const BLOCK: usize = 32;
const BLOCK_BYTES: usize = BLOCK / 2;

/// FP4 (E2M1) values by code, as the OCP Microscaling format defines them.
const FP4: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Every expert weight a checkpoint stores fused, by the name it is presented under.
#[derive(Debug, Default)]
pub struct ExpertViews {
    views: HashMap<String, View>,
}

/// One expert's weight inside a fused tensor.
#[derive(Debug, Clone)]
struct View {
    shard: usize,
    source: Source,
    expert: usize,
    /// The fused tensor's output rows (`[E, out, in]` order) for all experts.
    fused_out: usize,
    /// Row j of this weight is the fused tensor's output row `first + j·step`.
    first: usize,
    step: usize,
    /// `[out, in]` of this expert's weight.
    shape: [usize; 2],
}

#[derive(Debug, Clone)]
enum Source {
    /// A float tensor, `[E, in, out]` when transposed, else `[E, out, in]`.
    Float { tensor: String, transposed: bool },
    /// MXFP4: `<name>_blocks` `[E, out, in/32, 16]` (in the view's shard) and `<name>_scales`
    /// `[E, out, in/32]` (in `scales_shard`).
    Mxfp4 {
        blocks: String,
        scales: String,
        scales_shard: usize,
    },
}

impl Source {
    /// The stored tensor (and its shard, given the view's) that can hold a non-finite value:
    /// the float tensor, or MXFP4's scales (whose byte 255 is NaN).
    fn finite_source(&self, shard: usize) -> (&str, usize) {
        match self {
            Source::Float { tensor, .. } => (tensor, shard),
            Source::Mxfp4 {
                scales,
                scales_shard,
                ..
            } => (scales, *scales_shard),
        }
    }
}

impl ExpertViews {
    /// The expert weights a checkpoint of this family stores fused (none where the table stores
    /// experts one module each, or the config has none), each fused tensor's type and shape
    /// checked against the config. A weight also stored on its own is read as stored.
    pub fn find(
        arch: &Arch,
        config: &ModelConfig,
        shards: &[TensorFile],
        index: &HashMap<String, usize>,
    ) -> Result<Self> {
        let mut views = HashMap::new();
        let (Some(spec), Some(experts)) = (&arch.stored_experts, &config.experts) else {
            return Ok(ExpertViews { views });
        };
        let (hidden, width, count) = (config.hidden_size, experts.width, experts.count);
        let projections = [
            (&spec.gate_up, vec![Part::Gate, Part::Up], 2 * width, hidden),
            (&spec.down, vec![Part::Down], hidden, width),
        ];
        for prefix in &arch.layer_prefixes {
            for layer in 0..config.num_hidden_layers {
                for (param, parts, out, inn) in &projections {
                    let name = format!("{prefix}.{layer}.{param}");
                    let Some((shard, source)) = stored(&name, index, spec.transposed) else {
                        continue;
                    };
                    check(shards, shard, &source, [count, *out, *inn])?;
                    for expert in 0..count {
                        for (slot, &part) in parts.iter().enumerate() {
                            let module = arch
                                .module_in(Block::Experts, part)
                                .expect("a table with stored experts has expert modules");
                            let key =
                                format!("{prefix}.{layer}.{}.weight", module.key_at(Some(expert)));
                            if index.contains_key(&key) {
                                continue;
                            }
                            let rows = out / parts.len();
                            let (first, step) =
                                arch.gate_up_rows().placement(slot, parts.len(), rows);
                            let view = View {
                                shard,
                                source: source.clone(),
                                expert,
                                fused_out: *out,
                                first,
                                step,
                                shape: [rows, *inn],
                            };
                            views.insert(key, view);
                        }
                    }
                }
            }
        }
        Ok(ExpertViews { views })
    }

    pub fn has(&self, name: &str) -> bool {
        self.views.contains_key(name)
    }

    /// `[out, in]` of an expert's weight.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.views.get(name).map(|v| v.shape.as_slice())
    }

    /// The shard holding the MXFP4 scales an expert's weight is built with (None for a float
    /// tensor).
    pub fn scales_shard(&self, name: &str) -> Option<usize> {
        match self.views.get(name)?.source {
            Source::Mxfp4 { scales_shard, .. } => Some(scales_shard),
            Source::Float { .. } => None,
        }
    }

    /// The shard holding the fused tensor an expert's weight is read from.
    pub fn shard(&self, name: &str) -> Option<usize> {
        self.views.get(name).map(|v| v.shard)
    }

    /// The type an expert's weight is read in: the fused tensor's own, f32 for MXFP4.
    pub fn float_type(&self, name: &str, shards: &[TensorFile]) -> Option<FloatType> {
        let v = self.views.get(name)?;
        match &v.source {
            Source::Float { tensor, .. } => shards[v.shard]
                .entry(tensor)
                .and_then(|e| FloatType::from_dtype(e.dtype)),
            Source::Mxfp4 { .. } => Some(FloatType::F32),
        }
    }

    /// Rows `rows` of an expert's weight, built from the fused tensor: (bytes, their type, row
    /// length), as [`TensorFile::rows_raw`] hands out rows; NaN and Inf refused, naming the
    /// stored tensor and where the value lies in the expert's weight. None where `name` is no
    /// such weight.
    pub fn read_rows(
        &self,
        name: &str,
        rows: Range<usize>,
        shards: &[TensorFile],
    ) -> Result<Option<(RawBytes<'static>, FloatType, usize)>> {
        let Some(v) = self.views.get(name) else {
            return Ok(None);
        };
        let file = &shards[v.shard];
        let [out, cols] = v.shape;
        crate::io::check_rows(file.path(), name, &rows, out, cols)?;
        let (bytes, ty) = match &v.source {
            Source::Float { tensor, transposed } => {
                let (slab, ty, _) = file.rows_raw_unchecked(tensor, v.expert..v.expert + 1)?;
                let bytes = match (transposed, ty.size()) {
                    (false, size) => v.gather_rows(slab, size, rows.clone()),
                    (true, 2) => v.gather_columns::<u16>(slab, rows.clone()),
                    (true, _) => v.gather_columns::<u32>(slab, rows.clone()),
                };
                (RawBytes::Owned(bytes), ty)
            }
            Source::Mxfp4 {
                blocks,
                scales,
                scales_shard,
            } => {
                let blocks = file.bytes(blocks).expect("checked when found");
                let scales = shards[*scales_shard]
                    .bytes(scales)
                    .expect("checked when found");
                let values = v.mxfp4_rows(blocks, scales, rows.clone());
                (RawBytes::Decoded(values), FloatType::F32)
            }
        };
        if let Some(at) = first_non_finite(&bytes, ty) {
            let value = decode_f32(&bytes[at * ty.size()..][..ty.size()], ty)[0];
            let (tensor, shard) = v.source.finite_source(v.shard);
            return Err(Error::bad_tensor(
                shards[shard].path(),
                tensor,
                format!(
                    "expert {}'s weight (read as `{name}`) has the non-finite value {value} at \
                     row {}, column {}",
                    v.expert,
                    rows.start + at / cols,
                    at % cols
                ),
            ));
        }
        Ok(Some((bytes, ty, cols)))
    }
}

impl View {
    /// The fused tensor's output row of this weight's row j.
    fn fused_row(&self, j: usize) -> usize {
        self.first + j * self.step
    }

    /// `[E, out, in]`: whole stored rows of `size`-byte values (`slab` is the expert's
    /// `[out, in]`), as stored.
    fn gather_rows(&self, slab: &[u8], size: usize, rows: Range<usize>) -> Vec<u8> {
        let row_bytes = self.shape[1] * size;
        let mut bytes = vec![0u8; rows.len() * row_bytes];
        for (row, j) in bytes.chunks_mut(row_bytes).zip(rows) {
            row.copy_from_slice(&slab[self.fused_row(j) * row_bytes..][..row_bytes]);
        }
        bytes
    }

    /// `[E, in, out]`: the weight's rows are columns of the expert's `[in, out]` slab of `T`
    /// values (u16 for bf16 and f16, u32 for f32), gathered as stored. A band of TILE result
    /// rows at a time: each stored row gives the band one short run of values, and the band's
    /// rows stay in cache.
    fn gather_columns<T: bytemuck::Pod + Send + Sync>(
        &self,
        slab: &[u8],
        rows: Range<usize>,
    ) -> Vec<u8> {
        const TILE: usize = 64;
        let inputs = self.shape[1];
        // A slab the file does not align for T (a writer's odd offsets) is copied first.
        let aligned: std::borrow::Cow<[T]> = match bytemuck::try_cast_slice(slab) {
            Ok(values) => values.into(),
            Err(_) => bytemuck::pod_collect_to_vec::<u8, T>(slab).into(),
        };
        let mut out = vec![T::zeroed(); rows.len() * inputs];
        out.par_chunks_mut(TILE * inputs)
            .enumerate()
            .for_each(|(t, band)| {
                let first = self.fused_row(rows.start + t * TILE);
                let count = band.len() / inputs;
                for i in 0..inputs {
                    let from = &aligned[i * self.fused_out + first..];
                    for jj in 0..count {
                        band[jj * inputs + i] = from[jj * self.step];
                    }
                }
            });
        bytemuck::cast_slice(&out).to_vec()
    }

    /// MXFP4: each output row is `in/32` blocks of 16 bytes (low nibble first) and one scale
    /// byte per block, `2^(scale − 127)`.
    fn mxfp4_rows(&self, blocks: &[u8], scales: &[u8], rows: Range<usize>) -> Vec<f32> {
        let cols = self.shape[1];
        let groups = cols / BLOCK;
        let mut values = vec![0f32; rows.len() * cols];
        values.par_chunks_mut(cols).zip(rows).for_each(|(row, j)| {
            let stored = self.expert * self.fused_out + self.fused_row(j);
            let bytes = &blocks[stored * groups * BLOCK_BYTES..][..groups * BLOCK_BYTES];
            let row_scales = &scales[stored * groups..][..groups];
            for ((out, block), &scale) in row
                .chunks_mut(BLOCK)
                .zip(bytes.chunks(BLOCK_BYTES))
                .zip(row_scales)
            {
                let s = e8m0(scale);
                for (pair, &byte) in out.chunks_mut(2).zip(block) {
                    pair[0] = FP4[(byte & 0x0f) as usize] * s;
                    pair[1] = FP4[(byte >> 4) as usize] * s;
                }
            }
        });
        values
    }
}

/// An E8M0 scale: `2^(byte − 127)`, NaN for 255 (the format's NaN).
pub(crate) fn e8m0(byte: u8) -> f32 {
    match byte {
        255 => f32::NAN,
        b => 2f64.powi(b as i32 - 127) as f32,
    }
}

/// Where a fused tensor named `name` is stored, and how: a float tensor of that name, or MXFP4
/// blocks and scales (the shard of the blocks; the scales' is looked up too, and a missing
/// scales tensor refused by `check`).
fn stored(name: &str, index: &HashMap<String, usize>, transposed: bool) -> Option<(usize, Source)> {
    if let Some(&shard) = index.get(name) {
        let source = Source::Float {
            tensor: name.to_string(),
            transposed,
        };
        return Some((shard, source));
    }
    let (blocks, scales) = (format!("{name}_blocks"), format!("{name}_scales"));
    let shard = *index.get(&blocks)?;
    let scales_shard = index.get(&scales).copied().unwrap_or(usize::MAX);
    let source = Source::Mxfp4 {
        blocks,
        scales,
        scales_shard,
    };
    Some((shard, source))
}

/// Checks a fused tensor's type and shape against `[experts, out, in]` from the config (the
/// tensor in `shards[shard]`, MXFP4's scales where `stored` found them).
fn check(
    shards: &[TensorFile],
    shard: usize,
    source: &Source,
    [e, out, inn]: [usize; 3],
) -> Result<()> {
    let file = &shards[shard];
    let bad = |tensor: &str, reason: String| Error::bad_tensor(file.path(), tensor, reason);
    let implied = "config.json implies";
    match source {
        Source::Float { tensor, transposed } => {
            let entry = file.entry(tensor).expect("indexed in this shard");
            let want = match *transposed {
                true => vec![e, inn, out],
                false => vec![e, out, inn],
            };
            if FloatType::from_dtype(entry.dtype).is_none() {
                return Err(bad(
                    tensor,
                    format!(
                        "dtype {:?} is not a float type (bf16, f16, f32)",
                        entry.dtype
                    ),
                ));
            }
            if entry.shape != want {
                return Err(bad(
                    tensor,
                    format!(
                        "shape {:?}, but {implied} {want:?} ({e} experts)",
                        entry.shape
                    ),
                ));
            }
        }
        Source::Mxfp4 {
            blocks,
            scales,
            scales_shard,
        } => {
            if inn % BLOCK != 0 {
                return Err(bad(
                    blocks,
                    format!("MXFP4 blocks of {BLOCK} cannot cover rows of {inn} inputs"),
                ));
            }
            let groups = inn / BLOCK;
            let scales_file = shards
                .get(*scales_shard)
                .ok_or_else(|| Error::MissingTensor {
                    path: file.path().to_path_buf(),
                    tensor: scales.clone(),
                    hint: format!(" (no shard holds it; the MXFP4 blocks `{blocks}` need it)"),
                })?;
            for (tensor, want, file) in [
                (blocks, vec![e, out, groups, BLOCK_BYTES], file),
                (scales, vec![e, out, groups], scales_file),
            ] {
                let entry = file.entry(tensor).expect("indexed in this shard");
                if entry.dtype != Dtype::U8 || entry.shape != want {
                    return Err(Error::bad_tensor(
                        file.path(),
                        tensor,
                        format!(
                            "{:?} {:?}, but MXFP4 experts as {implied} are U8 {want:?}",
                            entry.dtype, entry.shape
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e8m0_scales_are_powers_of_two() {
        assert_eq!(e8m0(127), 1.0);
        assert_eq!(e8m0(128), 2.0);
        assert_eq!(e8m0(120), 2f32.powi(-7));
        assert_eq!(e8m0(0), 2f64.powi(-127) as f32);
        assert!(e8m0(0) > 0.0);
        assert!(e8m0(255).is_nan());
    }
}
