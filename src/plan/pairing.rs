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

/// The source modules that fill target module `spec` from source block `from`, each with the
/// part it gives (None: the whole module, when the two tables lay their modules out alike).
pub(super) fn pieces(
    source: &ModelSide<'_>,
    spec: &ModuleSpec,
    from: Block,
    same_layout: bool,
) -> Vec<(Option<Part>, &'static ModuleSpec)> {
    if same_layout && from == spec.block() {
        vec![(None, source.arch.module(&spec.name).expect("same layout"))]
    } else {
        spec.parts
            .iter()
            .map(|&p| {
                let m = source.arch.module_in(from, p);
                (
                    Some(p),
                    m.expect("a table holds every part of each block it has"),
                )
            })
            .collect()
    }
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
/// expert where the target has none), unless `--modules` leaves it out.
pub(super) fn check_taken(
    source: &ModelSide<'_>,
    target: &ModelSide<'_>,
    (i, j): (usize, usize),
    taken: &BTreeSet<Block>,
    present: &Present<'_>,
    filter: &ModuleFilter,
) -> Result<()> {
    let left = present
        .iter()
        .filter(|((layer, _, _), _)| *layer == i)
        .map(|(&(_, _, name), &module)| (source.arch.module(name).expect("parsed"), module))
        .find(|(spec, _)| {
            !taken.contains(&spec.block()) && filter(&spec.name, &spec.name, &spec.name)
        });
    let Some((spec, module)) = left else {
        return Ok(());
    };
    let others: BTreeSet<&str> = present
        .keys()
        .map(|&(_, _, name)| name)
        .filter(|&name| source.arch.module(name).map(ModuleSpec::block) != Some(spec.block()))
        .collect();
    let hint = match others.is_empty() {
        true => String::new(),
        false => format!(
            "; leave it out with --modules {}",
            others.into_iter().collect::<Vec<_>>().join(",")
        ),
    };
    Err(Error::Config {
        path: target.ckpt.dir.clone(),
        reason: format!(
            "the adapter's `{module}` ({} of source layer {i}) has no counterpart in layer {j} of \
             this model, which has no {} there{hint}",
            spec.block().describe(),
            spec.block().describe()
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
