//! Runs one unit of the plan: reads the two weights from the map (one at a time), decomposes
//! them, measures their similarity and computes the target factors. Units run in parallel
//! (rayon); each decomposes one weight at a time, read a band of rows at a time on the CPU, so
//! memory is bounded by the thread count, not the model (docs/METHOD.md, "Memory").

use faer::Mat;

use crate::backend::{Backend, Basis, Factors};
use crate::error::Result;
use crate::io::adapter::LoraFactors;
use crate::io::checkpoint::Checkpoint;
use crate::map::LayerMap;
use crate::modes::{update_norm, Mode};
use crate::plan::{ModelSide, Options, Unit};
use crate::timing::{Phase, Timings};
use crate::transfer::basis::{self, BasisKey, Prefetched, Role};
use crate::transfer::cache::BasisCache;

/// Everything a unit needs besides itself.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    pub source: &'a Checkpoint,
    pub target: &'a Checkpoint,
    pub backend: &'a dyn Backend,
    pub options: &'a Options,
    pub timings: &'a Timings,
    /// Where decompositions are looked up and stored, if anywhere.
    pub cache: Option<&'a BasisCache>,
    /// Bases computed ahead in batches (backends that batch), taken before computing one.
    pub prefetched: Option<&'a Prefetched>,
    /// The map of the units' target layer, when they use the map mode.
    pub map: Option<&'a MapContext<'a>>,
}

/// A target layer's map and the two models as the plan sees them.
pub struct MapContext<'a> {
    pub layer: &'a LayerMap,
    /// The bottom residual map's relative residual on its anchors (for the report's rows).
    pub residual_fit: Option<f64>,
    pub source: &'a ModelSide<'a>,
    pub target: &'a ModelSide<'a>,
}

/// Whether a unit decomposes its two weights ([`crate::plan::decomposes`]); never a skipped
/// unit or one without factors.
pub fn needs_bases(ctx: &Context<'_>, unit: &Unit, has_factors: bool) -> bool {
    unit.skip.is_none()
        && has_factors
        && crate::plan::decomposes(
            unit.mode,
            unit.source_shape,
            unit.target_shape,
            ctx.options.threshold,
        )
}

/// What a unit produced: factors for its target rows (None when it was not transferred and has
/// nothing to contribute) and its measurements.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub factors: Option<Factors>,
    pub similarity_u: Option<f64>,
    pub similarity_v: Option<f64>,
    pub transferred: bool,
    pub energy_kept: Option<f64>,
    pub reason: Option<String>,
    /// σ_{k+1}/σ_k of the source and target weights (how well their top-k subspaces are resolved).
    pub gap_source: Option<f64>,
    pub gap_target: Option<f64>,
    /// map mode: the residual fit and the mean matched similarity.
    pub residual_fit: Option<f64>,
    pub matched_similarity: Option<f64>,
    /// map mode: how many of the target's heads or neurons the module follows are matched.
    pub matched_units: Option<crate::map::apply::MatchedUnits>,
}

/// The source factors of a unit: rows `unit.source_rows` of B, and A. A unit that takes part of
/// a fused module's rows drops the columns of B that are zero in those rows, with their rows of
/// A: they add nothing to its update, and a module this project fused (blockdiag B) would
/// otherwise carry every other part's rank into each part, and, fused again, sum them. So does a
/// module read out of a LoRA on fused experts (`stacked`), whose rank is its wrapper's: an
/// expert's gate and up projection written by `--fused-experts` share the wrapper's rank, each
/// with the other's columns zero, and an expert of a smaller rank is padded with zero columns;
/// such a module with no update at all (an expert the adapter left alone) keeps one zero rank,
/// not the wrapper's.
pub fn source_factors(unit: &Unit, f: &LoraFactors, stacked: bool) -> Factors {
    let r = f.r;
    let rows = unit.source_rows.clone();
    let b_at = |i: usize, j: usize| f.b[(rows.start + i) * r + j];
    let mut kept: Vec<usize> = (0..r)
        .filter(|&j| (0..rows.len()).any(|i| b_at(i, j) != 0.0))
        .collect();
    if kept.is_empty() && stacked {
        kept = vec![0];
    } else if (rows.len() == f.out_features && !stacked) || kept.is_empty() {
        // A whole module, or a part with no update at all: its factors as they are.
        kept = (0..r).collect();
    }
    let b = Mat::from_fn(rows.len(), kept.len(), |i, j| b_at(i, kept[j]));
    let a = Mat::from_fn(kept.len(), f.in_features, |i, j| {
        f.a[kept[i] * f.in_features + j]
    });
    Factors { b, a }
}

/// Runs one unit on its source factors ([`source_factors`]; None when the adapter lacks its
/// source module).
pub fn run_unit(ctx: &Context<'_>, unit: &Unit, factors: Option<Factors>) -> Result<Outcome> {
    let skipped = |reason: String| Outcome {
        factors: None,
        similarity_u: None,
        similarity_v: None,
        transferred: false,
        energy_kept: None,
        reason: Some(reason),
        gap_source: None,
        gap_target: None,
        residual_fit: None,
        matched_similarity: None,
        matched_units: None,
    };
    if let Some(reason) = &unit.skip {
        return Ok(skipped(reason.clone()));
    }
    let Some(src) = factors else {
        return Ok(skipped("no source module".into()));
    };
    if unit.mode == Mode::Map {
        return run_mapped(ctx, unit, src);
    }
    let threshold = ctx.options.threshold;
    let want_bases = needs_bases(ctx, unit, true);
    let (bs, bt) = if want_bases {
        let bs = basis::decompose(ctx, &BasisKey::of_unit(unit, Role::Source))?;
        let bt = basis::decompose(ctx, &BasisKey::of_unit(unit, Role::Target))?;
        (Some(bs), Some(bt))
    } else {
        (None, None)
    };
    let (sim_u, sim_v) = match (&bs, &bt) {
        (Some(s), Some(t)) => ctx
            .timings
            .time(Phase::Similarity, || basis::similarities(ctx.backend, s, t)),
        _ => (None, None),
    };
    let mut out = ctx.timings.time(Phase::Project, || {
        ctx.backend
            .transfer(unit.mode, &src, bs.as_ref(), bt.as_ref(), unit.target_shape)
    })?;
    let similarity = match (sim_u, sim_v) {
        (Some(u), Some(v)) => Some((u + v) / 2.0),
        _ => None,
    };
    let mut transferred = true;
    let mut reason = None;
    match similarity {
        Some(s) if threshold > 0.0 && (s as f32) < threshold => {
            out.b.fill(0.0);
            transferred = false;
            reason = Some(format!("similarity {s:.4} below threshold {threshold}"));
        }
        None if threshold > 0.0 => {
            // Subspaces of different sizes have no similarity to filter on: say so, keep the module.
            reason =
                Some("threshold not applied: shapes differ, so similarity is undefined".into());
        }
        _ => {}
    }
    let energy_kept = ctx.timings.time(Phase::Project, || {
        let before = update_norm(&src);
        (before > 0.0).then(|| update_norm(&out) / before)
    });
    Ok(Outcome {
        factors: Some(out),
        similarity_u: sim_u,
        similarity_v: sim_v,
        transferred,
        energy_kept,
        reason,
        gap_source: bs.as_ref().and_then(Basis::gap_ratio),
        gap_target: bt.as_ref().and_then(Basis::gap_ratio),
        residual_fit: None,
        matched_similarity: None,
        matched_units: None,
    })
}

/// A map-mode unit: its factors through the model map; `--threshold` gates on the matched
/// similarity of the heads or neurons it follows.
fn run_mapped(ctx: &Context<'_>, unit: &Unit, src: Factors) -> Result<Outcome> {
    let mc = ctx.map.ok_or_else(|| {
        crate::error::Error::internal(format!(
            "map mode without a map for target layer {}",
            unit.target_layer
        ))
    })?;
    let mapped = ctx.timings.time(Phase::Project, || {
        mc.layer.apply(unit, &src, mc.source, mc.target)
    })?;
    let mut out = mapped.factors;
    let threshold = ctx.options.threshold;
    let (mut transferred, mut reason) = (true, None);
    if let Some(s) = mapped.matched_similarity {
        if threshold > 0.0 && (s as f32) < threshold {
            out.b.fill(0.0);
            transferred = false;
            reason = Some(format!(
                "matched similarity {s:.4} below threshold {threshold}"
            ));
        }
    }
    let before = update_norm(&src);
    let energy_kept = (before > 0.0).then(|| update_norm(&out) / before);
    Ok(Outcome {
        factors: Some(out),
        similarity_u: None,
        similarity_v: None,
        transferred,
        energy_kept,
        reason,
        gap_source: None,
        gap_target: None,
        residual_fit: mc.residual_fit,
        matched_similarity: mapped.matched_similarity,
        matched_units: Some(mapped.matched_units),
    })
}
