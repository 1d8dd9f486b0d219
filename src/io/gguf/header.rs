//! The GGUF header (versions 2 and 3, little-endian): magic, counts, the metadata key–value
//! pairs, and the tensor infos, validated against the file before any tensor is read — counts
//! and lengths bounded by what the file can hold, every dimension positive and their product in
//! range, rows made of whole blocks, offsets aligned and inside the data. The fuzz target calls
//! [`parse`] directly.

use std::collections::HashMap;

use crate::io::gguf::quant::GgmlType;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    UInt(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    /// A non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::UInt(v) => Some(v),
            Value::Int(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Float(v) => Some(v),
            Value::UInt(v) => Some(v as f64),
            Value::Int(v) => Some(v as f64),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor as the header describes it.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// GGML order: `dims[0]` is the fastest-varying (a row's length).
    pub dims: Vec<usize>,
    pub ty: GgmlType,
    /// Absolute byte range in the file.
    pub start: usize,
    pub end: usize,
}

impl TensorInfo {
    /// Elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }
}

/// A parsed header.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: usize,
    pub data_start: usize,
}

/// More than any real file holds; a count above these is corruption, refused before any
/// allocation sized by it.
const MAX_TENSORS: u64 = 1 << 20;
const MAX_KEYS: u64 = 1 << 20;
const MAX_DIMS: u32 = 4;
const MAX_NESTING: usize = 4;

const MAGIC: &[u8; 4] = b"GGUF";

struct Cursor<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.data.len());
        match end {
            Some(end) => {
                let s = &self.data[self.at..end];
                self.at = end;
                Ok(s)
            }
            None => Err(format!(
                "truncated: {what} needs {n} bytes at offset {}, the file has {}",
                self.at,
                self.data.len()
            )),
        }
    }
    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.u64(what)?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= self.data.len())
            .ok_or_else(|| format!("{what}: string length {len} exceeds the file"))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what}: string is not UTF-8"))
    }

    /// A value of type id `ty`.
    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<Value, String> {
        Ok(match ty {
            0 => Value::UInt(self.take(1, what)?[0] as u64),
            1 => Value::Int(self.take(1, what)?[0] as i8 as i64),
            2 => Value::UInt(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()) as u64),
            3 => Value::Int(i16::from_le_bytes(self.take(2, what)?.try_into().unwrap()) as i64),
            4 => Value::UInt(self.u32(what)? as u64),
            5 => Value::Int(self.u32(what)? as i32 as i64),
            6 => Value::Float(f32::from_bits(self.u32(what)?) as f64),
            7 => match self.take(1, what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("{what}: bool byte {b} is neither 0 nor 1")),
            },
            8 => Value::Str(self.string(what)?),
            9 => {
                if depth >= MAX_NESTING {
                    return Err(format!("{what}: arrays nested deeper than {MAX_NESTING}"));
                }
                let elem = self.u32(what)?;
                let count = self.u64(what)?;
                // Every element takes at least its smallest encoding: a count beyond what the
                // bytes left can hold is a lie.
                let smallest = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8, // a string starts with its u64 length
                    9 => 12,          // a nested array: its element type and count
                    _ => 1,           // refused at the first element
                };
                let left = (self.data.len() - self.at) as u64;
                if count > left / smallest {
                    return Err(format!(
                        "{what}: array of {count} elements, but only {left} bytes are left"
                    ));
                }
                // Grown as read past the first 65536: a parsed value is larger than its bytes.
                let mut items = Vec::with_capacity(count.min(1 << 16) as usize);
                for _ in 0..count {
                    items.push(self.value(elem, what, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::UInt(self.u64(what)?),
            11 => Value::Int(self.u64(what)? as i64),
            12 => Value::Float(f64::from_bits(self.u64(what)?)),
            other => return Err(format!("{what}: unknown metadata value type {other}")),
        })
    }
}

/// Parses and validates the header of a whole GGUF image.
pub fn parse(data: &[u8]) -> Result<Header, String> {
    let mut c = Cursor { data, at: 0 };
    let magic = c.take(4, "the magic")?;
    if magic != MAGIC {
        return Err(format!(
            "not a GGUF file (magic {:02x?}, expected \"GGUF\")",
            magic
        ));
    }
    let version = c.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "GGUF version {version} is not supported (versions 2 and 3 are)"
        ));
    }
    let n_tensors = c.u64("the tensor count")?;
    let n_keys = c.u64("the metadata count")?;
    if n_tensors > MAX_TENSORS || n_keys > MAX_KEYS {
        return Err(format!(
            "absurd counts: {n_tensors} tensors and {n_keys} metadata keys"
        ));
    }
    let mut metadata = HashMap::new();
    for i in 0..n_keys {
        let key = c.string(&format!("metadata key {i}"))?;
        let ty = c.u32(&format!("the type of `{key}`"))?;
        let value = c.value(ty, &format!("metadata `{key}`"), 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(format!("metadata key `{key}` appears twice"));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(v) => v
            .as_u64()
            .filter(|&a| a > 0 && a.is_power_of_two() && a <= 1 << 20)
            .ok_or_else(|| format!("general.alignment = {v:?} is not a power of two"))?
            as usize,
    };
    let mut raw = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = c.string(&format!("the name of tensor {i}"))?;
        let n_dims = c.u32(&format!("the dimensions of `{name}`"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!(
                "tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = c.u64(&format!("a dimension of `{name}`"))?;
            let d = usize::try_from(d)
                .ok()
                .filter(|&d| d > 0 && d <= 1 << 40)
                .ok_or_else(|| format!("tensor `{name}` has dimension {d}"))?;
            dims.push(d);
        }
        let ty = GgmlType::from_id(c.u32(&format!("the type of `{name}`"))?);
        let offset = c.u64(&format!("the offset of `{name}`"))?;
        raw.push((name, dims, ty, offset));
    }
    let data_start = c.at.div_ceil(alignment) * alignment;
    let mut tensors = Vec::with_capacity(raw.len());
    let mut seen = std::collections::HashSet::new();
    for (name, dims, ty, offset) in raw {
        if !seen.insert(name.clone()) {
            return Err(format!("tensor `{name}` is listed twice"));
        }
        let numel = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= 1 << 40)
            .ok_or_else(|| format!("tensor `{name}`: dimensions {dims:?} overflow"))?;
        let bytes = match ty.block() {
            Some((elems, size)) => {
                if dims[0] % elems != 0 {
                    return Err(format!(
                        "tensor `{name}`: rows of {} elements are not whole {} blocks of {elems}",
                        dims[0],
                        ty.name()
                    ));
                }
                numel / elems * size
            }
            // Unknown types are sized when they are read: an error then names them.
            None => 0,
        };
        if offset % alignment as u64 != 0 {
            return Err(format!(
                "tensor `{name}`: offset {offset} is not a multiple of the alignment {alignment}"
            ));
        }
        let start = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(data_start))
            .filter(|&s| s <= data.len());
        let end = start
            .and_then(|s| s.checked_add(bytes))
            .filter(|&e| e <= data.len());
        let (Some(start), Some(end)) = (start, end) else {
            return Err(format!(
                "tensor `{name}` ({} {:?}, {bytes} bytes at data offset {offset}) extends past the end of the file ({} bytes, data from {data_start})",
                ty.name(),
                dims,
                data.len()
            ));
        };
        tensors.push(TensorInfo {
            name,
            dims,
            ty,
            start,
            end,
        });
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_start,
    })
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A GGUF image: metadata of (key, u32 value) and f32 tensors of (name, dims).
    pub fn image(keys: &[(&str, u32)], tensors: &[(&str, Vec<u64>)]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(keys.len() as u64).to_le_bytes());
        let string = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        };
        for (k, v) in keys {
            string(&mut out, k);
            out.extend_from_slice(&4u32.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
        let mut offset = 0u64;
        let mut sizes = Vec::new();
        for (name, dims) in tensors {
            string(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            let size = dims.iter().product::<u64>() * 4;
            sizes.push(size);
            offset += size.div_ceil(32) * 32;
        }
        out.resize(out.len().div_ceil(32) * 32, 0);
        for size in sizes {
            let start = out.len();
            out.extend((0..size / 4).flat_map(|i| (i as f32).to_le_bytes()));
            out.resize(start + (size as usize).div_ceil(32) * 32, 0);
        }
        out
    }

    #[test]
    fn parses_a_small_image() {
        let img = image(
            &[("llama.block_count", 2)],
            &[("a", vec![4, 3]), ("b", vec![5])],
        );
        let h = parse(&img).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.metadata["llama.block_count"], Value::UInt(2));
        assert_eq!(h.tensors[0].dims, vec![4, 3]);
        assert_eq!(h.tensors[0].end - h.tensors[0].start, 48);
        let b = &h.tensors[1];
        let first = f32::from_le_bytes(img[b.start..b.start + 4].try_into().unwrap());
        assert_eq!(first, 0.0);
        assert_eq!(b.start % 32, 0);
    }

    /// Every single-byte corruption and every truncation of a small image is refused or
    /// parsed into ranges inside the file; none panics.
    #[test]
    fn corrupted_images_never_panic() {
        let img = image(
            &[("llama.block_count", 2)],
            &[("a", vec![32, 2]), ("b", vec![5])],
        );
        for at in 0..img.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = img.clone();
                bad[at] ^= flip;
                crate::fuzzing::gguf_header(&bad);
            }
            crate::fuzzing::gguf_header(&img[..at]);
        }
    }

    #[test]
    fn refuses_bad_images_with_reasons() {
        let img = image(&[("k", 1)], &[("a", vec![4, 3])]);
        let cut = &img[..img.len() - 20];
        assert!(parse(cut).unwrap_err().contains("extends past the end"));
        assert!(parse(&img[..20]).unwrap_err().contains("truncated"));
        let mut bad = img.clone();
        bad[0] = b'X';
        assert!(parse(&bad).unwrap_err().contains("not a GGUF file"));
        let mut v1 = img.clone();
        v1[4] = 1;
        assert!(parse(&v1).unwrap_err().contains("version 1"));
        let mut huge = img.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse(&huge).unwrap_err().contains("absurd"));
    }
}
