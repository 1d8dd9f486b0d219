//! Which block of a source layer fills each module of the target layer mapped to it. The
//! attention fills the attention. A dense MLP fills a dense MLP, experts fill experts (expert for
//! expert, matched by their routers) and a shared expert fills a shared expert. A layer may hold
//! a dense MLP in one model and experts in the other (dense layers among expert layers, or a dense
//! model against a mixture of experts): a dense MLP is no one expert, so that pair cannot carry
//! its MLP update, and the plan refuses it where the user selects it.

use std::collections::BTreeSet;

use crate::arch::{Block, ModuleSpec, Part};
use crate::error::{Error, Result};

use super::{ModelSide, ModuleFilter, Present};

/// Whether a target module of `target_block` can take an update from a source module of
/// `source_block` in some pair of layers (a dense MLP and experts face each other wherever the
/// two models' layers differ in kind, so they are counted too: the plan then refuses the pair).
pub(super) fn blocks_meet(source_block: Block, target_block: Block) -> bool {
    let mlp = |b: Block| matches!(b, Block::Mlp | Block::Experts);
    source_block == target_block || (mlp(source_block) && mlp(target_block))
}

/// The source block that fills target module type `spec` of layer `j` from source layer `i`:
/// `Ok(None)` where the source layer has nothing of the kind (no shared expert), `Err` with the
/// reason where the two layers' MLPs cannot be paired.
pub(super) fn source_block(
    source: &ModelSide<'_>,
    target: &ModelSide<'_>,
    (i, j): (usize, usize),
    spec: &ModuleSpec,
) -> std::result::Result<Option<Block>, String> {
    match spec.block() {
        // A layer has softmax attention or linear attention (hybrid models): a source layer of
        // the other kind has nothing for this module, and its own update is left over.
        b @ (Block::Attention | Block::LinearAttention) => {
            Ok(source.holds_block(i, b).then_some(b))
        }
        Block::SharedExpert => Ok(source
            .holds_block(i, Block::SharedExpert)
            .then_some(Block::SharedExpert)),
        block => {
            let from = if source.sparse(i) {
                Block::Experts
            } else {
                Block::Mlp
            };
            let why = |tail: String| {
                format!(
                    "{} against {}{tail}",
                    describe(source, i),
                    describe(target, j)
                )
            };
            if from != block {
                Err(why(String::new()))
            } else if from == Block::Experts && !super::experts::routers_compare(source, target) {
                Err(why(format!(
                    ", with hidden sizes {} and {} whose routers cannot be compared",
                    source.ckpt.config.hidden_size, target.ckpt.config.hidden_size
                )))
            } else {
                Ok(Some(from))
            }
        }
    }
}

/// A layer's MLP in words: per layer where the whole model is alike, else of this layer.
fn describe(side: &ModelSide<'_>, layer: usize) -> String {
    let dir = side.ckpt.dir.display();
    match (side.sparse(layer), !side.mixes_layer_kinds()) {
        (true, true) => format!("{} experts per layer in {dir}", side.experts()),
        (true, false) => format!("{} experts in layer {layer} of {dir}", side.experts()),
        (false, true) => format!("one dense MLP per layer in {dir}"),
        (false, false) => format!("a dense MLP in layer {layer} of {dir}"),
    }
}

/// The source modules of layer `i` that fill target module `spec` from source block `from`, each
/// with the part it gives (None: the whole module, when the two tables lay their modules out
/// alike). A part the source layer does not have (a latent attention's k against a q, k, v
/// attention's) is left out: its rows of the target module stay zero.
pub(super) fn pieces(
    source: &ModelSide<'_>,
    i: usize,
    spec: &ModuleSpec,
    from: Block,
    same_layout: bool,
) -> Vec<(Option<Part>, &'static ModuleSpec)> {
    // Same layout: the module of the same name (pairing gives each block its own block).
    let found: Vec<(Option<Part>, &'static ModuleSpec)> = if same_layout {
        vec![(None, source.arch.module(&spec.name).expect("same layout"))]
    } else {
        spec.parts
            .iter()
            .filter_map(|&p| Some((Some(p), source.arch.module_in(from, p)?)))
            .collect()
    };
    found
        .into_iter()
        .filter(|(_, s)| source.holds(i, s))
        .collect()
}

/// Whether the adapter adapts a dense MLP or experts in source layer `i`, selected by `--modules`
/// (an update a layer pair of different MLP kinds would lose).
pub(super) fn adapts_mlp(
    source: &ModelSide<'_>,
    i: usize,
    present: &Present<'_>,
    filter: &ModuleFilter,
) -> bool {
    present.keys().any(|&(layer, _, name)| {
        let block = source.arch.module(name).map(ModuleSpec::block);
        layer == i && matches!(block, Some(Block::Mlp | Block::Experts)) && filter(name, name, name)
    })
}

/// The `--modules` list that carries the attention alone: each attention module type of the
/// target that some source attention module feeds, and each source type all of whose parts
/// the target has (else the parts it has, by name: `q_proj` of a `qkv_proj` onto latent
/// attention), linear attention's too. Two standard attentions give `q_proj,k_proj,v_proj,o_proj`.
pub fn attention_modules(source: &ModelSide<'_>, target: &ModelSide<'_>) -> Vec<String> {
    let attention = |side: &ModelSide<'_>| -> Vec<&'static ModuleSpec> {
        let held = side.arch.modules.iter();
        held.filter(|m| {
            matches!(m.block(), Block::Attention | Block::LinearAttention)
                && m.present_in(&side.ckpt.config)
        })
        .collect()
    };
    let (s, t) = (attention(source), attention(target));
    let parts = |specs: &[&ModuleSpec]| -> BTreeSet<Part> {
        specs.iter().flat_map(|m| m.parts.iter().copied()).collect()
    };
    let (in_s, in_t) = (parts(&s), parts(&t));
    let mut names: Vec<String> = Vec::new();
    let mut add = |name: &str| {
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
    };
    for m in t
        .iter()
        .filter(|m| m.parts.iter().any(|p| in_s.contains(p)))
    {
        add(&m.name);
    }
    for m in &s {
        if m.parts.iter().all(|p| in_t.contains(p)) {
            add(&m.name);
        } else {
            let shared = m.parts.iter().filter(|p| in_t.contains(p));
            shared.for_each(|p| add(p.module_name()));
        }
    }
    names
}

/// The refusal of a target module whose source layer cannot fill it, with the transfer that
/// still works.
pub(super) fn refusal(
    source: &ModelSide<'_>,
    target: &ModelSide<'_>,
    spec: &ModuleSpec,
    why: &str,
) -> Error {
    // Where one model mixes linear attention in and the other does not, their attentions do
    // not pair layer for layer either: no list carries the attention alone.
    let alone = match source.hybrid() == target.hybrid() {
        true => format!(
            "; transfer the attention alone with --modules {}",
            attention_modules(source, target).join(",")
        ),
        false => String::new(),
    };
    Error::Config {
        path: target.ckpt.dir.clone(),
        reason: format!(
            "this model's `{}` cannot take the adapter's update: {why}{alone}{}",
            spec.name,
            layer_map_hint(source, target)
        ),
    }
}

/// Where either model mixes dense and expert layers, pairing layers of one kind is the other way.
fn layer_map_hint(source: &ModelSide<'_>, target: &ModelSide<'_>) -> &'static str {
    if source.mixes_layer_kinds() || target.mixes_layer_kinds() {
        ", or pair layers of one kind with --layer-map"
    } else {
        ""
    }
}

/// Refuses an update of source layer `i` that no module of target layer `j` takes (a shared
/// expert where the target has none; a latent query's where the target's query has no latent; a
/// fused module's parts the target has no rows for), unless `--modules` leaves it out. `taken`
/// holds the source module types and parts layer `j` drew on.
pub(super) fn check_taken(
    source: &ModelSide<'_>,
    target: &ModelSide<'_>,
    (i, j): (usize, usize),
    taken: &BTreeSet<(&str, Part)>,
    present: &Present<'_>,
    filter: &ModuleFilter,
) -> Result<()> {
    // Each module type of the layer with the parts nothing takes.
    let left: Vec<(&str, &str, Vec<Part>)> = present
        .iter()
        .filter(|((layer, _, _), _)| *layer == i)
        .filter_map(|(&(_, _, name), &module)| {
            let spec = source.arch.module(name).expect("parsed");
            let parts: Vec<Part> = spec
                .parts
                .iter()
                .copied()
                .filter(|&p| !taken.contains(&(name, p)))
                .collect();
            (!parts.is_empty()).then_some((name, module, parts))
        })
        .collect();
    // A left-over part is selected as its unit would be: by the part's name in a fused module
    // (`k_proj` of `qkv_proj`), else by the module's.
    let selected = |name: &str, parts: &[Part]| {
        let fused = source.arch.module(name).is_some_and(|m| m.parts.len() > 1);
        parts.iter().any(|p| {
            let label = if fused { p.module_name() } else { name };
            filter(label, name, name)
        })
    };
    let Some((name, module, parts)) = left.iter().find(|(name, _, parts)| selected(name, parts))
    else {
        return Ok(());
    };
    // The list, within the current selection, that leaves out every module type with
    // something left over, keeping the parts of fused ones that are taken (`q_proj` of a
    // `qkv_proj` whose k and v have no target).
    let mut others: BTreeSet<&str> = present
        .keys()
        .map(|&(_, _, other)| other)
        .filter(|other| !left.iter().any(|(n, _, _)| n == other))
        .filter(|other| filter(other, other, other))
        .collect();
    for (n, _, _) in &left {
        let kept = taken
            .iter()
            .filter(|(t, p)| t == n && filter(p.module_name(), n, n));
        others.extend(kept.map(|(_, p)| p.module_name()));
    }
    let hint = match others.is_empty() {
        true => String::new(),
        false => format!(
            "; leave it out with --modules {}",
            others.into_iter().collect::<Vec<_>>().join(",")
        ),
    };
    let spec = source.arch.module(name).expect("parsed");
    // An attention update against a layer of the other attention kind, where both models mix
    // the kinds: a layer map (the default one does) pairs layers of one kind. Where only one
    // model mixes them, no layer map carries every layer's attention.
    let attention = matches!(spec.block(), Block::Attention | Block::LinearAttention);
    let both_mix = source.hybrid() && target.hybrid();
    let kinds = match attention && both_mix && !target.holds_block(j, spec.block()) {
        true => " (pair layers of one attention kind with --layer-map)",
        false => "",
    };
    let what = match spec.block() {
        _ if parts.len() < spec.parts.len() => {
            let names: Vec<&str> = parts.iter().map(|p| p.module_name()).collect();
            format!("`{}`", names.join("`, `"))
        }
        Block::Attention => format!("`{name}`"),
        block => block.describe().to_string(),
    };
    // Linear attention in both layers, in projections fused otherwise (Qwen3.5's five against
    // Qwen3-Next's three).
    let there = match spec.block() == Block::LinearAttention
        && target.holds_block(j, Block::LinearAttention)
    {
        true => {
            format!("whose linear attention has no `{name}` (its projections are fused otherwise)")
        }
        false => format!("which has no {what} there"),
    };
    Err(Error::Config {
        path: target.ckpt.dir.clone(),
        reason: format!(
            "the adapter's `{module}` ({what} of source layer {i}) has no counterpart in layer \
             {j} of this model, {there}{kinds}{hint}"
        ),
    })
}

/// Whether the two models' MLPs pair layer for layer along the depth map: both dense, or both
/// with experts whose routers compare, each pair of layers of one kind with shared experts on
/// both sides or neither.
pub fn mlps_pair(source: &ModelSide<'_>, target: &ModelSide<'_>) -> bool {
    let kind = |s: &ModelSide<'_>, l: usize| (s.sparse(l), s.holds_block(l, Block::SharedExpert));
    match (source.arch.has_experts(), target.arch.has_experts()) {
        (false, false) => true,
        (true, true) => {
            super::experts::routers_compare(source, target)
                && super::layers::default_pairs(source, target)
                    .iter()
                    .all(|(&j, &i)| kind(source, i) == kind(target, j))
        }
        _ => false,
    }
}
