//! The plan: pure bookkeeping, no weight data. Pairs every module of the target adapter with the
//! source-adapter module (and rows of it) it comes from, maps layers, resolves the mode and the
//! rank per pair, and checks every shape against the configs and tensor headers.

pub mod layers;

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::Path;

use crate::arch::{Arch, ModuleSpec, Part};
use crate::backend::Mode;
use crate::error::{Error, Result};
use crate::io::checkpoint::Checkpoint;

/// The user's choices for a transfer.
#[derive(Debug, Clone)]
pub struct Options {
    pub mode: Mode,
    /// Requested SVD rank k (capped per matrix at min(k, m, n, m', n')).
    pub rank: usize,
    pub oversample: usize,
    pub power_iters: usize,
    pub seed: u64,
    /// Modules whose similarity is below this get B = 0.
    pub threshold: f32,
    /// Module types to transfer (`q_proj`, `qkv_proj`, ...); None = all.
    pub modules: Option<Vec<String>>,
    /// Explicit target-layer → source-layer overrides.
    pub layer_map: Option<BTreeMap<usize, usize>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mode: Mode::Auto,
            rank: 256,
            oversample: 16,
            power_iters: 2,
            seed: 0,
            threshold: 0.0,
            modules: None,
            layer_map: None,
        }
    }
}

/// A model as the plan sees it: its table, layer prefix and checkpoint.
pub struct ModelSide<'a> {
    pub arch: &'static Arch,
    pub prefix: String,
    pub ckpt: &'a Checkpoint,
}

impl<'a> ModelSide<'a> {
    pub fn new(ckpt: &'a Checkpoint) -> Result<Self> {
        let arch = crate::arch::for_config(&ckpt.config, &ckpt.dir.join("config.json"))?;
        let prefix = arch.detect_prefix(ckpt)?.to_string();
        Ok(ModelSide { arch, prefix, ckpt })
    }

    pub fn layers(&self) -> usize {
        self.ckpt.config.num_hidden_layers
    }

    /// The weight tensor of a module, checked against the shape the config implies.
    fn weight(&self, layer: usize, spec: &ModuleSpec) -> Result<(String, (usize, usize))> {
        let name = format!(
            "{}.weight",
            self.arch.module_path(&self.prefix, layer, spec)
        );
        let shape = self.ckpt.shape(&name)?;
        let expected = spec.shape(&self.ckpt.config);
        if shape != [expected.0, expected.1] {
            return Err(Error::bad_tensor(
                &self.ckpt.dir,
                &name,
                format!(
                    "shape {shape:?}, but config.json implies [{}, {}]",
                    expected.0, expected.1
                ),
            ));
        }
        Ok((name, expected))
    }
}

/// What the plan needs to know of one source-adapter module.
#[derive(Debug, Clone, Copy)]
pub struct SourceModule {
    pub r: usize,
    pub in_features: usize,
    pub out_features: usize,
    /// The scale s of ΔW = s·B·A.
    pub scale: f64,
}

/// One matrix pair: rows of a source weight (and of its lora_B) against rows of a target weight.
#[derive(Debug, Clone)]
pub struct Unit {
    /// Module type label for reports and `--modules` (`q_proj`, or `qkv_proj` when whole).
    pub label: String,
    pub target_layer: usize,
    pub source_layer: usize,
    /// The source adapter module, or None when the adapter has nothing for this part.
    pub source_module: Option<String>,
    pub source_tensor: String,
    pub source_rows: Range<usize>,
    pub source_shape: (usize, usize),
    pub target_tensor: String,
    pub target_rows: Range<usize>,
    pub target_shape: (usize, usize),
    /// The resolved mode (never auto).
    pub mode: Mode,
    /// k_eff = min(k, m, n, m', n').
    pub rank: usize,
    pub rank_capped: bool,
    /// Why this unit will not be transferred, known before any weight is read.
    pub skip: Option<String>,
}

impl Unit {
    /// True when only some rows of the source or target tensor take part (fused projections).
    pub fn source_sliced(&self, full_rows: usize) -> bool {
        self.source_rows.len() != full_rows
    }
}

/// One module of the output adapter and the units that fill its rows.
#[derive(Debug, Clone)]
pub struct TargetModule {
    /// PEFT module name in the target, e.g. `model.layers.3.self_attn.q_proj`.
    pub name: String,
    pub module_type: String,
    /// (out, in) of the whole target module.
    pub shape: (usize, usize),
    /// Rows of the full source tensors (to tell slices from wholes in reports).
    pub units: Vec<Unit>,
}

/// The whole plan of a transfer.
#[derive(Debug, Clone)]
pub struct Plan {
    pub modules: Vec<TargetModule>,
    pub layer_map: BTreeMap<usize, usize>,
    /// The target's module types, in table order (for `target_modules`).
    pub target_types: Vec<String>,
    /// True when source and target tables name and fuse modules identically.
    pub same_layout: bool,
}

impl Plan {
    /// All units, in output order.
    pub fn units(&self) -> impl Iterator<Item = &Unit> {
        self.modules.iter().flat_map(|m| m.units.iter())
    }
}

fn same_layout(a: &Arch, b: &Arch) -> bool {
    a.modules.len() == b.modules.len()
        && a.modules
            .iter()
            .zip(&b.modules)
            .all(|(x, y)| x.name == y.name && x.parts == y.parts)
}

/// Builds the plan. `adapter` maps source module names to their factor shapes; `adapter_path`
/// names the adapter in messages.
pub fn build(
    source: &ModelSide<'_>,
    target: &ModelSide<'_>,
    adapter: &BTreeMap<String, SourceModule>,
    adapter_path: &Path,
    options: &Options,
) -> Result<Plan> {
    if options.rank == 0 {
        return Err(Error::arg("--rank", "must be at least 1"));
    }
    if !(0.0..=1.0).contains(&options.threshold) {
        return Err(Error::arg(
            "--threshold",
            format!("{} is outside [0, 1]", options.threshold),
        ));
    }
    let filter = module_filter(options, source.arch, target.arch)?;

    // 1. Every adapter module must be a known module of the source, with matching shapes.
    let mut present: BTreeMap<(usize, &str), &str> = BTreeMap::new();
    for (name, m) in adapter {
        let (layer, spec) = source
            .arch
            .parse_module(&source.prefix, name)
            .ok_or_else(|| Error::UnsupportedAdapter {
                path: adapter_path.to_path_buf(),
                reason: format!(
                    "module `{name}` is not an adaptable {} module under `{}` (known: {})",
                    source.arch.name,
                    source.prefix,
                    source
                        .arch
                        .modules
                        .iter()
                        .map(|m| m.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?;
        if layer >= source.layers() {
            return Err(Error::UnsupportedAdapter {
                path: adapter_path.to_path_buf(),
                reason: format!(
                    "module `{name}` is in layer {layer}, but the source base has {} layers",
                    source.layers()
                ),
            });
        }
        let (tensor, (out, inp)) = source.weight(layer, spec)?;
        if (m.out_features, m.in_features) != (out, inp) {
            return Err(Error::bad_tensor(
                adapter_path.join(crate::io::adapter::WEIGHTS_FILE),
                format!("{}{name}.lora_B.weight", crate::io::adapter::PEFT_PREFIX),
                format!(
                    "adapter update is {}x{} but the source base's `{tensor}` is {out}x{inp}: was the adapter trained on another model?",
                    m.out_features, m.in_features
                ),
            ));
        }
        present.insert((layer, spec.name.as_str()), name.as_str());
    }
    let source_types: BTreeSet<&str> = present.keys().map(|(_, t)| *t).collect();

    // 2. Which target module types the output adapter has.
    let same = same_layout(source.arch, target.arch);
    let covered: BTreeSet<Part> = source_types
        .iter()
        .flat_map(|t| {
            source
                .arch
                .module(t)
                .expect("parsed above")
                .parts
                .iter()
                .copied()
        })
        .collect();
    let target_specs: Vec<&ModuleSpec> = target
        .arch
        .modules
        .iter()
        .filter(|m| {
            if same {
                source_types.contains(m.name.as_str())
            } else {
                m.parts.iter().any(|p| covered.contains(p))
            }
        })
        .collect();

    // 3. Layers.
    let mut layer_map = layers::default_layer_map(source.layers(), target.layers());
    if let Some(overrides) = &options.layer_map {
        for (&j, &i) in overrides {
            layer_map.insert(j, i);
        }
    }

    // 4. Units.
    let mut modules = Vec::new();
    for (&j, &i) in &layer_map {
        for spec in &target_specs {
            let (target_tensor, shape) = target.weight(j, spec)?;
            let mut units = Vec::new();
            let pieces: Vec<(Option<Part>, &ModuleSpec)> = if same {
                vec![(None, source.arch.module(&spec.name).expect("same layout"))]
            } else {
                spec.parts
                    .iter()
                    .map(|&p| (Some(p), source.arch.module_with(p)))
                    .collect()
            };
            for (part, src_spec) in pieces {
                let (source_tensor, src_full) = source.weight(i, src_spec)?;
                let src_rows = match part {
                    Some(p) => src_spec
                        .rows_of(p, &source.ckpt.config)
                        .expect("module holds part"),
                    None => 0..src_full.0,
                };
                let tgt_rows = match part {
                    Some(p) => spec
                        .rows_of(p, &target.ckpt.config)
                        .expect("module holds part"),
                    None => 0..shape.0,
                };
                let source_shape = (src_rows.len(), src_full.1);
                let target_shape = (tgt_rows.len(), shape.1);
                let label = match part {
                    Some(p) if spec.parts.len() > 1 || src_spec.parts.len() > 1 => {
                        p.module_name().to_string()
                    }
                    _ => spec.name.clone(),
                };
                let source_module = present
                    .get(&(i, src_spec.name.as_str()))
                    .map(|s| s.to_string());
                let mode = resolve_mode(
                    options.mode,
                    source_shape,
                    target_shape,
                    &label,
                    source,
                    target,
                )?;
                let cap = options
                    .rank
                    .min(source_shape.0)
                    .min(source_shape.1)
                    .min(target_shape.0)
                    .min(target_shape.1);
                let skip = if source_module.is_none() {
                    Some(format!(
                        "the adapter has no {} in source layer {i}",
                        src_spec.name
                    ))
                } else if !filter(&label, &spec.name, &src_spec.name) {
                    Some("not selected by --modules".to_string())
                } else {
                    None
                };
                units.push(Unit {
                    label,
                    target_layer: j,
                    source_layer: i,
                    source_module,
                    source_tensor,
                    source_rows: src_rows,
                    source_shape,
                    target_tensor: target_tensor.clone(),
                    target_rows: tgt_rows,
                    target_shape,
                    mode,
                    rank: cap,
                    rank_capped: cap < options.rank,
                    skip,
                });
            }
            modules.push(TargetModule {
                name: target.arch.module_path(&target.prefix, j, spec),
                module_type: spec.name.clone(),
                shape,
                units,
            });
        }
    }
    Ok(Plan {
        modules,
        layer_map,
        target_types: target_specs.iter().map(|s| s.name.clone()).collect(),
        same_layout: same,
    })
}

/// Resolves `auto` and refuses same-shape modes on pairs of different shapes.
fn resolve_mode(
    mode: Mode,
    source_shape: (usize, usize),
    target_shape: (usize, usize),
    label: &str,
    source: &ModelSide<'_>,
    target: &ModelSide<'_>,
) -> Result<Mode> {
    let same = source_shape == target_shape;
    match mode {
        Mode::Auto => Ok(if same { Mode::Project } else { Mode::Align }),
        m if m.needs_same_shape() && !same => Err(Error::arg(
            "--mode",
            format!(
                "{} needs equal shapes, but {label} is {}x{} in {} and {}x{} in {}; use --mode align, resample or auto",
                m.name(),
                source_shape.0,
                source_shape.1,
                source.ckpt.dir.display(),
                target_shape.0,
                target_shape.1,
                target.ckpt.dir.display()
            ),
        )),
        m => Ok(m),
    }
}

/// The `--modules` test: a unit is selected when its label, its target module type or its source
/// module type is listed. Unknown names are refused so a typo does not silently skip everything.
#[allow(clippy::type_complexity)]
fn module_filter(
    options: &Options,
    source: &Arch,
    target: &Arch,
) -> Result<Box<dyn Fn(&str, &str, &str) -> bool>> {
    let Some(list) = options.modules.clone() else {
        return Ok(Box::new(|_: &str, _: &str, _: &str| true));
    };
    let mut known: BTreeSet<String> = source
        .modules
        .iter()
        .chain(&target.modules)
        .map(|m| m.name.clone())
        .collect();
    known.extend(
        [
            Part::Q,
            Part::K,
            Part::V,
            Part::O,
            Part::Gate,
            Part::Up,
            Part::Down,
        ]
        .map(|p| p.module_name().to_string()),
    );
    for name in &list {
        if !known.contains(name) {
            return Err(Error::arg(
                "--modules",
                format!(
                    "unknown module `{name}` (known: {})",
                    known.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    }
    Ok(Box::new(
        move |label: &str, target_type: &str, source_type: &str| {
            list.iter()
                .any(|n| n == label || n == target_type || n == source_type)
        },
    ))
}
