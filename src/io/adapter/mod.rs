//! PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`, read and written the
//! way PEFT does (keys `base_model.model.<module>.lora_{A,B}.weight`, A `[r, in]`, B `[out, r]`,
//! scale `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rslora, per-module `rank_pattern` and
//! `alpha_pattern` regexes). Features whose update is not `s·B·A` are refused, never guessed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::safetensors::{self as st, FloatType, OutTensor, TensorFile};

/// The prefix PEFT puts in front of the base model's module names.
pub const PEFT_PREFIX: &str = "base_model.model.";
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

mod config;
mod fused;
pub mod mlx;
pub mod mlx_write;
pub use config::{exact_pattern, AdapterConfig, EXPERT_PARAMETERS};

/// One adapted module: its factors A `[r, in]` and B `[out, r]` (row-major) as `T` — where they
/// lie in the adapter file ([`LoraTensors`]), their values ([`LoraFactors`]) or the bytes to be
/// written ([`EncodedFactors`]) — with its rank, shape, alpha and stored type.
#[derive(Debug, Clone)]
pub struct LoraModule<T> {
    pub a: T,
    pub b: T,
    pub r: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub alpha: f64,
    /// The type its factors are stored in.
    pub ty: FloatType,
}

/// A module as an adapter file holds it: where its lora_A and lora_B lie.
pub type LoraTensors = LoraModule<FactorRef>;

/// Where one factor lies in the adapter file: a whole tensor, or one expert's block of a LoRA on
/// fused expert parameters (`fused.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FactorRef {
    pub tensor: String,
    pub expert: Option<ExpertBlock>,
    /// One expert's matrix of a stack `[experts, rows, cols]`, read as it lies: mlx-lm's
    /// `LoRASwitchLinear`, whose `lora_a` `[E, r, in]` and `lora_b` `[E, out, r]` hold each
    /// expert's PEFT A and B.
    pub stacked: Option<usize>,
}

/// One expert's factor inside a fused LoRA of rank `rank` per expert over `experts` experts: the
/// fused tensor's rows `rows` taken every `step`-th (a gate's or an up projection's among the
/// alternating rows of GPT-OSS's `gate_up_proj`; else every row), and, in B, the expert's
/// columns. Where `reversed` (Llama 4: [`ExpertsLayout::reversed`]) the factor is stored the
/// other way round: A is read as PEFT's B is (`rows` its input rows, the expert's columns) and
/// B out of PEFT's A (the expert's rows, `rows` naming its columns), each then transposed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertBlock {
    pub expert: usize,
    pub experts: usize,
    pub rank: usize,
    pub rows: std::ops::Range<usize>,
    pub step: usize,
    pub reversed: bool,
}

/// How a PEFT LoRA on a family's fused expert parameters lays out its factors: where an
/// expert's gate and up rows lie in `gate_up_proj`, and whether PEFT took the parameter's
/// dimensions the other way round (A `[r·E, out]`, B `[in, r·E]`; its update `(B·A)ᵀ`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpertsLayout {
    pub gate_up: GateUpRows,
    pub reversed: bool,
    /// The base's hidden size, where known: which of its sides a lone parameter's LoRA reads
    /// or writes tells which way round its factors lie when the family's usual way does not fit.
    pub hidden: Option<usize>,
}

/// How a fused `gate_up_proj` holds an expert's gate and up projection: the gate's rows, then
/// the up projection's (transformers 5's experts), or alternating, gate first (GPT-OSS).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GateUpRows {
    #[default]
    Halves,
    Interleaved,
}

impl GateUpRows {
    /// Where part `slot` (0: gate, 1: up; of `slots`, each `width` rows) lies among the fused
    /// rows: its row i is `start + i·step`.
    pub fn placement(self, slot: usize, slots: usize, width: usize) -> (usize, usize) {
        match self {
            GateUpRows::Interleaved if slots > 1 => (slot, slots),
            _ => (slot * width, 1),
        }
    }
}

impl FactorRef {
    /// A factor that is a whole tensor of the file.
    pub fn whole(tensor: String) -> Self {
        FactorRef {
            tensor,
            expert: None,
            stacked: None,
        }
    }

    /// Expert `expert`'s matrix of a stacked factor `[experts, rows, cols]`.
    pub fn stacked(tensor: String, expert: usize) -> Self {
        FactorRef {
            tensor,
            expert: None,
            stacked: Some(expert),
        }
    }
}

impl ExpertBlock {
    /// How many rows of the fused tensor are this expert part's.
    pub fn count(&self) -> usize {
        self.rows.len().div_ceil(self.step)
    }
}
/// A module's factors in f32.
pub type LoraFactors = LoraModule<Vec<f32>>;
/// A module's factors encoded in its type, as the output file will hold them (half the memory of
/// f32 for bf16 and f16 adapters).
pub type EncodedFactors = LoraModule<Vec<u8>>;

impl<T> LoraModule<T> {
    /// The same module with other factors.
    pub fn with<U>(&self, a: U, b: U) -> LoraModule<U> {
        LoraModule {
            a,
            b,
            r: self.r,
            in_features: self.in_features,
            out_features: self.out_features,
            alpha: self.alpha,
            ty: self.ty,
        }
    }
}

impl LoraFactors {
    /// The factors encoded in their type (round to nearest even).
    pub fn encode(&self) -> EncodedFactors {
        self.with(
            st::encode_f32(&self.a, self.ty),
            st::encode_f32(&self.b, self.ty),
        )
    }
}

/// Which factor of a module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Factor {
    A,
    B,
}

/// An opened adapter: its config, and its modules keyed by name (without the PEFT prefix), every
/// key, shape and value checked. The factors stay in the (memory-mapped) file until a module is
/// read with [`factors`](Self::factors): a transfer holds one module's at a time, not the
/// adapter's (3.3 GB in f32 for a 70B model's all-linear adapter at r = 64).
#[derive(Debug)]
pub struct Adapter {
    pub dir: PathBuf,
    pub config: AdapterConfig,
    pub modules: BTreeMap<String, LoraTensors>,
    file: TensorFile,
    /// The file holds each factor transposed (an MLX adapter: [`mlx`]).
    transposed: bool,
}

impl Adapter {
    /// Opens an adapter directory, checking every key, shape and value.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, ExpertsLayout::default())
    }

    /// [`Adapter::open`] for a base whose fused expert parameters PEFT adapts as `layout` says
    /// (the base's table knows; the adapter cannot tell). An MLX adapter directory
    /// (`adapters.safetensors`) opens as the PEFT adapter of the same update.
    pub fn open_with(dir: &Path, layout: ExpertsLayout) -> Result<Self> {
        if mlx::is_mlx(dir) {
            return mlx::open(dir);
        }
        let config_path = dir.join(CONFIG_FILE);
        let weights_path = dir.join(WEIGHTS_FILE);
        if !config_path.is_file() {
            return Err(Error::config(
                dir,
                format!(
                    "no {CONFIG_FILE} (expected a PEFT adapter directory, or an MLX one with \
                     {})",
                    mlx::MLX_WEIGHTS_FILE
                ),
            ));
        }
        if !weights_path.is_file() {
            let reason = if dir.join("adapter_model.bin").is_file() {
                "adapter_model.bin (pickle) adapters are not read; re-save the adapter with safetensors (PEFT's default)".to_string()
            } else {
                format!(
                    "no {WEIGHTS_FILE} (or {}, an MLX adapter's)",
                    mlx::MLX_WEIGHTS_FILE
                )
            };
            return Err(Error::UnsupportedAdapter {
                path: dir.to_path_buf(),
                reason,
            });
        }
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| Error::io(&config_path, "cannot read", e))?;
        let config = AdapterConfig::parse(&text, &config_path)?;
        let file = TensorFile::open(&weights_path)?;
        let modules = index_modules(&file, &config, layout)?;
        if modules.is_empty() {
            return Err(Error::UnsupportedAdapter {
                path: weights_path,
                reason: "no lora_A / lora_B tensors".into(),
            });
        }
        Ok(Adapter {
            dir: dir.to_path_buf(),
            config,
            modules,
            file,
            transposed: false,
        })
    }

    /// The factors of `module`, read from the file in f32.
    pub fn factors(&self, module: &str) -> Result<LoraFactors> {
        let m = self.module(module)?;
        Ok(m.with(self.read(&m.a, false)?, self.read(&m.b, true)?))
    }

    /// One factor of `module` (`[r, in]` A or `[out, r]` B), read from the file in f32.
    pub fn factor(&self, module: &str, which: Factor) -> Result<Vec<f32>> {
        let m = self.module(module)?;
        match which {
            Factor::A => self.read(&m.a, false),
            Factor::B => self.read(&m.b, true),
        }
    }

    fn read(&self, f: &FactorRef, is_b: bool) -> Result<Vec<f32>> {
        if let Some(e) = f.stacked {
            // (A stack's first dimension is its rows: one row is one expert's matrix.)
            return self.file.read_rows_f32(&f.tensor, e..e + 1);
        }
        match f.expert {
            None if self.transposed => {
                let values = self.file.read_f32(&f.tensor)?;
                let shape = &self.file.entry(&f.tensor).expect("indexed").shape;
                Ok(fused::transpose(&values, shape[0], shape[1]))
            }
            None => self.file.read_f32(&f.tensor),
            Some(_) => fused::pick(&self.file, f, is_b),
        }
    }

    /// Gives a module another name (a fused expert's, as the source's table names it); a name
    /// the adapter already has is refused.
    pub fn rename_module(&mut self, from: &str, to: String) -> Result<()> {
        if self.modules.contains_key(&to) {
            return Err(Error::UnsupportedAdapter {
                path: self.dir.clone(),
                reason: format!(
                    "`{to}` is adapted both on its own and as `{from}` of the fused experts"
                ),
            });
        }
        if let Some(m) = self.modules.remove(from) {
            self.modules.insert(to, m);
        }
        Ok(())
    }

    fn module(&self, module: &str) -> Result<&LoraTensors> {
        self.modules.get(module).ok_or_else(|| {
            let (path, tensor) = factor_location(&self.dir, module, Factor::A);
            Error::MissingTensor {
                path,
                tensor,
                hint: " (the adapter has no such module)".into(),
            }
        })
    }

    /// Every module's factors, in f32 (the whole adapter in memory: for tests and small tools).
    pub fn read_all(&self) -> Result<BTreeMap<String, LoraFactors>> {
        self.modules
            .keys()
            .map(|name| Ok((name.clone(), self.factors(name)?)))
            .collect()
    }
}

/// The file and key of a module's factor in the adapter directory `dir`, for messages: PEFT's
/// `base_model.model.<module>.lora_A.weight`, or an MLX adapter's `<module>.lora_a`.
pub fn factor_location(dir: &Path, module: &str, factor: Factor) -> (PathBuf, String) {
    let which = if factor == Factor::A { "A" } else { "B" };
    if mlx::is_mlx(dir) {
        let key = format!("{module}.lora_{}", which.to_lowercase());
        return (dir.join(mlx::MLX_WEIGHTS_FILE), key);
    }
    let key = format!("{PEFT_PREFIX}{module}.lora_{which}.weight");
    (dir.join(WEIGHTS_FILE), key)
}

/// Splits a PEFT key into (module name, "A"/"B"), refusing keys this engine cannot transfer.
fn parse_key(key: &str, path: &Path) -> Result<(String, char)> {
    let unsupported = |reason: String| Error::UnsupportedAdapter {
        path: path.to_path_buf(),
        reason,
    };
    if key.contains("lora_magnitude_vector") {
        return Err(unsupported(format!("`{key}` is a DoRA magnitude vector")));
    }
    if key.contains("lora_embedding_") {
        return Err(unsupported(format!(
            "`{key}`: LoRA on embeddings is not transferred"
        )));
    }
    let body = key.strip_prefix(PEFT_PREFIX).unwrap_or(key);
    for (part, which) in [(".lora_A.", 'A'), (".lora_B.", 'B')] {
        if let Some(pos) = body.find(part) {
            let rest = &body[pos + part.len()..];
            // `weight`, or `<adapter name>.weight` as in some saved-by-hand adapters.
            if rest == "weight"
                || (rest.ends_with(".weight") && !rest[..rest.len() - 7].contains('.'))
            {
                return Ok((body[..pos].to_string(), which));
            }
            if rest.ends_with("bias") {
                return Err(unsupported(format!("`{key}` is a lora bias")));
            }
        }
    }
    Err(unsupported(format!(
        "`{key}` is not a lora_A/lora_B weight (modules_to_save or another PEFT method?)"
    )))
}

/// The type both factors of a module are given (the one that holds both exactly: f32 when they
/// differ, so that neither loses precision it came with), their stored types checked to be
/// floats and their values free of NaN and Inf, on the bits (not when a unit reads the module
/// after the work before it).
fn checked_factors(file: &TensorFile, a: &str, b: &str) -> Result<FloatType> {
    let mut types = [a, b].into_iter().map(|key| {
        let entry = file.entry(key).expect("key listed by the file");
        let ty = FloatType::from_dtype(entry.dtype).ok_or_else(|| {
            let dtype = entry.dtype;
            Error::bad_tensor(
                file.path(),
                key,
                format!("dtype {dtype:?} is not bf16, f16 or f32"),
            )
        })?;
        file.rows_raw(key, 0..entry.shape[0])?;
        Ok::<_, Error>(ty)
    });
    let (ty_a, ty_b) = (types.next().expect("two")?, types.next().expect("two")?);
    Ok(if ty_a == ty_b { ty_a } else { FloatType::F32 })
}

/// Pairs every module's lora_A and lora_B and checks their shapes, types and values against
/// each other and the config (the values on their bits, nothing decoded or kept).
fn index_modules(
    file: &TensorFile,
    config: &AdapterConfig,
    layout: ExpertsLayout,
) -> Result<BTreeMap<String, LoraTensors>> {
    let path = file.path();
    let mut pairs: BTreeMap<String, [Option<String>; 2]> = BTreeMap::new();
    for key in file.names() {
        let (module, which) = parse_key(key, path)?;
        let slot = &mut pairs.entry(module.clone()).or_default()[(which == 'B') as usize];
        // Two adapters saved into one file (`lora_A.default.weight` and `lora_A.other.weight`)
        // would otherwise be mixed in whatever order the names come.
        if let Some(first) = slot {
            return Err(Error::UnsupportedAdapter {
                path: path.to_path_buf(),
                reason: format!(
                    "`{first}` and `{key}` are both lora_{which} of `{module}`: one adapter per \
                     file (save each adapter of a multi-adapter model on its own)"
                ),
            });
        }
        *slot = Some(key.to_string());
    }
    let mut out = BTreeMap::new();
    let mut wrappers: BTreeMap<String, BTreeMap<usize, fused::Wrapper>> = BTreeMap::new();
    for (module, [a_key, b_key]) in pairs {
        let missing = |which: &str| Error::MissingTensor {
            path: path.to_path_buf(),
            tensor: format!("{PEFT_PREFIX}{module}.{which}.weight"),
            hint: " (every lora_A needs its lora_B)".into(),
        };
        let a_key = a_key.ok_or_else(|| missing("lora_A"))?;
        let b_key = b_key.ok_or_else(|| missing("lora_B"))?;
        let a_entry = file.entry(&a_key).expect("key listed by the file");
        let b_entry = file.entry(&b_key).expect("key listed by the file");
        let (&[r, n], &[m, rb]) = (a_entry.shape.as_slice(), b_entry.shape.as_slice()) else {
            return Err(Error::bad_tensor(
                path,
                &a_key,
                format!(
                    "lora_A {:?} and lora_B {:?} must both be 2-D",
                    a_entry.shape, b_entry.shape
                ),
            ));
        };
        if r != rb || r == 0 {
            return Err(Error::bad_tensor(
                path,
                &b_key,
                format!("lora_B is [{m}, {rb}] but lora_A is [{r}, {n}]: ranks differ"),
            ));
        }
        let ty = checked_factors(file, &a_key, &b_key)?;
        let fused = (!config.target_parameters.is_empty())
            .then(|| fused::wrapper(&module))
            .flatten();
        if let Some((experts_path, depth)) = fused {
            let w = fused::Wrapper {
                a: a_key,
                b: b_key,
                a_shape: (r, n),
                b_shape: (m, rb),
                ty,
            };
            wrappers
                .entry(experts_path.to_string())
                .or_default()
                .insert(depth, w);
            continue;
        }
        let expected = config.rank_for(&module);
        if r != expected {
            return Err(Error::bad_tensor(
                path,
                &a_key,
                format!("rank {r}, but adapter_config.json gives this module r = {expected}"),
            ));
        }
        let alpha = config.alpha_for(&module);
        out.insert(
            module,
            LoraModule {
                a: FactorRef::whole(a_key),
                b: FactorRef::whole(b_key),
                r,
                in_features: n,
                out_features: m,
                alpha,
                ty,
            },
        );
    }
    for (name, m) in fused::expand(wrappers, config, path, layout)? {
        if out.insert(name.clone(), m).is_some() {
            return Err(Error::UnsupportedAdapter {
                path: path.to_path_buf(),
                reason: format!(
                    "`{name}` is adapted both on its own and through the fused experts"
                ),
            });
        }
    }
    Ok(out)
}

/// Writes an adapter into `dir` (which must exist): weights first, then the config.
pub fn write_adapter(
    dir: &Path,
    config: &serde_json::Map<String, serde_json::Value>,
    modules: &BTreeMap<String, EncodedFactors>,
) -> Result<()> {
    let mut tensors = Vec::with_capacity(modules.len() * 2);
    for (module, f) in modules {
        tensors.push((
            format!("{PEFT_PREFIX}{module}.lora_A.weight"),
            OutTensor::borrowed(f.ty, vec![f.r, f.in_features], &f.a),
        ));
        tensors.push((
            format!("{PEFT_PREFIX}{module}.lora_B.weight"),
            OutTensor::borrowed(f.ty, vec![f.out_features, f.r], &f.b),
        ));
    }
    st::write_file(&dir.join(WEIGHTS_FILE), &tensors, st::pt_metadata())?;
    let text = serde_json::to_string_pretty(config).expect("JSON values always serialize");
    let path = dir.join(CONFIG_FILE);
    std::fs::write(&path, text + "\n").map_err(|e| Error::io(&path, "cannot write", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_parsed_and_foreign_keys_refused() {
        let p = Path::new("w.safetensors");
        assert_eq!(
            parse_key(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                p
            )
            .unwrap(),
            ("model.layers.0.self_attn.q_proj".to_string(), 'A')
        );
        assert_eq!(
            parse_key(
                "base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight",
                p
            )
            .unwrap()
            .1,
            'B'
        );
        for key in [
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias",
            "base_model.model.lm_head.weight",
            "base_model.model.model.embed_tokens.lora_embedding_A",
        ] {
            assert!(parse_key(key, p).is_err(), "{key} accepted");
        }
    }
}
