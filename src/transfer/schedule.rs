//! Batching for backends that decompose many matrices in one launch (the CUDA backend): the
//! units are taken in plan order, a chunk at a time; the decompositions a chunk needs are grouped
//! by shape, dtype and rank and computed as batches before its units run, which then find their
//! bases ready. Memory stays bounded by the chunk (host: the weights stay in the mapped files)
//! and by the backend, which splits a group to fit its device memory.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Mutex;

use super::execute::{basis_params, omega_key, Context};
use crate::backend::{Basis, Origin, RawBatch, RawWeight, SvdParams};
use crate::error::Result;
use crate::io::checkpoint::Checkpoint;
use crate::plan::Unit;
use crate::timing::Phase;

/// Units per chunk: about eight layers of seven projections.
pub const UNITS_PER_CHUNK: usize = 56;

/// Which decomposition: the model side, the tensor and its rows, the rank.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BasisKey {
    pub target: bool,
    pub tensor: String,
    pub rows: (usize, usize),
    pub rank: usize,
}

impl BasisKey {
    pub fn new(target: bool, tensor: &str, rows: &Range<usize>, rank: usize) -> Self {
        Self {
            target,
            tensor: tensor.to_string(),
            rows: (rows.start, rows.end),
            rank,
        }
    }
}

/// Bases computed ahead of their units; each is taken once.
#[derive(Default)]
pub struct Prefetched(Mutex<HashMap<BasisKey, Basis>>);

impl Prefetched {
    pub fn take(&self, key: &BasisKey) -> Option<Basis> {
        self.0.lock().unwrap().remove(key)
    }
    fn put(&self, key: BasisKey, basis: Basis) {
        self.0.lock().unwrap().insert(key, basis);
    }
}

/// Computes, in batches, the bases that `units` (those with `needs_bases`) will ask for.
pub fn prefetch(ctx: &Context<'_>, units: &[(&Unit, bool)], into: &Prefetched) -> Result<()> {
    // Distinct decompositions, grouped by (rows, cols, dtype, rank) so a group is one batch.
    let mut groups: BTreeMap<(usize, usize, String, usize), Vec<BasisKey>> = BTreeMap::new();
    for (unit, needs_bases) in units {
        if !needs_bases {
            continue;
        }
        let sides = [
            (
                false,
                &unit.source_tensor,
                &unit.source_rows,
                unit.source_shape,
            ),
            (
                true,
                &unit.target_tensor,
                &unit.target_rows,
                unit.target_shape,
            ),
        ];
        for (target, tensor, rows, shape) in sides {
            let ckpt = side(ctx, target);
            let dtype = format!("{:?}", ckpt.float_type(tensor));
            let key = BasisKey::new(target, tensor, rows, unit.rank);
            let group = groups
                .entry((shape.0, shape.1, dtype, unit.rank))
                .or_default();
            if !group.contains(&key) {
                group.push(key);
            }
        }
    }
    // What is not in the disk cache, per group: (params, keys, Ω names).
    let mut todo: Vec<(SvdParams, Vec<BasisKey>, Vec<String>)> = Vec::new();
    for ((_, _, _, rank), keys) in groups {
        let mut missing = Vec::new();
        for key in keys {
            match cached(ctx, &key)? {
                Some(basis) => into.put(key, basis),
                None => missing.push(key),
            }
        }
        if missing.is_empty() {
            continue;
        }
        let names: Vec<String> = missing
            .iter()
            .map(|k| {
                let ckpt = side(ctx, k.target);
                Ok(omega_key(
                    &k.tensor,
                    &(k.rows.0..k.rows.1),
                    ckpt.shape(&k.tensor)?[0],
                ))
            })
            .collect::<Result<_>>()?;
        todo.push((basis_params(ctx, rank), missing, names));
    }
    if todo.is_empty() {
        return Ok(());
    }
    // Not read here: the backend checks each weight for NaN/Inf as it uploads it, so reading
    // the file overlaps the device's work on the weights before.
    let batches = todo
        .iter()
        .map(|(params, keys, names)| {
            let weights = keys
                .iter()
                .zip(names)
                .map(|(k, name)| {
                    let (bytes, ty, cols, path) =
                        side(ctx, k.target).rows_raw_unchecked(&k.tensor, k.rows.0..k.rows.1)?;
                    Ok(RawWeight {
                        name,
                        bytes,
                        ty,
                        rows: k.rows.1 - k.rows.0,
                        cols,
                        unchecked: Some(Origin {
                            path,
                            tensor: &k.tensor,
                            first_row: k.rows.0,
                        }),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(RawBatch {
                weights,
                params: *params,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // One call for the whole chunk: the backend pipelines across groups and bounds its memory.
    let bases = ctx
        .backend
        .truncated_svd_raw_batches(&batches, ctx.timings)?;
    for ((_, keys, _), group) in todo.iter().zip(bases) {
        for (key, basis) in keys.iter().zip(group) {
            if let Some(cache) = ctx.cache {
                let ck = cache_key(ctx, key)?;
                ctx.timings.time(Phase::Write, || cache.put(&ck, &basis));
            }
            into.put(key.clone(), basis);
        }
    }
    Ok(())
}

fn side<'a>(ctx: &Context<'a>, target: bool) -> &'a Checkpoint {
    if target {
        ctx.target
    } else {
        ctx.source
    }
}

/// The disk cache's name for a decomposition.
fn cache_key(ctx: &Context<'_>, key: &BasisKey) -> Result<String> {
    let file = side(ctx, key.target)
        .file_of(&key.tensor)
        .expect("planned tensors exist")
        .path();
    crate::transfer::cache::BasisCache::key(
        file,
        &key.tensor,
        &(key.rows.0..key.rows.1),
        &basis_params(ctx, key.rank),
    )
}

/// The disk cache's copy of a basis, if there is a cache and it has one.
fn cached(ctx: &Context<'_>, key: &BasisKey) -> Result<Option<Basis>> {
    let Some(cache) = ctx.cache else {
        return Ok(None);
    };
    let ck = cache_key(ctx, key)?;
    Ok(ctx.timings.time(Phase::Load, || cache.get(&ck)))
}
