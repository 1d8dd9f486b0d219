//! Memory-mapped safetensors files: header validation (the safetensors crate's own checks: header
//! size cap, UTF-8 JSON, offsets that tile the data exactly, no overflow) and typed reads of single
//! tensors. Nothing is read until a tensor is asked for; a whole model is never copied into memory.
//! Also the float types and their conversions (`decode_f32`, `encode_f32`, NaN/Inf checks);
//! writing lives in `safetensors_write.rs`.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// Floating-point storage types the engine reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FloatType {
    F32,
    F16,
    Bf16,
}

impl FloatType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FloatType::F32 => 4,
            FloatType::F16 | FloatType::Bf16 => 2,
        }
    }

    /// The largest finite value of the type.
    pub fn max_finite(self) -> f32 {
        match self {
            FloatType::F32 => f32::MAX,
            FloatType::F16 => 65504.0,
            FloatType::Bf16 => 3.389_531_4e38,
        }
    }

    /// The smallest positive normal value of the type (below it precision is lost, and below
    /// its subnormals values round to zero).
    pub fn min_normal(self) -> f32 {
        match self {
            FloatType::F16 => 6.103_515_6e-5,
            FloatType::F32 | FloatType::Bf16 => f32::MIN_POSITIVE,
        }
    }

    /// The safetensors dtype tag.
    pub fn dtype(self) -> Dtype {
        match self {
            FloatType::F32 => Dtype::F32,
            FloatType::F16 => Dtype::F16,
            FloatType::Bf16 => Dtype::BF16,
        }
    }

    /// The float type of a safetensors dtype, if it is one the engine handles.
    pub fn from_dtype(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::F32 => Some(FloatType::F32),
            Dtype::F16 => Some(FloatType::F16),
            Dtype::BF16 => Some(FloatType::Bf16),
            _ => None,
        }
    }

    /// Parses `bf16`, `f16`, `f32` (also `float32`, `bfloat16`, `float16` as in HF's `torch_dtype`).
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "float" => Some(FloatType::F32),
            "f16" | "float16" | "half" => Some(FloatType::F16),
            "bf16" | "bfloat16" => Some(FloatType::Bf16),
            _ => None,
        }
    }

    /// The name HF uses in `config.json` (`torch_dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            FloatType::F32 => "float32",
            FloatType::F16 => "float16",
            FloatType::Bf16 => "bfloat16",
        }
    }
}

/// Where one tensor lives inside its file.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range inside the mapped file (header included in the offset).
    start: usize,
    end: usize,
}

impl TensorEntry {
    /// `(start, end)` byte offsets of the tensor's data inside the whole file.
    pub fn byte_range(&self) -> (usize, usize) {
        (self.start, self.end)
    }
}

/// One mapped safetensors file with its validated index.
pub struct TensorFile {
    path: PathBuf,
    map: Mmap,
    entries: HashMap<String, TensorEntry>,
    metadata: HashMap<String, String>,
}

impl std::fmt::Debug for TensorFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorFile")
            .field("path", &self.path)
            .field("tensors", &self.entries.len())
            .finish()
    }
}

impl TensorFile {
    /// Maps `path` and validates its header. The data itself is not touched.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, "cannot open", e))?;
        // SAFETY: the map is read-only; a file truncated by another process while mapped would
        // fault on access, which is the documented limitation of every mmap-based reader.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, "cannot map", e))?;
        let (entries, metadata) = index_header(&map).map_err(|reason| Error::Safetensors {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(TensorFile {
            path: path.to_path_buf(),
            map,
            entries,
            metadata,
        })
    }

    /// The file's path, for error messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A value of the file's `__metadata__` header entry.
    pub fn metadata_value(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    /// The index entry of `name`, if present.
    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.entries.get(name)
    }

    /// All tensor names (unordered).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Raw little-endian bytes of a tensor, straight from the map.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        self.entries.get(name).map(|e| &self.map[e.start..e.end])
    }

    /// Rows `rows` of a 2-D (or the whole of a 1-D) float tensor as stored — bytes straight from
    /// the map, with their type and row length — refusing NaN and Inf.
    pub fn rows_raw(
        &self,
        name: &str,
        rows: std::ops::Range<usize>,
    ) -> Result<(&[u8], FloatType, usize)> {
        let (bytes, ty, cols) = self.rows_raw_unchecked(name, rows.clone())?;
        check_finite(&self.path, name, bytes, ty, rows.start, cols)?;
        Ok((bytes, ty, cols))
    }

    /// [`TensorFile::rows_raw`] without reading the bytes: the caller checks them with
    /// [`check_finite`] when it reads them anyway (the CUDA backend, just before uploading).
    pub fn rows_raw_unchecked(
        &self,
        name: &str,
        rows: std::ops::Range<usize>,
    ) -> Result<(&[u8], FloatType, usize)> {
        let entry = self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
            hint: String::new(),
        })?;
        let ty = FloatType::from_dtype(entry.dtype).ok_or_else(|| {
            Error::bad_tensor(
                &self.path,
                name,
                format!(
                    "dtype {:?} is not a float type (bf16, f16, f32)",
                    entry.dtype
                ),
            )
        })?;
        let cols: usize = entry.shape.iter().skip(1).product();
        let nrows = entry.shape.first().copied().unwrap_or(1);
        if rows.end > nrows || rows.start > rows.end {
            return Err(Error::bad_tensor(
                &self.path,
                name,
                format!("rows {rows:?} out of range for shape {:?}", entry.shape),
            ));
        }
        let row_bytes = cols * ty.size();
        let start = entry.start + rows.start * row_bytes;
        let end = entry.start + rows.end * row_bytes;
        let bytes = &self.map[start..end];
        Ok((bytes, ty, cols))
    }

    /// Reads rows `rows` of a 2-D (or the whole of a 1-D) float tensor as f32, refusing NaN and Inf.
    pub fn read_rows_f32(&self, name: &str, rows: std::ops::Range<usize>) -> Result<Vec<f32>> {
        let (bytes, ty, _) = self.rows_raw(name, rows)?;
        Ok(decode_f32(bytes, ty))
    }

    /// Reads a whole float tensor as f32 (NaN and Inf refused).
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let rows = self
            .entries
            .get(name)
            .map(|e| e.shape.first().copied().unwrap_or(1))
            .unwrap_or(0);
        self.read_rows_f32(name, 0..rows)
    }
}

/// Validates the header of a whole safetensors image (as the safetensors crate does: header size
/// cap, UTF-8 JSON, offsets that tile the data, no overflow) and indexes its tensors by name. The
/// fuzz targets call this directly. Returns the index and the `__metadata__` strings.
pub fn index_header(file: &[u8]) -> std::result::Result<(Index, HashMap<String, String>), String> {
    let (header_len, metadata) =
        SafeTensors::read_metadata(file).map_err(|e| describe_header_error(&e, file))?;
    let data_start = 8 + header_len;
    let entries = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            let entry = TensorEntry {
                dtype: info.dtype,
                shape: info.shape.clone(),
                start: data_start + info.data_offsets.0,
                end: data_start + info.data_offsets.1,
            };
            (name, entry)
        })
        .collect();
    Ok((entries, metadata.metadata().clone().unwrap_or_default()))
}

/// Tensor name → where it lives.
pub type Index = HashMap<String, TensorEntry>;

/// Turns the safetensors crate's error into a sentence with the numbers a user needs.
fn describe_header_error(e: &safetensors::SafeTensorError, file: &[u8]) -> String {
    use safetensors::SafeTensorError as E;
    let file_len = file.len();
    match e {
        E::TensorInvalidInfo | E::ValidationOverflow => {
            find_inconsistent_tensor(file).unwrap_or_else(|| e.to_string())
        }
        E::HeaderTooSmall => format!("file is {file_len} bytes, shorter than the 8-byte header length"),
        E::InvalidHeaderLength => format!(
            "header length runs past the end of the file ({file_len} bytes): truncated or not safetensors"
        ),
        E::HeaderTooLarge => "header length exceeds the 100 MB cap".to_string(),
        E::MetadataIncompleteBuffer => format!(
            "tensor offsets do not end at the end of the file ({file_len} bytes): truncated or padded"
        ),
        other => other.to_string(),
    }
}

/// Names the first tensor whose byte range disagrees with its shape and dtype (the safetensors
/// crate reports that without the name).
fn find_inconsistent_tensor(file: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(file.get(..8)?.try_into().ok()?) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(file.get(8..8usize.checked_add(n)?)?).ok()?;
    for (name, info) in header.as_object()? {
        if name == "__metadata__" {
            continue;
        }
        let dtype: Dtype = serde_json::from_value(info.get("dtype")?.clone()).ok()?;
        let shape: Vec<usize> = serde_json::from_value(info.get("shape")?.clone()).ok()?;
        let offsets: (usize, usize) =
            serde_json::from_value(info.get("data_offsets")?.clone()).ok()?;
        let bytes = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .and_then(|numel| numel.checked_mul(dtype.bitsize()))
            .map(|bits| bits.div_ceil(8));
        let span = offsets.1.checked_sub(offsets.0);
        if bytes.is_none() || span != bytes {
            return Some(format!(
                "tensor `{name}`: data_offsets {:?} span {} bytes, but shape {shape:?} of {dtype:?} needs {}",
                offsets,
                span.map_or("a negative number of".to_string(), |s| s.to_string()),
                bytes.map_or("more than fits in memory".to_string(), |b| format!("{b} bytes")),
            ));
        }
    }
    None
}

/// Refuses NaN and Inf in `bytes` (rows from `first_row` of `cols` values of tensor `name` in
/// `path`), naming the first one's element, row and column. Large inputs are scanned in parallel
/// (this is the pass that reads a mapped tensor from disk).
pub fn check_finite(
    path: &Path,
    name: &str,
    bytes: &[u8],
    ty: FloatType,
    first_row: usize,
    cols: usize,
) -> Result<()> {
    use rayon::prelude::*;
    const CHUNK: usize = 4 << 20; // a multiple of every element size
    let found = if bytes.len() <= CHUNK {
        first_non_finite(bytes, ty)
    } else {
        bytes
            .par_chunks(CHUNK)
            .enumerate()
            .find_map_first(|(c, part)| {
                first_non_finite(part, ty).map(|i| c * CHUNK / ty.size() + i)
            })
    };
    let Some(i) = found else {
        return Ok(());
    };
    let value = decode_f32(&bytes[i * ty.size()..(i + 1) * ty.size()], ty)[0];
    let flat = first_row * cols + i;
    Err(Error::bad_tensor(
        path,
        name,
        format!(
            "non-finite value {value} at element {flat} (row {}, column {})",
            flat / cols.max(1),
            flat % cols.max(1)
        ),
    ))
}

/// Index of the first NaN or infinity in little-endian `bytes` of `ty` (all-ones exponent),
/// checked on the bits without converting.
pub fn first_non_finite(bytes: &[u8], ty: FloatType) -> Option<usize> {
    match ty {
        FloatType::F32 => bytes.chunks_exact(4).position(|c| {
            u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7f80_0000 == 0x7f80_0000
        }),
        FloatType::F16 => bytes
            .chunks_exact(2)
            .position(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7c00 == 0x7c00),
        FloatType::Bf16 => bytes
            .chunks_exact(2)
            .position(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7f80 == 0x7f80),
    }
}

/// Decodes little-endian bf16/f16/f32 bytes (any alignment) to f32.
pub fn decode_f32(bytes: &[u8], ty: FloatType) -> Vec<f32> {
    let n = bytes.len() / ty.size();
    let mut out = vec![0f32; n];
    decode_into(&bytes[..n * ty.size()], ty, &mut out);
    out
}

/// Decodes little-endian bf16/f16/f32 bytes (any alignment) into `out`, which holds exactly
/// `bytes.len() / ty.size()` values. Aligned input (the usual case: safetensors data starts
/// 8-byte aligned in a page-aligned map) is reinterpreted in place, which lets the compiler
/// vectorize the conversion; misaligned input goes byte by byte.
pub fn decode_into(bytes: &[u8], ty: FloatType, out: &mut [f32]) {
    assert_eq!(bytes.len(), out.len() * ty.size(), "decode_into: sizes");
    #[cfg(target_endian = "little")]
    match ty {
        FloatType::F32 => {
            if let Ok(v) = bytemuck::try_cast_slice::<u8, f32>(bytes) {
                out.copy_from_slice(v);
                return;
            }
        }
        FloatType::Bf16 => {
            if let Ok(v) = bytemuck::try_cast_slice::<u8, u16>(bytes) {
                for (o, &x) in out.iter_mut().zip(v) {
                    *o = f32::from_bits((x as u32) << 16);
                }
                return;
            }
        }
        FloatType::F16 => {
            if let Ok(v) = bytemuck::try_cast_slice::<u8, half::f16>(bytes) {
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(v, out);
                return;
            }
        }
    }
    let values = bytes.chunks_exact(ty.size());
    match ty {
        FloatType::F32 => out
            .iter_mut()
            .zip(values)
            .for_each(|(o, c)| *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        FloatType::Bf16 => out.iter_mut().zip(values).for_each(|(o, c)| {
            *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)
        }),
        FloatType::F16 => out.iter_mut().zip(values).for_each(|(o, c)| {
            *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()
        }),
    }
}

/// Encodes f32 values as little-endian bytes of `ty` (round to nearest even).
pub fn encode_f32(values: &[f32], ty: FloatType) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * ty.size());
    match ty {
        FloatType::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        FloatType::Bf16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        FloatType::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
    }
    out
}

// Writing: OutTensor, write_file and the producer mark.
#[path = "safetensors_write.rs"]
mod write;
pub use write::*;

#[cfg(test)]
#[path = "safetensors_tests.rs"]
mod tests;
