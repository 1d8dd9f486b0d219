//! A GGUF writer (version 3, little-endian, 32-byte alignment) for what this engine writes: string,
//! f32 and u32 metadata and f32/f16/bf16 tensors. The header is laid out from the tensors' shapes
//! alone, so each tensor's bytes are produced as they are written: one tensor in memory at a time.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};
use crate::io::safetensors::FloatType;

/// The alignment of the data section and of every tensor in it (GGUF's default).
const ALIGNMENT: usize = 32;

/// A metadata value.
#[derive(Debug, Clone, Copy)]
pub enum MetaValue<'a> {
    Str(&'a str),
    F32(f32),
    U32(u32),
}

/// A tensor to write: `dims` in GGUF order (the fastest-varying first: `[columns, rows]` for a
/// row-major matrix), its bytes produced when written.
pub struct GgufTensor<'a> {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: FloatType,
    pub produce: Box<dyn Fn() -> Result<Vec<u8>> + 'a>,
}

impl GgufTensor<'_> {
    fn size(&self) -> usize {
        self.dims.iter().product::<u64>() as usize * self.ty.size()
    }
}

/// The GGML type id of a float type.
fn ggml_type(ty: FloatType) -> u32 {
    match ty {
        FloatType::F32 => 0,
        FloatType::F16 => 1,
        FloatType::Bf16 => 30,
    }
}

fn padding(len: usize) -> usize {
    (ALIGNMENT - len % ALIGNMENT) % ALIGNMENT
}

/// The header: magic, version, counts, metadata and tensor infos (offsets from the tensors'
/// sizes), padded to the alignment.
fn header(metadata: &[(&str, MetaValue<'_>)], tensors: &[GgufTensor<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    let string = |out: &mut Vec<u8>, s: &str| {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    };
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        string(&mut out, key);
        match value {
            MetaValue::U32(v) => {
                out.extend_from_slice(&4u32.to_le_bytes());
                out.extend_from_slice(&v.to_le_bytes());
            }
            MetaValue::F32(v) => {
                out.extend_from_slice(&6u32.to_le_bytes());
                out.extend_from_slice(&v.to_le_bytes());
            }
            MetaValue::Str(s) => {
                out.extend_from_slice(&8u32.to_le_bytes());
                string(&mut out, s);
            }
        }
    }
    let mut offset = 0usize;
    for t in tensors {
        string(&mut out, &t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&ggml_type(t.ty).to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += t.size() + padding(t.size());
    }
    out.resize(out.len() + padding(out.len()), 0);
    out
}

/// Writes a GGUF file at `path` (replacing it). Each tensor's bytes must have the size its
/// dims and type give; a producer's error stops the write.
pub fn write_file(
    path: &Path,
    metadata: &[(&str, MetaValue<'_>)],
    tensors: &[GgufTensor<'_>],
) -> Result<()> {
    let cannot = |e| Error::io(path, "cannot write", e);
    let file = std::fs::File::create(path).map_err(cannot)?;
    let mut out = std::io::BufWriter::new(file);
    out.write_all(&header(metadata, tensors)).map_err(cannot)?;
    for t in tensors {
        let bytes = (t.produce)()?;
        if bytes.len() != t.size() {
            return Err(Error::internal(format!(
                "GGUF tensor {} has {} bytes, its dims {:?} of {:?} need {}",
                t.name,
                bytes.len(),
                t.dims,
                t.ty,
                t.size()
            )));
        }
        out.write_all(&bytes).map_err(cannot)?;
        out.write_all(&[0u8; ALIGNMENT][..padding(bytes.len())])
            .map_err(cannot)?;
    }
    out.into_inner()
        .map_err(|e| cannot(e.into_error()))?
        .sync_all()
        .map_err(cannot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::gguf::header::{parse, Value};
    use crate::io::safetensors::{decode_f32, encode_f32};

    #[test]
    fn what_is_written_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let a: Vec<f32> = (0..15).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..7).map(|i| i as f32).collect();
        let tensors = vec![
            GgufTensor {
                name: "x.lora_a".into(),
                dims: vec![5, 3],
                ty: FloatType::Bf16,
                produce: Box::new(|| Ok(encode_f32(&a, FloatType::Bf16))),
            },
            GgufTensor {
                name: "x.lora_b".into(),
                dims: vec![7],
                ty: FloatType::F32,
                produce: Box::new(|| Ok(encode_f32(&b, FloatType::F32))),
            },
        ];
        let meta = [
            ("general.architecture", MetaValue::Str("llama")),
            ("adapter.lora.alpha", MetaValue::F32(16.0)),
            ("general.quantization_version", MetaValue::U32(2)),
        ];
        write_file(&path, &meta, &tensors).unwrap();
        let data = std::fs::read(&path).unwrap();
        let h = parse(&data).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.data_start % ALIGNMENT, 0);
        assert_eq!(
            h.metadata["general.architecture"],
            Value::Str("llama".into())
        );
        assert_eq!(h.metadata["adapter.lora.alpha"].as_f64(), Some(16.0));
        assert_eq!(h.metadata["general.quantization_version"].as_u64(), Some(2));
        let read = |i: usize| {
            let t = &h.tensors[i];
            (t.name.clone(), t.dims.clone(), t.start)
        };
        let (name, dims, start) = read(0);
        assert_eq!((name.as_str(), dims), ("x.lora_a", vec![5, 3]));
        assert_eq!(decode_f32(&data[start..start + 30], FloatType::Bf16), a);
        let (name, _, start) = read(1);
        assert_eq!(name, "x.lora_b");
        assert_eq!(start % ALIGNMENT, 0, "the second tensor is aligned");
        assert_eq!(decode_f32(&data[start..start + 28], FloatType::F32), b);
        assert_eq!(data.len(), start + 28 + padding(28));
    }

    #[test]
    fn a_tensor_of_the_wrong_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = GgufTensor {
            name: "t".into(),
            dims: vec![4],
            ty: FloatType::F32,
            produce: Box::new(|| Ok(vec![0u8; 12])),
        };
        let e = write_file(&dir.path().join("t.gguf"), &[], &[t]).unwrap_err();
        assert!(e.to_string().contains("need 16"), "{e}");
    }
}
