//! The plan: pure bookkeeping, no weight data. Pairs every module of the target adapter with the
//! source-adapter module (and rows of it) it comes from, maps layers, resolves the mode and the
//! rank per pair, and checks every shape against the configs and tensor headers.

pub mod experts;
pub mod layers;
mod pairing;
mod side;

pub use pairing::{attention_modules, mlps_pair};
pub use side::ModelSide;

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::Path;

use crate::arch::{Arch, Block, ModuleSpec, Part};
use crate::error::{Error, Result};
use crate::modes::Mode;

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
    /// The map mode's switches (its ablations).
    pub map: crate::map::MapOptions,
    /// Leave out, rather than refuse, source modules no target module takes (`inspect`, whose
    /// adapter is every module of the source, compares what pairs).
    pub leave_unpaired: bool,
    /// Leave out, rather than refuse, the adapter's updates to routing gates of a mixture of
    /// experts (`--drop-router`: [`experts::routing_gates`]).
    pub drop_router: bool,
}

/// The default SVD rank k, oversampling p and power iterations q (the command line's too).
pub const DEFAULT_RANK: usize = 256;
pub const DEFAULT_OVERSAMPLE: usize = 16;
pub const DEFAULT_POWER_ITERS: usize = 2;

impl Default for Options {
    fn default() -> Self {
        Options {
            mode: Mode::Auto,
            rank: DEFAULT_RANK,
            oversample: DEFAULT_OVERSAMPLE,
            power_iters: DEFAULT_POWER_ITERS,
            seed: 0,
            threshold: 0.0,
            modules: None,
            layer_map: None,
            map: crate::map::MapOptions::default(),
            leave_unpaired: false,
            drop_router: false,
        }
    }
}

impl Options {
    /// Refuses values no transfer can use (checked once, here, for every caller).
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::arg("--rank", "must be at least 1"));
        }
        // Far above any useful value (a sketch is k + p wide, each power iteration two passes
        // over the weight); they keep k + p from overflowing and a typo from running for days.
        for (flag, value, max) in [
            ("--rank", self.rank, 1 << 20),
            ("--oversample", self.oversample, 1 << 20),
            ("--power-iters", self.power_iters, 100),
        ] {
            if value > max {
                return Err(Error::arg(
                    flag,
                    format!("{value} is above the limit of {max}"),
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(Error::arg(
                "--threshold",
                format!("{} is outside [0, 1]", self.threshold),
            ));
        }
        let floor = self.map.gain_floor;
        if !(0.0..1.0).contains(&floor) {
            return Err(Error::arg(
                "--map-gain-floor",
                format!("{floor} is outside [0, 1)"),
            ));
        }
        Ok(())
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
    /// Target layer → the source expert of each of its experts, matched by their routers (empty
    /// unless both models have experts).
    pub experts: BTreeMap<usize, experts::ExpertMatch>,
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
    options.validate()?;
    let filter = module_filter(options, source.arch, target.arch)?;
    let present = adapter_modules(source, adapter, adapter_path)?;
    let same = same_layout(source.arch, target.arch);
    let target_specs = target_specs(source, target, &present);
    let layer_map = layer_map(source, target, options);
    let experts = match target_specs.iter().any(|s| s.expert) {
        true => experts::match_by_router(source, target, &layer_map)?,
        false => BTreeMap::new(),
    };
    let mut modules = Vec::new();
    for (&j, &i) in &layer_map {
        let pair = LayerPair {
            source,
            target,
            source_layer: i,
            target_layer: j,
            experts: experts.get(&j),
        };
        // The source modules (and parts) this layer pair draws on: an update of any other is
        // left over.
        let mut taken = BTreeSet::new();
        for spec in target_specs.iter().filter(|s| target.holds(j, s)) {
            let from = match pairing::source_block(source, target, (i, j), spec) {
                Ok(Some(from)) => from,
                Ok(None) => continue,
                Err(why) => {
                    // Refused where it would lose an update the user selected.
                    let selected = spec
                        .parts
                        .iter()
                        .any(|p| filter(p.module_name(), &spec.name, &spec.name));
                    if selected && pairing::adapts_mlp(source, i, &present, &filter) {
                        return Err(pairing::refusal(source, target, spec, &why));
                    }
                    continue;
                }
            };
            let pieces = pairing::pieces(source, i, spec, from, same);
            if pieces.is_empty() {
                continue;
            }
            for &(part, s) in &pieces {
                let parts = part.map_or(s.parts.clone(), |p| vec![p]);
                taken.extend(parts.into_iter().map(|p| (s.name.as_str(), p)));
            }
            // An expert's module once per expert, each from the source expert its router matches.
            for expert in spec.instances(&target.ckpt.config) {
                modules.push(pair.module(spec, &pieces, expert, &present, options, &filter)?);
            }
        }
        if !options.leave_unpaired {
            pairing::check_taken(source, target, (i, j), &taken, &present, &filter)?;
        }
    }
    let plan = Plan {
        modules,
        layer_map,
        experts,
    };
    if let Some(list) = &options.modules {
        // A list that selects nothing the adapter adapts would write an all-zero adapter.
        if !plan
            .units()
            .any(|u| u.source_module.is_some() && u.skip.is_none())
        {
            let adapted: BTreeSet<&str> = present.keys().map(|(_, _, t)| *t).collect();
            return Err(Error::arg(
                "--modules",
                format!(
                    "{} selects no module the adapter adapts (it adapts {})",
                    list.join(","),
                    adapted.into_iter().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    }
    Ok(plan)
}

/// (source layer, expert, module type) → adapter module name, for every module of the adapter.
pub(super) type Present<'a> = BTreeMap<(usize, Option<usize>, &'a str), &'a str>;

/// Checks that every adapter module is an adaptable module of the source, in a layer it has, with
/// the shape of the source's weight; returns where each one sits.
fn adapter_modules<'a>(
    source: &ModelSide<'_>,
    adapter: &'a BTreeMap<String, SourceModule>,
    adapter_path: &Path,
) -> Result<Present<'a>> {
    let mut present = Present::new();
    for (name, m) in adapter {
        let (layer, expert, spec) =
            source
                .parse_module_name(name)
                .ok_or_else(|| Error::UnsupportedAdapter {
                    path: adapter_path.to_path_buf(),
                    reason: format!(
                        "module `{name}` is not an adaptable {} module under `{}` (known: {})",
                        source.arch.name,
                        source.arch.layer_prefixes.join("` or `"),
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
        if let Some(e) = expert.filter(|&e| e >= source.experts()) {
            return Err(Error::UnsupportedAdapter {
                path: adapter_path.to_path_buf(),
                reason: format!(
                    "module `{name}` is expert {e}, but the source base {} has {} experts per layer",
                    source.ckpt.dir.display(),
                    source.experts()
                ),
            });
        }
        let (tensor, (out, inp)) = source.weight(layer, expert, spec)?;
        if (m.out_features, m.in_features) != (out, inp) {
            // lora_B carries the output width, lora_A the input width: name the one that is off.
            use crate::io::adapter::{factor_location, Factor};
            let factor = if m.out_features != out {
                Factor::B
            } else {
                Factor::A
            };
            let (file, key) = factor_location(adapter_path, name, factor);
            return Err(Error::bad_tensor(
                file,
                key,
                format!(
                    "adapter update is {}x{} but the source base's `{tensor}` is {out}x{inp}: was the adapter trained on another model?",
                    m.out_features, m.in_features
                ),
            ));
        }
        // The spec's name lives in the static table, so the key outlives the adapter map.
        let spec_name: &'static str = spec.name.as_str();
        present.insert((layer, expert, spec_name), name.as_str());
    }
    Ok(present)
}

/// The target module types the output adapter has: those some module type of the adapter can
/// fill (a module of a block that meets the target's, holding one of its canonical parts), in the
/// target table's order.
fn target_specs(
    source: &ModelSide<'_>,
    target: &ModelSide<'_>,
    present: &Present<'_>,
) -> Vec<&'static ModuleSpec> {
    let source_types: BTreeSet<&str> = present.keys().map(|(_, _, t)| *t).collect();
    let covered: BTreeSet<(Block, Part)> = source_types
        .iter()
        .flat_map(|t| {
            let spec = source.arch.module(t).expect("parsed from the table");
            spec.parts.iter().map(|&p| (spec.block(), p))
        })
        .collect();
    target
        .arch
        .modules
        .iter()
        .filter(|m| {
            covered
                .iter()
                .any(|&(b, p)| pairing::blocks_meet(b, m.block()) && m.parts.contains(&p))
        })
        .collect()
}

/// Target layer → source layer: the depth map (each layer paired with one of its own attention
/// kind, in hybrid models), with the user's overrides.
fn layer_map(
    source: &ModelSide<'_>,
    target: &ModelSide<'_>,
    options: &Options,
) -> BTreeMap<usize, usize> {
    let mut map = layers::default_pairs(source, target);
    if let Some(overrides) = &options.layer_map {
        for (&j, &i) in overrides {
            map.insert(j, i);
        }
    }
    map
}

/// One target layer and the source layer it takes its adapter from.
struct LayerPair<'p, 'a> {
    source: &'p ModelSide<'a>,
    target: &'p ModelSide<'a>,
    source_layer: usize,
    target_layer: usize,
    /// The source expert of each target expert in this layer (models with experts).
    experts: Option<&'p experts::ExpertMatch>,
}

impl LayerPair<'_, '_> {
    /// The output module of target type `spec` in this layer (and expert), with the units that
    /// fill its rows: the whole module when the layouts agree, else one unit per canonical part.
    fn module(
        &self,
        spec: &ModuleSpec,
        pieces: &[(Option<Part>, &'static ModuleSpec)],
        expert: Option<usize>,
        present: &Present<'_>,
        options: &Options,
        filter: &ModuleFilter,
    ) -> Result<TargetModule> {
        let target = self.target;
        let (target_tensor, shape) = target.weight(self.target_layer, expert, spec)?;
        let mut units = Vec::new();
        for &(part, src_spec) in pieces {
            // Pairing checked expert modules against expert modules only, and matched every
            // target expert of the layer.
            let src_expert = expert
                .filter(|_| src_spec.expert)
                .map(|e| self.experts.expect("matched").source_experts[e]);
            units.push(self.unit(
                spec,
                (&target_tensor, shape),
                (part, src_spec, src_expert),
                present,
                options,
                filter,
            )?);
        }
        Ok(TargetModule {
            name: target
                .arch
                .module_path(&target.names, self.target_layer, expert, spec),
            module_type: spec.name.clone(),
            shape,
            units,
        })
    }

    /// The unit of `part` (None: the whole module) of target module `spec`, from source module
    /// `src_spec` (of expert `src_expert`, for an expert's module).
    fn unit(
        &self,
        spec: &ModuleSpec,
        (target_tensor, shape): (&str, (usize, usize)),
        (part, src_spec, src_expert): (Option<Part>, &ModuleSpec, Option<usize>),
        present: &Present<'_>,
        options: &Options,
        filter: &ModuleFilter,
    ) -> Result<Unit> {
        let (source, target) = (self.source, self.target);
        let (i, j) = (self.source_layer, self.target_layer);
        let (source_tensor, src_full) = source.weight(i, src_expert, src_spec)?;
        let rows_in = |s: &ModuleSpec, side: &ModelSide<'_>, full: usize| match part {
            Some(p) => s.rows_of(p, &side.ckpt.config).expect("module holds part"),
            None => 0..full,
        };
        let src_rows = rows_in(src_spec, source, src_full.0);
        let tgt_rows = rows_in(spec, target, shape.0);
        let source_shape = (src_rows.len(), src_full.1);
        let target_shape = (tgt_rows.len(), shape.1);
        let label = match part {
            Some(p) if spec.parts.len() > 1 || src_spec.parts.len() > 1 => {
                p.module_name().to_string()
            }
            _ => spec.name.clone(),
        };
        let source_module = present
            .get(&(i, src_expert, src_spec.name.as_str()))
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
        // Capping is only news where bases are computed.
        let decomposes = decomposes(mode, source_shape, target_shape, options.threshold);
        let skip = if source_module.is_none() {
            let of_expert = src_expert.map_or(String::new(), |e| format!(" of expert {e}"));
            Some(format!(
                "the adapter has no {}{of_expert} in source layer {i}",
                src_spec.name
            ))
        } else if !filter(&label, &spec.name, &src_spec.name) {
            Some("not selected by --modules".to_string())
        } else {
            None
        };
        Ok(Unit {
            label,
            target_layer: j,
            source_layer: i,
            source_module,
            source_tensor,
            source_rows: src_rows,
            source_shape,
            target_tensor: target_tensor.to_string(),
            target_rows: tgt_rows,
            target_shape,
            mode,
            rank: cap,
            rank_capped: decomposes && cap < options.rank,
            skip,
        })
    }
}

/// Whether a unit of this mode and these shapes decomposes its two weights: always for the
/// subspace modes, for copy and resample only to filter on similarity (which needs a side of
/// equal size), never for map (its units gate on their matched similarity).
pub fn decomposes(
    mode: Mode,
    source_shape: (usize, usize),
    target_shape: (usize, usize),
    threshold: f32,
) -> bool {
    let comparable = source_shape.0 == target_shape.0 || source_shape.1 == target_shape.1;
    mode != Mode::Map && (mode.needs_bases() != (false, false) || (threshold > 0.0 && comparable))
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

/// Whether a unit (label, target module type, source module type) is selected by `--modules`.
pub(super) type ModuleFilter = Box<dyn Fn(&str, &str, &str) -> bool>;

/// The `--modules` test: a unit is selected when its label, its target module type or its source
/// module type is listed, or the last segment of either type's key (as PEFT's `target_modules`
/// name modules: `gate_proj` selects `experts.gate_proj` and `shared_expert.gate_proj` too).
/// Unknown names are refused so a typo does not silently skip everything.
fn module_filter(options: &Options, source: &Arch, target: &Arch) -> Result<ModuleFilter> {
    let Some(list) = options.modules.clone() else {
        return Ok(Box::new(|_: &str, _: &str, _: &str| true));
    };
    let tails: BTreeMap<String, String> = source
        .modules
        .iter()
        .chain(&target.modules)
        .map(|m| (m.name.clone(), m.key_tail().to_string()))
        .collect();
    let mut known: BTreeSet<String> = tails.keys().chain(tails.values()).cloned().collect();
    known.extend(Part::ALL.map(|p| p.module_name().to_string()));
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
            let named = |n: &String, t: &str| n == t || tails.get(t) == Some(n);
            list.iter()
                .any(|n| n == label || named(n, target_type) || named(n, source_type))
        },
    ))
}
