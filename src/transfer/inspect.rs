//! `loraxfer inspect`: the subspace similarity of every module pair of two base models and the
//! layer map a transfer would use, without any adapter.

use std::collections::BTreeMap;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::backend::Backend;
use crate::error::Result;
use crate::io::checkpoint::Checkpoint;
use crate::plan::{self, ModelSide, Options, SourceModule};
use crate::timing::Timings;
use crate::transfer::basis::{self, BasisKey, Role};
use crate::transfer::execute;

/// One module pair.
#[derive(Debug, Clone, Serialize)]
pub struct PairRow {
    pub module: String,
    pub source_key: String,
    pub target_key: String,
    pub source_layer: usize,
    pub target_layer: usize,
    pub source_shape: [usize; 2],
    pub target_shape: [usize; 2],
    pub rank: usize,
    pub similarity_u: Option<f64>,
    pub similarity_v: Option<f64>,
    pub similarity: Option<f64>,
}

/// The result of an inspection.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub source_base: String,
    pub target_base: String,
    pub source_arch: String,
    pub target_arch: String,
    pub rank: usize,
    pub layer_map: BTreeMap<String, usize>,
    pub pairs: Vec<PairRow>,
    pub total_ms: f64,
}

/// Measures every module pair. Pairs of different shapes get no similarity (null).
pub fn run(
    source: &Checkpoint,
    target: &Checkpoint,
    options: &Options,
    backend: &dyn Backend,
    cache: Option<&super::cache::BasisCache>,
    progress: &crate::progress::Progress,
) -> Result<Inspection> {
    let wall = Instant::now();
    let s = ModelSide::new(source)?;
    let t = ModelSide::new(target)?;
    // Pretend the adapter covers every module the source has, so the plan pairs them all (experts
    // only where the target's can take them: the same hidden size, layers of the same kinds).
    let mut all = BTreeMap::new();
    let experts_pair = plan::mlps_pair(&s, &t);
    for layer in 0..s.layers() {
        let held = s.arch.modules.iter().filter(|m| s.holds(layer, m));
        for spec in held.filter(|m| !m.expert || experts_pair) {
            let (out, inp) = spec.shape(&source.config);
            let m = SourceModule {
                r: 1,
                in_features: inp,
                out_features: out,
                scale: 1.0,
            };
            for expert in spec.instances(&source.config) {
                all.insert(s.arch.module_path(&s.names, layer, expert, spec), m);
            }
        }
    }
    let mut opts = options.clone();
    opts.mode = crate::modes::Mode::Auto;
    opts.leave_unpaired = true;
    if !experts_pair && opts.modules.is_none() {
        // Experts pair with nothing here: compare the attention alone.
        opts.modules = Some(plan::attention_modules(&s, &t));
    }
    let plan = plan::build(&s, &t, &all, &source.dir, &opts)?;
    let timings = Timings::default();
    let ctx = execute::Context {
        source,
        target,
        backend,
        options: &opts,
        timings: &timings,
        cache,
        prefetched: None,
        map: None,
    };
    let units: Vec<&plan::Unit> = plan.units().collect();
    let bar = progress.start("inspect", "modules", units.len() as u64);
    let pairs = units
        .par_iter()
        .map(|u| {
            bar.check()?;
            let bs = basis::decompose(&ctx, &BasisKey::of_unit(u, Role::Source))?;
            let bt = basis::decompose(&ctx, &BasisKey::of_unit(u, Role::Target))?;
            let (su, sv) = basis::similarities(backend, &bs, &bt);
            bar.step();
            Ok(PairRow {
                module: u.label.clone(),
                source_key: u.source_tensor.clone(),
                target_key: u.target_tensor.clone(),
                source_layer: u.source_layer,
                target_layer: u.target_layer,
                source_shape: [u.source_shape.0, u.source_shape.1],
                target_shape: [u.target_shape.0, u.target_shape.1],
                rank: u.rank,
                similarity_u: su,
                similarity_v: sv,
                similarity: su.zip(sv).map(|(a, b)| (a + b) / 2.0),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    bar.finish();
    Ok(Inspection {
        source_base: source.dir.to_string_lossy().into_owned(),
        target_base: target.dir.to_string_lossy().into_owned(),
        source_arch: s.arch.name.clone(),
        target_arch: t.arch.name.clone(),
        rank: options.rank,
        layer_map: super::report::layer_map_json(&plan),
        pairs,
        total_ms: wall.elapsed().as_secs_f64() * 1e3,
    })
}

/// A terminal table: one line per module pair.
pub fn table(ins: &Inspection) -> String {
    let f = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
    // An expert's module with its index: `experts.up_proj[5]`.
    let label = |p: &PairRow| {
        let expert = p.target_key.split_once(".experts.");
        match expert.and_then(|(_, rest)| rest.split('.').next()) {
            Some(e) => format!("{}[{e}]", p.module),
            None => p.module.clone(),
        }
    };
    let labels: Vec<String> = ins.pairs.iter().map(label).collect();
    let w = labels.iter().map(String::len).max().unwrap_or(0).max(14);
    let mut out = format!(
        "{} ({}) -> {} ({}), k = {}\n{:<w$} {:>5} {:>5} {:>11} {:>11} {:>8} {:>8} {:>10}\n",
        ins.source_base,
        ins.source_arch,
        ins.target_base,
        ins.target_arch,
        ins.rank,
        "module",
        "tgt",
        "src",
        "source",
        "target",
        "sim_u",
        "sim_v",
        "similarity"
    );
    for (p, module) in ins.pairs.iter().zip(labels) {
        out += &format!(
            "{:<w$} {:>5} {:>5} {:>11} {:>11} {:>8} {:>8} {:>10}\n",
            module,
            p.target_layer,
            p.source_layer,
            format!("{}x{}", p.source_shape[0], p.source_shape[1]),
            format!("{}x{}", p.target_shape[0], p.target_shape[1]),
            f(p.similarity_u),
            f(p.similarity_v),
            f(p.similarity)
        );
    }
    out
}
