//! The transfer pipeline: plan → execute (parallel over units) → assemble → write atomically.

pub mod assemble;
pub mod auto;
pub mod basis;
pub mod cache;
mod collect;
pub mod execute;
pub mod fused_out;
pub mod inspect;
mod layered;
pub mod report;
pub mod schedule;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;

use crate::backend::{self, Device};
use crate::error::Result;
use crate::io::adapter::{self, Adapter};
use crate::io::checkpoint::Checkpoint;
use crate::io::output::{check_target, StagedDir};
use crate::modes::Mode;
use crate::plan::{self, ModelSide, Options, SourceModule};
use crate::timing::{Phase, Timings};
use report::{Report, Summary};

/// One transfer, as the command line describes it.
#[derive(Debug, Clone)]
pub struct Job {
    pub source_base: PathBuf,
    pub target_base: PathBuf,
    pub adapter: PathBuf,
    pub out: PathBuf,
    pub options: Options,
    /// A layer-map file (`{"<target layer>": <source layer>}`), read once the depths are known.
    pub layer_map_file: Option<PathBuf>,
    pub device: Device,
    /// Basis cache directory (docs/METHOD.md, "Basis cache"), if any.
    pub cache_dir: Option<PathBuf>,
    pub force: bool,
    /// Also write the adapter as a llama.cpp LoRA GGUF for the target base.
    pub gguf_adapter: bool,
    /// Write the experts in PEFT's fused form (`fused_out`) instead of one module per expert.
    pub fused_experts: bool,
    /// How progress is shown and the job cancelled.
    pub progress: crate::progress::Progress,
    /// The directory arguments that were hub names, by argument (`source_base`, …).
    pub hub: BTreeMap<String, crate::io::hub::HubModel>,
}

impl Job {
    /// The paths the job reads, which `--out` must never replace.
    fn inputs(&self) -> Vec<&Path> {
        let mut paths = vec![
            self.source_base.as_path(),
            self.target_base.as_path(),
            self.adapter.as_path(),
        ];
        paths.extend(self.layer_map_file.as_deref());
        paths.extend(self.cache_dir.as_deref());
        paths
    }
}

/// The file name of the report inside the output directory.
pub const REPORT_FILE: &str = "transfer_report.json";

/// The inputs of a transfer, opened, and its plan.
struct Opened {
    source: Checkpoint,
    target: Checkpoint,
    adapter: Adapter,
    plan: plan::Plan,
    /// The mode every unit was planned with (`auto` resolved).
    mode: Mode,
    /// What `auto` chose and why, when the mode was `auto`.
    auto: Option<auto::Choice>,
    /// map mode: the bottom residual map and the depth map by similarity, built before the
    /// plan (the depth map decides the plan's layers).
    map_start: Option<MapStart>,
    /// Where the output names the target's layers ([`output_names`]).
    target_names: String,
    /// The adapter's routing-gate modules left out under `--drop-router`.
    dropped_gates: Vec<String>,
}

impl Opened {
    /// Whether the adapter has `unit`'s source module.
    fn has_factors(&self, unit: &plan::Unit) -> bool {
        unit.source_module
            .as_ref()
            .is_some_and(|m| self.adapter.modules.contains_key(m))
    }

    /// Runs `unit` on its rows of the adapter's factors for its source module, read for it and
    /// dropped as soon as its rows are taken (None when the adapter has no such module, or the
    /// plan skips the unit).
    fn run_unit(&self, ctx: &execute::Context<'_>, unit: &plan::Unit) -> Result<execute::Outcome> {
        let factors = match &unit.source_module {
            Some(m) if unit.skip.is_none() && self.adapter.modules.contains_key(m) => {
                let stacked = self.adapter.modules[m].a.expert.is_some();
                Some(execute::source_factors(
                    unit,
                    &self.adapter.factors(m)?,
                    stacked,
                ))
            }
            _ => None,
        };
        execute::run_unit(ctx, unit, factors)
    }
}

/// The parts of the model map built before the plan, and their milliseconds.
struct MapStart {
    residual: std::sync::Arc<crate::map::ResidualMap>,
    depth: Option<crate::map::depth::DepthMap>,
    times: BTreeMap<String, f64>,
}

/// Runs a transfer and returns its report (also written next to the adapter).
pub fn run(job: &Job) -> Result<Report> {
    let wall = Instant::now();
    let timings = Timings::default();
    check_target(&job.out, job.force, &job.inputs())?;
    let (backend, device_note) = backend::select(job.device)?;
    let opened = open_and_plan(job, &timings, backend.as_ref())?;

    let cache = job
        .cache_dir
        .as_deref()
        .map(cache::BasisCache::open)
        .transpose()?;
    let prefetched = basis::Prefetched::default();
    let ctx = execute::Context {
        source: &opened.source,
        target: &opened.target,
        backend: backend.as_ref(),
        options: &job.options,
        timings: &timings,
        cache: cache.as_ref(),
        prefetched: Some(&prefetched),
        map: None,
    };
    let collector = collect::Collector::new(&opened);
    let map = match &opened.map_start {
        Some(start) if layered::has_mapped_units(&opened) => Some(layered::run_units_by_layer(
            &ctx, &opened, start, job, &collector,
        )?),
        _ => {
            run_units(&ctx, &opened, &job.progress, &collector)?;
            None
        }
    };
    let (rows, modules) = collector.finish();

    let target_name = job.target_base.to_string_lossy().into_owned();
    // A hub model is named as the hub names it, at the commit its snapshot holds (a branch
    // moves on; the commit is the base the adapter was made for), so that PEFT and AutoPeftModel
    // load the same base elsewhere; a directory by its absolute path, so that the adapter loads
    // from any working directory.
    let base = match job.hub.get("target_base") {
        Some(hub) => assemble::BaseName {
            name: hub.name.clone(),
            revision: Some(
                hub.snapshot
                    .file_name()
                    .map(|c| c.to_string_lossy().into_owned())
                    .unwrap_or_else(|| hub.revision.clone()),
            ),
        },
        None => assemble::BaseName {
            name: std::path::absolute(&job.target_base)
                .unwrap_or_else(|_| job.target_base.clone())
                .to_string_lossy()
                .into_owned(),
            revision: None,
        },
    };
    let target_side = ModelSide::new(&opened.target)?.named(&opened.target_names);
    let config = assemble::output_config(&opened.adapter, &modules, &base, &target_side);
    let mut report = Report {
        source_base: job.source_base.to_string_lossy().into_owned(),
        target_base: target_name,
        adapter: job.adapter.to_string_lossy().into_owned(),
        mode: opened.mode.name().to_string(),
        auto_reason: opened.auto.as_ref().map(|c| c.reason.clone()),
        rank: job.options.rank,
        oversample: job.options.oversample,
        power_iters: job.options.power_iters,
        seed: job.options.seed,
        threshold: job.options.threshold,
        selected_modules: job.options.modules.clone(),
        dropped_router_modules: opened.dropped_gates.clone(),
        device: device_note,
        layer_map: report::layer_map_json(&opened.plan),
        expert_map: opened
            .plan
            .experts
            .iter()
            .map(|(j, m)| (j.to_string(), m.clone()))
            .collect(),
        hub: job.hub.clone(),
        basis_cache: cache.as_ref().map(|c| report::CacheUse {
            dir: job
                .cache_dir
                .as_ref()
                .expect("cache implies dir")
                .to_string_lossy()
                .into_owned(),
            hits: c.hits.load(std::sync::atomic::Ordering::Relaxed),
            misses: c.misses.load(std::sync::atomic::Ordering::Relaxed),
        }),
        map,
        timings_ms: BTreeMap::new(),
        summary: Summary::of(&rows),
        modules: rows,
    };
    let write_start = Instant::now();
    let staged = StagedDir::create(&job.out, job.force, &job.inputs())?;
    // The per-expert form goes to the file unless fused; with --gguf-adapter it is written
    // first even then, for the GGUF (read back from it: it holds what PEFT loads, value for
    // value, each expert at its own rank), and the fused form replaces it. A target that stores
    // its experts fused (GPT-OSS) has no per-expert modules to load an adapter onto: its output
    // is always fused.
    let fused_experts = job.fused_experts || target_side.arch.stored_experts.is_some();
    if !fused_experts || job.gguf_adapter {
        adapter::write_adapter(staged.path(), &config, &modules)?;
    }
    if job.gguf_adapter {
        let written = Adapter::open(staged.path())?;
        let path = staged.path().join(crate::io::gguf::lora::LORA_GGUF_FILE);
        let name = crate::io::output::name_of(&job.out);
        let check = || job.progress.check();
        // Modules written with no update (not selected, or nothing in the adapter) are left
        // out: they add nothing, and llama.cpp may have no tensor for them.
        let carried: std::collections::BTreeSet<&str> = (opened.plan.modules.iter())
            .filter(|m| carries_update(m))
            .map(|m| m.name.as_str())
            .collect();
        let keep = |m: &str| carried.contains(m);
        let base = (&opened.target, &keep as &dyn Fn(&str) -> bool);
        crate::io::gguf::lora::write_lora_gguf(&written, base, &name, &path, &check)?;
    }
    if fused_experts {
        let mut config = config;
        let adapter_config = &opened.adapter.config;
        let fused = fused_out::fuse_experts(&mut config, modules, adapter_config, &target_side)?;
        adapter::write_adapter(staged.path(), &config, &fused)?;
    } else {
        drop(modules);
    }
    timings.add(Phase::Write, write_start.elapsed().as_nanos() as u64);
    report.timings_ms = timings_map(&timings, wall.elapsed().as_secs_f64() * 1e3);
    write_json(&staged.path().join(REPORT_FILE), &report)?;
    // Cancelled (by a progress callback that raised, say) after the last unit: the staged
    // directory is dropped, and with it everything written.
    job.progress.confirm()?;
    staged.commit()?;
    Ok(report)
}

/// Whether a planned module can carry an update: some unit of it is not skipped by the plan.
fn carries_update(module: &plan::TargetModule) -> bool {
    module.units.iter().any(|u| u.skip.is_none())
}

/// The map options with the transfer's seed.
fn map_options(options: &Options) -> crate::map::MapOptions {
    crate::map::MapOptions {
        seed: options.seed,
        ..options.map
    }
}

/// Opens the two checkpoints and the adapter, resolves `auto` (see [`auto`]) and builds the plan
/// (in map mode, after the bottom residual map and, when the depths differ, the depth map by
/// similarity).
fn open_and_plan(job: &Job, timings: &Timings, backend: &dyn backend::Backend) -> Result<Opened> {
    let plan_start = Instant::now();
    let source = Checkpoint::open(&job.source_base)?;
    let target = Checkpoint::open(&job.target_base)?;
    if job.gguf_adapter {
        // Before any work: a target llama.cpp has no architecture for is refused now.
        crate::io::gguf::lora::family_of_base(&target)?;
    }
    let s = ModelSide::new(&source)?;
    let t = ModelSide::new(&target)?;
    let mut adapter = Adapter::open_with(&job.adapter, s.experts_layout())?;
    let t = match output_names(&s, &t, &adapter) {
        Some(names) => {
            job.progress.note(&format!(
                "output modules named under `{names}`, as the adapter names them (the target \
                 checkpoint stores its layers under `{}`)",
                t.prefix
            ));
            let names = names.to_string();
            t.named(&names)
        }
        None => t,
    };
    if job.fused_experts {
        // Before any work: a target without experts has nothing to fuse.
        fused_out::check_target(&t)?;
    }
    plan::experts::name_fused_experts(&mut adapter, &s)?;
    let dropped_gates = plan::experts::routing_gates(&mut adapter, &s, job.options.drop_router)?;
    if !dropped_gates.is_empty() {
        job.progress.note(&format!(
            "--drop-router: {} routing-gate module(s) left out (`{}`{})",
            dropped_gates.len(),
            dropped_gates[0],
            if dropped_gates.len() > 1 { ", …" } else { "" }
        ));
    }
    let mut options = job.options.clone();
    if let Some(path) = &job.layer_map_file {
        options.layer_map = Some(plan::layers::read_layer_map(path, s.layers(), t.layers())?);
    }
    let adapter_modules = source_modules(&adapter);
    let auto = if options.mode == Mode::Auto {
        let choice = auto::choose(&s, &t, &adapter_modules, &job.adapter, &options)?;
        options.mode = choice.mode;
        let mode = choice.mode.name();
        job.progress
            .note(&format!("auto chose {mode}: {}", choice.reason));
        Some(choice)
    } else {
        None
    };
    plan::experts::refuse_map(options.mode, (&s, &t), &adapter_modules, &options)?;
    timings.add(Phase::Plan, plan_start.elapsed().as_nanos() as u64);
    let mut map_start = None;
    if options.mode == Mode::Map {
        let map_options = map_options(&options);
        let start = timings.time(Phase::Map, || -> Result<_> {
            let clock = Instant::now();
            let residual = crate::map::bottom_residual(&s, &t, &map_options, &job.progress)?;
            job.progress.check()?;
            let mut times = BTreeMap::new();
            times.insert("residual".to_string(), clock.elapsed().as_secs_f64() * 1e3);
            let clock = Instant::now();
            let by_similarity = s.layers() != t.layers()
                && options.layer_map.is_none()
                && map_options.depth == crate::map::DepthFit::Similarity;
            let depth = if by_similarity {
                Some(crate::map::depth::by_similarity(
                    &s,
                    &t,
                    &residual,
                    map_options.seed,
                    map_options.fold_norms,
                    backend,
                    &job.progress,
                )?)
            } else {
                None
            };
            if depth.is_some() {
                times.insert("depth".to_string(), clock.elapsed().as_secs_f64() * 1e3);
            }
            Ok(MapStart {
                residual: std::sync::Arc::new(residual),
                depth,
                times,
            })
        })?;
        if let Some(depth) = &start.depth {
            options.layer_map = Some(depth.map.clone());
        }
        map_start = Some(start);
    }
    let plan_start = Instant::now();
    let plan = plan::build(&s, &t, &adapter_modules, &job.adapter, &options)?;
    if job.gguf_adapter {
        let modules = plan.modules.iter().filter(|m| carries_update(m));
        let names = modules.map(|m| (m.name.as_str(), m.module_type.as_str()));
        crate::io::gguf::lora::check_modules(&target, names)?;
    }
    timings.add(Phase::Plan, plan_start.elapsed().as_nanos() as u64);
    if let Some(note) = plan::experts::summary(&plan.experts, s.experts(), t.experts()) {
        job.progress.note(&note);
    }
    let target_names = t.names.clone();
    drop((s, t));
    Ok(Opened {
        source,
        target,
        adapter,
        plan,
        mode: options.mode,
        auto,
        map_start,
        target_names,
        dropped_gates,
    })
}

/// Where the output names the target's layers, where that is not the target's default (its
/// table's `module_prefix`, the causal-LM class's name for the layers, else the layout its
/// checkpoint stores): between models of one family, the prefix the adapter names its modules
/// under, when the target checkpoint stores its layers there. A family's multimodal releases
/// name the layers otherwise than its causal-LM class (Qwen3.5's `model.language_model.layers`,
/// Llama 4's `language_model.model.layers`; `model.layers`), and an adapter made on the release's
/// own class says so by its names: its output then loads on that class too. A text-only target
/// (stored under `model.layers`) keeps its own names, which are the only ones it loads under.
fn output_names<'s>(s: &'s ModelSide<'_>, t: &ModelSide<'_>, adapter: &Adapter) -> Option<&'s str> {
    if s.arch.name != t.arch.name {
        return None;
    }
    let names = s.prefix_of(adapter.modules.keys().map(String::as_str))?;
    (names != t.names && names == t.prefix).then_some(names)
}

/// Runs every unit of the plan, handing each outcome to `collector`. A batching backend
/// takes the units a chunk at a time, its decompositions computed in batches of one shape
/// before the chunk's units run; otherwise the units run largest first, so that the threads
/// finish together.
fn run_units(
    ctx: &execute::Context<'_>,
    opened: &Opened,
    progress: &crate::progress::Progress,
    collector: &collect::Collector<'_>,
) -> Result<()> {
    let units: Vec<&plan::Unit> = opened.plan.units().collect();
    let bar = progress.start("transfer", "modules", units.len() as u64);
    let needs: Vec<bool> = units
        .iter()
        .map(|u| execute::needs_bases(ctx, u, opened.has_factors(u)))
        .collect();
    // How many units will ask for each basis, so that one asked for by several (a source layer
    // paired with several target layers) is computed once and held until its last unit.
    if let Some(pre) = ctx.prefetched {
        for (unit, _) in units.iter().zip(&needs).filter(|(_, &n)| n) {
            for role in [basis::Role::Source, basis::Role::Target] {
                pre.expect(basis::BasisKey::of_unit(unit, role));
            }
        }
    }
    let one = |i: usize| -> Result<()> {
        bar.check()?;
        let outcome = opened.run_unit(ctx, units[i])?;
        bar.step();
        collector.add(i, outcome)
    };
    let run_in_turn = |idx: &Vec<usize>| -> Result<()> { idx.iter().try_for_each(|&i| one(i)) };
    if ctx.backend.batches() {
        let prefetched = ctx.prefetched.expect("the pipeline prefetches");
        let all: Vec<usize> = (0..units.len()).collect();
        for chunk in all.chunks(schedule::UNITS_PER_CHUNK) {
            let wanted: Vec<(&plan::Unit, bool)> =
                chunk.iter().map(|&i| (units[i], needs[i])).collect();
            bar.check()?;
            schedule::prefetch(ctx, &wanted, prefetched)?;
            chunk.par_iter().try_for_each(|&i| one(i))?;
        }
    } else {
        // Units that share a basis form one task, run in turn (the first computes it, the others
        // take it held); the tasks run in parallel, largest first.
        let size = |u: &plan::Unit| {
            u.source_shape.0 * u.source_shape.1 + u.target_shape.0 * u.target_shape.1
        };
        let mut tasks = tasks_sharing_bases(&units, ctx.prefetched);
        tasks.sort_by_key(|t| std::cmp::Reverse(t.iter().map(|&i| size(units[i])).max()));
        tasks.par_iter().try_for_each(run_in_turn)?;
    }
    bar.finish();
    Ok(())
}

/// The units in tasks: those that share a basis (held in `prefetched` for more than one unit)
/// together, in plan order; the others alone.
fn tasks_sharing_bases(
    units: &[&plan::Unit],
    prefetched: Option<&basis::Prefetched>,
) -> Vec<Vec<usize>> {
    let mut task_of_key: HashMap<basis::BasisKey, usize> = HashMap::new();
    let mut tasks: Vec<Vec<usize>> = Vec::new();
    for (i, unit) in units.iter().enumerate() {
        let shared: Vec<basis::BasisKey> = [basis::Role::Source, basis::Role::Target]
            .into_iter()
            .map(|role| basis::BasisKey::of_unit(unit, role))
            .filter(|k| prefetched.is_some_and(|p| p.expected(k) > 1))
            .collect();
        let task = shared.iter().find_map(|k| task_of_key.get(k).copied());
        let task = task.unwrap_or_else(|| {
            tasks.push(Vec::new());
            tasks.len() - 1
        });
        tasks[task].push(i);
        for k in shared {
            task_of_key.entry(k).or_insert(task);
        }
    }
    tasks
}

/// The names and shapes of the adapter's modules, as the plan wants them.
pub fn source_modules(adapter: &Adapter) -> BTreeMap<String, SourceModule> {
    adapter
        .modules
        .iter()
        .map(|(name, f)| {
            let m = SourceModule {
                r: f.r,
                in_features: f.in_features,
                out_features: f.out_features,
                scale: adapter.config.scale(f.r, f.alpha),
            };
            (name.clone(), m)
        })
        .collect()
}

/// Per-phase milliseconds plus the wall-clock total.
pub fn timings_map(t: &Timings, total_ms: f64) -> BTreeMap<String, f64> {
    let mut map: BTreeMap<String, f64> = Phase::ALL
        .iter()
        .map(|p| (p.name().to_string(), round3(t.ms(*p))))
        .collect();
    map.insert("total".into(), round3(total_ms));
    map
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Writes pretty JSON.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("report values always serialize");
    std::fs::write(path, text + "\n").map_err(|e| crate::error::Error::io(path, "cannot write", e))
}
