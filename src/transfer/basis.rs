//! Getting the basis (truncated SVD) of one base weight, by one path whatever asks for it: a
//! unit of the transfer, the batch schedule or `inspect`. A [`BasisKey`] names the decomposition
//! (which model, tensor, rows, rank); from it come the Ω name, the SVD settings and the disk-cache
//! key, so the three can never disagree. The basis is taken from the batch prefetch, else the
//! disk cache, else computed (and stored in the cache).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;

use super::cache::BasisCache;
use super::execute::Context;
use crate::backend::{Backend, Basis, RawWeight, Side, SvdParams};
use crate::error::Result;
use crate::io::checkpoint::Checkpoint;
use crate::plan::Unit;
use crate::timing::Phase;

/// Which base model a weight belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Source,
    Target,
}

/// Which decomposition: the model, the tensor and its rows, the rank.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BasisKey {
    pub role: Role,
    pub tensor: String,
    pub rows: (usize, usize),
    pub rank: usize,
}

impl BasisKey {
    pub fn new(role: Role, tensor: &str, rows: &Range<usize>, rank: usize) -> Self {
        Self {
            role,
            tensor: tensor.to_string(),
            rows: (rows.start, rows.end),
            rank,
        }
    }

    /// The decomposition one side of a unit needs.
    pub fn of_unit(unit: &Unit, role: Role) -> Self {
        match role {
            Role::Source => Self::new(role, &unit.source_tensor, &unit.source_rows, unit.rank),
            Role::Target => Self::new(role, &unit.target_tensor, &unit.target_rows, unit.rank),
        }
    }

    pub fn row_range(&self) -> Range<usize> {
        self.rows.0..self.rows.1
    }

    pub fn row_count(&self) -> usize {
        self.rows.1 - self.rows.0
    }

    /// The checkpoint the tensor is read from.
    pub fn checkpoint<'a>(&self, ctx: &Context<'a>) -> &'a Checkpoint {
        match self.role {
            Role::Source => ctx.source,
            Role::Target => ctx.target,
        }
    }

    /// The randomized-SVD settings of this decomposition.
    pub fn params(&self, ctx: &Context<'_>) -> SvdParams {
        SvdParams {
            rank: self.rank,
            oversample: ctx.options.oversample,
            power_iters: ctx.options.power_iters,
            seed: ctx.options.seed,
        }
    }

    /// The name that keys the matrix's Ω: the tensor's, or for a slice of a fused tensor (its
    /// own matrix) the tensor's with the rows.
    pub fn omega_name(&self, ctx: &Context<'_>) -> Result<String> {
        let full_rows = self.checkpoint(ctx).shape(&self.tensor)?[0];
        Ok(if self.row_count() == full_rows {
            self.tensor.clone()
        } else {
            format!("{}[{}:{}]", self.tensor, self.rows.0, self.rows.1)
        })
    }

    /// The disk cache's name for this decomposition.
    pub fn cache_key(&self, ctx: &Context<'_>) -> Result<String> {
        let files = self.checkpoint(ctx).files_of(&self.tensor);
        assert!(!files.is_empty(), "planned tensors exist");
        BasisCache::key(&files, &self.tensor, &self.row_range(), &self.params(ctx))
    }
}

/// Bases computed ahead of their units (batched on a device), and bases more than one unit
/// asks for (a source layer that several target layers are paired with, when depths differ):
/// each is held until its last unit has taken it, so it is computed once per run. (Units that
/// share a basis run one after another in one task, `run_units`, so none waits for another.)
#[derive(Default)]
pub struct Prefetched(Mutex<Held>);

#[derive(Default)]
struct Held {
    bases: HashMap<BasisKey, Basis>,
    /// Units still to ask for each key (from [`Prefetched::expect`]).
    remaining: HashMap<BasisKey, usize>,
}

impl Prefetched {
    /// One more unit will ask for `key`.
    pub fn expect(&self, key: BasisKey) {
        *self.lock().remaining.entry(key).or_insert(0) += 1;
    }

    /// How many units were said to ask for `key` and have not yet.
    pub fn expected(&self, key: &BasisKey) -> usize {
        self.lock().remaining.get(key).copied().unwrap_or(0)
    }

    /// The held basis of `key`, if any: the last unit to ask takes it, the others a copy.
    pub fn take(&self, key: &BasisKey) -> Option<Basis> {
        let mut held = self.lock();
        let left = held.remaining.get_mut(key).map(|r| {
            *r = r.saturating_sub(1);
            *r
        });
        match left {
            Some(0) | None => held.bases.remove(key),
            Some(_) => held.bases.get(key).cloned(),
        }
    }

    /// Holds a basis computed ahead of its units.
    pub fn put(&self, key: BasisKey, basis: Basis) {
        self.lock().bases.insert(key, basis);
    }

    /// Holds a basis just computed (or read from the disk cache) for a unit if other units
    /// will still ask for it.
    pub fn keep(&self, key: &BasisKey, basis: &Basis) {
        let mut held = self.lock();
        if held.remaining.get(key).is_some_and(|&r| r > 0) && !held.bases.contains_key(key) {
            held.bases.insert(key.clone(), basis.clone());
        }
    }

    /// Whether `key`'s basis is held.
    pub fn holds(&self, key: &BasisKey) -> bool {
        self.lock().bases.contains_key(key)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The disk cache's copy of a basis, if there is a cache and it has one.
pub fn cached(ctx: &Context<'_>, key: &BasisKey) -> Result<Option<Basis>> {
    let Some(cache) = ctx.cache else {
        return Ok(None);
    };
    let ck = key.cache_key(ctx)?;
    Ok(ctx.timings.time(Phase::Load, || cache.get(&ck)))
}

/// Stores a freshly computed basis in the disk cache, if there is one.
pub fn store(ctx: &Context<'_>, key: &BasisKey, basis: &Basis) -> Result<()> {
    if let Some(cache) = ctx.cache {
        let ck = key.cache_key(ctx)?;
        ctx.timings.time(Phase::Write, || cache.put(&ck, basis));
    }
    Ok(())
}

/// The basis of `key`: prefetched, cached, or computed now (and cached).
pub fn decompose(ctx: &Context<'_>, key: &BasisKey) -> Result<Basis> {
    if let Some(basis) = ctx.prefetched.and_then(|pre| pre.take(key)) {
        return Ok(basis);
    }
    let basis = match cached(ctx, key)? {
        Some(basis) => basis,
        None => {
            let basis = compute(ctx, key)?;
            store(ctx, key, &basis)?;
            basis
        }
    };
    if let Some(pre) = ctx.prefetched {
        pre.keep(key, &basis);
    }
    Ok(basis)
}

/// The basis of `key`, computed from its weight.
fn compute(ctx: &Context<'_>, key: &BasisKey) -> Result<Basis> {
    let omega = key.omega_name(ctx)?;
    let checkpoint = key.checkpoint(ctx);
    let params = key.params(ctx);
    // A GGUF's quantized tensor is decoded a band at a time as the products read it, not whole
    // (where the backend reads bands; else `rows_raw` decodes it once, whole).
    let decoder = if ctx.backend.decodes_bands() {
        ctx.timings.time(Phase::Load, || {
            checkpoint.row_decoder(&key.tensor, key.row_range())
        })?
    } else {
        None
    };
    if let Some(rows) = decoder {
        return ctx
            .backend
            .truncated_svd_decoded(&omega, &rows, &params, ctx.timings);
    }
    // Straight from the map in the stored dtype: a device backend converts as it reads, the CPU
    // backend a band at a time.
    let (bytes, ty, cols) = ctx.timings.time(Phase::Load, || {
        checkpoint.rows_raw(&key.tensor, key.row_range())
    })?;
    let weight = RawWeight {
        name: &omega,
        bytes: &bytes,
        ty,
        rows: key.row_count(),
        cols,
        unchecked: None,
    };
    ctx.backend.truncated_svd_raw(&weight, &params, ctx.timings)
}

/// The similarities (φ_U, φ_V) of two bases: each where that side's sizes agree (else None).
/// Backends may use their device-resident copies of the bases.
pub fn similarities(backend: &dyn Backend, s: &Basis, t: &Basis) -> (Option<f64>, Option<f64>) {
    let side = |side: Side| {
        (s.side(side).nrows() == t.side(side).nrows())
            .then(|| backend.basis_similarity(s, t, side) as f64)
    };
    (side(Side::U), side(Side::V))
}
