//! A map-mode transfer's units, run a target layer at a time as the model map is built: each
//! layer's map is built (on every core), its units run on it (in parallel, each small), and it
//! is dropped before the next layer's is built. A refined layer map holds a `d_s × d_t` residual
//! map (256 MB at 8192 wide): built all first, an 80-layer pair held 21 GB of them.
//!
//! Progress: the stages `map` (target layers, each counted once its map is built) and
//! `transfer` (modules) advance together.

use rayon::prelude::*;

use super::collect::Collector;
use super::execute::{Context, MapContext};
use super::{map_options, Job, MapStart, Opened};
use crate::error::Result;
use crate::map::{LayerByLayer, LayerMap, MapReport};
use crate::modes::Mode;
use crate::plan::{self, ModelSide};
use crate::timing::Phase;

/// Whether the map mode transfers `unit` (on its layer's map).
fn mapped(unit: &plan::Unit) -> bool {
    unit.mode == Mode::Map && unit.skip.is_none()
}

/// Whether a plan has a unit that the map mode transfers (else no map is built).
pub(super) fn has_mapped_units(opened: &Opened) -> bool {
    opened.plan.units().any(mapped)
}

/// Runs every unit of the plan, building the model map a layer at a time from `start`, and hands
/// each outcome to `collector`; returns what the report says of the map.
pub(super) fn run_units_by_layer(
    ctx: &Context<'_>,
    opened: &Opened,
    start: &MapStart,
    job: &Job,
    collector: &Collector<'_>,
) -> Result<MapReport> {
    let source = ModelSide::new(&opened.source)?;
    let target = ModelSide::new(&opened.target)?.named(&opened.target_names);
    let mut builder = ctx.timings.time(Phase::Map, || {
        LayerByLayer::new(
            (&source, &target),
            std::sync::Arc::clone(&start.residual),
            map_options(&job.options),
            (start.depth.clone(), start.times.clone()),
            ctx.backend,
        )
    });
    let units: Vec<&plan::Unit> = opened.plan.units().collect();
    let layers = job
        .progress
        .start("map", "layers", opened.plan.layer_map.len() as u64);
    let modules = job
        .progress
        .start("transfer", "modules", units.len() as u64);
    let mut ran = vec![false; units.len()];
    let residual_fit = start.residual.relative_residual;
    // The units of `idx`, in parallel, on `layer`'s map (None: units that use no map).
    let run = |idx: &[usize], layer: Option<&LayerMap>| -> Result<()> {
        let mc = layer.map(|layer| MapContext {
            layer,
            residual_fit,
            source: &source,
            target: &target,
        });
        let ctx = Context {
            map: mc.as_ref(),
            ..*ctx
        };
        idx.par_iter().try_for_each(|&i| {
            modules.check()?;
            let outcome = opened.run_unit(&ctx, units[i])?;
            modules.step();
            collector.add(i, outcome)
        })
    };
    // Every layer of the plan is built, with units or not: each starts from the one below.
    for (&j, &i) in &opened.plan.layer_map {
        layers.check()?;
        let layer = ctx.timings.time(Phase::Map, || builder.build(j, i))?;
        layers.step();
        let of_layer: Vec<usize> = (0..units.len())
            .filter(|&u| mapped(units[u]) && units[u].target_layer == j)
            .collect();
        run(&of_layer, Some(&layer))?;
        of_layer.iter().for_each(|&u| ran[u] = true);
    }
    layers.finish();
    // The rest (skipped units, and any the plan left outside map mode) need no map.
    let rest: Vec<usize> = (0..units.len()).filter(|&u| !ran[u]).collect();
    run(&rest, None)?;
    modules.finish();
    Ok(builder.finish())
}
