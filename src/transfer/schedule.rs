//! Batching for backends that decompose many matrices in one launch (the CUDA backend): the
//! units are taken in plan order, a chunk at a time; the decompositions a chunk needs are grouped
//! by shape, dtype and rank and computed as batches before its units run, which then find their
//! bases ready. Memory stays bounded by the chunk (host: the weights stay in the mapped files)
//! and by the backend, which splits a group to fit its device memory.

use std::collections::BTreeMap;

use super::basis::{self, BasisKey, Prefetched, Role};
use super::execute::Context;
use crate::backend::{Origin, RawBatch, RawWeight, SvdParams};
use crate::error::Result;
use crate::plan::Unit;

/// Units per chunk: about eight layers of seven projections.
pub const UNITS_PER_CHUNK: usize = 56;

/// Computes, in batches, the bases that `units` (those with `needs_bases`) will ask for.
pub fn prefetch(ctx: &Context<'_>, units: &[(&Unit, bool)], into: &Prefetched) -> Result<()> {
    // Distinct decompositions, grouped by (rows, cols, dtype, rank) so a group is one batch.
    let mut groups: BTreeMap<(usize, usize, String, usize), Vec<BasisKey>> = BTreeMap::new();
    for (unit, needs_bases) in units {
        if !needs_bases {
            continue;
        }
        for role in [Role::Source, Role::Target] {
            let key = BasisKey::of_unit(unit, role);
            let ckpt = key.checkpoint(ctx);
            // A weight that is built when it is read (a dequantized GGUF tensor) is decomposed
            // with its unit, one at a time, rather than held in host memory with its batch.
            if !ckpt.borrows(&key.tensor) || into.holds(&key) {
                continue;
            }
            let dtype = format!("{:?}", ckpt.float_type(&key.tensor));
            let cols = match role {
                Role::Source => unit.source_shape.1,
                Role::Target => unit.target_shape.1,
            };
            let group = groups
                .entry((key.row_count(), cols, dtype, unit.rank))
                .or_default();
            if !group.contains(&key) {
                group.push(key);
            }
        }
    }
    // What is not in the disk cache, per group: (params, keys, Ω names).
    let mut todo: Vec<(SvdParams, Vec<BasisKey>, Vec<String>)> = Vec::new();
    for keys in groups.into_values() {
        let mut missing = Vec::new();
        for key in keys {
            match basis::cached(ctx, &key)? {
                Some(basis) => into.put(key, basis),
                None => missing.push(key),
            }
        }
        if missing.is_empty() {
            continue;
        }
        let names: Vec<String> = missing
            .iter()
            .map(|k| k.omega_name(ctx))
            .collect::<Result<_>>()?;
        todo.push((missing[0].params(ctx), missing, names));
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
                    let (bytes, ty, cols, path) = k
                        .checkpoint(ctx)
                        .rows_raw_unchecked(&k.tensor, k.row_range())?;
                    let crate::io::RawBytes::Borrowed(bytes) = bytes else {
                        return Err(crate::error::Error::internal(format!(
                            "{} is built when read, but was batched",
                            k.tensor
                        )));
                    };
                    Ok(RawWeight {
                        name,
                        bytes,
                        ty,
                        rows: k.row_count(),
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
            basis::store(ctx, key, &basis)?;
            into.put(key.clone(), basis);
        }
    }
    Ok(())
}
