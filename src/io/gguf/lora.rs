//! A PEFT adapter written as llama.cpp loads LoRA adapters (`llama-cli --lora`, `llama-server
//! --lora`, Ollama's `ADAPTER`): a GGUF with `general.type = adapter`, `adapter.type = lora` and
//! `adapter.lora.alpha`, and for every adapted base tensor `<its GGUF name>.lora_a` (A, dims
//! `[in, r]`) and `.lora_b` (B, dims `[r, out]`), as llama.cpp's `convert_lora_to_gguf.py` writes
//! them: under the base's GGUF tensor names, B's rows and A's columns in the order the converter
//! stores the base weight's (Q and K of llama-family models; Qwen3.5's value heads, which its
//! LoRA converter cannot move), in the adapter's stored type. Qwen3-Next's `in_proj_qkvz`, which
//! the base converter splits into `attn_qkv` and `attn_gate`, gets a pair for each, B's rows split
//! as the weight's; latent attention's input projections (DeepSeek's), which llama.cpp multiplies
//! without a LoRA, are refused.
//!
//! [`export`] is the `export-gguf` command; [`write_lora_gguf`] also serves `transfer
//! --gguf-adapter`.
//!
//! llama.cpp scales every tensor by one alpha over the tensor's own rank, so a `rank_pattern` needs
//! nothing; a module whose PEFT scale is not `lora_alpha / r` (an `alpha_pattern` entry, or
//! rslora's `alpha / √r`) has the ratio folded into its B, and both its factors are written in
//! f32 (B times the ratio rounded once, to f32, not to the adapter's half type); the converter
//! ignores these scales.

use std::path::Path;

use crate::arch::{self, Part};
use crate::error::{Error, Result};
use crate::io::adapter::{Adapter, Factor};
use crate::io::checkpoint::Checkpoint;
use crate::io::gguf::joined::FusedQkvz;
use crate::io::gguf::names::{self, Family};
use crate::io::gguf::reorder::{self, Reorder};
use crate::io::gguf::write::{self, GgufTensor, MetaValue};
use crate::io::output::{name_of, StagedFile};
use crate::io::safetensors::{encode_f32, FloatType};

/// The file name a transfer writes it under, beside `adapter_model.safetensors`.
pub const LORA_GGUF_FILE: &str = "adapter_model.gguf";

/// Hugging Face `model_type`s llama.cpp converts as another family's architecture: Mistral as
/// Llama (the first `llama` family, without experts), a multimodal Gemma 3 as its text model, OLMo
/// 3 as OLMo 2, a multimodal Qwen3.5 release as its text model, DeepSeek-V2, Kimi K2 and
/// GLM-4.7-Flash as DeepSeek.
const CONVERTED_AS: &[(&str, &str)] = &[
    ("mistral", "llama"),
    ("gemma3", "gemma3"),
    ("olmo3", "olmo2"),
    ("qwen3_5", "qwen35"),
    ("qwen3_5_moe", "qwen35moe"),
    ("deepseek_v2", "deepseek2"),
    ("kimi_k2", "deepseek2"),
    ("glm4_moe_lite", "deepseek2"),
];

/// The llama.cpp family of a base model: a GGUF's own, or the one llama.cpp converts a Hugging
/// Face `model_type` as.
pub fn family_of_base(base: &Checkpoint) -> Result<&'static Family> {
    if let Some(model) = base.gguf() {
        return Ok(model.family());
    }
    let model_type = base.config.model_type.as_str();
    let alias = CONVERTED_AS.iter().find(|(t, _)| *t == model_type);
    names::FAMILIES
        .iter()
        .find(|f| match alias {
            Some((_, arch)) => f.gguf == *arch,
            None => f.model_type == model_type,
        })
        .ok_or_else(|| {
            Error::config(
                base.config_path(),
                format!(
                    "model_type `{model_type}`: no llama.cpp architecture is known for it, so no \
                     GGUF adapter can be written (known: {})",
                    (names::FAMILIES.iter().map(|f| f.model_type))
                        .chain(CONVERTED_AS.iter().map(|(t, _)| *t))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })
}

/// What [`export`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Exported {
    /// `out` as given (lossily as text, for the report).
    pub path: String,
    /// The llama.cpp architecture (`general.architecture`).
    pub architecture: &'static str,
    pub modules: usize,
    pub lora_alpha: f64,
}

/// `export-gguf`: the adapter at `adapter` written as a llama.cpp LoRA for `base` (each a
/// directory, a GGUF file for the base, or a cached hub name) at `out`, atomically; an existing
/// `out` is replaced only with `force`, and only when it is a LoRA GGUF. `progress` is asked
/// before each tensor and before the commit, so a cancelled export writes nothing.
pub fn export(
    adapter: &Path,
    base: &Path,
    out: &Path,
    force: bool,
    progress: &crate::progress::Progress,
) -> Result<Exported> {
    use crate::io::hub::{self, Kind};
    let (adapter_dir, hub_name) = hub::resolve(adapter, Kind::Adapter)?;
    let (base_dir, _) = hub::resolve(base, Kind::Model)?;
    let checkpoint = Checkpoint::open(&base_dir)?;
    let family = family_of_base(&checkpoint)?;
    // A LoRA on fused experts, one module per expert under the base's names (its gate and up
    // rows as the base's family lays them out: alternating only for GPT-OSS, which
    // `family_of_base` refuses today).
    let side = crate::plan::ModelSide::new(&checkpoint)?;
    let mut opened = Adapter::open_with(&adapter_dir, side.experts_layout())?;
    crate::plan::experts::name_fused_experts(&mut opened, &side)?;
    let weights = adapter_dir.join(crate::io::adapter::WEIGHTS_FILE);
    let inputs = [adapter_dir.as_path(), weights.as_path(), base_dir.as_path()];
    let staged = StagedFile::create(out, force, &inputs, is_lora_gguf)?;
    // A hub adapter by its name, not its snapshot's commit.
    let name = hub_name.map_or_else(|| name_of(&adapter_dir), |h| h.name);
    write_lora_gguf(
        &opened,
        (&checkpoint, &|_| true),
        &name,
        staged.path(),
        &|| progress.check(),
    )?;
    progress.confirm()?;
    Ok(Exported {
        path: staged.commit()?.to_string_lossy().into_owned(),
        architecture: family.gguf,
        modules: opened.modules.len(),
        lora_alpha: opened.config.lora_alpha,
    })
}

/// One LoRA tensor pair, placed: its GGUF base tensor name, its modules (one; or, where llama.cpp
/// stacks a layer's experts in one tensor, one per expert, None for an expert the adapter leaves
/// alone, written as zeros), how the converter reordered the base weight's rows (Q and K of
/// llama-family models, Qwen3.5's value heads: B's rows follow) and columns (Qwen3.5's
/// `out_proj`: A's columns follow). A stack's rank is its largest member's: llama.cpp holds one
/// rank for a layer's experts, and a member of a smaller rank is padded with zero ranks (which
/// add nothing).
struct Placed<'a> {
    gguf: String,
    members: Vec<Option<Member<'a>>>,
    stacked: bool,
    /// The rows of B this tensor takes, in its stored order, where the converter split the
    /// module's weight into several tensors (Qwen3-Next's `in_proj_qkvz`); None: all.
    picked: Option<Vec<usize>>,
    rows: Option<Reorder>,
    columns: Option<Reorder>,
    ty: FloatType,
    r: usize,
    in_features: usize,
    out_features: usize,
}

/// An adapter module in a placed tensor: its rank, and its PEFT scale (folded into its B where
/// llama.cpp's scale of the tensor, `alpha / r` at the tensor's rank, differs).
#[derive(Clone, Copy)]
struct Member<'a> {
    module: &'a str,
    r: usize,
    scale: f64,
    ty: FloatType,
}

/// Where a module's LoRA goes in llama.cpp's naming.
struct Place<'t> {
    layer: usize,
    expert: Option<usize>,
    spec: &'t arch::ModuleSpec,
    /// The GGUF modules of the base tensors (`attn_q`, `ffn_up_exps`; two for Qwen3-Next's
    /// `in_proj_qkvz`, which the converter splits into `attn_qkv` and `attn_gate`).
    suffixes: Vec<&'static str>,
}

/// Where a module's LoRA goes ([`Place`]); else why it has none.
fn place<'t>(
    (family, base): (&Family, &Checkpoint),
    table: &'t arch::Arch,
    module: &str,
) -> std::result::Result<Place<'t>, String> {
    let (layer, expert, spec) = table
        .layer_prefixes
        .iter()
        .find_map(|p| table.parse_module(p, module))
        .ok_or_else(|| format!("is not a layer projection of a {} model", table.name))?;
    let at = |suffixes| Place {
        layer,
        expert,
        spec,
        suffixes,
    };
    if family.fused_linear_attention && spec.parts == [Part::LinQkvz] {
        // A GGUF base from before the split holds it whole, as `ssm_in`.
        let weight = format!(
            "{}.weight",
            table.module_path(
                table.detect_prefix(base).map_err(|e| e.to_string())?,
                layer,
                None,
                spec
            )
        );
        let whole = base
            .gguf()
            .is_some_and(|g| g.has(&weight) && !g.is_joined(&weight));
        return Ok(at(match whole {
            true => vec!["ssm_in"],
            false => vec!["attn_qkv", "attn_gate"],
        }));
    }
    // llama.cpp's deepseek2 graph multiplies by latent attention's input projections (and by
    // `attn_k_b`/`attn_v_b`, the split `kv_b_proj`) without a LoRA: an update written for them
    // would load and do nothing.
    if family.latent_attention && spec.key.starts_with("self_attn.") && spec.parts != [Part::O] {
        return Err(format!(
            "({}) is one of latent attention's input projections, which llama.cpp's {} graph \
             multiplies without a LoRA (only `attn_output` and the feed-forward take one)",
            spec.key, family.gguf
        ));
    }
    let suffix = names::gguf_module(family, &spec.key)
        .ok_or_else(|| format!("({}) has no {} tensor", spec.key, family.gguf))?;
    Ok(at(vec![suffix]))
}

/// Refuses, before any work, a transfer with `--gguf-adapter` whose output would carry an update
/// to a module (of `modules`: the target's, with their types) that no llama.cpp LoRA tensor of
/// `base` can hold, naming it and the `--modules` list that leaves it out.
pub fn check_modules<'m>(
    base: &Checkpoint,
    modules: impl Iterator<Item = (&'m str, &'m str)>,
) -> Result<()> {
    let family = family_of_base(base)?;
    let table = arch::for_config(&base.config, &base.config_path())?;
    let (mut refused, mut types) = (None, std::collections::BTreeMap::new());
    for (module, module_type) in modules {
        let placed = place((family, base), table, module);
        *types.entry(module_type).or_insert(true) &= placed.is_ok();
        if let Err(why) = placed {
            refused.get_or_insert((module.to_string(), why));
        }
    }
    let Some((module, why)) = refused else {
        return Ok(());
    };
    let kept: Vec<&str> = types.into_iter().filter(|t| t.1).map(|t| t.0).collect();
    let hint = match kept.is_empty() {
        true => String::new(),
        false => format!(" (leave it out with --modules {})", kept.join(",")),
    };
    Err(Error::arg(
        "--gguf-adapter",
        format!("the output's `{module}` {why}: no llama.cpp LoRA tensor can hold it{hint}"),
    ))
}

/// Writes `adapter` as a llama.cpp LoRA GGUF for `base` at `out` (replacing it), named `name`
/// (`general.name`), its modules that `keep` accepts (a transfer leaves out the ones it wrote
/// with no update); `check` is called before each tensor (an error stops the write).
pub fn write_lora_gguf(
    adapter: &Adapter,
    (base, keep): (&Checkpoint, &dyn Fn(&str) -> bool),
    name: &str,
    out: &Path,
    check: &dyn Fn() -> Result<()>,
) -> Result<()> {
    let family = family_of_base(base)?;
    let table = arch::for_config(&base.config, &base.config_path())?;
    let base_prefix = table.detect_prefix(base)?;
    let alpha = adapter.config.lora_alpha;
    let cfg = &base.config;
    // The head layout the converter's row and column reorders follow.
    let heads = reorder::Heads::from_config(cfg);
    let mut placed: Vec<Placed<'_>> = Vec::with_capacity(adapter.modules.len());
    // A stacked experts tensor's place in `placed`, by its GGUF name.
    let mut stacks = std::collections::HashMap::new();
    for (module, m) in adapter.modules.iter().filter(|m| keep(m.0)) {
        let not_for_base = |why: String| Error::UnsupportedAdapter {
            path: adapter.dir.clone(),
            reason: format!("`{module}` {why}: no llama.cpp LoRA tensor can hold it"),
        };
        let Place {
            layer,
            expert,
            spec,
            suffixes,
        } = place((family, base), table, module).map_err(not_for_base)?;
        let weight = format!(
            "{}.weight",
            table.module_path(base_prefix, layer, expert, spec)
        );
        let shape = base.shape(&weight)?;
        if shape != [m.out_features, m.in_features] {
            return Err(Error::UnsupportedAdapter {
                path: adapter.dir.clone(),
                reason: format!(
                    "`{module}` is [{}, {}] but the base's `{weight}` is {shape:?}: the adapter is \
                     not for this base",
                    m.out_features, m.in_features
                ),
            });
        }
        // B's rows and A's columns are reordered as the converter reorders the base weight's.
        let (rows, columns) = (
            reorder::rows(family, &weight, &heads),
            reorder::columns(family, &weight, &heads),
        );
        let member = Member {
            module,
            r: m.r,
            scale: adapter.config.scale(m.r, m.alpha),
            ty: m.ty,
        };
        let gguf = format!("blk.{layer}.{}.weight", suffixes[0]);
        let new = |gguf: String, members, picked: Option<Vec<usize>>| Placed {
            gguf,
            members,
            stacked: expert.is_some(),
            out_features: picked.as_ref().map_or(m.out_features, Vec::len),
            picked,
            rows,
            columns,
            ty: m.ty,
            r: m.r,
            in_features: m.in_features,
        };
        let Some(e) = expert else {
            if suffixes.len() == 1 {
                placed.push(new(gguf, vec![Some(member)], None));
                continue;
            }
            // One module, two tensors: each takes its rows of B, and all of A.
            let layout = FusedQkvz::of_config(cfg)
                .filter(|l| l.shape() == [m.out_features, m.in_features])
                .ok_or_else(|| {
                    not_for_base(format!(
                        "({}) does not fit the linear attention the base's config gives",
                        spec.key
                    ))
                })?;
            for (suffix, rows) in suffixes.iter().zip(layout.split_rows()) {
                let gguf = format!("blk.{layer}.{suffix}.weight");
                placed.push(new(gguf, vec![Some(member)], Some(rows)));
            }
            continue;
        };
        let count = cfg.experts.as_ref().map_or(0, |x| x.count);
        if e >= count {
            return Err(not_for_base(format!(
                "is expert {e}, but the base's config gives {count} experts per layer"
            )));
        }
        // llama.cpp holds a layer's experts in one tensor per projection, one rank for all.
        let at = *stacks.entry(gguf.clone()).or_insert_with(|| {
            placed.push(new(gguf.clone(), vec![None; count], None));
            placed.len() - 1
        });
        let stack = &mut placed[at];
        stack.r = stack.r.max(m.r);
        stack.members[e] = Some(member);
    }
    // llama.cpp's scale of a tensor is alpha / r at its rank (1 when alpha is 0), with alpha as
    // the file stores it, in f32. Where a member's own scale differs, its B takes the ratio, and
    // the tensor is written in f32 (as when its members' types differ).
    let stored_alpha = alpha as f32 as f64;
    for p in &mut placed {
        let members: Vec<&Member<'_>> = p.members.iter().flatten().collect();
        let first = members[0].ty;
        let exact = members
            .iter()
            .all(|m| m.ty == first && m.fold(p.r, stored_alpha) == 1.0);
        p.ty = if exact { first } else { FloatType::F32 };
    }
    let mut tensors = Vec::with_capacity(placed.len() * 2);
    for p in &placed {
        // A stack of experts is a third dimension, slowest: `[in, r, experts]`, `[r, out, experts]`.
        let experts = p.stacked.then_some(p.members.len() as u64);
        let (r, n, m) = (p.r as u64, p.in_features as u64, p.out_features as u64);
        tensors.push(GgufTensor {
            name: format!("{}.lora_a", p.gguf),
            dims: [n, r].into_iter().chain(experts).collect(),
            ty: p.ty,
            produce: Box::new(move || {
                check()?;
                // A `[r, in]`: a smaller rank's missing rows are zeros.
                let a = p.gather(
                    |member| {
                        let mut a = stored_a(p, adapter.factor(member.module, Factor::A)?);
                        a.resize(p.r * p.in_features, 0.0);
                        Ok(a)
                    },
                    p.r * p.in_features,
                )?;
                Ok(encode_f32(&a, p.ty))
            }),
        });
        tensors.push(GgufTensor {
            name: format!("{}.lora_b", p.gguf),
            dims: [r, m].into_iter().chain(experts).collect(),
            ty: p.ty,
            produce: Box::new(move || {
                check()?;
                let b = p.gather(
                    |member| {
                        let b = adapter.factor(member.module, Factor::B)?;
                        let fold = member.fold(p.r, stored_alpha);
                        Ok(stored_b(p, fold, pad_columns(b, member.r, p.r)))
                    },
                    p.r * p.out_features,
                )?;
                Ok(encode_f32(&b, p.ty))
            }),
        });
    }
    let metadata = [
        ("general.architecture", MetaValue::Str(family.gguf)),
        ("general.type", MetaValue::Str("adapter")),
        ("adapter.type", MetaValue::Str("lora")),
        ("general.name", MetaValue::Str(name)),
        ("adapter.lora.alpha", MetaValue::F32(alpha as f32)),
        ("general.quantization_version", MetaValue::U32(2)),
    ];
    write::write_file(out, &metadata, &tensors)
}

impl Member<'_> {
    /// The factor its B takes in a tensor of rank `r`: its scale over llama.cpp's, `alpha / r`
    /// (1 when alpha is 0).
    fn fold(&self, r: usize, alpha: f64) -> f64 {
        let gguf_scale = if alpha != 0.0 { alpha / r as f64 } else { 1.0 };
        self.scale / gguf_scale
    }
}

impl Placed<'_> {
    /// The members' factors one after the other (zeros, `len` of them, for an absent expert).
    fn gather(
        &self,
        factor: impl Fn(&Member<'_>) -> Result<Vec<f32>>,
        len: usize,
    ) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(len * self.members.len());
        for member in &self.members {
            match member {
                Some(member) => out.extend(factor(member)?),
                None => out.resize(out.len() + len, 0.0),
            }
        }
        Ok(out)
    }
}

/// B `[out, r]` widened to `[out, to]` with zero columns.
fn pad_columns(b: Vec<f32>, r: usize, to: usize) -> Vec<f32> {
    if r == to {
        return b;
    }
    let mut out = vec![0f32; b.len() / r * to];
    for (row, values) in b.chunks(r).enumerate() {
        out[row * to..row * to + r].copy_from_slice(values);
    }
    out
}

/// B as the GGUF holds it: its scale (`fold`) folded in, its rows in the base's stored order.
fn stored_b(p: &Placed<'_>, fold: f64, mut b: Vec<f32>) -> Vec<f32> {
    let r = p.r;
    if fold != 1.0 {
        b.iter_mut().for_each(|v| *v = (*v as f64 * fold) as f32);
    }
    if let Some(picked) = &p.picked {
        b = picked
            .iter()
            .flat_map(|&row| &b[row * r..(row + 1) * r])
            .copied()
            .collect();
    }
    if let Some(order) = p.rows {
        let rows = p.out_features;
        let mut stored = vec![0f32; b.len()];
        for row in 0..rows {
            let at = order.stored(row, rows);
            stored[at * r..(at + 1) * r].copy_from_slice(&b[row * r..(row + 1) * r]);
        }
        b = stored;
    }
    b
}

/// A `[r, in]` as the GGUF holds it: its columns in the base's stored order.
fn stored_a(p: &Placed<'_>, a: Vec<f32>) -> Vec<f32> {
    let Some(order) = p.columns else {
        return a;
    };
    let cols = p.in_features;
    let mut stored = vec![0f32; a.len()];
    for (row, out) in a.chunks(cols).zip(stored.chunks_mut(cols)) {
        for (c, &v) in row.iter().enumerate() {
            out[order.stored(c, cols)] = v;
        }
    }
    stored
}

/// Whether `path` is a llama.cpp LoRA GGUF (`general.type = adapter`, `adapter.type = lora`):
/// what `--force` may replace.
pub fn is_lora_gguf(path: &Path) -> bool {
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    // SAFETY: read-only map of a file read once, as every reader here maps files.
    let Ok(map) = (unsafe { memmap2::Mmap::map(&file) }) else {
        return false;
    };
    let Ok(header) = super::header::parse(&map) else {
        return false;
    };
    let is =
        |key: &str, want: &str| header.metadata.get(key).and_then(|v| v.as_str()) == Some(want);
    is("general.type", "adapter") && is("adapter.type", "lora")
}
