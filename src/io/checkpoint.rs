//! A Hugging Face model directory: `config.json` plus `model.safetensors` or a sharded
//! `model.safetensors.index.json`. Shards are mapped, never read whole.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::io::RawBytes;

use crate::error::{Error, Result};
use crate::io::expert_views::ExpertViews;
use crate::io::gguf::{self, GgufModel};
use crate::io::quantized::QuantizedWeights;
use crate::io::safetensors::{FloatType, TensorFile};
use crate::map::vocab::{Vocab, TOKENIZER_FILE};

pub use crate::io::config::{Experts, ModelConfig, Scales};

/// A mapped checkpoint: a Hugging Face directory (config plus every shard, with one index from
/// tensor name to shard) or a GGUF file read under the Hugging Face names.
#[derive(Debug)]
pub struct Checkpoint {
    /// The directory, or the `.gguf` file.
    pub dir: PathBuf,
    pub config: ModelConfig,
    storage: Storage,
    /// The vocabulary, read on first use (auto mode's choice and the map both read it).
    vocab: std::sync::OnceLock<Vocab>,
}

#[derive(Debug)]
enum Storage {
    Safetensors {
        shards: Vec<TensorFile>,
        index: HashMap<String, usize>,
        /// Experts stored fused (GPT-OSS), presented one expert's weight at a time.
        experts: ExpertViews,
        /// Quantized weights (FP8, packed integers and NVFP4, bitsandbytes), presented as f32
        /// (boxed: the enum's variants stay of a size).
        quantized: Box<QuantizedWeights>,
    },
    Gguf(Box<GgufModel>),
}

impl Checkpoint {
    /// Opens a model directory (safetensors, or one `.gguf` file when there is no
    /// `config.json`) or a `.gguf` file, and validates every header (of the tensors' data only
    /// quantized weights' small companions are read: `g_idx`, JSON quant states, tensor-wide
    /// scales).
    pub fn open(dir: &Path) -> Result<Self> {
        if gguf::is_gguf(dir) {
            return Self::open_gguf(dir);
        }
        if !dir.is_dir() {
            return Err(Error::config(
                dir,
                "neither a directory nor a .gguf file (expected a Hugging Face model directory or a GGUF model)",
            ));
        }
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            if let Some(file) = gguf::find_in(dir)? {
                return Self::open_gguf(&file);
            }
        }
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| Error::io(&config_path, "cannot read", e))?;
        let config = ModelConfig::parse(&text, &config_path)?;

        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let (shards, index) = if index_path.is_file() {
            open_sharded(dir, &index_path)?
        } else if single.is_file() {
            let file = TensorFile::open(&single)?;
            let index = file.names().map(|n| (n.to_string(), 0)).collect();
            (vec![file], index)
        } else {
            return Err(Error::config(
                dir,
                "no model.safetensors or model.safetensors.index.json (safetensors checkpoints and GGUF files are read)",
            ));
        };
        // A family that stores its experts fused: each expert's weight under its module's name.
        let experts = match crate::arch::for_config(&config, &config_path) {
            Ok(arch) => ExpertViews::find(arch, &config, &shards, &index)?,
            Err(_) => ExpertViews::default(),
        };
        let quantized = Box::new(QuantizedWeights::find(&config.raw, &shards, &index)?);
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            storage: Storage::Safetensors {
                shards,
                index,
                experts,
                quantized,
            },
            vocab: Default::default(),
        })
    }

    fn open_gguf(file: &Path) -> Result<Self> {
        Self::from_gguf(GgufModel::open(file)?)
    }

    /// The checkpoint a GGUF model presents: its metadata's config, checked as a
    /// `config.json` is.
    pub fn from_gguf(model: GgufModel) -> Result<Self> {
        let file = model.path().to_path_buf();
        let text = model.config_json().to_string();
        let config = ModelConfig::parse(&text, &file)?;
        Ok(Checkpoint {
            dir: file,
            config,
            storage: Storage::Gguf(Box::new(model)),
            vocab: Default::default(),
        })
    }

    /// The GGUF model behind this checkpoint, if it is one.
    pub fn gguf(&self) -> Option<&GgufModel> {
        match &self.storage {
            Storage::Gguf(g) => Some(g),
            Storage::Safetensors { .. } => None,
        }
    }

    /// Where the config comes from (for messages): `config.json`, or the GGUF file's metadata.
    pub fn config_path(&self) -> PathBuf {
        match &self.storage {
            Storage::Gguf(_) => self.dir.clone(),
            Storage::Safetensors { .. } => self.dir.join("config.json"),
        }
    }

    /// Where the vocabulary comes from, if the checkpoint has one: `tokenizer.json`, or the
    /// GGUF file's `tokenizer.ggml.tokens`.
    pub fn vocab_source(&self) -> Option<PathBuf> {
        match &self.storage {
            Storage::Gguf(g) => g.has_vocab().then(|| self.dir.clone()),
            Storage::Safetensors { .. } => {
                Some(self.dir.join(TOKENIZER_FILE)).filter(|p| p.is_file())
            }
        }
    }

    /// The vocabulary (see [`Checkpoint::vocab_source`]), read once.
    pub fn vocab(&self) -> Result<&Vocab> {
        if let Some(v) = self.vocab.get() {
            return Ok(v);
        }
        let read = match &self.storage {
            Storage::Gguf(g) => g.vocab(),
            Storage::Safetensors { .. } => Vocab::open(&self.dir),
        }?;
        Ok(self.vocab.get_or_init(|| read))
    }

    /// The file holding `name`, if any (a shard, or the GGUF file).
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        match &self.storage {
            Storage::Safetensors {
                shards,
                index,
                experts,
                quantized,
                ..
            } => index
                .get(name)
                .copied()
                .or_else(|| experts.shard(name))
                .or_else(|| quantized.shard(name))
                .map(|i| shards[i].path()),
            Storage::Gguf(g) => g.has(name).then(|| g.path()),
        }
    }

    /// The stored tensors that quantized weights are built from: FP8 weights' scales, packed
    /// weights' codes, scales, zero points and group indices, bitsandbytes' absmax, code maps
    /// and quant states (a copy that writes the weights' values leaves them out).
    pub fn quantization_parts(&self) -> std::collections::HashSet<String> {
        match &self.storage {
            Storage::Safetensors { quantized, .. } => quantized.parts().clone(),
            Storage::Gguf(_) => Default::default(),
        }
    }

    /// The weights presented under a name no stored tensor has (packed weights'
    /// `<module>.weight`, the experts of an MLX stack, latent attention's `kv_b_proj` that an
    /// MLX checkpoint stores split), which a copy writes as their values.
    pub fn built_weights(&self) -> Vec<&str> {
        match &self.storage {
            Storage::Safetensors { quantized, .. } => quantized.built_names(),
            Storage::Gguf(_) => Vec::new(),
        }
    }

    /// Every file the values of `name` are read from: its own, then the one holding the scales
    /// it is built with where that is another shard (a quantized weight's scales and other
    /// parts, MXFP4 experts' scales); empty when there is no such tensor.
    pub fn files_of(&self, name: &str) -> Vec<&Path> {
        let mut files: Vec<&Path> = self.file_of(name).into_iter().collect();
        if let Storage::Safetensors {
            shards,
            experts,
            quantized,
            ..
        } = &self.storage
        {
            for path in experts
                .scales_shard(name)
                .into_iter()
                .chain(quantized.part_shards(name))
                .map(|i| shards[i].path())
            {
                if !files.contains(&path) {
                    files.push(path);
                }
            }
        }
        files
    }

    fn shard_of(&self, name: &str) -> Option<&TensorFile> {
        match &self.storage {
            Storage::Safetensors { shards, index, .. } => index.get(name).map(|&i| &shards[i]),
            Storage::Gguf(_) => None,
        }
    }

    /// Whether mlx-lm wrote this checkpoint (`save_model` marks every shard `format: mlx`),
    /// quantized or not: its ports store some families' tensors otherwise than Hugging Face's
    /// (Qwen3-Next's and Qwen3.5's norm weights shifted by 1).
    pub fn is_mlx(&self) -> bool {
        match &self.storage {
            Storage::Safetensors { shards, .. } => shards
                .first()
                .is_some_and(|f| f.metadata_value("format") == Some("mlx")),
            Storage::Gguf(_) => false,
        }
    }

    /// True when the checkpoint has a tensor of this name.
    pub fn has(&self, name: &str) -> bool {
        match &self.storage {
            Storage::Safetensors {
                index,
                experts,
                quantized,
                ..
            } => index.contains_key(name) || experts.has(name) || quantized.has(name),
            Storage::Gguf(g) => g.has(name),
        }
    }

    /// Every tensor as stored (a GGUF's under its Hugging Face names, each expert of a stack
    /// alone); an expert's weight read out of a fused safetensors tensor is not among them, the
    /// fused tensor is (a copy of the checkpoint copies what is on disk).
    pub fn names(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match &self.storage {
            Storage::Safetensors { index, .. } => Box::new(index.keys().map(String::as_str)),
            Storage::Gguf(g) => Box::new(g.names()),
        }
    }

    /// The shape of `name`, or a MissingTensor error naming the directory.
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        let shape = match &self.storage {
            Storage::Safetensors {
                experts, quantized, ..
            } => quantized
                .shape(name)
                // (ModelOpt's NVFP4 and bitsandbytes' weights are stored under their own name,
                // as codes.)
                .or_else(|| {
                    self.shard_of(name)
                        .and_then(|f| f.entry(name))
                        .map(|e| e.shape.as_slice())
                })
                .or_else(|| experts.shape(name)),
            Storage::Gguf(g) => g.shape(name),
        };
        shape.ok_or_else(|| self.missing(name))
    }

    /// The type rows of `name` are read in, if it is a float tensor (a GGUF tensor that is
    /// dequantized reads as f32).
    pub fn float_type(&self, name: &str) -> Option<FloatType> {
        match &self.storage {
            Storage::Safetensors {
                experts, shards, ..
            } if experts.has(name) => experts.float_type(name, shards),
            Storage::Safetensors { quantized, .. } if quantized.has(name) => Some(FloatType::F32),
            Storage::Safetensors { .. } => self
                .shard_of(name)
                .and_then(|f| f.entry(name))
                .and_then(|e| FloatType::from_dtype(e.dtype)),
            Storage::Gguf(g) => g.float_type(name),
        }
    }

    /// True when [`Checkpoint::rows_raw`] borrows the rows of `name` from the map; false when
    /// it builds them (a dequantized GGUF tensor or quantized weight, an expert's weight
    /// gathered out of a fused tensor), so that batch schedulers read those one at a time instead of holding a whole
    /// batch of copies.
    pub fn borrows(&self, name: &str) -> bool {
        match &self.storage {
            Storage::Safetensors {
                experts, quantized, ..
            } => !experts.has(name) && !quantized.has(name),
            Storage::Gguf(g) => g.as_stored(name),
        }
    }

    /// Reads rows of a 2-D tensor as f32 (NaN/Inf refused, error names the shard and tensor).
    pub fn read_rows_f32(&self, name: &str, rows: std::ops::Range<usize>) -> Result<Vec<f32>> {
        if let Some((bytes, ty, _)) = self.built_rows(name, &rows)? {
            return Ok(crate::io::safetensors::decode_f32(&bytes, ty));
        }
        match &self.storage {
            Storage::Safetensors { .. } => self
                .shard_of(name)
                .ok_or_else(|| self.missing(name))?
                .read_rows_f32(name, rows),
            Storage::Gguf(g) => g.read_rows_f32(name, rows),
        }
    }

    /// Rows of a 2-D tensor as stored: (bytes, type, row length); NaN/Inf refused. A GGUF's
    /// quantized (or permuted) tensors come dequantized, as f32.
    pub fn rows_raw(
        &self,
        name: &str,
        rows: std::ops::Range<usize>,
    ) -> Result<(RawBytes<'_>, FloatType, usize)> {
        if let Some(built) = self.built_rows(name, &rows)? {
            return Ok(built);
        }
        match &self.storage {
            Storage::Safetensors { .. } => {
                let (bytes, ty, cols) = self
                    .shard_of(name)
                    .ok_or_else(|| self.missing(name))?
                    .rows_raw(name, rows)?;
                Ok((RawBytes::Borrowed(bytes), ty, cols))
            }
            Storage::Gguf(g) => g.rows_raw(name, rows, false),
        }
    }

    /// Rows of a 2-D tensor to be decoded as they are read (a GGUF's quantized or permuted
    /// tensor, NaN/Inf refused first), so that a decomposition never holds it whole in f32; None
    /// where [`Checkpoint::rows_raw`] hands them out whole (borrowed as stored, or an expert's
    /// weight gathered out of a fused tensor).
    pub fn row_decoder(
        &self,
        name: &str,
        rows: std::ops::Range<usize>,
    ) -> Result<Option<crate::io::gguf::QuantizedRows<'_>>> {
        match &self.storage {
            Storage::Safetensors { .. } => Ok(None),
            Storage::Gguf(g) => g.row_decoder(name, rows),
        }
    }

    /// [`Checkpoint::rows_raw`] without the NaN/Inf scan of borrowed bytes, with the file's
    /// path for [`crate::io::safetensors::check_finite`] when the caller reads the bytes.
    pub fn rows_raw_unchecked(
        &self,
        name: &str,
        rows: std::ops::Range<usize>,
    ) -> Result<(RawBytes<'_>, FloatType, usize, &std::path::Path)> {
        // Built rows are scanned as they are built, as a GGUF's are.
        if let Some((bytes, ty, cols)) = self.built_rows(name, &rows)? {
            let file = self.file_of(name).expect("a stored expert's shard");
            return Ok((bytes, ty, cols, file));
        }
        match &self.storage {
            Storage::Safetensors { .. } => {
                let file = self.shard_of(name).ok_or_else(|| self.missing(name))?;
                let (bytes, ty, cols) = file.rows_raw_unchecked(name, rows)?;
                Ok((RawBytes::Borrowed(bytes), ty, cols, file.path()))
            }
            Storage::Gguf(g) => {
                let (bytes, ty, cols) = g.rows_raw(name, rows, true)?;
                Ok((bytes, ty, cols, g.path()))
            }
        }
    }

    /// Rows of a weight built as read (NaN and Inf refused): an expert's weight the checkpoint
    /// stores fused, or a quantized weight (FP8, packed, bitsandbytes, MLX, an expert of an MLX
    /// stack); None for any other tensor.
    fn built_rows(
        &self,
        name: &str,
        rows: &std::ops::Range<usize>,
    ) -> Result<Option<(RawBytes<'_>, FloatType, usize)>> {
        match &self.storage {
            Storage::Safetensors {
                shards,
                experts,
                quantized,
                ..
            } => match experts.read_rows(name, rows.clone(), shards)? {
                Some(built) => Ok(Some(built)),
                None => quantized.read_rows(name, rows.clone(), shards),
            },
            Storage::Gguf(_) => Ok(None),
        }
    }

    fn missing(&self, name: &str) -> Error {
        let hint = self
            .fused_expert_hint(name)
            .unwrap_or_else(|| format!(" (model_type `{}`)", self.config.model_type));
        Error::MissingTensor {
            path: self.dir.clone(),
            tensor: name.to_string(),
            hint,
        }
    }

    /// For an expert's weight of a family that stores experts fused: the fused tensor it is
    /// read out of, which is not there either.
    fn fused_expert_hint(&self, name: &str) -> Option<String> {
        if self.gguf().is_some() || !name.contains(".experts.") {
            return None;
        }
        let arch = crate::arch::for_config(&self.config, &self.dir).ok()?;
        let spec = arch.stored_experts.as_ref()?;
        let module = name.strip_suffix(".weight")?;
        let (prefix, (layer, _, m)) = arch
            .layer_prefixes
            .iter()
            .find_map(|p| arch.parse_module(p, module).map(|found| (p, found)))?;
        let fused = match m.parts.as_slice() {
            [crate::arch::Part::Down] => &spec.down,
            _ => &spec.gate_up,
        };
        Some(format!(
            " (model_type `{}` reads it out of `{prefix}.{layer}.{fused}`, in a float type or as \
             MXFP4 `_blocks` and `_scales`, which is not in the checkpoint either)",
            self.config.model_type
        ))
    }
}

/// Opens every shard named by an index and checks that the index and the shards agree.
fn open_sharded(
    dir: &Path,
    index_path: &Path,
) -> Result<(Vec<TensorFile>, HashMap<String, usize>)> {
    let text =
        std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, "cannot read", e))?;
    let map = parse_index(&text, index_path)?;
    let mut shard_ids: HashMap<String, usize> = HashMap::new();
    let mut shards = Vec::new();
    let mut index = HashMap::new();
    for (tensor, shard) in &map {
        let shard = shard.as_str();
        let id = match shard_ids.get(shard) {
            Some(&id) => id,
            None => {
                let path = dir.join(shard);
                if !path.is_file() {
                    return Err(Error::config(
                        index_path,
                        format!("names shard `{shard}` (for `{tensor}`), which does not exist"),
                    ));
                }
                shards.push(TensorFile::open(&path)?);
                shard_ids.insert(shard.to_string(), shards.len() - 1);
                shards.len() - 1
            }
        };
        if shards[id].entry(tensor).is_none() {
            return Err(Error::MissingTensor {
                path: shards[id].path().to_path_buf(),
                tensor: tensor.clone(),
                hint: format!(" (the index {} places it there)", index_path.display()),
            });
        }
        index.insert(tensor.clone(), id);
    }
    // A tensor stored in two shards makes the checkpoint ambiguous: refuse it.
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (id, shard) in shards.iter().enumerate() {
        for name in shard.names() {
            if let Some(&other) = seen.get(name) {
                return Err(Error::config(
                    index_path,
                    format!(
                        "tensor `{name}` is stored twice, in {} and {}",
                        shards[other].path().display(),
                        shard.path().display()
                    ),
                ));
            }
            seen.insert(name, id);
        }
    }
    Ok((shards, index))
}

/// Parses `model.safetensors.index.json` into (tensor, shard file) pairs, refusing a tensor listed
/// twice and shard names that are not plain file names. The fuzz targets call this directly.
pub fn parse_index(text: &str, path: &Path) -> Result<Vec<(String, String)>> {
    let parsed: IndexFile = serde_json::from_str(text)
        .map_err(|e| Error::config(path, format!("invalid index: {e}")))?;
    let mut listed = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(parsed.weight_map.0.len());
    for (tensor, shard) in parsed.weight_map.0 {
        if !listed.insert(tensor.clone()) {
            return Err(Error::config(
                path,
                format!("weight_map lists tensor `{tensor}` twice"),
            ));
        }
        let shard = shard.as_str().ok_or_else(|| {
            Error::config(path, format!("weight_map[`{tensor}`] is not a file name"))
        })?;
        if shard.is_empty()
            || shard.contains('/')
            || shard.contains('\\')
            || shard == "."
            || shard == ".."
        {
            return Err(Error::config(
                path,
                format!("weight_map[`{tensor}`] = `{shard}` is not a plain file name"),
            ));
        }
        out.push((tensor, shard.to_string()));
    }
    Ok(out)
}

/// `model.safetensors.index.json`; other fields (metadata) are ignored.
#[derive(serde::Deserialize)]
struct IndexFile {
    weight_map: WeightMap,
}

/// `weight_map` read entry by entry, so that a tensor listed twice is caught (a JSON object
/// parsed into a map keeps only the last entry).
struct WeightMap(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for WeightMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = WeightMap;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object mapping tensor names to shard file names")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<WeightMap, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, serde_json::Value>()? {
                    entries.push(entry);
                }
                Ok(WeightMap(entries))
            }
        }
        d.deserialize_map(Visitor)
    }
}
