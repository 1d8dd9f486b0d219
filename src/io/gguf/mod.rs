//! A llama.cpp GGUF file read as a Hugging Face checkpoint: the file is mapped, its header
//! validated ([`header`]), its tensors presented under their Hugging Face names with the
//! converter's changes undone ([`names`]), and each weight dequantized ([`quant`]) when it is
//! read, in parallel, into the f32 rows the SVD and the map take. Plain float tensors whose rows
//! need no change are handed out straight from the map, as safetensors are.
//!
//! The format and the dequantization are written here rather than taken from a crate: see
//! docs/METHOD.md, "GGUF base models", for the comparison.

pub mod config;
pub mod convert;
mod fuse_experts;
pub mod header;
pub mod joined;
pub mod latent;
pub mod lora;
pub mod names;
pub mod quant;
pub mod reorder;
pub mod rope;
mod rows;
pub mod state;
pub mod write;

pub use rows::{QuantizedRows, Values};

use crate::io::RawBytes;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::io::safetensors::{check_finite, FloatType};
use crate::map::vocab::Vocab;
use header::{Header, TensorInfo, Value};
use names::Family;
use quant::GgmlType;

/// The bytes of a GGUF file: mapped, or (an image built or fuzzed in memory) owned.
enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A mapped GGUF model.
pub struct GgufModel {
    path: PathBuf,
    map: Bytes,
    header: Header,
    family: &'static Family,
    /// Hugging Face name → the tensor's index in the header, or past its end, in `views`.
    by_name: HashMap<String, usize>,
    /// One expert's weight in a stacked experts tensor: its rows' bytes, as a tensor of its own.
    views: Vec<TensorInfo>,
    /// Tensors the converter split in two (`kv_b_proj`, `in_proj_qkvz`), joined on read.
    joined: HashMap<String, joined::Joined>,
    /// Hugging Face shapes (the GGML dimensions reversed).
    shapes: HashMap<String, Vec<usize>>,
    /// The head layout the converter's reorders follow.
    heads: reorder::Heads,
    config: serde_json::Value,
    /// Why the config has no `rope_scaling` that the file's rotary scaling needs.
    rope_problem: Option<String>,
}

impl std::fmt::Debug for GgufModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufModel")
            .field("path", &self.path)
            .field("architecture", &self.family.gguf)
            .field("tensors", &self.by_name.len())
            .finish()
    }
}

/// A small tensor of the file (a few rotary factors) by GGUF name, as f32 values; `None` when
/// the file has none of that name.
fn small_tensor(
    map: &[u8],
    header: &Header,
    name: &str,
) -> Option<std::result::Result<Vec<f32>, String>> {
    let t = header.tensors.iter().find(|t| t.name == name)?;
    Some(match t.ty.block() {
        _ if t.numel() > 1 << 20 => Err(format!("`{name}` holds {} values", t.numel())),
        Some(_) => {
            let mut out = vec![0.0; t.numel()];
            quant::dequantize(t.ty, &map[t.start..t.end], &mut out);
            Ok(out)
        }
        None => Err(format!(
            "`{name}` is stored as {}, which this reader does not read",
            t.ty.name()
        )),
    })
}

impl GgufModel {
    /// Maps and validates a `.gguf` file (no tensor data is read).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, "cannot open", e))?;
        // SAFETY: the map is read-only; the file is treated as immutable while mapped, as
        // every model reader does.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, "cannot map", e))?;
        Self::from_bytes(path, Bytes::Mapped(map))
    }

    /// A GGUF image held in memory, validated as [`GgufModel::open`] validates a file; `path`
    /// names it in messages. The fuzz checks read their inputs through it.
    pub fn from_vec(path: &Path, data: Vec<u8>) -> Result<Self> {
        Self::from_bytes(path, Bytes::Owned(data))
    }

    fn from_bytes(path: &Path, map: Bytes) -> Result<Self> {
        let header = header::parse(&map).map_err(|reason| Error::config(path, reason))?;
        let arch = header
            .metadata
            .get("general.architecture")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::config(path, "no `general.architecture` in the metadata"))?;
        // llama.cpp stacks a layer's experts in one tensor per projection (Mixtral as a `llama`).
        let count_key = format!("{arch}.expert_count");
        let expert_count = header
            .metadata
            .get(&count_key)
            .and_then(Value::as_u64)
            .filter(|&n| n > 0);
        let has_experts = expert_count.is_some();
        let family = names::family_of(arch, has_experts).ok_or_else(|| {
            let supported = names::FAMILIES.iter().filter(|f| f.experts == has_experts);
            let reason = if !has_experts && names::family_of(arch, true).is_some() {
                format!(
                    "GGUF architecture `{arch}` has experts, but metadata `{count_key}` is missing"
                )
            } else {
                format!(
                    "GGUF architecture `{arch}`{} is not supported (supported: {})",
                    if has_experts { " with experts" } else { "" },
                    supported.map(|f| f.gguf).collect::<Vec<_>>().join(", ")
                )
            };
            Error::config(path, reason)
        })?;
        let mut config = config::config_json(family, &header.metadata, &header.tensors)
            .map_err(|reason| Error::config(path, reason))?;
        // Only a converted model's config needs the rotary scaling: a problem with it stops
        // `convert --gguf`, not a transfer ([`GgufModel::rope_problem`]).
        let small_tensor = |name: &str| small_tensor(&map, &header, name);
        let rope_problem = match rope::scaling(family, &header.metadata, &small_tensor, &config) {
            Ok(Some(s)) => {
                config["rope_scaling"] = s.rope_scaling;
                for (field, value) in s.top_level {
                    config[field] = value;
                }
                None
            }
            Ok(None) => None,
            Err(why) => Some(why),
        };
        // The blocks past it are the multi-token-prediction block's ([`state::after_depth`]).
        let depth = config["num_hidden_layers"].as_u64().unwrap_or(0) as usize;
        let mut by_name = HashMap::new();
        let mut shapes = HashMap::new();
        let mut views = Vec::new();
        for (i, t) in header.tensors.iter().enumerate() {
            let hf = state::hf_name(family, &t.name).or_else(|| names::hf_name(family, &t.name));
            if let Some(hf) = hf {
                let hf = state::after_depth(family, hf, depth);
                let dims = t.dims.iter().rev().copied().collect();
                shapes.insert(hf.clone(), state::hf_shape(&hf, dims));
                by_name.insert(hf, i);
            } else if let Some((layer, key)) = names::expert_tensor(family, &t.name) {
                // One expert's weight is a run of whole rows of the stack: a tensor of its own.
                let stack = match t.dims.as_slice() {
                    &[cols, rows, count] if Some(count as u64) == expert_count => {
                        Ok((cols, rows, count))
                    }
                    _ => Err(format!(
                        "dims {:?} are not [in, out, {count_key} = {}]",
                        t.dims,
                        expert_count.unwrap_or(0)
                    )),
                };
                let (cols, rows, count) = stack
                    .and_then(|s| match t.ty.block() {
                        Some(_) => Ok(s),
                        None => Err(format!(
                            "stored as {}, which this reader does not read",
                            t.ty.name()
                        )),
                    })
                    .map_err(|reason| Error::bad_tensor(path, &t.name, reason))?;
                let bytes = (t.end - t.start) / count;
                for e in 0..count {
                    let hf = format!(
                        "model.layers.{layer}.{}.weight",
                        key.replace(crate::arch::EXPERT_SLOT, &e.to_string())
                    );
                    let hf = state::after_depth(family, hf, depth);
                    let start = t.start + e * bytes;
                    views.push(TensorInfo {
                        name: t.name.clone(),
                        dims: vec![cols, rows],
                        ty: t.ty,
                        start,
                        end: start + bytes,
                    });
                    shapes.insert(hf.clone(), vec![rows, cols]);
                    by_name.insert(hf, header.tensors.len() + views.len() - 1);
                }
            }
        }
        let heads = reorder::Heads::from_json(&config);
        let joined = joined::all(family, &header.tensors, &config, path)?;
        for (name, j) in &joined {
            shapes.insert(name.clone(), j.shape().to_vec());
        }
        let model = GgufModel {
            path: path.to_path_buf(),
            map,
            header,
            family,
            by_name,
            joined,
            views,
            shapes,
            heads,
            config,
            rope_problem,
        };
        model.check_reordered_shapes()?;
        Ok(model)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `config.json` the metadata gives.
    pub fn config_json(&self) -> &serde_json::Value {
        &self.config
    }

    /// Why [`GgufModel::config_json`] lacks the rotary scaling the file's model uses, if it
    /// does: a model loaded from that config would turn queries and keys at other frequencies.
    pub fn rope_problem(&self) -> Option<&str> {
        self.rope_problem.as_deref()
    }

    /// The metadata key–value pairs.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.header.metadata
    }

    /// The GGUF architecture (`general.architecture`).
    pub fn architecture(&self) -> &'static str {
        self.family.gguf
    }

    /// How llama.cpp converted the model (a Mixtral is a `llama` with experts).
    pub fn family(&self) -> &'static Family {
        self.family
    }

    /// Every tensor the engine can read, by Hugging Face name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name
            .keys()
            .chain(self.joined.keys())
            .map(String::as_str)
    }

    pub fn has(&self, name: &str) -> bool {
        self.by_name.contains_key(name) || self.joined.contains_key(name)
    }

    /// Whether `name` is built from several of the file's tensors ([`joined`]).
    pub fn is_joined(&self, name: &str) -> bool {
        self.joined.contains_key(name)
    }

    /// The Hugging Face shape of `name`.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.shapes.get(name).map(Vec::as_slice)
    }

    /// The GGML type `name` is stored in (a joined tensor's: its key half's).
    pub fn stored_type(&self, name: &str) -> Option<GgmlType> {
        match self.joined.get(name) {
            Some(j) => Some(self.header.tensors[j.first()].ty),
            None => self.info(name).map(|t| t.ty),
        }
    }

    /// The type [`GgufModel::rows_raw`] hands out: the stored one when the bytes are used as
    /// they are, f32 when they are dequantized, changed or joined.
    pub fn float_type(&self, name: &str) -> Option<FloatType> {
        if self.joined.contains_key(name) {
            return Some(FloatType::F32);
        }
        let t = self.info(name)?;
        if !self.as_stored(name) {
            return t.ty.block().map(|_| FloatType::F32);
        }
        Some(match t.ty {
            GgmlType::F16 => FloatType::F16,
            GgmlType::Bf16 => FloatType::Bf16,
            _ => FloatType::F32,
        })
    }

    /// True when the rows of `name` are handed out as stored (a plain float tensor whose rows
    /// and values need no change), so borrowing them costs no copy.
    pub fn as_stored(&self, name: &str) -> bool {
        self.info(name).is_some_and(|t| t.ty.is_float())
            && self.row_order(name).is_none()
            && self.column_order(name).is_none()
            && self.values(name) == Values::AsIs
    }

    /// Rows of `name` as (bytes, type, row length): borrowed from the map when
    /// [`GgufModel::as_stored`], else dequantized to f32. NaN and Inf are refused unless
    /// `unchecked` (then the caller checks them as it reads).
    pub fn rows_raw(
        &self,
        name: &str,
        rows: std::ops::Range<usize>,
        unchecked: bool,
    ) -> Result<(RawBytes<'_>, FloatType, usize)> {
        if self.joined.contains_key(name) {
            let values = self.read_rows_f32(name, rows)?;
            return Ok((
                RawBytes::Decoded(values),
                FloatType::F32,
                self.shapes[name][1],
            ));
        }
        let (t, (elems, size), cols) = self.rows_raw_shape(name, &rows)?;
        let ty = self.float_type(name).expect("a sized type");
        if self.as_stored(name) {
            let row_bytes = cols / elems * size;
            let bytes = &self.map[t.start + rows.start * row_bytes..t.start + rows.end * row_bytes];
            if !unchecked {
                check_finite(&self.path, name, bytes, ty, rows.start, cols)?;
            }
            return Ok((RawBytes::Borrowed(bytes), ty, cols));
        }
        // Built rows are scanned here.
        let values = self.decoded(name, t, rows, cols).to_vec(&self.path, name)?;
        Ok((RawBytes::Decoded(values), FloatType::F32, cols))
    }

    /// Rows of `name` as f32 (NaN and Inf refused).
    pub fn read_rows_f32(&self, name: &str, rows: std::ops::Range<usize>) -> Result<Vec<f32>> {
        if let Some(j) = self.joined.get(name) {
            self.check_rows(name, &rows)?;
            return j.rows((&self.map, &self.path), &self.header.tensors, rows);
        }
        if self.as_stored(name) {
            let (bytes, ty, _) = self.rows_raw(name, rows, false)?;
            return Ok(crate::io::safetensors::decode_f32(&bytes, ty));
        }
        let (t, _, cols) = self.rows_raw_shape(name, &rows)?;
        self.decoded(name, t, rows, cols).to_vec(&self.path, name)
    }

    /// Rows of `name` to be decoded as they are read, when they are not handed out as stored
    /// (None: [`GgufModel::rows_raw`] borrows them, or builds a joined tensor's whole); NaN and
    /// Inf refused first, in a pass that keeps nothing.
    pub fn row_decoder(
        &self,
        name: &str,
        rows: std::ops::Range<usize>,
    ) -> Result<Option<QuantizedRows<'_>>> {
        if self.as_stored(name) || self.joined.contains_key(name) {
            return Ok(None);
        }
        let (t, _, cols) = self.rows_raw_shape(name, &rows)?;
        let decoder = self.decoded(name, t, rows, cols);
        decoder.check_finite(&self.path, name)?;
        Ok(Some(decoder))
    }

    /// The tensor, its block layout and its row length, once `rows` is checked against its
    /// shape and its type is one this reader dequantizes.
    fn rows_raw_shape(
        &self,
        name: &str,
        rows: &std::ops::Range<usize>,
    ) -> Result<(&TensorInfo, (usize, usize), usize)> {
        let t = self.info(name).ok_or_else(|| self.missing(name))?;
        let cols = self.check_rows(name, rows)?;
        let block = t.ty.block().ok_or_else(|| {
            Error::bad_tensor(
                &self.path,
                name,
                format!(
                    "stored as {}, which this reader does not dequantize (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K to Q6_K and MXFP4 are read)",
                    t.ty.name()
                ),
            )
        })?;
        Ok((t, block, cols))
    }

    /// The row length of `name`, once `rows` is checked against its shape.
    fn check_rows(&self, name: &str, rows: &std::ops::Range<usize>) -> Result<usize> {
        let shape = self.shapes.get(name).ok_or_else(|| self.missing(name))?;
        if rows.end > shape[0] || rows.start > rows.end {
            return Err(Error::bad_tensor(
                &self.path,
                name,
                format!("rows {rows:?} out of range for shape {shape:?}"),
            ));
        }
        Ok(shape.iter().skip(1).product())
    }

    /// Rows `rows` of `name` (tensor `t`, rows of `cols` values) of a tensor that is not read as
    /// stored, to be decoded on request: dequantized, in Hugging Face row and column order, the
    /// converter's change of values undone ([`Values`]; nothing is checked yet).
    fn decoded(
        &self,
        name: &str,
        t: &TensorInfo,
        rows: std::ops::Range<usize>,
        cols: usize,
    ) -> QuantizedRows<'_> {
        QuantizedRows::new(
            &self.map[t.start..t.end],
            t.ty,
            (self.shapes[name][0], cols),
            rows,
            (self.row_order(name), self.column_order(name)),
            self.values(name),
        )
    }

    /// True when the metadata has a vocabulary (`tokenizer.ggml.tokens`).
    pub fn has_vocab(&self) -> bool {
        self.header.metadata.contains_key("tokenizer.ggml.tokens")
    }

    /// The vocabulary of `tokenizer.ggml.tokens`, control and unused tokens left out.
    pub fn vocab(&self) -> Result<Vocab> {
        let meta = &self.header.metadata;
        let bad = |why: String| Error::config(&self.path, why);
        let tokens = meta
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .ok_or_else(|| {
                bad(
                    "no `tokenizer.ggml.tokens` (the map mode pairs the models' tokens through it)"
                        .into(),
                )
            })?;
        let model = meta
            .get("tokenizer.ggml.model")
            .and_then(Value::as_str)
            .unwrap_or("llama");
        let byte_level = match model {
            "gpt2" => true,
            "llama" => false,
            other => {
                return Err(bad(format!(
                    "tokenizer.ggml.model `{other}` is not supported (gpt2 and llama are)"
                )))
            }
        };
        let types = meta
            .get("tokenizer.ggml.token_type")
            .and_then(Value::as_array);
        let mut kept = Vec::with_capacity(tokens.len());
        for (id, token) in tokens.iter().enumerate() {
            let text = token
                .as_str()
                .ok_or_else(|| bad(format!("tokenizer.ggml.tokens[{id}] is not a string")))?;
            // 1 normal, 4 user-defined and 6 byte tokens spell text; 2 unknown, 3 control and 5
            // unused do not (special tokens, as in tokenizer.json).
            let ty = types
                .and_then(|t| t.get(id))
                .and_then(Value::as_u64)
                .unwrap_or(1);
            kept.push(matches!(ty, 1 | 4 | 6).then_some(text));
        }
        Ok(Vocab::from_tokens(&kept, byte_level, &self.path))
    }

    fn info(&self, name: &str) -> Option<&TensorInfo> {
        let n = self.header.tensors.len();
        self.by_name.get(name).map(|&i| {
            self.header
                .tensors
                .get(i)
                .unwrap_or_else(|| &self.views[i - n])
        })
    }

    fn row_order(&self, name: &str) -> Option<reorder::Reorder> {
        reorder::rows(self.family, name, &self.heads)
    }

    fn column_order(&self, name: &str) -> Option<reorder::Reorder> {
        reorder::columns(self.family, name, &self.heads)
    }

    fn values(&self, name: &str) -> Values {
        state::values(self.family, name)
    }

    /// Reordered rows and columns must hold the heads the metadata gives (Q and K heads of an
    /// even number of rows; every value head of linear attention): a file may claim any sizes.
    fn check_reordered_shapes(&self) -> Result<()> {
        for name in self.by_name.keys() {
            let shape = &self.shapes[name];
            let dims = [
                (self.row_order(name), shape[0]),
                (self.column_order(name), shape.iter().skip(1).product()),
            ];
            for (order, len) in dims {
                if let Some(why) = order.and_then(|o| o.misfit(len)) {
                    return Err(Error::bad_tensor(&self.path, name, why));
                }
            }
        }
        Ok(())
    }

    fn missing(&self, name: &str) -> Error {
        Error::MissingTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
            hint: format!(" (GGUF architecture `{}`)", self.family.gguf),
        }
    }
}

/// The one `.gguf` file in `dir`, if there is exactly one; an error names them when there are
/// several.
pub fn find_in(dir: &Path) -> Result<Option<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, "cannot list", e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_gguf(p))
        .collect();
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(Error::config(
            dir,
            format!(
                "holds {} GGUF files ({}); name the one to read",
                found.len(),
                found
                    .iter()
                    .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// True for a `.gguf` file name.
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        && path.is_file()
}
