//! Mixture-of-experts models in the plan: an expert's module (`mlp.experts.5.up_proj`) takes its
//! update from one expert of the source, the one whose router row is closest in direction to its
//! own. A router row is the direction along which the residual stream selects its expert:
//! - a release, a fine-tune or a continued pre-training keeps each expert at its index and moves
//!   its row little, so expert e finds expert e;
//! - an expert-pruned model (REAP and the like) keeps a subset of the experts, renumbered, with
//!   their rows as they were, so each finds its original at cosine 1; an upcycled model's copies
//!   of an expert all find it.
//!
//! Between models of different hidden sizes the rows cannot be compared (and experts of unrelated
//! models share no index), and a dense MLP is no one expert: those modules are refused where the
//! user selects them, with the attention-only transfer that still works.
//!
//! Reading the routers (experts × hidden per layer) is the only weight data the plan touches.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::arch::{Block, ModuleSpec, Part};
use crate::error::{Error, Result};
use crate::modes::Mode;

use super::{ModelSide, Options, SourceModule};

/// Whether two models' routers live in one space, so that their experts can be matched: the
/// same hidden size.
pub(super) fn routers_compare(source: &ModelSide<'_>, target: &ModelSide<'_>) -> bool {
    source.ckpt.config.hidden_size == target.ckpt.config.hidden_size
}

/// The first of the two models whose MLPs are experts, if either's are.
pub fn side_with_experts<'s, 'a>(
    source: &'s ModelSide<'a>,
    target: &'s ModelSide<'a>,
) -> Option<&'s ModelSide<'a>> {
    [source, target].into_iter().find(|s| s.arch.has_experts())
}

/// The source expert of every target expert in one target layer.
#[derive(Debug, Clone, Serialize)]
pub struct ExpertMatch {
    pub source_layer: usize,
    /// For target expert e, the source expert its update comes from.
    pub source_experts: Vec<usize>,
    /// The cosine of the two experts' router rows.
    pub router_cosine: Vec<f64>,
}

/// Target layer → its experts' sources, for the layers in `layer_map` (empty unless both models
/// have experts).
pub(super) fn match_by_router(
    source: &ModelSide<'_>,
    target: &ModelSide<'_>,
    layer_map: &BTreeMap<usize, usize>,
) -> Result<BTreeMap<usize, ExpertMatch>> {
    let et = target.experts();
    // Routers of different hidden sizes live in different spaces: nothing to match (the expert
    // modules are refused where selected, `pairing::source_block`).
    if source.experts() == 0 || et == 0 || !routers_compare(source, target) {
        return Ok(BTreeMap::new());
    }
    let mut matches = BTreeMap::new();
    // Only layers with experts on both sides have routers to match.
    for (&j, &i) in layer_map
        .iter()
        .filter(|&(&j, &i)| source.sparse(i) && target.sparse(j))
    {
        let rows_s = unit_rows(source, i)?;
        let rows_t = unit_rows(target, j)?;
        let mut m = ExpertMatch {
            source_layer: i,
            source_experts: Vec::with_capacity(et),
            router_cosine: Vec::with_capacity(et),
        };
        for (e, t) in rows_t.iter().enumerate() {
            // Each target expert its closest source expert (a pruned model's are distinct; an
            // upcycled model's copies share one); a tie keeps the expert's own index first.
            let own = (e < rows_s.len()).then(|| (e, cosine(&rows_s[e], t)));
            let (best, best_cosine) = rows_s.iter().map(|s| cosine(s, t)).enumerate().fold(
                own.unwrap_or((0, f64::NEG_INFINITY)),
                |acc, (k, c)| {
                    if c > acc.1 {
                        (k, c)
                    } else {
                        acc
                    }
                },
            );
            m.source_experts.push(best);
            m.router_cosine.push(best_cosine);
        }
        matches.insert(j, m);
    }
    Ok(matches)
}

/// One line on the matching for the terminal: how the experts were paired, and the weakest pair
/// (a cosine far below 1 says the two models' experts are not the same experts).
pub fn summary(
    matches: &BTreeMap<usize, ExpertMatch>,
    source_experts: usize,
    target_experts: usize,
) -> Option<String> {
    let (layer, expert, cosine) = matches
        .iter()
        .flat_map(|(&j, m)| {
            m.router_cosine
                .iter()
                .enumerate()
                .map(move |(e, &c)| (j, e, c))
        })
        .min_by(|a, b| a.2.total_cmp(&b.2))?;
    let distinct = |m: &ExpertMatch| {
        let mut s = m.source_experts.clone();
        s.sort_unstable();
        s.dedup();
        s.len()
    };
    let shared = matches
        .values()
        .any(|m| distinct(m) < m.source_experts.len());
    let moved = matches
        .values()
        .any(|m| m.source_experts.iter().enumerate().any(|(e, &s)| s != e));
    Some(format!(
        "experts matched by their routers ({target_experts} per target layer from \
         {source_experts}{}{}): the weakest match is layer {layer}'s expert {expert} at cosine {cosine:.3}",
        if moved { ", not all at their own index" } else { "" },
        if shared { ", some sharing a source expert" } else { "" }
    ))
}

/// The cosine of two rows scaled to unit length.
fn cosine(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// A layer's router rows, each scaled to unit length (a zero row stays zero).
fn unit_rows(side: &ModelSide<'_>, layer: usize) -> Result<Vec<Vec<f64>>> {
    let below = side
        .arch
        .router
        .as_deref()
        .expect("expert tables name a router");
    let name = format!("{}.{layer}.{below}", side.prefix);
    let (experts, hidden) = (side.experts(), side.ckpt.config.hidden_size);
    let shape = side.ckpt.shape(&name)?;
    if shape != [experts, hidden] {
        return Err(Error::bad_tensor(
            &side.ckpt.dir,
            &name,
            format!("shape {shape:?}, but config.json implies [{experts}, {hidden}]"),
        ));
    }
    let values = side.ckpt.read_rows_f32(&name, 0..experts)?;
    if let Some(at) = values.iter().position(|x| !x.is_finite()) {
        return Err(Error::bad_tensor(
            &side.ckpt.dir,
            &name,
            format!("value {} at {at} is not finite", values[at]),
        ));
    }
    Ok(values
        .chunks(hidden)
        .map(|row| {
            let norm = row.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            let inv = if norm > 0.0 { 1.0 / norm } else { 0.0 };
            row.iter().map(|&x| x as f64 * inv).collect()
        })
        .collect())
}

/// Takes out of the adapter its updates to the routing gates of a mixture of experts (the
/// router, Qwen2-MoE's `shared_expert_gate`), where `drop`; refuses them otherwise, naming
/// `--drop-router`. Returns the names taken out.
///
/// A router's rows follow the experts (row e scores expert e), and the plan pairs the target's
/// experts with the source's by those rows: the router's own update would have to follow that
/// pairing, and PEFT with transformers 5 has no LoRA layer for its router. mlx-lm's default
/// `keys`, and PEFT's `all-linear` with transformers 4, adapt it beside the experts.
pub fn routing_gates(
    adapter: &mut crate::io::adapter::Adapter,
    source: &ModelSide<'_>,
    drop: bool,
) -> Result<Vec<String>> {
    let gates: Vec<String> = adapter
        .modules
        .keys()
        .filter(|name| source.is_routing_gate(name))
        .cloned()
        .collect();
    if let (Some(first), false) = (gates.first(), drop) {
        let more = match gates.len() {
            1 => String::new(),
            n => format!(" (and {} more)", n - 1),
        };
        return Err(Error::UnsupportedAdapter {
            path: adapter.dir.clone(),
            reason: format!(
                "module `{first}`{more} adapts a routing gate of the mixture of experts, whose \
                 update is not transferred (its rows follow the experts, which are paired by the \
                 routers' own weights); pass --drop-router (from Python, drop_router=True) to \
                 transfer the rest without it"
            ),
        });
    }
    for name in &gates {
        adapter.modules.remove(name);
    }
    Ok(gates)
}

/// Names the per-expert modules of a LoRA on fused experts as the source's table names them:
/// PEFT calls a Mixtral layer's experts `mlp.experts` where its checkpoint writes
/// `block_sparse_moe.experts.<e>.w1`.
pub fn name_fused_experts(
    adapter: &mut crate::io::adapter::Adapter,
    source: &ModelSide<'_>,
) -> Result<()> {
    let fused: Vec<(String, crate::io::adapter::FactorRef)> = adapter
        .modules
        .iter()
        .filter(|(_, m)| m.a.expert.is_some())
        .map(|(name, m)| (name.clone(), m.a.clone()))
        .collect();
    for (name, a) in fused {
        // PEFT stacks as many experts as the model has: another count means another r per expert
        // than the one trained, and blocks that cut across experts.
        let block = a.expert.as_ref().expect("filtered");
        if block.experts != source.experts() {
            return Err(Error::bad_tensor(
                adapter.dir.join(crate::io::adapter::WEIGHTS_FILE),
                &a.tensor,
                format!(
                    "at r = {} per expert it stacks {} experts, but {} has {} per layer: is r in \
                     adapter_config.json the one it was trained with?",
                    block.rank,
                    block.experts,
                    source.ckpt.dir.display(),
                    source.experts()
                ),
            ));
        }
        if source.parse_module_name(&name).is_some() {
            continue;
        }
        // `<prefix>.<layer>.<…>.experts.<e>.<gate_proj | up_proj | down_proj>`
        let placed = (|| {
            let rest = name.strip_prefix(&source.names)?.strip_prefix('.')?;
            let (layer, rest) = rest.split_once('.')?;
            let (rest, part) = rest.rsplit_once('.')?;
            let (experts, expert) = rest.rsplit_once('.')?;
            let part = match part {
                "gate_proj" => Part::Gate,
                "up_proj" => Part::Up,
                "down_proj" => Part::Down,
                _ => return None,
            };
            let spec = source.arch.module_in(Block::Experts, part)?;
            experts.ends_with("experts").then_some(())?;
            let (layer, expert) = (layer.parse().ok()?, expert.parse().ok()?);
            Some(
                source
                    .arch
                    .module_path(&source.names, layer, Some(expert), spec),
            )
        })();
        if let Some(to) = placed {
            adapter.rename_module(&name, to)?;
        }
    }
    Ok(())
}

/// The map mode reads every layer's dense MLP (its neurons anchor the layer's map and its depth
/// similarity), which a mixture-of-experts layer does not have, and matches attention heads,
/// which latent attention does not have. Hybrid models (Qwen3.5) are mapped: their MLPs in every
/// layer, their softmax and linear attention where both layers have that kind; what has no
/// mapping (`unmapped_update`) is refused here, before any map is built.
pub fn refuse_map(
    mode: Mode,
    (source, target): (&ModelSide<'_>, &ModelSide<'_>),
    adapter: &BTreeMap<String, SourceModule>,
    options: &Options,
) -> Result<()> {
    if mode != Mode::Map {
        return Ok(());
    }
    if let Some(side) = [source, target]
        .into_iter()
        .find(|s| s.arch.latent_attention())
    {
        return Err(Error::arg(
            "--mode",
            format!(
                "map matches the heads of q, k and v, and {} ({}) has latent attention instead; \
                 use rotate where the shapes agree, or align",
                side.ckpt.dir.display(),
                side.arch.name
            ),
        ));
    }
    // Experts first: no `--modules` list gets past them.
    if let Some(side) = side_with_experts(source, target) {
        return Err(Error::arg(
            "--mode",
            format!(
                "map reads each layer's dense MLP, and {} ({}) has {} experts per layer instead; \
                 use rotate where the shapes agree, or align",
                side.ckpt.dir.display(),
                side.arch.name,
                side.experts()
            ),
        ));
    }
    match unmapped_update(source, target, adapter, options)? {
        Some(u) => Err(Error::arg(
            "--mode",
            format!("{}; use align{}", u.reason, u.hint),
        )),
        None => Ok(()),
    }
}

/// An update the map mode cannot take: why, and the `--modules` list that leaves it out.
pub struct Unmapped {
    pub reason: String,
    /// `; leave it out with --modules …`, or empty where nothing else would be left.
    pub hint: String,
}

/// Why the map mode cannot take the adapter's updates as `--modules` selects them: linear
/// attention in fused projections (Qwen3-Next's `in_proj_qkvz`, `in_proj_ba`) or with heads of
/// other sizes than the target's (they move as wholes), or a gated query's (Qwen3.5's `q_proj`,
/// whose gate rows have no counterpart) onto a query without a gate. None where it can.
pub fn unmapped_update(
    source: &ModelSide<'_>,
    target: &ModelSide<'_>,
    adapter: &BTreeMap<String, SourceModule>,
    options: &Options,
) -> Result<Option<Unmapped>> {
    let filter = super::module_filter(options, source.arch, target.arch)?;
    // Selected as the plan selects its units: by the module's name, a fused module's part's, or
    // the name of a target module holding one of its parts.
    let chosen = |spec: &ModuleSpec| {
        filter(&spec.name, &spec.name, &spec.name)
            || spec.parts.iter().any(|&p| {
                let holders = target.arch.modules.iter().filter(|t| t.parts.contains(&p));
                holders.into_iter().any(|t| {
                    filter(p.module_name(), &t.name, &spec.name)
                        || filter(&spec.name, &t.name, &spec.name)
                })
            })
    };
    let selected: Vec<&ModuleSpec> = adapter
        .keys()
        .filter_map(|name| source.parse_module_name(name))
        .map(|(_, _, spec)| spec)
        .filter(|spec| chosen(spec))
        .collect();
    // Linear attention's heads move as wholes, in the split projections only.
    let sizes = |side: &ModelSide<'_>| {
        let c = side.ckpt.config.linear.as_ref();
        c.map(|l| (l.key_head_dim, l.value_head_dim))
    };
    let (sizes_s, sizes_t) = (sizes(source), sizes(target));
    // Fused: either side's table (Qwen3-Next's), whose rows interleave several projections per
    // key head. Qwen3-Next also has experts, refused before this; the check stays for a table
    // that would fuse them without.
    let fused_side = [source, target].into_iter().find(|side| {
        side.arch.has_block(Block::LinearAttention) && !side.arch.splits_linear_attention()
    });
    let other_sizes = sizes_t.is_some() && sizes_s != sizes_t;
    let linear = |spec: &ModuleSpec| {
        spec.block() == Block::LinearAttention && (fused_side.is_some() || other_sizes)
    };
    let gate_lost = source.ckpt.config.gated_query && !target.ckpt.config.gated_query;
    let gated = |spec: &ModuleSpec| gate_lost && spec.parts.contains(&Part::Q);
    // The list leaves out every module the map cannot take, so that following it works.
    // Linear attention onto a model without it is refused by the plan's pairing of layers.
    let no_target = |spec: &ModuleSpec| {
        spec.block() == Block::LinearAttention && !target.arch.has_block(Block::LinearAttention)
    };
    let kept: BTreeSet<&str> = (selected.iter())
        .filter(|spec| !linear(spec) && !gated(spec) && !no_target(spec))
        .map(|spec| spec.name.as_str())
        .collect();
    let hint = match kept.is_empty() {
        true => String::new(),
        false => format!(
            "; leave it out with --modules {}",
            kept.into_iter().collect::<Vec<_>>().join(",")
        ),
    };
    let (source_dir, target_dir) = (source.ckpt.dir.display(), target.ckpt.dir.display());
    let reason = if let Some(spec) = selected.iter().find(|spec| linear(spec)) {
        let why = match fused_side {
            Some(side) => format!(
                "and {} fuses linear attention's projections, interleaving their heads per key \
                 head; map takes Qwen3.5's split ones",
                side.ckpt.dir.display()
            ),
            None => {
                let ((ks, vs), (kt, vt)) =
                    (sizes_s.unwrap_or_default(), sizes_t.unwrap_or_default());
                format!(
                    "whose key and value heads of {ks} and {vs} meet heads of {kt} and {vt} in \
                     {target_dir}; map moves linear attention's heads as wholes"
                )
            }
        };
        format!(
            "the adapter's `{}` is linear attention in {source_dir}{}{why}",
            spec.name,
            if fused_side.is_some() { " " } else { ", " }
        )
    } else if let Some(spec) = selected.iter().find(|spec| gated(spec)) {
        format!(
            "the adapter's `{}` also updates the gate of each head's output in {source_dir}, \
             which {target_dir} does not have",
            spec.name
        )
    } else {
        return Ok(None);
    };
    Ok(Some(Unmapped { reason, hint }))
}
