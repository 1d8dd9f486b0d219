//! `transfer_report.json`: what was done to every module, with the numbers to judge it, and the
//! one-screen summary printed at the end of a run.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::plan::{Plan, Unit};
use crate::transfer::execute::Outcome;

/// One row per unit (a module, or one projection of a fused module).
#[derive(Debug, Clone, Serialize)]
pub struct ModuleRow {
    pub source_key: String,
    pub target_key: String,
    pub source_shape: [usize; 2],
    pub target_shape: [usize; 2],
    pub mode: String,
    pub similarity_u: Option<f64>,
    pub similarity_v: Option<f64>,
    pub similarity: Option<f64>,
    pub transferred: bool,
    pub energy_kept: Option<f64>,
    /// σ_{k+1}/σ_k of the source and target weights: near 1 means the top-k subspace is barely
    /// determined, and results then depend on the seed.
    pub gap_source: Option<f64>,
    pub gap_target: Option<f64>,
    /// Module type (`q_proj`, ...).
    pub module: String,
    pub target_module: String,
    pub source_module: Option<String>,
    pub source_layer: usize,
    pub target_layer: usize,
    /// k_eff, the rank of the bases used.
    pub rank: usize,
    pub rank_capped: bool,
    /// map mode: relative residual of the residual-stream fit on the shared tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub residual_fit: Option<f64>,
    /// map mode: mean similarity of the matched heads or neurons this module follows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched_similarity: Option<f64>,
    /// map mode: [matched, all] of the target's attention heads (or MLP neurons) this module's
    /// rows or columns follow; the unmatched ones take no update.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched_heads: Option<[usize; 2]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched_neurons: Option<[usize; 2]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_rows: Option<[usize; 2]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_rows: Option<[usize; 2]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl ModuleRow {
    pub fn new(
        unit: &Unit,
        target_module: &str,
        full_source_rows: usize,
        full_target_rows: usize,
        o: &Outcome,
    ) -> Self {
        let similarity = match (o.similarity_u, o.similarity_v) {
            (Some(u), Some(v)) => Some((u + v) / 2.0),
            _ => None,
        };
        let rows =
            |r: &std::ops::Range<usize>, full: usize| (r.len() != full).then_some([r.start, r.end]);
        ModuleRow {
            source_key: unit.source_tensor.clone(),
            target_key: unit.target_tensor.clone(),
            source_shape: [unit.source_shape.0, unit.source_shape.1],
            target_shape: [unit.target_shape.0, unit.target_shape.1],
            mode: unit.mode.name().to_string(),
            similarity_u: o.similarity_u,
            similarity_v: o.similarity_v,
            similarity,
            transferred: o.transferred,
            energy_kept: o.energy_kept,
            gap_source: o.gap_source,
            gap_target: o.gap_target,
            module: unit.label.clone(),
            target_module: target_module.to_string(),
            source_module: unit.source_module.clone(),
            source_layer: unit.source_layer,
            target_layer: unit.target_layer,
            rank: unit.rank,
            rank_capped: unit.rank_capped,
            residual_fit: o.residual_fit,
            matched_similarity: o.matched_similarity,
            matched_heads: o
                .matched_units
                .filter(|u| !u.neurons)
                .map(|u| [u.matched, u.all]),
            matched_neurons: o
                .matched_units
                .filter(|u| u.neurons)
                .map(|u| [u.matched, u.all]),
            source_rows: rows(&unit.source_rows, full_source_rows),
            target_rows: rows(&unit.target_rows, full_target_rows),
            reason: o.reason.clone(),
        }
    }
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub source_base: String,
    pub target_base: String,
    pub adapter: String,
    /// The mode every module was transferred with (`auto` resolved).
    pub mode: String,
    /// Why `--mode auto` chose `mode` (absent when a mode was named).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_reason: Option<String>,
    pub rank: usize,
    pub oversample: usize,
    pub power_iters: usize,
    pub seed: u64,
    pub threshold: f32,
    /// `--modules`, when given: the module types transferred (the others are skipped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selected_modules: Option<Vec<String>>,
    /// The adapter's routing-gate modules left out under `--drop-router`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dropped_router_modules: Vec<String>,
    /// The backend and why it was picked (`cpu (auto: no GPU)`, `cuda (requested): …`).
    pub device: String,
    pub layer_map: BTreeMap<String, usize>,
    /// Between mixture-of-experts models: for each target layer, the source expert of each of its
    /// experts and the cosine of their router rows.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub expert_map: BTreeMap<String, crate::plan::experts::ExpertMatch>,
    /// The arguments given as hub names (`source_base`, `target_base`, `adapter`), with the
    /// revision and the cache snapshot each resolved to.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub hub: BTreeMap<String, crate::io::hub::HubModel>,
    /// Basis cache use, when `--cache-dir` is given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub basis_cache: Option<CacheUse>,
    /// The map mode's model map: its settings, the residual fit and every layer's matchings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub map: Option<crate::map::MapReport>,
    pub timings_ms: BTreeMap<String, f64>,
    pub summary: Summary,
    pub modules: Vec<ModuleRow>,
}

/// How the basis cache served a run: decompositions found and computed.
#[derive(Debug, Clone, Serialize)]
pub struct CacheUse {
    pub dir: String,
    pub hits: usize,
    pub misses: usize,
}

/// σ_{k+1}/σ_k above this counts as a weakly resolved top-k subspace.
pub const WEAK_GAP: f64 = 0.9;

/// Counts and means over the rows.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub transferred: usize,
    pub skipped: usize,
    pub mean_similarity: Option<f64>,
    pub mean_energy_kept: Option<f64>,
    pub rank_capped: usize,
    /// Rows where σ_{k+1}/σ_k of either weight exceeds 0.9 (weakly resolved subspaces).
    pub weakly_resolved: usize,
    /// Transferred rows whose update came out (next to) zero from a source update that was not
    /// (energy kept below [`EMPTIED`]): a map or a basis that sent it to nothing, e.g. target
    /// weights with no direction.
    pub emptied: usize,
    /// map mode: the share of the target's attention heads and of its MLP neurons that take an
    /// update (matched to a source unit), over the transferred modules; the rest take none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched_heads: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched_neurons: Option<f64>,
}

/// Energy kept below this counts as an update sent to nothing.
pub const EMPTIED: f64 = 1e-6;

impl Summary {
    pub fn of(rows: &[ModuleRow]) -> Self {
        let mean =
            |xs: Vec<f64>| (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64);
        Summary {
            transferred: rows.iter().filter(|r| r.transferred).count(),
            skipped: rows.iter().filter(|r| !r.transferred).count(),
            // In map mode the similarity a threshold compares is the matched one.
            mean_similarity: mean(
                rows.iter()
                    .filter_map(|r| r.similarity.or(r.matched_similarity))
                    .collect(),
            ),
            mean_energy_kept: mean(
                rows.iter()
                    .filter(|r| r.transferred)
                    .filter_map(|r| r.energy_kept)
                    .collect(),
            ),
            rank_capped: rows.iter().filter(|r| r.rank_capped).count(),
            weakly_resolved: rows
                .iter()
                .filter(|r| {
                    [r.gap_source, r.gap_target]
                        .into_iter()
                        .flatten()
                        .any(|g| g > WEAK_GAP)
                })
                .count(),
            emptied: rows
                .iter()
                .filter(|r| r.transferred && r.energy_kept.is_some_and(|e| e < EMPTIED))
                .count(),
            matched_heads: matched_share(rows.iter().map(|r| (r, r.matched_heads))),
            matched_neurons: matched_share(rows.iter().map(|r| (r, r.matched_neurons))),
        }
    }
}

/// What map mode left out, when it left anything: the shares of the target's heads and neurons
/// that no source unit was matched to (the source has fewer, or its similar ones are taken), and
/// which therefore take no update.
pub fn unmatched_note(s: &Summary) -> Option<String> {
    // Rounded down: a share just under 1 is not shown as 100%.
    let pct = |x: f64| format!("{:.1}%", (1000.0 * x).floor() / 10.0);
    let parts: Vec<String> = [
        (s.matched_heads, "attention heads"),
        (s.matched_neurons, "MLP neurons"),
    ]
    .into_iter()
    .filter_map(|(share, what)| share.filter(|&x| x < 1.0).map(|x| (x, what)))
    .map(|(x, what)| format!("{} of the target's {what}", pct(x)))
    .collect();
    (!parts.is_empty()).then(|| {
        format!(
            "the map matched {} to a source unit (summary matched_heads / matched_neurons; \
             per module matched_heads / matched_neurons in the report): the unmatched ones take \
             no update",
            parts.join(" and ")
        )
    })
}

/// The share of matched units over the transferred rows that count them.
fn matched_share<'a>(
    rows: impl Iterator<Item = (&'a ModuleRow, Option<[usize; 2]>)>,
) -> Option<f64> {
    let (matched, all) = rows
        .filter(|(r, _)| r.transferred)
        .filter_map(|(_, units)| units)
        .fold((0, 0), |(m, a), [x, y]| (m + x, a + y));
    (all > 0).then(|| matched as f64 / all as f64)
}

/// Layer map with string keys, as JSON wants them.
pub fn layer_map_json(plan: &Plan) -> BTreeMap<String, usize> {
    // Zero-padded keys would sort numerically but read badly; BTreeMap<String> sorts "10" < "2",
    // which JSON readers do not care about.
    plan.layer_map
        .iter()
        .map(|(j, i)| (j.to_string(), *i))
        .collect()
}

/// A per-module-type table for the terminal: count, transferred, mean similarity, mean energy.
pub fn summary_table(rows: &[ModuleRow]) -> String {
    let mut by_type: BTreeMap<&str, Vec<&ModuleRow>> = BTreeMap::new();
    for r in rows {
        by_type.entry(r.module.as_str()).or_default().push(r);
    }
    let fmt = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
    let mut out = format!(
        "{:<12} {:>6} {:>11} {:>10} {:>10} {:>8}\n",
        "module", "count", "transferred", "sim_u/v", "similarity", "energy"
    );
    for (ty, rs) in by_type {
        let mean = |f: &dyn Fn(&ModuleRow) -> Option<f64>| {
            let v: Vec<f64> = rs.iter().filter_map(|r| f(r)).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        let su = mean(&|r| r.similarity_u);
        let sv = mean(&|r| r.similarity_v);
        let uv = match (su, sv) {
            (None, None) => "-".to_string(),
            _ => format!(
                "{}/{}",
                su.map(|v| format!("{v:.2}")).unwrap_or("-".into()),
                sv.map(|v| format!("{v:.2}")).unwrap_or("-".into())
            ),
        };
        out += &format!(
            "{:<12} {:>6} {:>11} {:>10} {:>10} {:>8}\n",
            ty,
            rs.len(),
            rs.iter().filter(|r| r.transferred).count(),
            uv,
            // In map mode the similarity a threshold compares is the matched one.
            fmt(mean(&|r| r.similarity.or(r.matched_similarity))),
            fmt(mean(&|r| if r.transferred { r.energy_kept } else { None })),
        );
    }
    out
}
