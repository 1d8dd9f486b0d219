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
        Block::Attention => Ok(Some(Block::Attention)),
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
    let uniform = (0..side.layers()).all(|l| side.sparse(l) == side.sparse(layer));
    let dir = side.ckpt.dir.display();
    match (side.sparse(layer), uniform) {
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
    let found: Vec<(Option<Part>, &'static ModuleSpec)> = if same_layout && from == spec.block() {
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

/// The refusal of a target module whose source layer cannot fill it, with the transfer that
/// still works.
pub(super) fn refusal(
    source: &ModelSide<'_>,
    target: &ModelSide<'_>,
    spec: &ModuleSpec,
    why: &str,
) -> Error {
    Error::Config {
        path: target.ckpt.dir.clone(),
        reason: format!(
            "this model's `{}` cannot take the adapter's update: {why}; transfer the attention \
             alone with --modules q_proj,k_proj,v_proj,o_proj{}",
            spec.name,
            layer_map_hint(source, target)
        ),
    }
}

/// Where either model mixes dense and expert layers, pairing layers of one kind is the other way.
fn layer_map_hint(source: &ModelSide<'_>, target: &ModelSide<'_>) -> &'static str {
    let mixed = |s: &ModelSide<'_>| {
        let sparse = (0..s.layers()).filter(|&l| s.sparse(l)).count();
        sparse > 0 && sparse < s.layers()
    };
    if mixed(source) || mixed(target) {
        ", or pair layers of one kind with --layer-map"
    } else {
        ""
    }
}

/// Refuses an update of source layer `i` that no module of target layer `j` takes (a shared
/// expert where the target has none; a latent query's where the target's query has no latent),
/// unless `--modules` leaves it out. `taken` holds the source module types layer `j` drew on.
pub(super) fn check_taken(
    source: &ModelSide<'_>,
    target: &ModelSide<'_>,
    (i, j): (usize, usize),
    taken: &BTreeSet<&str>,
    present: &Present<'_>,
    filter: &ModuleFilter,
) -> Result<()> {
    let mut left = present
        .iter()
        .filter(|((layer, _, name), _)| *layer == i && !taken.contains(name))
        .filter(|((_, _, name), _)| filter(name, name, name))
        .peekable();
    let Some((&(_, _, name), &module)) = left.peek().copied() else {
        return Ok(());
    };
    let left: BTreeSet<&str> = left.map(|(&(_, _, name), _)| name).collect();
    let others: BTreeSet<&str> = present
        .keys()
        .map(|&(_, _, other)| other)
        .filter(|other| !left.contains(other))
        .collect();
    let hint = match others.is_empty() {
        true => String::new(),
        false => format!(
            "; leave it out with --modules {}",
            others.into_iter().collect::<Vec<_>>().join(",")
        ),
    };
    let spec = source.arch.module(name).expect("parsed");
    let what = match spec.block() {
        Block::Attention => format!("`{name}`"),
        block => block.describe().to_string(),
    };
    Err(Error::Config {
        path: target.ckpt.dir.clone(),
        reason: format!(
            "the adapter's `{module}` ({what} of source layer {i}) has no counterpart in layer \
             {j} of this model, which has no {what} there{hint}"
        ),
    })
}

/// Whether the two models' MLPs pair layer for layer: both dense, or both with experts whose
/// routers compare, in layers of the same kinds, shared experts on both sides or neither.
pub fn mlps_pair(source: &ModelSide<'_>, target: &ModelSide<'_>) -> bool {
    match (source.arch.has_experts(), target.arch.has_experts()) {
        (false, false) => true,
        (true, true) => {
            let kinds = |s: &ModelSide<'_>| {
                (0..s.layers())
                    .map(|l| (s.sparse(l), s.holds_block(l, Block::SharedExpert)))
                    .collect::<Vec<_>>()
            };
            super::experts::routers_compare(source, target) && kinds(source) == kinds(target)
        }
        _ => false,
    }
}
