//! Writing safetensors files: tensors whose bytes are borrowed or produced as the writer asks for
//! them, the header's keys in sorted order (the same tensors, the same bytes), the permissions of any
//! file the user creates, and the producer mark that `--force` checks before replacing an output.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, View};

use super::{encode_f32, FloatType, TensorFile};
use crate::error::{Error, Result};

/// A tensor to be written: its bytes are borrowed, or produced when the writer asks for them
/// (so that a writer of a large synthetic model holds one tensor at a time).
pub struct OutTensor<'a> {
    pub ty: FloatType,
    pub shape: Vec<usize>,
    data: OutData<'a>,
}

enum OutData<'a> {
    Borrowed(&'a [u8]),
    Produced(Box<dyn Fn() -> Vec<u8> + 'a>),
}

impl<'a> OutTensor<'a> {
    /// A tensor from f32 values, stored as `ty`.
    pub fn from_f32(values: Vec<f32>, shape: Vec<usize>, ty: FloatType) -> Self {
        let bytes = encode_f32(&values, ty);
        Self::lazy(ty, shape, move || bytes.clone())
    }

    /// A tensor whose bytes are generated on demand by `produce` (called once per write).
    pub fn lazy(ty: FloatType, shape: Vec<usize>, produce: impl Fn() -> Vec<u8> + 'a) -> Self {
        OutTensor {
            ty,
            shape,
            data: OutData::Produced(Box::new(produce)),
        }
    }

    /// A tensor of bytes already encoded as `ty`.
    pub fn borrowed(ty: FloatType, shape: Vec<usize>, bytes: &'a [u8]) -> Self {
        OutTensor {
            ty,
            shape,
            data: OutData::Borrowed(bytes),
        }
    }
}

impl View for &OutTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.ty.dtype()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match &self.data {
            OutData::Borrowed(bytes) => Cow::Borrowed(bytes),
            OutData::Produced(produce) => Cow::Owned(produce()),
        }
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.ty.size()
    }
}

/// Writes `tensors` to `path` as one safetensors file (with `metadata`, e.g. `{"format": "pt"}`).
pub fn write_file(
    path: &Path,
    tensors: &[(String, OutTensor<'_>)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let views = tensors.iter().map(|(n, t)| (n.as_str(), t));
    safetensors::serialize_to_file(views, metadata, path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(source) => Error::io(path, "cannot write", source),
        other => Error::Safetensors {
            path: path.to_path_buf(),
            reason: other.to_string(),
        },
    })?;
    sort_header(path)?;
    // The writer goes through a private temporary file (mode 0600); give the result the
    // permissions of any file the user creates: 0666 less the umask, as the JSON files get.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666 & !umask()))
            .map_err(|e| Error::io(path, "cannot set permissions of", e))?;
    }
    Ok(())
}

/// The process's umask now (a Python session may change it between jobs), read from /proc
/// (Linux 4.7 and later) rather than with umask(2), which can only be read by setting it and so
/// races with other threads creating files; 022 where /proc does not say.
#[cfg(unix)]
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("Umask:"))?;
            u32::from_str_radix(line["Umask:".len()..].trim(), 8).ok()
        })
        .unwrap_or(0o022)
        & 0o777
}

/// Rewrites the header of a file just written with its keys in sorted order. The writer keeps
/// `__metadata__` in a `HashMap`, whose order changes from run to run once it has two keys, and a
/// file of the same tensors must be the same bytes. The sorted header has the same length (the
/// same compact JSON, reordered), so it is written in place over the old one.
fn sort_header(path: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, "cannot reopen", e))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| Error::io(path, "cannot read back", e))?;
    let mut header = vec![0u8; u64::from_le_bytes(len) as usize];
    file.read_exact(&mut header)
        .map_err(|e| Error::io(path, "cannot read back", e))?;
    let value: serde_json::Value = serde_json::from_slice(&header).map_err(|e| {
        Error::internal(format!(
            "{}: header written unreadable: {e}",
            path.display()
        ))
    })?;
    // This crate's serde_json keeps insertion order: sort the two maps the writer fills (the
    // tensors' own entries are written in a fixed order).
    let sort = |v: serde_json::Value| match v {
        serde_json::Value::Object(m) => {
            let mut entries: Vec<_> = m.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(entries.into_iter().collect())
        }
        other => other,
    };
    let mut value = sort(value);
    if let Some(meta) = value.get_mut("__metadata__") {
        *meta = sort(meta.take());
    }
    let mut sorted = serde_json::to_vec(&value).expect("JSON values always serialize");
    if sorted.len() > header.len() {
        return Err(Error::internal(format!(
            "{}: sorted header longer than written",
            path.display()
        )));
    }
    sorted.resize(header.len(), b' '); // the writer's padding to 8-byte alignment
    file.seek(SeekFrom::Start(8))
        .and_then(|_| file.write_all(&sorted))
        .map_err(|e| Error::io(path, "cannot write", e))
}

/// The metadata of every file loraxfer writes: `{"format": "pt"}`, which PyTorch-side loaders
/// expect, and `{"producer": "loraxfer"}`, by which `--force` knows an earlier output.
pub fn pt_metadata() -> Option<HashMap<String, String>> {
    Some(HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (PRODUCER_KEY.to_string(), PRODUCER.to_string()),
    ]))
}

/// The metadata key and value that mark a file as written by loraxfer.
pub const PRODUCER_KEY: &str = "producer";
pub const PRODUCER: &str = "loraxfer";

/// True when `path` is a safetensors file whose metadata says loraxfer wrote it (its header is
/// read, no tensor data).
pub fn written_by_loraxfer(path: &Path) -> bool {
    TensorFile::open(path).is_ok_and(|f| f.metadata_value(PRODUCER_KEY) == Some(PRODUCER))
}
