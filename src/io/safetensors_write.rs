//! Writing safetensors files: tensors whose bytes are borrowed, produced whole, or streamed a
//! piece at a time as the writer asks for them (so that converting a model holds a band of one
//! tensor, not the tensor: one layer's fused experts in Llama 4 Maverick are 21 GB in bf16), the
//! header's keys in sorted order (the same tensors, the same bytes), the permissions of any file
//! the user creates, and the producer mark that `--force` checks before replacing an output.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use serde_json::{json, Map, Value as Json};

use super::{encode_f32, FloatType, TensorFile};
use crate::error::{Error, Result};

/// A tensor to be written: its bytes are borrowed, or produced when the writer asks for them
/// (so that a writer of a large synthetic model holds one tensor at a time).
pub struct OutTensor<'a> {
    pub ty: FloatType,
    pub shape: Vec<usize>,
    data: OutData<'a>,
}

/// Where a streamed tensor's bytes go, in order.
pub type Sink<'s> = &'s mut dyn FnMut(&[u8]) -> Result<()>;

type Stream<'a> = Box<dyn Fn(Sink<'_>) -> Result<()> + 'a>;

enum OutData<'a> {
    Borrowed(&'a [u8]),
    Produced(Box<dyn Fn() -> Vec<u8> + 'a>),
    Streamed(Stream<'a>),
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

    /// A tensor whose bytes `produce` hands to the sink in pieces, in order, when the writer
    /// reaches it (once per write); its errors stop the write. Handing over other than the
    /// shape's bytes is an error too.
    pub fn streamed(
        ty: FloatType,
        shape: Vec<usize>,
        produce: impl Fn(Sink<'_>) -> Result<()> + 'a,
    ) -> Self {
        OutTensor {
            ty,
            shape,
            data: OutData::Streamed(Box::new(produce)),
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

    /// Bytes of the tensor's data.
    pub fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.ty.size()
    }
}

/// The safetensors format's bound on the header (the reference reader refuses larger).
const MAX_HEADER: usize = 100_000_000;

/// Writes `tensors` to `path` as one safetensors file (with `metadata`, e.g. `{"format": "pt"}`),
/// laid out as the reference writer lays it out — data ordered by descending dtype, then name;
/// the header's keys sorted (its `HashMap` would order them differently from run to run),
/// compact, padded with spaces to 8 bytes — through a temporary file beside `path` that replaces
/// it only once complete.
pub fn write_file(
    path: &Path,
    tensors: &[(String, OutTensor<'_>)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    write_file_reporting(path, tensors, metadata, &|_| Ok(()))
}

/// [`write_file`], calling `after_each` with a tensor's bytes once it is written (in the file's
/// order); its error (a cancel) stops the write and leaves no file.
pub fn write_file_reporting(
    path: &Path,
    tensors: &[(String, OutTensor<'_>)],
    metadata: Option<HashMap<String, String>>,
    after_each: &dyn Fn(usize) -> Result<()>,
) -> Result<()> {
    let mut order: Vec<&(String, OutTensor<'_>)> = tensors.iter().collect();
    order.sort_by(|(a, x), (b, y)| y.ty.dtype().cmp(&x.ty.dtype()).then(a.cmp(b)));
    let mut names: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    if let Some(twice) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::internal(format!(
            "{}: two tensors named `{}`",
            path.display(),
            twice[0]
        )));
    }
    let mut offset = 0;
    let mut entries: Vec<(&str, Json)> = Vec::with_capacity(order.len() + 1);
    for (name, t) in &order {
        if name == "__metadata__" {
            return Err(Error::internal(format!(
                "{}: a tensor named `__metadata__`",
                path.display()
            )));
        }
        let end = offset + t.data_len();
        let dtype = serde_json::to_value(t.ty.dtype()).expect("dtypes serialize");
        let entry = json!({"dtype": dtype, "shape": t.shape, "data_offsets": [offset, end]});
        entries.push((name.as_str(), entry));
        offset = end;
    }
    if let Some(metadata) = &metadata {
        let mut pairs: Vec<_> = metadata.iter().collect();
        pairs.sort();
        let map: Map<String, Json> = pairs
            .into_iter()
            .map(|(k, v)| (k.clone(), v.clone().into()))
            .collect();
        entries.push(("__metadata__", Json::Object(map)));
    }
    entries.sort_by(|a, b| a.0.cmp(b.0));
    let header: Map<String, Json> = entries
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let mut header = serde_json::to_vec(&header).expect("JSON values serialize");
    header.resize(header.len().next_multiple_of(8), b' ');
    if header.len() > MAX_HEADER {
        return Err(Error::Safetensors {
            path: path.to_path_buf(),
            reason: format!("a header of {} bytes (at most {MAX_HEADER})", header.len()),
        });
    }
    let io = |e| Error::io(path, "cannot write", e);
    let parent = path.parent().unwrap_or_else(|| Path::new("."));
    let temp = tempfile::NamedTempFile::new_in(parent).map_err(io)?;
    {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, temp.as_file());
        out.write_all(&(header.len() as u64).to_le_bytes())
            .and_then(|_| out.write_all(&header))
            .map_err(io)?;
        for (name, t) in order {
            let written = match &t.data {
                OutData::Borrowed(bytes) => {
                    out.write_all(bytes).map(|_| bytes.len()).map_err(io)?
                }
                OutData::Produced(produce) => {
                    let bytes = produce();
                    out.write_all(&bytes).map(|_| bytes.len()).map_err(io)?
                }
                OutData::Streamed(produce) => {
                    // A failed write is the error, whatever the producer makes of it.
                    let (mut written, mut failed) = (0, None);
                    let produced = produce(&mut |piece: &[u8]| {
                        written += piece.len();
                        out.write_all(piece).map_err(|e| {
                            let message = e.to_string();
                            failed.get_or_insert(e);
                            Error::io(path, "cannot write", std::io::Error::other(message))
                        })
                    });
                    if let Some(e) = failed {
                        return Err(io(e));
                    }
                    produced?;
                    written
                }
            };
            if written != t.data_len() {
                return Err(Error::internal(format!(
                    "{}: `{name}` gave {written} bytes for {:?} {:?} ({})",
                    path.display(),
                    t.ty,
                    t.shape,
                    t.data_len()
                )));
            }
            after_each(written)?;
        }
        out.flush().map_err(io)?;
    }
    temp.persist(path).map_err(|e| io(e.error))?;
    // The temporary file is private (mode 0600); give the result the permissions of any file
    // the user creates: 0666 less the umask, as the JSON files get.
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

/// The metadata of every file loraxfer writes: `{"format": "pt"}`, which PyTorch-side loaders
/// expect, and `{"producer": "loraxfer"}`, by which `--force` knows an earlier output.
pub fn pt_metadata() -> Option<HashMap<String, String>> {
    metadata_with_format("pt")
}

/// [`pt_metadata`] with another `format`: `mlx` for a checkpoint derived from one mlx-lm wrote,
/// whose tensors keep its conventions.
pub fn metadata_with_format(format: &str) -> Option<HashMap<String, String>> {
    Some(HashMap::from([
        ("format".to_string(), format.to_string()),
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
