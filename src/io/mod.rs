//! Reading and writing the files the engine works on: safetensors (mapped), Hugging Face
//! checkpoints (single file or sharded), GGUF models (dequantized as they are read) and PEFT
//! adapters; atomic output directories; hub names resolved in the local Hugging Face cache.

pub mod adapter;
pub mod checkpoint;
pub mod config;
pub mod expert_views;
pub mod gguf;
pub mod hub;
pub mod output;
pub mod quantized;
pub mod safetensors;
pub mod shards;

/// A weight's rows as bytes: borrowed from a mapped file as stored, or values decoded from a
/// quantized (or rearranged) GGUF tensor, kept as f32 and read as their bytes without a copy
/// (a 70B model's MLP weight is 940 MB in f32).
#[derive(Clone)]
pub enum RawBytes<'a> {
    Borrowed(&'a [u8]),
    /// Bytes made in memory (small matrices, tests).
    Owned(Vec<u8>),
    Decoded(Vec<f32>),
}

impl std::fmt::Debug for RawBytes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes", self.len())
    }
}

impl From<Vec<u8>> for RawBytes<'_> {
    fn from(bytes: Vec<u8>) -> Self {
        RawBytes::Owned(bytes)
    }
}

impl std::ops::Deref for RawBytes<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            RawBytes::Borrowed(b) => b,
            RawBytes::Owned(v) => v,
            RawBytes::Decoded(v) => bytemuck::cast_slice(v),
        }
    }
}

/// `rows` of a built `[out, cols]` weight (an expert's out of a fused tensor, an FP8 weight's),
/// or an error naming the file and the tensor.
pub(crate) fn check_rows(
    path: &std::path::Path,
    name: &str,
    rows: &std::ops::Range<usize>,
    out: usize,
    cols: usize,
) -> crate::error::Result<()> {
    if rows.end > out || rows.start > rows.end {
        return Err(crate::error::Error::bad_tensor(
            path,
            name,
            format!("rows {rows:?} out of range for shape [{out}, {cols}]"),
        ));
    }
    Ok(())
}

/// A tensor of raw bytes in any dtype, for test files the writer does not make (FP8 codes,
/// packed integer words).
#[cfg(test)]
pub(crate) struct RawTensor(pub ::safetensors::Dtype, pub Vec<usize>, pub Vec<u8>);

#[cfg(test)]
impl ::safetensors::View for &RawTensor {
    fn dtype(&self) -> ::safetensors::Dtype {
        self.0
    }
    fn shape(&self) -> &[usize] {
        &self.1
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        (&self.2[..]).into()
    }
    fn data_len(&self) -> usize {
        self.2.len()
    }
}
